"""Shared helpers of the fault matrix (tests/test_faults_*.py, issue 7): the daemon
with an unbounded label cap, /healthz and /metrics checks of one part, the tick cadence
by the daemon's own counters, "logged once" checks, conservation, a powercap feeder that
survives faults, and the InfluxDB queries the spool and InfluxDB cases share.

Every fault case checks: the tick keeps its cadence (``wattprint_ticks_total`` goes on
advancing, the overruns the daemon counts stay bounded); the affected part is degraded
in /healthz and /metrics (``wattprint_source_up`` 0, ``wattprint_source_state{state=
"degraded"}`` 1), and only that part; the log says it once (one warning when the part
degrades, one line when it recovers); energy is conserved (/api/v1/host attributed +
unattributed = device, per component) and the fault's span is booked, not lost.
Waiting is by the daemon's tick counter, never by fixed sleeps.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import DaemonProcess, sample, wait_ticks
from powercap import PowercapTree

COMPONENTS = ("gpu", "cpu", "dram")


def make_daemon(workdir: Path, *, cls: type = DaemonProcess, env: dict[str, str] | None = None,
                **kwargs: Any) -> DaemonProcess:
    """A DaemonProcess whose job labels never overflow into "_overflow", however many
    labelled processes other tests run on this machine as the same user."""
    return cls(workdir, env={"WATTPRINT_JOBS_MAX_LABELS_PER_USER": "100000", **(env or {})}, **kwargs)


def health(daemon: DaemonProcess) -> dict[str, Any]:
    return daemon.get("/healthz", allow_error=True)


def part(daemon: DaemonProcess, name: str) -> dict[str, Any]:
    return {p["name"]: p for p in health(daemon)["parts"]}[name]


def wait_part(daemon: DaemonProcess, name: str, state: str, timeout_s: float = 10.0, contains: str = "") -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        p = part(daemon, name)
        if p["state"] == state and contains in p["detail"]:
            return p
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} not {state} ({contains!r}) after {timeout_s}s: {p}\n{daemon.log_tail()}")
        time.sleep(0.2)


def assert_part(daemon: DaemonProcess, name: str, state: str, contains: str = "") -> None:
    """The part's state in /healthz and in /metrics (up and state gauges)."""
    hz = health(daemon)
    parts = {p["name"]: p for p in hz["parts"]}
    assert parts[name]["state"] == state, parts[name]
    assert contains in parts[name]["detail"], parts[name]
    m = daemon.metrics()
    assert sample(m, "wattprint_source_up", source=name) == (1.0 if state == "ok" else 0.0)
    assert sample(m, "wattprint_source_state", source=name, state=state) == 1.0
    if state == "degraded":
        assert hz["status"] == "degraded"
        assert parts[name]["errors_total"] >= 1


def degraded_parts(daemon: DaemonProcess) -> set[str]:
    return {p["name"] for p in health(daemon)["parts"] if p["state"] == "degraded"}


class Cadence:
    """Ticks and overruns over a window of the test, by the daemon's own counters.

    The tick keeps its cadence when the daemon counts few overruns (a tick that runs
    past its slot, e.g. one waiting out a 2.5 s hung read, is counted once per slot it
    missed) and the tick counter goes on advancing: ``watch_ticks`` polls it and fails
    if it stops. No wall-clock durations are asserted here (timings belong in
    benchmarks/)."""

    def __init__(self, daemon: DaemonProcess):
        self.daemon = daemon
        m = daemon.metrics()
        self.ticks0 = sample(m, "wattprint_ticks_total")
        self.overruns0 = sample(m, "wattprint_tick_overruns_total")

    def watch_ticks(self, n: int) -> None:
        """Until the daemon has ticked ``n`` more times (polled; fails if the ticks stop)."""
        wait_ticks(self.daemon, n)

    def check(self, max_overruns: int = 2) -> None:
        m = self.daemon.metrics()
        ticks = sample(m, "wattprint_ticks_total") - self.ticks0
        overruns = sample(m, "wattprint_tick_overruns_total") - self.overruns0
        assert ticks >= 1, "no tick in the window"
        assert overruns <= max_overruns, (overruns, ticks)


