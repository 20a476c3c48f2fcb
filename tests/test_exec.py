"""``wattprint exec`` and ``wattprint report`` with real processes.

(a) With the real daemon running (no GPU, RAPL counters from a powercap tree fed at
    known rates): ``exec --label L -- python -c '<burn CPU 2 s>; exit 3'`` exits 3,
    leaves CMD's stdout alone, prints the report on stderr, and the job it prints is
    exactly what the API returns; its CPU energy equals the package rate x its CPU
    seconds (its own report) / the machine's CPUs, its DRAM energy the dram rate x
    its RSS share over the time it was seen (``assert_energy_truth``).
(b) Without a daemon: exec samples in-process into a throw-away store (not the
    configured state_dir), says so, and passes the exit code through; with RAPL
    configured its numbers meet the same truth; SIGTERM and SIGINT reach the child
    and the exit code is 128 + the signal.
(c) ``report ID`` and ``report LABEL`` print the job (the most recent of several with
    a label); unknown jobs exit 1 without a traceback; with the daemon stopped, report
    reads the local store.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from daemon_harness import DaemonProcess
from own_jobs import wait_for_pid_job
from e2e_truth import CLK_TCK, CPU_ABS_S, CPU_REL, machine_cpu_ticks, mem_used_bytes
from powercap import PowercapTree
from servers import free_port
from wattprint.daemon.report import fmt_sig

pytestmark = pytest.mark.slow

BURN_THEN_EXIT = (
    "import sys, time\n"
    "t = time.time()\n"
    "while time.time() - t < {seconds}: pass\n"
    "print('child stdout')\n"
    "sys.exit({code})\n"
)
# The same, holding 32 MiB, and reporting its own CPU seconds and RSS to a file (stdout
# stays the command's): the truth the test compares the job's energy with. It sleeps
# 1.5 s after burning so that a tick sees all of its CPU time before it exits (the CPU
# time of a job's last process after the last tick that saw it alive is not booked:
# nobody in the job reaps it).
BURN_REPORT_EXIT = (
    "import os, sys, time\n"
    "buf = bytearray(32 << 20)\n"
    "for i in range(0, len(buf), 4096): buf[i] = 1\n"
    "t = time.time()\n"
    "while time.time() - t < {seconds}: pass\n"
    "time.sleep(1.5)\n"
    "cpu = os.times()\n"
    "rss = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
    "open({report!r}, 'w').write(f'{{cpu.user + cpu.system}} {{rss}}')\n"
    "print('child stdout')\n"
    "sys.exit({code})\n"
)
PKG_W, DRAM_W = 40.0, 6.0
SLEEP = "import time; time.sleep(60)"


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("WATTPRINT_") and k != "SLURM_JOB_ID"}


def wattprint(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wattprint.daemon", *args], capture_output=True, text=True,
                          env=clean_env(), timeout=timeout_s, stdin=subprocess.DEVNULL)


def json_report(stderr: str) -> dict[str, Any]:
    """The job object ``exec --json-report`` printed on stderr (after its status lines)."""
    lines = stderr.splitlines()
    start = lines.index("{")
    end = len(lines) - lines[::-1].index("}")
    return json.loads("\n".join(lines[start:end]))


def burn(seconds: float, code: int) -> str:
    return BURN_THEN_EXIT.format(seconds=seconds, code=code)


def burn_and_report(seconds: float, code: int, report: Path) -> str:
    return BURN_REPORT_EXIT.format(seconds=seconds, code=code, report=str(report))


def feed_powercap(root: Path) -> Any:
    """A powercap tree at ``root`` fed at PKG_W / DRAM_W (the handle's ``stop()`` ends it)."""
    tree = PowercapTree(root)
    zones = tree.add_package(0, dram=True)
    return tree.start_feeding({zones["package"]: PKG_W, zones["dram"]: DRAM_W}, period_s=0.02)


class MachineWindow:
    """The machine's CPU capacity and used memory around a command, read by the test."""

    def __init__(self) -> None:
        self.t0, self.ticks0, self.mem0 = time.monotonic(), machine_cpu_ticks(), mem_used_bytes()

    def close(self) -> None:
        self.t1, self.ticks1, self.mem1 = time.monotonic(), machine_cpu_ticks(), mem_used_bytes()

    @property
    def cpus(self) -> float:
        """CPU-seconds of capacity per second (the number of CPUs /proc/stat accounts)."""
        return (self.ticks1 - self.ticks0) / CLK_TCK / (self.t1 - self.t0)


def assert_energy_truth(job: dict[str, Any], report: Path, machine: MachineWindow, interval_s: float) -> None:
    """The job's CPU and DRAM energy against truth from what the test controls.

    CPU: package rate x the job's share of CPU capacity, summed over ticks, is
    PKG_W x (job CPU-s) / (CPUs): the tick lengths cancel (docs/jobs.md; e2e_truth).
    The job's CPU seconds are its own report (os.times at its end).
    DRAM: dram rate x RSS / used memory x the time it was booked for: from the interval
    before the first tick that saw it labelled to its last tick. That interval began at
    most one interval before it started; the tick right after its fork may see it
    before its exec (no label in its environment yet; it is re-read on the next tick),
    which loses at most one interval. So between ``last_seen - started_at`` minus one
    interval and plus one interval (each with 0.3 s of scheduling slack); used memory
    as the test read it around the run (mean of both ends, 10 % for what else the
    machine did meanwhile)."""
    cpu_s, rss = (float(x) for x in report.read_text().split())
    assert cpu_s > 0.5, f"the command got little CPU ({cpu_s:.2f} s)"
    want_cpu = PKG_W * cpu_s / machine.cpus
    got_cpu = job["energy_j"]["cpu"]
    assert abs(got_cpu - want_cpu) <= CPU_REL * want_cpu + PKG_W * CPU_ABS_S, (got_cpu, want_cpu, cpu_s, machine.cpus)
    share = rss / ((machine.mem0 + machine.mem1) / 2)
    seen_s = job["last_seen"] - job["started_at"]
    low = DRAM_W * share * (seen_s - interval_s - 0.3) * 0.9
    high = DRAM_W * share * (seen_s + interval_s + 0.3) * 1.1
    assert low <= job["energy_j"]["dram"] <= high, (job["energy_j"]["dram"], low, high)
    assert job["energy_j"]["gpu"] == 0.0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("daemon")
    # A 2 s command must be seen: scan /proc for new labelled processes twice a second.
    # Other labelled processes of this user on the box must not push ours into "_overflow".
    feeder = feed_powercap(workdir / "powercap")
    d = DaemonProcess(workdir, sim_file=None, powercap_root=workdir / "powercap",
                      extra_toml="[jobs]\nrescan_interval_s = 0.5\nmax_labels_per_user = 100000\n")
    try:
        d.start()
        yield d
    finally:
        d.kill()
        feeder.stop()


@pytest.fixture(scope="module")
def exec_run(daemon, tmp_path_factory):
    """One ``exec --json-report`` run against the daemon: (completed process, label,
    the command's own report file, the machine around the run)."""
    label = f"exec-test-{os.getpid()}"
    report = tmp_path_factory.mktemp("exec") / "child.txt"
    machine = MachineWindow()
    done = wattprint("exec", "--label", label, "--config", str(daemon.config_path), "--url", daemon.url,
                     "--json-report", "--", sys.executable, "-c", burn_and_report(2.0, 3, report))
    machine.close()
    return done, label, report, machine


def api_job(daemon: DaemonProcess, job_id: str) -> dict[str, Any]:
    return daemon.get(f"/api/v1/jobs/{urllib.parse.quote(job_id, safe='')}")


# -- (a) with the daemon ------------------------------------------------------------------

def test_exec_with_daemon_reports_what_the_api_has(daemon, exec_run):
    done, label, report, machine = exec_run
    assert done.returncode == 3, done.stderr
    assert done.stdout == "child stdout\n"  # CMD's stdout stays clean
    assert f"measured by the daemon at {daemon.url}" in done.stderr
    assert "Traceback" not in done.stderr
    printed = json_report(done.stderr)
    assert printed["label"] == label and printed["state"] == "finished"
    assert printed["energy_sources"]["cpu"] == "counter" and printed["energy_sources"]["dram"] == "counter"
    assert_energy_truth(printed, report, machine, interval_s=1.0)
    assert printed["co2e_g"] == pytest.approx(printed["energy_kwh"] * 475.0, rel=1e-9)
    assert printed == api_job(daemon, printed["id"])  # every figure, exactly


def test_exec_text_report_on_stderr(daemon):
    done = wattprint("exec", "--config", str(daemon.config_path), "--url", daemon.url, "--",
                     sys.executable, "-c", burn(1.5, 0))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "child stdout\n"
    label_line = next(line for line in done.stderr.splitlines() if line.startswith("  label "))
    label = label_line.split()[1]
    assert label.startswith("exec-python")  # the default label: exec-<basename of CMD[0]>-<random>
    jobs = daemon.get(f"/api/v1/jobs?label={urllib.parse.quote(label)}")["jobs"]
    assert len(jobs) == 1
    job = jobs[0]
    total_line = next(line for line in done.stderr.splitlines() if line.startswith("  total "))
    assert total_line.split()[1] == fmt_sig(job["energy_kwh"])
    assert f"CO2e          {fmt_sig(job['co2e_g'])} g (final)" in done.stderr
    assert "Everyday equivalents" in done.stderr


# -- (b) without a daemon ---------------------------------------------------------------

@pytest.fixture
def no_daemon(tmp_path) -> tuple[Path, str]:
    """A config whose state_dir is under tmp_path, and the URL of a closed port."""
    config = tmp_path / "wattprint.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\ninterval_s = 0.5\n'
                      '[gpu]\nbackend = "none"\n[cpu]\nsource = "estimate"\n')
    return config, f"http://127.0.0.1:{free_port()}"


