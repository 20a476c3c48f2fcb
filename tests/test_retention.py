"""Ledger retention: ``Ledger.prune(before)`` and the engine running it hourly.

- prune deletes the buckets (job, device, unattributed, intensity) that end at or
  before the bucket boundary at the cut, the grid points that ended by then, and the
  finished jobs that ended before it; what is left still balances
  (attributed + unattributed = device); a job that outlives the cut keeps its energy
  and its CO2e; a second prune changes nothing;
- the engine prunes at its first tick and then at most once an hour (monotonic),
  with ``retention_days``; a wall clock that stepped by more than a day pauses it;
- schema 1 stores (before retention) are migrated in place and still read;
- the real daemon prunes an old store at start (default 400 days).
"""

from __future__ import annotations

import logging
import sqlite3
import time
import urllib.parse
from datetime import datetime, timezone

import pytest

from daemon_harness import DaemonProcess
from wattprint.daemon.grid.base import IntensityPoint
from wattprint.daemon.ledger import SCHEMA_VERSION, Intensity, JobTick, Ledger, LedgerReader
from wattprint.daemon.model import DeviceReading
from wattprint.daemon.procs import JobIdentity

DAY = 86400.0
T0 = 1_700_000_040.0  # a minute boundary
FINAL = Intensity(300.0, "final", "energidataservice", "DK1", "actual")
COMPONENTS = ("gpu", "cpu", "dram")


def ident(name: str, pid: int, started: float) -> JobIdentity:
    return JobIdentity(job_id=f"{pid}-{int(started)}", label=name, label_source="WATTPRINT_JOB", uid=1000,
                       user="alice", command="python", root_pid=pid, started_at=started)


def book(ledger: Ledger, wall: float, job: JobIdentity | None, gpu_j: float, ended=(), intensity=FINAL) -> None:
    jobs = [JobTick(job, {"gpu": gpu_j, "cpu": 1.0}, 1.0, 0, {"gpu": "counter"})] if job else []
    ledger.record_tick(wall, jobs, [("gpu", "gpu0", gpu_j + 5.0, "counter"), ("cpu", "package-0", 3.0, "counter")],
                       {"gpu": 5.0, "cpu": 2.0 if job else 3.0}, intensity, ended)


def point(start: float, g: float) -> IntensityPoint:
    return IntensityPoint(start=datetime.fromtimestamp(start, timezone.utc),
                          end=datetime.fromtimestamp(start + 3600, timezone.utc), g_per_kwh=g, kind="actual",
                          zone="DK1", provider="energidataservice")


def balanced(reader: LedgerReader) -> None:
    host = reader.host_totals()
    for c in COMPONENTS:
        assert host["attributed_energy_j"][c] + host["unattributed_energy_j"][c] == \
            pytest.approx(host["device_energy_j"][c], rel=1e-12, abs=1e-9)


