"""The engine in-process: job lifecycle in snapshots, the finished-job grace period,
a failing source degrading alone, and a failing store not stopping the ticks."""

from __future__ import annotations

import json
import time

import pytest

from gpusim import gpu, proc, write_sim
from wattprint.daemon.sources.base import SourceError
from wattprint.daemon.sources.gpu import NvmlGpuSource
from wattprint.daemon.sources.nvml_sim import SimulatedNvml


class Broken:
    name = "broken"

    def read(self, now_mono_s):
        raise SourceError("sensor on fire")

    def problems(self):
        return []

    def close(self):
        pass


@pytest.fixture
def job(labelled_process):
    p = labelled_process("engine-test")
    time.sleep(0.3)
    return p


def gpu_engine(make_engine, sim, clock, grace_s=10.0):
    """The simulated GPUs of ``sim`` on ``clock`` and a broken source, over the store
    tmp_path/s.sqlite3 (conftest's make_engine: a restart finds the same store)."""
    return make_engine(sources=[NvmlGpuSource(SimulatedNvml(str(sim), clock=lambda: clock["mono"])), Broken()],
                       finished_grace_s=grace_s)


def tick(engine, clock, dt=1.0):
    clock["mono"] += dt
    clock["wall"] += dt
    return engine.tick_blocking(clock["mono"], clock["wall"])


def test_lifecycle_grace_and_degraded_source(tmp_path, job, labelled_process, make_engine):
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=100.0, processes=[proc(job.pid, sm_util=50)])])
    clock = {"mono": 100.0, "wall": 1_795_000_000.0}
    engine = gpu_engine(make_engine, sim, clock)
    for _ in range(4):
        snap = tick(engine, clock)
    mine = [j for j in snap.jobs if j.label == "engine-test"]
    assert len(mine) == 1 and mine[0].state == "running"
    assert mine[0].energy_j["gpu"] == pytest.approx(300.0, rel=1e-6)  # 3 intervals after the baseline
    assert mine[0].co2e_g == pytest.approx(300.0 / 3.6e6 * 400.0, rel=1e-6)
    health = {h.name: h for h in snap.health}
    assert health["broken"].state == "degraded" and health["broken"].detail == "sensor on fire"
    assert health["broken"].errors_total == 4
    assert health["gpu"].state == "ok"

    labelled_process.end(job)
    write_sim(sim, [gpu(0, power_w=100.0, processes=[])])
    snap = tick(engine, clock)
    [done] = [j for j in snap.jobs if j.label == "engine-test"]
    assert done.state == "finished"
    snap = tick(engine, clock, dt=5.0)
    assert [j.state for j in snap.jobs if j.label == "engine-test"] == ["finished"]
    snap = tick(engine, clock, dt=6.0)  # past the 10 s grace period: gone from the snapshot
    assert [j for j in snap.jobs if j.label == "engine-test"] == []
    engine.close()


def test_store_failure_degrades_and_ticks_go_on(tmp_path, job, make_engine):
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=100.0, processes=[proc(job.pid, sm_util=50)])])
    clock = {"mono": 100.0, "wall": 1_795_000_000.0}
    engine = gpu_engine(make_engine, sim, clock)
    tick(engine, clock)
    engine.ledger.conn.execute("DROP TABLE job_buckets")  # the store breaks under the daemon
    snap = tick(engine, clock)
    health = {h.name: h for h in snap.health}
    assert health["store"].state == "degraded" and "job_buckets" in health["store"].detail
    assert snap.tick == 2
    [j] = [j for j in snap.jobs if j.label == "engine-test"]
    assert j.energy_j["gpu"] == pytest.approx(100.0, rel=1e-6)  # the snapshot still counts
    engine.close()


def job_sources(engine, label):
    [row] = engine.ledger.conn.execute("SELECT sources FROM jobs WHERE label=?", (label,)).fetchall()
    return json.loads(row[0])


