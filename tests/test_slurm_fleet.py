"""Multi-node Slurm jobs in InfluxDB: a real two-node Slurm (tests/slurm.py, nodes
wpn1 and wpn2, a slurmd each on this host) runs one job on both (``srun -N2 -n2``);
two daemons named after the nodes each measure one rank on a GPU of their own and
write to one real InfluxDB.

- ``wattprint jobs --fleet`` gives one row for the Slurm job with both hosts, equal to
  the sum of what the two daemons booked;
- ``wattprint slurm-summary --fleet`` (the whole-job figure of the EpilogSlurmctld)
  finds the job's hosts from Slurm's node list (``scontrol show hostnames``), waits
  until both have written past the job's end, and prints the sum of the two hosts
  within the printed rounding; a node whose daemon never wrote is named as missing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from daemon_harness import DaemonProcess
from gpusim import gpu, proc, write_sim
from test_slurm_jobs import SYSTEM_PYTHON, wait_file, wait_finished

FLEET_SUMMARY = re.compile(r"(?P<kwh>[0-9.]+) kWh, (?P<g>[0-9.]+) gCO2e \((?P<status>provisional|final)\), "
                           r"(?P<hosts>[0-9]+) hosts(?P<rest>.*)$")

DB = "wattprint"
REPO = Path(__file__).resolve().parent.parent
RANK = ("import os, sys, time\n"
        "p = sys.argv[1] + \".\" + os.environ[\"SLURM_PROCID\"]\n"
        "open(p + \".tmp\", \"w\").write(str(os.getpid()))\n"
        "os.rename(p + \".tmp\", p)\n"
        "time.sleep(4)\n")


def influx_toml(url: str) -> str:
    return (f'[influxdb]\nenabled = true\nurl = "{url}"\ndatabase = "{DB}"\nflush_interval_s = 0.2\n'
            'timeout_s = 2.0\n[grid]\nprovider = "static"\nstatic_g_per_kwh = 500.0\n')


def fleet(cfg: Path, label: str) -> list[dict]:
    r = subprocess.run([sys.executable, "-m", "wattprint.daemon", "jobs", "--fleet", "--config", str(cfg), "--json",
                        "--label", label], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["labels"]


def slurm_panel_rows(url: str, since: float, until: float) -> list[dict]:
    """The rows of the jobs dashboard's "Slurm jobs across hosts" panel, its queries run
    as Grafana would with every variable at "All", merged by (label, user)."""
    dash = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "wattprint-jobs.json").read_text())
    (panel,) = [p for p in dash["panels"] if p.get("title") == "Slurm jobs across hosts (one row per job)"]
    rows: dict[tuple[str, str], dict] = {}
    for target in panel["targets"]:
        q = (target["query"].replace("$timeFilter", f"time >= {int(since * 1000)}ms and time <= {int(until * 1000)}ms")
             .replace("$host", ".*").replace("$label", ".*").replace("$user", ".*"))
        body = urllib.request.urlopen(f"{url}/query?" + urllib.parse.urlencode({"q": q, "db": DB}), timeout=10).read()
        answer = json.loads(body)
        assert "error" not in answer and all("error" not in r for r in answer["results"]), (q, answer)
        for series in answer["results"][0].get("series", []):
            tags = series["tags"]
            for values in series["values"]:
                row = rows.setdefault((tags["label"], tags["user"]), {"label": tags["label"], "user": tags["user"]})
                row.update({c: v for c, v in zip(series["columns"], values) if c != "time"})
    return list(rows.values())


def summary(cfg: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wattprint.daemon", "slurm-summary", "--fleet", "--config", str(cfg),
                           *args],
                          capture_output=True, text=True, timeout=120, env=env)


def test_two_hosts_one_slurm_job_is_one_fleet_row_summed_once(tmp_path, slurm_factory, influxdb_server):
    influxdb_server.create_database(DB)
    started = time.time()
    cluster = slurm_factory(nodes=2)
    assert cluster.nodes == ["wpn1", "wpn2"]
    daemons: list[DaemonProcess] = []
    sims: list[Path] = []
    try:
        for host, power in (("wpn1", 200.0), ("wpn2", 300.0)):
            work = tmp_path / host
            work.mkdir()
            sim = work / "sim.json"
            write_sim(sim, [gpu(0, power_w=power, processes=[])])
            d = DaemonProcess(work, sim_file=sim, powercap_root=None, extra_toml=influx_toml(influxdb_server.url),
                              env={"WATTPRINT_DAEMON_HOST": host})
            d.start()
            daemons.append(d)
            sims.append(sim)
        pid_file = cluster.jobs_dir / "rank.pid"
        job_id = cluster.sbatch(f"#!/bin/sh\nsrun -N2 -n2 {SYSTEM_PYTHON} -c '{RANK}' {pid_file}\n", "--nodes=2",
                                "--ntasks=2", "--uid=nobody")
        ranks = [wait_file(Path(f"{pid_file}.{i}"), cluster) for i in (0, 1)]
        # Rank 0 runs on node wpn1 (its GPU: daemon wpn1's), rank 1 on wpn2.
        for sim, pid, power in zip(sims, ranks, (200.0, 300.0)):
            write_sim(sim, [gpu(0, power_w=power, processes=[proc(pid, sm_util=80)])])
        (record,) = cluster.wait_state(job_id, ("COMPLETED",), timeout=90)
        ended_at = time.time()
        assert record["NodeList"] == "wpn[1-2]"  # a real two-node job
        per_host = []
        for d, power in zip(daemons, (200.0, 300.0)):
            (job,) = wait_finished(d, job_id)  # each host: one job for both ranks
            assert job["slurm"]["steps"] == ["batch", "0"]
            assert job["energy_j"]["gpu"] == pytest.approx(power * job["gpu_seconds"], rel=0.02)
            assert job["gpu_seconds"] > 1
            per_host.append(job)
        time.sleep(1.5)  # two flushes (0.2 s) after the last tick that booked the jobs
        cfg = tmp_path / "fleet.toml"
        cfg.write_text(influx_toml(influxdb_server.url))
        want_kwh = sum(j["energy_kwh"] for j in per_host)
        deadline = time.monotonic() + 20
        rows = fleet(cfg, job_id)
        while time.monotonic() < deadline and not (rows and rows[0]["energy_kwh"] == pytest.approx(want_kwh, rel=1e-3)):
            time.sleep(0.5)
            rows = fleet(cfg, job_id)
        assert len(rows) == 1, rows
        row = rows[0]
        assert row["label"] == job_id and row["hosts"] == ["wpn1", "wpn2"]
        assert row["energy_kwh"] == pytest.approx(want_kwh, rel=1e-3)
        assert row["co2e_g"] == pytest.approx(sum(j["co2e_g"] for j in per_host), rel=1e-3)
        assert row["co2e_g"] == pytest.approx(want_kwh * 500.0, rel=1e-3)

        # The Grafana panel "Slurm jobs across hosts": one row for the job, 2 hosts, the sum.
        rows = slurm_panel_rows(influxdb_server.url, started - 3600, time.time() + 3600)
        assert [(r["label"], r["user"], r["hosts"]) for r in rows] == [(job_id, "nobody", 2)], rows
        assert rows[0]["kWh"] == pytest.approx(want_kwh, rel=1e-3)
        assert rows[0]["CO2e"] == pytest.approx(sum(j["co2e_g"] for j in per_host), rel=1e-3)

        # The whole-job figure, as EpilogSlurmctld gets it: the nodes from Slurm's list.
        env = cluster.env()
        env.update(SLURM_JOB_NODELIST=record["NodeList"])
        r = summary(cfg, "--job", job_id, "--user", "nobody", "--ended-at", str(ended_at), "--wait", "30", env=env)
        assert r.returncode == 0, r.stderr
        m = FLEET_SUMMARY.match(r.stdout.strip())
        assert m and m["rest"] == "" and m["hosts"] == "2", r.stdout
        assert float(m["kwh"]) == pytest.approx(want_kwh, abs=5e-7 + 1e-9)
        assert float(m["g"]) == pytest.approx(sum(j["co2e_g"] for j in per_host), abs=0.005 + 1e-6)
        assert float(m["g"]) == pytest.approx(want_kwh * 500.0, abs=0.01)
        # More than one host's share: the figure is the sum, not either host's.
        assert float(m["kwh"]) > max(j["energy_kwh"] for j in per_host) + 1e-6
        # A node of the list whose daemon never wrote: named, after --wait.
        r = summary(cfg, "--job", job_id, "--nodelist", "wpn[1-3]", "--ended-at", str(ended_at), "--wait", "1")
        assert r.returncode == 0, r.stderr
        m = FLEET_SUMMARY.match(r.stdout.strip())
        assert m and m["hosts"] == "3" and m["rest"] == " (incomplete: no data after the job's end from wpn3)", r.stdout
        assert float(m["kwh"]) == pytest.approx(want_kwh, abs=5e-7 + 1e-9)
        # Another user's label is not this job's.
        r = summary(cfg, "--job", job_id, "--user", "root", "--nodelist", "wpn[1-2]", "--ended-at", str(ended_at),
                    "--wait", "0")
        assert r.returncode == 1 and "no energy" in r.stderr and "Traceback" not in r.stderr
    finally:
        for d in daemons:
            d.kill()