def test_exec_without_daemon_samples_in_process(tmp_path, no_daemon):
    """In-process sampling reads the configured RAPL counters (a fed powercap tree here):
    the job's CPU and DRAM energy against the same truth as with the daemon."""
    _, url = no_daemon
    config = tmp_path / "rapl.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\ninterval_s = 0.5\n[gpu]\nbackend = "none"\n'
                      f'[cpu]\nsource = "rapl"\npowercap_root = "{tmp_path / "powercap"}"\n[memory]\nsource = "auto"\n')
    report = tmp_path / "child.txt"
    feeder = feed_powercap(tmp_path / "powercap")
    try:
        machine = MachineWindow()
        done = wattprint("exec", "--label", "alone", "--config", str(config), "--url", url, "--json-report", "--",
                         sys.executable, "-c", burn_and_report(2.0, 5, report))
        machine.close()
    finally:
        feeder.stop()
    assert done.returncode == 5, done.stderr
    assert done.stdout == "child stdout\n"
    assert f"no daemon at {url}: measured in-process" in done.stderr
    job = json_report(done.stderr)
    assert job["label"] == "alone" and job["state"] == "finished"
    assert job["energy_sources"]["cpu"] == "counter"
    assert_energy_truth(job, report, machine, interval_s=0.5)
    assert job["duration_s"] > 3.0  # it burned 2 s and slept 1.5 s
    assert not (tmp_path / "state").exists()  # a throw-away store, not the configured one


