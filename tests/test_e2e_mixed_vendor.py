"""End to end on a mixed box: 2 simulated NVIDIA and 2 simulated AMD GPUs, jobs on both
vendors, through the real daemon process (tests/daemon_harness.py) and real labelled
processes.

The sim file (one file, ``"vendor": "amd"`` on the AMD boards):

- gpu0, NVIDIA H100, 300 W, energy counter: job ``nv-alone`` alone (100 %);
- gpu1, NVIDIA, 200 W, no counter (sampled power): job ``nv-shared`` at 25 % SM beside a
  process the daemon cannot see at 75 % (its share stays unattributed);
- amdgpu0, AMD Instinct MI300X, 600 W, energy accumulator: jobs ``amd-30`` and
  ``amd-60`` kept busy 30 % and 60 % of the time by the graphics engine (amdsmi reports
  cumulative engine nanoseconds; the shares are 1/3 and 2/3);
- amdgpu1, AMD Instinct MI250X, 400 W, no counter (average socket power sampled): job
  ``amd-alone`` alone.

Truth is the simulated power x the time between the daemon's two scraped ticks x the
job's share; every job's GPU energy must be within 2 % of it, and energy is conserved
per device and per vendor: jobs + unattributed = device energy, from /metrics and
/api/v1/host. AMD devices are named ``amdgpuN`` with the vendor label "amd".

A second test runs an MI300X in CPX mode (eight partition devices ``amdgpu0-p<k>``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from daemon_harness import DaemonProcess, Scrape, scrape, wait_ticks
from gpusim import amd_proc, gpu, proc, write_sim

pytestmark = pytest.mark.slow

NV0_W, NV1_W, AMD0_W, AMD1_W = 300.0, 200.0, 600.0, 400.0


def absent_pid() -> int:
    """A PID with no /proc entry here (as a process of another PID namespace looks)."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for pid in range(pid_max - 1, 1000, -1):
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    raise RuntimeError("no free PID")


def gpu_window(daemon: DaemonProcess, ids: dict[str, str]) -> tuple[
        Scrape, Scrape, float, Callable[[str], float], Callable[[str], float]]:
    """Two scrapes 8 ticks apart (after one more tick), the daemon's tick time between
    them (at least 6 s), and the GPU energy booked between them to a job (by its key in
    ``ids``) and to a device (by name)."""
    wait_ticks(daemon, 1)
    s1 = scrape(daemon)
    wait_ticks(daemon, 8)
    s2 = scrape(daemon)
    t = s2.tick_at - s1.tick_at
    assert t >= 6.0

    def job(k: str) -> float:
        return s2.job_j(ids[k])["gpu"] - s1.job_j(ids[k])["gpu"]

    def dev(name: str) -> float:
        return s2.device_j("gpu", name) - s1.device_j("gpu", name)

    return s1, s2, t, job, dev


