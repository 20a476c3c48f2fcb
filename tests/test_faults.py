"""The fault matrix (issue 7): each fault injected into the REAL daemon process (or,
for clock steps, the real Engine driven by a simulated clock), and for each:

- the tick keeps its cadence: ``wattprint_ticks_total`` goes on advancing through the
  fault and the overruns the daemon counts stay bounded;
- the affected part is degraded in /healthz and in /metrics (``wattprint_source_up``
  0, ``wattprint_source_state{state="degraded"}`` 1), and only that part;
- the log says it once: one warning when the part degrades and one line when it
  recovers, not one per tick;
- energy is conserved: /api/v1/host attributed + unattributed = device, per
  component, and the energy of the fault's span is booked, not lost.

Cases: GPU lost mid-run; NVML hanging (sim ``hang_s``) and NVML features unsupported;
RAPL unreadable and RAPL wrapping on consecutive ticks; a powercap zone vanishing;
/proc races; wall-clock steps; disk full for the store and the spool; InfluxDB
hanging and the spool at its cap while InfluxDB is down (both against the real
influxd: through tests/fault_proxy.py for the hang, stopped for the cap, and each
checks what arrived for completeness and duplicates); SQLite store corrupt or locked
at start; the grid API hanging. Tests filter by their own labels, so other labelled
processes on the machine do not disturb them. Waiting is by the daemon's tick
counter (``wait_ticks``), never by fixed sleeps; the cadence is judged by the
daemon's own overrun counter, not by wall-clock durations.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from aiohttp import web

from daemon_harness import DaemonProcess, sample, wait_ticks
from e2e_truth import CLK_TCK, CPU_ABS_S, CPU_REL, INVISIBLE_PID, descendants, follow, mem_used_bytes
from fault_proxy import FaultProxy
from gpusim import gpu, proc, write_sim
from powercap import PowercapTree
from wattprint.daemon.carbon import IntensityBook
from wattprint.daemon.config import GridConfig
from wattprint.daemon.engine import Engine
from wattprint.daemon.health import HealthBoard
from wattprint.daemon.ledger import JobTick, Ledger, LedgerReader
from wattprint.daemon.model import DeviceReading
from wattprint.daemon.procs import JobIdentity, ProcessTracker
from wattprint.daemon.sources.gpu import NvmlGpuSource
from wattprint.daemon.sources.nvml_sim import SimulatedNvml
from wattprint.daemon.sources.rapl import RaplSource

COMPONENTS = ("gpu", "cpu", "dram")


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def tag() -> str:
    """A per-test tag: every label a test sets carries it, and only those are looked at."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
def spawn() -> Iterator[Any]:
    """Start processes in their own session; all are killed afterwards."""
    started: list[subprocess.Popen] = []

    def start(argv: list[str], label: str | None = None) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k not in ("WATTPRINT_JOB", "SLURM_JOB_ID")}
        if label is not None:
            env["WATTPRINT_JOB"] = label
        p = subprocess.Popen(argv, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(p)
        return p

    yield start
    for p in started:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def sleeper(spawn: Any, label: str) -> subprocess.Popen:
    return spawn([sys.executable, "-c", "import time; time.sleep(300)"], label)


def make_daemon(workdir: Path, *, cls: type = DaemonProcess, env: dict[str, str] | None = None,
                **kwargs: Any) -> DaemonProcess:
    """A DaemonProcess whose job labels never overflow into "_overflow", however many
    labelled processes other tests run on this machine as the same user."""
    return cls(workdir, env={"WATTPRINT_JOBS_MAX_LABELS_PER_USER": "100000", **(env or {})}, **kwargs)


def health(daemon: DaemonProcess) -> dict[str, Any]:
    return daemon.get("/healthz", allow_error=True)


def part(daemon: DaemonProcess, name: str) -> dict[str, Any]:
    return {p["name"]: p for p in health(daemon)["parts"]}[name]


def wait_part(daemon: DaemonProcess, name: str, state: str, timeout_s: float = 10.0, contains: str = "") -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        p = part(daemon, name)
        if p["state"] == state and contains in p["detail"]:
            return p
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} not {state} ({contains!r}) after {timeout_s}s: {p}\n{daemon.log_tail()}")
        time.sleep(0.2)


def assert_part(daemon: DaemonProcess, name: str, state: str, contains: str = "") -> None:
    """The part's state in /healthz and in /metrics (up and state gauges)."""
    hz = health(daemon)
    parts = {p["name"]: p for p in hz["parts"]}
    assert parts[name]["state"] == state, parts[name]
    assert contains in parts[name]["detail"], parts[name]
    m = daemon.metrics()
    assert sample(m, "wattprint_source_up", source=name) == (1.0 if state == "ok" else 0.0)
    assert sample(m, "wattprint_source_state", source=name, state=state) == 1.0
    if state == "degraded":
        assert hz["status"] == "degraded"
        assert parts[name]["errors_total"] >= 1


def degraded_parts(daemon: DaemonProcess) -> set[str]:
    return {p["name"] for p in health(daemon)["parts"] if p["state"] == "degraded"}


class Cadence:
    """Ticks and overruns over a window of the test, by the daemon's own counters.

    The tick keeps its cadence when the daemon counts few overruns (a tick that runs
    past its slot, e.g. one waiting out a 2.5 s hung read, is counted once per slot it
    missed) and the tick counter goes on advancing: ``watch_ticks`` polls it and fails
    if it stops. No wall-clock durations are asserted here (timings belong in
    benchmarks/)."""

    def __init__(self, daemon: DaemonProcess):
        self.daemon = daemon
        m = daemon.metrics()
        self.ticks0 = sample(m, "wattprint_ticks_total")
        self.overruns0 = sample(m, "wattprint_tick_overruns_total")

    def watch_ticks(self, n: int) -> None:
        """Until the daemon has ticked ``n`` more times (polled; fails if the ticks stop)."""
        wait_ticks(self.daemon, n)

    def check(self, max_overruns: int = 2) -> None:
        m = self.daemon.metrics()
        ticks = sample(m, "wattprint_ticks_total") - self.ticks0
        overruns = sample(m, "wattprint_tick_overruns_total") - self.overruns0
        assert ticks >= 1, "no tick in the window"
        assert overruns <= max_overruns, (overruns, ticks)


def tick_at(m: dict) -> float:
    """The wall time of the tick a scrape is as of."""
    return sample(m, "wattprint_last_tick_timestamp_seconds")


def until_ticks(daemon: DaemonProcess, cond: Any, what: str, ticks: int = 15) -> None:
    """Poll ``cond`` once per daemon tick, at most ``ticks`` ticks."""
    for _ in range(ticks):
        if cond():
            return
        wait_ticks(daemon, 1)
    assert cond(), f"{what}: not within {ticks} ticks:\n{daemon.log_tail()}"


def log_lines(daemon: DaemonProcess, needle: str) -> list[str]:
    return [line for line in daemon.log_path.read_text(errors="replace").splitlines() if needle in line]


def assert_logged_once(daemon: DaemonProcess, name: str, recovered: bool = True) -> None:
    """One warning when ``name`` degraded, one line when it recovered: not one per tick."""
    down = log_lines(daemon, f"wattprint.health: {name} degraded:")
    assert len(down) == 1 and " WARNING " in down[0], down
    up = log_lines(daemon, f"wattprint.health: {name} recovered")
    assert len(up) == (1 if recovered else 0), up


def assert_no_traceback(daemon: DaemonProcess) -> None:
    text = daemon.log_path.read_text(errors="replace")
    assert "Traceback" not in text, text[-4000:]


def assert_conserved(daemon: DaemonProcess) -> dict[str, Any]:
    host = daemon.get("/api/v1/host")
    for kind in COMPONENTS:
        dev = host["device_energy_j"][kind]
        got = host["attributed_energy_j"][kind] + host["unattributed_energy_j"][kind]
        assert got == pytest.approx(dev, rel=1e-9, abs=1e-6), (kind, host)
        assert host["attributed_energy_j"][kind] >= 0 and host["unattributed_energy_j"][kind] >= -1e-9
    return host


def energy(m: dict, kind: str, device: str) -> float:
    """A device's energy in one scrape, whatever other labels its series carries (GPU
    series also carry the board's uuid and model name)."""
    found = [v for (name, labels), v in m.items() if name == "wattprint_device_energy_joules_total"
             and dict(labels).get("kind") == kind and dict(labels).get("device") == device]
    assert len(found) == 1, (kind, device, found)
    return found[0]