def test_prune_deletes_old_data_keeps_totals_and_balance(tmp_path):
    path = str(tmp_path / "s.sqlite3")
    led = Ledger(path, host="h", bucket_s=60)
    old = ident("old", 10, T0)  # ran on day 0 only
    long = ident("long", 11, T0)  # runs from day 0 to day 3: outlives the cut
    recent = ident("recent", 12, T0 + 2.5 * DAY)
    for m in range(30):  # day 0: 30 minutes of three jobs
        book(led, T0 + 60 * m, old, 100.0, ended=[(old.job_id, T0 + 60 * m)] if m == 29 else ())
        book(led, T0 + 60 * m, long, 50.0)
    for m in range(30):
        book(led, T0 + 2.5 * DAY + 60 * m, recent, 20.0, ended=[(recent.job_id, T0 + 2.5 * DAY + 60 * m)] if m == 29 else ())
        book(led, T0 + 2.5 * DAY + 60 * m, long, 50.0)
    book(led, T0 + 3 * DAY, None, 0.0)
    led.store_points([point(T0 + 3600 * h, 100.0 + h) for h in range(80)], fetched_at=T0)
    reader = LedgerReader(path, pue=1.2)
    before_long = reader.job(long.job_id, now=T0 + 3 * DAY)
    assert before_long["energy_j"]["gpu"] == pytest.approx(3000.0)

    cut = T0 + 1 * DAY + 17.0  # not on a bucket boundary
    deleted = led.prune(cut)
    assert deleted["jobs"] == 1  # "old"
    assert deleted["job_buckets"] == 30 * 2 * 2  # old + long on day 0, gpu and cpu each
    assert deleted["device_buckets"] == 30 * 2 and deleted["unattributed_buckets"] == 30 * 2
    assert deleted["bucket_intensity"] == 30
    assert deleted["intensity_points"] == 24  # the hourly points that ended by the cut

    assert reader.job(old.job_id, now=T0 + 3 * DAY) is None
    after_long = reader.job(long.job_id, now=T0 + 3 * DAY)
    # Outlived the cut: totals, CO2e and its average intensity are unchanged.
    for key in ("energy_j", "energy_kwh", "gpu_seconds", "started_at", "state"):
        assert after_long[key] == before_long[key], key
    assert after_long["co2e_g"] == pytest.approx(before_long["co2e_g"], rel=1e-12)
    assert after_long["co2e_g"] == pytest.approx(after_long["energy_kwh"] * 300.0 * 1.2, rel=1e-12)
    series = reader.job_series(long.job_id)
    assert min(b["start"] for b in series) >= led.bucket_of(cut)  # its old buckets went
    assert reader.job(recent.job_id, now=T0 + 3 * DAY)["energy_j"]["gpu"] == pytest.approx(600.0)
    for table in ("job_buckets", "device_buckets", "unattributed_buckets", "bucket_intensity"):
        (low,) = led.conn.execute(f"SELECT MIN(bucket_start) FROM {table}").fetchone()
        assert low >= led.bucket_of(cut), table
    balanced(reader)
    settled = led.job_co2e_g([long.job_id], pue=1.2)[long.job_id]  # what settlement would recompute
    assert settled == pytest.approx(before_long["co2e_g"], rel=1e-12)

    again = led.prune(cut)
    assert sum(again.values()) == 0
    assert reader.job(long.job_id, now=T0 + 3 * DAY)["co2e_g"] == pytest.approx(before_long["co2e_g"], rel=1e-12)
    reader.close()
    led.close()


def test_prune_keeps_a_job_that_ended_after_the_cut_and_a_straddling_bucket(tmp_path):
    path = str(tmp_path / "s.sqlite3")
    led = Ledger(path, host="h", bucket_s=3600)
    job = ident("edge", 20, T0)
    start = led.bucket_of(T0) + 1800.0  # mid-bucket
    for m in range(60):  # 30 min in one bucket, 30 min in the next
        book(led, start + 60 * m, job, 10.0, ended=[(job.job_id, start + 60 * m)] if m == 59 else ())
    cut = led.bucket_of(start) + 3600 + 600  # inside the job's second bucket
    led.prune(cut)
    reader = LedgerReader(path)
    j = reader.job(job.job_id, now=start + 7200)
    assert j is not None and j["energy_j"]["gpu"] == pytest.approx(600.0)  # it ended after the cut
    assert j["co2e_g"] == pytest.approx(600.0 / 3.6e6 * 300.0 + 60.0 / 3.6e6 * 300.0, rel=1e-9)
    assert [b["start"] for b in reader.job_series(job.job_id)] == [led.bucket_of(cut)]  # the straddling bucket stays
    balanced(reader)
    reader.close()
    led.close()


class Constant:
    """A source of 10 J per read."""

    name = "const"

    def read(self, now):
        return [DeviceReading(kind="cpu", device="pkg", energy_j=10.0, power_w=10.0, source="counter", interval_s=1.0)]

    def problems(self):
        return []

    def close(self):
        pass


def test_engine_prunes_at_start_then_at_most_hourly(tmp_path, monkeypatch, make_engine):
    engine = make_engine(sources=[Constant()], retention_days=1.0)  # the store: tmp_path/s.sqlite3
    calls: list[float] = []
    real = engine.ledger.prune
    monkeypatch.setattr(engine.ledger, "prune", lambda before: calls.append(before) or real(before))
    mono, wall = 1000.0, T0
    try:
        for _ in range(30 * 6):  # 30 hours, one tick every 10 minutes
            engine.tick_blocking(mono, wall)
            mono += 600.0
            wall += 600.0
        assert calls[0] == pytest.approx(T0 - DAY)  # at the first tick
        assert 30 <= len(calls) <= 31  # then once an hour
        assert all(b - a >= 3600 - 1e-6 for a, b in zip(calls, calls[1:]))
        (low,) = engine.ledger.conn.execute("SELECT MIN(bucket_start) FROM device_buckets").fetchone()
        assert low >= wall - DAY - 3600 - 60  # nothing much older than a day (plus the hour between prunes)
        assert engine.snapshot.counters["store_pruned_rows_total"] > 0
        reader = LedgerReader(str(tmp_path / "s.sqlite3"))
        balanced(reader)
        reader.close()
    finally:
        engine.close()


