"""Shared machinery for the overhead benchmarks: a simulated box (real processes, a
simulated NVML, a powercap tree), the real daemon, the floor, the CodeCarbon peer,
and the measurement of all three over the same window on the same machine.

What is measured, per process, over the window (after a warm-up):

- CPU time per second of wall time (% of one core): the sum over the process's
  threads of ``/proc/PID/task/TID/schedstat`` (nanoseconds on CPU); if a thread that
  existed at the start is gone at the end, ``utime + stime`` of ``/proc/PID/stat``
  (10 ms resolution, counts dead threads) is used instead, and the result says so.
- RSS: ``VmHWM`` (peak, since start) and the median ``VmRSS`` of the samples taken
  every ``scrape_s`` seconds in the second half of the window (steady).
- For the daemon only: every tick's duration and tick-thread CPU time, recorded by
  ``benchmarks/daemon_timed.py`` (the daemon itself has no per-tick log), and the
  ``wattprint_tick_duration_seconds`` gauge scraped from /metrics every ``scrape_s``
  seconds (the scrape is also the Prometheus load, 3x the default 15 s rate).
- The stage split (``benchmarks/stage_split.py``): a second, in-process engine built
  from the same config ticks beside the daemon during the window.
- The box: process creations per second on the whole machine (``processes`` in
  /proc/stat), PIDs handed out per second in the scenario's PID namespace (processes
  and threads; /proc/loadavg's last PID), and the load average. Each new PID makes
  the daemon list /proc, so when the scenario is not isolated (see
  ``overhead.run_isolated``) other people's processes cost it too.

Work directories are under /tmp and removed afterwards (WATTPRINT_BENCH_KEEP=1 keeps
them: config, sim file, daemon log, ticks.json, the codecarbon log).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from gpusim import gpu, proc, write_sim  # noqa: E402,F401  (proc: re-exported for overhead.py)
from powercap import PowercapTree  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PY = sys.executable
CODECARBON_VENV = Path(os.environ.get("WATTPRINT_BENCH_CODECARBON_VENV", str(ROOT / ".venv-bench")))
CODECARBON_SPEC = os.environ.get("WATTPRINT_BENCH_CODECARBON_SPEC", "codecarbon==3.3.2")
# codecarbon monitor, offline (no API, no geo lookup), country for its static grid mix,
# one measurement per second; --no-api is implied by --offline but said anyway.
CODECARBON_ARGS = ["monitor", "--offline", "--country-iso-code", "DNK", "--measure-power-secs", "1", "--no-api"]
RAPL_RATES_W = {"package": 120.0, "dram": 15.0}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def clean_env() -> dict[str, str]:
    """The environment without job labels and tool configuration."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("WATTPRINT_", "CODECARBON_")) and k != "SLURM_JOB_ID"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- accounting

