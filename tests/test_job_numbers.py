"""Per-job numbers, exactly, in-process (fast; no daemon, no /proc, no clock).

An ``Engine`` is built with a fake source (device readings the test writes) and a
fake process view (jobs, their CPU seconds and RSS, the machine's busy/total CPU
time and used memory, all chosen by the test). Every expected number below is worked
out by hand from those inputs and the rules in docs/jobs.md, never from the code
under test:

- GPU: a sole process gets the whole reading; on a shared GPU the active part goes by
  activity share ``max(sm, enc, dec) / sum``, the idle part (idle floor x interval,
  the floor learned from an interval with no process on the GPU) by used-memory share
  (equal shares when some process reports no memory); a process with no utilisation
  sample has activity 0; the share of an invisible process or of a visible process in
  no job stays unattributed.
- CPU: package energy x (job CPU s / machine busy CPU s) x (busy / capacity); idle
  energy stays unattributed (``idle_policy = "unattributed"``) or is shared by CPU
  time among the jobs (``"share"``).
- DRAM: dram energy x job RSS / (MemTotal - MemAvailable).
- CO2e: energy in kWh x the slot's intensity x PUE; cost: kWh x PUE x price.
- The process side (``ProcessTracker`` on the real /proc): a job's CPU seconds are
  its processes' utime + stime delta / CLK_TCK, its RSS their resident pages, both
  read by the test from /proc/<pid>/stat while the process is stopped.

Unattributed energy is asserted against its own expected value (what the test knows
is nobody's), not as device minus jobs. Each assertion is exact (rel 1e-9), so a
change that moves any per-job number by 10% in any component fails here: this file
is what makes the fast suite (``pytest -m "not slow"``) guard the split, not only
conservation (see the report of issue 13 for the mutations it was checked against).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Sequence

import pytest

from wattprint.daemon.carbon import IntensityBook
from wattprint.daemon.config import GridConfig
from wattprint.daemon.engine import Engine
from wattprint.daemon.grid.base import IntensityPoint
from wattprint.daemon.ledger import LedgerReader
from wattprint.daemon.model import DeviceReading, GpuProcessUse
from wattprint.daemon.procs import JobIdentity, JobUsage, ProcessTracker, ProcessView

GIB = 1 << 30
J_PER_KWH = 3.6e6
T0 = 1_795_000_000.0  # a multiple of 3600: bucket and slot boundaries fall on whole hours
PUE = 1.5
PRICE = 0.25  # EUR per kWh
STATIC_G = 400.0
INVISIBLE_PID = 4_194_313  # above the kernel's PID limit (2**22): never a /proc entry


def ident(name: str, pid: int) -> JobIdentity:
    return JobIdentity(job_id=f"{pid}-1", label=name, label_source="WATTPRINT_JOB", uid=1000, user="u",
                       command="python", root_pid=pid, started_at=T0 - 100.0, label_raw=name)


A, B, C = ident("job-a", 101), ident("job-b", 102), ident("job-c", 103)
PID_TO_JOB = {101: A.job_id, 111: A.job_id, 102: B.job_id, 103: C.job_id}
UNLABELLED_PID = 150  # visible on a GPU but in no job (the view does not map it)


@dataclass
class FakeSource:
    """Hands the engine the readings the test queued, one list per tick."""

    name: str = "fake"
    queue: list[list[DeviceReading]] = field(default_factory=list)

    def read(self, now_mono_s: float) -> list[DeviceReading]:
        return self.queue.pop(0)

    def problems(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


@dataclass
class FakeTracker:
    """Stands in for ProcessTracker: returns the views the test queued."""

    queue: list[ProcessView] = field(default_factory=list)

    def observe(self, now_mono_s: float, gpu_pids: object) -> ProcessView:
        return self.queue.pop(0)

    def label_problem(self) -> None:
        return None

    def counters(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


def gpu(device: str, joules: float, procs: Sequence[GpuProcessUse] = ()) -> DeviceReading:
    return DeviceReading("gpu", device, joules, joules, "counter", 1.0, tuple(procs))


def view(cpu_s: dict[str, float], rss: dict[str, int], busy_s: float, total_s: float, mem_used: int) -> ProcessView:
    jobs = tuple(JobUsage(identity=j, pids=frozenset(p for p, jid in PID_TO_JOB.items() if jid == j.job_id),
                          cpu_s=cpu_s[j.label], rss_bytes=rss[j.label]) for j in (A, B, C))
    return ProcessView(jobs=jobs, pid_to_job=dict(PID_TO_JOB), cpu_busy_s=busy_s, mem_used_bytes=mem_used,
                       scanned=True, cpu_total_s=total_s)


def make(make_engine, intensity: IntensityBook, idle_policy: str = "unattributed",
         bucket_s: int = 3600) -> tuple[Engine, FakeSource, FakeTracker, str]:
    """An engine over the fakes (conftest's make_engine) and the path of its store."""
    src, tracker = FakeSource(), FakeTracker()
    engine = make_engine(sources=[src], tracker=tracker, store="store.sqlite3", bucket_s=bucket_s,
                         intensity=intensity, pue=PUE, idle_policy=idle_policy, finished_grace_s=1e9)
    return engine, src, tracker, engine.ledger.path


def static_book() -> IntensityBook:
    return IntensityBook(GridConfig(), "static", "static", STATIC_G)


# One tick of the main scene (interval 1 s):
#   gpu0 400 J: A (sm 60, 2 GiB), B (sm 20, memory not available), C (memory not available,
#        no utilisation sample: memory-only), an invisible process (sm 20). No idle floor
#        known (gpu0 is never empty), so all 400 J go by activity: 60/20/0/20 of 100.
#   gpu1 100 J: C alone (memory-only, no sample): the sole process gets everything.
#   gpu2  50 J: nobody on it: unattributed.
#   gpu3  90 J: A's second process and an unlabelled process, neither with a sample nor
#        with memory reported: equal shares, 45 J each; the unlabelled share is nobody's.
#   package-0 80 J, 4 CPUs x 1 s = 4 CPU-s of capacity, 1.5 CPU-s busy (A 0.9, B 0.3, C 0,
#        0.3 by processes in no job): job = 80 x cpu_s / 4.
#   dram-0 12 J, 8 GiB used: A 2 GiB, B 1 GiB, C 1 GiB: job = 12 x rss / 8 GiB.
def scene_readings() -> list[DeviceReading]:
    return [
        gpu("gpu0", 400.0, [GpuProcessUse(101, 2 * GIB, 60.0), GpuProcessUse(102, None, 20.0),
                            GpuProcessUse(103, None, None), GpuProcessUse(INVISIBLE_PID, GIB, 20.0, visible=False)]),
        gpu("gpu1", 100.0, [GpuProcessUse(103, None, None)]),
        gpu("gpu2", 50.0),
        gpu("gpu3", 90.0, [GpuProcessUse(111, None, None), GpuProcessUse(UNLABELLED_PID, None, None)]),
        DeviceReading("cpu", "package-0", 80.0, 80.0, "counter", 1.0),
        DeviceReading("dram", "dram-0", 12.0, 12.0, "counter", 1.0),
    ]


def scene_view() -> ProcessView:
    return view({"job-a": 0.9, "job-b": 0.3, "job-c": 0.0}, {"job-a": 2 * GIB, "job-b": GIB, "job-c": GIB},
                busy_s=1.5, total_s=4.0, mem_used=8 * GIB)


TICKS = 3
# Per tick, by hand (see above).
GPU_J = {"job-a": 400 * 0.6 + 45.0, "job-b": 400 * 0.2, "job-c": 0.0 + 100.0}
CPU_UNATTRIBUTED_POLICY_J = {"job-a": 80 * 0.9 / 4, "job-b": 80 * 0.3 / 4, "job-c": 0.0}
# "share": idle energy = 80 x (1 - 1.5/4) = 50 J, shared by job CPU time 0.9 : 0.3 : 0.
CPU_SHARE_POLICY_J = {"job-a": 18.0 + 50 * 0.9 / 1.2, "job-b": 6.0 + 50 * 0.3 / 1.2, "job-c": 0.0}
DRAM_J = {"job-a": 12 * 2 / 8, "job-b": 12 * 1 / 8, "job-c": 12 * 1 / 8}
UNATTRIBUTED_GPU_J = 400 * 0.2 + 50.0 + 45.0  # invisible process, empty gpu2, unlabelled process
UNATTRIBUTED_DRAM_J = 12 * 4 / 8  # 4 GiB used by processes in no job
# "unattributed": idle 50 J + the busy CPU time of processes in no job (0.3 of 1.5) x 30 J active.
UNATTRIBUTED_CPU_J = {"unattributed": 50.0 + 30.0 * 0.3 / 1.5, "share": 30.0 * 0.3 / 1.5}


def run_scene(make_engine, idle_policy: str):
    engine, src, tracker, path = make(make_engine, static_book(), idle_policy)
    wall = T0 + 10.0
    for i in range(TICKS):
        src.queue.append(scene_readings())
        tracker.queue.append(scene_view())
        snap = engine.tick_blocking(100.0 + i, wall + i)
    engine.close()
    engine.ledger.close()
    return snap, path, wall + TICKS - 1


@pytest.mark.parametrize("idle_policy", ["unattributed", "share"])
def test_per_job_energy_co2e_and_cost_exactly(make_engine, idle_policy):
    snap, path, last_wall = run_scene(make_engine, idle_policy)
    cpu_j = CPU_UNATTRIBUTED_POLICY_J if idle_policy == "unattributed" else CPU_SHARE_POLICY_J
    reader = LedgerReader(path, pue=PUE, price_per_kwh=PRICE, currency="EUR")
    try:
        by_label = {j.label: j for j in snap.jobs}
        assert set(by_label) == {"job-a", "job-b", "job-c"}
        for ident_ in (A, B, C):
            name = ident_.label
            want = {"gpu": TICKS * GPU_J[name], "cpu": TICKS * cpu_j[name], "dram": TICKS * DRAM_J[name]}
            want_total_j = sum(want.values())
            want_kwh = want_total_j / J_PER_KWH
            want_co2e_g = want_kwh * STATIC_G * PUE
            # The live snapshot (what /metrics exports)...
            got = by_label[name]
            for c in ("gpu", "cpu", "dram"):
                assert got.energy_j[c] == pytest.approx(want[c], rel=1e-9, abs=1e-9), (name, c)
            assert got.co2e_g == pytest.approx(want_co2e_g, rel=1e-9, abs=1e-12), name
            # ...and the store (what the API and reports show), cost included.
            job = reader.job(ident_.job_id, now=last_wall)
            assert job is not None
            for c in ("gpu", "cpu", "dram"):
                assert job["energy_j"][c] == pytest.approx(want[c], rel=1e-9, abs=1e-9), (name, c)
            assert job["energy_kwh"] == pytest.approx(want_kwh, rel=1e-9, abs=1e-15)
            assert job["co2e_g"] == pytest.approx(want_co2e_g, rel=1e-9, abs=1e-12), name
            assert job["cost"]["amount"] == pytest.approx(want_kwh * PUE * PRICE, rel=1e-9, abs=1e-15), name
            series = reader.job_series(ident_.job_id)
            assert sum(b["co2e_g"] for b in series) == pytest.approx(want_co2e_g, rel=1e-9, abs=1e-12)
            assert job["gpu_seconds"] == pytest.approx(TICKS * {"job-a": 2.0, "job-b": 1.0, "job-c": 2.0}[name])
        # Unattributed, each against its own expected value (not device minus jobs)...
        un = snap.unattributed_j_total
        assert un["gpu"] == pytest.approx(TICKS * UNATTRIBUTED_GPU_J, rel=1e-9)
        assert un["cpu"] == pytest.approx(TICKS * UNATTRIBUTED_CPU_J[idle_policy], rel=1e-9)
        assert un["dram"] == pytest.approx(TICKS * UNATTRIBUTED_DRAM_J, rel=1e-9)
        assert snap.counters["gpu_invisible_process_energy_joules_total"] == pytest.approx(TICKS * 80.0, rel=1e-9)
        # ...and conservation as an extra check.
        devices = {c: sum(d.energy_j_total for d in snap.devices if d.kind == c) for c in ("gpu", "cpu", "dram")}
        assert devices == pytest.approx({"gpu": TICKS * 640.0, "cpu": TICKS * 80.0, "dram": TICKS * 12.0})
        for c in devices:
            jobs_j = sum(j.energy_j[c] for j in snap.jobs)
            assert jobs_j + un[c] == pytest.approx(devices[c], rel=1e-9)
    finally:
        reader.close()


def test_idle_floor_goes_by_memory_and_the_rest_by_activity(make_engine):
    """gpu0 empty at 100 W for one tick (the floor is learned), then 400 J with A at 60 %
    SM holding 3 GiB and C memory-only holding 1 GiB: idle 100 J by memory 3:1, the
    active 300 J all to A."""
    engine, src, tracker, path = make(make_engine, static_book())
    src.queue.append([gpu("gpu0", 100.0)])
    tracker.queue.append(scene_view())
    engine.tick_blocking(100.0, T0 + 10)
    for i in range(2):
        src.queue.append([gpu("gpu0", 400.0, [GpuProcessUse(101, 3 * GIB, 60.0), GpuProcessUse(103, GIB, None)])])
        tracker.queue.append(scene_view())
        snap = engine.tick_blocking(101.0 + i, T0 + 11 + i)
    engine.close()
    engine.ledger.close()
    got = {j.label: j.energy_j["gpu"] for j in snap.jobs}
    assert got["job-a"] == pytest.approx(2 * (75.0 + 300.0), rel=1e-9)
    assert got["job-c"] == pytest.approx(2 * 25.0, rel=1e-9)
    assert got["job-b"] == 0.0
    assert snap.unattributed_j_total["gpu"] == pytest.approx(100.0, rel=1e-9)  # the empty interval


def test_co2e_and_cost_follow_the_intensity_of_each_slot(make_engine):
    """A live series: 200 g/kWh for the first half hour, 500 g/kWh for the second (both
    actual). Two ticks in each slot: each tick's energy is weighted by its own slot."""
    book = IntensityBook(GridConfig(), "energidataservice", "DK1")
    t0 = datetime.fromtimestamp(T0, timezone.utc)
    half = datetime.fromtimestamp(T0 + 1800, timezone.utc)
    end = datetime.fromtimestamp(T0 + 3600, timezone.utc)
    book.update([IntensityPoint(t0, half, 200.0, "actual", "DK1", "energidataservice"),
                 IntensityPoint(half, end, 500.0, "actual", "DK1", "energidataservice")], now_s=T0 + 1798)
    engine, src, tracker, path = make(make_engine, book)
    walls = [T0 + 1798, T0 + 1799, T0 + 1800, T0 + 1801]
    for i, wall in enumerate(walls):
        src.queue.append(scene_readings())
        tracker.queue.append(scene_view())
        snap = engine.tick_blocking(100.0 + i, wall)
    engine.close()
    engine.ledger.close()
    reader = LedgerReader(str(path), pue=PUE, price_per_kwh=PRICE)
    try:
        for ident_ in (A, B, C):
            name = ident_.label
            tick_j = GPU_J[name] + CPU_UNATTRIBUTED_POLICY_J[name] + DRAM_J[name]
            want_g = (2 * tick_j * 200.0 + 2 * tick_j * 500.0) / J_PER_KWH * PUE
            [live] = [j for j in snap.jobs if j.label == name]
            assert live.co2e_g == pytest.approx(want_g, rel=1e-9), name
            job = reader.job(ident_.job_id, now=walls[-1])
            assert job is not None
            assert job["co2e_g"] == pytest.approx(want_g, rel=1e-9), name
            assert job["intensity_g_per_kwh_avg"] == pytest.approx(350.0, rel=1e-9)
            assert job["cost"]["amount"] == pytest.approx(4 * tick_j / J_PER_KWH * PUE * PRICE, rel=1e-9)
    finally:
        reader.close()


# -- the process side: CPU seconds and RSS of a real job, as /proc says ---------------------

BURN_AND_HOLD = (
    "import time\n"
    "buf = bytearray(48 << 20)\n"  # 48 MiB resident: pages written, so they count in RSS
    "for i in range(0, len(buf), 4096): buf[i] = 1\n"
    "while True: pass\n"
)


def proc_cpu_ticks_and_rss(pid: int) -> tuple[int, int]:
    """utime + stime (clock ticks) and RSS (bytes) from /proc/<pid>/stat, read by the test."""
    with open(f"/proc/{pid}/stat") as fh:
        rest = fh.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12]), int(rest[21]) * os.sysconf("SC_PAGE_SIZE")


