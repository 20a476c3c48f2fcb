"""End to end, InfluxDB: the real daemon writing to the real influxd (1.x).

- the job's GPU energy in each daemon run is 150 W x its 80 % share (next to an
  invisible process) x the daemon's tick time, and the unattributed GPU energy the
  invisible process's 20 %;
- after a run, sum(job_energy) per job in InfluxDB equals the API's totals within
  0.5%, and sum(job_co2e) equals the job's CO2e;
- stopping influxd for a while, then starting it again, leaves no gap in
  device_power and no duplicate;
- the same across a daemon SIGKILL during the outage (only the daemon's own
  downtime is missing);
- ``wattprint jobs --fleet`` gives per-label totals from InfluxDB with bound params.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse

import pytest

from daemon_harness import DaemonProcess, sample, scrape, wait_ticks
from e2e_truth import INVISIBLE_PID
from gpusim import gpu, proc, write_sim
from wattprint.exporters.lineprotocol import ns_from_s

DB = "wattprint"


@pytest.fixture
def labelled(labelled_process):
    return labelled_process


def influx_toml(url: str) -> str:
    return (f'[influxdb]\nenabled = true\nurl = "{url}"\ndatabase = "{DB}"\nflush_interval_s = 0.2\n'
            'timeout_s = 2.0\n')


def wait_drained(daemon: DaemonProcess, timeout_s: float = 30.0) -> None:
    """Until the backlog is gone: the oldest undelivered point is from the last tick
    (each snapshot is taken right after its own tick queued its points)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = daemon.metrics()
        if sample(m, "wattprint_spool_oldest_age_seconds") < 1.5:
            wait_ticks(daemon, 1)  # the last tick's points, too
            return
        time.sleep(0.3)
    raise AssertionError(f"spool not drained:\n{daemon.log_tail()}")


def wait_health(daemon: DaemonProcess, part: str, state: str, timeout_s: float = 30.0) -> dict[str, str]:
    """Poll /healthz until ``part`` is in ``state``; return every part's state."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = {p["name"]: p["state"] for p in daemon.get("/healthz", allow_error=True)["parts"]}
        if health.get(part) == state or time.monotonic() > deadline:
            assert health.get(part) == state, (health, daemon.log_tail())
            return health
        wait_ticks(daemon, 1)


def wait_job_state(daemon: DaemonProcess, quoted_id: str, state: str, timeout_s: float = 30.0) -> dict:
    """Poll the job's API record (once per daemon tick) until it is in ``state``."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = daemon.get(f"/api/v1/jobs/{quoted_id}")
        if job["state"] == state or time.monotonic() > deadline:
            assert job["state"] == state, (job, daemon.log_tail())
            return job
        wait_ticks(daemon, 1)


def gpu_timestamps(influx, since_s: float) -> list[int]:
    rows = influx.series_values('SELECT "watts" FROM "device_power" WHERE "device" = $d AND time >= $t',
                                db=DB, params={"d": "gpu0", "t": int(since_s * 1e9)})
    return [int(r[0]) for r in rows]


def ts_ns(influx, q: str, params: dict) -> list[int]:
    res = influx.query(q, db=DB, params=params, epoch="ns")["results"][0]
    return [int(r[0]) for s in res.get("series", []) for r in s["values"]]


def assert_no_gaps(stamps_ns: list[int], max_gap_s: float = 1.6) -> None:
    assert len(stamps_ns) == len(set(stamps_ns)), "duplicate timestamps"
    gaps = [(b - a) / 1e9 for a, b in zip(stamps_ns, stamps_ns[1:])]
    assert max(gaps) <= max_gap_s, f"gap of {max(gaps):.2f} s in device_power"


