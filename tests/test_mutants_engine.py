"""The engine's job book (daemon/engine.py) in the cases mutation testing found
unguarded (issue 13, scripts/mutation.sh): a job continued after a restart that is
not found again ends when it was last seen; a failing read of the bucket's slot
values does not stop the tick; settlement skips a slot whose new value is less sure
and still settles the slots after it, names the job in what it hands the settle
sinks, keeps the CO2e of a job the store does not know, and says what it did.
Engine + Ledger are real; readings and process views are the test's (fakes from
tests/test_job_numbers.py), and every expected number is computed here."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import pytest

from test_job_numbers import FakeSource, FakeTracker
from wattprint.daemon.carbon import IntensityBook
from wattprint.daemon.config import GridConfig
from wattprint.daemon.engine import Engine
from wattprint.daemon.grid.base import IntensityPoint
from wattprint.daemon.health import HealthBoard
from wattprint.daemon.ledger import Ledger, LedgerReader
from wattprint.daemon.model import DeviceReading, GpuProcessUse, SettledBucket
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


def engine_on(path: str, book: IntensityBook) -> tuple[Engine, FakeSource, FakeTracker]:
    src, tracker = FakeSource(), FakeTracker()
    engine = Engine(sources=[src], tracker=tracker, ledger=Ledger(path, "h", 3600),  # type: ignore[arg-type]
                    intensity=book, health=HealthBoard(), pue=PUE, finished_grace_s=1e9, read_timeout_s=30.0)
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


def test_restored_job_not_found_again_ends_when_last_seen(tmp_path):
    path = str(tmp_path / "s.sqlite3")
    book = IntensityBook(GridConfig(), "static", "static", 400.0)
    engine, src, tracker = engine_on(path, book)
    tick(engine, src, tracker, T0 + 10.0, 100.0, A, R)
    tick(engine, src, tracker, T0 + 11.0, 100.0, A, R)
    engine.close()
    engine.ledger.close()

    # The next daemon run: both jobs were running; R's process is gone.
    engine, src, tracker = engine_on(path, book)
    running = engine.ledger.running_jobs()
    engine.restore(running, {A.job_id: 1.0})  # R has no CO2e figure: it starts at 0 g
    snap = tick(engine, src, tracker, T0 + 500.0, 100.0, A)
    engine.close()
    engine.ledger.close()
    by_id = {j.job_id: j for j in snap.jobs}
    assert by_id[R.job_id].state == "finished"
    assert by_id[R.job_id].co2e_g == 0.0  # restored without a figure, nothing added
    # A: restored 1.0 g + this tick's 100 J (sole process) x 400 g/kWh x PUE
    assert by_id[A.job_id].co2e_g == pytest.approx(1.0 + 100.0 / J_PER_KWH * 400.0 * PUE, rel=1e-12)
    reader = LedgerReader(path)
    try:
        assert reader.job(R.job_id, now=T0 + 600.0)["ended_at"] == T0 + 11.0  # last seen, not the restart
    finally:
        reader.close()


def test_tick_goes_on_when_the_bucket_values_cannot_be_read(tmp_path, caplog):
    path = str(tmp_path / "s.sqlite3")
    engine, src, tracker = engine_on(path, IntensityBook(GridConfig(), "static", "static", 400.0))

    def failing(bucket_start: int):
        raise OSError("disk I/O error")

    engine.ledger.slot_intensities = failing  # type: ignore[method-assign]
    with caplog.at_level(logging.DEBUG, logger="wattprint.engine"):
        snap = tick(engine, src, tracker, T0 + 10.0, 360.0, A)
    [failed] = [r for r in caplog.records if r.getMessage() == "reading the bucket's slot intensities failed"]
    assert failed.exc_info is not None and isinstance(failed.exc_info[1], OSError)  # the cause, in the debug log
    engine.close()
    engine.ledger.close()
    [a] = snap.jobs
    assert a.co2e_g == pytest.approx(360.0 / J_PER_KWH * 400.0 * PUE, rel=1e-12)
    assert (snap.grid_provider, snap.grid_zone, snap.grid_g_per_kwh) == ("static", "static", 400.0)
    assert snap.counters["tick_errors_total"] == 0.0


def test_settlement_skips_a_less_sure_value_and_settles_the_rest(tmp_path, caplog):
    path = str(tmp_path / "s.sqlite3")
    book = IntensityBook(GridConfig(static_g_per_kwh=250.0), "energidataservice", "DK1")
    book.update([point(0, 100.0, "forecast"), point(1, 200.0, "forecast"), point(2, 300.0, "forecast")], now_s=T0)
    engine, src, tracker = engine_on(path, book)
    settled: list[list[SettledBucket]] = []
    engine.settle_sinks.append(settled.append)
    tick(engine, src, tracker, T0 + 10.0, 1000.0, A)   # slot 0, forecast 100
    tick(engine, src, tracker, T0 + 310.0, 3000.0, A)  # slot 1, forecast 200
    tick(engine, src, tracker, T0 + 610.0, 2000.0, A)  # slot 2, forecast 300
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
    assert settled == [[SettledBucket(job=settled[0][0].job, bucket_start=BUCKET, co2e_g=pytest.approx(want_g),
                                      g_per_kwh=pytest.approx(gj / 6000.0), status="provisional")]]
    job = settled[0][0].job
    assert (job.job_id, job.label, job.user, job.uid) == (A.job_id, "job-a", "ann", 1000)
    snap = tick(engine, src, tracker, T0 + 620.0, 0.0, A)
    engine.close()
    engine.ledger.close()
    by_id = {j.job_id: j for j in snap.jobs}
    assert by_id[A.job_id].co2e_g == pytest.approx(want_g, rel=1e-12)
    assert by_id[R.job_id].co2e_g == 7.0
