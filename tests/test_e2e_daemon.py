"""End to end: the real daemon process over two simulated GPUs, a powercap tree that
advances at known rates (and wraps), and two real labelled processes (one sleeping, one
burning CPU and holding 64 MiB), with an invisible process on a GPU.

Checks through /metrics, over windows of ticks followed by polling the daemon's tick
counter (no fixed sleeps), that each job's GPU, CPU and DRAM energy equals the truth
computed from what the test controls (simulated power x the job's utilisation share x
tick time; RAPL rate x the job's share of CPU capacity read from /proc; DRAM rate x
RSS share; see tests/e2e_truth.py), that unattributed energy equals its own expected
value (the invisible process's share, idle and other CPU time, other memory), and
conservation as an extra check; that RAPL wraparound and an NVML counter reset lose
nothing, that totals continue across a daemon crash (SIGKILL) and restart, and that a
hostile job label survives exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.parse

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon_harness import DaemonProcess, scrape, wait_ticks
from e2e_truth import CPU_ABS_S, CPU_REL, INVISIBLE_PID, descendants, follow
from gpusim import gpu, proc, write_sim
from powercap import PowercapTree
from servers import promtool_check_metrics
from wattprint.daemon.procs import sanitize_label

GPU_W, GPU1_W, PKG_W, DRAM_W = 250.0, 100.0, 30.0, 5.0
NASTY = 'train "q", a=b c\\d\\\nnext}line {x="y"} é'
SANE = sanitize_label(NASTY)
SANE_Q = urllib.parse.quote(SANE, safe="")
# The label variable of this test's jobs only: labelled processes of other tests on the
# machine (outside the suite's PID namespace) are then nobody's jobs here, so the
# unattributed CPU and DRAM energy have an expected value the test can compute.
LABEL_VAR = f"WATTPRINT_E2E_{os.getpid()}"
BURNER = "buf = bytearray(64 << 20)\nfor i in range(0, len(buf), 4096): buf[i] = 1\nwhile True: pass\n"
# Shares (docs/jobs.md; gpu0 and gpu1 are never empty, so no idle floor is learned):
# gpu0: A 60 % SM (memory not available), B 20 % SM (2 GiB), an invisible process 20 % SM;
# gpu1: A and B with no utilisation samples and memory not available: equal shares.
A_GPU_W = 0.6 * GPU_W + 0.5 * GPU1_W
B_GPU_W = 0.2 * GPU_W + 0.5 * GPU1_W
UNATTRIBUTED_GPU_W = 0.2 * GPU_W


def sim_gpus(a_pid: int, b_pid: int, **extra) -> list[dict]:
    return [gpu(0, power_w=GPU_W, processes=[proc(a_pid, used_memory_bytes=None, sm_util=60),
                                             proc(b_pid, used_memory_bytes=2 << 30, sm_util=20),
                                             proc(INVISIBLE_PID, used_memory_bytes=None, sm_util=20)], **extra),
            gpu(1, power_w=GPU1_W, processes=[proc(a_pid, used_memory_bytes=None),
                                              proc(b_pid, used_memory_bytes=None)], **extra)]


def power_tol_j(power_w: float, seconds: float) -> float:
    """Tolerance of energy over tick-time: each tick's counter reads come a little after
    its timestamp (threads on a loaded machine: measured < 0.1 s), so the two ends of a
    window may differ by up to 0.2 s of power; plus 1 % for the feeder's own steps."""
    return power_w * 0.2 + 0.01 * power_w * seconds


def assert_power(got_j: float, power_w: float, seconds: float, what: str) -> None:
    want = power_w * seconds
    assert abs(got_j - want) <= power_tol_j(power_w, seconds), f"{what}: {got_j:.2f} J, want {want:.2f} J"


@pytest.fixture
def job_process(labelled_process):
    return labelled_process(NASTY, variable=LABEL_VAR)


