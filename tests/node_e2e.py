"""Shared setup of issue 19's end-to-end tests on the real daemon process
(tests/test_e2e_node_power.py: Redfish; tests/test_e2e_node_ipmi_stall.py: IPMI and a
BMC stall): a node whose BMC reports 1,000 W while the GPUs and CPU/DRAM report 700 W,
two jobs using 420 W and 140 W of it.

What ``start_node`` writes: gpu0 at 420 W held by job A alone, gpu1 at 140 W held by
job B alone, gpu2 idle at 100 W (no process: unattributed), a RAPL package at 30 W and
DRAM at 10 W (the jobs sleep: their CPU and DRAM shares are below 0.1 W). Measured
700 W; with the BMC at 1,000 W the remainder ``other`` is 300 W, and under
``proportional`` job A totals 600 W and job B 200 W.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from daemon_harness import DaemonProcess, Scrape, scrape, wait_ticks
from gpusim import gpu, proc, write_sim
from powercap import PowercapTree

COMPONENTS = ("gpu", "cpu", "dram", "other")
NODE_W, GPU_A_W, GPU_B_W, GPU_IDLE_W, PKG_W, DRAM_W = 1000.0, 420.0, 140.0, 100.0, 30.0, 10.0
MEASURED_W = GPU_A_W + GPU_B_W + GPU_IDLE_W + PKG_W + DRAM_W  # 700 W
JOB_A, JOB_B = "node-job-a", "node-job-b"


def job_total(s: Scrape, job_id: str) -> float:
    return sum(s.job_j(job_id).get(c, 0.0) for c in COMPONENTS)


def booked_total(s: Scrape) -> float:
    """All jobs' energy and all unattributed energy, every component."""
    jobs = sum(v for (name, labels), v in s.metrics.items() if name == "wattprint_job_energy_joules_total")
    return jobs + sum(s.unattributed_j(c) for c in COMPONENTS)


@dataclass
class Node:
    """The running daemon and what feeds it (stop with ``stop()``)."""

    daemon: DaemonProcess
    feed: object  # PowercapTree feeder (has stop())

    def stop(self) -> None:
        try:
            self.daemon.stop()
        finally:
            self.feed.stop()  # type: ignore[attr-defined]


def start_node(tmp_path: Path, labelled_process, node_toml: str, env: dict[str, str] | None = None) -> Node:
    """The simulated GPUs and RAPL tree, jobs A and B, and the daemon with ``node_toml``
    (its ``[node]`` section; the BMC is the caller's, already started)."""
    a = labelled_process(JOB_A)
    b = labelled_process(JOB_B)
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=GPU_A_W, processes=[proc(a.pid, sm_util=90)]),
                    gpu(1, power_w=GPU_B_W, processes=[proc(b.pid, sm_util=90)]),
                    gpu(2, power_w=GPU_IDLE_W)])
    tree = PowercapTree(tmp_path / "powercap")
    zones = tree.add_package(0, dram=True, core=False)
    feed = tree.start_feeding({zones["package"]: PKG_W, zones["dram"]: DRAM_W})
    daemon = DaemonProcess(tmp_path, sim_file=sim, powercap_root=tree.root, extra_toml=node_toml, env=env or {})
    try:
        daemon.start()
    except BaseException:
        feed.stop()
        raise
    return Node(daemon, feed)


def wait_node_live(daemon: DaemonProcess, timeout_s: float = 30.0) -> None:
    """Until the node device has booked energy (its baseline tick is past)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if scrape(daemon).device_j("node", "node") > 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"no node energy booked:\n{daemon.log_tail()}")


def jobs_live(daemon: DaemonProcess) -> tuple[str, str]:
    """Jobs A and B's ids, once the daemon shows both and the node device books energy,
    two ticks later (so a window that starts now has every baseline behind it)."""
    a_id = daemon.wait_for_job(JOB_A)["id"]
    b_id = daemon.wait_for_job(JOB_B)["id"]
    wait_node_live(daemon)
    wait_ticks(daemon, 2)
    return a_id, b_id


def window(daemon: DaemonProcess, ticks: int) -> tuple[Scrape, Scrape, float]:
    """Two scrapes ``ticks`` ticks apart and the daemon's tick time between them."""
    wait_ticks(daemon, 1)
    first = scrape(daemon)
    wait_ticks(daemon, ticks)
    last = scrape(daemon)
    return first, last, last.tick_at - first.tick_at


def health_state(daemon: DaemonProcess, part: str) -> str:
    parts = {p["name"]: p for p in daemon.get("/healthz", allow_error=True)["parts"]}
    return str(parts[part]["state"])


def bmc_counter_at(bmc, tick_at: float, power_w: float) -> float:
    """A Redfish test BMC's energy counter (tests/redfish_server.py, its own
    integration) at wall time ``tick_at``: read now, less the steady power since."""
    return float(bmc.energy_j()) - power_w * (time.time() - tick_at)
