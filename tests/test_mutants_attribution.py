"""Attribution edge cases that mutation testing of daemon/attribution.py found
unguarded (issue 13, scripts/mutation.sh): the weakest-source rule in any order and
for unknown names, memory shares with a zero or one-byte entry, activity just above
zero, a view whose PID map names a job it does not list, and a one-byte memory total.
Every expected number is computed here from the readings and the view the test wrote."""

from __future__ import annotations

import pytest

from wattprint.daemon.attribution import GpuIdleFloor, attribute, gpu_process_energy_j, weaker_source
from wattprint.daemon.model import DeviceReading, GpuProcessUse
from wattprint.daemon.procs import JobIdentity, JobUsage, ProcessView


def ident(n: int) -> JobIdentity:
    return JobIdentity(job_id=f"j{n}", label=f"l{n}", label_source="WATTPRINT_JOB", uid=0, user="root",
                       command="python", root_pid=n, started_at=0.0)


def view(jobs, mem_used=0, pid_to_job=None):
    usages = tuple(JobUsage(identity=ident(n), pids=frozenset(pids), cpu_s=0.0, rss_bytes=rss)
                   for n, pids, rss in jobs)
    mapping = {p: f"j{n}" for n, pids, _r in jobs for p in pids} if pid_to_job is None else pid_to_job
    return ProcessView(jobs=usages, pid_to_job=mapping, cpu_busy_s=0.0, mem_used_bytes=mem_used, scanned=True)


def gpu(energy_j, procs, device="gpu0", source="counter"):
    return DeviceReading(kind="gpu", device=device, energy_j=energy_j, power_w=energy_j, source=source,
                         interval_s=1.0, processes=tuple(procs))


def test_weaker_source_in_either_order_and_unknown_names_count_as_estimates():
    assert weaker_source(None, "counter") == "counter"
    assert weaker_source("counter", "power") == "power"
    assert weaker_source("power", "counter") == "power"
    assert weaker_source("power", "estimate") == "estimate"
    assert weaker_source("estimate", "power") == "estimate"
    assert weaker_source("counter", "sensor-x") == "sensor-x"  # unknown: as weak as an estimate
    assert weaker_source("sensor-x", "counter") == "sensor-x"


def test_job_source_is_the_weakest_whatever_the_device_order():
    v = view([(1, [10], 0)])
    readings = [gpu(50.0, [GpuProcessUse(10, 1, 50)], device="gpu0", source="power"),
                gpu(70.0, [GpuProcessUse(10, 1, 50)], device="gpu1", source="counter")]
    a = attribute(readings, v)
    assert a.job_sources == {"j1": {"gpu": "power"}}
    assert a.job_energy_j["j1"]["gpu"] == 120.0


def test_a_process_with_zero_memory_gets_no_memory_share():
    v = view([(1, [10], 0), (2, [20], 0)])
    # No activity: split by memory. 0 bytes and 3000 bytes: all to the second.
    a = attribute([gpu(90.0, [GpuProcessUse(10, 0, 0), GpuProcessUse(20, 3000, 0)])], v)
    assert (a.job_energy_j["j1"]["gpu"], a.job_energy_j["j2"]["gpu"]) == (0.0, 90.0)
    # A total of one byte is still a memory split (1 : 0), not an equal one.
    a = attribute([gpu(90.0, [GpuProcessUse(10, 1, 0), GpuProcessUse(20, 0, 0)])], v)
    assert (a.job_energy_j["j1"]["gpu"], a.job_energy_j["j2"]["gpu"]) == (90.0, 0.0)


def test_one_percent_activity_is_activity():
    v = view([(1, [10], 0), (2, [20], 0)])
    # sm 1 % against 0 %, equal memory, no idle floor: the whole energy is active and
    # goes by activity share, all of it to the first (a memory split would give 45 / 45).
    a = attribute([gpu(90.0, [GpuProcessUse(10, 500, 1), GpuProcessUse(20, 500, 0)])], v)
    assert (a.job_energy_j["j1"]["gpu"], a.job_energy_j["j2"]["gpu"]) == (90.0, 0.0)
    # Below 1 % (0.5) counts too.
    a = attribute([gpu(90.0, [GpuProcessUse(10, 500, 0.5), GpuProcessUse(20, 500, 0)])], v)
    assert (a.job_energy_j["j1"]["gpu"], a.job_energy_j["j2"]["gpu"]) == (90.0, 0.0)


def test_pid_mapped_to_a_job_the_view_does_not_list_stays_unattributed():
    v = view([(1, [10], 0)], pid_to_job={10: "j1", 20: "j-gone"})
    a = attribute([gpu(80.0, [GpuProcessUse(10, 1, 75), GpuProcessUse(20, 1, 25)])], v)
    assert a.job_energy_j == {"j1": {"gpu": 60.0, "cpu": 0.0, "dram": 0.0, "other": 0.0}}
    assert a.unattributed_j["gpu"] == pytest.approx(20.0)


def test_dram_with_a_one_byte_memory_total():
    v = view([(1, [10], 1)], mem_used=1)
    a = attribute([DeviceReading("dram", "dram-0", 6.0, 6.0, "counter", 1.0)], v)
    assert a.job_energy_j["j1"]["dram"] == 6.0
    assert a.unattributed_j["dram"] == 0.0


def test_invisible_process_listed_first_does_not_hide_the_others():
    v = view([(1, [10], 0)])
    a = attribute([gpu(100.0, [GpuProcessUse(10_000_000, 1, 30, visible=False), GpuProcessUse(10, 1, 70)])], v)
    assert a.job_energy_j["j1"]["gpu"] == pytest.approx(70.0)
    assert a.gpu_invisible_j == pytest.approx(30.0)
    assert a.unattributed_j["gpu"] == pytest.approx(30.0)


