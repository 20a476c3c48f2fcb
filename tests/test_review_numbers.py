"""Review findings (issues 11 and 12): numbers that could be wrong while health said ok.

Each test drives the code with inputs it controls (counter values, shares, a lost GPU)
and checks the energy against the truth those inputs imply. A small fake NVML stands
in for the driver where the behaviour under test needs exact control of the counter.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from wattprint.daemon.attribution import attribute
from wattprint.daemon.model import DeviceReading, GpuProcessUse
from wattprint.daemon.procs import JobIdentity, JobUsage, ProcessView
from wattprint.daemon.sources.base import SourceError
from wattprint.daemon.sources.gpu import NvmlGpuSource

# --- a fake NVML with exact control of the counter ------------------------------------


class FakeGpu:
    def __init__(self, uuid: str, mj: int = 0, watts: float = 100.0, mig_instances: int = 0,
                 counter: bool = True) -> None:
        self.uuid = uuid
        self.mj = mj
        self.watts = watts
        self.lost = False
        self.counter = counter
        self.mig_instances = mig_instances
        self.procs: list[Any] = []


class FakeMig:
    def __init__(self, board: FakeGpu, gi: int) -> None:
        self.board, self.gi = board, gi


class FakeNvml:
    """Just enough NVML: counters, power, MIG of 1-slice instances, loss (GPU_IS_LOST)."""

    reports_host_pids = True

    def __init__(self, gpus: list[FakeGpu]) -> None:
        self.gpus = gpus
        self.initialized = False

    def _check(self, h: Any) -> FakeGpu:
        g = h.board if isinstance(h, FakeMig) else h
        if g.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return g

    def nvmlInit(self) -> None:
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self.initialized = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGpu:
        return self._check(self.gpus[i])

    def nvmlDeviceGetUUID(self, h: Any) -> str:
        return self._check(h).uuid

    def nvmlDeviceGetName(self, h: Any) -> str:
        return "Fake GPU"

    def nvmlDeviceGetMigMode(self, h: Any) -> list[int]:
        g = self._check(h)
        if not g.mig_instances:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return [1, 1]

    def nvmlDeviceGetMaxMigDeviceCount(self, h: Any) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: Any, i: int) -> FakeMig:
        g = self._check(h)
        if i >= g.mig_instances:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return FakeMig(g, i + 1)

    def nvmlDeviceGetGpuInstanceId(self, mh: FakeMig) -> int:
        return mh.gi

    def nvmlDeviceGetAttributes_v2(self, mh: FakeMig) -> Any:
        return SimpleNamespace(gpuInstanceSliceCount=1, memorySizeMB=10_000)

    def nvmlDeviceGetTotalEnergyConsumption(self, h: Any) -> int:
        g = self._check(h)
        if not g.counter:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return g.mj

    def nvmlDeviceGetPowerUsage(self, h: Any) -> int:
        return int(self._check(h).watts * 1000)

    def nvmlDeviceGetMemoryInfo(self, h: Any) -> Any:
        self._check(h)
        return SimpleNamespace(used=1 << 30, total=80 << 30)

    def nvmlDeviceGetComputeRunningProcesses(self, h: Any) -> list[Any]:
        return list(self._check(h).procs)

    def nvmlDeviceGetGraphicsRunningProcesses(self, h: Any) -> list[Any]:
        self._check(h)
        return []

    def nvmlDeviceGetMPSComputeRunningProcesses(self, h: Any) -> list[Any]:
        self._check(h)
        return []

    def nvmlDeviceGetProcessUtilization(self, h: Any, ts: int) -> list[Any]:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(gpus: list[FakeGpu], clock: Clock) -> tuple[NvmlGpuSource, FakeNvml]:
    nvml = FakeNvml(gpus)
    src = NvmlGpuSource(nvml, pid_exists=lambda pid: True, clock=clock, wall_clock=lambda: clock.t,
                        init_retry_s=0.0, pid_namespace_initial=True, driver_gpus_dir=None,
                        run_probe=lambda probe: probe(), reinit_interval_s=0.0, lost_retry_s=1.0)
    return src, nvml


def read(src: NvmlGpuSource, clock: Clock, t: float) -> list[DeviceReading]:
    """One read at ``t``; [] when no GPU could be read (all lost: SourceError)."""
    clock.t = t
    try:
        return list(src.read(t))
    except SourceError:
        return []


# --- MIG: the board's remainder never negative ------------------------------------------


def _negative_rest_delta_mj(instances: int) -> int:
    """A counter step (mJ) whose split over ``instances`` 1-slice instances of 7 leaves
    a remainder below zero in float arithmetic (as the collector splits)."""
    for d in range(1, 1_000_000):
        e = d / 1000.0
        assigned = 0.0
        for _ in range(instances):
            assigned += e * (1 / 7.0)
        if e - assigned < 0:
            return d
    raise AssertionError("no such step")


def test_mig_board_remainder_is_never_negative_and_parts_sum_to_the_board():
    """Seven 1g instances take all 7 slices: the board's own reading must be 0 J, not
    -1e-17 J (a device total that goes down, a negative unattributed point)."""
    delta_mj = _negative_rest_delta_mj(7)
    clock = Clock()
    board = FakeGpu("GPU-mig", mj=1_000_000, mig_instances=7)
    src, _ = make([board], clock)
    read(src, clock, 1000.0)  # baseline
    board.mj += delta_mj
    got = read(src, clock, 1001.0)
    assert len(got) == 8  # 7 instances and the board's remainder
    assert all(r.energy_j >= 0.0 for r in got), [(r.device, r.energy_j) for r in got]
    assert all(r.power_w >= 0.0 for r in got)
    assert sum(r.energy_j for r in got) == pytest.approx(delta_mj / 1000.0, rel=1e-12, abs=0.0)


# --- attribution: rounding never makes unattributed negative ------------------------


def _ident(n: int) -> JobIdentity:
    return JobIdentity(job_id=f"j{n}", label=f"l{n}", label_source="WATTPRINT_JOB", uid=0, user="root",
                       command="python", root_pid=n, started_at=0.0)


def _view(n_jobs: int) -> ProcessView:
    usages = tuple(JobUsage(identity=_ident(n), pids=frozenset({100 + n}), cpu_s=0.0, rss_bytes=0)
                   for n in range(n_jobs))
    return ProcessView(jobs=usages, pid_to_job={100 + n: f"j{n}" for n in range(n_jobs)}, cpu_busy_s=0.0,
                       mem_used_bytes=0, scanned=True)


def test_shares_that_round_above_the_device_leave_unattributed_zero_not_negative():
    """Three jobs with equal memory on a GPU that used 0.007 J: in floats the three
    thirds add up to more than 0.007, so device - jobs was -8.7e-19 (a negative
    unattributed point, a total that decreases). Every figure must be >= 0 and the
    jobs plus unattributed still the device's energy."""
    worst = 0.0
    for d in range(1, 3000):
        energy = d / 1000.0
        procs = [GpuProcessUse(pid=100 + n, used_memory_bytes=1 << 30, sm_util_pct=0.0) for n in range(3)]
        r = DeviceReading("gpu", "gpu0", energy, energy, "counter", 1.0, processes=tuple(procs))
        a = attribute([r], _view(3))
        un = a.unattributed_j["gpu"]
        jobs = [a.job_energy_j[f"j{n}"]["gpu"] for n in range(3)]
        worst = min(worst, un, *jobs)
        assert un >= 0.0 and all(j >= 0.0 for j in jobs), (energy, un, jobs)
        assert sum(jobs) + un == pytest.approx(energy, rel=1e-12, abs=0.0)
    assert worst >= 0.0