def tick_at(m: dict) -> float:
    """The wall time of the tick a scrape is as of."""
    return sample(m, "wattprint_last_tick_timestamp_seconds")


def until_ticks(daemon: DaemonProcess, cond: Any, what: str, ticks: int = 15) -> None:
    """Poll ``cond`` once per daemon tick, at most ``ticks`` ticks."""
    for _ in range(ticks):
        if cond():
            return
        wait_ticks(daemon, 1)
    assert cond(), f"{what}: not within {ticks} ticks:\n{daemon.log_tail()}"


def log_lines(daemon: DaemonProcess, needle: str) -> list[str]:
    return [line for line in daemon.log_path.read_text(errors="replace").splitlines() if needle in line]


def assert_logged_once(daemon: DaemonProcess, name: str, recovered: bool = True) -> None:
    """One warning when ``name`` degraded, one line when it recovered: not one per tick."""
    down = log_lines(daemon, f"wattprint.health: {name} degraded:")
    assert len(down) == 1 and " WARNING " in down[0], down
    up = log_lines(daemon, f"wattprint.health: {name} recovered")
    assert len(up) == (1 if recovered else 0), up


def assert_no_traceback(daemon: DaemonProcess) -> None:
    text = daemon.log_path.read_text(errors="replace")
    assert "Traceback" not in text, text[-4000:]


def assert_conserved(daemon: DaemonProcess) -> dict[str, Any]:
    host = daemon.get("/api/v1/host")
    for kind in COMPONENTS:
        dev = host["device_energy_j"][kind]
        got = host["attributed_energy_j"][kind] + host["unattributed_energy_j"][kind]
        assert got == pytest.approx(dev, rel=1e-9, abs=1e-6), (kind, host)
        assert host["attributed_energy_j"][kind] >= 0 and host["unattributed_energy_j"][kind] >= -1e-9
    return host


def energy(m: dict, kind: str, device: str) -> float:
    """A device's energy in one scrape, whatever other labels its series carries (GPU
    series also carry the board's uuid and model name)."""
    found = [v for (name, labels), v in m.items() if name == "wattprint_device_energy_joules_total"
             and dict(labels).get("kind") == kind and dict(labels).get("device") == device]
    assert len(found) == 1, (kind, device, found)
    return found[0]


def rate(m1: dict, m2: dict, kind: str, device: str) -> float:
    """Average power of a device between two scrapes (snapshot timestamps)."""
    dt = sample(m2, "wattprint_last_tick_timestamp_seconds") - sample(m1, "wattprint_last_tick_timestamp_seconds")
    return (energy(m2, kind, device) - energy(m1, kind, device)) / dt