def test_retention_pauses_when_the_wall_clock_steps_by_days(monkeypatch, caplog, make_engine):
    engine = make_engine(sources=[Constant()], retention_days=1.0)
    calls: list[float] = []
    monkeypatch.setattr(engine.ledger, "prune", lambda before: calls.append(before) or {})
    try:
        engine.tick_blocking(1000.0, T0)
        assert len(calls) == 1
        with caplog.at_level(logging.WARNING, logger="wattprint.engine"):
            for h in range(1, 4):  # the wall clock is suddenly ten days ahead
                engine.tick_blocking(1000.0 + 3600 * h, T0 + 10 * DAY + 3600 * h)
        assert len(calls) == 1
        assert len([r for r in caplog.records if "retention paused" in r.getMessage()]) == 1
    finally:
        engine.close()


def test_retention_off(monkeypatch, make_engine):
    engine = make_engine(sources=[Constant()], retention_days=0.0)
    monkeypatch.setattr(engine.ledger, "prune", lambda before: pytest.fail("pruned with retention off"))
    try:
        engine.tick_blocking(1000.0, T0)
        engine.tick_blocking(1000.0 + 7200, T0 + 7200)
    finally:
        engine.close()


def test_schema_1_store_is_migrated_and_still_read(tmp_path):
    path = str(tmp_path / "s.sqlite3")
    led = Ledger(path, host="h", bucket_s=60)
    job = ident("v1", 30, T0)
    book(led, T0, job, 100.0)
    led.close()
    conn = sqlite3.connect(path)  # make it what wattprint with schema 1 wrote
    conn.execute("ALTER TABLE jobs DROP COLUMN pruned_co2e_g")
    conn.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    conn.commit()
    conn.close()

    reader = LedgerReader(path)  # an old store read as it is
    assert reader.job(job.job_id, now=T0)["co2e_g"] == pytest.approx(101.0 / 3.6e6 * 300.0)
    led = Ledger(path, host="h", bucket_s=60)  # the daemon migrates it in place
    assert led.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)  # current
    assert led.conn.execute("SELECT pruned_co2e_g FROM jobs").fetchone()[0] == 0.0
    assert reader.job(job.job_id, now=T0)["co2e_g"] == pytest.approx(101.0 / 3.6e6 * 300.0)
    reader.close()
    led.close()


def test_daemon_prunes_an_old_store_at_start(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    path = str(state / "wattprint.sqlite3")
    now = time.time()
    led = Ledger(path, host="testhost", bucket_s=60)
    ancient = ident("ancient", 40, now - 500 * DAY)
    book(led, now - 500 * DAY, ancient, 100.0, ended=[(ancient.job_id, now - 500 * DAY + 30)])
    young = ident("young", 41, now - 10 * DAY)
    book(led, now - 10 * DAY, young, 100.0, ended=[(young.job_id, now - 10 * DAY + 30)])
    led.close()

    daemon = DaemonProcess(tmp_path, sim_file=None, powercap_root=None)  # retention_days: 400 by default
    try:
        daemon.start()
        code, _ = daemon.get_status(f"/api/v1/jobs/{urllib.parse.quote(ancient.job_id, safe='')}")
        assert code == 404
        code, body = daemon.get_status(f"/api/v1/jobs/{urllib.parse.quote(young.job_id, safe='')}")
        assert code == 200 and body["energy_j"]["gpu"] == pytest.approx(100.0)
        assert any("retention: deleted" in line for line in daemon.log_path.read_text().splitlines())
        host = daemon.get("/api/v1/host")
        for c in COMPONENTS:
            assert host["attributed_energy_j"][c] + host["unattributed_energy_j"][c] == \
                pytest.approx(host["device_energy_j"][c], rel=1e-9, abs=1e-9)
        assert daemon.stop() == 0
    finally:
        daemon.kill()
