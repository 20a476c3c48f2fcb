"""The HTTP API's connections: caps, the request-head deadline, the open-files limit,
and aiohttp's parser errors answered as the API's JSON errors.

Connections, checked when one is accepted (``ConnectionLimiter``): at most ``[http]
max_connections`` open at once (lowered to fit the open-files limit, which the daemon
raises to its hard limit at start: ``raise_nofile_limit``, ``fitting_max_connections``)
and ``[http] max_connections_per_client`` per peer address (per uid on the Unix
socket); a connection over a cap is answered 503 and closed at once. A connection that
has not sent a whole request head within ``[http] header_timeout_s`` is closed
(aiohttp has no such deadline of its own). Refusals put the ``api`` health part in
degraded for the episode (logged once, with the count on recovery); an ``accept()``
that fails (out of descriptors) is counted and logged once per episode, not once a
second with a traceback.

Requests that aiohttp's HTTP parser refuses (a request line over
``PARSER_MAX_LINE_BYTES``, a header over ``PARSER_MAX_FIELD_BYTES``, not HTTP at all)
get a JSON 400 (``start_runner``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import struct
import time
from http import HTTPStatus
from typing import Any, Callable

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

from .api_requests import MAX_URL_BYTES, error_response
from .health import HealthBoard

log = logging.getLogger("wattprint.api")

# aiohttp's own parser limits (its defaults are 8190): a longer request line or header
# line is refused before routing, with a JSON 400 (see start_runner).
PARSER_MAX_LINE_BYTES = 2 * MAX_URL_BYTES
PARSER_MAX_FIELD_BYTES = 8190
# Descriptors kept free of HTTP connections for the store, the sources, /proc and threads.
RESERVED_FDS = 256
EPISODE_QUIET_S = 10.0  # an episode of refused connections ends after this long without one
HEALTH_PART = "api"
ACCEPT_ERROR_MESSAGE = "socket.accept() out of system resource"  # asyncio's context message

PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def raise_nofile_limit() -> tuple[int, int, int]:
    """Raise the soft open-files limit to the hard limit: (soft before, soft now, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft, hard
        return soft, target, hard
    return soft, soft, hard


def fitting_max_connections(max_connections: int, soft_nofile: int | None = None) -> int:
    """``max_connections`` lowered so that the open connections leave ``RESERVED_FDS``
    descriptors (and half of the rest) for everything else the daemon opens."""
    if soft_nofile is None:
        soft_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_nofile == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, (soft_nofile - RESERVED_FDS) // 2))


def _peer_key(transport: asyncio.BaseTransport) -> str:
    """The limit key of a new connection: "uid:<uid>" on a Unix socket (SO_PEERCRED),
    else "ip:<peer address>"."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            _pid, uid, _gid = PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size))
            return f"uid:{uid}"
        except OSError:
            return "uid:?"
    peer = transport.get_extra_info("peername")
    return f"ip:{peer[0]}" if isinstance(peer, (tuple, list)) and peer else "ip:?"


class ConnectionLimiter:
    """Caps on open connections (total and per client), the request-head deadline,
    and the episodes of refused connections and failed ``accept()`` calls.

    Runs on the event loop only. An episode starts with the first refusal (or accept
    error): the ``api`` health part is degraded with the reason, logged once; it ends
    ``EPISODE_QUIET_S`` after the last one (``poll``), logged once with the count."""

    def __init__(self, max_total: int, max_per_client: int, header_timeout_s: float,
                 health: HealthBoard | None = None, clock: Callable[[], float] = time.monotonic):
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.header_timeout_s = header_timeout_s
        self.health = health
        self._clock = clock
        self._conns: dict[Any, tuple[str, asyncio.TimerHandle | None]] = {}  # handler -> (key, deadline)
        self._per_client: dict[str, int] = {}
        self.rejected_total = 0
        self.header_timeouts_total = 0
        self.accept_errors_total = 0
        self._episode_since: float | None = None
        self._episode_count = 0
        self._last_trouble = 0.0
        if health is not None:
            health.register(HEALTH_PART)

    @property
    def open_total(self) -> int:
        return len(self._conns)

    def admit(self, handler: Any, transport: asyncio.BaseTransport, loop: asyncio.AbstractEventLoop) -> bool:
        """Count a new connection in, or answer 503, close it and return False."""
        key = _peer_key(transport)
        held = self._per_client.get(key, 0)
        if len(self._conns) >= self.max_total:
            reason = f"{len(self._conns)} connections open ([http] max_connections = {self.max_total})"
        elif held >= self.max_per_client:
            reason = (f"client {key.split(':', 1)[1]} holds {held} connections "
                      f"([http] max_connections_per_client = {self.max_per_client})")
        else:
            self._per_client[key] = held + 1
            deadline = loop.call_later(self.header_timeout_s, self._head_deadline, handler) \
                if self.header_timeout_s > 0 else None
            self._conns[handler] = (key, deadline)
            return True
        self.rejected_total += 1
        self._trouble(f"refusing new connections: {reason}; counted in wattprint_http_connections_rejected_total")
        body = json.dumps({"error": {"status": 503, "message": "too many connections (" + reason + ")"}}).encode()
        try:
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"  # type: ignore[attr-defined]
                            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        finally:
            transport.close()
        return False

    def release(self, handler: Any) -> None:
        known = self._conns.pop(handler, None)
        if known is None:
            return
        key, deadline = known
        if deadline is not None:
            deadline.cancel()
        left = self._per_client.get(key, 1) - 1
        if left > 0:
            self._per_client[key] = left
        else:
            self._per_client.pop(key, None)

    def _head_deadline(self, handler: Any) -> None:
        """``header_timeout_s`` after a connection opened: close it unless it has sent
        a whole request head (or is gone)."""
        known = self._conns.get(handler)
        if known is None:
            return
        self._conns[handler] = (known[0], None)
        if getattr(handler, "_request_count", 1) == 0:
            self.header_timeouts_total += 1
            log.debug("closed a connection from %s: no request head within %g s", known[0], self.header_timeout_s)
            handler.force_close()

    def accept_failed(self, exc: BaseException | None) -> None:
        """``accept()`` failed for lack of a resource (asyncio retries in a second)."""
        self.accept_errors_total += 1
        why = getattr(exc, "strerror", None) or (type(exc).__name__ if exc else "unknown error")
        self._trouble(f"accept() of new connections is failing: {why} (open-files limit "
                      f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]}); counted in wattprint_http_accept_errors_total")

    def _trouble(self, detail: str) -> None:
        self._last_trouble = self._clock()
        self._episode_count += 1
        if self._episode_since is not None:
            return  # one log line per episode
        self._episode_since = self._last_trouble
        if self.health is not None:
            self.health.fail(HEALTH_PART, detail)
        else:
            log.warning("api degraded: %s", detail)

    def poll(self) -> None:
        """End the episode once nothing was refused for ``EPISODE_QUIET_S``."""
        if self._episode_since is None or self._clock() - self._last_trouble < EPISODE_QUIET_S:
            return
        summary = (f"{self._episode_count} connection(s) refused or failed to accept over "
                   f"{self._last_trouble - self._episode_since:.0f} s")
        self._episode_since = None
        self._episode_count = 0
        if self.health is not None:
            self.health.ok(HEALTH_PART, f"last episode: {summary}")
        else:
            log.info("api recovered: %s", summary)

    def counters(self) -> dict[str, float]:
        """Self-metrics (``wattprint_<key>``)."""
        return {
            "http_connections_open": float(len(self._conns)),
            "http_max_connections": float(self.max_total),
            "http_connections_rejected_total": float(self.rejected_total),
            "http_header_timeouts_total": float(self.header_timeouts_total),
            "http_accept_errors_total": float(self.accept_errors_total),
        }

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Route asyncio's accept-error reports here (other reports go where they went)."""
        previous = loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            if context.get("message") == ACCEPT_ERROR_MESSAGE:
                self.accept_failed(context.get("exception"))
            elif previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)


