"""End to end, jobs: who used every joule, with real processes and the real daemon.

- a launcher with two GPU workers, each with DataLoader-like children, is one job;
- two jobs sharing one GPU at 3:1 SM utilisation get 3:1 of its energy;
- two CPU burners in different jobs get CPU energy in proportion to their CPU time;
- jobs + unattributed = devices for each component at every ledger bucket;
- a reused PID gives two jobs;
- a job that ends while the daemon is down is finished, totals intact, after restart.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.parse

import pytest

from daemon_harness import DaemonProcess
from gpusim import gpu, proc, write_sim
from powercap import PowercapTree

SLEEP = "import time; time.sleep(300)"
BURN = "import time\nwhile True: pass"
HALF_BURN = "import time\nwhile True:\n    t = time.time()\n    while time.time() - t < 0.05: pass\n    time.sleep(0.05)"


class Procs:
    """Real processes started in their own sessions; all killed at teardown."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, code: str, label: str | None = None) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k not in ("WATTPRINT_JOB", "SLURM_JOB_ID")}
        if label is not None:
            env["WATTPRINT_JOB"] = label
        p = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
        self.started.append(p)
        return p

    def kill_all(self) -> None:
        for p in self.started:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.kill_all()


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(x) for x in fh.read().split()]


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        rest = fh.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


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


def test_launcher_with_gpu_workers_and_dataloaders_is_one_job(tmp_path, procs):
    # torchrun-like: launcher -> 2 workers -> 2 DataLoader children each; no label.
    worker = ("import subprocess, sys, time\n"
              "kids = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']) for _ in range(2)]\n"
              "time.sleep(300)")
    launcher = procs.start(
        "import subprocess, sys, time\n"
        f"ws = [subprocess.Popen([sys.executable, '-c', {worker!r}]) for _ in range(2)]\n"
        "time.sleep(300)"
    )
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
    write_sim(sim, [gpu(0, power_w=200.0, processes=[proc(workers[0], sm_util=80)]),
                    gpu(1, power_w=100.0, processes=[proc(workers[1], sm_util=60)])])
    daemon = DaemonProcess(tmp_path, sim_file=sim, powercap_root=None)
    try:
        daemon.start()
        time.sleep(4)
        jobs = job_by(daemon, root_pid=launcher.pid)
        assert len(jobs) == 1, daemon.get("/api/v1/jobs")
        job = jobs[0]
        assert job["label_source"] == "pgid"
        ours = {launcher.pid, *workers, *loaders}
        assert [j["root_pid"] for j in daemon.get("/api/v1/jobs")["jobs"] if j["root_pid"] in ours] == [launcher.pid]
        host = daemon.get("/api/v1/host")
        assert job["energy_j"]["gpu"] == pytest.approx(host["device_energy_j"]["gpu"], rel=1e-9)
        # Both GPUs were held: about 2 GPU-seconds per second.
        assert job["gpu_seconds"] >= 4
        assert job["peak_gpu_memory_bytes"] == 2 * (1 << 30)
    finally:
        daemon.kill()


def test_two_jobs_share_a_gpu_three_to_one(tmp_path, procs):
    a = procs.start(SLEEP, label="job-a")
    b = procs.start(SLEEP, label="job-b")
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=300.0, processes=[proc(a.pid, sm_util=75), proc(b.pid, sm_util=25)])])
    daemon = DaemonProcess(tmp_path, sim_file=sim, powercap_root=None, extra_toml="")
    try:
        daemon.start()
        daemon.wait_for_job("job-a")
        time.sleep(5)
        ja, jb = job_by(daemon, label="job-a")[0], job_by(daemon, label="job-b")[0]
        assert ja["energy_j"]["gpu"] / jb["energy_j"]["gpu"] == pytest.approx(3.0, rel=0.05)
        host = daemon.get("/api/v1/host")
        assert ja["energy_j"]["gpu"] + jb["energy_j"]["gpu"] == pytest.approx(host["device_energy_j"]["gpu"], rel=1e-6)
    finally:
        daemon.kill()