def rate(m1: dict, m2: dict, kind: str, device: str) -> float:
    """Average power of a device between two scrapes (snapshot timestamps)."""
    dt = sample(m2, "wattprint_last_tick_timestamp_seconds") - sample(m1, "wattprint_last_tick_timestamp_seconds")
    return (energy(m2, kind, device) - energy(m1, kind, device)) / dt


def wait_job(daemon: DaemonProcess, label: str, timeout_s: float = 20.0) -> dict[str, Any]:
    """Until the job labelled ``label`` runs and has energy (asked by label: other
    labelled processes on the machine may be many)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for job in daemon.get("/api/v1/jobs?label=" + urllib.parse.quote(label, safe=""))["jobs"]:
            if job["state"] == "running" and job["energy_j"]["total"] > 0:
                return job
        time.sleep(0.2)
    raise AssertionError(f"job {label!r} not seen:\n{daemon.log_tail()}")


def my_jobs(daemon: DaemonProcess, prefix: str) -> list[dict[str, Any]]:
    return [j for j in daemon.get("/api/v1/jobs?limit=10000")["jobs"] if j["label"].startswith(prefix)]


class ZoneFeeder:
    """Advances powercap counters at constant power, like ``PowercapTree.start_feeding``,
    but survives the faults the tests make: a zone can be ``hold``-ed (its file left
    alone, e.g. while it is a directory), removed and re-created with a restarted
    counter (``restart``). ``fed_j`` is the energy the zone's hardware "used"."""

    def __init__(self, tree: PowercapTree, rates_w: dict[str, float], period_s: float = 0.01):
        self.tree = tree
        self.rates_w = dict(rates_w)
        self._lock = threading.Lock()
        self._value = {z: tree.energy(z) for z in rates_w}
        self._max = {z: tree.max_energy_range_uj(z) for z in rates_w}
        self._fed_uj = {z: 0 for z in rates_w}
        self.wraps = {z: 0 for z in rates_w}
        self.held: set[str] = set()
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._period_s = period_s
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            self.step()

    def step(self) -> None:
        elapsed = time.monotonic() - self._t0
        with self._lock:
            for zone, w in self.rates_w.items():
                target = round(w * elapsed * 1e6)
                add = target - self._fed_uj[zone]
                if add <= 0:
                    continue
                self._fed_uj[zone] = target
                new = self._value[zone] + add
                if new >= self._max[zone]:
                    self.wraps[zone] += new // self._max[zone]
                    new %= self._max[zone]
                self._value[zone] = new
                if zone not in self.held:
                    self._write(zone, new)

    def _write(self, zone: str, uj: int) -> None:
        d = self.tree.root / zone
        tmp = d / ".energy_uj.feed"
        try:
            tmp.write_text(f"{uj}\n")
            os.replace(tmp, d / "energy_uj")
        except OSError:  # the zone is gone, or its file is a directory right now
            pass

    def hold(self, zone: str) -> None:
        with self._lock:
            self.held.add(zone)

    def release(self, zone: str) -> None:
        with self._lock:
            self.held.discard(zone)
            self._write(zone, self._value[zone])

    def restart(self, zone: str, uj: int = 0) -> None:
        """The zone's counter starts again at ``uj`` (as after a module reload)."""
        with self._lock:
            self._value[zone] = uj
            self.held.discard(zone)
            self._write(zone, uj)

    def fed_j(self, zone: str) -> float:
        with self._lock:
            return self._fed_uj[zone] / 1e6

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------- GPU


def test_gpu_lost_mid_run(tmp_path, spawn, tag):
    job = sleeper(spawn, f"lost-{tag}")
    sim = tmp_path / "sim.json"
    gpus = lambda lost: [gpu(0, power_w=250.0, processes=[proc(job.pid, sm_util=90)]),  # noqa: E731
                         gpu(1, power_w=100.0, processes=[proc(job.pid, sm_util=50)], lost=lost)]
    write_sim(sim, gpus(False))
    daemon = make_daemon(tmp_path, sim_file=sim, powercap_root=None)
    try:
        daemon.start()
        wait_job(daemon, f"lost-{tag}")
        wait_ticks(daemon, 2)
        m0 = daemon.metrics()
        cadence = Cadence(daemon)

        write_sim(sim, gpus(True))  # gpu1 falls off the bus
        wait_part(daemon, "gpu", "degraded", contains="gpu1")
        assert_part(daemon, "gpu", "degraded", contains="GpuIsLost")
        assert degraded_parts(daemon) == {"gpu"}
        m1 = daemon.metrics()
        cadence.watch_ticks(4)
        m2 = daemon.metrics()
        assert rate(m1, m2, "gpu", "gpu0") == pytest.approx(250.0, rel=0.03)  # the other GPU goes on
        assert energy(m2, "gpu", "gpu1") == energy(m1, "gpu", "gpu1")  # nothing read from the lost one

        write_sim(sim, gpus(False))  # back (e.g. after a reset)
        wait_part(daemon, "gpu", "ok")
        wait_ticks(daemon, 2)
        cadence.check()
        m3 = daemon.metrics()
        # The lost span is booked when it is back: the counter kept its baseline.
        assert rate(m0, m3, "gpu", "gpu1") == pytest.approx(100.0, rel=0.03)
        assert rate(m0, m3, "gpu", "gpu0") == pytest.approx(250.0, rel=0.03)
        assert_part(daemon, "gpu", "ok")
        assert_logged_once(daemon, "gpu")
        assert_conserved(daemon)
        assert_no_traceback(daemon)
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_nvml_hanging_call_does_not_stop_the_tick(tmp_path, spawn, tag):
    job = sleeper(spawn, f"hang-{tag}")
    sim = tmp_path / "sim.json"
    gpus = lambda hang: [gpu(0, power_w=200.0, processes=[proc(job.pid, sm_util=90)]),  # noqa: E731
                         gpu(1, power_w=100.0, hang_s=hang)]
    write_sim(sim, gpus(0))
    daemon = make_daemon(tmp_path, sim_file=sim, powercap_root=None)
    try:
        daemon.start()
        wait_job(daemon, f"hang-{tag}")
        wait_ticks(daemon, 2)
        m0 = daemon.metrics()
        cadence = Cadence(daemon)

        write_sim(sim, gpus(2.5))  # NVML blocks 2.5 s in every read of gpu1
        wait_part(daemon, "gpu", "degraded", timeout_s=5.0, contains="timed out")
        assert_part(daemon, "gpu", "degraded", contains="read timed out")
        assert degraded_parts(daemon) == {"gpu"}
        cadence.watch_ticks(6)  # several stuck reads in a row; the ticks go on
        m1 = daemon.metrics()
        assert sample(m1, "wattprint_source_read_timeouts_total") >= 3
        assert sample(m1, "wattprint_source_errors_total", source="gpu") >= 3

        write_sim(sim, gpus(0))
        wait_part(daemon, "gpu", "ok", timeout_s=10.0)
        wait_ticks(daemon, 2)
        cadence.check()
        m2 = daemon.metrics()
        # What the stuck reads measured was booked when they returned: nothing lost.
        assert rate(m0, m2, "gpu", "gpu0") == pytest.approx(200.0, rel=0.03)
        assert rate(m0, m2, "gpu", "gpu1") == pytest.approx(100.0, rel=0.03)
        assert_logged_once(daemon, "gpu")
        assert_conserved(daemon)
        [mine] = my_jobs(daemon, f"hang-{tag}")
        # The job is alone on gpu0: all of gpu0's energy since the job appeared is its.
        assert mine["energy_j"]["gpu"] == pytest.approx(energy(m2, "gpu", "gpu0"), rel=0.05)
        assert_no_traceback(daemon)
        assert daemon.stop() == 0  # a stop is not held up by the driver
    finally:
        daemon.kill()


