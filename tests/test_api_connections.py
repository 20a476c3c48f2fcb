"""The HTTP API under descriptor pressure, against the REAL daemon process (issue 11).

The daemon runs under ``prlimit --nofile=1024:1024`` (so its hard limit is 1,024
descriptors and the attack is cheap). One local client then opens 1,100 half-sent
HTTP connections (a request head without its final blank line) from 127.0.0.1 and
holds them. With the caps (``[http] max_connections_per_client``, ``max_connections``
fitted to the open-files limit) and the request-head deadline (``[http]
header_timeout_s``):

- the daemon keeps ticking (the tick counter advances about once a second);
- a labelled job's GPU energy from the API equals the simulated power x the time
  between two of its ticks, within 2 %, across the attack;
- the ``api`` health part is degraded while it happens (seen from another loopback
  address) and refused connections are counted in
  ``wattprint_http_connections_rejected_total``; a refused connection gets a JSON 503;
- the log stays small (a bounded number of lines, one warning for the episode);
- half-sent connections are closed after ``header_timeout_s``, and after the attack
  the api part recovers and 127.0.0.1 is served again.

Without the caps the daemon's descriptors run out: every source fails for tens of
ticks and the log floods.
"""

from __future__ import annotations

import http.client
import json
import resource
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon_harness import DaemonProcess, sample
from gpusim import gpu, proc, write_sim

POWER_W = 300.0
ATTACK_CONNECTIONS = 1100
HEADER_TIMEOUT_S = 4.0
PER_CLIENT = 32
HALF_SENT = b"GET /api/v1/jobs HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n"  # no blank line: the head never ends


def get_from(port: int, path: str, source: str) -> tuple[int, Any]:
    """GET from the daemon with ``source`` as our address (all of 127/8 is loopback)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def metric(port: int, name: str, source: str = "127.0.0.2") -> float:
    """One unlabelled sample of a scrape from ``source``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode()
    finally:
        conn.close()
    assert resp.status == 200, text[:300]
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and not s.labels:
                return s.value
    raise AssertionError(f"no {name} in the scrape")


def wait_until(what: str, check: Callable[[], Any], timeout_s: float = 30.0, every_s: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"{what}: not within {timeout_s} s (last: {last!r})")


def our_job(port: int, label: str, source: str) -> dict[str, Any]:
    status, body = get_from(port, f"/api/v1/jobs?label={label}", source)
    assert status == 200, body
    [job] = [j for j in body["jobs"] if j["label"] == label]
    return job


def log_lines(path: Path) -> int:
    return len(path.read_text(errors="replace").splitlines())