def wait_job(daemon: DaemonProcess, label: str, timeout_s: float = 20.0) -> dict[str, Any]:
    """Until the job labelled ``label`` runs and has energy (asked by label: other
    labelled processes on the machine may be many)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for job in daemon.get("/api/v1/jobs?label=" + urllib.parse.quote(label, safe=""))["jobs"]:
            if job["state"] == "running" and job["energy_j"]["total"] > 0:
                return job
        time.sleep(0.2)
    raise AssertionError(f"job {label!r} not seen:\n{daemon.log_tail()}")


def my_jobs(daemon: DaemonProcess, prefix: str) -> list[dict[str, Any]]:
    return [j for j in daemon.get("/api/v1/jobs?limit=10000")["jobs"] if j["label"].startswith(prefix)]


class ZoneFeeder:
    """Advances powercap counters at constant power, like ``PowercapTree.start_feeding``,
    but survives the faults the tests make: a zone can be ``hold``-ed (its file left
    alone, e.g. while it is a directory), removed and re-created with a restarted
    counter (``restart``). ``fed_j`` is the energy the zone's hardware "used"."""

    def __init__(self, tree: PowercapTree, rates_w: dict[str, float], period_s: float = 0.01):
        self.tree = tree
        self.rates_w = dict(rates_w)
        self._lock = threading.Lock()
        self._value = {z: tree.energy(z) for z in rates_w}
        self._max = {z: tree.max_energy_range_uj(z) for z in rates_w}
        self._fed_uj = {z: 0 for z in rates_w}
        self.wraps = {z: 0 for z in rates_w}
        self.held: set[str] = set()
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._period_s = period_s
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            self.step()

    def step(self) -> None:
        elapsed = time.monotonic() - self._t0
        with self._lock:
            for zone, w in self.rates_w.items():
                target = round(w * elapsed * 1e6)
                add = target - self._fed_uj[zone]
                if add <= 0:
                    continue
                self._fed_uj[zone] = target
                new = self._value[zone] + add
                if new >= self._max[zone]:
                    self.wraps[zone] += new // self._max[zone]
                    new %= self._max[zone]
                self._value[zone] = new
                if zone not in self.held:
                    self._write(zone, new)

    def _write(self, zone: str, uj: int) -> None:
        d = self.tree.root / zone
        tmp = d / ".energy_uj.feed"
        try:
            tmp.write_text(f"{uj}\n")
            os.replace(tmp, d / "energy_uj")
        except OSError:  # the zone is gone, or its file is a directory right now
            pass

    def hold(self, zone: str) -> None:
        with self._lock:
            self.held.add(zone)

    def release(self, zone: str) -> None:
        with self._lock:
            self.held.discard(zone)
            self._write(zone, self._value[zone])

    def restart(self, zone: str, uj: int = 0) -> None:
        """The zone's counter starts again at ``uj`` (as after a module reload)."""
        with self._lock:
            self._value[zone] = uj
            self.held.discard(zone)
            self._write(zone, uj)

    def fed_j(self, zone: str) -> float:
        with self._lock:
            return self._fed_uj[zone] / 1e6

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


INFLUX_DB = "wattprint_faults"


def influx_toml(url: str, **extra: Any) -> str:
    lines = ["[influxdb]", "enabled = true", f'url = "{url}"', f'database = "{INFLUX_DB}"', "flush_interval_s = 0.2",
             "timeout_s = 1.0"]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def influx_gpu0_stamps(server: Any) -> list[int]:
    """Timestamps (ns) of every ``device_power`` point of gpu0 influxd holds, in order."""
    res = server.query('SELECT "watts" FROM "device_power" WHERE "device" = $d', db=INFLUX_DB,
                       params={"d": "gpu0"}, epoch="ns")["results"][0]
    return sorted(int(r[0]) for sr in res.get("series", []) for r in sr["values"])


def influx_job_joules(server: Any, job_id: str) -> float:
    rows = server.series_values('SELECT sum("joules") FROM "job_energy" WHERE "job_id" = $id', db=INFLUX_DB,
                                params={"id": job_id})
    return float(rows[0][1]) if rows else 0.0


def assert_contiguous(stamps_ns: list[int], max_gap_s: float = 1.6) -> None:
    """One point per tick: no two alike, none missing between the first and the last."""
    assert stamps_ns, "no points"
    assert len(stamps_ns) == len(set(stamps_ns)), "duplicate timestamps"
    gaps = [(b - a) / 1e9 for a, b in zip(stamps_ns, stamps_ns[1:])]
    assert not gaps or max(gaps) <= max_gap_s, f"gap of {max(gaps):.2f} s"


def wait_drained(daemon: DaemonProcess, timeout_s: float = 30.0) -> None:
    """Until nothing older than the last tick waits in the spool (polled)."""
    deadline = time.monotonic() + timeout_s
    while sample(daemon.metrics(), "wattprint_spool_oldest_age_seconds") > 1.5:
        assert time.monotonic() < deadline, f"spool not drained:\n{daemon.log_tail()}"
        time.sleep(0.2)

