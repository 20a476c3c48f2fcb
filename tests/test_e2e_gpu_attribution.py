"""End to end, GPU attribution and provenance, on the real daemon process.

- a visible job at 10 % SM sharing a GPU with a process the daemon cannot see in /proc
  (at 90 %) gets 10 % of simulated power x time; the other 90 % is unattributed and
  counted in wattprint_gpu_invisible_process_energy_joules_total;
- a job alone on a GPU with an energy counter shows ``energy_sources.gpu = counter``
  while another, idle GPU has no counter;
- a job that used a power-only GPU and then moved to a counter GPU keeps ``power``
  for its life, across a daemon restart.

Expected figures come from the simulated power and the daemon's own tick timestamps.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from daemon_harness import DaemonProcess, sample
from gpusim import gpu, proc, write_sim

GPU_W = 300.0


def absent_pid() -> int:
    """A PID with no /proc entry here (as a process of another PID namespace looks)."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for pid in range(pid_max - 1, 1000, -1):
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    raise RuntimeError("no free PID")


def wait_ticks(daemon: DaemonProcess, n: int, timeout_s: float = 30.0) -> int:
    """Poll until the daemon has done ``n`` more ticks; return the tick reached."""
    start = daemon.get("/healthz", allow_error=True)["tick"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = daemon.get("/healthz", allow_error=True)["tick"]
        if now >= start + n:
            return now
        time.sleep(0.1)
    raise AssertionError(f"daemon did not tick {n} times in {timeout_s} s:\n{daemon.log_tail()}")


def the_job(daemon: DaemonProcess, label: str) -> dict[str, Any]:
    [job] = [j for j in daemon.get("/api/v1/jobs?limit=1000")["jobs"] if j["label"] == label]
    return job


def scrape_after_tick(daemon: DaemonProcess) -> dict:
    """One scrape taken right after a tick (so both scrapes of a window see whole ticks)."""
    wait_ticks(daemon, 1)
    return daemon.metrics()


def test_invisible_process_share_stays_unattributed(tmp_path, labelled_process):
    job = labelled_process("visible-10")
    ghost = absent_pid()
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=GPU_W, processes=[proc(job.pid, sm_util=10), proc(ghost, sm_util=90)])])
    daemon = DaemonProcess(tmp_path, sim_file=sim, powercap_root=None)
    daemon.start()
    try:
        found = daemon.wait_for_job("visible-10")
        m1 = scrape_after_tick(daemon)
        wait_ticks(daemon, 8)
        m2 = daemon.metrics()
        t = sample(m2, "wattprint_last_tick_timestamp_seconds") - sample(m1, "wattprint_last_tick_timestamp_seconds")
        assert t >= 6.0

        def delta(name: str, **labels: str) -> float:
            return sample(m2, name, **labels) - sample(m1, name, **labels)

        who = {"job_id": found["id"], "label": "visible-10", "user": found["user"]}
        job_j = delta("wattprint_job_energy_joules_total", **who, kind="gpu")
        device_j = delta("wattprint_device_energy_joules_total", kind="gpu", device="gpu0")
        unattributed_j = delta("wattprint_unattributed_energy_joules_total", kind="gpu")
        invisible_j = delta("wattprint_gpu_invisible_process_energy_joules_total")
        # Truth: the simulated power x the time between the two scraped ticks.
        assert device_j == pytest.approx(GPU_W * t, rel=0.02)
        assert job_j == pytest.approx(0.10 * GPU_W * t, rel=0.02)  # not 100 %
        assert unattributed_j == pytest.approx(0.90 * GPU_W * t, rel=0.02)
        assert invisible_j == pytest.approx(0.90 * GPU_W * t, rel=0.02)
        # Within one snapshot the split is exact: 10 % of what the device reported.
        assert job_j == pytest.approx(0.10 * device_j, rel=1e-6)
        assert invisible_j == pytest.approx(unattributed_j, rel=1e-6)
        assert daemon.get("/api/v1/host")["unattributed_energy_j"]["gpu"] > 0
    finally:
        daemon.stop()


def test_job_alone_on_a_counter_gpu_shows_counter(tmp_path, labelled_process):
    job = labelled_process("on-counter")
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=200.0, processes=[proc(job.pid, sm_util=70)]),
                    gpu(1, power_w=40.0, energy_counter=False)])  # idle, power only
    daemon = DaemonProcess(tmp_path, sim_file=sim, powercap_root=None)
    daemon.start()
    try:
        daemon.wait_for_job("on-counter")
        wait_ticks(daemon, 3)
        job_row = the_job(daemon, "on-counter")
        assert job_row["energy_j"]["gpu"] > 0
        assert job_row["energy_sources"]["gpu"] == "counter"
        devices = {d["device"]: d["source"] for d in daemon.get("/api/v1/host")["devices"] if d["kind"] == "gpu"}
        assert devices == {"gpu0": "counter", "gpu1": "power"}
    finally:
        daemon.stop()


def test_provenance_is_the_weakest_over_the_jobs_life(tmp_path, labelled_process):
    job = labelled_process("moved")
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=200.0),
                    gpu(1, power_w=50.0, energy_counter=False, processes=[proc(job.pid, sm_util=60)])])
    daemon = DaemonProcess(tmp_path, sim_file=sim, powercap_root=None)
    daemon.start()
    try:
        daemon.wait_for_job("moved")
        wait_ticks(daemon, 2)
        assert the_job(daemon, "moved")["energy_sources"]["gpu"] == "power"
        # The job moves to the counter GPU and the power-only GPU leaves: no device of a
        # tick from now on says "power"; only the job's own past can.
        write_sim(sim, [gpu(0, power_w=200.0, processes=[proc(job.pid, sm_util=60)])])
        wait_ticks(daemon, 2)
        before = the_job(daemon, "moved")["energy_j"]["gpu"]
        wait_ticks(daemon, 3)
        row = the_job(daemon, "moved")
        assert row["energy_j"]["gpu"] - before > 2 * 200.0 * 0.9  # it is booked on gpu0 now
        assert row["energy_sources"]["gpu"] == "power"
    finally:
        daemon.stop()

    # Restarted, the daemon continues the job (on the counter GPU only): still "power".
    daemon = DaemonProcess(tmp_path, sim_file=sim, powercap_root=None)
    daemon.start()
    try:
        wait_ticks(daemon, 3)
        row = the_job(daemon, "moved")
        assert row["state"] == "running"
        assert row["energy_sources"]["gpu"] == "power"
    finally:
        daemon.stop()
