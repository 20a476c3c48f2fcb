"""Slurm identity parsing (daemon/slurm.py) against recorded data: the environments
Slurm 22.05 gives job processes and prolog/epilog scripts, and /proc/<pid>/cgroup
lines of cgroup v2 and v1 nodes (tests/fixtures/slurm/, see PROVENANCE.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wattprint.daemon import slurm
from wattprint.daemon.procs import ProcessTracker

FIXTURES = Path(__file__).parent / "fixtures" / "slurm"
ENVIRON = json.loads((FIXTURES / "environ-22.05.json").read_text())


def recorded(name: str) -> slurm.SlurmProcess | None:
    case = ENVIRON[name]
    return slurm.from_environ(case["env"], case["parent_comm"])


def test_batch_script_and_step_task_are_the_same_array_job():
    batch, task = recorded("batch"), recorded("step_task")
    assert batch is not None and task is not None
    assert batch.job == task.job  # one job, whatever the step
    assert batch.job.name == "1_0"  # as Slurm names array task 0 of array job 1 (JobId 2)
    assert (batch.job.job_id, batch.job.array_job_id, batch.job.array_task_id) == ("2", "1", "0")
    assert (batch.job.partition, batch.job.user) == ("gpu", "nobody")
    assert (batch.step, task.step) == ("batch", "0")
    # slurmstepd leaves SLURM_SCRIPT_CONTEXT=prolog_task in the tasks' environment when a
    # TaskProlog is configured: that does not make them scripts.
    assert batch.script == "" and task.script == ""


@pytest.mark.parametrize("name", ["task_epilog", "prolog", "epilog", "epilog_slurmctld"])
def test_prolog_and_epilog_processes_are_scripts(name):
    found = recorded(name)
    assert found is not None and found.script != ""


def test_a_child_of_slurmd_is_a_script_even_without_a_context():
    env = {k: v for k, v in ENVIRON["prolog"]["env"].items() if k != "SLURM_SCRIPT_CONTEXT"}
    assert slurm.from_environ(env, "slurmd").script == "slurmd_child"
    assert slurm.from_environ(env, "slurmstepd").script == ""


@pytest.mark.parametrize("job_id", ["", "abc", "12;rm", "-1", "1" * 13])
def test_invalid_job_ids_are_no_slurm_identity(job_id):
    assert slurm.from_environ({"SLURM_JOB_ID": job_id}) is None


def test_untrusted_values_are_cleaned_and_cut():
    found = slurm.from_environ({"SLURM_JOB_ID": "7", "SLURM_JOB_PARTITION": "gpu\x1b[2J" + "x" * 100,
                                "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "x"})
    assert found is not None
    assert found.job.partition.startswith("gpu_") and len(found.job.partition) == slurm.MAX_FIELD
    assert found.job.name == "7" and found.job.array_job_id == ""  # a bad task id is no array


@pytest.mark.parametrize("fixture, want", [
    ("cgroup-v2-task.txt", ("1392969", "0", "0", 2, "/system.slice/slurmstepd.scope/job_1392969")),
    ("cgroup-v2-extern.txt", ("42", "extern", "", 2, "/system.slice/slurmstepd.scope/job_42")),
    ("cgroup-v2-multi-slurmd.txt", ("77", "batch", "special", 2, "/system.slice/node07_slurmstepd.scope/job_77")),
    # v1: the freezer line (every process of the job is in that hierarchy), not the first.
    ("cgroup-v1-task.txt", ("280678", "interactive", "", 1, "/slurm/uid_2101171/job_280678")),
])
def test_cgroup_lines_of_v2_and_v1(fixture, want):
    found = slurm.parse_proc_cgroup((FIXTURES / fixture).read_text())
    assert found is not None
    assert (found.job_id, found.step, found.task, found.version, found.job_path) == want
    if found.version == 1:
        assert found.uid == 2101171
        assert found.hierarchy == "freezer" and found.path == "/slurm/uid_2101171/job_280678/step_interactive"


@pytest.mark.parametrize("fixture", ["cgroup-v2-stepd.txt", "cgroup-linuxproc-hybrid.txt"])
def test_cgroups_without_a_job(fixture):
    assert slurm.parse_proc_cgroup((FIXTURES / fixture).read_text()) is None


def test_tracker_joins_separate_process_trees_of_one_slurm_job_and_skips_scripts(labelled_process):
    """Two unrelated processes (as a batch script and a step task under different
    slurmstepds) with one SLURM_JOB_ID are one job; a process with an epilog context
    is in no job (the old code made each tree a job of its own, epilog included)."""
    batch = labelled_process(env=ENVIRON["batch"]["env"])
    task = labelled_process(env=ENVIRON["step_task"]["env"])
    script = labelled_process(env=ENVIRON["task_epilog"]["env"])
    try:
        tracker = ProcessTracker()
        view = tracker.observe(0.0, [])
        view = tracker.observe(1.0, [])
        ours = [u for u in view.jobs if u.pids & {batch.pid, task.pid, script.pid}]
        assert len(ours) == 1
        (usage,) = ours
        assert usage.pids == {batch.pid, task.pid}
        assert usage.identity.label == "1_0" and usage.identity.slurm is not None
        assert usage.identity.slurm.partition == "gpu"
        assert usage.steps == {"batch", "0"}
        assert usage.identity.root_pid == batch.pid  # the earliest-started member leads
        assert script.pid not in view.pid_to_job
    finally:
        for p in (batch, task, script):
            labelled_process.end(p)


HET = json.loads((FIXTURES / "environ-22.05-het.json").read_text())


def test_het_job_processes_of_both_components_are_one_job_named_by_the_het_job_id():
    """Recorded on a two-node Slurm 22.05 (environ-22.05-het.json): the batch script,
    step 0's tasks in components 0 and 1 and step 1's task in component 1 are the one
    het job "1" (components JobId 1 and 2, shown by Slurm as 1+0 and 1+1)."""
    found = {n: slurm.from_environ(HET[n]["env"], HET[n]["parent_comm"])
             for n in ("batch", "step0_task_group0", "step0_task_group1", "step1_task_group1")}
    assert {p.job for p in found.values()} == {found["batch"].job}
    assert (found["batch"].job.job_id, found["batch"].job.name) == ("1", "1")
    assert [p.step for p in found.values()] == ["batch", "0", "0", "1"]
    assert all(p.script == "" for p in found.values())


@pytest.mark.parametrize("name", ["prolog_component1", "epilog_component1", "epilog_slurmctld_component0",
                                  "epilog_slurmctld_component1"])
def test_het_job_scripts_are_scripts(name):
    found = slurm.from_environ(HET[name]["env"], HET[name]["parent_comm"])
    assert found is not None and found.script != ""


def test_a_component_job_id_with_a_het_job_id_is_filed_under_the_het_job():
    """A process of component 1 carrying its own JobId (2) and SLURM_HET_JOB_ID (1), as
    Slurm gives component prologs/epilogs, is the het job, not a job "2" of its own."""
    env = {k: v for k, v in HET["prolog_component1"]["env"].items() if k != "SLURM_SCRIPT_CONTEXT"}
    found = slurm.from_environ(env, "slurmstepd")
    assert found is not None and found.script == ""
    assert (found.job.job_id, found.job.name) == ("1", "1")
    # The old reading (SLURM_JOB_ID alone) would have made it "2".
    assert env["SLURM_JOB_ID"] == "2"
