"""The fault matrix, the process table (issue 7): /proc races, a stream of short-lived
labelled processes and a job whose children come and go, under the real daemon and the
tracker in-process. What every case checks: tests/faults_common.py.
"""

from __future__ import annotations

import os
import time

import pytest
from daemon_harness import sample, wait_ticks
from e2e_truth import CLK_TCK, CPU_ABS_S, CPU_REL, descendants, follow
from faults_common import (
    Cadence,
    assert_conserved,
    assert_no_traceback,
    assert_part,
    energy,
    log_lines,
    make_daemon,
    my_jobs,
    wait_job,
)
from gpusim import gpu, proc, write_sim
from powercap import PowercapTree
from processes import Processes
from wattprint.daemon.procs import ProcessTracker

_CHURN = """
import os, subprocess, sys, time
tag = sys.argv[1]
env = {k: v for k, v in os.environ.items() if k != "WATTPRINT_JOB"}
kids = []
i = 0
while True:
    env["WATTPRINT_JOB"] = f"race-{tag}-{i % 40}"
    kids.append(subprocess.Popen(["sleep", "0.0%d" % (1 + i % 9)], env=env))
    i += 1
    kids = [k for k in kids if k.poll() is None]
    time.sleep(0.02)
"""


def test_proc_races_short_lived_labelled_processes(tmp_path, labelled_process, tag):
    # A labelled job on the GPU whose children come and go all the time, and next to
    # it a stream of short-lived labelled processes (many jobs that end mid-read).
    # Energy: the main job's GPU, CPU and DRAM against truth from what the test controls
    # (tests/e2e_truth.py); each short-lived job's CPU energy at most the package rate x
    # its lifetime (plus the interval it was first booked in) x one CPU's share of the
    # machine, and all of theirs together at most the rate x their CPU time (the churn
    # process reaps them all: its cutime + cstime) / CPUs.
    main = labelled_process(f"race-main-{tag}", argv=["bash", "-c", "while :; do sleep 0.01 & sleep 0.02; wait; done"])
    churn = labelled_process(code=_CHURN, args=[tag])
    churn_reaped0 = reaped_cpu_ticks(churn.pid)
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=150.0, processes=[proc(main.pid, used_memory_bytes=None, sm_util=90)])])
    tree = PowercapTree(tmp_path / "powercap")
    zones = tree.add_package(0, dram=True)
    feeder = tree.start_feeding({zones["package"]: RACE_PKG_W, zones["dram"]: RACE_DRAM_W}, period_s=0.02)
    daemon = make_daemon(tmp_path, sim_file=sim, powercap_root=tree.root,
                           extra_toml="[jobs]\nrescan_interval_s = 1.0\n")
    try:
        daemon.start()
        wait_job(daemon, f"race-main-{tag}")
        wait_ticks(daemon, 1)
        m1 = daemon.metrics()
        cadence = Cadence(daemon)

        # The tracker itself, in-process and as fast as it goes, over the same churn.
        tracker = ProcessTracker(rescan_interval_s=0.0, max_labels_per_user=100_000)
        seen: set[str] = set()
        t_end = time.monotonic() + 6.0
        n = 0
        while time.monotonic() < t_end:
            view = tracker.observe(time.monotonic(), [main.pid])
            seen |= {u.identity.label for u in view.jobs if u.identity.label.startswith(f"race-{tag}-")}
            mains = [u for u in view.jobs if u.identity.label == f"race-main-{tag}"]
            assert len(mains) == 1 and main.pid in mains[0].pids
            assert all(u.cpu_s >= 0 for u in view.jobs)
            n += 1
        tracker.close()
        assert n > 20 and len(seen) >= 5

        cadence.check(max_overruns=3)
        m2 = daemon.metrics()
        assert_part(daemon, "processes", "ok")
        assert log_lines(daemon, "wattprint.health: processes degraded") == []
        assert sample(m2, "wattprint_tick_errors_total") == 0
        [mine] = [j for j in my_jobs(daemon, f"race-main-{tag}")]
        assert mine["state"] == "running" and mine["root_pid"] == main.pid
        racers = my_jobs(daemon, f"race-{tag}-")
        assert racers, "no short-lived job was ever seen"
        cpus = cpu_count_proc_stat()
        for j in racers:
            bound = RACE_PKG_W * (j["duration_s"] + 1.0 + 0.3) / cpus
            assert 0 <= j["energy_j"]["cpu"] <= bound, (j, bound)
            assert j["energy_j"]["gpu"] == 0 and j["energy_j"]["dram"] >= 0
        reaped_s = (reaped_cpu_ticks(churn.pid) - churn_reaped0) / CLK_TCK
        booked = sum(j["energy_j"]["cpu"] for j in racers)
        assert booked <= RACE_PKG_W * reaped_s / cpus * (1 + CPU_REL) + RACE_PKG_W * CPU_ABS_S, (booked, reaped_s)
        # The main job over 6 ticks: all of the GPU (sole process), its CPU and DRAM shares.
        w = follow(daemon, 6, {"main": lambda: descendants(main.pid), "bash": lambda: [main.pid]})
        got = w.booked(mine["id"])
        assert abs(got["gpu"] - 150.0 * w.seconds) <= 150.0 * 0.2 + 1.5 * w.seconds, (got, w.seconds)
        want_cpu = w.cpu_j("main", RACE_PKG_W)
        assert abs(got["cpu"] - want_cpu) <= CPU_REL * want_cpu + RACE_PKG_W * CPU_ABS_S, (got, want_cpu)
        # DRAM: the job's RSS is bash's plus that of the 0-2 sleeps alive at the daemon's
        # read (they come and go every 10-20 ms, so the test cannot see the same ones):
        # between bash alone and bash + 2 sleeps, each x the dram rate x tick time / used memory.
        sleep_rss = rss_of_a_sleep(labelled_process)
        low = w.dram_j("bash", RACE_DRAM_W)
        high = sum(RACE_DRAM_W * (b.scrape.tick_at - a.scrape.tick_at) * (b.job_rss["bash"] + 2 * sleep_rss)
                   / b.mem_used for a, b in zip(w.samples, w.samples[1:]))
        assert 0.95 * low <= got["dram"] <= 1.05 * high, (got, low, high)
        labels = {"job_id": mine["id"], "label": mine["label"], "user": mine["user"], "kind": "gpu"}
        job_gain = (sample(m2, "wattprint_job_energy_joules_total", **labels)
                    - sample(m1, "wattprint_job_energy_joules_total", **labels))
        # The GPU job got all of the GPU's energy, churn or not.
        assert job_gain == pytest.approx(energy(m2, "gpu", "gpu0") - energy(m1, "gpu", "gpu0"), rel=1e-9)
        assert job_gain > 0
        assert_conserved(daemon)
        assert_no_traceback(daemon)
        churn.kill()
        assert daemon.stop() == 0
    finally:
        feeder.stop()
        daemon.kill()


RACE_PKG_W, RACE_DRAM_W = 40.0, 6.0


def reaped_cpu_ticks(pid: int) -> int:
    """cutime + cstime of ``pid``: the CPU time of the children it has reaped."""
    with open(f"/proc/{pid}/stat") as fh:
        rest = fh.read().rsplit(")", 1)[1].split()
    return int(rest[13]) + int(rest[14])


def rss_of_a_sleep(labelled_process: Processes) -> int:
    """Resident bytes of a ``sleep`` process (the churn's children)."""
    p = labelled_process(argv=["sleep", "30"])
    try:
        time.sleep(0.2)
        with open(f"/proc/{p.pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[21]) * os.sysconf("SC_PAGE_SIZE")
    finally:
        labelled_process.end(p)


def cpu_count_proc_stat() -> int:
    """The CPUs /proc/stat accounts (the daemon's capacity is their sum)."""
    with open("/proc/stat") as fh:
        return sum(1 for line in fh if line.startswith("cpu") and line[3:4].isdigit())