@pytest.mark.slow
def test_half_sent_connections_do_not_starve_the_daemon(tmp_path: Path, labelled_process) -> None:
    prlimit = shutil.which("prlimit")
    assert prlimit, "prlimit (util-linux) is required"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = ATTACK_CONNECTIONS + 200
    if soft < need:  # the test itself holds the attack's sockets
        assert hard >= need, f"the test needs {need} descriptors; the hard limit is {hard}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))

    worker = labelled_process("fd-pressure")
    sim = write_sim(tmp_path / "sim.json", [gpu(0, power_w=POWER_W, processes=[proc(worker.pid, sm_util=90)])])
    daemon = DaemonProcess(tmp_path, sim_file=sim, powercap_root=None,
                           argv_prefix=(prlimit, "--nofile=1024:1024", "--"),
                           env={"WATTPRINT_HTTP_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
                                "WATTPRINT_HTTP_MAX_CONNECTIONS_PER_CLIENT": str(PER_CLIENT)})
    daemon.start()
    held: list[socket.socket] = []
    try:
        daemon.wait_for_job("fd-pressure")
        metrics = daemon.metrics()
        cap = sample(metrics, "wattprint_http_max_connections")
        assert cap <= (1024 - 256) // 2, cap  # fitted to the open-files limit
        # a baseline tick of the job, seen from another loopback address
        before = our_job(daemon.port, "fd-pressure", "127.0.0.2")
        lines_before = log_lines(daemon.log_path)
        tick_before = get_from(daemon.port, "/healthz", "127.0.0.2")[1]["tick"]

        refused_503 = 0
        connect_failures = 0
        for i in range(ATTACK_CONNECTIONS):  # bounded, loopback only
            try:
                s = socket.create_connection(("127.0.0.1", daemon.port), timeout=2.0, source_address=("127.0.0.1", 0))
            except OSError:
                connect_failures += 1
                continue
            try:
                s.sendall(HALF_SENT)
            except OSError:
                pass
            held.append(s)
            if i == PER_CLIENT + 5:  # over the per-client cap: a JSON 503, then closed
                s.settimeout(5.0)
                data = b""
                try:
                    while chunk := s.recv(4096):
                        data += chunk
                except OSError:
                    pass
                if data.startswith(b"HTTP/1.1 503"):
                    refused_503 += 1
                    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
                    assert "max_connections_per_client" in body["error"]["message"]
        assert refused_503 == 1
        assert len(held) >= ATTACK_CONNECTIONS - 50, (len(held), connect_failures)

        # While the attack's sockets are held: the api part is degraded, refusals counted.
        status, hz = get_from(daemon.port, "/healthz", "127.0.0.2")
        assert status == 200, hz
        api = {p["name"]: p for p in hz["parts"]}["api"]
        assert api["state"] == "degraded" and "max_connections_per_client" in api["detail"], api
        assert hz["status"] == "degraded"
        # (the metric is published with the next tick; the last connections may still be in the backlog)
        # Every connection held is refused, or admitted (at most PER_CLIENT at a time; a
        # slot frees when a half-sent one reaches the head deadline).
        def accounted() -> bool:
            rejected = metric(daemon.port, "wattprint_http_connections_rejected_total")
            timeouts = metric(daemon.port, "wattprint_http_header_timeouts_total")
            return len(held) - PER_CLIENT - timeouts <= rejected <= len(held)
        wait_until("refusals counted", accounted, timeout_s=10)
        assert metric(daemon.port, "wattprint_http_connections_rejected_total") >= ATTACK_CONNECTIONS * 0.8

        # The daemon keeps ticking: about one tick a second for 6 s.
        t0 = time.monotonic()
        time.sleep(6.0)
        hz = get_from(daemon.port, "/healthz", "127.0.0.2")[1]
        elapsed = time.monotonic() - t0
        assert hz["tick"] - tick_before >= elapsed * 0.7, (hz["tick"], tick_before, elapsed)
        parts = {p["name"]: p["state"] for p in hz["parts"]}
        assert parts["gpu"] == "ok" and parts["processes"] == "ok", hz

        # The job's GPU energy across the attack = simulated power x time between its ticks.
        after = our_job(daemon.port, "fd-pressure", "127.0.0.2")
        span_s = after["last_seen"] - before["last_seen"]
        assert span_s > 5.0
        got_j = after["energy_j"]["gpu"] - before["energy_j"]["gpu"]
        assert got_j == pytest.approx(POWER_W * span_s, rel=0.02), (got_j, span_s)

        # Half-sent connections are closed after the head deadline (the server hangs up).
        wait_until("half-sent connections closed",
                   lambda: metric(daemon.port, "wattprint_http_header_timeouts_total") >= PER_CLIENT - 2,
                   timeout_s=HEADER_TIMEOUT_S + 10)
        assert metric(daemon.port, "wattprint_http_connections_open") <= 3
    finally:
        for s in held:
            s.close()
    try:
        # Afterwards: 127.0.0.1 is served again and the api part recovers (logged once).
        wait_until("127.0.0.1 served again", lambda: get_from(daemon.port, "/healthz", "127.0.0.1")[0] == 200)
        wait_until("api part recovered",
                   lambda: {p["name"]: p["state"] for p in daemon.get("/healthz")["parts"]}["api"] == "ok",
                   timeout_s=30)
        text = daemon.log_path.read_text(errors="replace")
        added = log_lines(daemon.log_path) - lines_before
        assert added <= 10, "\n".join(text.splitlines()[-40:])
        assert text.count("api degraded") == 1 and text.count("api recovered") == 1, text[-3000:]
        assert "Traceback" not in text and "out of system resource" not in text
    finally:
        assert daemon.stop() == 0