def test_nvml_unsupported_features_use_sampled_power_and_stay_ok(tmp_path, spawn, tag):
    job = sleeper(spawn, f"unsup-{tag}")
    # Two processes: the collector asks for per-process utilisation only when a GPU is
    # shared (a sole process gets all of it), so one process would never meet the
    # unsupported call.
    other = sleeper(spawn, f"unsup2-{tag}")
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=180.0, energy_counter=False, util_supported=False,
                        processes=[proc(job.pid, sm_util=90), proc(other.pid, sm_util=10)])])
    daemon = make_daemon(tmp_path, sim_file=sim, powercap_root=None)
    try:
        daemon.start()
        found = wait_job(daemon, f"unsup-{tag}")
        assert found["energy_sources"]["gpu"] == "power"
        m1 = daemon.metrics()
        cadence = Cadence(daemon)
        cadence.watch_ticks(4)
        cadence.check()
        m2 = daemon.metrics()
        assert rate(m1, m2, "gpu", "gpu0") == pytest.approx(180.0, rel=0.03)
        info = {dict(labels)["source"] for (metric, labels) in m2
                if metric == "wattprint_device_info" and dict(labels)["device"] == "gpu0"}
        assert info == {"power"}
        assert_part(daemon, "gpu", "ok")  # unsupported is a fact, not a fault
        assert log_lines(daemon, "wattprint.health: gpu degraded") == []
        assert len(log_lines(daemon, "energy counter not supported")) == 1  # said once, not per tick
        assert len(log_lines(daemon, "process utilisation not supported")) == 1
        assert_conserved(daemon)
        assert daemon.stop() == 0
    finally:
        daemon.kill()


# ----------------------------------------------------------------------------- RAPL


def test_rapl_zone_unreadable_then_back(tmp_path, spawn, tag):
    tree = PowercapTree(tmp_path / "powercap")
    zones = tree.add_package(0, dram=True)
    pkg, dram = zones["package"], zones["dram"]
    feeder = ZoneFeeder(tree, {pkg: 30.0, dram: 6.0})
    daemon = make_daemon(tmp_path, sim_file=None, powercap_root=tree.root)
    energy_file = tree.root / pkg / "energy_uj"
    try:
        daemon.start()
        wait_ticks(daemon, 3)
        m0 = daemon.metrics()
        cadence = Cadence(daemon)

        feeder.hold(pkg)  # energy_uj becomes unreadable (root ignores modes: make it a directory)
        energy_file.unlink()
        energy_file.mkdir()
        wait_part(daemon, "rapl", "degraded", contains="Is a directory")
        assert_part(daemon, "rapl", "degraded", contains="package-0")
        assert degraded_parts(daemon) == {"rapl"}
        m1 = daemon.metrics()
        cadence.watch_ticks(4)
        m2 = daemon.metrics()
        assert rate(m1, m2, "dram", "dram-0") == pytest.approx(6.0, rel=0.03)  # the other zone goes on
        assert energy(m2, "cpu", "package-0") == energy(m1, "cpu", "package-0")

        energy_file.rmdir()
        feeder.release(pkg)  # readable again; the counter ran on meanwhile
        wait_part(daemon, "rapl", "ok")
        wait_ticks(daemon, 2)
        cadence.check()
        m3 = daemon.metrics()
        assert rate(m0, m3, "cpu", "package-0") == pytest.approx(30.0, rel=0.03)  # the gap is booked
        assert rate(m0, m3, "dram", "dram-0") == pytest.approx(6.0, rel=0.03)
        assert_logged_once(daemon, "rapl")
        assert_conserved(daemon)
        assert_no_traceback(daemon)
        assert daemon.stop() == 0
    finally:
        feeder.stop()
        daemon.kill()


def test_rapl_wrapping_on_consecutive_ticks(tmp_path):
    # In-process first, exactly: a counter that wraps between every pair of reads.
    tree = PowercapTree(tmp_path / "exact")
    z = tree.add_package(0, max_energy_range_uj=10_000_000, dram=False, core=False, start_uj=9_000_000)
    src = RaplSource(str(tree.root))
    src.read(0.0)
    total = 0.0
    for i in range(1, 11):
        tree.advance(z["package"], 7_000_000)  # 0.7 of the range per interval: a wrap at most reads
        (r,) = src.read(float(i))
        total += r.energy_j
        assert r.energy_j == 7.0 and r.power_w == 7.0
    assert total == 70.0
    assert src._states[0].diff.wraps >= 6  # wrapped on consecutive reads, counted each time

    # The real daemon: 20 W into a 30 J range wraps every 1.5 s, so most ticks see a wrap.
    tree = PowercapTree(tmp_path / "powercap")
    zones = tree.add_package(0, max_energy_range_uj=30_000_000, dram=True)
    feeder = ZoneFeeder(tree, {zones["package"]: 20.0, zones["dram"]: 4.0})
    daemon = make_daemon(tmp_path, sim_file=None, powercap_root=tree.root)
    try:
        daemon.start()
        wait_ticks(daemon, 2)
        m1 = daemon.metrics()
        cadence = Cadence(daemon)
        wraps0 = feeder.wraps[zones["package"]]
        cadence.watch_ticks(7)
        cadence.check(max_overruns=0)  # a late tick could alias a whole range: none may be late
        m2 = daemon.metrics()
        assert feeder.wraps[zones["package"]] - wraps0 >= 4
        assert rate(m1, m2, "cpu", "package-0") == pytest.approx(20.0, rel=0.02)
        assert rate(m1, m2, "dram", "dram-0") == pytest.approx(4.0, rel=0.02)
        assert_part(daemon, "rapl", "ok")
        assert log_lines(daemon, "wattprint.health: rapl degraded") == []
        assert_conserved(daemon)
        assert daemon.stop() == 0
    finally:
        feeder.stop()
        daemon.kill()


def test_powercap_zone_vanishes_mid_run(tmp_path):
    tree = PowercapTree(tmp_path / "powercap")
    zones = tree.add_package(0, dram=True, start_uj=50_000_000_000)
    pkg, dram = zones["package"], zones["dram"]
    feeder = ZoneFeeder(tree, {pkg: 25.0, dram: 5.0})
    daemon = make_daemon(tmp_path, sim_file=None, powercap_root=tree.root)
    try:
        daemon.start()
        wait_ticks(daemon, 3)
        cadence = Cadence(daemon)

        feeder.hold(dram)
        tree.remove_zone(dram)  # the dram zone vanishes (module unloaded)
        wait_part(daemon, "rapl", "degraded", contains="vanished")
        assert_part(daemon, "rapl", "degraded", contains="dram-0")
        assert degraded_parts(daemon) == {"rapl"}
        m1 = daemon.metrics()
        cadence.watch_ticks(3)
        m2 = daemon.metrics()
        assert rate(m1, m2, "cpu", "package-0") == pytest.approx(25.0, rel=0.03)
        assert energy(m2, "dram", "dram-0") == energy(m1, "dram", "dram-0")

        # It comes back with its counter restarted far below the old value: a fresh
        # baseline, not a "wrap" worth most of a 262 kJ range.
        tree.add_zone(dram, "dram", start_uj=0)
        feeder.restart(dram, 0)
        wait_part(daemon, "rapl", "ok")
        m3 = daemon.metrics()
        wait_ticks(daemon, 3)
        cadence.check()
        m4 = daemon.metrics()
        assert energy(m4, "dram", "dram-0") - energy(m2, "dram", "dram-0") < 5.0 * 8
        assert rate(m3, m4, "dram", "dram-0") == pytest.approx(5.0, rel=0.05)
        assert_logged_once(daemon, "rapl")
        assert_conserved(daemon)
        assert_no_traceback(daemon)
        assert daemon.stop() == 0
    finally:
        feeder.stop()
        daemon.kill()


# ----------------------------------------------------------------------------- /proc races

_CHURN = """
import os, subprocess, sys, time
tag = sys.argv[1]
env = {k: v for k, v in os.environ.items() if k != "WATTPRINT_JOB"}
kids = []
i = 0
while True:
    env["WATTPRINT_JOB"] = f"race-{tag}-{i % 40}"
    kids.append(subprocess.Popen(["sleep", "0.0%d" % (1 + i % 9)], env=env))
    i += 1
    kids = [k for k in kids if k.poll() is None]
    time.sleep(0.02)
"""


