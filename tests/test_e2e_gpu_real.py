"""End to end: the real daemon process against the simulated NVML in its realistic mode
(issue 12, items 1-7 and 9: NVML as it really behaves).

Each test starts ``wattprint run`` (tests/daemon_harness.py) on a sim file
(tests/gpusim.py) with ``"realistic": true`` and asserts, between two scrapes taken
right after ticks, the energy booked per device, per job and unattributed against the
simulated power x the daemon's own tick timestamps, and the health of the GPU source.
Job processes are real sleeping processes labelled with WATTPRINT_JOB.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from daemon_harness import DaemonProcess, sample
from gpusim import gpu, proc, write_sim
from nvml_captures import H100_MIG, query_processes, sim_gpu_from_capture

PROC_PID_INIT_INO = 0xEFFFFFFC


def absent_pid() -> int:
    """A PID with no /proc entry here (as a process of another PID namespace looks)."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for pid in range(min(pid_max, 4_194_303) - 10, 1000, -1):
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    raise RuntimeError("no free PID")


def health_of(daemon: DaemonProcess, name: str = "gpu") -> dict[str, Any]:
    return {p["name"]: p for p in daemon.get("/healthz", allow_error=True)["parts"]}[name]


def wait_for(what: str, daemon: DaemonProcess, check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} not seen within {timeout_s} s: {health_of(daemon)}\n{daemon.log_tail()}")


def wait_ticks(daemon: DaemonProcess, n: int, timeout_s: float = 40.0) -> None:
    start = daemon.get("/healthz", allow_error=True)["tick"]
    wait_for(f"{n} ticks", daemon, lambda: daemon.get("/healthz", allow_error=True)["tick"] >= start + n, timeout_s)


def scrape(daemon: DaemonProcess) -> dict:
    """A scrape taken right after a tick, so two scrapes bound whole ticks."""
    wait_ticks(daemon, 1)
    return daemon.metrics()


def _value(m: dict, name: str, labels: dict[str, str]) -> float:
    """The series ``name`` whose labels include ``labels`` (GPU series also carry uuid
    and model_name); 0 when there is none yet; an error when several match."""
    want = set(labels.items())
    found = [v for (n, ls), v in m.items() if n == name and want <= set(ls)]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else 0.0


class Window:
    """What was booked between two scrapes: device, job and unattributed GPU joules."""

    def __init__(self, m1: dict, m2: dict):
        self.m1, self.m2 = m1, m2
        self.seconds = sample(m2, "wattprint_last_tick_timestamp_seconds") - \
            sample(m1, "wattprint_last_tick_timestamp_seconds")
        self.ticks = sample(m2, "wattprint_ticks_total") - sample(m1, "wattprint_ticks_total")

    def delta(self, name: str, **labels: str) -> float:
        return _value(self.m2, name, labels) - _value(self.m1, name, labels)

    def device_j(self, device: str) -> float:
        return self.delta("wattprint_device_energy_joules_total", kind="gpu", device=device)

    def job_j(self, job: dict[str, Any]) -> float:
        return self.delta("wattprint_job_energy_joules_total", job_id=job["id"], label=job["label"],
                          user=job["user"], kind="gpu")

    def unattributed_j(self) -> float:
        return self.delta("wattprint_unattributed_energy_joules_total", kind="gpu")


def gpu_devices(m: dict) -> set[str]:
    return {dict(labels)["device"] for (name, labels) in m
            if name == "wattprint_device_energy_joules_total" and dict(labels)["kind"] == "gpu"}


def start_daemon(tmp_path: Path, sim: Path, env: dict[str, str] | None = None,
                 argv_prefix: tuple[str, ...] = ()) -> DaemonProcess:
    daemon = DaemonProcess(tmp_path, sim_file=sim, powercap_root=None, argv_prefix=argv_prefix,
                           env={"WATTPRINT_JOBS_MAX_LABELS_PER_USER": "100000", **(env or {})})
    daemon.start()
    return daemon


def job_by_label(daemon: DaemonProcess, label: str, timeout_s: float = 20.0) -> dict[str, Any]:
    return daemon.wait_for_job(label, timeout_s=timeout_s)


# ------------------------------------------------------------------------- item 1 and 9


