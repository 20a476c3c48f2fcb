"""Ledger: per-job buckets, totals, CO2e from bucket intensity, restart and settlement."""

from __future__ import annotations


import pytest

from wattprint.daemon.ledger import Intensity, JobTick, Ledger, LedgerError, LedgerReader
from wattprint.daemon.procs import JobIdentity

STATIC = Intensity(400.0, "final", "static", "DK1", "static")


def ident(label: str, pid: int = 10) -> JobIdentity:
    return JobIdentity(job_id=f"{pid}-1", label=label, label_source="WATTPRINT_JOB", uid=1000, user="alice",
                       command="python", root_pid=pid, started_at=1000.0)


def tick(ledger: Ledger, wall: float, job: JobIdentity, gpu_j: float, cpu_j: float = 0.0, intensity=STATIC, ended=()):
    ledger.record_tick(
        wall,
        [JobTick(job, {"gpu": gpu_j, "cpu": cpu_j, "dram": 0.0}, gpu_seconds=1.0, gpu_memory_bytes=int(gpu_j),
                 sources={"gpu": "counter"})],
        [("gpu", "gpu0", gpu_j + 10.0, "counter"), ("cpu", "package-0", cpu_j + 5.0, "counter")],
        {"gpu": 10.0, "cpu": 5.0, "dram": 0.0},
        intensity,
        ended,
    )


def test_totals_buckets_co2e_and_host(tmp_path):
    path = str(tmp_path / "s.sqlite3")
    led = Ledger(path, host="h", bucket_s=60)
    job = ident('a "label", with=all\\the\nthings')
    for i in range(120):
        tick(led, 6000.0 + i, job, gpu_j=36.0, cpu_j=3.6)
    reader = LedgerReader(path, pue=1.5, price_per_kwh=0.3, currency="DKK")
    j = reader.job(job.job_id, now=7000.0)
    assert j["label"] == job.label
    assert j["energy_j"]["gpu"] == pytest.approx(4320.0)
    assert j["energy_j"]["total"] == pytest.approx(4752.0)
    assert j["energy_kwh"] == pytest.approx(4752.0 / 3.6e6)
    assert j["co2e_g"] == pytest.approx(4752.0 / 3.6e6 * 400.0 * 1.5)
    assert j["intensity_g_per_kwh_avg"] == pytest.approx(400.0)
    assert j["co2e_status"] == "final"
    assert j["gpu_seconds"] == pytest.approx(120.0)
    assert j["peak_gpu_memory_bytes"] == 36
    assert j["cost"] == {"amount": pytest.approx(4752.0 / 3.6e6 * 1.5 * 0.3), "currency": "DKK", "price_per_kwh": 0.3}
    series = reader.job_series(job.job_id)
    assert [b["start"] for b in series] == [6000, 6060]
    assert sum(b["energy_j"]["total"] for b in series) == pytest.approx(4752.0)
    host = reader.host_totals()
    for c in ("gpu", "cpu"):
        assert host["attributed_energy_j"][c] + host["unattributed_energy_j"][c] == pytest.approx(host["device_energy_j"][c])
    assert [r["id"] for r in reader.jobs(label=job.label, now=7000.0)] == [job.job_id]
    assert reader.jobs(label="a", now=7000.0) == []
    assert reader.jobs(user="alice' OR '1'='1", now=7000.0) == []


def test_restart_continues_and_settlement_revises(tmp_path):
    path = str(tmp_path / "s.sqlite3")
    led = Ledger(path, host="h", bucket_s=60)
    job = ident("x")
    prov = Intensity(100.0, "provisional", "energidataservice", "DK1", "forecast")
    tick(led, 6000.0, job, gpu_j=3.6e6, intensity=prov)
    led.close()
    led = Ledger(path, host="h", bucket_s=60)
    assert set(led.running_jobs()) == {job.job_id}
    tick(led, 6001.0, job, gpu_j=3.6e6, intensity=prov, ended=[(job.job_id, 6001.0)])
    reader = LedgerReader(path)
    j = reader.job(job.job_id, now=7000.0)
    assert j["energy_j"]["gpu"] == pytest.approx(7.2e6)
    assert j["state"] == "finished" and j["ended_at"] == 6001.0
    assert j["co2e_g"] == pytest.approx(200.0)
    assert j["co2e_status"] == "provisional"
    led.set_intensities([(6000, 6000, Intensity(50.0, "final", "energidataservice", "DK1", "actual"))])
    j = reader.job(job.job_id, now=7000.0)
    assert j["co2e_g"] == pytest.approx(100.0)
    assert j["co2e_status"] == "final"


def test_corrupt_store_is_a_clear_error(tmp_path):
    path = tmp_path / "s.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError, match="s.sqlite3: .*not a database"):
        Ledger(str(path), host="h", bucket_s=60)
    with pytest.raises(LedgerError, match="no store here"):
        LedgerReader(str(tmp_path / "absent.sqlite3"))