def test_proc_races_short_lived_labelled_processes(tmp_path, spawn, tag):
    # A labelled job on the GPU whose children come and go all the time, and next to
    # it a stream of short-lived labelled processes (many jobs that end mid-read).
    # Energy: the main job's GPU, CPU and DRAM against truth from what the test controls
    # (tests/e2e_truth.py); each short-lived job's CPU energy at most the package rate x
    # its lifetime (plus the interval it was first booked in) x one CPU's share of the
    # machine, and all of theirs together at most the rate x their CPU time (the churn
    # process reaps them all: its cutime + cstime) / CPUs.
    main = spawn(["bash", "-c", "while :; do sleep 0.01 & sleep 0.02; wait; done"], f"race-main-{tag}")
    churn = spawn([sys.executable, "-c", _CHURN, tag])
    churn_reaped0 = reaped_cpu_ticks(churn.pid)
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=150.0, processes=[proc(main.pid, used_memory_bytes=None, sm_util=90)])])
    tree = PowercapTree(tmp_path / "powercap")
    zones = tree.add_package(0, dram=True)
    feeder = tree.start_feeding({zones["package"]: RACE_PKG_W, zones["dram"]: RACE_DRAM_W}, period_s=0.02)
    daemon = make_daemon(tmp_path, sim_file=sim, powercap_root=tree.root,
                           extra_toml="[jobs]\nrescan_interval_s = 1.0\n")
    try:
        daemon.start()
        wait_job(daemon, f"race-main-{tag}")
        wait_ticks(daemon, 1)
        m1 = daemon.metrics()
        cadence = Cadence(daemon)

        # The tracker itself, in-process and as fast as it goes, over the same churn.
        tracker = ProcessTracker(rescan_interval_s=0.0, max_labels_per_user=100_000)
        seen: set[str] = set()
        t_end = time.monotonic() + 6.0
        n = 0
        while time.monotonic() < t_end:
            view = tracker.observe(time.monotonic(), [main.pid])
            seen |= {u.identity.label for u in view.jobs if u.identity.label.startswith(f"race-{tag}-")}
            mains = [u for u in view.jobs if u.identity.label == f"race-main-{tag}"]
            assert len(mains) == 1 and main.pid in mains[0].pids
            assert all(u.cpu_s >= 0 for u in view.jobs)
            n += 1
        tracker.close()
        assert n > 20 and len(seen) >= 5

        cadence.check(max_overruns=3)
        m2 = daemon.metrics()
        assert_part(daemon, "processes", "ok")
        assert log_lines(daemon, "wattprint.health: processes degraded") == []
        assert sample(m2, "wattprint_tick_errors_total") == 0
        [mine] = [j for j in my_jobs(daemon, f"race-main-{tag}")]
        assert mine["state"] == "running" and mine["root_pid"] == main.pid
        racers = my_jobs(daemon, f"race-{tag}-")
        assert racers, "no short-lived job was ever seen"
        cpus = cpu_count_proc_stat()
        for j in racers:
            bound = RACE_PKG_W * (j["duration_s"] + 1.0 + 0.3) / cpus
            assert 0 <= j["energy_j"]["cpu"] <= bound, (j, bound)
            assert j["energy_j"]["gpu"] == 0 and j["energy_j"]["dram"] >= 0
        reaped_s = (reaped_cpu_ticks(churn.pid) - churn_reaped0) / CLK_TCK
        booked = sum(j["energy_j"]["cpu"] for j in racers)
        assert booked <= RACE_PKG_W * reaped_s / cpus * (1 + CPU_REL) + RACE_PKG_W * CPU_ABS_S, (booked, reaped_s)
        # The main job over 6 ticks: all of the GPU (sole process), its CPU and DRAM shares.
        w = follow(daemon, 6, {"main": lambda: descendants(main.pid), "bash": lambda: [main.pid]})
        got = w.booked(mine["id"])
        assert abs(got["gpu"] - 150.0 * w.seconds) <= 150.0 * 0.2 + 1.5 * w.seconds, (got, w.seconds)
        want_cpu = w.cpu_j("main", RACE_PKG_W)
        assert abs(got["cpu"] - want_cpu) <= CPU_REL * want_cpu + RACE_PKG_W * CPU_ABS_S, (got, want_cpu)
        # DRAM: the job's RSS is bash's plus that of the 0-2 sleeps alive at the daemon's
        # read (they come and go every 10-20 ms, so the test cannot see the same ones):
        # between bash alone and bash + 2 sleeps, each x the dram rate x tick time / used memory.
        sleep_rss = rss_of_a_sleep()
        low = w.dram_j("bash", RACE_DRAM_W)
        high = sum(RACE_DRAM_W * (b.scrape.tick_at - a.scrape.tick_at) * (b.job_rss["bash"] + 2 * sleep_rss)
                   / b.mem_used for a, b in zip(w.samples, w.samples[1:]))
        assert 0.95 * low <= got["dram"] <= 1.05 * high, (got, low, high)
        labels = {"job_id": mine["id"], "label": mine["label"], "user": mine["user"], "kind": "gpu"}
        job_gain = (sample(m2, "wattprint_job_energy_joules_total", **labels)
                    - sample(m1, "wattprint_job_energy_joules_total", **labels))
        # The GPU job got all of the GPU's energy, churn or not.
        assert job_gain == pytest.approx(energy(m2, "gpu", "gpu0") - energy(m1, "gpu", "gpu0"), rel=1e-9)
        assert job_gain > 0
        assert_conserved(daemon)
        assert_no_traceback(daemon)
        churn.kill()
        assert daemon.stop() == 0
    finally:
        feeder.stop()
        daemon.kill()


RACE_PKG_W, RACE_DRAM_W = 40.0, 6.0


def reaped_cpu_ticks(pid: int) -> int:
    """cutime + cstime of ``pid``: the CPU time of the children it has reaped."""
    with open(f"/proc/{pid}/stat") as fh:
        rest = fh.read().rsplit(")", 1)[1].split()
    return int(rest[13]) + int(rest[14])


def rss_of_a_sleep() -> int:
    """Resident bytes of a ``sleep`` process (the churn's children)."""
    p = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.2)
        with open(f"/proc/{p.pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[21]) * os.sysconf("SC_PAGE_SIZE")
    finally:
        p.kill()
        p.wait()


def cpu_count_proc_stat() -> int:
    """The CPUs /proc/stat accounts (the daemon's capacity is their sum)."""
    with open("/proc/stat") as fh:
        return sum(1 for line in fh if line.startswith("cpu") and line[3:4].isdigit())


# ----------------------------------------------------------------------------- clock steps


def test_wall_clock_steps_move_buckets_not_energy(tmp_path, spawn, tag):
    """In-process: monotonic time advances 1 s per tick while the wall clock jumps an
    hour forward and back. Energy per tick is unchanged, each tick's energy lands in
    the bucket of its wall time, nothing goes negative, the job keeps running. Per
    tick, the job's GPU energy is exactly its 80 % share (next to an invisible process
    at 20 %, whose share is the unattributed GPU energy) and its DRAM energy its RSS
    share, both read by the test; conservation is an extra check."""
    job = sleeper(spawn, f"clock-{tag}")
    time.sleep(0.3)
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=100.0, processes=[proc(job.pid, used_memory_bytes=None, sm_util=80),
                                                     proc(INVISIBLE_PID, used_memory_bytes=None, sm_util=20)])])
    tree = PowercapTree(tmp_path / "powercap")
    zones = tree.add_package(0, dram=True, max_energy_range_uj=100_000_000)
    clock = {"mono": 5000.0}
    path = str(tmp_path / "store.sqlite3")
    ledger = Ledger(path, host="h", bucket_s=60)
    engine = Engine(
        sources=[NvmlGpuSource(SimulatedNvml(str(sim), clock=lambda: clock["mono"])), RaplSource(str(tree.root))],
        tracker=ProcessTracker(rescan_interval_s=0, max_labels_per_user=100_000), ledger=ledger,
        intensity=IntensityBook(GridConfig(), "static", "static", 400.0), health=HealthBoard(),
        read_timeout_s=5.0)
    steps = [1] * 3 + [3600 + 1] + [1] * 3 + [-7200 + 1] + [1] * 3 + [3600 + 1] + [1] * 2
    wall = 1_795_000_030.0
    expected_gpu_by_bucket: dict[int, float] = {}
    prev: dict[tuple[str, str], float] = {}
    prev_job = 0.0
    prev_job_dram = 0.0
    prev_unattributed_gpu = 0.0
    try:
        for i, step in enumerate([0] + steps):
            clock["mono"] += 1.0
            wall += step
            tree.advance(zones["package"], 30_000_000)  # 30 J per tick: wraps every few ticks
            tree.advance(zones["dram"], 4_000_000)
            snap = engine.tick_blocking(clock["mono"], wall)
            with open(f"/proc/{job.pid}/stat") as fh:  # the job's RSS and used memory, as the tick saw them
                rss = int(fh.read().rsplit(")", 1)[1].split()[21]) * os.sysconf("SC_PAGE_SIZE")
            used = mem_used_bytes()
            totals = {(d.kind, d.device): d.energy_j_total for d in snap.devices}
            if i > 0:  # (the first tick sets the baselines)
                assert totals[("gpu", "gpu0")] - prev[("gpu", "gpu0")] == pytest.approx(100.0, rel=1e-9)
                assert totals[("cpu", "package-0")] - prev[("cpu", "package-0")] == pytest.approx(30.0, rel=1e-9)
                assert totals[("dram", "dram-0")] - prev[("dram", "dram-0")] == pytest.approx(4.0, rel=1e-9)
                b = ledger.bucket_of(wall)
                expected_gpu_by_bucket[b] = expected_gpu_by_bucket.get(b, 0.0) + 100.0
            prev = totals
            assert snap.taken_at == wall
            [mine] = [j for j in snap.jobs if j.label == f"clock-{tag}"]
            assert mine.state == "running"
            if i > 0:
                assert mine.energy_j["gpu"] - prev_job == pytest.approx(80.0, rel=1e-9)
                assert snap.unattributed_j_total["gpu"] - prev_unattributed_gpu == pytest.approx(20.0, rel=1e-9)
                assert mine.energy_j["dram"] - prev_job_dram == pytest.approx(4.0 * rss / used, rel=0.05)
            prev_job, prev_job_dram = mine.energy_j["gpu"], mine.energy_j["dram"]
            prev_unattributed_gpu = snap.unattributed_j_total["gpu"]
            assert all(v >= 0 for v in snap.unattributed_j_total.values())
            assert {h.name: h.state for h in snap.health}["gpu"] == "ok"

        rows = dict(ledger.conn.execute(
            "SELECT bucket_start, SUM(energy_j) FROM device_buckets WHERE kind='gpu' GROUP BY bucket_start"))
        assert {b: e for b, e in rows.items() if e > 0} == pytest.approx(expected_gpu_by_bucket, rel=1e-9)
        assert len(rows) >= 3  # three different hours got energy
        for table in ("job_buckets", "device_buckets", "unattributed_buckets"):
            (low,) = ledger.conn.execute(f"SELECT MIN(energy_j) FROM {table}").fetchone()
            assert low is None or low >= 0, table
        reader = LedgerReader(path)
        host = reader.host_totals()
        for kind in COMPONENTS:
            assert host["attributed_energy_j"][kind] + host["unattributed_energy_j"][kind] == \
                pytest.approx(host["device_energy_j"][kind], rel=1e-9, abs=1e-9)
        [stored] = [j for j in reader.jobs(label=f"clock-{tag}", now=wall) if j["label"] == f"clock-{tag}"]
        assert stored["state"] == "running" and stored["duration_s"] >= 0 and stored["energy_j"]["gpu"] > 0
        reader.close()
    finally:
        engine.close()