def test_older_driver_v2_fallback_and_nvml_calls_per_tick(tmp_path, labelled_process):
    """Item 1: a driver older than nvidia-ml-py (the unversioned process list raises
    NVMLLibraryMismatchError, as pynvml >= 12.550 does; _v2 answers): processes are
    still listed and attributed. Item 9: NVML calls per tick stay within 1 + 6 per GPU.
    Run against the newest pynvml and, in scripts/test.sh, against the floor version."""
    a, b = labelled_process("v2-a"), labelled_process("v2-b")
    sim = tmp_path / "sim.json"
    errors = {"nvmlDeviceGetComputeRunningProcesses": "FUNCTION_NOT_FOUND"}
    write_sim(sim, [gpu(0, 400.0, processes=[proc(a.pid, sm_util=75), proc(b.pid, sm_util=25)], errors=errors),
                    gpu(1, 100.0, processes=[])], realistic=True)
    daemon = start_daemon(tmp_path, sim)
    try:
        ja, jb = job_by_label(daemon, "v2-a"), job_by_label(daemon, "v2-b")
        m1 = scrape(daemon)
        wait_ticks(daemon, 8)
        w = Window(m1, daemon.metrics())
        assert w.seconds >= 6
        assert w.device_j("gpu0") / w.seconds == pytest.approx(400.0, rel=0.03)
        assert w.device_j("gpu1") / w.seconds == pytest.approx(100.0, rel=0.03)
        # 75 / 25 % SM: 300 W and 100 W; gpu1 (no process) is unattributed.
        assert w.job_j(ja) / w.seconds == pytest.approx(300.0, rel=0.05)
        assert w.job_j(jb) / w.seconds == pytest.approx(100.0, rel=0.05)
        assert w.unattributed_j() == pytest.approx(w.device_j("gpu0") + w.device_j("gpu1") - w.job_j(ja) - w.job_j(jb),
                                                   abs=1e-6)
        calls = w.delta("wattprint_gpu_nvml_calls_total")
        assert 0 < calls / w.ticks <= 1 + 6 * 2, calls / w.ticks
        assert health_of(daemon)["state"] == "ok"
        assert daemon.stop() == 0
    finally:
        daemon.kill()


# ------------------------------------------------------------------------------- item 2


def test_side_query_errors_never_skip_the_energy(tmp_path, labelled_process):
    """Item 2: NO_PERMISSION on the process list and memory of gpu0, TIMEOUT on
    utilisation of gpu1: both GPUs' energy is booked; gpu0's stays unattributed; the
    health says which feature; once the errors stop, attribution resumes."""
    a, b, c = labelled_process("side-a"), labelled_process("side-b"), labelled_process("side-c")
    sim = tmp_path / "sim.json"

    def files(errors: bool) -> None:
        e0 = {"nvmlDeviceGetComputeRunningProcesses": "NO_PERMISSION", "nvmlDeviceGetMemoryInfo": "NO_PERMISSION"}
        e1 = {"nvmlDeviceGetProcessUtilization": "TIMEOUT"}
        write_sim(sim, [gpu(0, 430.0, processes=[proc(a.pid, sm_util=90)], errors=e0 if errors else {}),
                        gpu(1, 200.0, processes=[proc(b.pid, 3 << 30, sm_util=90), proc(c.pid, 1 << 30, sm_util=10)],
                            errors=e1 if errors else {})], realistic=True)

    files(errors=True)
    daemon = start_daemon(tmp_path, sim, env={"WATTPRINT_GPU_RETRY_S": "1", "WATTPRINT_GPU_RETRY_MAX_S": "2"})
    try:
        jb, jc = job_by_label(daemon, "side-b"), job_by_label(daemon, "side-c")
        wait_for("gpu degraded", daemon, lambda: health_of(daemon)["state"] == "degraded")
        detail = health_of(daemon)["detail"]
        assert "gpu0: compute process list failed: NVMLError_NoPermission" in detail
        assert "gpu0: memory info failed" in detail and "gpu1: process utilisation failed" in detail
        m1 = scrape(daemon)
        wait_ticks(daemon, 6)
        w = Window(m1, daemon.metrics())
        assert w.device_j("gpu0") / w.seconds == pytest.approx(430.0, rel=0.03)  # booked, all of it
        assert w.device_j("gpu1") / w.seconds == pytest.approx(200.0, rel=0.03)
        # No utilisation on gpu1: by memory share (3:1); gpu0: nobody, unattributed.
        assert w.job_j(jb) / w.seconds == pytest.approx(150.0, rel=0.05)
        assert w.job_j(jc) / w.seconds == pytest.approx(50.0, rel=0.05)
        assert w.unattributed_j() / w.seconds == pytest.approx(430.0, rel=0.05)

        files(errors=False)
        wait_for("gpu ok", daemon, lambda: health_of(daemon)["state"] == "ok", timeout_s=15)
        ja = job_by_label(daemon, "side-a")
        m3 = scrape(daemon)
        wait_ticks(daemon, 5)
        w = Window(m3, daemon.metrics())
        assert w.job_j(ja) / w.seconds == pytest.approx(430.0, rel=0.05)
        assert w.job_j(jb) / w.seconds == pytest.approx(180.0, rel=0.05)  # 90 / 10 % SM again
        assert w.unattributed_j() / w.seconds == pytest.approx(0.0, abs=5.0)
        assert daemon.stop() == 0
    finally:
        daemon.kill()