@pytest.fixture
def burner(labelled_process):
    return labelled_process("e2e-burner", variable=LABEL_VAR, code=BURNER)


def check_window(w, a_id: str, b_id: str, why: str) -> None:
    """Per job and component, in absolute joules, against truth from what the test
    controls (e2e_truth); unattributed against its own expected value."""
    s = w.seconds
    assert w.ticks >= 8 and s > 0
    # Devices: the simulated powers and the RAPL feed rates x tick time.
    assert_power(w.device("gpu", "gpu0"), GPU_W, s, f"{why}: gpu0")
    assert_power(w.device("gpu", "gpu1"), GPU1_W, s, f"{why}: gpu1")
    assert_power(w.device("cpu", "package-0"), PKG_W, s, f"{why}: package-0")
    assert_power(w.device("dram", "dram-0"), DRAM_W, s, f"{why}: dram-0")
    a, b = w.booked(a_id), w.booked(b_id)
    print(f"{why}: {w.ticks} ticks in {s:.3f} s; A {a}, B {b}; want A cpu {w.cpu_j('A', PKG_W):.3f} "
          f"B cpu {w.cpu_j('B', PKG_W):.3f} dram {w.dram_j('A', DRAM_W):.4f}/{w.dram_j('B', DRAM_W):.4f}; "
          f"unattributed cpu {w.unattributed('cpu'):.3f} want {w.cpu_unattributed_j(PKG_W):.3f}; "
          f"devices gpu0 {w.device('gpu', 'gpu0') / s:.2f} W pkg {w.device('cpu') / s:.3f} W", flush=True)
    # GPU: power x utilisation share x time...
    assert_power(a["gpu"], A_GPU_W, s, f"{why}: job A GPU")
    assert_power(b["gpu"], B_GPU_W, s, f"{why}: job B GPU")
    assert_power(w.unattributed("gpu"), UNATTRIBUTED_GPU_W, s, f"{why}: unattributed GPU (the invisible process)")
    # ...and, exactly, the shares of what each GPU measured.
    gpu0, gpu1 = w.device("gpu", "gpu0"), w.device("gpu", "gpu1")
    assert a["gpu"] == pytest.approx(0.6 * gpu0 + 0.5 * gpu1, rel=1e-6)
    assert b["gpu"] == pytest.approx(0.2 * gpu0 + 0.5 * gpu1, rel=1e-6)
    assert w.unattributed("gpu") == pytest.approx(0.2 * gpu0, rel=1e-6)
    # CPU: feed rate x the job's share of the machine's CPU capacity (read from /proc).
    assert w.job_cpu_s("B") > 0.3 * s, f"{why}: the burner got little CPU ({w.job_cpu_s('B'):.2f} s in {s:.1f} s)"
    for name, got in (("A", a["cpu"]), ("B", b["cpu"])):
        want = w.cpu_j(name, PKG_W)
        assert abs(got - want) <= CPU_REL * want + PKG_W * CPU_ABS_S, f"{why}: job {name} CPU {got:.3f} J, want {want:.3f} J"
    un_cpu, want_un_cpu = w.unattributed("cpu"), w.cpu_unattributed_j(PKG_W)
    assert un_cpu >= 0
    assert abs(un_cpu - want_un_cpu) <= CPU_REL * w.cpu_j("B", PKG_W) + PKG_W * CPU_ABS_S, (
        f"{why}: unattributed CPU {un_cpu:.3f} J, want {want_un_cpu:.3f} J")
    # DRAM: feed rate x RSS / used memory.
    for name, got in (("A", a["dram"]), ("B", b["dram"])):
        want = w.dram_j(name, DRAM_W)
        assert got == pytest.approx(want, rel=0.05, abs=1e-3), f"{why}: job {name} DRAM"
    assert w.unattributed("dram") >= 0
    assert w.unattributed("dram") == pytest.approx(w.dram_unattributed_j(DRAM_W), rel=0.05)


