"""Slurm jobs found by their cgroup on a cgroup v1 (or hybrid) node, where the v2 line
of /proc/<pid>/cgroup names slurmd's unit and the job is in the v1 hierarchies
(``<n>:freezer:/slurm/uid_U/job_N/step_S``).

No v1 hierarchy can be mounted here, so the test builds one: a fake ``/proc`` whose
per-process entries are links to the real processes' files except ``cgroup``, which
holds the recorded v1 lines of tests/fixtures/slurm/cgroup-v1-task.txt (and the
hybrid node's lines of cgroup-linuxproc-hybrid.txt for a process outside any job),
and a fake freezer hierarchy whose ``cgroup.procs`` files list the real PIDs.

- a GPU process in a v1 Slurm job cgroup makes the Slurm job a wattprint job labelled
  with the job id, and the job's other processes (another step) join it;
- a process moved into the job's v1 cgroup later (as pam_slurm_adopt does) is found by
  walking the job's directory in the v1 hierarchy on an ordinary tick (no full rescan).
"""

from __future__ import annotations

import time
from pathlib import Path

from wattprint.daemon.procs import ProcessTracker

FIXTURES = Path(__file__).parent / "fixtures" / "slurm"
V1_LINES = (FIXTURES / "cgroup-v1-task.txt").read_text()  # job 280678, step_interactive, uid 2101171
NO_JOB_LINES = (FIXTURES / "cgroup-linuxproc-hybrid.txt").read_text()
JOB_DIR = "slurm/uid_2101171/job_280678"


def v1_lines(step: str) -> str:
    return V1_LINES.replace("step_interactive", f"step_{step}")


def fake_proc(root: Path, pids: dict[int, str]) -> None:
    """``root`` as a /proc holding ``pids`` (pid -> the text of its cgroup file)."""
    root.mkdir(exist_ok=True)
    for name in ("stat", "uptime", "loadavg", "meminfo"):
        (root / name).symlink_to(f"/proc/{name}")
    for pid, cgroup in pids.items():
        d = root / str(pid)
        d.mkdir()
        for name in ("stat", "environ", "status", "cmdline"):
            (d / name).symlink_to(f"/proc/{pid}/{name}")
        (d / "cgroup").write_text(cgroup)


def procs_file(freezer: Path, step: str, pids: list[int]) -> None:
    d = freezer / JOB_DIR / f"step_{step}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))


def test_v1_slurm_job_membership_is_walked_in_the_v1_hierarchy(tmp_path, labelled_process):
    # Unlabelled sleepers (no WATTPRINT_* or SLURM_* variable): only the cgroup files name the job.
    gpu_task, batch, adopted = labelled_process(), labelled_process(), labelled_process()
    try:
        proc = tmp_path / "proc"
        fake_proc(proc, {gpu_task.pid: V1_LINES, batch.pid: v1_lines("batch"), adopted.pid: NO_JOB_LINES})
        freezer = tmp_path / "cgroup" / "freezer"
        procs_file(freezer, "interactive", [gpu_task.pid])
        procs_file(freezer, "batch", [batch.pid])
        tracker = ProcessTracker(proc_root=str(proc), cgroup_kinds=("slurm",), cgroup_root=str(tmp_path / "unified"),
                                 cgroup_v1_mounts={"freezer": str(freezer)}, rescan_interval_s=1e9)
        # Older than a second: the tracker reads young processes again on their next
        # tick (fork before exec), which would find the move without the walk.
        time.sleep(1.2)
        view = tracker.observe(0.0, [gpu_task.pid])
        assert view.scanned
        (job,) = view.jobs
        assert job.identity.label == "280678" and job.identity.label_source == "cgroup:slurm"
        assert job.pids == {gpu_task.pid, batch.pid}  # the other step joined; the process outside did not
        assert adopted.pid not in view.pid_to_job

        # Moved into the job's extern step (v1 lines and the hierarchy's cgroup.procs).
        (proc / str(adopted.pid) / "cgroup").write_text(v1_lines("extern"))
        procs_file(freezer, "extern", [adopted.pid])
        view = tracker.observe(1.0, [gpu_task.pid])
        assert not view.scanned  # found by the walk, not by a full rescan
        (job2,) = view.jobs
        assert job2.identity.job_id == job.identity.job_id
        assert job2.pids == {gpu_task.pid, batch.pid, adopted.pid}
    finally:
        for p in (gpu_task, batch, adopted):
            labelled_process.end(p)


def test_v1_hierarchy_not_mounted_is_no_walk_and_no_error(tmp_path, labelled_process):
    """A v1 job whose hierarchy is not mounted here: the job is still found from the
    processes' own lines on a full scan; the walk finds nothing and raises nothing."""
    task = labelled_process()
    try:
        proc = tmp_path / "proc"
        fake_proc(proc, {task.pid: V1_LINES})
        tracker = ProcessTracker(proc_root=str(proc), cgroup_kinds=("slurm",), cgroup_root=str(tmp_path / "unified"),
                                 cgroup_v1_mounts={}, rescan_interval_s=1e9)
        (job,) = tracker.observe(0.0, [task.pid]).jobs
        assert job.identity.label == "280678" and job.pids == {task.pid}
        (job,) = tracker.observe(1.0, [task.pid]).jobs
        assert job.pids == {task.pid}
    finally:
        labelled_process.end(task)