def test_two_nvidia_two_amd_jobs_on_both(tmp_path, labelled_process, tag):
    labels = {k: f"{k}-{tag}" for k in ("nv-alone", "nv-shared", "amd-30", "amd-60", "amd-alone")}
    procs = {k: labelled_process(v) for k, v in labels.items()}
    ghost = absent_pid()
    sim = tmp_path / "sim.json"
    write_sim(sim, [
        gpu(0, power_w=NV0_W, processes=[proc(procs["nv-alone"].pid, sm_util=80)]),
        gpu(1, power_w=NV1_W, energy_counter=False,
            processes=[proc(procs["nv-shared"].pid, sm_util=25), proc(ghost, sm_util=75)]),
        gpu(0, vendor="amd", power_w=AMD0_W,
            processes=[amd_proc(procs["amd-30"].pid, gfx_util=30), amd_proc(procs["amd-60"].pid, gfx_util=60)]),
        gpu(1, vendor="amd", name="AMD Instinct MI250X", power_w=AMD1_W, energy_counter=False,
            processes=[amd_proc(procs["amd-alone"].pid, gfx_util=70)]),
    ])
    daemon = DaemonProcess(tmp_path, sim_file=sim, powercap_root=None)
    daemon.start()
    try:
        ids = {k: daemon.wait_for_job(v)["id"] for k, v in labels.items()}
        wait_ticks(daemon, 2)  # every process seen twice: engine-time baselines exist
        s1, s2, t, job, dev = gpu_window(daemon, ids)

        # Devices: simulated power x time, named per vendor.
        truth_dev = {"gpu0": NV0_W * t, "gpu1": NV1_W * t, "amdgpu0": AMD0_W * t, "amdgpu1": AMD1_W * t}
        for name, truth in truth_dev.items():
            assert dev(name) == pytest.approx(truth, rel=0.02), name
        # Jobs: their share of it, within 2 % of the truth.
        truth_job = {"nv-alone": NV0_W * t, "nv-shared": 0.25 * NV1_W * t,
                     "amd-30": AMD0_W * t / 3, "amd-60": AMD0_W * t * 2 / 3, "amd-alone": AMD1_W * t}
        for k, truth in truth_job.items():
            assert job(k) == pytest.approx(truth, rel=0.02), (k, job(k), truth, daemon.log_tail())

        # Conservation per device (exact within a snapshot): one device's jobs + what
        # stayed unattributed on it = the device.
        invisible = (s2.counter("wattprint_gpu_invisible_process_energy_joules_total")
                     - s1.counter("wattprint_gpu_invisible_process_energy_joules_total"))
        unattributed = s2.unattributed_j("gpu") - s1.unattributed_j("gpu")
        assert job("nv-alone") == pytest.approx(dev("gpu0"), rel=1e-6)
        assert job("nv-shared") + invisible == pytest.approx(dev("gpu1"), rel=1e-6)
        assert job("amd-30") + job("amd-60") == pytest.approx(dev("amdgpu0"), rel=1e-6)
        assert job("amd-alone") == pytest.approx(dev("amdgpu1"), rel=1e-6)
        # ... per vendor: the only unattributed GPU energy is the invisible NVIDIA share.
        nvidia_jobs = job("nv-alone") + job("nv-shared")
        amd_jobs = job("amd-30") + job("amd-60") + job("amd-alone")
        assert unattributed == pytest.approx(invisible, rel=1e-6)
        assert nvidia_jobs + unattributed == pytest.approx(dev("gpu0") + dev("gpu1"), rel=1e-6)
        assert amd_jobs == pytest.approx(dev("amdgpu0") + dev("amdgpu1"), rel=1e-6)
        assert nvidia_jobs + amd_jobs + unattributed == pytest.approx(s2.device_j("gpu") - s1.device_j("gpu"),
                                                                      rel=1e-6)

        # The vendor label on every GPU series; AMD names.
        vendors = {dict(labels_)["device"]: dict(labels_).get("vendor")
                   for (name, labels_) in s2.metrics if name == "wattprint_device_energy_joules_total"
                   and dict(labels_)["kind"] == "gpu"}
        assert vendors == {"gpu0": "nvidia", "gpu1": "nvidia", "amdgpu0": "amd", "amdgpu1": "amd"}
        models = {dict(labels_)["device"]: dict(labels_)["model_name"]
                  for (name, labels_) in s2.metrics if name == "wattprint_device_energy_joules_total"
                  and dict(labels_)["kind"] == "gpu"}
        assert models["amdgpu0"] == "AMD Instinct MI300X" and models["amdgpu1"] == "AMD Instinct MI250X"

        # The API agrees: conservation since start, the AMD devices and their sources.
        host = daemon.get("/api/v1/host")
        assert host["device_energy_j"]["gpu"] == pytest.approx(
            host["attributed_energy_j"]["gpu"] + host["unattributed_energy_j"]["gpu"], rel=1e-6)
        sources = {d["device"]: d["source"] for d in host["devices"] if d["kind"] == "gpu"}
        assert sources == {"gpu0": "counter", "gpu1": "power", "amdgpu0": "counter", "amdgpu1": "power"}
        row = next(j for j in daemon.get("/api/v1/jobs?limit=1000")["jobs"] if j["id"] == ids["amd-60"])
        assert row["energy_sources"]["gpu"] == "counter"
        assert row["energy_j"]["gpu"] > 0

        # The AMD source's self-metrics are exported beside NVIDIA's.
        assert s2.counter("wattprint_gpu_amd_amdsmi_calls_total") > s1.counter("wattprint_gpu_amd_amdsmi_calls_total")
        assert s2.counter("wattprint_gpu_nvml_calls_total") > 0

        # Both vendors report health under their own names.
        health = daemon.get("/healthz", allow_error=True)
        states = {p["name"]: p["state"] for p in health["parts"]}
        assert states.get("gpu") == "ok" and states.get("gpu_amd") == "ok", health
    finally:
        daemon.stop()


