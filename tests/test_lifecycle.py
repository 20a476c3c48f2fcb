"""Lifecycle accounting (issue 16) below the daemon: the per-job arithmetic
(``job_lifecycle``: embodied, market-based, water, SCI), the occupancy split
(``occupancy``: GPU board-seconds from attribution's per-process split, MIG by
instance size, CPU, DRAM and platform by the energy shares), the job book's
conservation of embodied carbon (jobs + unattributed = the devices' amortised total)
and its per-tick record, and the store's occupancy (upsert per tick, restore,
retention). Every expected figure is hand arithmetic from the numbers the test sets."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from wattprint.daemon.attribution import attribute
from wattprint.daemon.carbon import IntensityBook
from wattprint.daemon.config import GridConfig
from wattprint.daemon.engine.book import UNATTRIBUTED_EMBODIED, JobBook
from wattprint.daemon.footprint.factors import Factor, Footprint, Market
from wattprint.daemon.footprint.lifecycle import job_lifecycle, occupancy
from wattprint.daemon.ledger import SCHEMA_VERSION, JobTick, Ledger, LedgerReader
from wattprint.daemon.model import DeviceReading, GpuProcessUse, Intensity
from wattprint.daemon.procs import JobIdentity, JobUsage, ProcessView

LIFE_S = 5 * 365.25 * 86400  # 5 years
GPU_KG, CPU_KG, DRAM_KG, PLATFORM_KG = 150.0, 30.0, 1.5, 200.0
SOCKETS, DRAM_GB = 2, 64.0
WUE, EWIF, PUE = 1.8, 3.0, 1.25
SHARE, CONTRACT, RESIDUAL = 0.6, 50.0, 500.0
V4_DDL = Path(__file__).parent / "fixtures" / "ledger" / "schema_v4.sql"
GIB = 1 << 30


def factor(name: str, value: float, unit: str) -> Factor:
    return Factor(name=name, value=value, unit=unit, source="test", version="test")


def footprint(share: float = SHARE, residual: float | None = RESIDUAL) -> Footprint:
    gpu = factor("gpu:datacenter", GPU_KG, "kgCO2e/device")
    return Footprint(
        version="test", service_life=factor("service_life", 5.0, "year"),
        cpu=factor("cpu", CPU_KG, "kgCO2e/socket"), dram=factor("dram", DRAM_KG, "kgCO2e/GB"),
        platform=factor("platform", PLATFORM_KG, "kgCO2e/server"),
        wue=factor("wue", WUE, "L/kWh"), ewif=factor("ewif", EWIF, "L/kWh"),
        market=Market(share=share, contract=factor("market.contract", CONTRACT, "gCO2e/kWh") if share else None,
                      residual=factor("market.residual", residual, "gCO2e/kWh") if residual is not None else None),
        cpu_sockets=SOCKETS, dram_gb=DRAM_GB,
        gpu_classes={c: gpu for c in ("datacenter", "consumer", "workstation", "amd_instinct", "instinct")},
    )


def ident(n: int) -> JobIdentity:
    return JobIdentity(job_id=f"j{n}", label=f"l{n}", label_source="WATTPRINT_JOB", uid=0, user="root",
                       command="python", root_pid=n, started_at=0.0)


def view(jobs: dict[int, tuple[float, int]], cpu_busy_s: float = 0.0, cpu_total_s: float = 0.0,
         mem_used: int = 0) -> ProcessView:
    """Job n holds PID 10 x n; ``jobs`` n -> (cpu_s, rss_bytes)."""
    usages = tuple(JobUsage(identity=ident(n), pids=frozenset({10 * n}), cpu_s=cpu, rss_bytes=rss)
                   for n, (cpu, rss) in jobs.items())
    return ProcessView(jobs=usages, pid_to_job={10 * n: f"j{n}" for n in jobs}, cpu_busy_s=cpu_busy_s,
                       mem_used_bytes=mem_used, scanned=True, cpu_total_s=cpu_total_s)


def gpu(device: str, energy_j: float, procs: tuple[GpuProcessUse, ...] = (), *, name: str = "NVIDIA H100 80GB HBM3",
        parent: str = "", board_share: float = 1.0, attributable: bool = True, interval_s: float = 1.0) -> DeviceReading:
    return DeviceReading("gpu", device, energy_j, energy_j / interval_s, "counter", interval_s, processes=procs,
                         name=name, parent=parent, board_share=board_share, attributable=attributable)


def mem_proc(pid: int, gib: int, visible: bool = True) -> GpuProcessUse:
    return GpuProcessUse(pid, gib * GIB, None, visible=visible)  # no utilisation: split by memory


def cpu(energy_j: float) -> DeviceReading:
    return DeviceReading("cpu", "package-0", energy_j, energy_j, "counter", 1.0)


def dram(energy_j: float) -> DeviceReading:
    return DeviceReading("dram", "dram-0", energy_j, energy_j, "counter", 1.0)


# -- job_lifecycle ---------------------------------------------------------------------

def test_job_lifecycle_is_the_documented_arithmetic():
    fp = footprint()
    energy_j = 7.2e6  # 2 kWh
    co2e = 2.0 * 300.0 * PUE  # location-based at 300 g/kWh
    occ = {"gpu:NVIDIA H100 80GB HBM3": 3600.0, "cpu": 7200.0, "dram": 64 * 3600.0, "platform": 3600.0}
    life = job_lifecycle(energy_j, co2e, occ, fp, PUE)
    embodied = (GPU_KG * 3600 + CPU_KG * 7200 + DRAM_KG * 64 * 3600 + PLATFORM_KG * 3600) * 1000 / LIFE_S
    assert life.embodied_co2e_g == pytest.approx(embodied, rel=1e-12)
    assert life.water_l == pytest.approx(2.0 * (WUE + PUE * EWIF), rel=1e-12)
    assert life.co2e_market_g == pytest.approx(PUE * 2.0 * 0.6 * CONTRACT + 0.4 * PUE * 2.0 * RESIDUAL, rel=1e-12)
    assert life.sci_g == pytest.approx(co2e + embodied, rel=1e-12)
    # a component mapping (the API's, with its "total") gives the same
    mapped = job_lifecycle({"gpu": 6e6, "cpu": 1e6, "dram": 2e5, "other": 0.0, "total": 7.2e6}, co2e, occ, fp, PUE)
    assert mapped == life


def test_market_without_residual_uses_location_for_the_rest_and_share_0_is_location():
    co2e = 2.0 * 300.0 * PUE
    no_residual = job_lifecycle(7.2e6, co2e, {}, footprint(residual=None), PUE)
    assert no_residual.co2e_market_g == pytest.approx(PUE * 2.0 * 0.6 * CONTRACT + 0.4 * co2e, rel=1e-12)
    assert job_lifecycle(7.2e6, co2e, {}, footprint(share=0.0, residual=None), PUE).co2e_market_g == co2e
    assert job_lifecycle(7.2e6, co2e, {}, footprint(), PUE).embodied_co2e_g == 0.0


# -- occupancy -------------------------------------------------------------------------

def test_gpu_board_seconds_follow_the_energy_split_and_the_rest_is_unattributed():
    """Memory split (no utilisation): job 1 3 GiB, job 2 1 GiB, a process of no job
    1 GiB, an invisible process 1 GiB -> 3/6 and 1/6 of the board-seconds; the GPU
    nobody uses and the non-attributable GPU are all unattributed."""
    fp = footprint()
    v = view({1: (0.0, 0), 2: (0.0, 0)})
    readings = [
        gpu("gpu0", 600.0, (mem_proc(10, 3), mem_proc(20, 1), mem_proc(99, 1), mem_proc(30, 1, visible=False)),
            interval_s=2.0),
        gpu("gpu1", 100.0),  # no process
        gpu("gpu2", 100.0, (mem_proc(10, 1),), attributable=False),
    ]
    att = attribute(readings, v)
    per_job, total = occupancy(att, readings, v, fp, 2.0)
    item = "gpu:NVIDIA H100 80GB HBM3"
    assert per_job["j1"][item] == pytest.approx(2.0 * 3 / 6)
    assert per_job["j2"][item] == pytest.approx(2.0 * 1 / 6)
    assert total[item] == pytest.approx(2.0 + 1.0 + 1.0)  # every board's own time


def test_gpu_share_uses_the_same_idle_floor_as_attribution():
    """Active split: job 1 at 100 % SM, job 2 memory-only (0 %); idle floor 50 W over
    1 s: job 2 gets the idle part by memory (1 GiB of 4) = 12.5 J of 250 J -> 0.05 board-s."""
    fp = footprint()
    v = view({1: (0.0, 0), 2: (0.0, 0)})
    readings = [gpu("gpu0", 250.0, (GpuProcessUse(10, 3 * GIB, 100.0), GpuProcessUse(20, 1 * GIB, 0.0)))]
    floors = {"gpu0": 50.0}
    att = attribute(readings, v, gpu_idle_floor_w=floors)
    per_job, _ = occupancy(att, readings, v, fp, 1.0, floors)
    item = "gpu:NVIDIA H100 80GB HBM3"
    assert per_job["j2"][item] == pytest.approx(50.0 * 0.25 / 250.0)
    assert per_job["j1"][item] == pytest.approx(1 - 50.0 * 0.25 / 250.0)
    assert att.job_energy_j["j2"]["gpu"] / 250.0 == pytest.approx(per_job["j2"][item])  # same split


def test_mig_3g_instance_of_7_slices_books_3_7_of_the_board_under_the_boards_model():
    fp = footprint()
    v = view({1: (0.0, 0)})
    board = "NVIDIA A100-SXM4-40GB"
    readings = [
        gpu("gpu0-mig1", 300.0, (mem_proc(10, 4),), name="NVIDIA A100-SXM4-40GB MIG 3g.20gb", parent="gpu0",
            board_share=3 / 7),
        gpu("gpu0-mig2", 400.0, (), name="NVIDIA A100-SXM4-40GB MIG 4g.20gb", parent="gpu0", board_share=4 / 7),
        gpu("gpu0", 0.0, (), name=board, board_share=0.0, attributable=False),
    ]
    att = attribute(readings, v)
    per_job, total = occupancy(att, readings, v, fp, 1.0)  # one 1-s tick
    assert per_job["j1"][f"gpu:{board}"] == pytest.approx(3 / 7)
    assert per_job["j1"]["platform"] == pytest.approx(300.0 / 700.0)  # its measured share
    assert total == {f"gpu:{board}": pytest.approx(1.0), "cpu": 2.0, "dram": 64.0, "platform": 1.0}
    life = job_lifecycle(0.0, 0.0, {f"gpu:{board}": 10 * 3 / 7}, fp, 1.0)  # ten such ticks
    assert life.embodied_co2e_g == pytest.approx(GPU_KG * 1000 * (10 * 3 / 7) / LIFE_S, rel=1e-12)


def test_cpu_dram_and_platform_follow_the_energy_shares():
    """CPU: 4 CPUs x 1 s capacity, 2 s busy (job 1 1.5 s, job 2 0.5 s): active half of
    80 J = 40 J, split 3:1 -> job 1 30 J of 80 -> 30/80 x 2 sockets. DRAM: RSS 16 GiB and
    16 GiB of 64 GiB used -> 1/4 x 64 GB each. Platform: measured J shares."""
    fp = footprint()
    v = view({1: (1.5, 16 * GIB), 2: (0.5, 16 * GIB)}, cpu_busy_s=2.0, cpu_total_s=4.0, mem_used=64 * GIB)
    readings = [cpu(80.0), dram(20.0), gpu("gpu0", 100.0, (mem_proc(10, 1),))]
    att = attribute(readings, v)
    per_job, total = occupancy(att, readings, v, fp, 1.0)
    assert per_job["j1"]["cpu"] == pytest.approx(30.0 / 80.0 * SOCKETS)
    assert per_job["j2"]["cpu"] == pytest.approx(10.0 / 80.0 * SOCKETS)
    assert per_job["j1"]["dram"] == pytest.approx(0.25 * DRAM_GB) and per_job["j2"]["dram"] == pytest.approx(16.0)
    # job 1 measured: gpu 100 + cpu 30 + dram 5 = 135 of 200; job 2: 10 + 5 = 15
    assert per_job["j1"]["platform"] == pytest.approx(135.0 / 200.0)
    assert per_job["j2"]["platform"] == pytest.approx(15.0 / 200.0)
    assert total["cpu"] == SOCKETS and total["dram"] == DRAM_GB and total["platform"] == 1.0


# -- the job book ----------------------------------------------------------------------

def make_book(tmp_path: Path, fp: Footprint) -> tuple[JobBook, Ledger]:
    ledger = Ledger(str(tmp_path / "s.sqlite3"), host="h", bucket_s=60)
    return JobBook(ledger, PUE, 300.0, 200, fp), ledger


STATIC = IntensityBook(GridConfig(), "static", "static", 300.0)


def test_embodied_is_conserved_jobs_plus_unattributed_equal_the_devices_amortised_total(tmp_path):
    """4 H100 boards, 2 sockets, 64 GB, one server, 5 ticks of 1 s. Job 1 holds gpu0 and
    gpu1 alone, uses 1.5 of 2 busy CPU-s (4 CPU capacity) and 16 GiB of 64; job 2 holds
    half of gpu2 by memory. Hand truth: device total per tick = (4 x 150 + 2 x 30 + 64 x
    1.5 + 200) kg x 1000 / life x 1 s."""
    fp = footprint()
    book, ledger = make_book(tmp_path, fp)
    v = view({1: (1.5, 16 * GIB), 2: (0.5, 16 * GIB)}, cpu_busy_s=2.0, cpu_total_s=4.0, mem_used=64 * GIB)
    readings = [gpu("gpu0", 300.0, (mem_proc(10, 8),)), gpu("gpu1", 300.0, (mem_proc(10, 8),)),
                gpu("gpu2", 200.0, (mem_proc(20, 2), mem_proc(99, 2))), gpu("gpu3", 60.0),
                cpu(80.0), dram(20.0)]
    per_tick_device_g = (4 * GPU_KG + SOCKETS * CPU_KG + DRAM_GB * DRAM_KG + PLATFORM_KG) * 1000 / LIFE_S
    embodied_records = []
    for k in range(5):
        att = attribute(readings, v)
        booked = book.book_tick(1_795_000_000.0 + k, readings, v, att, STATIC, 1.0)
        ledger.record_ticks([booked.row])
        embodied_records.append(dict(booked.record.job_embodied_co2e_g))
    snap = book.snapshot(1_795_000_005.0, STATIC.lookup(1_795_000_005.0), 0.0, 0.0, (), dict(book.counters), {})
    jobs = {j.job_id: j for j in snap.jobs}
    # job 1: 2 boards x 5 s; cpu 30/80 x 2 x 5; dram 1/4 x 64 x 5; platform 735/... (measured shares)
    measured_total = 300 + 300 + 200 + 60 + 80 + 20
    j1_measured = 300 + 300 + 30 + 5
    j1_truth = (GPU_KG * 10 + CPU_KG * 30 / 80 * 2 * 5 + DRAM_KG * 16 * 5
                + PLATFORM_KG * j1_measured / measured_total * 5) * 1000 / LIFE_S
    assert jobs["j1"].embodied_co2e_g == pytest.approx(j1_truth, rel=1e-9)
    total_jobs = sum(j.embodied_co2e_g for j in snap.jobs)
    assert total_jobs + snap.counters[UNATTRIBUTED_EMBODIED] == pytest.approx(5 * per_tick_device_g, rel=1e-9)
    assert snap.counters[UNATTRIBUTED_EMBODIED] > 0
    # the record carries this tick's grams: they add up to the job's total
    assert sum(r["j1"] for r in embodied_records) == pytest.approx(j1_truth, rel=1e-9)
    # water and market from the job's energy and CO2e (static 300 g/kWh)
    e1 = sum(jobs["j1"].energy_j.values())
    assert jobs["j1"].water_l == pytest.approx(e1 / 3.6e6 * (WUE + PUE * EWIF), rel=1e-9)
    assert jobs["j1"].co2e_g == pytest.approx(e1 / 3.6e6 * 300.0 * PUE, rel=1e-9)
    kwh1 = e1 / 3.6e6
    assert jobs["j1"].co2e_market_g == pytest.approx(PUE * kwh1 * (0.6 * CONTRACT + 0.4 * RESIDUAL), rel=1e-9)
    # the bucket's market grams beside its location grams (all 5 ticks are in one bucket)
    assert booked.record.bucket_co2e_market_g["j1"] == pytest.approx(jobs["j1"].co2e_market_g, rel=1e-9)
    # the store has the occupancy; a new book continues it (restore)
    stored = ledger.job_occupancy(["j1"])["j1"]
    assert stored["gpu:NVIDIA H100 80GB HBM3"] == pytest.approx(10.0)
    book2 = JobBook(ledger, PUE, 300.0, 200, fp)
    book2.restore(ledger.running_jobs(), {"j1": jobs["j1"].co2e_g})
    snap2 = book2.snapshot(1_795_000_006.0, STATIC.lookup(1_795_000_006.0), 0.0, 0.0, (), {}, {})
    assert {j.job_id: j for j in snap2.jobs}["j1"].embodied_co2e_g == pytest.approx(j1_truth, rel=1e-9)
    ledger.close()


# -- the store ---------------------------------------------------------------------------

JOB = JobIdentity(job_id="7-1", label="old", label_source="WATTPRINT_JOB", uid=0, user="root", command="python",
                  root_pid=7, started_at=1000.0)
STATIC_I = Intensity(400.0, "final", "static", "DK1", "static")


def _v4_store(path: str) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(V4_DDL.read_text())
    conn.execute("INSERT INTO meta VALUES ('schema_version', '4')")
    conn.execute("""INSERT INTO jobs (id, host, label, label_source, uid, user, command, root_pid, state,
                                      started_at, last_seen, gpu_j, cpu_j, dram_j, sources)
                    VALUES ('7-1', 'h', 'old', 'WATTPRINT_JOB', 0, 'root', 'python', 7, 'running',
                            1000.0, 1010.0, 360.0, 36.0, 3.6, '{"gpu": "counter"}')""")
    conn.execute("INSERT INTO job_buckets VALUES ('7-1', 960, 'gpu', 360.0)")
    conn.commit()
    conn.close()


def test_a_v4_store_is_read_as_is_and_migrated_to_v5_with_empty_occupancy(tmp_path):
    path = str(tmp_path / "s.sqlite3")
    _v4_store(path)
    reader = LedgerReader(path, footprint=footprint())  # a CLI before any v5 daemon opened it
    try:
        old = reader.job("7-1", now=2000.0)
        assert old["occupancy_s"] == {} and old["embodied_co2e_g"] == 0.0
    finally:
        reader.close()
    led = Ledger(path, host="h", bucket_s=60)
    try:
        assert SCHEMA_VERSION == 5
        assert led.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "5"
        assert led.job_occupancy(["7-1"]) == {}
        occ = {"gpu:NVIDIA H100 80GB HBM3": 1.0, "cpu": 2.0}
        for t in (1020.0, 1021.0):  # upserted: the second tick adds to the first
            led.record_tick(t, [JobTick(JOB, {"gpu": 100.0}, 1.0, 0, {"gpu": "counter"}, occupancy_s=occ)],
                            [("gpu", "gpu0", 100.0, "counter")], {}, STATIC_I)
        assert led.job_occupancy(["7-1"]) == {"7-1": {"gpu:NVIDIA H100 80GB HBM3": 2.0, "cpu": 4.0}}
    finally:
        led.close()
    reader = LedgerReader(path, pue=1.0, footprint=footprint())
    try:
        job = reader.job("7-1", now=2000.0)
        assert job["occupancy_s"] == {"cpu": 4.0, "gpu:NVIDIA H100 80GB HBM3": 2.0}
        assert job["embodied_co2e_g"] == pytest.approx((GPU_KG * 2 + CPU_KG * 4) * 1000 / LIFE_S, rel=1e-12)
        assert [f["name"] for f in job["factors"]][:2] == ["cpu", "gpu:NVIDIA H100 80GB HBM3"]
        assert {"service_life", "wue", "ewif", "market.contract", "market.residual"} <= {f["name"] for f in job["factors"]}
        listed = reader.jobs(now=2000.0)[0]
        assert listed["embodied_co2e_g"] == job["embodied_co2e_g"] and "factors" not in listed
    finally:
        reader.close()


def test_retention_deletes_the_occupancy_of_deleted_jobs_only(tmp_path):
    led = Ledger(str(tmp_path / "s.sqlite3"), host="h", bucket_s=60)
    try:
        other = JobIdentity(job_id="8-1", label="new", label_source="WATTPRINT_JOB", uid=0, user="root",
                            command="python", root_pid=8, started_at=1000.0)
        for ident in (JOB, other):
            led.record_tick(1020.0, [JobTick(ident, {"gpu": 1.0}, 1.0, 0, {}, occupancy_s={"platform": 1.0})],
                            [("gpu", "gpu0", 2.0, "counter")], {}, STATIC_I)
        led.record_tick(1030.0, [], [], {}, STATIC_I, ended=[("7-1", 1030.0)])
        led.record_tick(100_000.0, [JobTick(other, {"gpu": 1.0}, 1.0, 0, {})], [("gpu", "gpu0", 1.0, "counter")],
                        {}, STATIC_I)
        deleted = led.prune(50_000.0)
        assert deleted["jobs"] == 1 and deleted["job_occupancy"] == 1
        assert led.job_occupancy(["7-1", "8-1"]) == {"8-1": {"platform": 1.0}}
    finally:
        led.close()


def test_a_3g_instance_of_7_slices_on_the_simulated_nvml_books_3_7_of_the_board(tmp_path):
    """From the simulated NVML through the GPU source to occupancy: a job alone on a 3g
    instance of a 7-slice A100 for 4 s of the sim's clock gets 4 x 3/7 board-seconds
    under the board's own model name; the free slices stay unattributed."""
    from gpusim import FakeClock, gpu as sim_gpu, mig_instance, proc, write_sim
    from wattprint.daemon.sources.gpu import NvmlGpuSource
    from wattprint.daemon.sources.nvml_sim import SimulatedNvml

    board = "NVIDIA A100-SXM4-40GB"
    sim = tmp_path / "sim.json"
    write_sim(sim, [sim_gpu(0, 700.0, name=board, mig=True,
                            mig_instances=[mig_instance(1, "3g.20gb"), mig_instance(2, "2g.10gb")],
                            processes=[proc(10, 1 << 30, gi_id=1)])])
    clock = FakeClock()
    src = NvmlGpuSource(SimulatedNvml(str(sim), clock=clock), pid_exists=lambda pid: True, clock=clock,
                        run_probe=lambda probe: probe(), init_retry_s=0.0, pid_namespace_initial=True,
                        driver_gpus_dir=None)
    fp = footprint()
    v = view({1: (0.0, 0)})
    job_s = total_s = 0.0
    src.read(clock.t)
    for _ in range(4):
        clock.t += 1.0
        readings = src.read(clock.t)
        per_job, total = occupancy(attribute(readings, v), readings, v, fp, 1.0)
        job_s += per_job["j1"][f"gpu:{board}"]
        total_s += total[f"gpu:{board}"]
    src.close()
    assert job_s == pytest.approx(4 * 3 / 7, rel=1e-9)
    assert total_s == pytest.approx(4.0, rel=1e-9)  # instances 3/7 + 2/7 and the board's own 2/7
