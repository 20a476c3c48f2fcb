"""HTTP limits of the API, against the real daemon (and the token bucket and the
request timeout on their own):

- a body over ``[http] max_request_bytes`` answers 413 JSON, whether its size is
  announced (Content-Length) or not (chunked), on any method, before routing (so not
  405); a body under the limit is ignored;
- a request target over ``MAX_URL_BYTES`` answers 414 JSON; a request line or a header
  over aiohttp's parser limits, and bytes that are not HTTP at all, answer 400 JSON
  (never aiohttp's plain text), and the daemon goes on serving;
- ``[http] rate_limit_per_s``: a client that sends faster gets 429 JSON with an integer
  ``Retry-After``; after waiting that long it is served again; another client (another
  peer address over TCP, another uid on the Unix socket) keeps its own budget; every
  endpoint counts, /metrics and /healthz included;
- a request still being handled after the request timeout answers 503 JSON.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from daemon_harness import DaemonProcess
from servers import BackgroundAppFactory
from unix_http import unix_get, unix_get_as
from wattprint.daemon.api import (
    MAX_URL_BYTES,
    PARSER_MAX_FIELD_BYTES,
    PARSER_MAX_LINE_BYTES,
    Api,
    RateLimiter,
)
from wattprint.daemon.model import Snapshot

MAX_BODY = 2048
RATE = 4.0


def raw_request(port: int, data: bytes, source: str = "127.0.0.1", timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` as is; parse the one response (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as sock:
        sock.sendall(data)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def assert_json_error(status: int, headers: dict[str, str], body: bytes, expected: int) -> dict[str, Any]:
    assert status == expected, body[:300]
    assert headers["content-type"].startswith("application/json"), headers
    doc = json.loads(body)
    assert doc["error"]["status"] == expected and doc["error"]["message"], doc
    return doc


@pytest.fixture(scope="module")
def limits_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    daemon = DaemonProcess(tmp_path_factory.mktemp("limits"), sim_file=None, powercap_root=None,
                           env={"WATTPRINT_HTTP_MAX_REQUEST_BYTES": str(MAX_BODY),
                                "WATTPRINT_HTTP_RATE_LIMIT_PER_S": "0"})
    daemon.start()
    try:
        yield daemon
    finally:
        assert daemon.stop() == 0
    assert "Traceback" not in daemon.log_path.read_text(errors="replace")


# --------------------------------------------------------------------- request size


@pytest.mark.slow
@pytest.mark.parametrize("method", ["GET", "POST", "PUT"])
def test_announced_body_over_the_limit_is_413(limits_daemon: DaemonProcess, method: str) -> None:
    body = b"x" * (MAX_BODY + 1)
    head = (f"{method} /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    doc = assert_json_error(*raw_request(limits_daemon.port, head + body), 413)
    assert str(MAX_BODY) in doc["error"]["message"]


@pytest.mark.slow
def test_announced_body_is_refused_before_it_is_sent(limits_daemon: DaemonProcess) -> None:
    # 100 MB announced, nothing sent: the answer comes at once, the body is not awaited.
    head = b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n"
    started = time.monotonic()
    assert_json_error(*raw_request(limits_daemon.port, head, timeout=5), 413)
    assert time.monotonic() - started < 3


@pytest.mark.slow
def test_chunked_body_over_the_limit_is_413(limits_daemon: DaemonProcess) -> None:
    chunk = b"y" * 1000
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5)) + b"0\r\n\r\n"
    head = b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert_json_error(*raw_request(limits_daemon.port, head + chunks), 413)


@pytest.mark.slow
def test_body_under_the_limit_is_ignored(limits_daemon: DaemonProcess) -> None:
    body = b"z" * (MAX_BODY - 1)
    head = f"GET /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    status, headers, resp = raw_request(limits_daemon.port, head + body)
    assert status == 200 and "jobs" in json.loads(resp)
    head = f"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    doc = assert_json_error(*raw_request(limits_daemon.port, head + body), 405)
    assert doc["error"]["message"] == "method not allowed"


# --------------------------------------------------------------- request target, parser


@pytest.mark.slow
def test_long_request_target_is_414(limits_daemon: DaemonProcess) -> None:
    target = "/api/v1/jobs?label=" + "a" * MAX_URL_BYTES
    assert len(target) < PARSER_MAX_LINE_BYTES - 20
    status, headers, body = raw_request(limits_daemon.port, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    doc = assert_json_error(status, headers, body, 414)
    assert str(MAX_URL_BYTES) in doc["error"]["message"]
    # the longest target the document allows is served
    target = "/api/v1/jobs?label=" + "%F0%9F%92%A1" * 1024 + "&user=" + "%F0%9F%92%A1" * 1024
    status, _h, body = raw_request(limits_daemon.port, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status == 200 and json.loads(body)["count"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("what", ["request line", "header", "not http", "bad header", "bad version"])
def test_what_the_parser_refuses_is_json_400(limits_daemon: DaemonProcess, what: str) -> None:
    data = {
        "request line": b"GET /api/v1/jobs?x=" + b"a" * PARSER_MAX_LINE_BYTES + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * (PARSER_MAX_FIELD_BYTES + 10) + b"\r\n\r\n",
        "not http": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 hello\r\n\r\n",
        "bad header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
        "bad version": b"GET /healthz HTTP/9.9x\r\nHost: x\r\n\r\n",
    }[what]
    status, headers, body = raw_request(limits_daemon.port, data)
    assert 400 <= status < 500, (status, body[:200])
    assert_json_error(status, headers, body, status)
    assert limits_daemon.get("/healthz")["tick"] >= 1  # still serving


# ------------------------------------------------------------------------ rate limit


@pytest.fixture(scope="module")
def rate_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, str]]:
    if os.geteuid() != 0:
        pytest.skip("needs root: connects to the Unix socket as another uid")
    base = Path(tempfile.mkdtemp(prefix="wp-rate-", dir="/tmp"))
    base.chmod(0o755)
    sock = str(base / "api.sock")
    daemon = DaemonProcess(tmp_path_factory.mktemp("rate"), sim_file=None, powercap_root=None,
                           env={"WATTPRINT_HTTP_RATE_LIMIT_PER_S": str(RATE), "WATTPRINT_HTTP_SOCKET": sock})
    try:
        daemon.start()  # its readiness polling spends part of 127.0.0.1's budget
        yield daemon, sock
    finally:
        daemon.stop()
        shutil.rmtree(base, ignore_errors=True)


def burst(port: int, n: int, source: str = "127.0.0.1", path: str = "/healthz") -> list[tuple[int, dict, bytes]]:
    """n requests on one keep-alive connection, as fast as they go."""
    out = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        for _ in range(n):
            conn.request("GET", path)
            resp = conn.getresponse()
            out.append((resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()))
    finally:
        conn.close()
    return out


def wait_for_budget(port: int, source: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(1.0)
        if burst(port, 1, source)[0][0] == 200:
            time.sleep(1.0)  # let the bucket refill fully (one second's worth)
            return
    raise AssertionError("the budget never came back")


@pytest.mark.slow
def test_rate_limit_429_with_retry_after_then_served_again(rate_daemon: tuple[DaemonProcess, str]) -> None:
    daemon, _sock = rate_daemon
    wait_for_budget(daemon.port, "127.0.0.1")
    n = int(RATE) * 10
    started = time.monotonic()
    answers = burst(daemon.port, n, path="/metrics")
    elapsed = time.monotonic() - started
    statuses = [s for s, _h, _b in answers]
    assert statuses[0] == 200
    # the burst (one second's worth) plus what refilled while the requests went out
    assert statuses.count(200) <= RATE + RATE * elapsed + 1, (statuses, elapsed)
    if elapsed < (n - RATE - 1) / RATE:  # fast enough to run out (always, unless the machine crawls)
        assert 429 in statuses, (statuses, elapsed)
    elif 429 not in statuses:
        pytest.skip(f"{n} requests took {elapsed:.1f} s: too slow to outrun {RATE:g}/s")
    status, headers, body = next(a for a in answers if a[0] == 429)
    doc = assert_json_error(status, headers, body, 429)
    assert "per second" in doc["error"]["message"]
    retry = int(headers["retry-after"])
    assert 1 <= retry <= 2
    time.sleep(retry)
    assert burst(daemon.port, 1, path="/api/v1/jobs")[0][0] == 200


@pytest.mark.slow
def test_other_clients_keep_their_own_budget(rate_daemon: tuple[DaemonProcess, str]) -> None:
    daemon, sock = rate_daemon
    wait_for_budget(daemon.port, "127.0.0.1")
    statuses = [s for s, _h, _b in burst(daemon.port, int(RATE) * 10)]
    assert statuses[-1] == 429, statuses
    # another peer address (all of 127.0.0.0/8 is loopback)
    assert burst(daemon.port, 1, source="127.0.0.2")[0][0] == 200
    # the Unix socket: keyed by uid, not by address
    root = [unix_get(sock, "/healthz")[0] for _ in range(int(RATE) * 10)]
    assert root[0] == 200 and root[-1] == 429, root
    [(nobody_status, _h, _b)] = unix_get_as(65534, 65534, sock, ["/healthz"])
    assert nobody_status == 200
    status, headers, body = unix_get(sock, "/api/v1/jobs")
    assert_json_error(status, {k.lower(): v for k, v in headers.items()}, body, 429)


def test_token_bucket() -> None:
    now = [100.0]
    limiter = RateLimiter(2.0, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(2)] == [0.0, 0.0]  # burst = one second's worth
    assert limiter.take("a") == pytest.approx(0.5)
    assert limiter.take("b") == 0.0  # its own bucket
    now[0] += 0.5
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0
    now[0] += 100
    assert [limiter.take("a") for _ in range(3)][:2] == [0.0, 0.0]  # refills up to the burst only
    assert RateLimiter(0).take("a") == 0.0  # 0: no limit
    slow = RateLimiter(0.2, clock=lambda: now[0])
    assert slow.take("x") == 0.0 and slow.take("x") == pytest.approx(5.0)  # burst at least 1
    small = RateLimiter(1.0, max_clients=3, clock=lambda: now[0])
    for key in "abcdef":
        small.take(key)
    assert len(small) == 3  # bounded memory: the least recently seen are forgotten


# ------------------------------------------------------------------------- timeout


class SlowReader:
    def jobs(self, **_kw: Any) -> list[dict]:
        time.sleep(2.0)
        return []


def test_request_timeout_is_503_json(background_app: BackgroundAppFactory) -> None:
    snapshot = Snapshot(taken_at=time.time(), tick=1, tick_duration_s=0.01)
    api = Api(lambda: snapshot, SlowReader(), lambda: (b"", "text/plain"),  # type: ignore[arg-type]
              host="h", bucket_s=60, request_timeout_s=0.3)
    server = background_app(api.app())
    started = time.monotonic()
    status, headers, body = raw_request(int(server.url.rsplit(":", 1)[1]),
                                        b"GET /api/v1/jobs HTTP/1.1\r\nHost: x\r\n\r\n")
    assert time.monotonic() - started < 1.8
    doc = assert_json_error(status, headers, body, 503)
    assert "0.3 s" in doc["error"]["message"]


# ------------------------------------------------------------------ connections


def test_connection_caps_fit_the_open_files_limit() -> None:
    from wattprint.daemon.api import RESERVED_FDS, fitting_max_connections

    assert fitting_max_connections(256, 65536) == 256
    assert fitting_max_connections(256, 1024) == 256  # (1024 - 256) / 2 = 384 leaves the default
    assert fitting_max_connections(1000, 1024) == (1024 - RESERVED_FDS) // 2
    assert fitting_max_connections(256, 300) == 22
    assert fitting_max_connections(256, 100) == 1  # never 0: the API stays reachable


class _FakeTransport:
    def __init__(self, peer: str):
        self.peer = peer
        self.written = b""
        self.closed = False

    def get_extra_info(self, name: str) -> Any:
        return {"peername": (self.peer, 40000), "socket": None}.get(name)

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True


def test_refusal_episodes_log_once_and_count(caplog: pytest.LogCaptureFixture) -> None:
    import asyncio
    import errno
    import logging

    from wattprint.daemon.api import ACCEPT_ERROR_MESSAGE, ConnectionLimiter
    from wattprint.daemon.health import HealthBoard

    now = [0.0]
    health = HealthBoard()
    loop = asyncio.new_event_loop()
    try:
        limiter = ConnectionLimiter(4, 2, 10.0, health, clock=lambda: now[0])
        caplog.set_level(logging.INFO)
        admitted = [object() for _ in range(2)]
        assert all(limiter.admit(h, _FakeTransport("10.0.0.1"), loop) for h in admitted)
        for _ in range(500):  # one client over its cap, many times
            refused = _FakeTransport("10.0.0.1")
            assert not limiter.admit(object(), refused, loop)
        assert refused.closed and refused.written.startswith(b"HTTP/1.1 503")
        assert json.loads(refused.written.split(b"\r\n\r\n", 1)[1])["error"]["status"] == 503
        assert limiter.admit(object(), _FakeTransport("10.0.0.2"), loop)  # another client has its own budget
        part = health.get("api")
        assert part is not None and part.state == "degraded" and "max_connections_per_client = 2" in part.detail
        # accept() out of descriptors, reported through the loop's exception handler: counted, no new line
        limiter.install(loop)
        for _ in range(100):
            loop.call_exception_handler({"message": ACCEPT_ERROR_MESSAGE,
                                         "exception": OSError(errno.EMFILE, "Too many open files")})
        assert limiter.accept_errors_total == 100 and limiter.rejected_total == 500
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        now[0] += 5.0
        limiter.poll()
        assert health.get("api").state == "degraded"  # type: ignore[union-attr]
        now[0] += 10.0
        limiter.poll()
        assert health.get("api").state == "ok"  # type: ignore[union-attr]
        assert "600 connection(s)" in health.get("api").detail  # type: ignore[union-attr]
        recovered = [r for r in caplog.records if "api recovered" in r.getMessage()]
        assert len(recovered) == 1
        for h in admitted:
            limiter.release(h)
        assert limiter.counters()["http_connections_open"] == 1.0
        assert limiter.counters()["http_connections_rejected_total"] == 500.0
    finally:
        loop.close()
