"""InfluxDB delivery never loses data silently (issue 11): the real daemon, the real
influxd, and a small aiohttp proxy between them that the test scripts.

- the proxy answers 302/307 redirects to a login page that answers 200, and a 200
  HTML page, before forwarding: no point is lost, each arrives once, /healthz showed
  the sink degraded with the reason while it lasted;
- the proxy answers 400 to everything for a few seconds: each line it rejected is
  dead-lettered once, the count is in the metrics by reason, the log has a handful of
  lines about it (not one per line), health is degraded;
- the spool cursor is damaged while the daemon is stopped with an undelivered backlog
  (a segment number ahead of the files, an offset past the end of the segment): the
  restarted daemon replays, every point reaches influxd, health and metrics say what
  was repaired.

Truth comes from what the test controls: one ``device_power`` point for gpu0 per tick
(the simulated GPU), the ticks the daemon reports, and the answers the proxy gave.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

import aiohttp
import pytest
from aiohttp import web

from daemon_harness import DaemonProcess, sample
from gpusim import gpu, write_sim
from servers import InfluxServer

DB = "wattprint"
TICK_S = 1.0


class Proxy:
    """Forwards ``POST /write`` to influxd unless ``mode`` says otherwise:
    ``"302"`` / ``"307"`` (redirect to ``/login``, a 200 HTML page), ``"html"`` (200 with
    a page), ``"400"`` (a JSON error for everything), ``"503"`` (an outage).
    ``bad_budget`` (if set) counts down per bad answer; at 0 the proxy forwards again."""

    def __init__(self, influx_url: str) -> None:
        self.influx_url = influx_url
        self.mode = "forward"
        self.modes_after: list[str] = []  # next modes, one per bad answer, then "forward"
        self.lock = threading.Lock()
        self.answers: list[tuple[str, int]] = []  # (mode, status) per write request
        self.rejected_single: list[str] = []  # lines answered 400 alone (the sink dead-letters these)
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/write", self.write)
        app.router.add_route("*", "/login", self.login)
        return app

    async def login(self, request: web.Request) -> web.Response:
        return web.Response(text="<html><body><form>Sign in</form></body></html>", content_type="text/html")

    def _next_mode(self) -> str:
        with self.lock:
            mode = self.mode
            if mode != "forward" and self.modes_after is not None and self.modes_after:
                self.mode = self.modes_after.pop(0)
            return mode

    async def write(self, request: web.Request) -> web.Response:
        body = await request.read()  # aiohttp undoes Content-Encoding: gzip
        mode = self._next_mode()
        if mode in ("302", "307"):
            status, resp = int(mode), web.Response(status=int(mode), headers={"Location": self.url + "/login"})
        elif mode == "html":
            status, resp = 200, web.Response(text="<html><body>Moved</body></html>", content_type="text/html")
        elif mode == "400":
            lines = body.decode().split("\n")
            with self.lock:
                if len(lines) == 1:
                    self.rejected_single.append(lines[0])
            status, resp = 400, web.json_response({"error": "proxy: bad request"}, status=400)
        elif mode == "503":
            status, resp = 503, web.json_response({"error": "proxy: influxdb unavailable"}, status=503)
        else:
            async with aiohttp.ClientSession() as session:
                async with session.post(self.influx_url + "/write", params=request.query, data=body) as r:
                    text = await r.read()
                    status, resp = r.status, web.Response(status=r.status, body=text)
        with self.lock:
            self.answers.append((mode, status))
        return resp

    def set(self, mode: str, then: list[str] | None = None) -> None:
        with self.lock:
            self.mode = mode
            self.modes_after = list(then or [])


@pytest.fixture
def proxy(influxdb_server: InfluxServer, background_app) -> Proxy:
    influxdb_server.create_database(DB)
    p = Proxy(influxdb_server.url)
    server = background_app(p.app())
    p.url = server.url
    return p


def start_daemon(tmp_path: Path, proxy: Proxy) -> DaemonProcess:
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=120.0)])
    toml = (f'[influxdb]\nenabled = true\nurl = "{proxy.url}"\ndatabase = "{DB}"\n'
            "flush_interval_s = 0.2\ntimeout_s = 2.0\n")
    daemon = DaemonProcess(tmp_path, sim_file=sim, powercap_root=None, extra_toml=toml)
    daemon.start()
    return daemon


def influx_part(daemon: DaemonProcess) -> dict[str, Any]:
    [part] = [p for p in daemon.get("/healthz")["parts"] if p["name"] == "influxdb"]
    return part


def poll(what: str, predicate: Callable[[], bool], daemon: DaemonProcess, timeout_s: float = 45.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{daemon.log_tail()}")


def wait_drained(daemon: DaemonProcess, timeout_s: float = 60.0) -> None:
    """Until the spool holds nothing older than the last tick."""
    poll("the spool to drain",
         lambda: sample(daemon.metrics(), "wattprint_spool_oldest_age_seconds") < 1.5, daemon, timeout_s)


def gpu_stamps(influx: InfluxServer) -> list[int]:
    res = influx.query('SELECT "watts" FROM "device_power" WHERE "device" = $d', db=DB,
                       params={"d": "gpu0"}, epoch="ns")["results"][0]
    return [int(r[0]) for s in res.get("series", []) for r in s["values"]]


def dead_letter_lines(tmp_path: Path) -> list[str]:
    path = tmp_path / "state" / "influx-spool" / "dead-letter.lp"
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


def stamp_of(line: str) -> int:
    return int(line.rsplit(" ", 1)[1])


def assert_every_tick(stamps: list[int], ticks: int, what: str) -> None:
    """One point per tick, each once, spaced by the tick interval (no gap)."""
    assert len(stamps) == len(set(stamps)), f"{what}: duplicate timestamps"
    stamps = sorted(stamps)
    gaps = [(b - a) / 1e9 for a, b in zip(stamps, stamps[1:])]
    assert max(gaps) <= TICK_S * 1.6, f"{what}: gap of {max(gaps):.2f} s"
    assert len(stamps) == ticks, f"{what}: {len(stamps)} points for {ticks} ticks"


def ticks_so_far(daemon: DaemonProcess) -> tuple[int, float]:
    body = daemon.get("/healthz")
    return int(body["tick"]), float(body["last_tick_at"])


# ----------------------------------------------------------------- 1. only 204 counts


def test_redirects_and_pages_keep_the_data_until_influxdb_has_it(tmp_path: Path, proxy: Proxy,
                                                                  influxdb_server: InfluxServer) -> None:
    daemon = start_daemon(tmp_path, proxy)
    try:
        poll("first points in influxd", lambda: len(gpu_stamps(influxdb_server)) >= 2, daemon)
        # Two 302s, one 307, one 200 page; then the proxy forwards again.
        proxy.set("302", then=["302", "307", "html", "forward"])
        details: set[str] = set()

        def bad_phase_over() -> bool:
            part = influx_part(daemon)
            if part["state"] == "degraded":
                details.add(part["detail"])
            return proxy.mode == "forward" and part["state"] == "ok"  # (delivered again)

        poll("the bad answers", bad_phase_over, daemon, timeout_s=90)
        wait_drained(daemon)
        time.sleep(1.0)
        ticks, last_tick_at = ticks_so_far(daemon)
        wait_drained(daemon)
        m = daemon.metrics()
        assert influx_part(daemon)["state"] == "ok"
        assert daemon.stop() == 0
    finally:
        daemon.kill()

    answered = [a for a in proxy.answers if a[0] != "forward"]
    assert answered == [("302", 302), ("302", 302), ("307", 307), ("html", 200)]
    login = f"redirect to {proxy.url}/login; writes need a 204"
    assert f"InfluxDB answered 302 {login}" in details
    assert f"InfluxDB answered 307 {login}" in details
    assert "InfluxDB answered 200 (text/html) instead of 204; writes need a 204" in details
    assert sample(m, "wattprint_influx_write_failures_total", reason="redirect") == 3
    assert sample(m, "wattprint_influx_write_failures_total", reason="not_204") == 1
    assert sample(m, "wattprint_influx_points_dropped_total", reason="rejected") == 0
    # Every tick up to the last one read is in influxd, once (the first tick included).
    stamps = [t for t in gpu_stamps(influxdb_server) if t <= int(last_tick_at * 1e9) + 1000]
    assert_every_tick(stamps, ticks, "device_power gpu0")
    assert dead_letter_lines(tmp_path) == []
    log = daemon.log_path.read_text()
    assert log.count("writes need a 204") <= 4  # one line per new reason, not one per retry


# -------------------------------------------------------------- 2. a 400 for everything


def test_400_for_everything_is_dead_lettered_counted_and_logged_a_few_times(
        tmp_path: Path, proxy: Proxy, influxdb_server: InfluxServer) -> None:
    daemon = start_daemon(tmp_path, proxy)
    try:
        poll("first points in influxd", lambda: len(gpu_stamps(influxdb_server)) >= 2, daemon)
        proxy.set("400")
        t_bad = time.monotonic()
        degraded: list[str] = []
        while time.monotonic() - t_bad < 6.0:  # about six ticks of 400s
            part = influx_part(daemon)
            if part["state"] == "degraded":
                degraded.append(part["detail"])
            time.sleep(0.3)
        proxy.set("forward")
        wait_drained(daemon)
        time.sleep(1.0)
        ticks, last_tick_at = ticks_so_far(daemon)
        wait_drained(daemon)
        m = daemon.metrics()
        part = influx_part(daemon)
        assert daemon.stop() == 0
    finally:
        daemon.kill()

    rejected = proxy.rejected_single  # (an idle job's job_co2e line can repeat, tick after tick)
    assert len(rejected) >= 6
    # Dead-lettered: exactly the lines the proxy refused alone, each once.
    assert sorted(dead_letter_lines(tmp_path)) == sorted(rejected)
    assert sample(m, "wattprint_influx_points_dropped_total", reason="rejected") == len(rejected)
    assert sample(m, "wattprint_influx_points_dropped_rejected_total") == len(rejected)  # the old name still works
    # Health: degraded during the phase, and still (the loss episode lasts 60 s after the last loss).
    assert degraded and all("dead-lettered: InfluxDB rejected them (HTTP 400: proxy: bad request)" in d
                            for d in degraded)
    assert part["state"] == "degraded" and "dead-lettered" in part["detail"]
    # No point vanished: each tick's gpu0 point is in influxd or in the dead-letter file, once.
    cut = int(last_tick_at * 1e9) + 1000
    stored = [t for t in gpu_stamps(influxdb_server) if t <= cut]
    dead = [stamp_of(line) for line in rejected if line.startswith("device_power,") and "device=gpu0" in line]
    assert dead and not set(dead) & set(stored)
    assert_every_tick(stored + [t for t in dead if t <= cut], ticks, "device_power gpu0, stored + dead-lettered")
    # The log: a few lines about it, never one per line.
    about = [line for line in daemon.log_path.read_text().splitlines() if "dead-letter" in line]
    assert len(about) <= 5, about
    assert len(rejected) > len(about)


# ---------------------------------------------------------- 3. a damaged spool cursor


@pytest.mark.parametrize("damage", ["segment_ahead", "offset_past_end"])
def test_damaged_cursor_replays_the_backlog(tmp_path: Path, proxy: Proxy, influxdb_server: InfluxServer,
                                            damage: str) -> None:
    spool = tmp_path / "state" / "influx-spool"
    daemon = start_daemon(tmp_path, proxy)
    try:
        poll("first points in influxd", lambda: len(gpu_stamps(influxdb_server)) >= 3, daemon)
        proxy.set("503")  # an outage: the backlog waits in the spool
        time.sleep(5.0)
        assert sample(daemon.metrics(), "wattprint_spool_pending_points") >= 4
        ticks_before, stopped_at = ticks_so_far(daemon)
        assert daemon.stop() == 0
    finally:
        daemon.kill()

    cursor = json.loads((spool / "cursor.json").read_text())
    segs = sorted(spool.glob("seg-*.wal"))
    newest = int(segs[-1].name[4:-4])
    if damage == "segment_ahead":
        cursor = {"segment": newest + 5, "offset": 0}
    else:
        seg = spool / f"seg-{cursor['segment']:020d}.wal"
        cursor = {"segment": cursor["segment"], "offset": seg.stat().st_size + 4096}
    (spool / "cursor.json").write_text(json.dumps(cursor))

    proxy.set("forward")
    daemon.log_path.write_text("")
    daemon.start()
    try:
        part = influx_part(daemon)
        wait_drained(daemon)
        m = daemon.metrics()
        part_after = influx_part(daemon)
        assert daemon.stop() == 0
    finally:
        daemon.kill()

    # Nothing the first run accepted is missing, nothing is doubled.
    stamps = sorted(gpu_stamps(influxdb_server))
    first_run = [t for t in stamps if t <= int(stopped_at * 1e9) + 1000]
    assert_every_tick(first_run, ticks_before, "device_power gpu0 of the first run")
    assert len(stamps) == len(set(stamps))
    # Health and metrics say what happened.
    for p in (part, part_after):
        assert p["state"] == "degraded" and "spool cursor repaired" in p["detail"], p
    assert sample(m, "wattprint_spool_cursor_repairs_total", reason=damage) == 1
    other = "offset_past_end" if damage == "segment_ahead" else "segment_ahead"
    assert sample(m, "wattprint_spool_cursor_repairs_total", reason=other) == 0
    assert daemon.log_path.read_text().count("spool cursor repaired") == 1