# --- a GPU lost and back with its counter restarted -------------------------------------


def test_gpu_back_from_loss_with_a_restarted_counter_books_no_phantom_energy():
    """A GPU at 300 W is lost (Xid 79) for 600 s; it comes back after a reset with its
    counter restarted: it now reads 50 J (energy since the restart). Truth known: at
    most the 50 J since the restart is measured. The collector booked the last
    average power x the whole gap (180 kJ) to the processes found on return."""
    clock = Clock()
    g = FakeGpu("GPU-lost", mj=5_000_000)
    src, _ = make([g], clock)
    read(src, clock, 1000.0)
    g.mj += 300_000  # 300 W for 1 s
    (r,) = read(src, clock, 1001.0)
    assert r.energy_j == pytest.approx(300.0)
    g.lost = True
    assert read(src, clock, 1002.0) == []  # lost: skipped (problem named)
    for t in range(1003, 1601, 10):
        read(src, clock, float(t))
    g.lost = False
    g.mj = 50_000  # restarted at the reset
    g.procs = [SimpleNamespace(pid=4242, usedGpuMemory=1 << 30, gpuInstanceId=None, computeInstanceId=None)]
    t, back_at = 1601.0, None
    booked = 0.0
    while back_at is None or t < back_at + 3:  # until a probe found it back, then 3 more ticks
        got = read(src, clock, t)
        booked += sum(x.energy_j for x in got)
        if got and back_at is None:
            back_at = t
            # when in the gap those 50 J were used, and by whom, is unknown: nobody's
            assert [(x.energy_j, x.attributable) for x in got] == [(50.0, False)]
            assert any("restarted while the GPU was lost" in p for p in src.problems())
        assert t < 2500, "never found back"
        t += 1.0
    # 50 J since the restart, then 0 J per tick (the counter did not move): never 180 kJ.
    assert booked == pytest.approx(50.0, abs=1e-6)


