"""End to end, jobs: who used every joule, with real processes and the real daemon.

Every energy check is per job and component, in absolute joules, against truth from
what the test controls (tests/e2e_truth.py: simulated power x utilisation share x the
daemon's tick time; RAPL rate x CPU-time share read from /proc; RSS share), with
several processes per GPU, memory "not available" and processes without utilisation
samples; unattributed energy is checked against its own expected value. Waiting is
by the daemon's tick counter, never fixed sleeps.

- a launcher with two GPU workers, each with DataLoader-like children, is one job;
- three jobs sharing GPUs at 3:1:0 SM utilisation and equal shares get exactly that;
- two CPU burners in different jobs get CPU energy by their share of CPU capacity,
  DRAM by RSS; conservation per ledger bucket as an extra check;
- a reused PID gives two jobs;
- a job that ends while the daemon is down is finished, totals intact, after restart.
"""

from __future__ import annotations

import os
import sqlite3
import time
import urllib.parse

import pytest

from daemon_harness import DaemonProcess, scrape, wait_ticks
from e2e_truth import CPU_ABS_S, CPU_REL, INVISIBLE_PID, descendants, follow
from gpusim import gpu, proc, write_sim
from powercap import PowercapTree

BURN = "import time\nwhile True: pass"
# A label variable only this module's jobs carry, and the daemons read only it: labelled
# processes of other tests on the machine (outside the suite's PID namespace) are then no
# jobs here, cannot push these labels over max_labels_per_user, and leave the expected
# unattributed energy alone.
LABEL_VAR = f"WATTPRINT_E2E_{os.getpid()}"
JOBS_TOML = f'[jobs]\nlabel_env = ["{LABEL_VAR}"]\n'
HALF_BURN = "import time\nwhile True:\n    t = time.time()\n    while time.time() - t < 0.05: pass\n    time.sleep(0.05)"


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(x) for x in fh.read().split()]


def until(daemon: DaemonProcess, cond, what: str, ticks: int = 15) -> None:
    """Poll ``cond`` once per daemon tick, at most ``ticks`` ticks (no fixed sleeps)."""
    for _ in range(ticks):
        if cond():
            return
        wait_ticks(daemon, 1)
    assert cond(), f"{what}: not within {ticks} ticks:\n{daemon.log_tail()}"


def job_by(daemon: DaemonProcess, **match) -> list[dict]:
    return [j for j in daemon.get("/api/v1/jobs?limit=1000")["jobs"] if all(j[k] == v for k, v in match.items())]


def quote(job_id: str) -> str:
    return urllib.parse.quote(job_id, safe="")


def assert_conserved_per_bucket(state_dir) -> int:
    """jobs + unattributed == devices for every (bucket, component) in the store."""
    db = sqlite3.connect(f"file:{state_dir}/wattprint.sqlite3?mode=ro", uri=True)
    dev = {(b, k): e for b, k, e in db.execute(
        "SELECT bucket_start, kind, SUM(energy_j) FROM device_buckets GROUP BY bucket_start, kind")}
    jobs = {(b, c): e for b, c, e in db.execute(
        "SELECT bucket_start, component, SUM(energy_j) FROM job_buckets GROUP BY bucket_start, component")}
    un = {(b, c): e for b, c, e in db.execute("SELECT bucket_start, component, energy_j FROM unattributed_buckets")}
    db.close()
    assert dev, "no device buckets"
    for key, device_j in dev.items():
        assert jobs.get(key, 0.0) + un.get(key, 0.0) == pytest.approx(device_j, rel=1e-9, abs=1e-9), key
    for key in set(jobs) | set(un):
        assert key in dev, key
    return len({b for b, _ in dev})


