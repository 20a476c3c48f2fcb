"""End to end, issue 19's accounting on the real daemon process: a node whose BMC
(tests/redfish_server.py, the DMTF mockup served locally) reports 1,000 W while the
GPUs and CPU/DRAM report 700 W, two jobs using 420 W and 140 W of it.

What the test writes: gpu0 at 420 W held by job A alone, gpu1 at 140 W held by job B
alone, gpu2 idle at 100 W (no process: unattributed), a RAPL package at 30 W and DRAM
at 10 W (the jobs sleep: their CPU and DRAM shares are below 0.1 W). Measured 700 W;
the BMC's power 1,000 W, so the remainder ``other`` is 300 W.

- ``proportional``: the remainder goes with measured energy (420 : 140 : 140), so job A
  totals 600 W x t and job B 200 W x t (within 2 %), and everything booked (all jobs
  and unattributed, every component) equals the node's energy;
- ``unattributed``: job A 420 W x t, job B 140 W x t, 300 W x t unattributed ``other``;
- the node device's total follows the BMC's own energy counter (read from the test
  server) through power steps, within 1 %.

``t`` is the daemon's own tick time between two scrapes (each scrape is one snapshot).
The node, jobs and helpers are tests/node_e2e.py's (shared with the IPMI and stall tests).
"""

from __future__ import annotations

from pathlib import Path

import node_e2e
import pytest
from daemon_harness import scrape, wait_ticks
from node_e2e import (
    COMPONENTS,
    GPU_A_W,
    GPU_B_W,
    MEASURED_W,
    NODE_W,
    bmc_counter_at,
    booked_total,
    job_total,
    jobs_live,
    window,
)
from redfish_server import RedfishBmc


def start_node(tmp_path: Path, labelled_process, remainder: str):
    """The Redfish BMC at 1,000 W, then the simulated node and the daemon (tests/node_e2e.py)."""
    bmc = RedfishBmc()
    bmc.set_power(NODE_W)
    bmc.start()
    node = (f'[node]\nsource = "redfish"\nurl = "{bmc.url}"\nusername = "{bmc.username}"\n'
            f'poll_interval_s = 1.0\ntimeout_s = 1.0\nremainder = "{remainder}"\n')
    try:
        started = node_e2e.start_node(tmp_path, labelled_process, node, env={"WATTPRINT_NODE_PASSWORD": bmc.password})
    except BaseException:
        bmc.stop()
        raise
    return started.daemon, bmc, started.feed


def test_proportional_node_power_is_each_jobs_share_of_the_wall_meter(tmp_path, labelled_process):
    daemon, bmc, feed = start_node(tmp_path, labelled_process, "proportional")
    try:
        a_id, b_id = jobs_live(daemon)
        first, last, t = window(daemon, 8)
        bmc_first = bmc_counter_at(bmc, first.tick_at, NODE_W)
        assert t >= 6.0
        a = job_total(last, a_id) - job_total(first, a_id)
        b = job_total(last, b_id) - job_total(first, b_id)
        assert a == pytest.approx(600.0 * t, rel=0.02)
        assert b == pytest.approx(200.0 * t, rel=0.02)
        other_a = last.job_j(a_id)["other"] - first.job_j(a_id)["other"]
        assert other_a == pytest.approx(180.0 * t, rel=0.02)
        node_j = last.device_j("node", "node") - first.device_j("node", "node")
        assert node_j == pytest.approx(NODE_W * t, rel=0.02)
        # conservation against the node: every joule the node used is booked once
        assert booked_total(last) - booked_total(first) == pytest.approx(node_j, rel=1e-6)
        unattributed = sum(last.unattributed_j(c) - first.unattributed_j(c) for c in COMPONENTS)
        assert unattributed == pytest.approx(200.0 * t, rel=0.02)

        # The node total follows the BMC's counter through power steps (steady at the ends).
        for watts in (1300.0, 900.0, NODE_W):
            bmc.set_power(watts)
            wait_ticks(daemon, 3)
        wait_ticks(daemon, 3)
        end = scrape(daemon)
        bmc_end = bmc_counter_at(bmc, end.tick_at, NODE_W)
        daemon_node = end.device_j("node", "node") - first.device_j("node", "node")
        assert daemon_node == pytest.approx(bmc_end - bmc_first, rel=0.01)

        api = {j["label"]: j for j in daemon.get("/api/v1/jobs?limit=100")["jobs"]}
        assert api["node-job-a"]["energy_sources"]["node"] == "redfish"
        assert api["node-job-a"]["energy_j"]["other"] > 0
        assert api["node-job-a"]["energy_j"]["total"] == pytest.approx(
            sum(api["node-job-a"]["energy_j"][c] for c in COMPONENTS))
        host = daemon.get("/api/v1/host")
        assert host["node_energy_j"] > 0
        for c in COMPONENTS:
            assert host["attributed_energy_j"][c] + host["unattributed_energy_j"][c] == pytest.approx(
                host["device_energy_j"][c], rel=1e-9, abs=1e-9)
        health = {p["name"]: p for p in daemon.get("/healthz")["parts"]}
        assert health["node"]["state"] == "ok", health["node"]
        assert end.counter("wattprint_node_below_components_total") == 0.0
    finally:
        daemon.stop()
        bmc.stop()
        feed.stop()


def test_unattributed_policy_leaves_the_remainder_unattributed(tmp_path, labelled_process):
    daemon, bmc, feed = start_node(tmp_path, labelled_process, "unattributed")
    try:
        a_id, b_id = jobs_live(daemon)
        first, last, t = window(daemon, 8)
        assert t >= 6.0
        assert job_total(last, a_id) - job_total(first, a_id) == pytest.approx(GPU_A_W * t, rel=0.02)
        assert job_total(last, b_id) - job_total(first, b_id) == pytest.approx(GPU_B_W * t, rel=0.02)
        assert last.job_j(a_id)["other"] == 0.0 and last.job_j(b_id)["other"] == 0.0
        other = last.unattributed_j("other") - first.unattributed_j("other")
        assert other == pytest.approx((NODE_W - MEASURED_W) * t, rel=0.02)
        node_j = last.device_j("node", "node") - first.device_j("node", "node")
        assert booked_total(last) - booked_total(first) == pytest.approx(node_j, rel=1e-6)
        api = {j["label"]: j for j in daemon.get("/api/v1/jobs?limit=100")["jobs"]}
        assert api["node-job-a"]["energy_sources"]["node"] == "none"
    finally:
        daemon.stop()
        bmc.stop()
        feed.stop()