def test_wall_clock_steps_do_not_change_the_schedule(tmp_path, monkeypatch):
    """In-process, the real schedule (``Engine.run``) while ``time.time`` jumps an hour
    forward, then two hours back: ticks stay 1 s apart on the monotonic clock and
    every reading's energy matches its monotonic interval."""
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=100.0)])
    ledger = Ledger(str(tmp_path / "store.sqlite3"), host="h", bucket_s=60)
    engine = Engine(sources=[NvmlGpuSource(SimulatedNvml(str(sim)))], tracker=ProcessTracker(), ledger=ledger,
                    intensity=IntensityBook(GridConfig(), "static", "static", 400.0), health=HealthBoard())
    real_time = time.time
    started = time.monotonic()

    def stepped() -> float:
        elapsed = time.monotonic() - started
        return real_time() + (3600.0 if 1.5 <= elapsed < 3.0 else -3600.0 if elapsed >= 3.0 else 0.0)

    records = []
    engine.sinks.append(records.append)
    monkeypatch.setattr(time, "time", stepped)

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(5.2, stop.set)
        await engine.run(stop)

    try:
        asyncio.run(main())
    finally:
        monkeypatch.setattr(time, "time", real_time)
        engine.close()
    assert 5 <= len(records) <= 7
    walls = [r.sampled_at for r in records]
    assert max(walls) - min(walls) > 3000 and any(b < a for a, b in zip(walls, walls[1:]))  # it did jump both ways
    for r in records[1:]:
        (reading,) = r.readings
        assert 0.8 <= reading.interval_s <= 1.25
        assert reading.energy_j == pytest.approx(100.0 * reading.interval_s, rel=0.02)
        assert reading.energy_j >= 0
    assert engine.snapshot is not None and engine.snapshot.counters["tick_overruns_total"] == 0


# ----------------------------------------------------------------------------- disk full


class PipedDaemon(DaemonProcess):
    """The daemon with its output pumped through a pipe into the log file, so that a
    file size limit (RLIMIT_FSIZE) put on the daemon never applies to its log."""

    def start(self, timeout_s: float = 20.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wattprint.daemon", "run", "--config", str(self.config_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env)
        source = self.proc.stdout

        def pump() -> None:
            with open(self.log_path, "ab") as out:
                for chunk in iter(lambda: source.read1(65536), b""):
                    out.write(chunk)
                    out.flush()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.get("/healthz", allow_error=True).get("tick", 0) >= 1:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"daemon not ready after {timeout_s}s:\n{self.log_tail()}")


class SmallDisk:
    """A nearly full filesystem under the daemon's state_dir.

    Preferred: a small tmpfs mounted there (root). Else a loop-mounted ext4 image.
    Else (no mount rights) RLIMIT_FSIZE on the daemon process: writes past the size
    each file has when ``fill()`` is called fail with EFBIG, as a full disk fails them
    with ENOSPC. Without any of these the test skips, but fails under CI=true."""

    def __init__(self, directory: Path, size_mb: int = 24):
        self.dir = directory
        self.mode = ""
        self.filler = directory / "filler"
        self.image = directory.parent / "small-disk.img"
        self.pid: int | None = None
        directory.mkdir(parents=True, exist_ok=True)
        why: list[str] = []
        forced = os.environ.get("WATTPRINT_TEST_SMALL_DISK", "")  # tmpfs | loop | fsize: try only that
        if forced == "fsize":
            self.mode = "fsize"
            return
        if os.geteuid() == 0 and forced in ("", "tmpfs"):
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0750", "tmpfs", str(directory)],
                               capture_output=True, text=True)
            if r.returncode == 0:
                self.mode = "tmpfs"
                return
            why.append(f"tmpfs: {r.stderr.strip()}")
        if os.geteuid() == 0 and forced in ("", "loop"):
            if shutil.which("mkfs.ext4"):
                with open(self.image, "wb") as fh:
                    fh.truncate(size_mb << 20)
                mk = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(self.image)], capture_output=True, text=True)
                r = subprocess.run(["mount", "-o", "loop", str(self.image), str(directory)], capture_output=True, text=True)
                if mk.returncode == 0 and r.returncode == 0:
                    self.mode = "loop"
                    return
                why.append(f"loop: {(mk.stderr + r.stderr).strip()}")
        if os.geteuid() != 0:
            why.append("not root: no mount")
        self.mode = "fsize"  # works unprivileged too: lowering a child's soft limit
        self.why = "; ".join(why)

    def attach(self, pid: int) -> None:
        self.pid = pid

    def fill(self) -> None:
        if self.mode == "fsize":
            assert self.pid is not None
            limit = 1  # no write past the first byte of any file: as full as a disk gets
            _, hard = resource.prlimit(self.pid, resource.RLIMIT_FSIZE)
            resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (limit, hard))
            return
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            block = b"\0" * 65536
            while True:
                try:
                    os.write(fd, block)
                except OSError:
                    if len(block) == 1:
                        break
                    block = block[: len(block) // 16]
        finally:
            os.close(fd)

    def free(self) -> None:
        if self.mode == "fsize":
            assert self.pid is not None
            _, hard = resource.prlimit(self.pid, resource.RLIMIT_FSIZE)
            resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (hard, hard))
            return
        self.filler.unlink(missing_ok=True)

    def close(self) -> None:
        if self.mode in ("tmpfs", "loop"):
            if subprocess.run(["umount", str(self.dir)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(self.dir)], capture_output=True)
        self.image.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[SmallDisk]:
    disk = SmallDisk(tmp_path / "state")
    try:
        yield disk
    finally:
        disk.close()


INFLUX_DB = "wattprint_faults"