# ------------------------------------------------------------------------------- item 3


def test_junk_utilisation_samples_do_not_zero_the_shares(tmp_path, labelled_process):
    """Item 3: the realistic driver returns padding, a stray PID at smUtil 37100, and
    every 5th call a sample an hour in the future. The old collector then read 0 % for
    good and split by memory (here 1:3, the opposite of the SM shares)."""
    a, b = labelled_process("junk-a"), labelled_process("junk-b")
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, 300.0, processes=[proc(a.pid, 1 << 30, sm_util=80), proc(b.pid, 3 << 30, sm_util=20)])],
              realistic=True)
    daemon = start_daemon(tmp_path, sim)
    try:
        ja, jb = job_by_label(daemon, "junk-a"), job_by_label(daemon, "junk-b")
        wait_ticks(daemon, 6)  # past the first future-stamped garbage entry
        m1 = scrape(daemon)
        wait_ticks(daemon, 12)
        w = Window(m1, daemon.metrics())
        assert w.device_j("gpu0") / w.seconds == pytest.approx(300.0, rel=0.03)
        assert w.job_j(ja) / w.seconds == pytest.approx(240.0, rel=0.05)
        assert w.job_j(jb) / w.seconds == pytest.approx(60.0, rel=0.05)
        assert w.unattributed_j() / w.seconds == pytest.approx(0.0, abs=3.0)
        assert w.delta("wattprint_gpu_util_samples_discarded_total") >= w.ticks * 0.8  # the stray entries
        assert health_of(daemon)["state"] == "ok"
        assert daemon.stop() == 0
    finally:
        daemon.kill()


# ------------------------------------------------------------------------------- item 4


