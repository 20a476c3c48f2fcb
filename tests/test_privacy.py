"""No command line and no environment from /proc leaves the daemon.

Real processes carry canary secrets: a labelled job (``WATTPRINT_JOB=canary-job``) with
a random ``API_KEY`` in its environment and a random ``--token=`` in its argv, and an
unlabelled GPU process (a process-group job) with another random secret in its argv
and environment. The real daemon runs with InfluxDB enabled (the real influxd) and
debug logging. Each secret must then appear nowhere:

- the HTTP API: every endpoint, every job by id and its series;
- /metrics;
- InfluxDB: every measurement's points, every series, tag key, tag value and field key;
- the daemon's log (debug level);
- the state directory's bytes: the SQLite store (with its WAL) and the InfluxDB spool;
- the CLI: ``wattprint jobs --json`` and ``wattprint report``.

Each place is also checked to hold the job's label, so the absence means something.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from daemon_harness import DaemonProcess
from gpusim import gpu, proc, write_sim
from own_jobs import ENV as OWN_JOBS_ENV, wait_for_pid_job

pytestmark = pytest.mark.slow

DB = "wattprint_privacy"
LABEL = "canary-job"


def _http(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.read()
    except urllib.error.HTTPError as exc:
        return exc.read()


def test_canary_secrets_appear_nowhere(tmp_path: Path, influxdb_server, labelled_process) -> None:
    arg_secret, env_secret = secrets.token_hex(16), secrets.token_hex(16)
    pg_arg_secret, pg_env_secret = secrets.token_hex(16), secrets.token_hex(16)
    canaries = [arg_secret, env_secret, pg_arg_secret, pg_env_secret]
    sleeper = "import time; time.sleep(600)"
    labelled = labelled_process(LABEL, code=sleeper, args=[f"--token={arg_secret}", "--password", arg_secret],
                                env={"API_KEY": env_secret, "WATTPRINT_SECRET": env_secret})
    unlabelled = labelled_process(code=sleeper, args=[f"--api-key={pg_arg_secret}"],
                                  env={"AWS_SECRET_ACCESS_KEY": pg_env_secret})
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, processes=[proc(labelled.pid, sm_util=60), proc(unlabelled.pid, sm_util=40)])])
    influx_toml = (f'[influxdb]\nenabled = true\nurl = "{influxdb_server.url}"\ndatabase = "{DB}"\n'
                   "flush_interval_s = 0.2\n")
    daemon = DaemonProcess(tmp_path, sim_file=sim, powercap_root=None, extra_toml=influx_toml,
                           daemon_toml='log_level = "debug"',
                           env={"WATTPRINT_HTTP_RATE_LIMIT_PER_S": "0", **OWN_JOBS_ENV})
    outputs: dict[str, bytes] = {}
    try:
        daemon.start()
        job = wait_for_pid_job(daemon.get, labelled.pid, log_tail=daemon.log_tail)
        pg_job = wait_for_pid_job(daemon.get, unlabelled.pid, log_tail=daemon.log_tail)
        assert job["label"] == LABEL and job["label_source"] == "WATTPRINT_JOB"
        assert pg_job["label_source"] == "pgid"
        for j in (job, pg_job):  # the executable name, nothing of the command line
            assert j["command"] and " " not in j["command"] and "-" not in j["command"], j["command"]
        # InfluxDB has the job's points (so it was written to at all)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rows = influxdb_server.series_values('SELECT "joules" FROM "job_energy" WHERE "label" = $l',
                                                 db=DB, params={"l": LABEL})
            if rows:
                break
            time.sleep(0.3)
        else:
            raise AssertionError("no job_energy points for the canary job in InfluxDB")

        # ---- the HTTP API, every endpoint, and /metrics
        base = daemon.url
        jobs = json.loads(_http(base + "/api/v1/jobs?limit=10000"))["jobs"]
        paths = ["/healthz", "/metrics", "/api/v1/jobs?limit=10000", "/api/v1/jobs?state=running",
                 "/api/v1/jobs?" + urllib.parse.urlencode({"label": LABEL}), "/api/v1/host", "/api/v1/intensity",
                 "/api/v1/openapi.json"]
        for j in jobs:
            quoted = urllib.parse.quote(j["id"], safe="")
            paths += [f"/api/v1/jobs/{quoted}", f"/api/v1/jobs/{quoted}/series"]
        outputs["api"] = b"\n".join(_http(base + p) for p in paths)
        outputs["metrics"] = _http(base + "/metrics")

        # ---- the CLI
        cli = [sys.executable, "-m", "wattprint.daemon"]
        cfg = ["--config", str(daemon.config_path)]
        outputs["cli"] = b"".join(
            subprocess.run(cli + args, capture_output=True, timeout=60, env=daemon.env).stdout
            for args in (["jobs", *cfg, "--json", "--limit", "10000"], ["report", *cfg, job["id"]],
                         ["report", *cfg, pg_job["id"]]))

        # ---- InfluxDB: every measurement, series, tag and field
        answers = []
        measurements = [row[0] for row in influxdb_server.series_values("SHOW MEASUREMENTS", db=DB)]
        assert {"job_energy", "device_power"} <= set(measurements), measurements
        for m in measurements:
            ident = '"' + m.replace("\\", "\\\\").replace('"', '\\"') + '"'
            answers.append(influxdb_server.query(f"SELECT * FROM {ident}", db=DB))
            answers.append(influxdb_server.query(f"SHOW TAG VALUES FROM {ident} WITH KEY =~ /.*/", db=DB))
        for q in ("SHOW SERIES", "SHOW TAG KEYS", "SHOW FIELD KEYS"):
            answers.append(influxdb_server.query(q, db=DB))
        outputs["influxdb"] = json.dumps(answers).encode()
    finally:
        daemon.stop()
        for p in (labelled, unlabelled):
            labelled_process.end(p)

    # ---- the log and every byte the daemon left in its state directory
    outputs["log"] = daemon.log_path.read_bytes()
    state_files = sorted(p for p in (tmp_path / "state").rglob("*") if p.is_file())
    assert any(p.name == "wattprint.sqlite3" for p in state_files), state_files
    outputs["state"] = b"".join(p.read_bytes() for p in state_files)

    for where, data in outputs.items():
        for canary in canaries:
            assert canary.encode() not in data, f"a canary secret leaked into {where}"
    for where in ("api", "metrics", "cli", "influxdb", "state"):
        assert LABEL.encode() in outputs[where], f"{where}: the canary job is not there at all"
    assert str(labelled.pid).encode() in outputs["api"]
