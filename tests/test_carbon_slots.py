"""Carbon arithmetic per provider interval ("slot"): a bucket's CO2e is the sum of
energy x intensity over the provider intervals its energy fell in, the same at write
time, after settlement and across a restart.

The engine runs in-process (Engine + Ledger + IntensityBook, simulated GPUs on a
simulated clock, real labelled processes) with ledger buckets of an hour and an
Energi-Data-Service-like series of 5-minute values that differ strongly; every
expected figure is computed here from the simulated power x time of each tick and
the values this test put in the book. Also: the ledger's schema-2 migration and its
legacy reading, retention of the slot tables, and the InfluxDB job_co2e point.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone

import pytest

from gpusim import gpu, proc, write_sim
from wattprint.daemon.carbon import FALLBACK_SLOT_S, IntensityBook
from wattprint.daemon.config import GridConfig
from wattprint.daemon.grid.base import IntensityPoint
from wattprint.daemon.ledger import SCHEMA_VERSION, Intensity, JobTick, Ledger, LedgerReader
from wattprint.daemon.model import SettledBucket, TickRecord
from wattprint.daemon.procs import JobIdentity
from wattprint.daemon.sources.gpu import NvmlGpuSource
from wattprint.daemon.sources.nvml_sim import SimulatedNvml

J_PER_KWH = 3.6e6
T0 = 1_795_003_200  # an hour boundary (the bucket), so slot k is [T0 + 300k, T0 + 300k + 300)
STEP = 300
BUCKET_S = 3600
DT = 10.0  # simulated seconds per tick
PUE = 1.5
P_A, P_B = 200.0, 360.0  # W: job A on gpu0, job B on gpu1
# Forecast and realised values per 5-minute slot of the hour; every other slot (the
# bucket's middle included) has a very different value, so using any single instant
# for the whole bucket, or the bucket's middle at settlement, shows.
FORECAST = {0: 100.0, 1: 300.0}
ACTUAL = {0: 80.0, 1: 360.0}
OTHER_FORECAST, OTHER_ACTUAL = 500.0, 700.0


def points(values: dict[int, float], other: float, kind: str, slots: int = 24) -> list[IntensityPoint]:
    return [IntensityPoint(start=datetime.fromtimestamp(T0 + STEP * k, timezone.utc),
                           end=datetime.fromtimestamp(T0 + STEP * (k + 1), timezone.utc),
                           g_per_kwh=values.get(k, other), kind=kind, zone="DK1",  # type: ignore[arg-type]
                           provider="energidataservice")
            for k in range(slots)]


def slot_of(wall: float) -> int:
    return int((wall - T0) // STEP)


class Run:
    """One engine over the simulated GPUs; records what the test controls per tick."""

    def __init__(self, make_engine, tmp_path, book: IntensityBook, a_pid: int, b_pid: int, clock: dict):
        self.sim = tmp_path / "sim.json"
        self.clock = clock
        self.a_pid, self.b_pid = a_pid, b_pid
        self.records: list[TickRecord] = []
        self.settled: list[list[SettledBucket]] = []
        self.write(a_on=True)
        # conftest's make_engine: the store tmp_path/store.sqlite3 (a restart finds it again)
        self.engine = make_engine(sources=[NvmlGpuSource(SimulatedNvml(str(self.sim), clock=lambda: clock["mono"]))],
                                  store="store.sqlite3", bucket_s=BUCKET_S, intensity=book, pue=PUE)
        self.ledger = self.engine.ledger
        self.engine.sinks.append(self.records.append)
        self.engine.settle_sinks.append(self.settled.append)
        self.first = True

    def write(self, a_on: bool) -> None:
        write_sim(self.sim, [gpu(0, power_w=P_A, processes=[proc(self.a_pid, sm_util=90)] if a_on else []),
                             gpu(1, power_w=P_B, processes=[proc(self.b_pid, sm_util=90)])])

    def tick(self, wall: float, a_on: bool, truth: dict[str, dict[int, float]]) -> None:
        """One tick at ``wall``; adds each job's energy of this tick to ``truth``
        (job -> slot -> J): power x the simulated interval, nothing at a source's
        first read (its baseline)."""
        self.write(a_on)
        self.clock["wall"] = wall
        if not self.first:
            self.clock["mono"] += DT
            slot = slot_of(wall)
            if a_on:
                truth["A"][slot] = truth["A"].get(slot, 0.0) + P_A * DT
            truth["B"][slot] = truth["B"].get(slot, 0.0) + P_B * DT
        self.first = False
        self.engine.tick_blocking(self.clock["mono"], wall)

    def job_id(self, label: str) -> str:
        return next(j.job_id for j in self.engine.snapshot.jobs if j.label == label)

    def in_memory_co2e(self, label: str) -> float:
        return next(j.co2e_g for j in self.engine.snapshot.jobs if j.label == label)


def grams(slot_j: dict[int, float], values: dict[int, float], other: float) -> float:
    """The truth: Σ energy x the value of its slot, x PUE."""
    return sum(j / J_PER_KWH * values.get(slot, other) for slot, j in slot_j.items()) * PUE


def mean(slot_j: dict[int, float], values: dict[int, float], other: float) -> float:
    return sum(j * values.get(s, other) for s, j in slot_j.items()) / sum(slot_j.values())


@pytest.fixture
def jobs(labelled_process):
    return labelled_process("slot-a"), labelled_process("slot-b")


def test_each_tick_is_booked_at_its_slot_value_at_write_time_and_after_settlement(tmp_path, jobs, make_engine):
    a, b = jobs
    book = IntensityBook(GridConfig(), "energidataservice", "DK1")
    book.update(points(FORECAST, OTHER_FORECAST, "forecast"), T0)
    run = Run(make_engine, tmp_path, book, a.pid, b.pid, {"mono": 1000.0, "wall": T0})
    truth: dict[str, dict[int, float]] = {"A": {}, "B": {}}
    try:
        for k in range(60):  # ten minutes: slots 0 and 1 of the hour
            wall = T0 + 5 + DT * k
            run.tick(wall, a_on=slot_of(wall) == 0, truth=truth)  # A uses the GPU in slot 0 only
        assert set(truth["A"]) == {0} and set(truth["B"]) == {0, 1}
        ids = {"A": run.job_id("slot-a"), "B": run.job_id("slot-b")}
        reader = LedgerReader(str(tmp_path / "store.sqlite3"), pue=PUE)

        # Write time: forecast values, slot by slot.
        for name, label in (("A", "slot-a"), ("B", "slot-b")):
            expected = grams(truth[name], FORECAST, OTHER_FORECAST)
            job = reader.job(ids[name], now=T0 + 600)
            assert job["energy_j"]["gpu"] == pytest.approx(sum(truth[name].values()), rel=1e-9)
            assert job["co2e_g"] == pytest.approx(expected, rel=1e-9), name
            assert job["co2e_status"] == "provisional"
            assert run.in_memory_co2e(label) == pytest.approx(expected, rel=1e-9), name
            assert run.records[-1].bucket_co2e_g[ids[name]] == pytest.approx(expected, rel=1e-9), name
            [bucket] = reader.job_series(ids[name])
            assert bucket["start"] == T0 and bucket["co2e_g"] == pytest.approx(expected, rel=1e-9)
            assert bucket["g_per_kwh"] == pytest.approx(mean(truth[name], FORECAST, OTHER_FORECAST), rel=1e-9)
            assert bucket["intensity_status"] == "provisional" and bucket["intensity_basis"] == "forecast"
        assert grams(truth["A"], FORECAST, OTHER_FORECAST) == pytest.approx(58_000 / J_PER_KWH * 100.0 * PUE)
        assert run.records[-1].bucket_g_per_kwh[ids["B"]] == pytest.approx(mean(truth["B"], FORECAST, OTHER_FORECAST))

        # Realised values arrive: settlement recomputes Σ energy x value per slot.
        book.update(points(ACTUAL, OTHER_ACTUAL, "actual"), T0 + 600)
        assert run.engine.settle_blocking() == 1  # one bucket changed
        [settled] = run.settled
        by_job = {s.job.job_id: s for s in settled}
        for name, label in (("A", "slot-a"), ("B", "slot-b")):
            expected = grams(truth[name], ACTUAL, OTHER_ACTUAL)
            job = reader.job(ids[name], now=T0 + 600)
            assert job["co2e_g"] == pytest.approx(expected, rel=1e-9), name
            assert job["co2e_status"] == "final"
            assert by_job[ids[name]].co2e_g == pytest.approx(expected, rel=1e-9), name
            assert by_job[ids[name]].g_per_kwh == pytest.approx(mean(truth[name], ACTUAL, OTHER_ACTUAL), rel=1e-9)
            assert by_job[ids[name]].status == "final"
            [bucket] = reader.job_series(ids[name])
            assert bucket["co2e_g"] == pytest.approx(expected, rel=1e-9)
            assert bucket["intensity_status"] == "final" and bucket["intensity_basis"] == "actual"
        assert run.engine.settle_blocking() == 0  # nothing left to settle

        # The next tick (still slot 1) continues from the settled values.
        run.tick(T0 + 5 + DT * 60, a_on=False, truth=truth)
        expected_b = grams(truth["B"], ACTUAL, OTHER_ACTUAL)
        assert run.in_memory_co2e("slot-a") == pytest.approx(grams(truth["A"], ACTUAL, OTHER_ACTUAL), rel=1e-9)
        assert run.in_memory_co2e("slot-b") == pytest.approx(expected_b, rel=1e-9)
        assert run.records[-1].bucket_co2e_g[ids["B"]] == pytest.approx(expected_b, rel=1e-9)
        assert run.records[-1].bucket_intensity_status[ids["B"]] == "final"
        assert reader.job(ids["B"], now=T0 + 700)["co2e_g"] == pytest.approx(expected_b, rel=1e-9)
        reader.close()
    finally:
        run.engine.close()


def test_settlement_with_unchanged_values_gives_the_write_time_figure(tmp_path, jobs, make_engine):
    a, b = jobs
    book = IntensityBook(GridConfig(), "energidataservice", "DK1")
    book.update(points(FORECAST, OTHER_FORECAST, "forecast"), T0)
    run = Run(make_engine, tmp_path, book, a.pid, b.pid, {"mono": 1000.0, "wall": T0})
    truth: dict[str, dict[int, float]] = {"A": {}, "B": {}}
    try:
        for k in range(45):  # slots 0 and 1 (B spans them)
            run.tick(T0 + 150 + DT * k, a_on=True, truth=truth)
        job_id = run.job_id("slot-b")
        reader = LedgerReader(str(tmp_path / "store.sqlite3"), pue=PUE)
        written = reader.job(job_id, now=T0 + 700)["co2e_g"]
        assert written == pytest.approx(grams(truth["B"], FORECAST, OTHER_FORECAST), rel=1e-9)
        # The realised values are the forecast's: status and basis change, the figure does not.
        book.update(points(FORECAST, OTHER_FORECAST, "actual"), T0 + 700)
        assert run.engine.settle_blocking() == 1
        after = reader.job(job_id, now=T0 + 700)
        assert after["co2e_status"] == "final"
        assert after["co2e_g"] == pytest.approx(written, rel=1e-12)
        assert {s.job.job_id: s.co2e_g for s in run.settled[0]}[job_id] == pytest.approx(written, rel=1e-12)
        assert run.engine.book.jobs[job_id].co2e_g == pytest.approx(written, rel=1e-12)
        reader.close()
    finally:
        run.engine.close()


def test_restart_inside_a_bucket_keeps_the_earlier_slots(tmp_path, jobs, make_engine):
    """The daemon stops in slot 0 and starts again in slot 1 of the same bucket: the
    bucket's earlier energy keeps its slot's value; both runs add up, before and
    after settlement."""
    a, b = jobs
    book = IntensityBook(GridConfig(), "energidataservice", "DK1")
    book.update(points(FORECAST, OTHER_FORECAST, "forecast"), T0)
    clock = {"mono": 1000.0, "wall": T0}
    truth: dict[str, dict[int, float]] = {"A": {}, "B": {}}
    run = Run(make_engine, tmp_path, book, a.pid, b.pid, clock)
    try:
        for k in range(20):  # slot 0
            run.tick(T0 + 60 + DT * k, a_on=True, truth=truth)
    finally:
        run.engine.close()
    assert set(truth["B"]) == {0}

    # the same store; a new source: its first read is a baseline
    run = Run(make_engine, tmp_path, book, a.pid, b.pid, clock)
    reader = LedgerReader(str(tmp_path / "store.sqlite3"), pue=PUE)
    running = run.ledger.running_jobs()
    run.engine.restore(running, {j["id"]: j["co2e_g"] for j in reader.jobs(state="running", now=0.0)})
    try:
        for k in range(20):  # slot 1, same bucket
            run.tick(T0 + 400 + DT * k, a_on=True, truth=truth)
        assert set(truth["B"]) == {0, 1}
        job_id = run.job_id("slot-b")
        expected = grams(truth["B"], FORECAST, OTHER_FORECAST)
        assert reader.job(job_id, now=T0 + 700)["co2e_g"] == pytest.approx(expected, rel=1e-9)
        assert run.in_memory_co2e("slot-b") == pytest.approx(expected, rel=1e-9)
        # The job_co2e point of the bucket includes the previous run's slot-0 energy.
        assert run.records[-1].bucket_co2e_g[job_id] == pytest.approx(expected, rel=1e-9)
        book.update(points(ACTUAL, OTHER_ACTUAL, "actual"), T0 + 700)
        assert run.engine.settle_blocking() == 1
        settled = grams(truth["B"], ACTUAL, OTHER_ACTUAL)
        assert reader.job(job_id, now=T0 + 700)["co2e_g"] == pytest.approx(settled, rel=1e-9)
        run.tick(T0 + 400 + DT * 20, a_on=True, truth=truth)  # the snapshot follows at the next tick
        settled = grams(truth["B"], ACTUAL, OTHER_ACTUAL)
        assert run.in_memory_co2e("slot-b") == pytest.approx(settled, rel=1e-9)
        assert run.records[-1].bucket_co2e_g[job_id] == pytest.approx(settled, rel=1e-9)
        reader.close()
    finally:
        run.engine.close()


def test_lookup_names_the_provider_interval_and_a_fallback_grid():
    book = IntensityBook(GridConfig(static_g_per_kwh=250.0), "energidataservice", "DK1")
    nothing = book.lookup(T0 + 1234.5)  # no series yet: the fallback value on the 5-minute grid
    assert (nothing.g_per_kwh, nothing.basis, nothing.status) == (250.0, "fallback", "provisional")
    assert (nothing.start, nothing.end) == (T0 + 1200, T0 + 1200 + FALLBACK_SLOT_S)
    book.update(points(FORECAST, OTHER_FORECAST, "forecast", slots=2), T0)
    covered = book.lookup(T0 + 301)
    assert (covered.g_per_kwh, covered.start, covered.end, covered.basis) == (300.0, T0 + 300, T0 + 600, "forecast")
    stand_in = book.lookup(T0 + 1234.5)  # past the series: the last value, on its grid
    assert (stand_in.g_per_kwh, stand_in.basis, stand_in.start, stand_in.end) == (300.0, "latest", T0 + 1200, T0 + 1500)
    static = IntensityBook(GridConfig(), "static", "DK", static_g_per_kwh=120.0).lookup(T0)
    assert (static.start, static.end, static.status) == (None, None, "final")  # holds for a whole bucket


# -- the ledger alone ---------------------------------------------------------------

def ident(name: str, pid: int) -> JobIdentity:
    return JobIdentity(job_id=f"{pid}-1", label=name, label_source="WATTPRINT_JOB", uid=1000, user="alice",
                       command="python", root_pid=pid, started_at=float(T0))


def value(g: float, slot: int, status: str = "provisional", basis: str = "forecast") -> Intensity:
    return Intensity(g, status, "energidataservice", "DK1", basis, T0 + STEP * slot, T0 + STEP * (slot + 1))


def book_tick(led: Ledger, wall: float, job: JobIdentity, gpu_j: float, intensity: Intensity | None) -> None:
    led.record_tick(wall, [JobTick(job, {"gpu": gpu_j, "cpu": 1.0}, 1.0, 0, {"gpu": "counter"})],
                    [("gpu", "gpu0", gpu_j, "counter"), ("cpu", "pkg", 1.0, "counter")], {}, intensity)


def test_prune_folds_the_slot_weighted_co2e_and_deletes_slot_rows(tmp_path):
    path = str(tmp_path / "s.sqlite3")
    led = Ledger(path, host="h", bucket_s=BUCKET_S)
    job = ident("long", 50)
    for hour in range(3):  # per hour: 10 ticks in slot 0 at 100 g/kWh, 10 in slot 1 at 300
        for i in range(20):
            slot = 0 if i < 10 else 1
            g = 100.0 if slot == 0 else 300.0
            iv = Intensity(g, "final", "energidataservice", "DK1", "actual",
                           T0 + 3600 * hour + STEP * slot, T0 + 3600 * hour + STEP * (slot + 1))
            book_tick(led, T0 + 3600 * hour + STEP * slot + 10 * (i % 10), job, 99.0, iv)
    truth_g = 3 * (10 * 100.0 / J_PER_KWH * 100.0 + 10 * 100.0 / J_PER_KWH * 300.0)
    reader = LedgerReader(path)
    assert reader.job(job.job_id, now=T0 + 4 * 3600)["co2e_g"] == pytest.approx(truth_g, rel=1e-12)
    assert led.conn.execute("SELECT COUNT(*) FROM job_slots").fetchone()[0] == 6
    deleted = led.prune(T0 + 3600 + 17)  # the first hour goes
    assert deleted["job_slots"] == 2 and deleted["bucket_intensity"] == 2 and deleted["job_buckets"] == 2
    assert reader.job(job.job_id, now=T0 + 4 * 3600)["co2e_g"] == pytest.approx(truth_g, rel=1e-12)
    assert led.job_co2e_g([job.job_id], pue=1.0)[job.job_id] == pytest.approx(truth_g, rel=1e-12)
    assert sum(led.prune(T0 + 3600 + 17).values()) == 0
    reader.close()
    led.close()


def downgrade_to_schema_2(path: str) -> None:
    """Make the store what wattprint with schema 2 wrote: one intensity per bucket, no job_slots."""
    conn = sqlite3.connect(path)
    conn.executescript("""
        DROP TABLE job_slots;
        CREATE TABLE bi2 (bucket_start INTEGER PRIMARY KEY, g_per_kwh REAL NOT NULL, status TEXT NOT NULL,
                          provider TEXT NOT NULL, zone TEXT NOT NULL, basis TEXT NOT NULL);
        INSERT INTO bi2 SELECT bucket_start, g_per_kwh, status, provider, zone, basis FROM bucket_intensity;
        DROP TABLE bucket_intensity;
        ALTER TABLE bi2 RENAME TO bucket_intensity;
        UPDATE meta SET value = '2' WHERE key = 'schema_version';
    """)
    conn.commit()
    conn.close()


def test_schema_2_store_is_read_as_it_is_and_migrated_with_the_same_co2e(tmp_path):
    path = str(tmp_path / "s.sqlite3")
    led = Ledger(path, host="h", bucket_s=60)
    job = ident("old", 60)
    for i in range(3):  # three one-minute buckets, one value each (as schema 2 had)
        book_tick(led, T0 + 60 * i, job, 359.0, Intensity(100.0 * (i + 1), "provisional", "energidataservice",
                                                           "DK1", "forecast"))
    led.close()
    downgrade_to_schema_2(path)
    truth = sum(360.0 / J_PER_KWH * 100.0 * (i + 1) for i in range(3))

    reader = LedgerReader(path)  # not migrated yet (a CLI before the daemon restarted)
    assert reader.job(job.job_id, now=T0 + 300)["co2e_g"] == pytest.approx(truth, rel=1e-12)
    assert [b["g_per_kwh"] for b in reader.job_series(job.job_id)] == [100.0, 200.0, 300.0]
    led = Ledger(path, host="h", bucket_s=60)  # the daemon migrates it in place
    assert led.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    assert reader.job(job.job_id, now=T0 + 300)["co2e_g"] == pytest.approx(truth, rel=1e-12)
    assert [(b["g_per_kwh"], b["co2e_g"]) for b in reader.job_series(job.job_id)] == \
        [(pytest.approx(100.0 * (i + 1)), pytest.approx(360.0 / J_PER_KWH * 100.0 * (i + 1))) for i in range(3)]
    # Settlement of a migrated bucket: its one slot spans the bucket.
    led.set_intensities([(T0, T0, Intensity(50.0, "final", "energidataservice", "DK1", "actual"))])
    assert reader.job(job.job_id, now=T0 + 300)["co2e_g"] == pytest.approx(truth - 360.0 / J_PER_KWH * 50.0,
                                                                           rel=1e-12)
    assert led.conn.execute("SELECT slot_end FROM bucket_intensity WHERE bucket_start=?", (T0,)).fetchone()[0] \
        == T0 + 60
    reader.close()
    led.close()


def test_series_of_a_bucket_with_several_slots(tmp_path):
    path = str(tmp_path / "s.sqlite3")
    led = Ledger(path, host="h", bucket_s=BUCKET_S)
    job = ident("mixed", 70)
    book_tick(led, T0 + 10, job, 719.0, value(100.0, 0, "final", "actual"))  # 720 J at 100
    book_tick(led, T0 + 310, job, 359.0, value(400.0, 1))  # 360 J at a 400 forecast
    book_tick(led, T0 + 320, job, 359.0, value(999.0, 1))  # same slot: its first value stays
    reader = LedgerReader(path, pue=1.2)
    [b] = reader.job_series(job.job_id)
    assert b["energy_j"]["total"] == pytest.approx(1440.0)
    assert b["co2e_g"] == pytest.approx((720 * 100.0 + 720 * 400.0) / J_PER_KWH * 1.2)
    assert b["g_per_kwh"] == pytest.approx(250.0)  # energy-weighted mean
    assert (b["intensity_status"], b["intensity_basis"]) == ("provisional", "forecast")  # the least sure slot
    assert (b["intensity_provider"], b["intensity_zone"]) == ("energidataservice", "DK1")
    assert reader.job(job.job_id, now=T0 + 400)["co2e_g"] == pytest.approx(b["co2e_g"])
    rows = led.bucket_job_energy([T0])
    assert [(r["gj"], r["g_per_kwh"], r["status"]) for r in rows] == \
        [(pytest.approx((720 * 100.0 + 720 * 400.0) / J_PER_KWH), pytest.approx(250.0), "provisional")]
    reader.close()
    led.close()


def test_influx_job_co2e_point_uses_the_bucket_mean():
    from wattprint.daemon.model import JobRef
    from wattprint.exporters.influx_publish import InfluxPublisher

    class Sink:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def submit(self, lines):
            self.lines.extend(lines)

    sink = Sink()
    pub = InfluxPublisher(sink, "h")  # type: ignore[arg-type]
    pub.on_tick(TickRecord(sampled_at=T0 + 400.0, interval_s=1.0, readings=(), jobs={"j": JobRef("j", "l", "u", 1)},
                           job_energy_j={}, unattributed_j={}, bucket_start=T0, bucket_co2e_g={"j": 12.5},
                           g_per_kwh=300.0, intensity_status="final",
                           bucket_g_per_kwh={"j": 250.0}, bucket_intensity_status={"j": "provisional"}))
    [line] = [ln for ln in sink.lines if ln.startswith("job_co2e")]
    assert "grams=12.5" in line and "g_per_kwh=250" in line and 'status="provisional"' in line
    assert line.endswith(str(T0 * 10**9))