@pytest.fixture
def real_influx(influxdb_server, background_app) -> tuple[FaultProxy, Any]:
    """The real influxd (tests/servers.py), behind the fault proxy (tests/fault_proxy.py)
    whose mode the test switches ("forward", "hang", ...): (proxy, server)."""
    influxdb_server.create_database(INFLUX_DB)
    proxy = FaultProxy(influxdb_server.url, hang_max_s=300.0)
    proxy.url = background_app(proxy.app()).url
    return proxy, influxdb_server


def influx_toml(url: str, **extra: Any) -> str:
    lines = ["[influxdb]", "enabled = true", f'url = "{url}"', f'database = "{INFLUX_DB}"', "flush_interval_s = 0.2",
             "timeout_s = 1.0"]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def influx_gpu0_stamps(server: Any) -> list[int]:
    """Timestamps (ns) of every ``device_power`` point of gpu0 influxd holds, in order."""
    res = server.query('SELECT "watts" FROM "device_power" WHERE "device" = $d', db=INFLUX_DB,
                       params={"d": "gpu0"}, epoch="ns")["results"][0]
    return sorted(int(r[0]) for sr in res.get("series", []) for r in sr["values"])


def influx_job_joules(server: Any, job_id: str) -> float:
    rows = server.series_values('SELECT sum("joules") FROM "job_energy" WHERE "job_id" = $id', db=INFLUX_DB,
                                params={"id": job_id})
    return float(rows[0][1]) if rows else 0.0


def assert_contiguous(stamps_ns: list[int], max_gap_s: float = 1.6) -> None:
    """One point per tick: no two alike, none missing between the first and the last."""
    assert stamps_ns, "no points"
    assert len(stamps_ns) == len(set(stamps_ns)), "duplicate timestamps"
    gaps = [(b - a) / 1e9 for a, b in zip(stamps_ns, stamps_ns[1:])]
    assert not gaps or max(gaps) <= max_gap_s, f"gap of {max(gaps):.2f} s"


def wait_drained(daemon: DaemonProcess, timeout_s: float = 30.0) -> None:
    """Until nothing older than the last tick waits in the spool (polled)."""
    deadline = time.monotonic() + timeout_s
    while sample(daemon.metrics(), "wattprint_spool_oldest_age_seconds") > 1.5:
        assert time.monotonic() < deadline, f"spool not drained:\n{daemon.log_tail()}"
        time.sleep(0.2)


def test_disk_full_for_the_store_and_the_spool(tmp_path, spawn, tag, small_disk, influxdb_server):
    """The disk under the state dir fills (store and spool), with the real influxd up.
    What the spool could not write is dropped and counted; in influxd the points are
    contiguous and once each up to the fill and again after the disk is free."""
    influxdb_server.create_database(INFLUX_DB)
    job = sleeper(spawn, f"full-{tag}")
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=200.0, processes=[proc(job.pid, used_memory_bytes=None, sm_util=90)])])
    kind = PipedDaemon if small_disk.mode == "fsize" else DaemonProcess
    daemon = make_daemon(tmp_path, cls=kind, sim_file=sim, powercap_root=None,
                         extra_toml=influx_toml(influxdb_server.url))
    try:
        daemon.start()
        small_disk.attach(daemon.proc.pid)
        wait_job(daemon, f"full-{tag}")
        until_ticks(daemon, lambda: len(influx_gpu0_stamps(influxdb_server)) > 0, "first points in influxd")
        wait_ticks(daemon, 1)
        cadence = Cadence(daemon)

        wait_drained(daemon)
        filled_after = tick_at(daemon.metrics())  # everything up to this tick is in influxd
        small_disk.fill()
        wait_part(daemon, "store", "degraded")
        wait_part(daemon, "influxdb", "degraded", contains="spool write failed")
        assert_part(daemon, "store", "degraded")
        assert degraded_parts(daemon) == {"store", "influxdb"}
        m1 = daemon.metrics()
        jobs1 = my_jobs(daemon, f"full-{tag}")
        cadence.watch_ticks(4)
        m2 = daemon.metrics()
        # The rest goes on: in-memory totals, metrics and the API (reads) keep working.
        assert rate(m1, m2, "gpu", "gpu0") == pytest.approx(200.0, rel=0.03)
        [mine] = my_jobs(daemon, f"full-{tag}")
        assert mine["id"] == jobs1[0]["id"] and mine["state"] == "running"
        assert sample(m2, "wattprint_store_pending_ticks") >= 3
        assert sample(m2, "wattprint_influx_points_dropped_spool_error_total") > \
            sample(m1, "wattprint_influx_points_dropped_spool_error_total")
        assert_conserved(daemon)

        small_disk.free()
        wait_part(daemon, "store", "ok")
        wait_part(daemon, "influxdb", "ok")
        freed_at = tick_at(daemon.metrics())
        wait_ticks(daemon, 2)
        wait_drained(daemon)
        cadence.check()
        m3 = daemon.metrics()
        stamps = influx_gpu0_stamps(influxdb_server)
        before = [t for t in stamps if t / 1e9 <= filled_after + 1e-3]
        after = [t for t in stamps if t / 1e9 > freed_at + 1e-3]
        assert_contiguous(before)  # up to the fill: all there, once each
        assert_contiguous(after)  # since the disk is free: all there, once each
        assert before[-1] / 1e9 >= filled_after - 1.6  # (the tick after the drain may have been lost)
        assert after[-1] / 1e9 == pytest.approx(tick_at(m3), abs=1.6)
        assert len(stamps) == len(set(stamps))
        assert sample(m3, "wattprint_store_pending_ticks") == 0
        # The ledger caught up: the ticks kept in memory while the disk was full were
        # written afterwards, so the store has as much energy as the in-memory totals.
        host = assert_conserved(daemon)
        ledger_gpu = host["device_energy_j"]["gpu"]
        assert ledger_gpu == pytest.approx(energy(m3, "gpu", "gpu0"), abs=200.0 * 1.5)
        for name in ("store", "influxdb"):
            assert_logged_once(daemon, name)
        assert_no_traceback(daemon)
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_store_write_failures_are_kept_and_written_later(tmp_path, spawn, tag, monkeypatch):
    """In-process: ticks that could not be stored are written, in order, once the
    store works again; beyond the in-memory cap the oldest are dropped and counted."""
    import wattprint.daemon.engine as engine_mod

    job = sleeper(spawn, f"backlog-{tag}")
    time.sleep(0.3)
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=100.0, processes=[proc(job.pid, sm_util=80)])])
    clock = {"mono": 100.0, "wall": 1_795_000_000.0}
    path = str(tmp_path / "s.sqlite3")
    ledger = Ledger(path, host="h", bucket_s=60)
    engine = Engine(sources=[NvmlGpuSource(SimulatedNvml(str(sim), clock=lambda: clock["mono"]))],
                    tracker=ProcessTracker(rescan_interval_s=0, max_labels_per_user=100_000), ledger=ledger,
                    intensity=IntensityBook(GridConfig(), "static", "static", 400.0), health=HealthBoard(),
                    read_timeout_s=5.0)
    real = ledger.record_ticks
    broken = {"on": False}

    def record_ticks(rows):
        if broken["on"]:
            raise sqlite3.OperationalError("database or disk is full")
        return real(rows)

    monkeypatch.setattr(ledger, "record_ticks", record_ticks)

    def tick():
        clock["mono"] += 1.0
        clock["wall"] += 1.0
        return engine.tick_blocking(clock["mono"], clock["wall"])

    try:
        tick()
        broken["on"] = True
        for _ in range(10):
            snap = tick()
        assert {h.name: h.state for h in snap.health}["store"] == "degraded"
        assert snap.counters["store_pending_ticks"] == 10
        broken["on"] = False
        snap = tick()
        assert {h.name: h.state for h in snap.health}["store"] == "ok"
        assert snap.counters["store_pending_ticks"] == 0
        reader = LedgerReader(path)
        [mine] = [j for j in reader.jobs(label=f"backlog-{tag}", now=clock["wall"])]
        assert mine["energy_j"]["gpu"] == pytest.approx(1100.0, rel=1e-9)  # 11 intervals, none lost
        assert reader.host_totals()["device_energy_j"]["gpu"] == pytest.approx(1100.0, rel=1e-9)

        monkeypatch.setattr(engine_mod, "STORE_BACKLOG_MAX_TICKS", 5)
        broken["on"] = True
        for _ in range(8):
            snap = tick()
        assert snap.counters["store_pending_ticks"] == 5
        assert snap.counters["store_ticks_dropped_total"] == 3
        broken["on"] = False
        tick()
        assert reader.host_totals()["device_energy_j"]["gpu"] == pytest.approx(1100.0 + 600.0, rel=1e-9)
        reader.close()
    finally:
        engine.close()


