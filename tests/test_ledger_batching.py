"""The ledger's batched tick write (issue 18): a known job's identity row and unchanged
sources are not written again, and what the store holds is still exactly what every
tick booked: sources merged to the weakest, Slurm steps added, a rolled-back tick
written again in full, a pruned job's row recreated."""

from __future__ import annotations

import json
import sqlite3

import pytest

from wattprint.daemon.ledger import Intensity, JobTick, Ledger, LedgerReader
from wattprint.daemon.ledger.writer import TickRow
from wattprint.daemon.procs import JobIdentity
from wattprint.daemon.slurm import SlurmJob

STATIC = Intensity(400.0, "final", "static", "DK1", "static")
T0 = 1_795_000_020.0  # a bucket boundary + 20 s (bucket_s 60)


def ident(n: int, slurm: SlurmJob | None = None) -> JobIdentity:
    return JobIdentity(job_id=f"{100 + n}-1", label=f"job-{n}", label_source="WATTPRINT_JOB", uid=1000,
                       user="alice", command="python", root_pid=100 + n, started_at=T0 - 100.0, slurm=slurm)


def jt(job: JobIdentity, gpu_j: float = 10.0, sources: dict[str, str] | None = None,
       steps: frozenset[str] = frozenset(), running: bool = True) -> JobTick:
    return JobTick(job, {"gpu": gpu_j, "cpu": 1.0}, gpu_seconds=1.0, gpu_memory_bytes=5,
                   sources=sources if sources is not None else {"gpu": "counter", "cpu": "counter"},
                   steps=steps, running=running)


def row(wall: float, jobs: list[JobTick], ended=()) -> TickRow:
    gpu = sum(j.energy_j["gpu"] for j in jobs)
    return TickRow(wall, jobs, [("gpu", "gpu0", gpu + 1.0, "counter"), ("cpu", "package-0", len(jobs) + 1.0, "counter")],
                   {"gpu": 1.0, "cpu": 1.0}, STATIC, tuple(ended))


def stored_sources(path: str, job_id: str) -> dict[str, str]:
    conn = sqlite3.connect(path)
    try:
        return json.loads(conn.execute("SELECT sources FROM jobs WHERE id=?", (job_id,)).fetchone()[0])
    finally:
        conn.close()


def traced(led: Ledger) -> list[str]:
    seen: list[str] = []
    led.conn.set_trace_callback(seen.append)
    return seen


def test_a_known_jobs_identity_and_unchanged_sources_are_written_once(tmp_path):
    path = str(tmp_path / "s.sqlite3")
    led = Ledger(path, host="h", bucket_s=60)
    jobs = [ident(n) for n in range(4)]
    statements = traced(led)
    for k in range(5):
        led.record_ticks([row(T0 + k, [jt(j) for j in jobs])])
    inserts = [s for s in statements if s.lstrip().startswith("INSERT INTO jobs")]
    merges = [s for s in statements if "json_set" in s]
    assert len(inserts) == 4  # the first tick only (the old writer: one per job per tick, 20)
    assert len(merges) == 4
    led.close()
    reader = LedgerReader(path)
    for j in jobs:
        rec = reader.job(j.job_id, now=T0 + 10)
        assert rec["energy_j"]["gpu"] == pytest.approx(50.0)
        assert rec["energy_j"]["cpu"] == pytest.approx(5.0)
        assert rec["gpu_seconds"] == pytest.approx(5.0)
        assert rec["last_seen"] == T0 + 4
        assert stored_sources(path, j.job_id) == {"gpu": "counter", "cpu": "counter"}
    host = reader.host_totals()
    for comp in ("gpu", "cpu"):
        assert host["attributed_energy_j"][comp] + host["unattributed_energy_j"][comp] == pytest.approx(
            host["device_energy_j"][comp])
    reader.close()


def test_sources_still_merge_to_the_weakest_when_they_change_and_across_a_restart(tmp_path):
    path = str(tmp_path / "s.sqlite3")
    led = Ledger(path, host="h", bucket_s=60)
    job = ident(1)
    led.record_ticks([row(T0, [jt(job, sources={"gpu": "counter"})])])
    led.record_ticks([row(T0 + 1, [jt(job, sources={"gpu": "estimate"})])])
    led.record_ticks([row(T0 + 2, [jt(job, sources={"gpu": "counter"})])])
    led.record_ticks([row(T0 + 3, [jt(job, sources={"gpu": "counter", "node": "redfish"})])])
    led.close()
    led = Ledger(path, host="h", bucket_s=60)  # a new writer knows nothing: merges again
    led.record_ticks([row(T0 + 4, [jt(job, sources={"gpu": "counter", "cpu": "power", "node": "ipmi"})])])
    led.close()
    assert stored_sources(path, job.job_id) == {"gpu": "estimate", "cpu": "power", "node": "ipmi"}


def test_new_slurm_steps_of_a_known_job_are_added(tmp_path):
    path = str(tmp_path / "s.sqlite3")
    led = Ledger(path, host="h", bucket_s=60)
    job = ident(2, slurm=SlurmJob(job_id="77", name="77", partition="gpu", user="alice"))
    led.record_ticks([row(T0, [jt(job, steps=frozenset({"batch"}))])])
    led.record_ticks([row(T0 + 1, [jt(job, steps=frozenset({"batch"}))])])
    led.record_ticks([row(T0 + 2, [jt(job, steps=frozenset({"0"}))])])
    led.record_ticks([row(T0 + 3, [jt(job, steps=frozenset({"0", "1"}))])])
    led.close()
    reader = LedgerReader(path)
    assert reader.job(job.job_id, now=T0 + 10)["slurm"]["steps"] == ["batch", "0", "1"]
    reader.close()


def test_a_rolled_back_tick_is_written_again_in_full(tmp_path):
    path = str(tmp_path / "s.sqlite3")
    led = Ledger(path, host="h", bucket_s=60)
    job = ident(3)
    bad = TickRow(T0, [jt(job)], [("gpu", "gpu0", 11.0, "counter")], {"gpu": object()}, STATIC)  # fails to bind
    with pytest.raises((sqlite3.Error, TypeError, ValueError)):
        led.record_ticks([bad])
    # the engine retries the failed tick with the next one (engine/store.py)
    led.record_ticks([row(T0, [jt(job)]), row(T0 + 1, [jt(job)])])
    led.close()
    reader = LedgerReader(path)
    rec = reader.job(job.job_id, now=T0 + 10)
    assert rec is not None and rec["energy_j"]["gpu"] == pytest.approx(20.0)
    assert stored_sources(path, job.job_id) == {"gpu": "counter", "cpu": "counter"}
    reader.close()


def test_a_job_that_ended_and_was_pruned_is_booked_again(tmp_path):
    path = str(tmp_path / "s.sqlite3")
    led = Ledger(path, host="h", bucket_s=60)
    job = ident(4)
    led.record_ticks([row(T0, [jt(job)], ended=[(job.job_id, T0)])])
    led.prune(T0 + 600)  # the finished job and its buckets go
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0
    led.record_ticks([row(T0 + 700, [jt(job, gpu_j=7.0)])])  # the same job seen running again
    assert conn.execute("SELECT gpu_j, state FROM jobs WHERE id=?", (job.job_id,)).fetchone() == (7.0, "running")
    conn.close()
    led.close()