def test_exec_without_daemon_estimates_and_says_so(tmp_path, no_daemon):
    config, url = no_daemon
    done = wattprint("exec", "--label", "alone", "--config", str(config), "--url", url, "--json-report", "--",
                     sys.executable, "-c", burn(1.0, 0))
    assert done.returncode == 0, done.stderr
    assert f"no daemon at {url}: measured in-process (estimates where no counters" in done.stderr
    job = json_report(done.stderr)
    assert job["energy_sources"]["cpu"] == "estimate"  # (its joules depend on the machine's load: not asserted)


def test_exec_without_daemon_text_report(no_daemon):
    config, url = no_daemon
    done = wattprint("exec", "--label", "text\x1bme", "--config", str(config), "--url", url, "--",
                     sys.executable, "-c", burn(1.0, 0))
    assert done.returncode == 0, done.stderr
    assert "measured in-process" in done.stderr
    assert "  label    text_me\n" in done.stderr  # as the daemon sanitises it
    assert r"  as set   text\x1bme (sanitised for export)" in done.stderr
    assert "\x1b" not in done.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_exec_forwards_signals_and_returns_128_plus_signal(no_daemon, sig):
    config, url = no_daemon
    proc = subprocess.Popen([sys.executable, "-m", "wattprint.daemon", "exec", "--label", "sig", "--config",
                             str(config), "--url", url, "--", sys.executable, "-c", SLEEP],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env())
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # printed just before the child starts
        assert "job label sig" in first
        time.sleep(1.0)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + sig, err
    assert f"exit code {128 + sig}" in err
    assert "Traceback" not in err.split("exit code")[1]  # the report part is clean