def test_totals_outage_and_crash(tmp_path, labelled, influxdb_server):
    job_proc = labelled("influx-job")
    sim = tmp_path / "sim.json"
    # The job at 80 % SM (memory not available) next to an invisible process at 20 %.
    write_sim(sim, [gpu(0, power_w=150.0, processes=[proc(job_proc.pid, used_memory_bytes=None, sm_util=80),
                                                     proc(INVISIBLE_PID, used_memory_bytes=None, sm_util=20)])])
    daemon = DaemonProcess(tmp_path, sim_file=sim, powercap_root=None, extra_toml=influx_toml(influxdb_server.url))
    started = time.time()
    try:
        daemon.start()
        job = daemon.wait_for_job("influx-job")
        quoted = urllib.parse.quote(job["id"], safe="")
        run1_start = scrape(daemon)
        wait_ticks(daemon, 3)

        # 1. An outage: points wait in the spool, then arrive; no gap, no duplicate.
        influxdb_server.stop()
        wait_ticks(daemon, 4)
        assert sample(daemon.metrics(), "wattprint_spool_pending_points") > 0
        health = wait_health(daemon, "influxdb", "degraded")
        assert health["gpu"] == "ok"  # sampling goes on
        influxdb_server.start()
        wait_drained(daemon)
        stamps = ts_ns(influxdb_server, 'SELECT "watts" FROM "device_power" WHERE "device" = $d', {"d": "gpu0"})
        assert_no_gaps(stamps)
        assert (stamps[-1] - stamps[0]) / 1e9 >= 8

        # 2. A daemon crash during an outage: what it accepted is replayed after restart.
        influxdb_server.stop()
        wait_ticks(daemon, 3)
        before_kill = daemon.get(f"/api/v1/jobs/{quoted}")["last_seen"]
        run1_end = scrape(daemon)
        daemon.kill()
        daemon.start()
        restarted_at = time.time()
        run2_start = scrape(daemon)
        wait_ticks(daemon, 2)
        influxdb_server.start()
        wait_drained(daemon)

        # 3. The job ends; after a clean stop (which flushes), InfluxDB's totals equal the API's.
        run2_end = scrape(daemon)
        labelled.end(job_proc)
        write_sim(sim, [gpu(0, power_w=150.0, processes=[])])
        # The job's GPU energy in each run: 150 W x its 80 % share x the daemon's tick time;
        # the invisible process's 20 % is the unattributed GPU energy.
        for first, last in ((run1_start, run1_end), (run2_start, run2_end)):
            span = last.tick_at - first.tick_at
            gained = last.job_j(job["id"])["gpu"] - first.job_j(job["id"])["gpu"]
            assert span > 1.0
            assert abs(gained - 120.0 * span) <= 120.0 * 0.2 + 0.01 * 120.0 * span, (gained, span)
            device = last.device_j("gpu") - first.device_j("gpu")
            assert gained == pytest.approx(0.8 * device, rel=1e-6)
            assert last.unattributed_j("gpu") - first.unattributed_j("gpu") == pytest.approx(0.2 * device, rel=1e-6)
        job = wait_job_state(daemon, quoted, "finished")
        assert daemon.stop() == 0
        [[_, influx_j]] = influxdb_server.series_values(
            'SELECT sum("joules") FROM "job_energy" WHERE "job_id" = $id', db=DB, params={"id": job["id"]})
        assert influx_j == pytest.approx(job["energy_j"]["total"], rel=0.005)
        [[_, influx_g]] = influxdb_server.series_values(
            'SELECT sum("grams") FROM "job_co2e" WHERE "job_id" = $id', db=DB, params={"id": job["id"]})
        assert influx_g == pytest.approx(job["co2e_g"], rel=0.005)

        stamps = ts_ns(influxdb_server, 'SELECT "watts" FROM "device_power" WHERE "device" = $d', {"d": "gpu0"})
        assert len(stamps) == len(set(stamps))
        cut = ns_from_s(before_kill)  # timestamps are written at microsecond precision
        before = [t for t in stamps if t <= cut]
        after = [t for t in stamps if t > cut]
        assert_no_gaps(before)  # everything accepted before the SIGKILL arrived
        assert_no_gaps(after)
        assert before[-1] / 1e9 == pytest.approx(before_kill, abs=0.01)
        assert (after[0] - before[-1]) / 1e9 <= restarted_at - before_kill + 1.6  # only the downtime
        assert before[0] / 1e9 >= started - 1

        # 4. Fleet totals from InfluxDB.
        cfg = tmp_path / "fleet.toml"
        cfg.write_text(influx_toml(influxdb_server.url))
        r = subprocess.run([sys.executable, "-m", "wattprint.daemon", "jobs", "--fleet", "--config", str(cfg),
                            "--json", "--label", "influx-job"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        [row] = json.loads(r.stdout)["labels"]
        assert row["label"] == "influx-job" and row["hosts"] == ["testhost"]
        assert row["energy_kwh"] == pytest.approx(job["energy_kwh"], rel=0.005)
        assert row["co2e_g"] == pytest.approx(job["co2e_g"], rel=0.005)
        # A hostile label is a bound parameter: it matches nothing and injects nothing.
        r = subprocess.run([sys.executable, "-m", "wattprint.daemon", "jobs", "--fleet", "--config", str(cfg),
                            "--json", "--label", "x' OR 1=1 --"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["labels"] == []
    finally:
        daemon.kill()


def test_fleet_reports_unreachable_influxdb_clearly(tmp_path):
    cfg = tmp_path / "fleet.toml"
    cfg.write_text('[influxdb]\nenabled = true\nurl = "http://127.0.0.1:9"\ntimeout_s = 1.0\n')
    r = subprocess.run([sys.executable, "-m", "wattprint.daemon", "jobs", "--fleet", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "not reachable" in r.stderr and "Traceback" not in r.stderr
