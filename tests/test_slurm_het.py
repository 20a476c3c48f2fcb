"""Heterogeneous Slurm jobs for real: a two-node Slurm (tests/slurm.py, nodes wpn1 and
wpn2, ``sched/backfill``: Slurm schedules het jobs only with it, and never puts two
components on one node) with accounting, two daemons named after the nodes writing to
one real InfluxDB, and the EpilogSlurmctld of deploy/slurm/ in its whole-job
(``WATTPRINT_SLURM_FLEET=1``) variant.

The het job has two components (``#SBATCH hetjob``), JobIds N and N+1, which Slurm
shows as ``N+0`` and ``N+1``; the script runs two ``srun`` steps: step 0 over both
components (``--het-group=0,1``: a task on each node) and step 1 on component 1 only.

- Each daemon has exactly one wattprint job for the het job, named N (the HetJobId,
  as Slurm names the het job as a whole), holding the batch step and both srun steps,
  whose GPU energy is the simulated power x its GPU time;
- ``wattprint jobs --fleet`` gives one row N with both hosts;
- the epilog of component 0 writes the whole het job's figure (the sum of the two
  daemons' jobs, from InfluxDB) into N's AdminComment, shown by ``sacct`` for both
  components (sacctmgr sets the het job's components together); the epilog of
  component 1 (SLURM_JOB_ID N+1, SLURM_HET_JOB_ID N) returns at once.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon_harness import DaemonProcess
from gpusim import gpu, proc, write_sim
from slurm import sacct
from test_slurm_fleet import DB, FLEET_SUMMARY, influx_toml
from test_slurm_jobs import SYSTEM_PYTHON, slurm_jobs, wait_file, wait_finished

REPO = Path(__file__).resolve().parent.parent
POWER_W = {"wpn1": 150.0, "wpn2": 350.0}
TASK = ("import os, sys, time\n"  # no single quotes: it goes into the script in single quotes
        "p = sys.argv[1] + \".\" + os.environ[\"SLURM_STEP_ID\"] + \".\" + os.environ[\"SLURM_PROCID\"]\n"
        "open(p + \".tmp\", \"w\").write(str(os.getpid()))\n"
        "os.rename(p + \".tmp\", p)\n"
        "time.sleep(3)\n")


def het_script(pid_file: Path) -> str:
    task = f"{SYSTEM_PYTHON} -c '{TASK}' {pid_file}"
    return ("#!/bin/sh\n#SBATCH -n1 --mem=100 -t 5\n#SBATCH hetjob\n#SBATCH -n1 --mem=100 -t 5\n"
            f"srun --het-group=0,1 {task}\nsrun --het-group=1 {task}\n")


def test_het_job_is_one_job_per_node_and_the_epilog_reports_the_whole_job(tmp_path, slurm_factory, influxdb_server):
    influxdb_server.create_database(DB)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    epilog = hooks / "wattprint-epilog-slurmctld.sh"
    shutil.copy(REPO / "deploy" / "slurm" / epilog.name, epilog)
    cluster = slurm_factory(extra_conf=f"EpilogSlurmctld={epilog}\nSchedulerParameters=bf_interval=1",
                            accounting=True, nodes=2, scheduler="sched/backfill")
    cfg = tmp_path / "fleet.toml"
    cfg.write_text(influx_toml(influxdb_server.url))
    (hooks / "wattprint-slurm.env").write_text(
        f"WATTPRINT_CONFIG={cfg}\nWATTPRINT_BIN={Path(sys.executable).parent / 'wattprint'}\n"
        f"SLURM_CONF={cluster.conf}\nWATTPRINT_SLURM_WAIT_S=30\nWATTPRINT_SLURM_FLEET=1\n")
    daemons: dict[str, DaemonProcess] = {}
    sims: dict[str, Path] = {}
    try:
        for host in cluster.nodes:
            work = tmp_path / host
            work.mkdir()
            sims[host] = work / "sim.json"
            write_sim(sims[host], [gpu(0, power_w=POWER_W[host], processes=[])])
            daemons[host] = DaemonProcess(work, sim_file=sims[host], powercap_root=None,
                                          extra_toml=influx_toml(influxdb_server.url), env={"WATTPRINT_DAEMON_HOST": host})
            daemons[host].start()
        pid_file = cluster.jobs_dir / "het.pid"
        het_id = cluster.sbatch(het_script(pid_file), "--uid=nobody")
        # Step 0: task 0 in component 0 (wpn1), task 1 in component 1 (wpn2).
        step0 = [wait_file(Path(f"{pid_file}.0.{rank}"), cluster) for rank in (0, 1)]
        write_sim(sims["wpn1"], [gpu(0, power_w=POWER_W["wpn1"], processes=[proc(step0[0], sm_util=80)])])
        write_sim(sims["wpn2"], [gpu(0, power_w=POWER_W["wpn2"], processes=[proc(step0[1], sm_util=80)])])
        # Step 1: component 1 only, on wpn2.
        step1 = wait_file(Path(f"{pid_file}.1.0"), cluster)
        write_sim(sims["wpn2"], [gpu(0, power_w=POWER_W["wpn2"], processes=[proc(step1, sm_util=80)])])
        records = cluster.wait_state(het_id, ("COMPLETED",), timeout=90)
        # Slurm's own view: two components, JobIds N and N+1, both of het job N, one per node.
        assert sorted((r["JobId"], r["HetJobId"], r["HetJobOffset"], r["NodeList"]) for r in records) == [
            (het_id, het_id, "0", "wpn1"), (str(int(het_id) + 1), het_id, "1", "wpn2")]

        per_host = {}
        for host, d in daemons.items():
            (job,) = wait_finished(d, het_id)
            # One wattprint job for the whole het job on each node, named as Slurm names it.
            assert [j["label"] for j in slurm_jobs(d)] == [het_id]
            assert job["slurm"]["job_id"] == het_id and job["slurm"]["name"] == het_id
            assert job["slurm"]["user"] == "nobody" and job["user"] == "nobody"
            # Both daemons see every process here (one machine): batch step, step 0, step 1.
            assert job["slurm"]["steps"] == ["batch", "0", "1"]
            assert job["gpu_seconds"] > 1
            assert job["energy_j"]["gpu"] == pytest.approx(POWER_W[host] * job["gpu_seconds"], rel=0.02)
            per_host[host] = job
        # wpn2's GPU ran a task of each step: it held the GPU about twice as long.
        assert per_host["wpn2"]["gpu_seconds"] > per_host["wpn1"]["gpu_seconds"] + 1
        want_kwh = sum(j["energy_kwh"] for j in per_host.values())
        want_g = sum(j["co2e_g"] for j in per_host.values())

        # One fleet row for the het job, with both hosts.
        deadline = time.monotonic() + 30
        while True:
            r = subprocess.run([sys.executable, "-m", "wattprint.daemon", "jobs", "--fleet", "--config", str(cfg),
                                "--json", "--label", het_id], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            rows = json.loads(r.stdout)["labels"]
            if (rows and rows[0]["energy_kwh"] == pytest.approx(want_kwh, rel=1e-3)) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert [(row["label"], row["hosts"]) for row in rows] == [(het_id, ["wpn1", "wpn2"])]
        assert rows[0]["energy_kwh"] == pytest.approx(want_kwh, rel=1e-3)

        # The EpilogSlurmctld of component 0 wrote the whole het job's figure.
        deadline = time.monotonic() + 90
        acct: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            acct = sacct(cluster, het_id, "JobID,State,AdminComment")
            if any(a["AdminComment"] for a in acct):
                break
            time.sleep(0.5)
        by_id = {a["JobID"]: a for a in acct}
        assert set(by_id) == {f"{het_id}+0", f"{het_id}+1"}, (acct, cluster.log_tails())
        comment = by_id[f"{het_id}+0"]["AdminComment"]
        # sacctmgr stores the value lower-cased.
        m = re.compile("wattprint: " + FLEET_SUMMARY.pattern, re.IGNORECASE).match(comment)
        assert m and m["rest"] == "" and m["hosts"] == "2", (acct, cluster.log_tails())
        assert float(m["kwh"]) == pytest.approx(want_kwh, abs=5e-7 + 1e-9)
        assert float(m["kwh"]) > max(j["energy_kwh"] for j in per_host.values()) + 1e-6  # both hosts
        assert float(m["g"]) == pytest.approx(want_g, abs=0.005 + 1e-6)
        assert float(m["g"]) == pytest.approx(want_kwh * 500.0, abs=0.01)
        # Measured: ``sacctmgr modify job where jobid=N`` (N the HetJobId) sets every
        # component's record, so N+1 shows the same whole-job figure (written once: the
        # epilog of component 1, SLURM_HET_JOB_OFFSET=1, returns at once).
        assert by_id[f"{het_id}+1"]["AdminComment"] == comment
    finally:
        for d in daemons.values():
            d.kill()
