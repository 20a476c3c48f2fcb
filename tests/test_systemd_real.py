"""The shipped unit under a real systemd (issue 17): a Debian 12 root made once with
``debootstrap`` and booted with ``systemd-nspawn``; the wheel and the unit installed as
docs/deploy.md says (a venv under /opt/wattprint, the service user, ``wattprint deploy
systemd``); then start, kill, freeze and stop, checked through systemd's own view.

- ``systemctl start`` returns once the daemon said READY=1 (Type=notify) and
  ``/healthz`` answers with a tick;
- the service holds exactly CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE (effective,
  permitted, inheritable, ambient and bounding sets), as a user other than root;
- after ``kill -9`` systemd restarts it (Restart=on-failure);
- frozen with SIGSTOP, it misses its WATCHDOG=1 pings and systemd kills and restarts it
  within WatchdogSec;
- ``systemctl stop`` ends it cleanly (SIGTERM, STOPPING=1, Result=success).

The root is cached in ``WATTPRINT_NSPAWN_CACHE`` (default
/var/tmp/wattprint-nspawn-bookworm; about 300 MB, 50-80 s to make) and copied per run.
The container gets ``--private-network``, the wheel and this venv's site-packages (the
wheel's dependencies: there is no network inside) read-only. Needs root,
``debootstrap`` and ``systemd-nspawn`` (Debian ``systemd-container``).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from servers import require_binary, running_in_ci

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("WATTPRINT_NSPAWN_CACHE", "/var/tmp/wattprint-nspawn-bookworm"))
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,passwd"
TWO_CAPS = (1 << 2) | (1 << 19)  # CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".gl", ".whl", ".mutmut", "mutants", ".venv-*")
IN_PATH = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}

pytestmark = pytest.mark.slow


def debian_mirror() -> str:
    """The Debian mirror apt is configured with (deb822 or one-line sources), else deb.debian.org."""
    if os.environ.get("WATTPRINT_DEBIAN_MIRROR"):
        return os.environ["WATTPRINT_DEBIAN_MIRROR"]
    for path in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")) + [Path("/etc/apt/sources.list")]:
        try:
            text = path.read_text()
        except OSError:
            continue
        m = re.search(r"^URIs:\s*(\S+/debian)/?\s*$", text, re.M) or re.search(r"^deb\s+(\S+/debian)/?\s", text, re.M)
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


def base_root() -> Path:
    """The cached Debian 12 root, made with debootstrap the first time (under a lock)."""
    ready = CACHE / ".wattprint-ready"
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{CACHE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready.exists():
            return CACHE
        tmp = Path(f"{CACHE}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        result = subprocess.run([require_binary("debootstrap"), "--variant=minbase", f"--include={PACKAGES}",
                                 "bookworm", str(tmp), debian_mirror()], capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"debootstrap failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        shutil.rmtree(CACHE, ignore_errors=True)
        tmp.rename(CACHE)
        ready.write_text(PACKAGES + "\n")
        return CACHE


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO, base / "src", ignore=NOT_COPIED)
    result = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(base / "dist"), str(base / "src")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return base / "dist"


class Container:
    """A booted systemd-nspawn container; ``run`` executes a command inside it (nsenter
    into its init's namespaces: with --register=no there is no machinectl)."""

    def __init__(self, root: Path, binds: list[str], log: Path):
        self.root, self.log = root, log
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [require_binary("systemd-nspawn"), "-D", str(root), "--boot", "--register=no", "--keep-unit",
                 "--private-network", "--capability=CAP_BPF", "--system-call-filter=bpf", "--console=pipe",
                 "-M", "wattprint-test", *[f"--bind-ro={b}" for b in binds]],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.leader = self._wait_booted()

    def _wait_booted(self, timeout_s: float = 90.0) -> int:
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"systemd-nspawn exited:\n{self.log.read_text(errors='replace')[-3000:]}"
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            try:
                kids = children.read_text().split()
            except OSError:
                kids = []
            if kids:
                self.leader = int(kids[0])
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return self.leader
            time.sleep(0.5)
        raise AssertionError(f"container not booted ({state!r}):\n{self.log.read_text(errors='replace')[-3000:]}")

    def run(self, *cmd: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["nsenter", "-t", str(self.leader), "-a", "--", *cmd], capture_output=True, text=True,
                                timeout=timeout, env=IN_PATH)
        if check:
            assert result.returncode == 0, f"{cmd}: {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result

    def show(self, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", "wattprint", *[f"--property={p}" for p in props]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn powers the container off
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def container(tmp_path: Path, wheel_dir: Path) -> Iterator[Container]:
    if os.geteuid() != 0:
        message = "a real systemd in systemd-nspawn needs root"
        if running_in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    require_binary("nsenter")
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(base_root()), str(root)], check=True, timeout=300)
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()][0]
    c = Container(root, [f"{deps}:/opt/wattprint/deps", f"{wheel_dir}:/mnt/dist"], tmp_path / "nspawn.log")
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def wait_for(what: str, check, timeout_s: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last  # type: ignore[return-value]
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout_s} s (last: {last})")