def test_power_only_gpu_back_from_loss_does_not_interpolate_over_the_gap():
    """A board without an energy counter at 100 W is lost for 600 s and comes back at
    100 W: the trapezoid across the gap booked 60 kJ nobody measured."""
    clock = Clock()
    g = FakeGpu("GPU-pwr", counter=False, watts=100.0)
    src, _ = make([g], clock)
    total = 0.0
    for t in (1000.0, 1001.0, 1002.0):
        total += sum(r.energy_j for r in read(src, clock, t))
    assert total == pytest.approx(200.0)
    g.lost = True
    for t in range(1003, 1603, 10):
        read(src, clock, float(t))
    g.lost = False
    t, back_at = 1603.0, None
    after = 0.0
    while back_at is None or t < back_at + 4:  # until a probe found it back, then 3 more seconds
        got = read(src, clock, t)
        after += sum(r.energy_j for r in got)
        if got and back_at is None:
            back_at = t
        assert t < 2500, "never found back"
        t += 1.0
    # at most the measured seconds after the return (3 s x 100 W), never the gap
    assert after == pytest.approx(300.0, abs=1e-6)
    src.close()


# --- settlement never trades a provider's value for the static fallback --------------


def test_settlement_keeps_a_forecast_value_the_book_no_longer_holds(tmp_path, make_engine):
    """A slot booked with a provider forecast (300 g/kWh) is still provisional when
    the book no longer holds that interval (points older than 4 days leave memory; a
    restart loads only the last 4 days). Settlement looked the slot up again, got the
    configured fallback (475 g/kWh, basis "fallback") and rewrote the job's CO2e with
    it: a made-up figure replacing the provider's, health ok."""
    from datetime import datetime, timezone

    from wattprint.daemon.carbon import IntensityBook
    from wattprint.daemon.config import GridConfig
    from wattprint.daemon.grid.base import IntensityPoint
    from wattprint.daemon.ledger import Intensity, JobTick, Ledger

    t0 = 1_795_003_200
    led = Ledger(str(tmp_path / "s.sqlite3"), host="h", bucket_s=3600)
    job = JobIdentity(job_id="50-1", label="old", label_source="WATTPRINT_JOB", uid=1000, user="alice",
                      command="python", root_pid=50, started_at=float(t0))
    forecast = Intensity(300.0, "provisional", "energidataservice", "DK1", "forecast", t0, t0 + 300)
    led.record_tick(t0 + 10, [JobTick(job, {"gpu": 3.6e6}, 1.0, 0, {"gpu": "counter"})],
                    [("gpu", "gpu0", 3.6e6, "counter")], {}, forecast)  # 1 kWh at 300 g/kWh
    assert led.job_co2e_g([job.job_id], pue=1.0)[job.job_id] == pytest.approx(300.0)

    # Five days later: the book holds only recent points (a fetch just arrived).
    now = t0 + 5 * 86400
    book = IntensityBook(GridConfig(), "energidataservice", "DK1")
    book.update([IntensityPoint(start=datetime.fromtimestamp(now - 3600, timezone.utc),
                                end=datetime.fromtimestamp(now, timezone.utc), g_per_kwh=90.0, kind="actual",
                                zone="DK1", provider="energidataservice")], now)
    assert book.lookup(t0 + 150).basis == "fallback"
    engine = make_engine(ledger=led, intensity=book)
    try:
        engine.settle_blocking()
        assert led.job_co2e_g([job.job_id], pue=1.0)[job.job_id] == pytest.approx(300.0)
        [row] = led.bucket_intensities(("provisional", "final"))
        assert (row["g_per_kwh"], row["basis"]) == (300.0, "forecast")
    finally:
        engine.close()


