"""The CLI side of the Slurm epilogs: ``WATTPRINT_CONFIG`` / ``WATTPRINT_URL`` stand
for ``--config`` / ``--url`` in every command, and ``wattprint slurm-summary`` fails
clearly (no traceback) on a bad job id or an unreachable daemon."""

from __future__ import annotations

import os
import subprocess
import sys

from servers import free_port


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("WATTPRINT_")}
    return subprocess.run([sys.executable, "-m", "wattprint.daemon", *args], capture_output=True, text=True,
                          timeout=60, env={**base, **env})


def test_wattprint_config_names_the_config_file_for_every_command(tmp_path):
    port = free_port()
    cfg = tmp_path / "site.toml"
    cfg.write_text(f'[http]\nlisten = "127.0.0.1:{port}"\n')
    r = cli("check-config", env={"WATTPRINT_CONFIG": str(cfg)})
    assert r.returncode == 0, r.stderr
    assert str(cfg) in r.stdout and f"127.0.0.1:{port}" in r.stdout
    # jobs asks the daemon the file names (nobody listens there: it says where it asked)
    r = cli("jobs", env={"WATTPRINT_CONFIG": str(cfg)})
    assert f"127.0.0.1:{port}" in r.stderr
    # --config still wins
    other = tmp_path / "other.toml"
    other.write_text('[http]\nlisten = "127.0.0.1:1"\n')
    r = cli("check-config", "--config", str(other), env={"WATTPRINT_CONFIG": str(cfg)})
    assert str(other) in r.stdout and f"127.0.0.1:{port}" not in r.stdout


def test_wattprint_url_names_the_daemon(tmp_path):
    port = free_port()
    r = cli("slurm-summary", "--job", "12", "--wait", "0", env={"WATTPRINT_URL": f"http://127.0.0.1:{port}"})
    assert r.returncode == 1
    assert f"http://127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr


def test_slurm_summary_rejects_a_bad_job_id():
    r = cli("slurm-summary", "--job", "12; rm -rf /", env={})
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--job" in r.stderr


def test_hostlist_expansion_without_scontrol():
    """The fallback of ``slurm-summary --fleet`` where scontrol cannot run: Slurm's
    hostlist syntax, as ``scontrol show hostnames`` expands it."""
    import pytest

    from wattprint.daemon.slurm_summary import expand_hostlist

    assert expand_hostlist("wpn[1-3,7],gpu[01-02]x,login") == ["wpn1", "wpn2", "wpn3", "wpn7", "gpu01x", "gpu02x",
                                                              "login"]
    assert expand_hostlist("r[1-2]n[08-09]") == ["r1n08", "r1n09", "r2n08", "r2n09"]
    for bad in ("wpn[1-", "wpn[a-b]", "wpn[1-2]]"):
        with pytest.raises(ValueError):
            expand_hostlist(bad)


def test_fleet_summary_needs_the_job_nodes():
    r = cli("slurm-summary", "--fleet", "--job", "12", "--wait", "0",
            env={"SLURM_JOB_NODELIST": "", "SLURM_HET_JOB_NODELIST": ""})  # as outside any job
    assert r.returncode == 2 and "--nodelist" in r.stderr and "Traceback" not in r.stderr
    r = cli("slurm-summary", "--fleet", "--job", "12", "--nodelist", "wpn[1-", "--wait", "0", env={"PATH": "/nonexistent"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