def test_daemon_end_to_end(tmp_path, job_process, burner, promtool, labelled_process):
    tree = PowercapTree(tmp_path / "powercap")
    zones = tree.add_package(0, max_energy_range_uj=100_000_000, dram=True)  # wraps every ~3 s at 30 W
    sim = tmp_path / "sim.json"
    write_sim(sim, sim_gpus(job_process.pid, burner.pid))
    daemon = DaemonProcess(tmp_path, sim_file=sim, powercap_root=tmp_path / "powercap",
                           extra_toml=f'[jobs]\nlabel_env = ["{LABEL_VAR}"]\n')
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
        job_id = job["id"]
        b_id = daemon.wait_for_job("e2e-burner")["id"]
        pids = {"A": lambda: descendants(job_process.pid), "B": lambda: descendants(burner.pid)}

        # 1. Per job and component over 10 ticks, against truth from what the test controls.
        w1 = follow(daemon, 10, pids)
        check_window(w1, job_id, b_id, "steady")

        # 2. An NVML counter reset (driver reload) loses nothing.
        write_sim(sim, sim_gpus(job_process.pid, burner.pid, counter_epoch=1))
        w2 = follow(daemon, 8, pids)
        check_window(w2, job_id, b_id, "across an NVML counter reset")
        # ...and RAPL wrapped several times meanwhile without losing anything (checked above).
        assert feeder.fed_j(zones["package"]) > 3 * 100.0

        # 3. Since the start: the sole unattributed GPU energy is the invisible process's
        # 20 % of gpu0 (the jobs were there from the first tick); conservation as an extra check.
        host = daemon.get("/api/v1/host")
        m = scrape(daemon)
        assert host["unattributed_energy_j"]["gpu"] >= 0
        assert m.unattributed_j("gpu") == pytest.approx(0.2 * m.device_j("gpu", "gpu0"), rel=1e-6)
        for kind in ("gpu", "cpu", "dram"):
            dev = host["device_energy_j"][kind]
            assert dev > 0 and host["unattributed_energy_j"][kind] >= 0
            assert host["attributed_energy_j"][kind] + host["unattributed_energy_j"][kind] == pytest.approx(dev, rel=1e-9)
        job = daemon.get(f"/api/v1/jobs/{urllib.parse.quote(job_id, safe='')}")
        assert job["co2e_g"] == pytest.approx(job["energy_kwh"] * 475.0, rel=1e-9)
        assert job["gpu_seconds"] > 2 * 10  # two GPUs held for 10 + 8 ticks and more
        assert job["peak_gpu_memory_bytes"] == 0  # NVML said "not available" for all of A's memory

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
        wait_ticks(daemon, 3)
        after = daemon.get(f"/api/v1/jobs/{urllib.parse.quote(job_id, safe='')}")
        assert after["id"] == job_id and after["state"] == "running"
        gained = after["energy_j"]["gpu"] - before["energy_j"]["gpu"]
        span = after["last_seen"] - before["last_seen"]
        downtime = restarted_at - killed_at
        assert gained <= A_GPU_W * span + power_tol_j(A_GPU_W, span)  # nothing counted twice
        assert gained >= A_GPU_W * (span - downtime - 1.5) - power_tol_j(A_GPU_W, span)  # lost at most the downtime and one tick
        dup = [j for j in daemon.get(f"/api/v1/jobs?label={SANE_Q}&limit=10000")["jobs"] if j["label_raw"] == NASTY]
        assert len(dup) == 1, [(j["id"], j["root_pid"], j["command"], j["started_at"], j["state"]) for j in dup]

        # 6. The job ends when its process exits, totals intact.
        labelled_process.end(job_process)
        write_sim(sim, [gpu(0, power_w=GPU_W, counter_epoch=1, processes=[]),
                        gpu(1, power_w=GPU1_W, counter_epoch=1, processes=[])])
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
