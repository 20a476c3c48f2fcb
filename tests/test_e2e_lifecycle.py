"""End to end, the lifecycle footprint of a job (issue 16) on the real daemon process.

Four simulated H100 boards at a known power, a simulated RAPL package and DRAM fed at
known rates, and a labelled job holding 2 of the 4 GPUs (the sole process on each).
The config sets every factor: service life, GPU, CPU, DRAM and platform embodied
carbon, sockets and GB, WUE, EWIF, PUE, a static grid intensity and a 60 % contract
share with contract and residual factors. Over a window between two ticks the test
reads the job from the API and checks, against hand arithmetic from what it controls
(simulated power x the daemon's tick times; the job's CPU time and RSS and the
machine's CPU time and used memory from /proc):

- embodied = Σ over its 2 GPUs factor x 1000 / life x seconds held + its CPU, DRAM and
  platform shares (within 1 %); jobs + unattributed = the devices' amortised total;
- water = E x (WUE + PUE x EWIF); location-based CO2e = E x intensity x PUE;
  market-based = PUE x E x (0.6 x contract + 0.4 x residual) (each within 1 %);
- the single-job view names every factor with its source (the config's here).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from daemon_harness import DaemonProcess, current_tick, sample
from e2e_truth import machine_cpu_ticks, mem_used_bytes, proc_ticks
from gpusim import gpu, proc, write_sim
from powercap import PowercapTree

LABEL_VAR = "WATTPRINT_E2E_LIFECYCLE"  # only this test's processes are jobs
GPU_W, PKG_W, DRAM_W = 300.0, 20.0, 4.0
LIFE_YEARS = 4.0
LIFE_S = LIFE_YEARS * 365.25 * 86400
GPU_KG, CPU_KG, DRAM_KG, PLATFORM_KG = 150.0, 30.0, 1.5, 200.0
SOCKETS, DRAM_GB = 2, 64.0
WUE, EWIF, PUE, GRID_G = 1.8, 3.0, 1.25, 300.0
SHARE, CONTRACT, RESIDUAL = 0.6, 50.0, 500.0
MODEL = "NVIDIA H100 80GB HBM3"
# The job burns CPU half of the time, so it has a CPU share too (its CPU time from /proc).
HALF_BURN = "import time\nwhile True:\n    t = time.time()\n    while time.time() - t < 0.05: pass\n    time.sleep(0.05)"

CONFIG = f"""
[jobs]
label_env = ["{LABEL_VAR}"]
[accounting]
pue = {PUE}
[grid]
provider = "static"
static_g_per_kwh = {GRID_G}
[footprint]
service_life_years = {LIFE_YEARS}
cpu_kgco2e_per_socket = {CPU_KG}
dram_kgco2e_per_gb = {DRAM_KG}
platform_kgco2e = {PLATFORM_KG}
cpu_sockets = {SOCKETS}
dram_gb = {DRAM_GB}
wue_l_per_kwh = {WUE}
ewif_l_per_kwh = {EWIF}
[footprint.gpu_kgco2e]
"H100" = {GPU_KG}
[market]
contract_share = {SHARE}
contract_g_per_kwh = {CONTRACT}
residual_g_per_kwh = {RESIDUAL}
"""


def consistent_read(daemon: DaemonProcess, job_id: str, pid: int, timeout_s: float = 60.0) -> dict[str, Any]:
    """Right after a new tick: the job (single-job view), a /metrics scrape and /proc
    figures, all as of that tick (the store commits a tick before its snapshot is
    published, and the next tick is ~1 s away: a read that took under 0.4 s and saw
    the same tick before and after is of that tick)."""
    deadline = time.monotonic() + timeout_s
    last, _ = current_tick(daemon)
    while time.monotonic() < deadline:
        tick, tick_at = current_tick(daemon)
        if tick <= last:
            time.sleep(0.01)
            continue
        started = time.monotonic()
        job = daemon.get(f"/api/v1/jobs/{job_id}")
        metrics = daemon.metrics()
        cpu_ticks, rss = proc_ticks(pid)
        machine, mem_used = machine_cpu_ticks(), mem_used_bytes()
        after, _ = current_tick(daemon)
        if (after == tick and time.monotonic() - started < 0.4
                and int(metrics[("wattprint_ticks_total", ())]) == tick):
            return {"tick": tick, "at": tick_at, "job": job, "metrics": metrics, "cpu_ticks": cpu_ticks,
                    "rss": rss, "machine_ticks": machine, "mem_used": mem_used}
        last = after
    raise AssertionError(f"no consistent read in {timeout_s} s:\n{daemon.log_tail()}")


def test_job_on_2_of_4_gpus_gets_embodied_water_and_market_co2e_by_hand_arithmetic(tmp_path, labelled_process):
    job_proc = labelled_process("lifecycle", variable=LABEL_VAR, code=HALF_BURN)
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=GPU_W, processes=[proc(job_proc.pid, sm_util=80)]),
                    gpu(1, power_w=GPU_W, processes=[proc(job_proc.pid, sm_util=60)]),
                    gpu(2, power_w=GPU_W), gpu(3, power_w=GPU_W)])
    tree = PowercapTree(tmp_path / "powercap")
    zones = tree.add_package(0, dram=True)
    daemon = DaemonProcess(tmp_path, sim_file=sim, powercap_root=tmp_path / "powercap", extra_toml=CONFIG)
    with tree.start_feeding({zones["package"]: PKG_W, zones["dram"]: DRAM_W}, period_s=0.02):
        try:
            daemon.start()
            job_id = daemon.wait_for_job("lifecycle")["id"]
            a = consistent_read(daemon, job_id, job_proc.pid)
            while True:  # a window of at least 12 ticks
                b = consistent_read(daemon, job_id, job_proc.pid)
                if b["tick"] - a["tick"] >= 12:
                    break
        finally:
            daemon.stop()

    dt = b["at"] - a["at"]
    assert dt >= 10.0
    ja, jb = a["job"], b["job"]

    def d(key: str, *path: str) -> float:
        va, vb = ja[key], jb[key]
        for p in path:
            va, vb = va[p], vb[p]
        return float(vb) - float(va)

    # Energy: the GPU part is the simulated power of its 2 boards x the time.
    gpu_truth_j = 2 * GPU_W * dt
    assert d("energy_j", "gpu") == pytest.approx(gpu_truth_j, rel=0.01)
    cpu_j, dram_j = d("energy_j", "cpu"), d("energy_j", "dram")
    assert d("energy_j", "other") == 0.0  # no BMC
    e_truth_j = gpu_truth_j + cpu_j + dram_j
    kwh = e_truth_j / 3.6e6

    # Water, location- and market-based CO2e: hand arithmetic on E.
    assert d("water_l") == pytest.approx(kwh * (WUE + PUE * EWIF), rel=0.01)
    assert d("co2e_g") == pytest.approx(kwh * GRID_G * PUE, rel=0.01)
    assert d("co2e_market_g") == pytest.approx(PUE * kwh * SHARE * CONTRACT + (1 - SHARE) * PUE * kwh * RESIDUAL,
                                               rel=0.01)

    # Embodied: its 2 GPUs x the seconds held, plus its CPU, DRAM and platform shares,
    # each from what the test controls or reads itself.
    cpu_share = (b["cpu_ticks"] - a["cpu_ticks"]) / max(1, b["machine_ticks"] - a["machine_ticks"])
    dram_share = (a["rss"] / a["mem_used"] + b["rss"] / b["mem_used"]) / 2
    measured_w = 4 * GPU_W + PKG_W + DRAM_W
    job_measured_w = 2 * GPU_W + PKG_W * cpu_share + DRAM_W * dram_share
    embodied_truth = (GPU_KG * 2 * dt + CPU_KG * SOCKETS * cpu_share * dt + DRAM_KG * DRAM_GB * dram_share * dt
                      + PLATFORM_KG * job_measured_w / measured_w * dt) * 1000 / LIFE_S
    assert d("embodied_co2e_g") == pytest.approx(embodied_truth, rel=0.01)
    assert d("sci_g") == pytest.approx(d("co2e_g") + d("embodied_co2e_g"), rel=1e-9)
    assert d("occupancy_s", f"gpu:{MODEL}") == pytest.approx(2 * dt, rel=0.01)  # 2 boards x the time

    # Conservation: jobs + unattributed = the devices' amortised total over the window.
    unattributed = (sample(b["metrics"], "wattprint_unattributed_embodied_co2e_grams_total")
                    - sample(a["metrics"], "wattprint_unattributed_embodied_co2e_grams_total"))
    device_total = (4 * GPU_KG + SOCKETS * CPU_KG + DRAM_GB * DRAM_KG + PLATFORM_KG) * 1000 / LIFE_S * dt
    assert d("embodied_co2e_g") + unattributed == pytest.approx(device_total, rel=0.01)

    # Every factor is named with its source: here the config's.
    assert cpu_share > 0.05, "the job got almost no CPU"
    assert set(jb["occupancy_s"]) == {f"gpu:{MODEL}", "cpu", "dram", "platform"}
    factors = {f["name"]: f for f in jb["factors"]}
    assert factors[f"gpu:{MODEL}"]["value"] == GPU_KG and factors[f"gpu:{MODEL}"]["default"] is False
    assert "config" in factors[f"gpu:{MODEL}"]["source"]
    for name, value in (("cpu", CPU_KG), ("dram", DRAM_KG), ("platform", PLATFORM_KG), ("service_life", LIFE_YEARS),
                        ("wue", WUE), ("ewif", EWIF), ("market.contract", CONTRACT), ("market.residual", RESIDUAL)):
        assert factors[name]["value"] == value, name
        assert factors[name]["unit"] and factors[name]["source"], name
