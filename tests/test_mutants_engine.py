"""The engine's job book (daemon/engine.py) in the cases mutation testing found
unguarded (issue 13, scripts/mutation.sh): a job continued after a restart that is
not found again ends when it was last seen; a failing read of the bucket's slot
values does not stop the tick; settlement skips a slot whose new value is less sure
and still settles the slots after it, names the job in what it hands the settle
sinks, keeps the CO2e of a job the store does not know, and says what it did.
Engine + Ledger are real; readings and process views are the test's (fakes from
tests/test_job_numbers.py), and every expected number is computed here."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pytest

from test_job_numbers import FakeSource, FakeTracker
from wattprint.daemon.carbon import IntensityBook
from wattprint.daemon.config import GridConfig
from wattprint.daemon.engine import Engine
from wattprint.daemon.grid.base import IntensityPoint
from wattprint.daemon.ledger import LedgerReader
from wattprint.daemon.model import DeviceReading, DeviceState, GpuProcessUse, JobRef, SettledBucket, TickRecord
from wattprint.daemon.procs import JobIdentity, JobUsage, ProcessView

J_PER_KWH = 3.6e6
T0 = 1_795_000_000.0  # the hour bucket holding it starts at BUCKET; T0 + 300 k are slot bounds
BUCKET = int(T0 - T0 % 3600)
PUE = 1.5
A = JobIdentity(job_id="201-1", label="job-a", label_source="WATTPRINT_JOB", uid=1000, user="ann",
                command="python", root_pid=201, started_at=T0 - 50.0, label_raw="job-a")
R = JobIdentity(job_id="202-1", label="job-r", label_source="WATTPRINT_JOB", uid=1001, user="rob",
                command="python", root_pid=202, started_at=T0 - 50.0, label_raw="job-r")


def reading(joules: float, pids: list[int]) -> DeviceReading:
    return DeviceReading("gpu", "gpu0", joules, joules, "counter", 1.0,
                         tuple(GpuProcessUse(p, 1 << 30, 50) for p in pids))


def view(*idents: JobIdentity) -> ProcessView:
    return ProcessView(jobs=tuple(JobUsage(identity=i, pids=frozenset({i.root_pid}), cpu_s=0.0, rss_bytes=0)
                                  for i in idents),
                       pid_to_job={i.root_pid: i.job_id for i in idents}, cpu_busy_s=0.0, mem_used_bytes=0,
                       scanned=True)


def engine_on(make_engine, book: IntensityBook) -> tuple[Engine, FakeSource, FakeTracker]:
    """An engine over the fakes and the store tmp_path/s.sqlite3 (conftest's make_engine;
    a second one, after a restart, finds the same store)."""
    src, tracker = FakeSource(), FakeTracker()
    engine = make_engine(sources=[src], tracker=tracker, bucket_s=3600, intensity=book, pue=PUE, finished_grace_s=1e9)
    return engine, src, tracker


def tick(engine: Engine, src: FakeSource, tracker: FakeTracker, wall: float, joules: float,
         *idents: JobIdentity):
    src.queue.append([reading(joules, [i.root_pid for i in idents])])
    tracker.queue.append(view(*idents))
    return engine.tick_blocking(wall - T0, wall)


def point(k: int, g: float, kind: str) -> IntensityPoint:
    return IntensityPoint(datetime.fromtimestamp(T0 + 300 * k, timezone.utc),
                          datetime.fromtimestamp(T0 + 300 * (k + 1), timezone.utc), g, kind, "DK1",  # type: ignore[arg-type]
                          "energidataservice")


def test_restored_job_not_found_again_ends_when_last_seen(tmp_path, make_engine):
    path = str(tmp_path / "s.sqlite3")
    book = IntensityBook(GridConfig(), "static", "static", 400.0)
    engine, src, tracker = engine_on(make_engine, book)
    tick(engine, src, tracker, T0 + 10.0, 100.0, A, R)
    tick(engine, src, tracker, T0 + 11.0, 100.0, A, R)
    engine.close()
    engine.ledger.close()

    # The next daemon run: both jobs were running; R's process is gone.
    engine, src, tracker = engine_on(make_engine, book)
    running = engine.ledger.running_jobs()
    engine.restore(running, {A.job_id: 1.0})  # R has no CO2e figure: it starts at 0 g
    snap = tick(engine, src, tracker, T0 + 500.0, 100.0, A)
    engine.close()
    engine.ledger.close()
    by_id = {j.job_id: j for j in snap.jobs}
    # the restored identity names the jobs in the snapshot
    assert [(by_id[i.job_id].label, by_id[i.job_id].user, by_id[i.job_id].uid) for i in (A, R)] == [
        ("job-a", "ann", 1000), ("job-r", "rob", 1001)]
    assert by_id[R.job_id].state == "finished"
    assert by_id[R.job_id].co2e_g == 0.0  # restored without a figure, nothing added
    # A: restored 1.0 g + this tick's 100 J (sole process) x 400 g/kWh x PUE
    assert by_id[A.job_id].co2e_g == pytest.approx(1.0 + 100.0 / J_PER_KWH * 400.0 * PUE, rel=1e-12)
    reader = LedgerReader(path)
    try:
        assert reader.job(R.job_id, now=T0 + 600.0)["ended_at"] == T0 + 11.0  # last seen, not the restart
    finally:
        reader.close()


def test_tick_goes_on_when_the_bucket_values_cannot_be_read(caplog, make_engine):
    engine, src, tracker = engine_on(make_engine, IntensityBook(GridConfig(), "static", "static", 400.0))

    def failing(bucket_start: int):
        raise OSError("disk I/O error")

    engine.ledger.slot_intensities = failing  # type: ignore[method-assign]
    engine.ledger.job_slot_energy_j = lambda job_id, bucket: failing(bucket)  # type: ignore[method-assign]
    with caplog.at_level(logging.DEBUG, logger="wattprint.engine"):
        snap = tick(engine, src, tracker, T0 + 10.0, 360.0, A)
    for message in ("reading the bucket's slot intensities failed", "reading a job's bucket failed"):
        [failed] = [r for r in caplog.records if r.getMessage() == message]
        assert failed.exc_info is not None and isinstance(failed.exc_info[1], OSError)  # the cause, in the debug log
    engine.close()
    engine.ledger.close()
    [a] = snap.jobs
    assert a.co2e_g == pytest.approx(360.0 / J_PER_KWH * 400.0 * PUE, rel=1e-12)
    assert (snap.grid_provider, snap.grid_zone, snap.grid_g_per_kwh) == ("static", "static", 400.0)
    assert snap.counters["tick_errors_total"] == 0.0


def test_settlement_skips_a_less_sure_value_and_settles_the_rest(caplog, make_engine):
    book = IntensityBook(GridConfig(static_g_per_kwh=250.0), "energidataservice", "DK1")
    book.update([point(0, 100.0, "forecast"), point(1, 200.0, "forecast"), point(2, 300.0, "forecast")], now_s=T0)
    engine, src, tracker = engine_on(make_engine, book)
    settled: list[list[SettledBucket]] = []
    engine.settle_sinks.append(settled.append)
    records: list[TickRecord] = []
    engine.sinks.append(records.append)
    tick(engine, src, tracker, T0 + 10.0, 1000.0, A)   # slot 0, forecast 100
    tick(engine, src, tracker, T0 + 310.0, 3000.0, A)  # slot 1, forecast 200
    tick(engine, src, tracker, T0 + 610.0, 2000.0, A)  # slot 2, forecast 300
    # Before settlement: the bucket so far, from three forecast (provisional) slot values.
    forecast_gj = 1000.0 * 100.0 + 3000.0 * 200.0 + 2000.0 * 300.0
    assert records[-1].bucket_co2e_g == {A.job_id: pytest.approx(forecast_gj / J_PER_KWH * PUE, rel=1e-12)}
    assert records[-1].bucket_g_per_kwh == {A.job_id: pytest.approx(forecast_gj / 6000.0, rel=1e-12)}
    assert records[-1].bucket_intensity_status == {A.job_id: "provisional"}
    assert (records[-1].g_per_kwh, records[-1].intensity_status) == (300.0, "provisional")
    # A job the store does not know (restored from elsewhere): settlement keeps its CO2e.
    engine.restore({R.job_id: {"label": R.label, "label_source": R.label_source, "uid": R.uid, "user": R.user,
                               "command": R.command, "root_pid": R.root_pid, "started_at": R.started_at,
                               "label_raw": R.label_raw, "last_seen": T0 + 5.0,
                               "gpu_j": 0.0, "cpu_j": 0.0, "dram_j": 0.0}}, {R.job_id: 7.0})

    # The new book holds slot 1 (realised 150) and slot 2 (a revised forecast, 320: as
    # sure as what was booked, a new value) but no longer slot 0: slot 0's lookup is the
    # fallback, less sure than its booked forecast, so it is kept; slots 1 and 2 settle.
    engine.intensity = IntensityBook(GridConfig(static_g_per_kwh=250.0), "energidataservice", "DK1")
    engine.intensity.update([point(1, 150.0, "actual"), point(2, 320.0, "forecast")], now_s=T0 + 400.0)
    with caplog.at_level(logging.INFO, logger="wattprint.engine"):
        assert engine.settle_blocking() == 1
    assert "settled 1 bucket(s) (2 provider interval value(s)) with new grid intensity" in caplog.messages

    gj = 1000.0 * 100.0 + 3000.0 * 150.0 + 2000.0 * 320.0
    want_g = gj / J_PER_KWH * PUE
    # (no [market] config: the market-based figure is the location-based one, settled with it)
    assert settled == [[SettledBucket(job=settled[0][0].job, bucket_start=BUCKET, co2e_g=pytest.approx(want_g),
                                      g_per_kwh=pytest.approx(gj / 6000.0), status="provisional",
                                      co2e_market_g=pytest.approx(want_g))]]
    job = settled[0][0].job
    assert (job.job_id, job.label, job.user, job.uid) == (A.job_id, "job-a", "ann", 1000)
    snap = tick(engine, src, tracker, T0 + 620.0, 0.0, A)
    engine.close()
    engine.ledger.close()
    by_id = {j.job_id: j for j in snap.jobs}
    assert by_id[A.job_id].co2e_g == pytest.approx(want_g, rel=1e-12)
    assert by_id[R.job_id].co2e_g == 7.0


@dataclass
class RecordingTracker(FakeTracker):
    """FakeTracker that records the GPU PIDs it was given and can fail or report a
    label problem, as the test says."""

    seen_gpu_pids: list[set[int]] = field(default_factory=list)
    problem: str | None = None
    fail_with: Exception | None = None

    def observe(self, now_mono_s: float, gpu_pids: object) -> ProcessView:
        self.seen_gpu_pids.append(set(gpu_pids))  # type: ignore[call-overload]
        if self.fail_with is not None:
            self.queue.pop(0)
            raise self.fail_with
        return super().observe(now_mono_s, gpu_pids)

    def label_problem(self) -> str | None:  # type: ignore[override]
        return self.problem


def test_process_health_label_problems_and_a_failing_scan(caplog, make_engine):
    src, tracker = FakeSource(), RecordingTracker()
    engine = make_engine(sources=[src], tracker=tracker, bucket_s=3600, pue=PUE, finished_grace_s=1e9)
    health = engine.health
    # The tracker is told the visible GPU PIDs only (not the invisible one, not CPU readings').
    readings = [DeviceReading("gpu", "gpu0", 100.0, 100.0, "counter", 1.0,
                              (GpuProcessUse(A.root_pid, 1, 50), GpuProcessUse(4_194_313, 1, 50, visible=False))),
                DeviceReading("gpu", "gpu1", 10.0, 10.0, "counter", 1.0, (GpuProcessUse(777, 1, 5),)),
                DeviceReading("cpu", "package-0", 10.0, 10.0, "counter", 1.0)]
    src.queue.append(readings)
    tracker.queue.append(view(A))
    engine.tick_blocking(1.0, T0 + 1.0)
    assert tracker.seen_gpu_pids == [{A.root_pid, 777}]
    assert (health.get("processes").state, health.get("processes").detail) == ("ok", "")

    tracker.problem = "environments of other users unreadable"
    src.queue.append([reading(100.0, [A.root_pid])])
    tracker.queue.append(view(A))
    engine.tick_blocking(2.0, T0 + 2.0)
    got = health.get("processes")
    assert (got.state, got.detail) == ("degraded", "environments of other users unreadable")

    tracker.problem = None
    src.queue.append([reading(100.0, [A.root_pid])])
    tracker.queue.append(view(A))
    engine.tick_blocking(3.0, T0 + 3.0)
    assert health.get("processes").state == "ok"

    # A failing scan: health says why, nothing is attributed, the job has ended.
    tracker.fail_with = RuntimeError("proc vanished")
    src.queue.append([reading(100.0, [A.root_pid])])
    tracker.queue.append(view(A))
    with caplog.at_level(logging.DEBUG, logger="wattprint.engine"):
        snap = engine.tick_blocking(4.0, T0 + 4.0)
    engine.close()
    engine.ledger.close()
    got = health.get("processes")
    assert (got.state, got.detail) == ("degraded", "RuntimeError: proc vanished")
    [rec] = [r for r in caplog.records if r.getMessage() == "process scan failed"]
    assert rec.exc_info is not None and isinstance(rec.exc_info[1], RuntimeError)
    [a] = snap.jobs
    assert (a.state, a.energy_j["gpu"]) == ("finished", 50.0 + 100.0 + 100.0)  # nothing from tick 4
    assert snap.unattributed_j_total["gpu"] == 50.0 + 10.0 + 100.0
    assert snap.unattributed_j_total["cpu"] == 10.0


@dataclass
class GlitchySource(FakeSource):
    """FakeSource that also reports counter glitches (the optional source hook)."""

    def counter_glitches(self) -> dict[tuple[str, str], int]:
        return {("package-0", "stepped_back"): 3}


def test_what_a_tick_hands_out_field_by_field(make_engine):
    """The snapshot's devices, jobs and glitch counts, and the TickRecord the sinks get,
    whole, for two ticks of known readings; a job that ended and the finished-job cap."""
    src, tracker = GlitchySource(name="rapl"), FakeTracker()
    records: list = []
    engine = make_engine(sources=[src], tracker=tracker, bucket_s=3600,
                         intensity=IntensityBook(GridConfig(), "static", "DK", 400.0), pue=PUE,
                         finished_grace_s=1e9, max_finished_in_metrics=1, interval_s=7.0)
    path = engine.ledger.path
    engine.sinks.append(records.append)
    engine.counter_feeds.append(lambda: {"spool_pending_points": 12.0})
    g0 = DeviceReading("gpu", "gpu0", 200.0, 200.0, "counter", 2.0, (GpuProcessUse(A.root_pid, 1 << 30, 50),),
                       name="H100", uuid="GPU-1")
    c0 = DeviceReading("cpu", "package-0", 30.0, 30.0, "power", 1.0, name="package-0")
    src.queue += [[g0, c0], [dataclasses.replace(g0, energy_j=100.0, power_w=50.0, uuid=""), c0], []]
    B_ = JobIdentity(job_id="200-1", label="job-b", label_source="WATTPRINT_JOB", uid=7, user="bo",
                     command="x", root_pid=203, started_at=T0, label_raw="job-b")
    tracker.queue += [view(A, R), view(A, B_), view()]
    engine.tick_blocking(1.0, T0 + 1.0)
    snap = engine.tick_blocking(2.0, T0 + 2.0, duration_hint_s=5.0)
    assert (snap.taken_at, snap.tick) == (T0 + 2.0, 2)
    assert 5.0 <= snap.tick_duration_s < 6.0
    assert snap.devices == (
        DeviceState("cpu", "package-0", "package-0", 30.0, 60.0, "power", ""),
        DeviceState("gpu", "gpu0", "H100", 50.0, 300.0, "counter", "GPU-1"),  # the uuid seen before stays
    )
    assert snap.counter_glitches == {("rapl", "package-0", "stepped_back"): 3.0}
    assert snap.counters["spool_pending_points"] == 12.0
    assert snap.unattributed_j_total == {"gpu": 0.0, "cpu": 60.0, "dram": 0.0, "other": 0.0}
    rec = records[-1]
    # Lifecycle (issue 16), with the shipped factors (no [market]: market = location): A held
    # gpu0 alone for the reading's 2 s, and had 100 of the tick's 130 measured J over the
    # CPU reading's 1 s (platform); no CPU time, no memory figure: no CPU or DRAM share.
    fp = engine.book.footprint
    a_embodied = (fp.gpu("H100").value * 2.0 + fp.platform.value * 100.0 / 130.0 * 1.0) * 1000.0 / fp.life_s
    assert rec == TickRecord(
        sampled_at=T0 + 2.0, interval_s=2.0,
        readings=(dataclasses.replace(g0, energy_j=100.0, power_w=50.0, uuid=""), c0),
        jobs={A.job_id: JobRef(A.job_id, "job-a", "ann", 1000), B_.job_id: JobRef(B_.job_id, "job-b", "bo", 7)},
        job_energy_j={A.job_id: {"gpu": 100.0, "cpu": 0.0, "dram": 0.0, "other": 0.0},
                      B_.job_id: {"gpu": 0.0, "cpu": 0.0, "dram": 0.0, "other": 0.0}},
        unattributed_j={"gpu": 0.0, "cpu": 30.0, "dram": 0.0, "other": 0.0},
        # A's bucket so far: 200 J + 100 J at the static 400 g/kWh; B_ has no energy: no mean
        bucket_start=BUCKET, bucket_co2e_g={A.job_id: pytest.approx(300.0 / J_PER_KWH * 400.0 * PUE, rel=1e-12),
                                            B_.job_id: 0.0},
        g_per_kwh=400.0, intensity_status="final",
        bucket_g_per_kwh={A.job_id: 400.0}, bucket_intensity_status={A.job_id: "final"},
        bucket_co2e_market_g={A.job_id: pytest.approx(300.0 / J_PER_KWH * 400.0 * PUE, rel=1e-12), B_.job_id: 0.0},
        job_embodied_co2e_g={A.job_id: pytest.approx(a_embodied, rel=1e-12), B_.job_id: 0.0},
        job_water_l={A.job_id: pytest.approx(100.0 / J_PER_KWH * (fp.wue.value + PUE * fp.ewif.value), rel=1e-12),
                     B_.job_id: 0.0},
    )
    # A third tick with no readings: the record's interval is the engine's own; every job has
    # ended (R at T0 + 2, A and B_ at T0 + 3), and only the newest-ended one (by ended_at,
    # then id: A's "201-1" after B_'s "200-1"; by id alone it would be R's "202-1") stays
    # in the snapshot (max_finished_in_metrics = 1).
    snap = engine.tick_blocking(3.0, T0 + 3.0)
    engine.close()
    engine.ledger.close()
    assert records[-1].interval_s == 7.0
    assert [(j.job_id, j.state) for j in snap.jobs] == [(A.job_id, "finished")]
    reader = LedgerReader(path)
    try:
        b = reader.job(B_.job_id, now=T0 + 10.0)
        assert (b["gpu_seconds"], b["peak_gpu_memory_bytes"]) == (0.0, 0)  # never on a GPU
        a = reader.job(A.job_id, now=T0 + 10.0)
        assert (a["gpu_seconds"], a["peak_gpu_memory_bytes"]) == (4.0, 1 << 30)
    finally:
        reader.close()


def test_slurm_steps_of_the_view_reach_the_store_and_a_tick_without_hint_is_short(tmp_path, make_engine):
    from wattprint.daemon.slurm import SlurmJob

    path = str(tmp_path / "s.sqlite3")
    engine, src, tracker = engine_on(make_engine, IntensityBook(GridConfig(), "static", "static", 400.0))
    s = JobIdentity(job_id="slurm-9", label="9", label_source="SLURM_JOB_ID", uid=5, user="sue", command="srun",
                    root_pid=301, started_at=T0, label_raw="9", slurm=SlurmJob(job_id="9", name="9"))
    records: list[TickRecord] = []
    engine.sinks.append(records.append)
    src.queue.append([reading(0.5, [301])])
    tracker.queue.append(ProcessView(jobs=(JobUsage(identity=s, pids=frozenset({301}), cpu_s=0.0, rss_bytes=0,
                                                    steps=frozenset({"0", "batch"})),),
                                     pid_to_job={301: s.job_id}, cpu_busy_s=0.0, mem_used_bytes=0, scanned=True))
    snap = engine.tick_blocking(1.0, T0 + 1.0)
    engine.close()
    engine.ledger.close()
    assert 0.0 <= snap.tick_duration_s < 1.0  # no hint: only the tick's own time (fakes: milliseconds)
    assert records[-1].bucket_g_per_kwh == {s.job_id: 400.0}  # half a joule has a mean intensity
    reader = LedgerReader(path)
    try:
        assert reader.job(s.job_id, now=T0 + 2.0)["slurm"]["steps"] == ["batch", "0"]
    finally:
        reader.close()


def test_a_finished_job_stays_for_exactly_the_grace_period(make_engine):
    src, tracker = FakeSource(), FakeTracker()
    engine = make_engine(sources=[src], tracker=tracker, bucket_s=3600, finished_grace_s=2.0)
    for wall, idents in ((T0, (A,)), (T0 + 1.0, ()), (T0 + 3.0, ()), (T0 + 3.5, ())):
        src.queue.append([reading(10.0, [i.root_pid for i in idents])])
        tracker.queue.append(view(*idents))
        snap = engine.tick_blocking(wall - T0, wall)
        if wall == T0 + 3.0:  # ended at T0 + 1, exactly the grace period ago: still shown
            assert [(j.job_id, j.state) for j in snap.jobs] == [(A.job_id, "finished")]
    engine.close()
    engine.ledger.close()
    assert snap.jobs == ()  # 2.5 s after its end