def test_tracker_books_the_cpu_time_and_rss_proc_shows(labelled_process):
    """A real labelled process burning CPU, stopped (SIGSTOP) while the tracker and the
    test read /proc, so both see the same counters: the job's CPU seconds in the
    interval are exactly its utime + stime delta / CLK_TCK, and its RSS exactly its
    resident pages."""
    p = labelled_process(f"numbers-{os.getpid()}", code=BURN_AND_HOLD)
    tracker = ProcessTracker(rescan_interval_s=0)
    clk = os.sysconf("SC_CLK_TCK")
    try:
        time.sleep(0.5)  # imported, buffer touched, burning

        def stopped_observe(mono: float) -> tuple[float, int, int, int]:
            os.kill(p.pid, signal.SIGSTOP)
            deadline = time.monotonic() + 5
            while open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
                assert time.monotonic() < deadline, "process did not stop"
                time.sleep(0.005)
            ticks, rss = proc_cpu_ticks_and_rss(p.pid)
            v = tracker.observe(mono, ())
            [mine] = [j for j in v.jobs if j.identity.root_pid == p.pid]
            os.kill(p.pid, signal.SIGCONT)
            return mine.cpu_s, ticks, rss, mine.rss_bytes

        stopped_observe(1.0)  # baseline (first sight: earlier CPU time is not this interval's)
        time.sleep(0.6)
        cpu_1, ticks_1, rss_1, job_rss_1 = stopped_observe(2.0)
        time.sleep(0.8)
        cpu_2, ticks_2, rss_2, job_rss_2 = stopped_observe(3.0)
    finally:
        labelled_process.end(p)
        tracker.close()
    assert ticks_2 - ticks_1 >= 5, "the burner got almost no CPU: the machine is starved"
    assert cpu_2 == pytest.approx((ticks_2 - ticks_1) / clk, rel=1e-9)
    assert job_rss_2 == rss_2 and rss_2 >= 48 << 20
    assert job_rss_1 == rss_1
