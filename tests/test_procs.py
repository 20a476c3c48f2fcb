"""Process discovery and job identity, with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from wattprint.daemon.procs import ProcessTracker, parse_stat, read_label

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]
BURN = [sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<60: pass"]


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []

    def start(cmd, env_extra=None, **kw):
        env = {k: v for k, v in os.environ.items() if k not in ("WATTPRINT_JOB", "SLURM_JOB_ID")}
        env.update(env_extra or {})
        kw.setdefault("start_new_session", True)  # so teardown can kill the whole group
        p = subprocess.Popen(cmd, env=env, **kw)
        started.append(p)
        return p

    yield start
    for p in started:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def test_parse_stat_with_spaces_and_parens_in_comm():
    text = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 12345 1000 25 18446744073709551615"
    st = parse_stat(42, text)
    assert st.comm == "a (b) c"
    assert st.ppid == 1 and st.pgid == 42
    assert st.cpu_ticks == 10
    assert st.start_ticks == 12345
    assert st.rss_bytes == 25 * os.sysconf("SC_PAGE_SIZE")


def test_label_found_and_rest_of_environment_discarded(procs):
    p = procs(SLEEP, {"SLURM_JOB_ID": "777", "SECRET_TOKEN": "canary"})
    time.sleep(0.2)
    assert read_label(p.pid, ("WATTPRINT_JOB", "SLURM_JOB_ID")) == ("SLURM_JOB_ID", "777")
    q = procs(SLEEP, {"SLURM_JOB_ID": "777", "WATTPRINT_JOB": "mine"})
    time.sleep(0.2)
    assert read_label(q.pid, ("WATTPRINT_JOB", "SLURM_JOB_ID")) == ("WATTPRINT_JOB", "mine")


def test_labelled_tree_is_one_job_and_gpu_process_group_is_another(procs):
    launcher = procs(["bash", "-c", f"{sys.executable} -c 'import time; time.sleep(60)' & "
                      f"{sys.executable} -c 'import time; time.sleep(60)' & wait"],
                     {"WATTPRINT_JOB": "train, \"x\"=1"})
    gpu_proc = procs(SLEEP)
    other = procs(SLEEP)  # its own process group, not on a GPU: no job
    time.sleep(0.5)
    t = ProcessTracker(rescan_interval_s=1000)
    v = t.observe(time.monotonic(), [gpu_proc.pid])
    by_label = {j.identity.label: j for j in v.jobs}
    train = by_label['train, "x"=1']
    assert train.identity.root_pid == launcher.pid
    assert len(train.pids) == 3 and launcher.pid in train.pids
    assert train.identity.label_source == "WATTPRINT_JOB"
    assert train.identity.command == "bash"
    pg = by_label[""]
    assert pg.identity.label_source == "pgid" and pg.pids == {gpu_proc.pid}
    assert other.pid not in v.pid_to_job
    mine = {launcher.pid, gpu_proc.pid}
    assert len([j for j in v.jobs if j.identity.root_pid in mine]) == 2


def test_cpu_time_is_measured_and_job_id_is_stable(procs):
    burner = procs(BURN, {"WATTPRINT_JOB": "burn"})
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


def test_job_keeps_its_id_when_the_leader_exits_first(procs):
    launcher = procs(["bash", "-c", f"{sys.executable} -c 'import time; time.sleep(60)' & sleep 1; exit 0"],
                     {"WATTPRINT_JOB": "orphan"})
    time.sleep(0.4)
    t = ProcessTracker(rescan_interval_s=0)
    first = next(j for j in t.observe(time.monotonic(), []).jobs if j.identity.label == "orphan")
    launcher.wait(timeout=5)
    time.sleep(0.2)
    later = [j for j in t.observe(time.monotonic(), []).jobs if j.identity.label == "orphan"]
    assert len(later) == 1
    assert later[0].identity.job_id == first.identity.job_id
    assert launcher.pid not in later[0].pids


def test_pid_reuse_is_a_new_process_identity(procs):
    # Same pid number cannot be forced, so check that identity includes start time.
    a = procs(SLEEP, {"WATTPRINT_JOB": "same"})
    time.sleep(0.05)
    b = procs(SLEEP, {"WATTPRINT_JOB": "same"})
    time.sleep(0.3)
    jobs = [j for j in ProcessTracker().observe(time.monotonic(), []).jobs if j.identity.label == "same"]
    assert len(jobs) == 2
    assert {j.identity.root_pid for j in jobs} == {a.pid, b.pid}