def test_mig_board_from_the_h100_capture(tmp_path, labelled_process):
    """Item 4, on the real H100 MIG capture (4 GPU instances of 3, 2, 1, 1 slices; three
    processes in GI 2, no utilisation): GI 2 gets 3/7 of the board's power, split by
    used memory among its processes; two are our jobs, the third is invisible. Without
    privileges on the parent the MIG device lists are used; when those fail too, the
    energy is still booked, unattributed, and the health says so."""
    a, b = labelled_process("mig-a"), labelled_process("mig-b")
    ghost = absent_pid()
    capture = query_processes(H100_MIG)
    pids = {capture[0]["pid"]: a.pid, capture[1]["pid"]: b.pid, capture[2]["pid"]: ghost}
    mib = {pids[p["pid"]]: p["used_mib"] for p in capture}
    board_w = 432.0
    sim = tmp_path / "sim.json"
    parent_denied = {"nvmlDeviceGetComputeRunningProcesses": "NO_PERMISSION"}

    def files(mig_errors: dict[str, str]) -> None:
        g = sim_gpu_from_capture(H100_MIG, power_w=board_w, pids=pids)
        g.update(errors=parent_denied, mig_errors=mig_errors)
        write_sim(sim, [g], realistic=True)

    files({})
    daemon = start_daemon(tmp_path, sim, env={"WATTPRINT_GPU_RETRY_S": "1", "WATTPRINT_GPU_RETRY_MAX_S": "2"})
    try:
        ja, jb = job_by_label(daemon, "mig-a"), job_by_label(daemon, "mig-b")
        m1 = scrape(daemon)
        wait_ticks(daemon, 7)
        w = Window(m1, daemon.metrics())
        assert gpu_devices(w.m2) == {"gpu0", "gpu0-mig2", "gpu0-mig3", "gpu0-mig9", "gpu0-mig10"}
        board = sum(w.device_j(d) for d in gpu_devices(w.m2))
        assert board / w.seconds == pytest.approx(board_w, rel=0.03)
        gi2 = board * 3 / 7
        assert w.device_j("gpu0-mig2") == pytest.approx(gi2, rel=1e-6)
        assert w.device_j("gpu0-mig3") == pytest.approx(board * 2 / 7, rel=1e-6)
        assert w.device_j("gpu0") == pytest.approx(0.0, abs=1e-6)  # all 7 slices are in instances
        total_mib = sum(mib.values())
        assert w.job_j(ja) == pytest.approx(gi2 * mib[a.pid] / total_mib, rel=0.01)
        assert w.job_j(jb) == pytest.approx(gi2 * mib[b.pid] / total_mib, rel=0.01)
        assert w.unattributed_j() == pytest.approx(board - w.job_j(ja) - w.job_j(jb), rel=1e-6)
        assert health_of(daemon)["state"] == "ok"  # the MIG device lists gave everything
        host = daemon.get("/api/v1/host")
        assert "gpu0-mig2" in str(host)  # per-instance devices in the API

        files({"nvmlDeviceGetComputeRunningProcesses": "NO_PERMISSION"})  # no process list at all
        wait_for("gpu degraded", daemon, lambda: health_of(daemon)["state"] == "degraded")
        assert "unattributed" in health_of(daemon)["detail"]
        m3 = scrape(daemon)
        wait_ticks(daemon, 5)
        w = Window(m3, daemon.metrics())
        board = sum(w.device_j(d) for d in gpu_devices(w.m2))
        assert board / w.seconds == pytest.approx(board_w, rel=0.03)  # still booked
        assert w.job_j(ja) == 0.0 and w.job_j(jb) == 0.0
        assert w.unattributed_j() == pytest.approx(board, rel=1e-6)
        assert daemon.stop() == 0
    finally:
        daemon.kill()


# ------------------------------------------------------------------------------- item 5


def _own_pid_namespace_prefix() -> tuple[str, ...]:
    """Run the daemon in a PID namespace of its own, unless this one already is."""
    if os.stat("/proc/self/ns/pid").st_ino != PROC_PID_INIT_INO:
        return ()
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:  # pragma: no cover - not root
        if os.environ.get("CI"):
            pytest.fail("cannot make a PID namespace for the daemon (CI must run as root)")
        pytest.skip("cannot make a PID namespace (not root)")
    return ("unshare", "--pid", "--fork", "--kill-child=SIGTERM", "--mount-proc")


def test_container_without_host_pid_namespace_degrades(tmp_path, labelled_process):
    """Item 5: NVML returns host PIDs; a daemon in another PID namespace must not match
    them: every GPU process is invisible, the energy unattributed, health degraded
    with the fix, and the processes counted."""
    a = labelled_process("ns-a")
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, 250.0, processes=[proc(a.pid, sm_util=90), proc(a.pid + 1, sm_util=10)])],
              realistic=True, pid_namespace="host")
    daemon = start_daemon(tmp_path, sim, argv_prefix=_own_pid_namespace_prefix())
    try:
        wait_for("gpu degraded", daemon, lambda: health_of(daemon)["state"] == "degraded")
        assert "not in the host PID namespace" in health_of(daemon)["detail"]
        assert "--pid=host" in health_of(daemon)["detail"]
        m1 = scrape(daemon)
        wait_ticks(daemon, 5)
        w = Window(m1, daemon.metrics())
        assert w.device_j("gpu0") / w.seconds == pytest.approx(250.0, rel=0.03)
        assert w.unattributed_j() == pytest.approx(w.device_j("gpu0"), rel=1e-9)
        assert sample(w.m2, "wattprint_gpu_processes_not_visible") == 2
        assert all(j["energy_j"]["gpu"] == 0 for j in daemon.get("/api/v1/jobs?limit=1000")["jobs"])
    finally:
        daemon.kill()


# ------------------------------------------------------------------------------- item 6