def test_launcher_with_gpu_workers_and_dataloaders_is_one_job(tmp_path, labelled_process):
    # torchrun-like: launcher -> 2 workers -> 2 DataLoader children each; no label.
    worker = ("import subprocess, sys, time\n"
              "kids = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']) for _ in range(2)]\n"
              "time.sleep(300)")
    launcher = labelled_process(code=(
        "import subprocess, sys, time\n"
        f"ws = [subprocess.Popen([sys.executable, '-c', {worker!r}]) for _ in range(2)]\n"
        "time.sleep(300)"
    ))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        workers = children(launcher.pid)
        if len(workers) == 2 and all(len(children(w)) == 2 for w in workers):
            break
        time.sleep(0.1)
    workers = children(launcher.pid)
    loaders = [c for w in workers for c in children(w)]
    assert len(loaders) == 4
    sim = tmp_path / "sim.json"
    # gpu0: worker 0 at 80 % SM (memory not available), its first DataLoader holding memory
    # with no utilisation sample, and an invisible process at 20 % SM: the job gets 80 %.
    # gpu1: worker 1 at 60 % SM and its first DataLoader memory-only (1 GiB each): the
    # job gets all of it (the loader's activity share is 0, but it is the job's anyway).
    write_sim(sim, [gpu(0, power_w=200.0, processes=[proc(workers[0], used_memory_bytes=None, sm_util=80),
                                                     proc(loaders[0], used_memory_bytes=None),
                                                     proc(INVISIBLE_PID, used_memory_bytes=None, sm_util=20)]),
                    gpu(1, power_w=100.0, processes=[proc(workers[1], used_memory_bytes=1 << 30, sm_util=60),
                                                     proc(loaders[2], used_memory_bytes=1 << 30)])])
    daemon = DaemonProcess(tmp_path, sim_file=sim, powercap_root=None, extra_toml=JOBS_TOML)
    try:
        daemon.start()
        deadline = time.monotonic() + 20
        while not job_by(daemon, root_pid=launcher.pid) and time.monotonic() < deadline:
            wait_ticks(daemon, 1)
        jobs = job_by(daemon, root_pid=launcher.pid)
        assert len(jobs) == 1, daemon.get("/api/v1/jobs")
        job = jobs[0]
        assert job["label_source"] == "pgid"
        ours = {launcher.pid, *workers, *loaders}
        assert [j["root_pid"] for j in daemon.get("/api/v1/jobs?limit=10000")["jobs"] if j["root_pid"] in ours] \
            == [launcher.pid]
        w = follow(daemon, 4, {"job": lambda: descendants(launcher.pid)})
        booked = w.booked(job["id"])
        want_w = 0.8 * 200.0 + 100.0
        assert abs(booked["gpu"] - want_w * w.seconds) <= power_tol_j(want_w, w.seconds), (booked, w.seconds)
        assert booked["gpu"] == pytest.approx(0.8 * w.device("gpu", "gpu0") + w.device("gpu", "gpu1"), rel=1e-6)
        assert abs(w.unattributed("gpu") - 40.0 * w.seconds) <= power_tol_j(40.0, w.seconds)
        assert w.unattributed("gpu") == pytest.approx(0.2 * w.device("gpu", "gpu0"), rel=1e-6)
        job = job_by(daemon, root_pid=launcher.pid)[0]
        assert job["gpu_seconds"] >= 2 * 4  # both GPUs held over the window
        assert job["peak_gpu_memory_bytes"] == 2 * (1 << 30)  # gpu0's processes reported none
    finally:
        daemon.kill()


def power_tol_j(power_w: float, seconds: float) -> float:
    """Energy over tick-time: the two ends' counter reads may come up to 0.2 s of power
    apart from their tick timestamps on a loaded machine; 1 % besides."""
    return power_w * 0.2 + 0.01 * power_w * seconds