def task_ns(pid: int) -> dict[int, int]:
    out: dict[int, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                out[int(tid)] = int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return out


def stat_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        rest = fh.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


class CpuClock:
    """CPU seconds a process used since ``start()`` (see the module docstring)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.ns0 = task_ns(pid)
        self.s0 = stat_cpu_s(pid)

    def read(self) -> tuple[float, str]:
        ns1 = task_ns(self.pid)
        s1 = stat_cpu_s(self.pid)
        if set(self.ns0) <= set(ns1):
            return sum(v - self.ns0.get(t, 0) for t, v in ns1.items()) / 1e9, "schedstat"
        return s1 - self.s0, "stat (a thread exited)"


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB."""
    vals = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                vals[line[:5]] = int(line.split()[1])
    return vals.get("VmRSS", 0), vals.get("VmHWM", 0)


def box_forks() -> int:
    with open("/proc/stat") as fh:
        for line in fh:
            if line.startswith("processes "):
                return int(line.split()[1])
    return 0


def loadavg() -> float:
    with open("/proc/loadavg") as fh:
        return float(fh.read().split()[0])


def last_pid() -> int:
    """The last PID handed out in this PID namespace (processes and threads)."""
    with open("/proc/loadavg") as fh:
        return int(fh.read().split()[4])


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


# --------------------------------------------------------------------------- the box

class Box:
    """Real processes, a simulated GPU file and a powercap tree in a work directory."""

    def __init__(self, name: str, n_gpus: int = 8):
        self.name = name
        self.work = Path(tempfile.mkdtemp(prefix=f"wattprint-bench-{name}-"))
        self.env = clean_env()
        self.procs: list[subprocess.Popen] = []
        self.sim = self.work / "sim.json"
        self.gpus = [gpu(g, power_w=300.0 if n_gpus else 0.0, processes=[]) for g in range(n_gpus)]
        write_sim(self.sim, self.gpus)
        self.tree = PowercapTree(self.work / "powercap")
        zones = [self.tree.add_package(0), self.tree.add_package(1)]
        self.feeder = self.tree.start_feeding(
            {z[role]: RAPL_RATES_W[role] for z in zones for role in ("package", "dram")}, period_s=0.1)
        self.port = free_port()
        self.config = self.work / "wattprint.toml"
        self.config.write_text(
            f'[daemon]\nstate_dir = "{self.work / "state"}"\nhost = "bench"\n'
            f'[gpu]\nbackend = "sim"\nsim_file = "{self.sim}"\n'
            f'[cpu]\nsource = "rapl"\npowercap_root = "{self.work / "powercap"}"\n'
            f'[http]\nlisten = "127.0.0.1:{self.port}"\nrate_limit_per_s = 0\n')

    def second_config(self, name: str) -> Path:
        """A config like ``self.config`` with its own port and state directory, for a
        second daemon (the baseline) beside the first."""
        port = free_port()
        path = self.work / f"wattprint-{name}.toml"
        path.write_text(self.config.read_text()
                        .replace(f'state_dir = "{self.work / "state"}"', f'state_dir = "{self.work / ("state-" + name)}"')
                        .replace(f"127.0.0.1:{self.port}", f"127.0.0.1:{port}"))
        return path

    # processes
    def spawn_idle(self, n: int, seconds: float = 3600) -> None:
        for _ in range(n):
            self.procs.append(subprocess.Popen(["sleep", f"{seconds:g}"], env=self.env, start_new_session=True))

    def spawn_job(self, label: str, workers: int = 2, seconds: float = 3600) -> subprocess.Popen:
        """A labelled job: ``sh`` with ``workers`` children (sleep), like a launcher
        and its workers. Returns the leader (its children: ``children(p.pid)``)."""
        script = " ".join([f"sleep {seconds:g} &"] * workers) + " wait"
        p = subprocess.Popen(["sh", "-c", script], env={**self.env, "WATTPRINT_JOB": label}, start_new_session=True)
        self.procs.append(p)
        return p

    @staticmethod
    def children(pid: int, want: int, timeout_s: float = 5.0) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as fh:
                    kids = [int(x) for x in fh.read().split()]
            except OSError:
                kids = []
            if len(kids) >= want or time.monotonic() > deadline:
                return kids
            time.sleep(0.01)

    def write_gpus(self) -> None:
        write_sim(self.sim, self.gpus)

    def close(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            p.wait()
        try:
            self.feeder.stop()
        except RuntimeError:
            pass
        if not os.environ.get("WATTPRINT_BENCH_KEEP"):
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            log(f"kept {self.work}")


# --------------------------------------------------------------------------- the processes measured

class Daemon:
    """The real daemon, through daemon_timed.py. With ``code``, the ``wattprint``
    package is imported from that directory (``baseline_tree``) instead of the
    working tree: the "before" daemon, run beside the working tree's in one window."""

    def __init__(self, box: Box, name: str = "wattprint", code: Path | None = None, timed: bool = True):
        """``timed=False``: the plain CLI, without daemon_timed.py's per-tick records
        (a list that grows by about 150 bytes a tick: for memory over hours)."""
        self.box = box
        self.name = name
        config = box.config if name == "wattprint" else box.second_config(name)
        port = box.port if name == "wattprint" else int(config.read_text().split("127.0.0.1:")[1].split('"')[0])
        self.ticks_path = box.work / f"ticks-{name}.json"
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = box.work / f"daemon-{name}.log"
        self.log = open(self.log_path, "wb")
        env = dict(box.env)
        if code is not None:
            env["PYTHONPATH"] = str(code)
        wrapper = [str(BENCH / "daemon_timed.py"), "--ticks-out", str(self.ticks_path)] if timed else \
            ["-m", "wattprint.daemon"]
        self.p = subprocess.Popen([PY, *wrapper, "run", "--config", str(config)],
                                  stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            return resp.read()

    def wait_ticks(self, n: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"daemon {self.name} exited: {self.log_path.read_text()[-3000:]}")
            try:
                if json.loads(self.get("/healthz")).get("tick", 0) >= n:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError("daemon not ticking")

    def scrape_tick_duration(self) -> float | None:
        for line in self.get("/metrics").decode().splitlines():
            if line.startswith("wattprint_tick_duration_seconds "):
                return float(line.split()[1])
        return None

    def stop(self) -> list[list[float]]:
        self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self.log.close()
        try:
            return json.loads(self.ticks_path.read_text())["ticks"]
        except (OSError, ValueError):
            return []


def baseline_tree(ref: str, overlay: tuple[str, ...] = ()) -> Path:
    """The daemon's code at git ``ref`` (daemon/, exporters/, deploy/), laid out as an
    importable ``wattprint`` package in a temp directory (read-only git: ``git archive``).
    ``overlay``: files (paths from the repository root, under daemon/ or exporters/)
    copied over it from the working tree: ``ref`` plus exactly those changes."""
    out = Path(tempfile.mkdtemp(prefix="wattprint-bench-baseline-"))
    pkg = out / "wattprint"
    pkg.mkdir()
    archive = subprocess.run(["git", "archive", "--format=tar", ref, "daemon", "exporters", "deploy"],
                             cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(pkg)], input=archive, check=True)
    (pkg / "__init__.py").write_text("")
    for item in overlay:  # "path" (from the working tree) or "path=SOURCE FILE"
        rel, _, src = item.partition("=")
        shutil.copyfile(Path(src) if src else ROOT / rel, pkg / rel)
    return out


def ensure_codecarbon() -> Path | None:
    """codecarbon in its own venv (created on first use); None when it cannot be had."""
    exe = CODECARBON_VENV / "bin" / "codecarbon"
    if exe.exists():
        return exe
    log(f"installing {CODECARBON_SPEC} into {CODECARBON_VENV} (once)")
    try:
        subprocess.run([PY, "-m", "venv", str(CODECARBON_VENV)], check=True)
        subprocess.run([str(CODECARBON_VENV / "bin" / "pip"), "install", "-q", CODECARBON_SPEC], check=True)
    except (subprocess.CalledProcessError, OSError) as exc:
        log(f"codecarbon unavailable: {exc}")
        return None
    return exe if exe.exists() else None


class Peer:
    """``codecarbon monitor`` at 1 s, offline, in its own HOME and working directory."""

    def __init__(self, workdir: Path, exe: Path):
        self.dir = workdir / "codecarbon"
        self.dir.mkdir()
        env = {**clean_env(), "HOME": str(self.dir), "PYTHONUNBUFFERED": "1"}
        self.out = self.dir / "monitor.log"
        self.fh = open(self.out, "wb")
        self.p = subprocess.Popen([str(exe), *CODECARBON_ARGS], cwd=self.dir, env=env,
                                  stdout=self.fh, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                return False
            if b"infinite loop" in self.out.read_bytes():
                time.sleep(3.0)  # tracker.start(): hardware setup, first measurement
                return self.p.poll() is None
            time.sleep(0.2)
        return False

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
            try:
                self.p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self.fh.close()


@dataclass
class Window:
    """The result of one measurement window."""

    seconds: float
    cpu_s: dict[str, float] = field(default_factory=dict)
    cpu_method: dict[str, str] = field(default_factory=dict)
    rss_samples: dict[str, list[int]] = field(default_factory=dict)
    hwm: dict[str, int] = field(default_factory=dict)
    gauge: list[float] = field(default_factory=list)
    forks: int = 0
    pids: int = 0
    load: tuple[float, float] = (0.0, 0.0)


def measure(box: Box, seconds: float, *, warmup_s: float = 3.0, scrape_s: float = 5.0,
            driver: Callable[[float], None] | None = None, peer: bool = True,
            split: bool = True, marks: Path | None = None, baseline: Path | None = None,
            api_reads_s: float = 0.0, after: Path | None = None) -> dict[str, Any]:
    """Run the daemon, the floor, the peer and the stage split over one window.
    With ``marks``, the files ``start`` and ``end`` are written there when the
    window opens and closes (for a peer measured from outside, see
    ``overhead.run_isolated``). With ``baseline`` (a ``baseline_tree``), a second
    daemon runs that code beside the working tree's, measured as ``before``. With
    ``api_reads_s``, ``/metrics`` and ``/api/v1/jobs`` of each daemon are read every
    ``api_reads_s`` seconds (a scraper and a dashboard)."""
    daemon = Daemon(box, code=after)  # the working tree's, or ``after`` (a baseline_tree with an overlay)
    before = Daemon(box, "before", baseline) if baseline is not None else None
    split_p = floor_p = None
    peer_run: Peer | None = None
    try:
        daemon.wait_ticks(2)
        if before is not None:
            before.wait_ticks(2)
        split_out = box.work / "split.json"
        if split:
            split_p = subprocess.Popen([PY, str(BENCH / "stage_split.py"), "--config", str(box.config),
                                        "--seconds", str(seconds + warmup_s), "--out", str(split_out),
                                        "--state-dir", str(box.work / "split-state")], env=box.env)
        floor_p = subprocess.Popen([PY, str(BENCH / "floor.py"), "--seconds", str(seconds + warmup_s + 120),
                                    "--sim-file", str(box.sim), "--powercap-root", str(box.work / "powercap")],
                                   env=box.env)
        peer_note = ""
        if peer:
            exe = ensure_codecarbon()
            if exe is None:
                peer_note = "codecarbon could not be installed"
            else:
                peer_run = Peer(box.work, exe)
                if not peer_run.wait_ready():
                    peer_note = "codecarbon monitor did not start: " + peer_run.out.read_text(errors="replace")[-500:]
                    peer_run.stop()
                    peer_run = None
        t_warm = time.monotonic() + warmup_s
        while time.monotonic() < t_warm:
            if driver:
                driver(time.monotonic())
            time.sleep(0.05)

        measured = {"wattprint": daemon.p.pid, "floor": floor_p.pid}
        if before is not None:
            measured["before"] = before.p.pid
        if peer_run is not None:
            measured["codecarbon"] = peer_run.p.pid
        clocks = {k: CpuClock(pid) for k, pid in measured.items()}
        if marks is not None:
            (marks / "start").write_text(str(time.time()))
        win = Window(seconds=seconds, rss_samples={k: [] for k in measured})
        forks0, load0, pid0 = box_forks(), loadavg(), last_pid()
        w0 = time.monotonic()
        wall0 = time.time()
        end = w0 + seconds
        next_scrape = w0
        next_read = w0
        api_failures = 0
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if driver:
                driver(now)
            if api_reads_s and now >= next_read:
                next_read += api_reads_s
                for d in (daemon, before):
                    if d is None:
                        continue
                    for path in ("/metrics", "/api/v1/jobs"):
                        try:
                            d.get(path)
                        except OSError:
                            api_failures += 1
            if now >= next_scrape:
                next_scrape += scrape_s
                if now - w0 >= seconds / 2:
                    for k, pid in measured.items():
                        win.rss_samples[k].append(rss_kib(pid)[0])
                try:
                    g = daemon.scrape_tick_duration()
                    if g is not None:
                        win.gauge.append(g)
                except OSError:
                    pass
                if before is not None:  # the same load on both daemons
                    try:
                        before.scrape_tick_duration()
                    except OSError:
                        pass
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))
        for k, c in clocks.items():
            win.cpu_s[k], win.cpu_method[k] = c.read()
        if marks is not None:
            (marks / "end").write_text(str(time.time()))
        wall = time.monotonic() - w0
        wall1 = time.time()
        win.seconds = wall
        win.forks = box_forks() - forks0
        win.pids = last_pid() - pid0  # (negative if the PID counter wrapped)
        win.load = (load0, loadavg())
        for k, pid in measured.items():
            win.hwm[k] = rss_kib(pid)[1]
            if not win.rss_samples[k]:
                win.rss_samples[k].append(rss_kib(pid)[0])
        ticks = daemon.stop()
        ticks_before = before.stop() if before is not None else []
        split_result = None
        if split_p is not None:
            try:
                split_p.wait(timeout=seconds + 60)
                split_result = json.loads(split_out.read_text())
            except (subprocess.TimeoutExpired, OSError, ValueError) as exc:
                split_result = {"error": repr(exc)}
    finally:
        for d in (daemon, before):
            if d is not None and d.p.poll() is None:
                d.p.kill()
                d.p.wait()
        for p in (split_p, floor_p):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        if peer_run is not None:
            peer_run.stop()

    def tick_figures(all_ticks: list[list[float]], cpu_s: float) -> dict[str, Any]:
        in_window = [t for t in all_ticks if wall0 <= t[0] <= wall1]
        durations_ms = [1e3 * t[1] for t in in_window]
        tick_cpu_ms = [1e3 * t[2] for t in in_window]
        return {
            "ticks": len(in_window),
            "tick_ms_p50": round(pct(durations_ms, 0.50), 2),
            "tick_ms_p95": round(pct(durations_ms, 0.95), 2),
            "tick_ms_p99": round(pct(durations_ms, 0.99), 2),
            "tick_ms_max": round(max(durations_ms), 2) if durations_ms else None,
            "tick_cpu_ms_mean": round(statistics.fmean(tick_cpu_ms), 3) if tick_cpu_ms else None,
            "tick_cpu_share_of_daemon_cpu": (round(sum(tick_cpu_ms) / 1e3 / cpu_s, 3) if cpu_s > 0 else None),
        }

    res: dict[str, Any] = {
        "seconds": round(win.seconds, 1),
        "box": {"process_creations_per_s": round(win.forks / win.seconds, 2),
                "new_pids_per_s": round(win.pids / win.seconds, 2) if win.pids >= 0 else None,
                "loadavg_1m_start_end": [win.load[0], win.load[1]]},
        "api_reads_every_s": api_reads_s or None,
        "api_read_failures": api_failures,
    }
    for k in measured:
        steady = statistics.median(win.rss_samples[k])
        res[k] = {
            "cpu_pct_of_one_core": round(100 * win.cpu_s[k] / win.seconds, 3),
            "cpu_source": win.cpu_method[k],
            "rss_steady_mib": round(steady / 1024, 1),
            "rss_peak_mib": round(win.hwm[k] / 1024, 1),
        }
    if "codecarbon" not in measured:
        res["codecarbon"] = {"skipped": peer_note or "not run"}
    res["cpu_seconds_in_window"] = {k: round(v, 4) for k, v in win.cpu_s.items()}
    d = res["wattprint"]
    d.update(tick_figures(ticks, win.cpu_s["wattprint"]))
    d.update({
        "gauge_samples": len(win.gauge),
        "gauge_tick_ms_p50": round(1e3 * pct(win.gauge, 0.5), 2) if win.gauge else None,
    })
    if "before" in measured:
        res["before"].update(tick_figures(ticks_before, win.cpu_s["before"]))
        res["ratio_before_over_floor"] = round(win.cpu_s["before"] / max(1e-9, win.cpu_s["floor"]), 2)
        res["ratio_wattprint_over_before"] = round(win.cpu_s["wattprint"] / max(1e-9, win.cpu_s["before"]), 2)
    res["ratio_wattprint_over_floor"] = round(win.cpu_s["wattprint"] / max(1e-9, win.cpu_s["floor"]), 2)
    if "codecarbon" in measured:
        res["ratio_wattprint_over_codecarbon"] = round(win.cpu_s["wattprint"] / max(1e-9, win.cpu_s["codecarbon"]), 2)
    res["stage_split"] = split_result
    return res


def before_after_trees(baseline: str | None, after_files: str) -> dict[str, Path | None]:
    """The code trees an in-process before/after benchmark measures: with ``baseline``,
    ``before`` = that git ref and ``after`` = the ref plus the comma-separated
    ``after_files`` from the working tree (none given: the working tree itself);
    without it only ``after``, the working tree (None)."""
    trees: dict[str, Path | None] = {}
    if baseline:
        trees["before"] = baseline_tree(baseline)
        overlay = tuple(f for f in after_files.split(",") if f)
        trees["after"] = baseline_tree(baseline, overlay) if overlay else None
    else:
        trees["after"] = None
    return trees