def test_source_read_deadline_in_process(tmp_path):
    """A read that blocks is left behind at the deadline; no second read of that
    source starts while it is stuck; what it returns late is booked with the next
    tick, merged with that tick's own read."""
    gate = threading.Event()
    calls: list[float] = []

    class Stuck:
        name = "stuck"

        def read(self, now):
            calls.append(now)
            if len(calls) == 2:
                gate.wait(30)
            return [DeviceReading(kind="cpu", device="pkg", energy_j=10.0, power_w=10.0, source="counter",
                                  interval_s=1.0)]

        def problems(self):
            return []

        def close(self):
            pass

    engine = Engine(sources=[Stuck()], tracker=ProcessTracker(), ledger=Ledger(str(tmp_path / "s.sqlite3"), "h", 60),
                    intensity=IntensityBook(GridConfig(), "static", "static", 400.0), health=HealthBoard(),
                    interval_s=0.5)
    try:
        wall = 1_795_000_000.0
        engine.tick_blocking(1.0, wall)
        t0 = time.monotonic()
        snap = engine.tick_blocking(2.0, wall + 1)
        assert time.monotonic() - t0 < 0.45 + 0.3  # 0.8 x 0.5 s, plus the rest of the tick
        h = {x.name: x for x in snap.health}["stuck"]
        assert h.state == "degraded" and "timed out" in h.detail
        engine.tick_blocking(3.0, wall + 2)
        assert len(calls) == 2  # no read stacked on the stuck one
        gate.set()
        time.sleep(0.1)
        snap = engine.tick_blocking(4.0, wall + 3)
        assert len(calls) == 3
        assert {x.name: x.state for x in snap.health}["stuck"] == "ok"
        [dev] = snap.devices
        assert dev.energy_j_total == pytest.approx(30.0)  # 1st + late 2nd + 3rd read: nothing lost
        assert snap.counters["source_read_timeouts_total"] == 2
    finally:
        engine.close()


# ----------------------------------------------------------------------------- spool cap, InfluxDB hanging


def test_influxdb_hanging(tmp_path, spawn, tag, real_influx):
    """The real influxd behind a proxy that accepts the writes and never answers (the
    client's timeout fires). Nothing reaches influxd meanwhile, the spool keeps every
    point; when it answers again everything arrives: complete (one device_power point
    per tick, no gap; the job's joules in influxd equal its total) and never twice (no
    line acknowledged twice, no duplicate timestamp)."""
    proxy, influx = real_influx
    proxy.set("hang")
    job = sleeper(spawn, f"ihang-{tag}")
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=120.0, processes=[proc(job.pid, used_memory_bytes=None, sm_util=90)])])
    daemon = make_daemon(tmp_path, sim_file=sim, powercap_root=None, extra_toml=influx_toml(proxy.url))
    try:
        daemon.start()
        cadence = Cadence(daemon)
        job_id = wait_job(daemon, f"ihang-{tag}")["id"]
        wait_part(daemon, "influxdb", "degraded", contains="timeout")
        assert_part(daemon, "influxdb", "degraded")
        assert degraded_parts(daemon) == {"influxdb"}
        m1 = daemon.metrics()
        cadence.watch_ticks(4)
        m2 = daemon.metrics()
        # Nothing delivered; the spool grows with every tick (and keeps all of it).
        assert sample(m2, "wattprint_spool_pending_points") > sample(m1, "wattprint_spool_pending_points") > 0
        span = tick_at(m2) - tick_at(m1)
        assert sample(m2, "wattprint_spool_oldest_age_seconds") >= span - 0.5
        assert sample(m2, "wattprint_influx_points_dropped_spool_full_total") == 0
        assert not proxy.delivered and influx_gpu0_stamps(influx) == []
        assert rate(m1, m2, "gpu", "gpu0") == pytest.approx(120.0, rel=0.03)
        cadence.check()

        proxy.set("forward")  # it answers again: the backlog goes out
        wait_part(daemon, "influxdb", "ok", timeout_s=30.0)
        wait_drained(daemon)
        # The job ends, so its total stops moving; then a clean stop flushes the rest.
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        write_sim(sim, [gpu(0, power_w=120.0, processes=[])])
        until_ticks(daemon, lambda: daemon.get(f"/api/v1/jobs/{urllib.parse.quote(job_id, safe='')}")["state"]
                    == "finished", "job finished")
        final = daemon.get(f"/api/v1/jobs/{urllib.parse.quote(job_id, safe='')}")
        ticks = sample(daemon.metrics(), "wattprint_ticks_total")
        assert_logged_once(daemon, "influxdb")
        assert_conserved(daemon)
        assert_no_traceback(daemon)
        assert daemon.stop() == 0

        # Complete: every tick's device_power point, the job's every joule...
        stamps = influx_gpu0_stamps(influx)
        assert_contiguous(stamps)
        assert len(stamps) >= ticks, (len(stamps), ticks)
        assert influx_job_joules(influx, job_id) == pytest.approx(final["energy_j"]["total"], rel=1e-6)
        # ...and never twice: no line was acknowledged by influxd more than once.
        assert proxy.delivered_twice() == []
    finally:
        proxy.set("forward")  # a hanging handler returns, so the proxy can stop
        daemon.kill()


def test_spool_at_its_cap_drops_the_oldest_and_counts_them(tmp_path, spawn, tag, influxdb_server):
    """The real influxd is down (stopped) while the spool fills past its 4 KiB cap: the
    oldest points are dropped and counted, the spool stays bounded. When influxd is back
    (the sender finds it at its next retry; the spool may drop more meanwhile) what was
    kept arrives: no point twice, the missing ticks no more than the lines the daemon
    counted as dropped, and once delivery has resumed no further drop and every tick's
    point, without a gap. (The batch the sender held while retrying is delivered when
    influxd returns, so the very first tick's point may survive the cap.)"""
    influxdb_server.create_database(INFLUX_DB)
    influxdb_server.stop()  # down from the start
    job = sleeper(spawn, f"cap-{tag}")
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=120.0, processes=[proc(job.pid, used_memory_bytes=None, sm_util=90)])])
    daemon = make_daemon(tmp_path, sim_file=sim, powercap_root=None,
                         extra_toml=influx_toml(influxdb_server.url, spool_max_bytes=4096))
    try:
        daemon.start()
        first_tick_at = tick_at(daemon.metrics())
        cadence = Cadence(daemon)
        wait_part(daemon, "influxdb", "degraded", contains="unreachable")
        assert_part(daemon, "influxdb", "degraded")
        assert degraded_parts(daemon) == {"influxdb"}
        for _ in range(30):  # one check per tick until points are being dropped
            m = daemon.metrics()
            # Bounded: the cap, plus the active segment's last append (one tick's lines,
            # more when other labelled jobs run on this machine).
            assert sample(m, "wattprint_spool_bytes") <= 4096 + 64 * 1024
            if sample(m, "wattprint_influx_points_dropped_spool_full_total") > 0:
                break
            wait_ticks(daemon, 1)
        wait_ticks(daemon, 2)
        m = daemon.metrics()
        assert sample(m, "wattprint_spool_bytes") <= 4096 + 64 * 1024
        assert sample(m, "wattprint_influx_points_dropped_spool_full_total") > 0
        cadence.check()
        # One line when it became unreachable, then one when data began to be lost
        # (spool full), then at most one per tenfold of lost lines: never one per tick.
        down = log_lines(daemon, "wattprint.health: influxdb degraded:")
        assert "unreachable" in down[0] and " WARNING " in down[0], down
        assert down[1:] and all("spool full" in line for line in down[1:]), down
        assert len(down) <= 4, down
        assert not log_lines(daemon, "wattprint.health: influxdb recovered")

        influxdb_server.start()  # back: what the spool kept goes out
        # Reachable again; still degraded: the loss episode lasts 60 s after the last
        # drop (docs/influxdb.md), and it says so.
        until_ticks(daemon, lambda: "unreachable" not in part(daemon, "influxdb")["detail"], "influxd reachable", 30)
        assert_part(daemon, "influxdb", "degraded", contains="spool full")
        wait_drained(daemon)
        m_back = daemon.metrics()  # delivering again: from this tick on nothing may be lost
        wait_ticks(daemon, 3)
        wait_drained(daemon)
        m_end = daemon.metrics()
        assert sample(m_end, "wattprint_influx_points_dropped_spool_full_total") == \
            sample(m_back, "wattprint_influx_points_dropped_spool_full_total")
        stamps = influx_gpu0_stamps(influxdb_server)
        assert len(stamps) == len(set(stamps)), "duplicate timestamps"
        # Every tick wrote one gpu0 point; the missing ones are accounted for by the
        # daemon's drop count (each missing tick lost at least that line).
        missing = sample(m_end, "wattprint_ticks_total") - len(stamps)
        assert 0 < missing <= sample(m_end, "wattprint_influx_points_dropped_spool_full_total"), (missing, stamps)
        assert stamps[0] / 1e9 >= first_tick_at - 1e-3
        since_back = [t for t in stamps if t / 1e9 >= tick_at(m_back) - 1e-3]
        assert len(since_back) >= 3
        assert_contiguous(since_back)  # since delivery resumed: every tick, once each
        assert since_back[0] / 1e9 == pytest.approx(tick_at(m_back), abs=1e-3)
        assert since_back[-1] / 1e9 == pytest.approx(tick_at(m_end), abs=1.6)
        assert_conserved(daemon)
        assert_no_traceback(daemon)
        assert daemon.stop() == 0
    finally:
        daemon.kill()


