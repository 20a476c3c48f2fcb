"""Slurm with accounting (MariaDB + slurmdbd, tests/slurm.py): the EpilogSlurmctld of
deploy/slurm/ writes the job's energy into its AdminComment, shown by ``sacct``,
matching the daemon's API within the printed rounding."""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from daemon_harness import DaemonProcess
from gpusim import gpu, proc, write_sim
from slurm import sacct
from test_slurm_jobs import POWER_W, SUMMARY, batch_script, wait_file, wait_finished

REPO = Path(__file__).resolve().parent.parent


def test_slurmctld_epilog_writes_energy_into_admin_comment(tmp_path, slurm_factory):
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=POWER_W, processes=[])])
    (tmp_path / "d").mkdir()
    daemon = DaemonProcess(tmp_path / "d", sim_file=sim, powercap_root=None,
                           extra_toml='[grid]\nprovider = "static"\nstatic_g_per_kwh = 300.0\n')
    daemon.start()
    try:
        # slurmctld passes only SLURM_* variables to EpilogSlurmctld (not even PATH): the
        # site's settings go into wattprint-slurm.env next to the script.
        hooks = tmp_path / "hooks"
        hooks.mkdir()
        epilog = hooks / "wattprint-epilog-slurmctld.sh"
        shutil.copy(REPO / "deploy" / "slurm" / epilog.name, epilog)
        cluster = slurm_factory(extra_conf=f"EpilogSlurmctld={epilog}", accounting=True)
        (hooks / "wattprint-slurm.env").write_text(
            f"WATTPRINT_URL={daemon.url}\nWATTPRINT_BIN={Path(sys.executable).parent / 'wattprint'}\n"
            f"SLURM_CONF={cluster.conf}\nWATTPRINT_SLURM_WAIT_S=30\n")
        pid_file = cluster.jobs_dir / "acct.pid"
        job_id = cluster.sbatch(batch_script(pid_file, task_s=3.0), "--uid=nobody")
        task_pid = wait_file(Path(f"{pid_file}.x"), cluster)
        write_sim(sim, [gpu(0, power_w=POWER_W, processes=[proc(task_pid, sm_util=90)])])
        cluster.wait_state(job_id, ("COMPLETED",), timeout=90)
        deadline = time.monotonic() + 60
        rows: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            rows = sacct(cluster, job_id, "JobID,State,AdminComment")
            if rows and rows[0]["AdminComment"]:
                break
            time.sleep(0.5)
        assert rows and rows[0]["AdminComment"], (rows, cluster.log_tails())
        # sacctmgr stores the value lower-cased ("kwh", "gco2e", "gpu-h").
        m = re.compile(SUMMARY.pattern, re.IGNORECASE).match(rows[0]["AdminComment"])
        assert m, rows
        (job,) = wait_finished(daemon, job_id)
        assert job["slurm"]["user"] == "nobody"
        assert float(m["kwh"]) > 0
        assert float(m["kwh"]) == pytest.approx(job["energy_kwh"], abs=5e-7)
        assert float(m["g"]) == pytest.approx(job["co2e_g"], abs=0.005)
        assert float(m["g"]) == pytest.approx(job["energy_kwh"] * 300.0, abs=0.01)
        assert float(m["gpuh"]) == pytest.approx(job["gpu_seconds"] / 3600, abs=5e-5)
        assert job["energy_j"]["gpu"] == pytest.approx(POWER_W * job["gpu_seconds"], rel=0.02)
    finally:
        daemon.kill()