def test_exec_exit_codes_for_missing_command_and_no_command(no_daemon):
    config, url = no_daemon
    done = wattprint("exec", "--config", str(config), "--url", url, "--", "/nonexistent/cmd")
    assert done.returncode == 127 and "command not found" in done.stderr
    done = wattprint("exec", "--config", str(config), "--url", url, "--")
    assert done.returncode == 2 and "no command given" in done.stderr


# -- (c) wattprint report -----------------------------------------------------------------

def test_report_by_id_and_by_label(daemon, exec_run):
    done, label, _, _ = exec_run
    job = api_job(daemon, json_report(done.stderr)["id"])
    by_id = wattprint("report", job["id"], "--url", daemon.url)
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.stdout.startswith(f"Job {job['id']}\n")
    assert f"  label    {label}\n" in by_id.stdout
    total_line = next(line for line in by_id.stdout.splitlines() if line.startswith("  total "))
    assert total_line.split()[1] == fmt_sig(job["energy_kwh"])
    assert f"CO2e          {fmt_sig(job['co2e_g'])} g" in by_id.stdout
    assert "range 475-475 gCO2e/kWh" in by_id.stdout  # the series was fetched too

    by_label = wattprint("report", label, "--url", daemon.url)
    assert by_label.returncode == 0 and by_label.stdout == by_id.stdout

    as_json = wattprint("report", label, "--url", daemon.url, "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout) == job

    # A second job with the same label: report LABEL picks the most recent and says so.
    again = wattprint("exec", "--label", label, "--url", daemon.url, "--config", str(daemon.config_path),
                      "--json-report", "--", sys.executable, "-c", burn(1.0, 0))
    assert again.returncode == 0, again.stderr
    newer = json_report(again.stderr)
    assert newer["id"] != job["id"]
    latest = wattprint("report", label, "--url", daemon.url, "--json")
    assert json.loads(latest.stdout)["id"] == newer["id"]
    assert f"matches 2 jobs; showing the most recent (id {newer['id']})" in latest.stderr


def test_report_unknown_job_exits_1_without_traceback(daemon):
    done = wattprint("report", "no-such-job", "--url", daemon.url)
    assert done.returncode == 1
    assert done.stdout == ""
    assert "no job with id or label no-such-job" in done.stderr
    assert "Traceback" not in done.stderr
    done = wattprint("report", "", "--url", daemon.url)
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_report_reads_the_local_store_when_no_daemon_answers(daemon, exec_run):
    """Runs last in this module: it stops the daemon."""
    done, label, _, _ = exec_run
    job_id = json_report(done.stderr)["id"]
    expected = api_job(daemon, job_id)
    assert daemon.stop() == 0
    closed = f"http://127.0.0.1:{free_port()}"
    local = wattprint("report", job_id, "--config", str(daemon.config_path), "--url", closed, "--json")
    assert local.returncode == 0, local.stderr
    assert f"daemon at {closed} not reachable" in local.stderr and "reading the local store" in local.stderr
    assert json.loads(local.stdout) == expected
    missing = wattprint("report", "nope", "--config", str(daemon.config_path), "--url", closed)
    assert missing.returncode == 1 and "no job with id or label nope" in missing.stderr


def test_exec_finds_its_job_when_the_daemon_files_it_under_the_overflow_label(tmp_path, labelled_process):
    """With the user's label limit reached, the daemon books the job as "_overflow";
    exec still finds it, by the child's PID."""
    d = DaemonProcess(tmp_path, sim_file=None, powercap_root=None,
                      extra_toml="[jobs]\nrescan_interval_s = 0.5\nmax_labels_per_user = 1\n")
    holder = labelled_process("holds-the-only-slot")
    try:
        d.start()
        # By PID: outside the suite's PID namespace another labelled process of this user
        # may hold the only slot first (then the holder is "_overflow" too; the slot is taken either way).
        wait_for_pid_job(d.get, holder.pid, timeout_s=15, log_tail=d.log_tail)
        done = wattprint("exec", "--label", "mine", "--config", str(d.config_path), "--url", d.url,
                         "--json-report", "--", sys.executable, "-c", burn(1.5, 0))
        assert done.returncode == 0, done.stderr
        job = json_report(done.stderr)
        assert job["label"] == "_overflow" and job["label_raw"] == "mine" and job["state"] == "finished"
        assert job == api_job(d, job["id"])
    finally:
        labelled_process.end(holder)
        d.kill()