def test_idle_share_with_less_than_a_cpu_second_of_job_time():
    """idle_policy "share": 0.5 CPU-s of job time in 2 CPU-s of capacity (1 CPU-s busy):
    active 40 x 1/2 = 20 J, the job's 0.5 of it 10 J; idle 20 J, all to the only job."""
    usages = (JobUsage(identity=ident(1), pids=frozenset({10}), cpu_s=0.5, rss_bytes=0),)
    v = ProcessView(jobs=usages, pid_to_job={10: "j1"}, cpu_busy_s=1.0, mem_used_bytes=0, scanned=True,
                    cpu_total_s=2.0)
    cpu = DeviceReading("cpu", "package-0", 40.0, 40.0, "counter", 1.0)
    a = attribute([cpu], v, idle_policy="share")
    assert a.job_energy_j["j1"]["cpu"] == pytest.approx(10.0 + 20.0)
    assert a.unattributed_j["cpu"] == pytest.approx(10.0)
    a = attribute([cpu], v)  # the default keeps idle energy unattributed
    assert a.job_energy_j["j1"]["cpu"] == pytest.approx(10.0)
    assert a.unattributed_j["cpu"] == pytest.approx(30.0)


def test_unknown_sources_tie_with_estimates():
    assert weaker_source("estimate", "sensor-x") == "estimate"  # as weak: the first stays
    assert weaker_source("sensor-x", "sensor-y") == "sensor-x"


def test_gpu_process_energy_without_a_floor_goes_by_activity():
    r = gpu(100.0, [GpuProcessUse(10, 3 << 30, 80), GpuProcessUse(20, 1 << 30, 20)])
    assert gpu_process_energy_j(r) == [80.0, 20.0]  # no idle floor known: no memory-share part


def test_a_process_of_no_job_listed_first_does_not_hide_the_jobs_gpu_time_and_memory():
    v = view([(1, [10], 0)])
    a = attribute([gpu(100.0, [GpuProcessUse(99, 1 << 30, 50), GpuProcessUse(10, 3 << 30, 50)])], v)
    assert a.gpu_seconds == {"j1": 1.0}
    assert a.gpu_memory_bytes == {"j1": 3 << 30}
    assert a.job_energy_j["j1"]["gpu"] == pytest.approx(50.0)


def test_idle_share_when_the_jobs_used_no_cpu():
    """idle_policy "share" with jobs at 0 CPU-s while other processes kept the CPU busy:
    the jobs get nothing (no division by their zero CPU time)."""
    usages = (JobUsage(identity=ident(1), pids=frozenset({10}), cpu_s=0.0, rss_bytes=0),)
    v = ProcessView(jobs=usages, pid_to_job={10: "j1"}, cpu_busy_s=1.0, mem_used_bytes=0, scanned=True,
                    cpu_total_s=2.0)
    a = attribute([DeviceReading("cpu", "package-0", 40.0, 40.0, "counter", 1.0)], v, idle_policy="share")
    assert a.job_energy_j["j1"]["cpu"] == 0.0
    assert a.unattributed_j["cpu"] == 40.0


def test_idle_floor_edges():
    floor = GpuIdleFloor()
    floor.observe([DeviceReading("gpu", "gpu0", 0.0, 0.0, "counter", 1.0),      # 0 W: a floor too
                   DeviceReading("gpu", "gpu1", 0.4, 0.8, "counter", 0.5),      # exactly the minimum interval
                   DeviceReading("gpu", "gpu2", 0.5, 0.5, "counter", 1.0)])     # half a joule
    assert floor.floor_w == {"gpu0": 0.0, "gpu1": 0.8, "gpu2": 0.5}


def test_all_memory_zero_without_activity_splits_equally():
    v = view([(1, [10], 0), (2, [20], 0)])
    a = attribute([gpu(90.0, [GpuProcessUse(10, 0, 0), GpuProcessUse(20, 0, 0)])], v)
    assert (a.job_energy_j["j1"]["gpu"], a.job_energy_j["j2"]["gpu"]) == (45.0, 45.0)


def test_idle_floor_part_over_a_half_second_and_under_a_joule():
    procs = [GpuProcessUse(10, 1 << 30, 50), GpuProcessUse(20, 3 << 30, 0)]
    # floor 10 W x 0.5 s = 5 J by memory (1 : 3), the other 15 J by activity (all to the first)
    r = DeviceReading("gpu", "gpu0", 20.0, 40.0, "counter", 0.5, tuple(procs))
    assert gpu_process_energy_j(r, 10.0) == [pytest.approx(5.0 / 4 + 15.0), pytest.approx(5.0 * 3 / 4)]
    # 0.5 J in a second with a 100 W floor: the idle part is capped at the 0.5 J, all by memory
    r = DeviceReading("gpu", "gpu0", 0.5, 0.5, "counter", 1.0, tuple(procs))
    assert gpu_process_energy_j(r, 100.0) == [pytest.approx(0.125), pytest.approx(0.375)]


def test_rounding_excess_of_a_large_device_is_taken_back():
    """7000 J in six equal shares add up to 9.1e-13 J more than the device (float
    rounding): the excess comes off one job, the remainder is 0, never negative."""
    jobs = [(n, [10 + n], 0) for n in range(6)]
    a = attribute([gpu(7000.0, [GpuProcessUse(10 + n, 1, 0) for n in range(6)])], view(jobs))
    assert a.unattributed_j["gpu"] == 0.0
    assert sum(e["gpu"] for e in a.job_energy_j.values()) <= 7000.0