def test_two_jobs_share_a_gpu_three_to_one(tmp_path, labelled_process):
    a = labelled_process("job-a", variable=LABEL_VAR)
    b = labelled_process("job-b", variable=LABEL_VAR)
    c = labelled_process("job-c", variable=LABEL_VAR)
    sim = tmp_path / "sim.json"
    # gpu0: a 75 % SM (memory not available), b 25 % SM, c memory-only (no samples, no
    # memory reported): 3:1:0. gpu1: a and c, neither with samples nor memory: 1:1.
    write_sim(sim, [gpu(0, power_w=300.0, processes=[proc(a.pid, used_memory_bytes=None, sm_util=75),
                                                     proc(b.pid, used_memory_bytes=1 << 30, sm_util=25),
                                                     proc(c.pid, used_memory_bytes=None)]),
                    gpu(1, power_w=80.0, processes=[proc(a.pid, used_memory_bytes=None),
                                                    proc(c.pid, used_memory_bytes=None)])])
    daemon = DaemonProcess(tmp_path, sim_file=sim, powercap_root=None, extra_toml=JOBS_TOML)
    try:
        daemon.start()
        ids = {name: daemon.wait_for_job(name)["id"] for name in ("job-a", "job-b")}
        ids["job-c"] = daemon.wait_for_job("job-c")["id"]
        w = follow(daemon, 6, {n: (lambda: []) for n in ids})
        want_w = {"job-a": 0.75 * 300 + 0.5 * 80, "job-b": 0.25 * 300, "job-c": 0.5 * 80}
        gpu0, gpu1 = w.device("gpu", "gpu0"), w.device("gpu", "gpu1")
        exact = {"job-a": 0.75 * gpu0 + 0.5 * gpu1, "job-b": 0.25 * gpu0, "job-c": 0.5 * gpu1}
        for name, job_id in ids.items():
            got = w.booked(job_id)["gpu"]
            assert abs(got - want_w[name] * w.seconds) <= power_tol_j(want_w[name], w.seconds), (name, got, w.seconds)
            assert got == pytest.approx(exact[name], rel=1e-6), name
        assert w.unattributed("gpu") == pytest.approx(0.0, abs=1e-6)  # every process is in a job
        host = daemon.get("/api/v1/host")
        assert host["unattributed_energy_j"]["gpu"] == pytest.approx(0.0, abs=1e-6)
        assert host["attributed_energy_j"]["gpu"] == pytest.approx(host["device_energy_j"]["gpu"], rel=1e-6)
    finally:
        daemon.kill()


def test_cpu_energy_follows_cpu_time_and_is_conserved_per_bucket(tmp_path, labelled_process):
    """Each job's CPU energy is the package's feed rate x its share of the machine's CPU
    capacity (utime + stime read from /proc by the test), its DRAM energy the dram feed
    rate x RSS share; unattributed CPU equals idle and other processes' share; and
    conservation holds per ledger bucket (an extra check)."""
    pkg_w, dram_w = 40.0, 6.0
    tree = PowercapTree(tmp_path / "powercap")
    zones = tree.add_package(0, dram=True)
    full = labelled_process("burn-full", variable=LABEL_VAR, code=BURN)
    half = labelled_process("burn-half", variable=LABEL_VAR, code=HALF_BURN)
    # Only this test's processes are jobs (its own label variable), so the expected
    # unattributed CPU energy is known: labelled processes of other tests on the machine
    # would otherwise take their share of it.
    daemon = DaemonProcess(tmp_path, sim_file=None, powercap_root=tmp_path / "powercap",
                           daemon_toml="bucket_s = 2", extra_toml=JOBS_TOML)
    with tree.start_feeding({zones["package"]: pkg_w, zones["dram"]: dram_w}, period_s=0.02):
        try:
            daemon.start()
            ids = {"full": daemon.wait_for_job("burn-full")["id"], "half": daemon.wait_for_job("burn-half")["id"]}
            w = follow(daemon, 10, {"full": lambda: descendants(full.pid), "half": lambda: descendants(half.pid)})
            assert w.job_cpu_s("half") > 0.1 * w.seconds, "the half burner got almost no CPU"
            for name, job_id in ids.items():
                booked = w.booked(job_id)
                want_cpu = w.cpu_j(name, pkg_w)
                assert abs(booked["cpu"] - want_cpu) <= CPU_REL * want_cpu + pkg_w * CPU_ABS_S, (name, booked, want_cpu)
                want_dram = w.dram_j(name, dram_w)
                assert booked["dram"] == pytest.approx(want_dram, rel=0.05), (name, booked, want_dram)
            un = w.unattributed("cpu")
            want_un = w.cpu_unattributed_j(pkg_w)
            assert un >= 0
            assert abs(un - want_un) <= CPU_REL * (w.cpu_j("full", pkg_w) + w.cpu_j("half", pkg_w)) + pkg_w * CPU_ABS_S
            assert w.unattributed("dram") == pytest.approx(w.dram_unattributed_j(dram_w), rel=0.05)
            f1 = job_by(daemon, label="burn-full")[0]
            assert f1["energy_sources"]["cpu"] == "counter"
            assert assert_conserved_per_bucket(tmp_path / "state") >= 3
        finally:
            daemon.kill()


