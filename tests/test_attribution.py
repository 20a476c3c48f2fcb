"""Attribution splits device energy over jobs and conserves it exactly."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from wattprint.daemon.attribution import attribute
from wattprint.daemon.model import COMPONENTS, DeviceReading, GpuProcessUse
from wattprint.daemon.procs import JobIdentity, JobUsage, ProcessView


def ident(n: int) -> JobIdentity:
    return JobIdentity(job_id=f"j{n}", label=f"l{n}", label_source="WATTPRINT_JOB", uid=0, user="root",
                       command="python", root_pid=n, started_at=0.0)


def view(jobs, cpu_busy_s=0.0, mem_used=0):
    usages = tuple(JobUsage(identity=ident(n), pids=frozenset(pids), cpu_s=cpu, rss_bytes=rss)
                   for n, pids, cpu, rss in jobs)
    pid_to_job = {p: f"j{n}" for n, pids, _c, _r in jobs for p in pids}
    return ProcessView(jobs=usages, pid_to_job=pid_to_job, cpu_busy_s=cpu_busy_s, mem_used_bytes=mem_used, scanned=True)


def gpu(energy_j, procs, attributable=True):
    return DeviceReading(kind="gpu", device="gpu0", energy_j=energy_j, power_w=energy_j, source="counter",
                         interval_s=1.0, processes=tuple(procs), attributable=attributable)


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
