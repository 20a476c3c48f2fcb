"""End to end: the real daemon process over a simulated GPU, a powercap tree that
advances at known rates (and wraps), and a real labelled process.

Checks through the HTTP API and /metrics that the job's GPU energy matches power x
time within 2%, that jobs + unattributed = device totals for every component, that
RAPL wraparound and an NVML counter reset lose nothing, that totals continue across a
daemon crash (SIGKILL) and restart, and that a hostile job label survives exactly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.parse

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon_harness import DaemonProcess, sample
from gpusim import gpu, proc, write_sim
from powercap import PowercapTree
from servers import promtool_check_metrics
from wattprint.daemon.procs import sanitize_label

GPU_W, PKG_W, DRAM_W = 250.0, 30.0, 5.0
NASTY = 'train "q", a=b c\\d\\\nnext}line {x="y"} é'
SANE = sanitize_label(NASTY)
SANE_Q = urllib.parse.quote(SANE, safe="")


def rate(m1: dict, m2: dict, name: str, **labels: str) -> float:
    """Average rate of a counter between two scrapes, using the snapshot's own timestamp."""
    t1 = sample(m1, "wattprint_last_tick_timestamp_seconds")
    t2 = sample(m2, "wattprint_last_tick_timestamp_seconds")
    return (sample(m2, name, **labels) - sample(m1, name, **labels)) / (t2 - t1)


@pytest.fixture
def job_process():
    env = {k: v for k, v in os.environ.items() if k not in ("WATTPRINT_JOB", "SLURM_JOB_ID")}
    env["WATTPRINT_JOB"] = NASTY
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], env=env, start_new_session=True)
    yield p
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def test_daemon_end_to_end(tmp_path, job_process, promtool):
    tree = PowercapTree(tmp_path / "powercap")
    zones = tree.add_package(0, max_energy_range_uj=100_000_000, dram=True)  # wraps every ~3 s at 30 W
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=GPU_W, processes=[proc(job_process.pid, sm_util=90)])])
    daemon = DaemonProcess(tmp_path, sim_file=sim, powercap_root=tmp_path / "powercap")
    feeder = tree.start_feeding({zones["package"]: PKG_W, zones["dram"]: DRAM_W}, period_s=0.01)
    try:
        daemon.start()
        job = daemon.wait_for_job(SANE)
        assert job["label_raw"] == NASTY  # shown exactly...
        assert job["label"] == SANE and job["label_sanitised"] is True  # ...and visibly sanitised for export
        assert job["root_pid"] == job_process.pid
        assert job["host"] == "testhost"
        assert job["command"] == "python" or job["command"].startswith("python")
        assert job["energy_sources"]["gpu"] == "counter"

        # 1. Rates: energy over time matches the known powers within 2%.
        m1 = daemon.metrics()
        time.sleep(6)
        m2 = daemon.metrics()
        assert rate(m1, m2, "wattprint_device_energy_joules_total", kind="gpu", device="gpu0") == pytest.approx(GPU_W, rel=0.02)
        assert rate(m1, m2, "wattprint_device_energy_joules_total", kind="cpu", device="package-0") == pytest.approx(PKG_W, rel=0.02)
        assert rate(m1, m2, "wattprint_device_energy_joules_total", kind="dram", device="dram-0") == pytest.approx(DRAM_W, rel=0.02)
        job_id = job["id"]
        job_labels = {"job_id": job_id, "label": SANE, "user": job["user"]}
        assert rate(m1, m2, "wattprint_job_energy_joules_total", kind="gpu", **job_labels) == pytest.approx(GPU_W, rel=0.02)

        # 2. An NVML counter reset (driver reload) loses nothing.
        write_sim(sim, [gpu(0, power_w=GPU_W, counter_epoch=1, processes=[proc(job_process.pid, sm_util=90)])])
        time.sleep(4)
        m3 = daemon.metrics()
        assert rate(m2, m3, "wattprint_device_energy_joules_total", kind="gpu", device="gpu0") == pytest.approx(GPU_W, rel=0.02)
        assert rate(m2, m3, "wattprint_job_energy_joules_total", kind="gpu", **job_labels) == pytest.approx(GPU_W, rel=0.02)
        # ...and RAPL wrapped several times meanwhile without losing anything (checked by the rates above).
        assert feeder.fed_j(zones["package"]) > 3 * 100.0

        # 3. Conservation: jobs + unattributed = devices, for every component.
        host = daemon.get("/api/v1/host")
        for kind in ("gpu", "cpu", "dram"):
            dev = host["device_energy_j"][kind]
            assert dev > 0
            assert host["attributed_energy_j"][kind] + host["unattributed_energy_j"][kind] == pytest.approx(dev, rel=1e-9)
        job = daemon.get(f"/api/v1/jobs/{urllib.parse.quote(job_id, safe='')}")
        # The sole process on the GPU gets all of its energy.
        assert job["energy_j"]["gpu"] == pytest.approx(host["device_energy_j"]["gpu"], rel=1e-9)
        assert job["co2e_g"] == pytest.approx(job["energy_kwh"] * 475.0, rel=1e-9)
        assert job["gpu_seconds"] > 5

        # 4. The exposition is valid and carries the sanitised label.
        text = daemon.metrics_text()
        check = promtool_check_metrics(text.encode(), binary=promtool)
        assert check.returncode == 0, check.stdout + check.stderr
        labels = [s.labels["label"] for f in text_string_to_metric_families(text) for s in f.samples
                  if s.name == "wattprint_job_energy_joules_total" and s.labels["job_id"] == job_id]
        assert labels and set(labels) == {SANE}

        # 5. A crash (SIGKILL) and restart: the same job continues from its stored totals.
        before = daemon.get(f"/api/v1/jobs/{urllib.parse.quote(job_id, safe='')}")
        killed_at = time.time()
        daemon.kill()
        daemon.start()
        restarted_at = time.time()
        time.sleep(3)
        after = daemon.get(f"/api/v1/jobs/{urllib.parse.quote(job_id, safe='')}")
        assert after["id"] == job_id and after["state"] == "running"
        gained = after["energy_j"]["gpu"] - before["energy_j"]["gpu"]
        span = after["last_seen"] - before["last_seen"]
        downtime = restarted_at - killed_at
        assert gained <= GPU_W * (span + 0.1)  # nothing counted twice
        assert gained >= GPU_W * (span - downtime - 1.5)  # lost at most the downtime and one tick
        dup = [j for j in daemon.get(f"/api/v1/jobs?label={SANE_Q}&limit=10000")["jobs"] if j["label_raw"] == NASTY]
        assert len(dup) == 1, [(j["id"], j["root_pid"], j["command"], j["started_at"], j["state"]) for j in dup]

        # 6. The job ends when its process exits, totals intact.
        os.killpg(job_process.pid, signal.SIGKILL)
        job_process.wait()
        write_sim(sim, [gpu(0, power_w=GPU_W, counter_epoch=1, processes=[])])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done = daemon.get(f"/api/v1/jobs/{urllib.parse.quote(job_id, safe='')}")
            if done["state"] == "finished":
                break
            time.sleep(0.3)
        assert done["state"] == "finished" and done["ended_at"] is not None
        assert done["energy_j"]["gpu"] >= after["energy_j"]["gpu"]
        finished = daemon.get("/api/v1/jobs?state=finished&limit=10000")["jobs"]
        assert [j["id"] for j in finished if j["label_raw"] == NASTY] == [job_id]
        assert daemon.stop() == 0
    finally:
        feeder.stop()
        daemon.kill()