def test_pid_reuse_gives_two_jobs_end_to_end(tmp_path, labelled_process):
    if os.geteuid() != 0 or not os.path.exists("/proc/sys/kernel/ns_last_pid"):
        pytest.skip("needs root and /proc/sys/kernel/ns_last_pid to force a PID to be reused")
    daemon = DaemonProcess(tmp_path, sim_file=None, powercap_root=None, extra_toml=JOBS_TOML)
    try:
        daemon.start()
        first = labelled_process("reused", variable=LABEL_VAR)
        until(daemon, lambda: len(job_by(daemon, label="reused", state="running")) == 1, "first job running")
        labelled_process.end(first)
        until(daemon, lambda: [j["state"] for j in job_by(daemon, label="reused")] == ["finished"], "first job finished")
        second = None
        for _ in range(20):
            with open("/proc/sys/kernel/ns_last_pid", "w") as fh:
                fh.write(str(first.pid - 1))
            cand = labelled_process("reused", variable=LABEL_VAR)
            if cand.pid == first.pid:
                second = cand
                break
        if second is None:
            pytest.skip("could not get the same PID again (busy machine)")
        until(daemon, lambda: len(job_by(daemon, label="reused")) == 2, "second job seen")
        jobs = job_by(daemon, label="reused")
        assert len(jobs) == 2
        assert {j["root_pid"] for j in jobs} == {first.pid}
        assert sorted(j["state"] for j in jobs) == ["finished", "running"]
    finally:
        daemon.kill()


def test_job_that_ends_while_daemon_is_down_is_finished_after_restart(tmp_path, labelled_process):
    job_proc = labelled_process("short-lived", variable=LABEL_VAR)
    sim = tmp_path / "sim.json"
    # The job at 50 % SM next to an invisible process at 50 %: it gets half of 100 W.
    write_sim(sim, [gpu(0, power_w=100.0, processes=[proc(job_proc.pid, used_memory_bytes=None, sm_util=50),
                                                     proc(INVISIBLE_PID, used_memory_bytes=None, sm_util=50)])])
    daemon = DaemonProcess(tmp_path, sim_file=sim, powercap_root=None, extra_toml=JOBS_TOML)
    try:
        daemon.start()
        job_id = daemon.wait_for_job("short-lived")["id"]
        first = scrape(daemon)
        wait_ticks(daemon, 3)
        assert daemon.stop() == 0
        db = sqlite3.connect(f"file:{tmp_path}/state/wattprint.sqlite3?mode=ro", uri=True)
        stored_gpu_j, last_seen = db.execute("SELECT gpu_j, last_seen FROM jobs WHERE label='short-lived'").fetchone()
        db.close()
        labelled_process.end(job_proc)
        write_sim(sim, [gpu(0, power_w=100.0, processes=[])])
        daemon.start()
        until(daemon, lambda: [j["state"] for j in job_by(daemon, label="short-lived")] == ["finished"], "finished")
        [job] = job_by(daemon, label="short-lived")
        assert job["state"] == "finished"
        assert job["ended_at"] == pytest.approx(last_seen)
        # Its GPU energy: 100 W x its 50 % share x the tick time it was seen for (from the
        # first scrape to its last tick), as stored at the clean stop and kept.
        span = last_seen - first.tick_at
        gained = stored_gpu_j - first.job_j(job_id)["gpu"]
        assert span >= 2.5
        assert abs(gained - 50.0 * span) <= power_tol_j(50.0, span), (gained, span)
        assert job["energy_j"]["gpu"] == pytest.approx(stored_gpu_j, rel=1e-9)
        series = daemon.get(f"/api/v1/jobs/{quote(job['id'])}/series")
        assert sum(b["energy_j"]["total"] for b in series["buckets"]) == pytest.approx(job["energy_j"]["total"])
    finally:
        daemon.kill()
