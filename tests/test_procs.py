"""Process discovery and job identity, with real processes."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from wattprint.daemon.procs import ProcessTracker, parse_stat, read_label

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]
BURN = [sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<60: pass"]


def test_parse_stat_with_spaces_and_parens_in_comm():
    text = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 12345 1000 25 18446744073709551615"
    st = parse_stat(42, text)
    assert st.comm == "a (b) c"
    assert st.ppid == 1 and st.pgid == 42
    assert st.cpu_ticks == 10
    assert st.start_ticks == 12345
    assert st.rss_bytes == 25 * os.sysconf("SC_PAGE_SIZE")


def test_label_found_and_rest_of_environment_discarded(labelled_process):
    p = labelled_process(argv=SLEEP, env={"SLURM_JOB_ID": "777", "SECRET_TOKEN": "canary"})
    time.sleep(0.2)
    assert read_label(p.pid, ("WATTPRINT_JOB", "SLURM_JOB_ID")) == ("SLURM_JOB_ID", "777")
    q = labelled_process(argv=SLEEP, env={"SLURM_JOB_ID": "777", "WATTPRINT_JOB": "mine"})
    time.sleep(0.2)
    assert read_label(q.pid, ("WATTPRINT_JOB", "SLURM_JOB_ID")) == ("WATTPRINT_JOB", "mine")


def test_labelled_tree_is_one_job_and_gpu_process_group_is_another(labelled_process):
    launcher = labelled_process(argv=["bash", "-c", f"{sys.executable} -c 'import time; time.sleep(60)' & "
                                      f"{sys.executable} -c 'import time; time.sleep(60)' & wait"],
                                env={"WATTPRINT_JOB": "train, \"x\"=1"})
    gpu_proc = labelled_process(argv=SLEEP)
    other = labelled_process(argv=SLEEP)  # its own process group, not on a GPU: no job
    time.sleep(0.5)
    t = ProcessTracker(rescan_interval_s=1000)
    v = t.observe(time.monotonic(), [gpu_proc.pid])
    by_label = {j.identity.label_raw: j for j in v.jobs}
    train = by_label['train, "x"=1']
    assert train.identity.label == "train___x__1"  # sanitised visibly, raw kept
    assert train.identity.root_pid == launcher.pid
    assert len(train.pids) == 3 and launcher.pid in train.pids
    assert train.identity.label_source == "WATTPRINT_JOB"
    assert train.identity.command == "bash"
    pg = by_label[""]
    assert pg.identity.label_source == "pgid" and pg.pids == {gpu_proc.pid}
    assert other.pid not in v.pid_to_job
    mine = {launcher.pid, gpu_proc.pid}
    assert len([j for j in v.jobs if j.identity.root_pid in mine]) == 2


def test_cpu_time_is_measured_and_job_id_is_stable(labelled_process):
    burner = labelled_process(argv=BURN, env={"WATTPRINT_JOB": "burn"})
    time.sleep(0.3)
    t = ProcessTracker(rescan_interval_s=1000)
    v1 = t.observe(time.monotonic(), [])
    time.sleep(1.0)
    v2 = t.observe(time.monotonic(), [])
    job = next(j for j in v2.jobs if j.identity.label == "burn")
    assert 0.6 <= job.cpu_s <= 1.3
    assert v2.cpu_busy_s >= job.cpu_s * 0.9
    assert not v2.scanned
    # A new tracker (a daemon restart) derives the same id.
    v3 = ProcessTracker().observe(time.monotonic(), [])
    assert job.identity.job_id in {j.identity.job_id for j in v3.jobs}
    assert job.identity.job_id == f"{burner.pid}-{int(round(job.identity.started_at * 100))}"
    assert job.identity.job_id in {j.identity.job_id for j in v1.jobs if j.identity.root_pid == burner.pid}


def test_job_keeps_its_id_when_the_leader_exits_first(labelled_process):
    launcher = labelled_process("orphan", argv=["bash", "-c",
                                                f"{sys.executable} -c 'import time; time.sleep(60)' & sleep 1; exit 0"])
    time.sleep(0.4)
    t = ProcessTracker(rescan_interval_s=0)
    first = next(j for j in t.observe(time.monotonic(), []).jobs if j.identity.label == "orphan")
    launcher.wait(timeout=5)
    time.sleep(0.2)
    later = [j for j in t.observe(time.monotonic(), []).jobs if j.identity.label == "orphan"]
    assert len(later) == 1
    assert later[0].identity.job_id == first.identity.job_id
    assert launcher.pid not in later[0].pids


def test_pid_reuse_is_a_new_process_identity(labelled_process):
    # Same pid number cannot be forced, so check that identity includes start time.
    a = labelled_process(argv=SLEEP, env={"WATTPRINT_JOB": "same"})
    time.sleep(0.05)
    b = labelled_process(argv=SLEEP, env={"WATTPRINT_JOB": "same"})
    time.sleep(0.3)
    jobs = [j for j in ProcessTracker().observe(time.monotonic(), []).jobs if j.identity.label == "same"]
    assert len(jobs) == 2
    assert {j.identity.root_pid for j in jobs} == {a.pid, b.pid}


def test_sanitize_and_overflow_per_user(labelled_process):
    from wattprint.daemon.procs import MAX_LABEL_LEN, OVERFLOW_LABEL, sanitize_label

    assert sanitize_label("llama-7b/lora.run:3@a+b") == "llama-7b/lora.run:3@a+b"
    assert sanitize_label('a "b",c=d\\\n') == "a__b__c_d__"
    assert sanitize_label("x" * 100) == "x" * MAX_LABEL_LEN
    assert sanitize_label("") == "_"
    # The bound is per user: run the jobs as a uid of their own, so that labelled
    # processes of anything else on the machine do not count (needs root).
    if os.geteuid() != 0:
        pytest.skip("needs root to start processes as another uid")
    uid = 54321 + os.getpid() % 1000
    ps = [labelled_process(f"many-{i}", uid=uid) for i in range(4)]
    time.sleep(0.4)
    t = ProcessTracker(max_labels_per_user=2)
    mine = [j for j in t.observe(time.monotonic(), []).jobs if j.identity.root_pid in {p.pid for p in ps}]
    labels = sorted(j.identity.label for j in mine)
    assert len(mine) == 4 and {j.identity.uid for j in mine} == {uid}
    assert labels.count(OVERFLOW_LABEL) == 2
    assert {j.identity.label_raw for j in mine} == {f"many-{i}" for i in range(4)}


def test_new_children_are_found_between_full_scans(labelled_process):
    parent = labelled_process("spawner", code="import subprocess, sys, time\ntime.sleep(1.0)\n"
                              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                              "time.sleep(60)")
    time.sleep(0.4)
    t = ProcessTracker(rescan_interval_s=1000)
    first = next(j for j in t.observe(time.monotonic(), []).jobs if j.identity.root_pid == parent.pid)
    assert first.pids == {parent.pid}
    time.sleep(1.5)
    v = t.observe(time.monotonic(), [])
    assert not v.scanned
    job = next(j for j in v.jobs if j.identity.root_pid == parent.pid)
    assert len(job.pids) == 2


def test_cpu_of_a_child_that_exits_between_ticks_is_booked(labelled_process):
    # The child burns ~0.8 s of CPU and exits between two ticks; the parent reaps it.
    code = ("import subprocess, sys, time\ntime.sleep(0.8)\n"
            "subprocess.run([sys.executable, '-c', 'import time\\nt=time.process_time()\\n"
            "while time.process_time()-t<0.8: pass'])\ntime.sleep(60)")
    parent = labelled_process(argv=[sys.executable, "-c", code], env={"WATTPRINT_JOB": "reaper"})
    time.sleep(0.4)
    t = ProcessTracker(rescan_interval_s=1000)
    t.observe(time.monotonic(), [])
    time.sleep(2.5)  # the child starts, burns and is reaped within this interval
    job = next(j for j in t.observe(time.monotonic(), []).jobs if j.identity.root_pid == parent.pid)
    assert job.pids == {parent.pid}
    assert 0.7 <= job.cpu_s <= 1.3


def test_classify_cgroup_paths():
    from wattprint.daemon.procs import classify_cgroup

    hexid = "0123456789abcdef" * 4
    kinds = ("slurm", "container", "systemd")
    assert classify_cgroup("/system.slice/slurmstepd.scope/job_42/step_0/user/task_0", kinds) == (
        "slurm", "/system.slice/slurmstepd.scope/job_42", "42")
    assert classify_cgroup("/slurm/uid_1000/job_7/step_batch", kinds) == ("slurm", "/slurm/uid_1000/job_7", "7")
    assert classify_cgroup(f"/system.slice/docker-{hexid}.scope", kinds) == (
        "container", f"/system.slice/docker-{hexid}.scope", f"container-{hexid[:12]}")
    assert classify_cgroup(f"/kubepods/burstable/pod1/{hexid}", kinds)[2] == f"container-{hexid[:12]}"
    assert classify_cgroup("/user.slice/user-1000.slice/user@1000.service/app.slice/run-u7.scope", kinds) == (
        "systemd", "/user.slice/user-1000.slice/user@1000.service/app.slice/run-u7.scope", "run-u7.scope")
    assert classify_cgroup("/system.slice/train.service", ("slurm",)) is None
    assert classify_cgroup("/", kinds) is None


def test_cgroup_job_with_real_cgroup(labelled_process, tmp_path):
    from wattprint.daemon.procs import detect_cgroup2_root

    root = detect_cgroup2_root()
    unit = os.path.join(root, "system.slice", f"wattprint-test-{os.getpid()}.service")
    try:
        os.makedirs(unit)
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup v2 directory under {root}: {exc}")
    try:
        a = labelled_process(argv=SLEEP, cgroup=unit)  # in the unit's cgroup from its start
        b = labelled_process(argv=SLEEP, cgroup=unit)
        time.sleep(0.2)
        t = ProcessTracker(cgroup_kinds=("systemd",), cgroup_root=root, rescan_interval_s=1000)
        v = t.observe(time.monotonic(), [a.pid])
        job = next(j for j in v.jobs if a.pid in j.pids)
        assert job.identity.label_source == "cgroup:systemd"
        assert job.identity.label == f"wattprint-test-{os.getpid()}.service"
        assert job.pids == {a.pid, b.pid}  # b is not on a GPU and in another process group
        c = labelled_process(argv=SLEEP, cgroup=unit)  # joins after the full scan
        v = t.observe(time.monotonic(), [a.pid])
        assert not v.scanned
        assert next(j for j in v.jobs if a.pid in j.pids).pids == {a.pid, b.pid, c.pid}
    finally:
        try:
            for pid in open(os.path.join(unit, "cgroup.procs")).read().split():
                os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.2)
            os.rmdir(unit)
        except OSError:
            pass


def test_pid_reuse_gives_two_jobs(labelled_process):
    """Force the kernel to hand out the same PID again (ns_last_pid, root only)."""
    if os.geteuid() != 0 or not os.path.exists("/proc/sys/kernel/ns_last_pid"):
        pytest.skip("needs root and /proc/sys/kernel/ns_last_pid")
    first = labelled_process(argv=SLEEP, env={"WATTPRINT_JOB": "reuse"})
    time.sleep(0.3)
    t = ProcessTracker(rescan_interval_s=0)
    a = next(j for j in t.observe(time.monotonic(), []).jobs if j.identity.root_pid == first.pid)
    labelled_process.end(first)
    second = None
    for _ in range(20):
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as fh:
                fh.write(str(first.pid - 1))
        except OSError as exc:
            pytest.skip(f"cannot set ns_last_pid: {exc}")
        cand = labelled_process(argv=SLEEP, env={"WATTPRINT_JOB": "reuse"})
        if cand.pid == first.pid:
            second = cand
            break
    if second is None:
        pytest.skip("could not get the same PID again (busy machine)")
    time.sleep(1.1)  # start times differ by at least one clock tick
    b = next(j for j in t.observe(time.monotonic(), []).jobs if j.identity.root_pid == second.pid)
    assert a.identity.root_pid == b.identity.root_pid
    assert a.identity.job_id != b.identity.job_id


def test_label_set_at_exec_wins_over_the_parents_process_group(labelled_process):
    """A child first seen between fork and exec carries its parent's environment; when
    it execs with a label of its own (same executable name), the label decides."""
    code = ("import os, sys, time\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    time.sleep(1.5)\n"
            "    os.execve(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)'],\n"
            "              {**os.environ, 'WATTPRINT_JOB': 'late-label'})\n"
            "time.sleep(60)\n")
    parent = labelled_process(argv=[sys.executable, "-c", code])
    time.sleep(0.5)
    t = ProcessTracker(rescan_interval_s=1000)
    v = t.observe(time.monotonic(), [parent.pid])  # the parent is on a GPU: its process group is a job
    pg = next(j for j in v.jobs if j.identity.root_pid == parent.pid)
    assert pg.identity.label_source == "pgid" and len(pg.pids) == 2  # the child, not yet exec'd, is in it
    child = next(p for p in pg.pids if p != parent.pid)
    time.sleep(2.0)
    v = t.observe(time.monotonic(), [parent.pid])
    assert not v.scanned
    labelled = [j for j in v.jobs if j.identity.label == "late-label"]
    assert len(labelled) == 1 and labelled[0].pids == {child}
    assert next(j for j in v.jobs if j.identity.root_pid == parent.pid).pids == {parent.pid}