# ----------------------------------------------------------------------------- grid API hanging


def test_grid_api_hanging(tmp_path, spawn, tag, background_app):
    released = threading.Event()
    hits: list[float] = []

    async def dataset(request: web.Request) -> web.Response:
        hits.append(time.monotonic())
        while not released.is_set():
            await asyncio.sleep(0.05)
        return web.json_response({"total": 0, "records": []})

    app = web.Application()
    app.router.add_get("/dataset/{name}", dataset)
    server = background_app(app)
    job = sleeper(spawn, f"grid-{tag}")
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=90.0, processes=[proc(job.pid, sm_util=90)])])
    daemon = make_daemon(tmp_path, sim_file=sim, powercap_root=None,
                           extra_toml=f'[grid]\nprovider = "energidataservice"\nzone = "DK1"\n'
                                      f'base_url = "{server.url}"\n')
    try:
        daemon.start()
        started = time.monotonic()
        cadence = Cadence(daemon)
        while not hits and time.monotonic() - started < 10:
            time.sleep(0.1)
        assert hits, "the daemon never asked the grid API"
        m1 = daemon.metrics()
        wait_part(daemon, "grid", "degraded", timeout_s=14.0, contains="timeout")
        assert time.monotonic() - hits[0] <= 12.0  # the request gave up within its 10 s bound
        cadence.check()
        m2 = daemon.metrics()
        assert rate(m1, m2, "gpu", "gpu0") == pytest.approx(90.0, rel=0.03)
        assert_part(daemon, "grid", "degraded")
        assert degraded_parts(daemon) == {"grid"}
        assert_logged_once(daemon, "grid", recovered=False)
        assert_conserved(daemon)
        assert_no_traceback(daemon)
        released.set()
        assert daemon.stop() == 0
    finally:
        released.set()
        daemon.kill()


# ----------------------------------------------------------------------------- store at start


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _make_store(path: Path, jobs: int = 300) -> None:
    """A real store with some history (several pages)."""
    ledger = Ledger(str(path), host="testhost", bucket_s=60)
    for j in range(jobs):
        ident = JobIdentity(job_id=f"{1000 + j}-1", label=f"old-{j}", label_source="WATTPRINT_JOB", uid=0,
                            user="root", command="python", root_pid=1000 + j, started_at=1_790_000_000.0 + j)
        ledger.record_tick(1_790_000_000.0 + 60 * j, [JobTick(ident, {"gpu": 100.0}, 1.0, 0, {"gpu": "counter"})],
                           [("gpu", "gpu0", 150.0, "counter")], {"gpu": 50.0}, None)
    ledger.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    ledger.close()


def _start_fails(daemon: DaemonProcess) -> int:
    with pytest.raises(RuntimeError, match="daemon exited"):
        daemon.start(timeout_s=30.0)
    assert daemon.proc is not None
    return daemon.proc.returncode


@pytest.mark.parametrize("damage", ["garbage", "pages"])
def test_corrupt_store_at_start_is_a_clear_error(tmp_path, damage):
    state = tmp_path / "state"
    state.mkdir()
    store = state / "wattprint.sqlite3"
    if damage == "garbage":
        store.write_bytes(b"definitely not SQLite\n" * 500)
    else:
        _make_store(store)
        data = bytearray(store.read_bytes())
        for i in range(3 * 4096 + 100, 6 * 4096, 7):  # scribble over a few b-tree pages
            data[i] = (data[i] * 31 + 7) & 0xFF
        store.write_bytes(bytes(data))
    before = _sha256(store)
    daemon = make_daemon(tmp_path, sim_file=None, powercap_root=None)
    try:
        code = _start_fails(daemon)
        assert code != 0
        [line] = log_lines(daemon, "cannot start:")
        assert str(store) in line and " ERROR " in line
        assert ("not a database" in line) if damage == "garbage" else ("malformed" in line or "damaged" in line)
        assert "left as it is" in line
        assert_no_traceback(daemon)
        assert _sha256(store) == before  # not overwritten, not replaced: nothing dropped
    finally:
        daemon.kill()


def test_locked_store_at_start_is_a_clear_error(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    store = state / "wattprint.sqlite3"
    _make_store(store, jobs=5)
    holder = sqlite3.connect(str(store), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # someone else is writing (a sqlite3 shell, a backup)
    daemon = make_daemon(tmp_path, sim_file=None, powercap_root=None)
    try:
        t0 = time.monotonic()
        code = _start_fails(daemon)
        assert code != 0 and time.monotonic() - t0 < 20
        [line] = log_lines(daemon, "cannot start:")
        assert str(store) in line and "locked" in line
        assert_no_traceback(daemon)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        daemon.kill()
    check = sqlite3.connect(str(store))
    assert check.execute("SELECT count(*), sum(gpu_j) FROM jobs").fetchone() == (5, 500.0)  # untouched
    check.close()


def test_second_daemon_on_the_same_store_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = make_daemon(tmp_path / "a", sim_file=None, powercap_root=None)
    state = tmp_path / "a" / "state"
    second = make_daemon(tmp_path / "b", sim_file=None, powercap_root=None,
                           env={"WATTPRINT_DAEMON_STATE_DIR": str(state)})
    try:
        first.start()
        code = _start_fails(second)
        assert code != 0
        [line] = log_lines(second, "cannot start:")
        assert str(state / "wattprint.sqlite3") in line and "another wattprint" in line
        assert_no_traceback(second)
        cadence = Cadence(first)
        wait_ticks(first, 2)
        cadence.check()  # the first one is not disturbed
        assert health(first)["status"] == "ok"
        assert first.stop() == 0
    finally:
        first.kill()
        second.kill()


# ----------------------------------------------------------------------------- spool on a full disk, in-process


def test_spool_on_a_full_disk_leaves_no_empty_segments_and_keeps_its_position(tmp_path, monkeypatch):
    import wattprint.exporters.spool as spool_mod
    from wattprint.exporters.spool import Spool

    real_write, real_replace = os.write, os.replace
    full = {"on": False}

    def write(fd, data):
        if full["on"]:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    def replace(src, dst):
        if full["on"]:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(spool_mod.os, "write", write)
    monkeypatch.setattr(spool_mod.os, "replace", replace)
    with Spool(str(tmp_path), segment_bytes=4096) as sp:
        sp.append([f"m v={i}i {i}" for i in range(3)])
        lines, cursor = sp.peek(10)
        full["on"] = True
        for i in range(50):  # a long disk-full spell: every append fails
            with pytest.raises(OSError):
                sp.append([f"m v={i}i {i}" * 300])  # (each would need a new segment)
        assert sp.commit(cursor) == 3  # delivered meanwhile: the cursor file cannot be written
        assert sp.cursor_save_errors_total == 1
        assert len(list(tmp_path.glob("seg-*.wal"))) <= 1  # no trail of empty segment files
        full["on"] = False
        sp.append(["m v=99i 99"])
        assert sp.peek(10)[0] == ["m v=99i 99"]  # position kept in memory, nothing replayed twice now