def test_cpu_energy_follows_cpu_time_and_is_conserved_per_bucket(tmp_path, procs):
    tree = PowercapTree(tmp_path / "powercap")
    zones = tree.add_package(0, dram=True)
    full = procs.start(BURN, label="burn-full")
    half = procs.start(HALF_BURN, label="burn-half")
    daemon = DaemonProcess(tmp_path, sim_file=None, powercap_root=tmp_path / "powercap",
                           extra_toml='\n[daemon]\n' if False else "")
    # Small buckets so that the run spans several of them.
    daemon.config_path.write_text(daemon.config_path.read_text().replace("interval_s = 1.0", "interval_s = 1.0\nbucket_s = 2"))
    with tree.start_feeding({zones["package"]: 40.0, zones["dram"]: 6.0}, period_s=0.02):
        try:
            daemon.start()
            daemon.wait_for_job("burn-full")
            daemon.wait_for_job("burn-half")
            f0, h0 = job_by(daemon, label="burn-full")[0], job_by(daemon, label="burn-half")[0]
            c0 = (cpu_ticks(full.pid), cpu_ticks(half.pid))
            time.sleep(12)
            f1, h1 = job_by(daemon, label="burn-full")[0], job_by(daemon, label="burn-half")[0]
            c1 = (cpu_ticks(full.pid), cpu_ticks(half.pid))
            e_full = f1["energy_j"]["cpu"] - f0["energy_j"]["cpu"]
            e_half = h1["energy_j"]["cpu"] - h0["energy_j"]["cpu"]
            t_full, t_half = c1[0] - c0[0], c1[1] - c0[1]
            assert e_full > 0 and e_half > 0 and t_half > 0
            assert (e_full / e_half) == pytest.approx(t_full / t_half, rel=0.10)
            assert f1["energy_sources"]["cpu"] == "counter"
            assert f1["energy_j"]["dram"] > 0
            assert assert_conserved_per_bucket(tmp_path / "state") >= 3
        finally:
            daemon.kill()


def test_pid_reuse_gives_two_jobs_end_to_end(tmp_path, procs):
    if os.geteuid() != 0 or not os.path.exists("/proc/sys/kernel/ns_last_pid"):
        pytest.skip("needs root and /proc/sys/kernel/ns_last_pid to force a PID to be reused")
    daemon = DaemonProcess(tmp_path, sim_file=None, powercap_root=None)
    try:
        daemon.start()
        first = procs.start(SLEEP, label="reused")
        time.sleep(2.5)
        assert len(job_by(daemon, label="reused", state="running")) == 1
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        time.sleep(2.5)
        second = None
        for _ in range(20):
            with open("/proc/sys/kernel/ns_last_pid", "w") as fh:
                fh.write(str(first.pid - 1))
            cand = procs.start(SLEEP, label="reused")
            if cand.pid == first.pid:
                second = cand
                break
        if second is None:
            pytest.skip("could not get the same PID again (busy machine)")
        time.sleep(2.5)
        jobs = job_by(daemon, label="reused")
        assert len(jobs) == 2
        assert {j["root_pid"] for j in jobs} == {first.pid}
        assert sorted(j["state"] for j in jobs) == ["finished", "running"]
    finally:
        daemon.kill()


def test_job_that_ends_while_daemon_is_down_is_finished_after_restart(tmp_path, procs):
    job_proc = procs.start(SLEEP, label="short-lived")
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=100.0, processes=[proc(job_proc.pid, sm_util=50)])])
    daemon = DaemonProcess(tmp_path, sim_file=sim, powercap_root=None)
    try:
        daemon.start()
        daemon.wait_for_job("short-lived")
        time.sleep(2)
        assert daemon.stop() == 0
        db = sqlite3.connect(f"file:{tmp_path}/state/wattprint.sqlite3?mode=ro", uri=True)
        stored_gpu_j, last_seen = db.execute("SELECT gpu_j, last_seen FROM jobs WHERE label='short-lived'").fetchone()
        db.close()
        os.killpg(job_proc.pid, signal.SIGKILL)
        job_proc.wait()
        write_sim(sim, [gpu(0, power_w=100.0, processes=[])])
        daemon.start()
        time.sleep(1.5)
        [job] = job_by(daemon, label="short-lived")
        assert job["state"] == "finished"
        assert job["ended_at"] == pytest.approx(last_seen)
        assert job["energy_j"]["gpu"] == pytest.approx(stored_gpu_j) and stored_gpu_j > 150
        series = daemon.get(f"/api/v1/jobs/{quote(job['id'])}/series")
        assert sum(b["energy_j"]["total"] for b in series["buckets"]) == pytest.approx(job["energy_j"]["total"])
    finally:
        daemon.kill()