class _JsonErrorRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering what its HTTP parser refuses (and any
    failure outside the middlewares) with the API's JSON error instead of text."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        limiter: ConnectionLimiter | None = getattr(self._manager, "wattprint_limiter", None)
        if limiter is not None and not limiter.admit(self, transport, self._loop):
            return  # answered 503 and closed; nothing started
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        limiter: ConnectionLimiter | None = getattr(self._manager, "wattprint_limiter", None)
        if limiter is not None:
            limiter.release(self)
        super().connection_lost(exc)

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            log.error("HTTP request failed outside the API handlers", exc_info=exc)
        else:
            log.debug("refused a malformed HTTP request (%s): %s", status, type(exc).__name__ if exc else message)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send the error")
        if status >= 500:
            text = "internal error (logged)"
        elif isinstance(exc, LineTooLong):
            text = (f"request line or header too long (request line at most {PARSER_MAX_LINE_BYTES} bytes, "
                    f"header at most {PARSER_MAX_FIELD_BYTES} bytes)")
        else:
            try:
                text = f"malformed HTTP request ({HTTPStatus(status).phrase})"
            except ValueError:
                text = "malformed HTTP request"
        resp = error_response(status, text)
        resp.force_close()
        return resp


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        handler = super().__call__()
        if type(handler) is RequestHandler:
            handler.__class__ = _JsonErrorRequestHandler
        return handler


async def start_runner(app: web.Application, limiter: ConnectionLimiter | None = None) -> web.AppRunner:
    """An AppRunner, set up, whose connections answer parser errors with JSON and,
    with a ``limiter``, are capped and must send their request head in time."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    server = runner.server
    if type(server) is web.Server:
        try:
            server.__class__ = _JsonErrorServer
        except TypeError:  # pragma: no cover - a future aiohttp with another layout
            log.debug("aiohttp parser errors stay plain text: cannot wrap %r", server)
    if limiter is not None:
        if type(server) is not _JsonErrorServer:  # pragma: no cover - see above
            raise RuntimeError("cannot cap HTTP connections with this aiohttp version")
        server.wattprint_limiter = limiter  # type: ignore[union-attr]
        limiter.install(asyncio.get_running_loop())
    return runner