def test_driver_loaded_after_start_and_gpu_added_later(tmp_path, labelled_process):
    """Item 6: no driver at start: the GPU source is disabled, quietly (not degraded);
    when the driver loads, nvmlInit is retried and the GPU measured from then on; a GPU
    added later (the count is fixed at nvmlInit) is found at the periodic re-init; a
    GPU lost meanwhile is isolated while the others are measured."""
    a = labelled_process("late-a")
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, 300.0, processes=[proc(a.pid, sm_util=90)])], realistic=True, driver_loaded=False)
    daemon = start_daemon(tmp_path, sim, env={"WATTPRINT_GPU_RETRY_S": "1", "WATTPRINT_GPU_RETRY_MAX_S": "2",
                                              "WATTPRINT_GPU_REINIT_INTERVAL_S": "3"})
    try:
        wait_ticks(daemon, 2)
        part = health_of(daemon)
        assert part["state"] == "disabled" and "no NVIDIA driver" in part["detail"], part
        assert part["errors_total"] == 0
        assert "gpu degraded" not in daemon.log_tail(200)

        write_sim(sim, [gpu(0, 300.0, processes=[proc(a.pid, sm_util=90)])], realistic=True)  # driver loaded
        wait_for("gpu ok", daemon, lambda: health_of(daemon)["state"] == "ok")
        ja = job_by_label(daemon, "late-a")
        m1 = scrape(daemon)
        wait_ticks(daemon, 4)
        w = Window(m1, daemon.metrics())
        assert w.device_j("gpu0") / w.seconds == pytest.approx(300.0, rel=0.03)
        assert w.job_j(ja) == pytest.approx(w.device_j("gpu0"), rel=1e-6)

        write_sim(sim, [gpu(0, 300.0, processes=[proc(a.pid, sm_util=90)]), gpu(1, 120.0)], realistic=True)
        wait_for("gpu1", daemon, lambda: "gpu1" in gpu_devices(daemon.metrics()), timeout_s=15)
        m2 = scrape(daemon)
        wait_ticks(daemon, 4)
        w = Window(m2, daemon.metrics())
        assert w.device_j("gpu1") / w.seconds == pytest.approx(120.0, rel=0.03)
        assert w.device_j("gpu0") / w.seconds == pytest.approx(300.0, rel=0.03)

        # gpu1 falls off the bus (removed from the file: GPU_IS_LOST for its index).
        write_sim(sim, [gpu(0, 300.0, processes=[proc(a.pid, sm_util=90)])], realistic=True)
        wait_for("gpu1 lost", daemon, lambda: "gpu1" in health_of(daemon)["detail"])
        assert "GpuIsLost" in health_of(daemon)["detail"]
        m3 = scrape(daemon)
        wait_ticks(daemon, 4)
        w = Window(m3, daemon.metrics())
        assert w.device_j("gpu0") / w.seconds == pytest.approx(300.0, rel=0.03)  # the other goes on
        assert w.ticks >= 3 and sample(w.m2, "wattprint_tick_overruns_total") == sample(w.m1, "wattprint_tick_overruns_total")
        assert daemon.stop() == 0
    finally:
        daemon.kill()


# ------------------------------------------------------------------------------- item 7


def test_power_only_board_is_sampled_faster_than_the_tick(tmp_path, labelled_process):
    """Item 7: a Pascal board (no energy counter, instant power) alternating 100 and
    300 W every 0.5 s. Read once per 1 s tick the power is always caught in the same
    phase (-50 % or +50 %); sampled at 10 Hz and integrated it is 200 W within 5 %."""
    a = labelled_process("pascal-a")
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=0.0, power_pattern=[[100, 0.5], [300, 0.5]], architecture="pascal",
                        energy_counter=False, processes=[proc(a.pid, sm_util=50)])], realistic=True)
    daemon = start_daemon(tmp_path, sim)
    try:
        ja = job_by_label(daemon, "pascal-a")
        assert ja["energy_sources"]["gpu"] == "power"
        m1 = scrape(daemon)
        wait_ticks(daemon, 10)
        w = Window(m1, daemon.metrics())
        assert w.seconds >= 8
        truth_j = 200.0 * w.seconds  # whole 1 s periods: the mean is 200 W
        assert w.device_j("gpu0") == pytest.approx(truth_j, rel=0.05)
        assert w.job_j(ja) == pytest.approx(truth_j, rel=0.05)
        assert w.delta("wattprint_gpu_power_samples_total") / w.seconds == pytest.approx(10.0, rel=0.3)
        assert health_of(daemon)["state"] == "ok"
        assert daemon.stop() == 0
    finally:
        daemon.kill()