# --- energy is booked whatever a side query does -----------------------------------


def test_a_malformed_process_entry_loses_no_energy_of_any_gpu():
    """gpu1's process list carries an entry whose pid is not a number (a scrambled or
    foreign struct). The energy of both GPUs was already read (counters advanced) when
    the ValueError escaped read(): the whole tick's GPU energy was lost. It must be
    booked (gpu1's unattributed, problem named), gpu0's as usual."""
    clock = Clock()
    g0, g1 = FakeGpu("GPU-a", mj=0), FakeGpu("GPU-b", mj=0)
    src, _ = make([g0, g1], clock)
    read(src, clock, 1000.0)
    g1.procs = [SimpleNamespace(pid="garbage", usedGpuMemory=1 << 20, gpuInstanceId=None, computeInstanceId=None)]
    booked = {"gpu0": 0.0, "gpu1": 0.0}
    for k in range(1, 4):
        g0.mj += 200_000
        g1.mj += 300_000
        for r in read(src, clock, 1000.0 + k):
            booked[r.device] += r.energy_j
            if r.device == "gpu1":
                assert not r.attributable
        assert any("gpu1" in p for p in src.problems())
    assert booked == pytest.approx({"gpu0": 600.0, "gpu1": 900.0})


def test_a_gpu_lost_at_start_is_measured_once_it_is_back():
    """The only GPU is lost when NVML enumerates (its handle answers GPU_IS_LOST): it
    is kept as a placeholder and probed. The probe finds it back under its real UUID,
    which asks for a re-init, but the re-init ran only at the end of a read with at
    least one usable GPU: with none, the GPU stayed lost for good (health degraded
    forever, no energy)."""
    clock = Clock()
    g = FakeGpu("GPU-late", mj=1_000_000)
    g.lost = True
    src, _ = make([g], clock)
    assert read(src, clock, 1000.0) == []
    assert any("lost" in p.lower() for p in src.problems())
    g.lost = False
    t, got = 1001.0, []
    while not got and t < 1400.0:
        got = read(src, clock, t)
        t += 1.0
    assert got, "the GPU never came back"
    g.mj += 250_000
    (r,) = read(src, clock, t)
    assert r.energy_j == pytest.approx(250.0) and src.problems() == []
