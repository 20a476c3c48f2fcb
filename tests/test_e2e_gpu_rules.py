"""End to end: issue 12 item 8, the GPU attribution rules for memory-only processes,
encoder work and MPS clients, through the real daemon on the simulated NVML in its
realistic mode (padding and garbage samples, only the latest sample per process, no
samples at all for a process with no engine activity, 100 ms counter steps).

The expected joules come from the test's own numbers and the rules as docs/jobs.md
states them ("GPU attribution rules"): a process's activity is max(SM, encoder,
decoder) %; a sole process gets everything; with some activity, the GPU's idle floor
x time goes by used-memory share and the rest by activity share; the idle floor is the
lowest power seen with no process on the GPU (0 until the GPU was seen empty).
"""

from __future__ import annotations

import pytest

from gpusim import gpu, proc, write_sim
from test_e2e_gpu_real import Window, health_of, job_by_label, scrape, start_daemon, wait_ticks

GIB = 1 << 30


def test_memory_only_process_gets_no_active_energy(tmp_path, labelled_process):
    """A process that holds memory but has no SM sample (the realistic driver gives it
    none, as the H100 capture's pmon shows "-") gets none of the active energy; with
    the GPU never seen empty there is no idle floor, so the busy job pays it all."""
    busy, holder = labelled_process("rule-busy"), labelled_process("rule-holder")
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, 300.0, processes=[proc(busy.pid, 2 * GIB, sm_util=70),
                                             proc(holder.pid, 6 * GIB)])], realistic=True)
    daemon = start_daemon(tmp_path, sim)
    try:
        jb, jh = job_by_label(daemon, "rule-busy"), None
        # The holder's job exists (it is a labelled process) but may have no energy.
        wait_ticks(daemon, 2)
        jobs = {j["label"]: j for j in daemon.get("/api/v1/jobs")["jobs"]}
        jh = jobs["rule-holder"]
        m1 = scrape(daemon)
        wait_ticks(daemon, 8)
        w = Window(m1, daemon.metrics())
        assert w.device_j("gpu0") / w.seconds == pytest.approx(300.0, rel=0.03)
        assert w.job_j(jb) / w.seconds == pytest.approx(300.0, rel=0.03)
        assert w.job_j(jh) == pytest.approx(0.0, abs=1e-6)
        assert w.unattributed_j() == pytest.approx(0.0, abs=3.0)
        assert health_of(daemon)["state"] == "ok"
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_idle_floor_goes_by_memory_share_once_the_gpu_was_seen_empty(tmp_path, labelled_process):
    """The GPU idles empty at 60 W first (the daemon learns its floor), then a busy job
    (2 GiB, 70 % SM) and a memory-only holder (6 GiB) run at 300 W: the holder pays
    6/8 of the 60 W floor, the busy job 2/8 of it plus all of the 240 W active part."""
    busy, holder = labelled_process("floor-busy"), labelled_process("floor-holder")
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, 60.0, processes=[])], realistic=True)
    daemon = start_daemon(tmp_path, sim)
    try:
        wait_ticks(daemon, 4)  # empty intervals: the floor is learned
        write_sim(sim, [gpu(0, 300.0, processes=[proc(busy.pid, 2 * GIB, sm_util=70),
                                                 proc(holder.pid, 6 * GIB)])], realistic=True)
        jb, jh = job_by_label(daemon, "floor-busy"), job_by_label(daemon, "floor-holder")
        wait_ticks(daemon, 3)  # past the 1-s power average's transition
        m1 = scrape(daemon)
        wait_ticks(daemon, 10)
        w = Window(m1, daemon.metrics())
        assert w.device_j("gpu0") / w.seconds == pytest.approx(300.0, rel=0.03)
        # The floor is the lowest empty interval seen; with 100 ms counter steps one
        # interval of ~1 s can read up to ~10 % low, hence the tolerances.
        assert w.job_j(jh) / w.seconds == pytest.approx(60.0 * 6 / 8, rel=0.12)
        assert w.job_j(jb) / w.seconds == pytest.approx(240.0 + 60.0 * 2 / 8, rel=0.03)
        assert (w.job_j(jb) + w.job_j(jh)) / w.seconds == pytest.approx(300.0, rel=0.03)
        assert w.unattributed_j() == pytest.approx(0.0, abs=3.0)
        assert health_of(daemon)["state"] == "ok"
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_encoder_work_counts_as_activity(tmp_path, labelled_process):
    """As in the L40S capture (tests/fixtures/nvml/linux-x86_64__nvidia-l40s__595.80.txt:
    ffmpeg at a few % SM but 24-49 % NVENC): a transcode at 5 % SM / 40 % encoder next
    to a trainer at 60 % SM weighs 40 against 60."""
    enc, train = labelled_process("rule-ffmpeg"), labelled_process("rule-train")
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, 200.0, name="NVIDIA L40S", architecture="ada",
                        processes=[proc(enc.pid, GIB, sm_util=5, enc_util=40),
                                   proc(train.pid, GIB, sm_util=60)])], realistic=True)
    daemon = start_daemon(tmp_path, sim)
    try:
        je, jt = job_by_label(daemon, "rule-ffmpeg"), job_by_label(daemon, "rule-train")
        wait_ticks(daemon, 2)
        m1 = scrape(daemon)
        wait_ticks(daemon, 10)
        w = Window(m1, daemon.metrics())
        assert w.device_j("gpu0") / w.seconds == pytest.approx(200.0, rel=0.03)
        assert w.job_j(je) / w.seconds == pytest.approx(200.0 * 40 / 100, rel=0.05)
        assert w.job_j(jt) / w.seconds == pytest.approx(200.0 * 60 / 100, rel=0.05)
        assert w.unattributed_j() == pytest.approx(0.0, abs=3.0)
        assert health_of(daemon)["state"] == "ok"
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_mps_clients_are_listed_and_split_by_their_activity(tmp_path, labelled_process):
    """MPS clients appear only in nvmlDeviceGetMPSComputeRunningProcesses; each has
    its own samples and is a process like any other (30 % vs 10 % SM: 3:1)."""
    c1, c2 = labelled_process("mps-a"), labelled_process("mps-b")
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, 240.0, processes=[proc(c1.pid, GIB, sm_util=30, type="mps"),
                                             proc(c2.pid, GIB, sm_util=10, type="mps")])], realistic=True)
    daemon = start_daemon(tmp_path, sim)
    try:
        j1, j2 = job_by_label(daemon, "mps-a"), job_by_label(daemon, "mps-b")
        wait_ticks(daemon, 2)
        m1 = scrape(daemon)
        wait_ticks(daemon, 10)
        w = Window(m1, daemon.metrics())
        assert w.device_j("gpu0") / w.seconds == pytest.approx(240.0, rel=0.03)
        assert w.job_j(j1) / w.seconds == pytest.approx(180.0, rel=0.05)
        assert w.job_j(j2) / w.seconds == pytest.approx(60.0, rel=0.05)
        assert w.unattributed_j() == pytest.approx(0.0, abs=3.0)
        assert health_of(daemon)["state"] == "ok"
        assert daemon.stop() == 0
    finally:
        daemon.kill()