def test_mi300x_cpx_partitions_are_devices_of_their_own(tmp_path, labelled_process, tag):
    """An MI300X in CPX mode (8 partitions, each its own amdsmi handle reporting the whole
    board's power) beside an NVIDIA GPU: the board's energy is booked once, 1/8 per
    partition device ``amdgpu0-p<k>``; a job on partition 2 and one on partition 5 each
    get that partition's eighth, the other six eighths stay unattributed."""
    labels = {k: f"{k}-{tag}" for k in ("p2", "p5", "nv")}
    procs = {k: labelled_process(v) for k, v in labels.items()}
    sim = tmp_path / "sim.json"
    write_sim(sim, [
        gpu(0, power_w=NV0_W, processes=[proc(procs["nv"].pid, sm_util=50)]),
        gpu(0, vendor="amd", power_w=AMD0_W, compute_partition="CPX",
            processes=[amd_proc(procs["p2"].pid, gfx_util=90, partition=2),
                       amd_proc(procs["p5"].pid, gfx_util=10, partition=5)]),
    ])
    daemon = DaemonProcess(tmp_path, sim_file=sim, powercap_root=None)
    daemon.start()
    try:
        ids = {k: daemon.wait_for_job(v)["id"] for k, v in labels.items()}
        s1, s2, t, job, dev = gpu_window(daemon, ids)

        parts = [f"amdgpu0-p{k}" for k in range(8)]
        amd_total = sum(dev(p) for p in parts) + dev("amdgpu0")
        assert amd_total == pytest.approx(AMD0_W * t, rel=0.02)  # once, not 8 times
        for p in parts:
            assert dev(p) == pytest.approx(AMD0_W * t / 8, rel=0.02), p
        assert job("p2") == pytest.approx(AMD0_W * t / 8, rel=0.02)  # its partition, whatever its gfx %
        assert job("p5") == pytest.approx(AMD0_W * t / 8, rel=0.02)
        assert job("nv") == pytest.approx(NV0_W * t, rel=0.02)
        unattributed = s2.unattributed_j("gpu") - s1.unattributed_j("gpu")
        assert unattributed == pytest.approx(6 * dev("amdgpu0-p0") + dev("amdgpu0"), rel=1e-6)
        assert job("p2") + job("p5") + job("nv") + unattributed == pytest.approx(
            s2.device_j("gpu") - s1.device_j("gpu"), rel=1e-6)
        vendors = {dict(ls)["device"]: dict(ls).get("vendor") for (name, ls) in s2.metrics
                   if name == "wattprint_device_energy_joules_total" and dict(ls)["kind"] == "gpu"}
        assert vendors == {"gpu0": "nvidia", "amdgpu0": "amd", **{p: "amd" for p in parts}}
    finally:
        daemon.stop()
