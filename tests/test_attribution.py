"""Attribution splits device energy over jobs and conserves it exactly."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from wattprint.daemon.attribution import GpuIdleFloor, attribute
from wattprint.daemon.model import COMPONENTS, DeviceReading, GpuProcessUse
from wattprint.daemon.procs import JobIdentity, JobUsage, ProcessView


def ident(n: int) -> JobIdentity:
    return JobIdentity(job_id=f"j{n}", label=f"l{n}", label_source="WATTPRINT_JOB", uid=0, user="root",
                       command="python", root_pid=n, started_at=0.0)


def view(jobs, cpu_busy_s=0.0, mem_used=0, cpu_total_s=0.0):
    usages = tuple(JobUsage(identity=ident(n), pids=frozenset(pids), cpu_s=cpu, rss_bytes=rss)
                   for n, pids, cpu, rss in jobs)
    pid_to_job = {p: f"j{n}" for n, pids, _c, _r in jobs for p in pids}
    return ProcessView(jobs=usages, pid_to_job=pid_to_job, cpu_busy_s=cpu_busy_s, mem_used_bytes=mem_used, scanned=True,
                       cpu_total_s=cpu_total_s)


def gpu(energy_j, procs, attributable=True, device="gpu0", interval_s=1.0, source="counter", parent=""):
    return DeviceReading(kind="gpu", device=device, energy_j=energy_j, power_w=energy_j / interval_s if interval_s else 0.0,
                         source=source, interval_s=interval_s, processes=tuple(procs), attributable=attributable,
                         parent=parent)


def test_gpu_split_by_sm_share():
    v = view([(1, [10], 0, 0), (2, [20], 0, 0)])
    a = attribute([gpu(400.0, [GpuProcessUse(10, 1, 75), GpuProcessUse(20, 1, 25)])], v)
    assert a.job_energy_j["j1"]["gpu"] == pytest.approx(300.0)
    assert a.job_energy_j["j2"]["gpu"] == pytest.approx(100.0)
    assert a.unattributed_j["gpu"] == pytest.approx(0.0)
    assert a.gpu_seconds == {"j1": 1.0, "j2": 1.0}


def test_gpu_memory_share_fallback_and_sole_process():
    v = view([(1, [10], 0, 0), (2, [20], 0, 0)])
    a = attribute([gpu(100.0, [GpuProcessUse(10, 3000, 0), GpuProcessUse(20, 1000, None)])], v)
    assert a.job_energy_j["j1"]["gpu"] == pytest.approx(75.0)
    a = attribute([gpu(100.0, [GpuProcessUse(10, None, None)])], v)
    assert a.job_energy_j["j1"]["gpu"] == pytest.approx(100.0)


def test_gpu_unknown_process_and_mig_stay_unattributed():
    v = view([(1, [10], 0, 0)])
    a = attribute([gpu(100.0, [GpuProcessUse(10, 1, 50), GpuProcessUse(99, 1, 50)])], v)
    assert a.job_energy_j["j1"]["gpu"] == pytest.approx(50.0)
    assert a.unattributed_j["gpu"] == pytest.approx(50.0)
    a = attribute([gpu(100.0, [GpuProcessUse(10, 1, 50)], attributable=False)], v)
    assert a.job_energy_j["j1"]["gpu"] == 0.0
    assert a.unattributed_j["gpu"] == pytest.approx(100.0)


def test_cpu_by_cpu_time_share_and_dram_by_rss():
    v = view([(1, [10], 1.0, 1 << 30), (2, [20], 0.5, 1 << 30)], cpu_busy_s=2.0, mem_used=4 << 30)
    readings = [
        DeviceReading("cpu", "package-0", 60.0, 60.0, "counter", 1.0),
        DeviceReading("cpu", "package-1", 40.0, 40.0, "counter", 1.0),
        DeviceReading("dram", "dram-0", 8.0, 8.0, "counter", 1.0),
    ]
    a = attribute(readings, v)
    assert a.job_energy_j["j1"]["cpu"] == pytest.approx(50.0)
    assert a.job_energy_j["j2"]["cpu"] == pytest.approx(25.0)
    assert a.unattributed_j["cpu"] == pytest.approx(25.0)
    assert a.job_energy_j["j1"]["dram"] == pytest.approx(2.0)
    assert a.unattributed_j["dram"] == pytest.approx(4.0)


def test_cpu_share_never_exceeds_device_when_jobs_outrun_busy_counter():
    v = view([(1, [10], 3.0, 0)], cpu_busy_s=2.0)
    a = attribute([DeviceReading("cpu", "package-0", 10.0, 10.0, "counter", 1.0)], v)
    assert a.job_energy_j["j1"]["cpu"] == pytest.approx(10.0)
    assert a.unattributed_j["cpu"] == pytest.approx(0.0)


@given(
    energies=st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=4),
    sm=st.lists(st.one_of(st.none(), st.floats(0, 100)), min_size=1, max_size=5),
    cpu=st.lists(st.floats(0, 64), min_size=0, max_size=4),
    busy=st.floats(0, 128),
)
def test_conservation_property(energies, sm, cpu, busy):
    jobs = [(i, [100 + i], c, 1000 * i) for i, c in enumerate(cpu)]
    v = view(jobs, cpu_busy_s=busy, mem_used=10_000)
    procs = [GpuProcessUse(100 + i, 10 * i, s) for i, s in enumerate(sm)]
    readings = [gpu(energies[0], procs)] + [
        DeviceReading("cpu" if i % 2 else "dram", f"d{i}", e, e, "counter", 1.0) for i, e in enumerate(energies[1:])
    ]
    a = attribute(readings, v)
    for c in COMPONENTS:
        jobs_sum = sum(e[c] for e in a.job_energy_j.values())
        assert jobs_sum >= -1e-9
        assert jobs_sum + a.unattributed_j[c] == pytest.approx(a.device_j[c], rel=1e-12, abs=1e-6)
        assert a.unattributed_j[c] >= -1e-6 * max(1.0, a.device_j[c])


# --- GPU attribution rules (docs/jobs.md "GPU attribution rules"). Every expected figure
# below is worked out by hand from the readings the test builds.

GIB = 1 << 30


def P(pid, mem=GIB, sm=None, enc=None, dec=None, visible=True, kind="compute"):  # noqa: N802
    return GpuProcessUse(pid=pid, used_memory_bytes=mem, sm_util_pct=sm, enc_util_pct=enc, dec_util_pct=dec,
                         visible=visible, kind=kind)


def test_invisible_process_keeps_its_share_as_unattributed():
    # 200 J; the job's process at 10 % SM, a process of another PID namespace at 90 %.
    v = view([(1, [10], 0, 0)])
    a = attribute([gpu(200.0, [P(10, sm=10), P(77, sm=90, visible=False)])], v)
    assert a.job_energy_j["j1"]["gpu"] == pytest.approx(20.0)  # 10 % of 200 J, not 100 %
    assert a.unattributed_j["gpu"] == pytest.approx(180.0)
    assert a.gpu_invisible_j == pytest.approx(180.0)


def test_invisible_pid_that_matches_a_job_pid_is_not_the_job():
    # A host PID (visible=False) whose number happens to be a job's PID in our namespace.
    v = view([(1, [10], 0, 0)])
    a = attribute([gpu(100.0, [P(10, sm=50, visible=False), P(11, sm=50)])], v)
    assert a.job_energy_j["j1"]["gpu"] == 0.0
    assert a.unattributed_j["gpu"] == pytest.approx(100.0)
    assert a.gpu_invisible_j == pytest.approx(50.0)  # pid 11 is visible but no job's: unattributed, not invisible
    assert "j1" not in a.gpu_seconds and "j1" not in a.gpu_memory_bytes
    a = attribute([gpu(100.0, [P(10, sm=None, visible=False)])], v)  # sole process, invisible
    assert a.job_energy_j["j1"]["gpu"] == 0.0 and a.gpu_invisible_j == pytest.approx(100.0)


def test_memory_only_process_shares_the_idle_floor_only():
    # 500 J over 2 s; idle floor 50 W -> idle part 100 J, split by memory 30:10 GiB;
    # the active 400 J go to the only process with activity.
    v = view([(1, [10], 0, 0), (2, [20], 0, 0)])
    r = gpu(500.0, [P(10, mem=30 * GIB, sm=80), P(20, mem=10 * GIB)], interval_s=2.0)
    a = attribute([r], v, gpu_idle_floor_w={"gpu0": 50.0})
    assert a.job_energy_j["j1"]["gpu"] == pytest.approx(75.0 + 400.0)
    assert a.job_energy_j["j2"]["gpu"] == pytest.approx(25.0)
    assert a.unattributed_j["gpu"] == pytest.approx(0.0)
    # No floor known for this GPU: activity share alone (the memory-only process: 0).
    a = attribute([r], v)
    assert a.job_energy_j["j1"]["gpu"] == pytest.approx(500.0)
    assert a.job_energy_j["j2"]["gpu"] == 0.0
    # A floor above the GPU's power: the idle part is capped at the energy.
    a = attribute([r], v, gpu_idle_floor_w={"gpu0": 1000.0})
    assert a.job_energy_j["j1"]["gpu"] == pytest.approx(375.0)
    assert a.job_energy_j["j2"]["gpu"] == pytest.approx(125.0)


def test_no_activity_splits_by_memory_or_equally():
    v = view([(1, [10], 0, 0), (2, [20], 0, 0), (3, [30], 0, 0)])
    a = attribute([gpu(90.0, [P(10, mem=4 * GIB, sm=0), P(20, mem=2 * GIB), P(30, mem=3 * GIB, sm=None)])], v,
                  gpu_idle_floor_w={"gpu0": 10.0})
    assert [a.job_energy_j[j]["gpu"] for j in ("j1", "j2", "j3")] == pytest.approx([40.0, 20.0, 30.0])
    # One process without a memory figure: equal shares.
    a = attribute([gpu(90.0, [P(10, mem=4 * GIB), P(20, mem=None), P(30, mem=3 * GIB)])], v)
    assert [a.job_energy_j[j]["gpu"] for j in ("j1", "j2", "j3")] == pytest.approx([30.0, 30.0, 30.0])


def test_idle_floor_learned_from_empty_intervals_only():
    floor = GpuIdleFloor()
    floor.observe([gpu(0.0, [], interval_s=0.0),  # the baseline read: no interval
                   gpu(0.0, [], interval_s=0.01),  # too short to say anything (a merged late read)
                   gpu(140.0, [], interval_s=2.0),  # 70 W, nobody on it
                   gpu(900.0, [P(10, sm=0)], device="gpu1", interval_s=2.0),  # held: not an idle sample
                   gpu(80.0, [], device="gpu2", attributable=False)])
    assert floor.floor_w == {"gpu0": 70.0}
    floor.observe([gpu(60.0, [], interval_s=1.0), gpu(400.0, [], interval_s=1.0)])
    assert floor.floor_w == {"gpu0": 60.0}


def test_encoder_and_decoder_work_counts():
    # ffmpeg at 5 % SM but 40 % NVENC weighs 40; a trainer at 80 % SM weighs 80.
    v = view([(1, [10], 0, 0), (2, [20], 0, 0)])
    a = attribute([gpu(300.0, [P(10, sm=5, enc=40), P(20, sm=80)])], v)
    assert a.job_energy_j["j1"]["gpu"] == pytest.approx(100.0)
    assert a.job_energy_j["j2"]["gpu"] == pytest.approx(200.0)
    # Decoder alone (no SM sample at all) against SM work: 60 vs 20.
    a = attribute([gpu(300.0, [P(10, dec=60), P(20, sm=20, enc=0, dec=0)])], v)
    assert a.job_energy_j["j1"]["gpu"] == pytest.approx(225.0)
    assert a.job_energy_j["j2"]["gpu"] == pytest.approx(75.0)


def test_mps_clients_by_their_samples_server_share_unattributed():
    # MPS: the server (pid 5, no job) holds memory with no sample of its own; two clients.
    v = view([(1, [10], 0, 0), (2, [20], 0, 0)])
    procs = [P(5, mem=2 * GIB), P(10, mem=GIB, sm=30, kind="mps"), P(20, mem=GIB, sm=10, kind="mps")]
    a = attribute([gpu(400.0, procs)], v)
    assert a.job_energy_j["j1"]["gpu"] == pytest.approx(300.0)
    assert a.job_energy_j["j2"]["gpu"] == pytest.approx(100.0)
    assert a.unattributed_j["gpu"] == pytest.approx(0.0)
    # With a 100 W floor over 1 s: the server holds half the memory, so half of the 100 J
    # idle part stays unattributed; clients get 25 J each plus 300 J active at 3:1.
    a = attribute([gpu(400.0, procs)], v, gpu_idle_floor_w={"gpu0": 100.0})
    assert a.job_energy_j["j1"]["gpu"] == pytest.approx(25.0 + 225.0)
    assert a.job_energy_j["j2"]["gpu"] == pytest.approx(25.0 + 75.0)
    assert a.unattributed_j["gpu"] == pytest.approx(50.0)
    assert a.gpu_invisible_j == 0.0
    # Samples reported only for the server: the activity is the server's; no client is charged.
    procs = [P(5, mem=2 * GIB, sm=60), P(10, mem=GIB, kind="mps"), P(20, mem=GIB, kind="mps")]
    a = attribute([gpu(400.0, procs)], v)
    assert a.job_energy_j["j1"]["gpu"] == 0.0 and a.unattributed_j["gpu"] == pytest.approx(400.0)


def test_mig_instance_readings_are_gpus_of_their_own():
    # Board gpu0 split by the collector: 50 J not in any instance, instance 1 (200 J, two
    # processes, no utilisation on MIG: memory share 1:3), instance 2 (100 J, one process).
    v = view([(1, [10, 11], 0, 0), (2, [20], 0, 0)])
    readings = [
        gpu(50.0, []),
        gpu(200.0, [P(10, mem=10 * GIB), P(20, mem=30 * GIB)], device="gpu0-mig1", parent="gpu0"),
        gpu(100.0, [P(11, mem=5 * GIB)], device="gpu0-mig2", parent="gpu0"),
    ]
    a = attribute(readings, v)
    assert a.job_energy_j["j1"]["gpu"] == pytest.approx(50.0 + 100.0)
    assert a.job_energy_j["j2"]["gpu"] == pytest.approx(150.0)
    assert a.unattributed_j["gpu"] == pytest.approx(50.0)
    assert a.device_j["gpu"] == pytest.approx(350.0)
    assert a.gpu_seconds == {"j1": 2.0, "j2": 1.0}  # j1 held two instances for 1 s each
    assert a.gpu_memory_bytes == {"j1": 15 * GIB, "j2": 30 * GIB}


@pytest.mark.parametrize("policy, j1, j2, unattributed", [
    # 100 J; 4 CPUs x 2 s = 8 CPU-s capacity, 2 busy: active 25 J, idle 75 J.
    # Active by busy CPU time (j1 1.0 s, j2 0.5 s of 2.0 s busy): 12.5 and 6.25.
    ("unattributed", 12.5, 6.25, 81.25),
    # "share": the 75 J idle go to the jobs by their CPU time 1.0 : 0.5 -> 50 and 25.
    ("share", 62.5, 31.25, 6.25),
])
def test_cpu_idle_policies_with_idle_time(policy, j1, j2, unattributed):
    v = view([(1, [10], 1.0, 0), (2, [20], 0.5, 0)], cpu_busy_s=2.0, cpu_total_s=8.0)
    a = attribute([DeviceReading("cpu", "package-0", 100.0, 50.0, "counter", 2.0)], v, idle_policy=policy)
    assert a.job_energy_j["j1"]["cpu"] == pytest.approx(j1)
    assert a.job_energy_j["j2"]["cpu"] == pytest.approx(j2)
    assert a.unattributed_j["cpu"] == pytest.approx(unattributed)


def test_job_sources_name_only_the_devices_that_gave_it_energy():
    v = view([(1, [10], 1.0, GIB), (2, [20], 0.0, 0)], cpu_busy_s=1.0, mem_used=2 * GIB)
    readings = [
        gpu(100.0, [P(10, sm=50)], device="gpu0", source="counter"),
        gpu(30.0, [], device="gpu1", source="power"),  # idle, power-only: gives nobody anything
        gpu(40.0, [P(20, sm=0)], device="gpu2", source="power"),
        DeviceReading("cpu", "package-0", 10.0, 10.0, "counter", 1.0),
        DeviceReading("dram", "dram-0", 4.0, 4.0, "estimate", 1.0),
    ]
    a = attribute(readings, v)
    assert a.job_sources["j1"] == {"gpu": "counter", "cpu": "counter", "dram": "estimate"}
    assert a.job_sources["j2"] == {"gpu": "power"}  # no CPU time, no memory: no cpu/dram source
    # The job on both a counter and a power GPU: the weaker names it.
    v = view([(1, [10, 11], 0.0, 0)])
    a = attribute([gpu(100.0, [P(10)], device="gpu0"), gpu(10.0, [P(11)], device="gpu1", source="power")], v)
    assert a.job_sources["j1"] == {"gpu": "power"}


@given(
    energy=st.floats(0, 1e6, allow_nan=False),
    procs=st.lists(st.tuples(
        st.one_of(st.none(), st.integers(0, 1 << 40)),  # memory
        st.one_of(st.none(), st.floats(0, 100)), st.one_of(st.none(), st.floats(0, 100)),  # sm, enc
        st.booleans(), st.booleans()),  # visible, in a job
        min_size=0, max_size=6),
    floor_w=st.one_of(st.none(), st.floats(0, 2e6)),
    interval=st.floats(0, 10),
)
def test_gpu_conservation_property(energy, procs, floor_w, interval):
    uses = [P(100 + i, mem=m, sm=s, enc=e, visible=vis) for i, (m, s, e, vis, _j) in enumerate(procs)]
    jobs = [(i, [100 + i], 0.0, 0) for i, (*_x, in_job) in enumerate(procs) if in_job]
    r = gpu(energy, uses, interval_s=interval)
    a = attribute([r], view(jobs), gpu_idle_floor_w=None if floor_w is None else {"gpu0": floor_w})
    jobs_sum = sum(e["gpu"] for e in a.job_energy_j.values())
    assert all(e["gpu"] >= 0 for e in a.job_energy_j.values())
    assert jobs_sum + a.unattributed_j["gpu"] == pytest.approx(energy, rel=1e-9, abs=1e-6)
    assert 0 <= a.gpu_invisible_j <= a.unattributed_j["gpu"] + 1e-6 * max(1.0, energy)
    if procs and not any(vis for *_x, vis, _j in procs):
        assert a.gpu_invisible_j == pytest.approx(energy, rel=1e-9, abs=1e-6)