def test_unit_starts_restarts_trips_its_watchdog_and_holds_two_capabilities(container: Container) -> None:
    c = container
    # docs/deploy.md, step 1: a venv under /opt/wattprint with the wheel (its
    # dependencies from the bind-mounted site-packages: no network inside).
    c.run("python3", "-m", "venv", "/opt/wattprint/venv")
    purelib = c.run("/opt/wattprint/venv/bin/python", "-c",
                    "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    c.run("sh", "-c", f"echo /opt/wattprint/deps > {purelib}/wattprint-deps.pth")
    c.run("sh", "-c", "/opt/wattprint/venv/bin/pip install --quiet --no-index --no-deps /mnt/dist/wattprint-*.whl")
    c.run("useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/var/lib/wattprint",
          "--shell", "/usr/sbin/nologin", "wattprint")
    # Steps 2 and 3, with the files the installed package writes out.
    c.run("/opt/wattprint/venv/bin/wattprint", "deploy", "systemd", "/tmp/wattprint-deploy")
    c.run("install", "-d", "-m", "0755", "/etc/wattprint")
    c.run("install", "-m", "0644", "/tmp/wattprint-deploy/wattprint.toml", "/etc/wattprint/wattprint.toml")
    c.run("install", "-m", "0644", "/tmp/wattprint-deploy/wattprint.service", "/etc/systemd/system/wattprint.service")
    assert "ExecStart=/opt/wattprint/venv/bin/wattprint run" in c.run("cat", "/etc/systemd/system/wattprint.service").stdout
    c.run("systemctl", "daemon-reload")

    # Start: returns only after READY=1 (Type=notify); /healthz already has a tick.
    c.run("systemctl", "start", "wattprint", timeout=200)
    props = c.show("ActiveState", "SubState", "Type", "MainPID", "NRestarts", "WatchdogUSec")
    assert (props["ActiveState"], props["SubState"], props["Type"]) == ("active", "running", "notify"), props
    assert props["WatchdogUSec"] == "30s" and props["NRestarts"] == "0"
    first = int(props["MainPID"])
    health = json.loads(c.run("/opt/wattprint/venv/bin/python", "-c",
                              "import urllib.request, urllib.error\n"
                              "try:\n r = urllib.request.urlopen('http://127.0.0.1:9877/healthz', timeout=10)\n"
                              "except urllib.error.HTTPError as e:\n r = e\n"
                              "print(r.read().decode())").stdout)
    assert health["tick"] >= 1 and {p["name"] for p in health["parts"]} >= {"processes", "store"}, health

    # Exactly the two capabilities, in every set.
    status = c.run("cat", f"/proc/{first}/status").stdout
    caps = {k: int(v, 16) for k, v in re.findall(r"^(Cap\w+):\s*([0-9a-f]+)$", status, re.M)}
    # (ambient capabilities must also be inheritable: systemd sets both)
    assert caps == {"CapInh": TWO_CAPS, "CapPrm": TWO_CAPS, "CapEff": TWO_CAPS, "CapBnd": TWO_CAPS, "CapAmb": TWO_CAPS}, caps
    assert re.search(r"^Uid:\s+(\d+)", status, re.M).group(1) != "0"  # type: ignore[union-attr]

    # kill -9: Restart=on-failure brings it back (RestartSec=5).
    c.run("sh", "-c", f"kill -KILL {first}")  # the shell's kill: minbase has no procps
    after_kill = wait_for("restart after kill -9", lambda: (
        p if (p := c.show("ActiveState", "MainPID", "NRestarts"))["NRestarts"] == "1"
        and p["ActiveState"] == "active" and p["MainPID"] not in ("0", str(first)) else None), 60)
    second = int(after_kill["MainPID"])

    # Frozen: no WATCHDOG=1 for WatchdogSec (30 s): systemd kills and restarts it.
    c.run("sh", "-c", f"kill -STOP {second}")
    after_freeze = wait_for("watchdog restart of a frozen daemon", lambda: (
        p if (p := c.show("ActiveState", "MainPID", "NRestarts"))["NRestarts"] == "2"
        and p["ActiveState"] == "active" and p["MainPID"] not in ("0", str(second)) else None), 90)
    journal = c.run("journalctl", "-u", "wattprint", "--no-pager", "-o", "cat").stdout
    assert re.search(r"[Ww]atchdog timeout", journal), journal[-3000:]
    assert after_freeze["MainPID"] != str(first)

    # Stop: SIGTERM, a clean exit.
    c.run("systemctl", "stop", "wattprint", timeout=60)
    props = c.show("ActiveState", "Result", "ExecMainStatus")
    assert (props["ActiveState"], props["Result"]) == ("inactive", "success"), props