def job_gpu_j(snap, label):
    [j] = [j for j in snap.jobs if j.label == label]
    return j.energy_j["gpu"]


def test_job_sources_name_its_own_gpu_not_an_idle_power_only_one(tmp_path, job, make_engine):
    # The job alone on gpu0 (energy counter); gpu1 has no counter and nobody on it.
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=100.0, processes=[proc(job.pid, sm_util=50)]),
                    gpu(1, power_w=40.0, energy_counter=False)])
    clock = {"mono": 100.0, "wall": 1_795_000_000.0}
    engine = gpu_engine(make_engine, sim, clock)
    for _ in range(3):
        snap = tick(engine, clock)
    assert job_gpu_j(snap, "engine-test") == pytest.approx(200.0, rel=1e-6)
    assert job_sources(engine, "engine-test") == {"gpu": "counter"}
    engine.close()


def test_job_sources_keep_the_weakest_over_the_jobs_life_across_a_restart(tmp_path, job, make_engine):
    # 3 ticks on a power-only GPU, then the job moves to a counter GPU: still "power".
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=100.0), gpu(1, power_w=50.0, energy_counter=False,
                                                processes=[proc(job.pid, sm_util=50)])])
    clock = {"mono": 100.0, "wall": 1_795_000_000.0}
    engine = gpu_engine(make_engine, sim, clock)
    for _ in range(3):
        tick(engine, clock)
    assert job_sources(engine, "engine-test") == {"gpu": "power"}
    # The job moves to gpu0 and the power-only GPU leaves (so no reading of this tick
    # says "power": only the job's own past can).
    write_sim(sim, [gpu(0, power_w=100.0, processes=[proc(job.pid, sm_util=50)])])
    for _ in range(3):
        snap = tick(engine, clock)
    # 2 power-only intervals of 50 J on gpu1, then 3 x 100 J on gpu0 (a read books the
    # interval that ends at it to the processes it lists).
    assert job_gpu_j(snap, "engine-test") == pytest.approx(2 * 50.0 + 3 * 100.0, rel=1e-6)
    assert job_sources(engine, "engine-test") == {"gpu": "power"}
    engine.close()

    # The daemon restarts; the job goes on, on the counter GPU only: still "power".
    engine = gpu_engine(make_engine, sim, clock)
    engine.restore(engine.ledger.running_jobs(), {})
    for _ in range(3):
        tick(engine, clock)
    assert job_sources(engine, "engine-test") == {"gpu": "power"}
    engine.close()


def test_memory_only_process_pays_its_share_of_the_learned_idle_floor(tmp_path, job, labelled_process,
                                                                   make_engine):
    # gpu0 empty at 60 W (the idle floor is learned), then at 300 W with the job at 80 % SM
    # and a memory-only process of another job (no utilisation samples), 1 GiB each.
    holder = labelled_process("engine-holder")
    time.sleep(0.3)
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=60.0)])
    clock = {"mono": 100.0, "wall": 1_795_000_000.0}
    engine = gpu_engine(make_engine, sim, clock)
    tick(engine, clock)
    tick(engine, clock)  # 60 J with no process on it: floor 60 W
    write_sim(sim, [gpu(0, power_w=300.0, processes=[proc(job.pid, sm_util=80), proc(holder.pid)])])
    tick(engine, clock)  # this interval still ran at 60 W (the file changed at its end): 30 J each
    snap = tick(engine, clock)  # 300 J: idle 60 J split 30/30, active 240 J to the busy job
    assert job_gpu_j(snap, "engine-test") == pytest.approx(30.0 + 30.0 + 240.0, rel=1e-6)
    assert job_gpu_j(snap, "engine-holder") == pytest.approx(30.0 + 30.0, rel=1e-6)
    assert snap.unattributed_j_total["gpu"] == pytest.approx(60.0, rel=1e-6)  # the empty interval
    engine.close()
