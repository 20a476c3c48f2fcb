"""The fault matrix, the clock (issue 7): wall-clock steps an hour forward and back,
in the real Engine driven by a simulated clock and in its real schedule: energy and the
schedule follow the monotonic clock, buckets follow the wall clock.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from e2e_truth import INVISIBLE_PID, mem_used_bytes
from faults_common import COMPONENTS
from gpusim import gpu, proc, write_sim
from powercap import PowercapTree
from wattprint.daemon.ledger import LedgerReader
from wattprint.daemon.procs import ProcessTracker
from wattprint.daemon.sources.gpu import NvmlGpuSource
from wattprint.daemon.sources.nvml_sim import SimulatedNvml
from wattprint.daemon.sources.rapl import RaplSource


def test_wall_clock_steps_move_buckets_not_energy(tmp_path, labelled_process, tag, make_engine):
    """In-process: monotonic time advances 1 s per tick while the wall clock jumps an
    hour forward and back. Energy per tick is unchanged, each tick's energy lands in
    the bucket of its wall time, nothing goes negative, the job keeps running. Per
    tick, the job's GPU energy is exactly its 80 % share (next to an invisible process
    at 20 %, whose share is the unattributed GPU energy) and its DRAM energy its RSS
    share, both read by the test; conservation is an extra check."""
    job = labelled_process(f"clock-{tag}")
    time.sleep(0.3)
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=100.0, processes=[proc(job.pid, used_memory_bytes=None, sm_util=80),
                                                     proc(INVISIBLE_PID, used_memory_bytes=None, sm_util=20)])])
    tree = PowercapTree(tmp_path / "powercap")
    zones = tree.add_package(0, dram=True, max_energy_range_uj=100_000_000)
    clock = {"mono": 5000.0}
    engine = make_engine(
        sources=[NvmlGpuSource(SimulatedNvml(str(sim), clock=lambda: clock["mono"])), RaplSource(str(tree.root))],
        store="store.sqlite3", read_timeout_s=5.0)
    ledger, path = engine.ledger, engine.ledger.path
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


def test_wall_clock_steps_do_not_change_the_schedule(tmp_path, monkeypatch, make_engine):
    """In-process, the real schedule (``Engine.run``) while ``time.time`` jumps an hour
    forward, then two hours back: ticks stay 1 s apart on the monotonic clock and
    every reading's energy matches its monotonic interval."""
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=100.0)])
    # The real schedule in real time: the default tracker and read deadline, as in the daemon.
    engine = make_engine(sources=[NvmlGpuSource(SimulatedNvml(str(sim)))], store="store.sqlite3",
                         tracker=ProcessTracker(), read_timeout_s=None)
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

