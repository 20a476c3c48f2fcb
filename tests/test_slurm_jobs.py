"""Slurm for real: a one-node Slurm (tests/slurm.py) and the real daemon
(tests/daemon_harness.py) with a simulated GPU whose process list the test fills with
the PIDs of the Slurm job's tasks.

- ``#!/bin/sh`` + ``srun python ...`` is exactly one wattprint job (batch step and the
  srun step's task), labelled with the Slurm job id, with the Slurm user, partition and
  steps; its GPU energy is the simulated power x its GPU time;
- a Slurm Prolog and Epilog (root, SLURM_JOB_ID set, alive over several ticks) never
  become jobs;
- an array of 3 tasks is 3 jobs named as Slurm names them (``<array>_<task>``);
- the TaskEpilog of deploy/slurm/ writes "<kWh> kWh, <g> gCO2e (<status>), <h> GPU-h"
  into the job's Comment, matching the API within the printed rounding.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

from daemon_harness import DaemonProcess
from gpusim import gpu, proc, write_sim

REPO = Path(__file__).resolve().parent.parent
POWER_W = 240.0
TASK_S = 5.0  # how long the GPU task runs
TASK = ("import os, sys, time\n"  # no single quotes: it goes into the script in single quotes
        "p = sys.argv[1] + \".\" + os.environ.get(\"SLURM_ARRAY_TASK_ID\", \"x\")\n"
        "open(p + \".tmp\", \"w\").write(str(os.getpid()))\n"
        "os.rename(p + \".tmp\", p)\n"
        f"time.sleep({TASK_S})\n")


# Jobs of user nobody cannot run the test venv's interpreter (under /root here): the
# task needs only the standard library, so it runs the system's python3.
SYSTEM_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def batch_script(pid_file: Path, task_s: float = TASK_S, python: str = SYSTEM_PYTHON) -> str:
    code = TASK.replace(f"time.sleep({TASK_S})", f"time.sleep({task_s})")
    return f"#!/bin/sh\nsrun {python} -c '{code}' {pid_file}\n"


def wait_file(path: Path, cluster, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return int(path.read_text())
        time.sleep(0.05)
    outputs = {p.name: p.read_text(errors="replace")[-2000:] for p in cluster.jobs_dir.glob("*.out")}
    raise AssertionError(f"{path} not written; job output {outputs}\n{cluster.log_tails()}")


def slurm_jobs(daemon: DaemonProcess) -> list[dict]:
    return [j for j in daemon.get("/api/v1/jobs?limit=1000")["jobs"] if j["label_source"] == "SLURM_JOB_ID"]


def wait_finished(daemon: DaemonProcess, label: str, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    jobs: list[dict] = []
    while time.monotonic() < deadline:
        jobs = [j for j in slurm_jobs(daemon) if j["label"] == label]
        if jobs and all(j["state"] == "finished" for j in jobs):
            return jobs
        time.sleep(0.2)
    raise AssertionError(f"job {label} not finished: {jobs}\n{daemon.log_tail()}")


def test_batch_script_with_srun_is_one_job_with_gpu_energy(tmp_path, slurm_factory):
    # A Prolog and an Epilog that live several ticks with the job's SLURM_JOB_ID (as root).
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\nsleep 2.5\n")
    hook.chmod(0o755)
    cluster = slurm_factory(extra_conf=f"Prolog={hook}\nEpilog={hook}\nPrologFlags=Alloc")
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=POWER_W, processes=[])])
    (tmp_path / "d").mkdir()
    daemon = DaemonProcess(tmp_path / "d", sim_file=sim, powercap_root=None)
    daemon.start()
    try:
        pid_file = cluster.jobs_dir / "task.pid"
        job_id = cluster.sbatch(batch_script(pid_file), "--uid=nobody")
        task_pid = wait_file(Path(f"{pid_file}.x"), cluster)
        write_sim(sim, [gpu(0, power_w=POWER_W, processes=[proc(task_pid, sm_util=90)])])
        cluster.wait_state(job_id, ("COMPLETED",), timeout=60)
        jobs = wait_finished(daemon, job_id)
        assert len(jobs) == 1, jobs  # one job: batch script + srun + the step's task (and no prolog/epilog)
        job = jobs[0]
        assert job["user"] == "nobody"
        assert job["slurm"] == {"job_id": job_id, "name": job_id, "array_job_id": "", "array_task_id": "",
                                "partition": cluster.partition, "user": "nobody", "steps": ["batch", "0"]}
        assert job["command"] in ("sh", "slurm_script")  # the leader is the batch script
        # Only this task was on the GPU: its energy = simulated power x the time it held the GPU.
        assert job["gpu_seconds"] >= TASK_S - 2.5
        assert job["energy_j"]["gpu"] == pytest.approx(POWER_W * job["gpu_seconds"], rel=0.02)
        # Nothing else with this label (the root prolog/epilog had SLURM_JOB_ID too).
        everything = daemon.get("/api/v1/jobs?limit=1000")["jobs"]
        assert [j["id"] for j in everything if j["label"] == job_id or j["label_raw"] == job_id] == [job["id"]]
        assert [j for j in everything if j["user"] == "root" and j["label"]] == []
    finally:
        daemon.kill()


def test_array_of_three_is_three_jobs_named_as_slurm_names_them(tmp_path, slurm_factory):
    cluster = slurm_factory()
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=100.0, processes=[])])
    (tmp_path / "d").mkdir()
    daemon = DaemonProcess(tmp_path / "d", sim_file=sim, powercap_root=None)
    daemon.start()
    try:
        pid_file = cluster.jobs_dir / "arr.pid"
        array_id = cluster.sbatch(batch_script(pid_file, task_s=3.0), "--array=0-2", "--uid=nobody")
        records = cluster.wait_state(array_id, ("COMPLETED",), timeout=90)
        names = {f"{r['ArrayJobId']}_{r['ArrayTaskId']}" for r in records}
        assert len(names) == 3
        for name in names:
            wait_finished(daemon, name)
        jobs = slurm_jobs(daemon)
        assert sorted(j["label"] for j in jobs) == sorted(names)
        by_name = {j["label"]: j for j in jobs}
        for r in records:
            sj = by_name[f"{r['ArrayJobId']}_{r['ArrayTaskId']}"]["slurm"]
            assert (sj["job_id"], sj["array_job_id"], sj["array_task_id"]) == (r["JobId"], r["ArrayJobId"],
                                                                                 r["ArrayTaskId"])
            assert sj["steps"] == ["batch", "0"]
    finally:
        daemon.kill()


SUMMARY = re.compile(r"wattprint: (?P<kwh>[0-9.]+) kWh, (?P<g>[0-9.]+) gCO2e \((?P<status>provisional|final)\), "
                     r"(?P<gpuh>[0-9.]+) GPU-h$")


def test_task_epilog_writes_energy_into_the_job_comment(tmp_path, slurm_factory):
    epilog = REPO / "deploy" / "slurm" / "wattprint-taskepilog.sh"
    cluster = slurm_factory(extra_conf=f"TaskEpilog={epilog}")
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=POWER_W, processes=[])])
    (tmp_path / "d").mkdir()
    daemon = DaemonProcess(tmp_path / "d", sim_file=sim, powercap_root=None,
                           extra_toml='[grid]\nprovider = "static"\nstatic_g_per_kwh = 400.0\n')
    daemon.start()
    try:
        pid_file = cluster.jobs_dir / "ep.pid"
        # The TaskEpilog runs with the job's environment: where the daemon and the CLI are.
        env = cluster.env()
        env.update(WATTPRINT_URL=daemon.url, WATTPRINT_BIN=str(Path(sys.executable).parent / "wattprint"),
                   WATTPRINT_SLURM_ENV=str(tmp_path / "none.env"), WATTPRINT_SLURM_WAIT_S="30")
        # As root: the epilog runs the wattprint CLI of the test venv as the job's user.
        job_id = cluster.sbatch(batch_script(pid_file, task_s=3.0), "--export=ALL", env=env)
        task_pid = wait_file(Path(f"{pid_file}.x"), cluster)
        write_sim(sim, [gpu(0, power_w=POWER_W, processes=[proc(task_pid, sm_util=90)])])
        cluster.wait_state(job_id, ("COMPLETED",), timeout=90)
        record = cluster.job_record(job_id)
        m = SUMMARY.match(record.get("Comment", ""))
        assert m, (record.get("Comment"), cluster.log_tails())
        (job,) = wait_finished(daemon, job_id)
        assert float(m["kwh"]) == pytest.approx(job["energy_kwh"], abs=5e-7)
        assert float(m["kwh"]) > 0
        assert float(m["g"]) == pytest.approx(job["co2e_g"], abs=0.005)
        assert float(m["g"]) == pytest.approx(job["energy_kwh"] * 400.0, abs=0.01)  # the static intensity
        assert float(m["gpuh"]) == pytest.approx(job["gpu_seconds"] / 3600, abs=5e-5)
        # The epilog (SLURM_SCRIPT_CONTEXT=epilog_task) was no part of the job: it ended
        # while the epilog waited, and the summary is not marked "(running)".
        assert job["state"] == "finished"
    finally:
        daemon.kill()