def test_api_errors_are_json_4xx(tmp_path):
    daemon = DaemonProcess(tmp_path, sim_file=None, powercap_root=None)
    try:
        daemon.start()
        for path, status, needle in [
            ("/api/v1/jobs?state=zombie", 400, "state"),
            ("/api/v1/jobs?limit=0", 400, "limit"),
            ("/api/v1/jobs?limit=abc", 400, "limit"),
            ("/api/v1/jobs?since=yesterday", 400, "since"),
            ("/api/v1/jobs?since=200&until=100", 400, "since is after until"),
            ("/api/v1/jobs?bogus=1", 400, "unknown parameter"),
            ("/api/v1/jobs/does-not-exist", 404, "no job"),
            ("/api/v1/nothing", 404, "no such endpoint"),
        ]:
            code, body = daemon.get_status(path)
            assert code == status, path
            assert body["error"]["status"] == status
            assert needle in body["error"]["message"], (path, body)
        code, body = daemon.get_status("/api/v1/jobs?since=2026-01-01T00:00:00Z&limit=5")
        assert code == 200 and body["count"] == len(body["jobs"])
        code, body = daemon.get_status("/healthz")
        assert code == 200
        states = {p["name"]: p["state"] for p in body["parts"]}
        assert states["gpu"] == "disabled" and states["cpu-estimate"] == "ok"
    finally:
        daemon.kill()


def test_bearer_token_required_when_configured(tmp_path):
    daemon = DaemonProcess(tmp_path, sim_file=None, powercap_root=None,
                           env={"WATTPRINT_HTTP_TOKEN": "t0ken"})
    try:
        # Not ready-checkable without the token: start() polls /healthz, which answers 401 JSON.
        daemon.proc = None
        log = open(daemon.log_path, "ab")
        daemon.proc = subprocess.Popen([sys.executable, "-m", "wattprint.daemon", "run", "--config",
                                        str(daemon.config_path)], stdout=log, stderr=subprocess.STDOUT, env=daemon.env)
        deadline = time.monotonic() + 20
        code = None
        while time.monotonic() < deadline:
            try:
                code, _ = daemon.get_status("/api/v1/jobs")
                break
            except OSError:
                time.sleep(0.1)
        assert code == 401
        code, _ = daemon.get_status("/api/v1/jobs", headers={"Authorization": "Bearer wrong"})
        assert code == 401
        code, body = daemon.get_status("/api/v1/jobs", headers={"Authorization": "Bearer t0ken"})
        assert code == 200 and "jobs" in body
    finally:
        daemon.kill()
