"""The HTTP API (aiohttp): health, Prometheus metrics and per-job totals as JSON.

Every error is JSON ``{"error": {"status": N, "message": "..."}}`` with a 4xx status;
an unexpected failure is logged and answered with a generic 500 message, never a
traceback. Store reads run off the event loop. An optional bearer token (``[http]
token``) is compared in constant time.

Limits, checked before anything else is done for a request: a per-client token
bucket (``[http] rate_limit_per_s``, keyed by the peer address, or by the caller's
uid on the Unix socket; 429 with ``Retry-After``), the request target (path and
query, ``MAX_URL_BYTES``; 414), the body (``[http] max_request_bytes``; 413) and the
time a request may take (``REQUEST_TIMEOUT_S``; 503). Requests that aiohttp's HTTP
parser refuses (a request line over ``PARSER_MAX_LINE_BYTES``, a header over
``PARSER_MAX_FIELD_BYTES``, not HTTP at all) get a JSON 400 too (``start_runner``).

Connections, checked when one is accepted (``ConnectionLimiter``): at most ``[http]
max_connections`` open at once (lowered to fit the open-files limit, which the daemon
raises to its hard limit at start) and ``[http] max_connections_per_client`` per peer
address (per uid on the Unix socket); a connection over a cap is answered 503 and
closed at once. A connection that has not sent a whole request head within ``[http]
header_timeout_s`` is closed (aiohttp has no such deadline of its own). Refusals put
the ``api`` health part in degraded for the episode (logged once, with the count on
recovery); an ``accept()`` that fails (out of descriptors) is counted and logged once
per episode, not once a second with a traceback.

On the Unix socket (``[http] socket``) the kernel tells the daemon who is calling
(``SO_PEERCRED``): a caller other than root sees only the jobs of its own uid (the
list is filtered; another user's job id answers 404). ``/metrics`` and ``/healthz``
are the same as over TCP, bearer token included.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import resource
import socket
import struct
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from typing import Any, Awaitable, Callable, Hashable

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

from . import __version__
from .carbon import IntensityBook
from .config import redact_text
from .health import HealthBoard
from .ledger import LedgerReader
from .model import Snapshot
from .report import label_note

log = logging.getLogger("wattprint.api")

MAX_LIMIT = 10_000
JOB_STATES = ("running", "finished")
MAX_FILTER_CHARS = 1024  # label= and user= filters
MAX_JOB_ID_CHARS = 128
# The request target (path + query, percent-encoded, as sent). Every request the
# OpenAPI document allows fits: two 1024-character filters of 4-byte UTF-8 characters
# percent-encoded are 24 KiB.
MAX_URL_BYTES = 32 * 1024
# aiohttp's own parser limits (its defaults are 8190): a longer request line or header
# line is refused before routing, with a JSON 400 (see start_runner).
PARSER_MAX_LINE_BYTES = 2 * MAX_URL_BYTES
PARSER_MAX_FIELD_BYTES = 8190
REQUEST_TIMEOUT_S = 30.0  # a request still being handled after this answers 503
KEEPALIVE_TIMEOUT_S = 15.0  # idle keep-alive connections are closed after this
MAX_RATE_CLIENTS = 10_000  # token buckets kept; the least recently seen client is forgotten first
SOCKET_TOKEN_PATHS = frozenset({"/metrics", "/healthz"})  # need the bearer token on the Unix socket too
# Descriptors kept free of HTTP connections for the store, the sources, /proc and threads.
RESERVED_FDS = 256
EPISODE_QUIET_S = 10.0  # an episode of refused connections ends after this long without one
HEALTH_PART = "api"
ACCEPT_ERROR_MESSAGE = "socket.accept() out of system resource"  # asyncio's context message

_UNSIGNED_INT = re.compile(r"[0-9]{1,18}")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|\.[0-9]+(?:[eE][-+]?[0-9]+)?")


class BadRequest(Exception):
    pass


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, allow_nan=False, default=str), status=status,
                        content_type="application/json")


def error_response(status: int, message: str) -> web.Response:
    return _json({"error": {"status": status, "message": message}}, status=status)


def _shown(value: str, limit: int = 80) -> str:
    """A client's value for an error message: repr'd, and cut when long."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} characters)"


def parse_time(name: str, value: str) -> float:
    """Seconds since epoch (decimal digits, optionally a fraction and an exponent), or
    an ISO 8601 date-time (naive means UTC)."""
    value = value.strip()
    if _DECIMAL.fullmatch(value):
        t = float(value)
        if not math.isfinite(t):
            raise BadRequest(f"{name}: {_shown(value)} is not a valid time")
        return t
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00")) if value.isascii() else None
    except ValueError:
        dt = None
    if dt is None:
        raise BadRequest(f"{name}: {_shown(value)} is neither seconds since epoch nor an ISO 8601 time")
    if dt.tzinfo is None:
        from datetime import timezone
        dt = dt.replace(tzinfo=timezone.utc)
    try:
        return dt.timestamp()
    except (OverflowError, OSError, ValueError):
        raise BadRequest(f"{name}: {_shown(value)} is out of range") from None


def _utf8_text(name: str, value: str) -> str:
    """A query value that is valid text (no lone surrogates from undecodable bytes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{name}: not valid UTF-8") from None
    return value


def parse_job_filters(query: Any) -> dict[str, Any]:
    allowed = {"state", "since", "until", "label", "user", "limit"}
    unknown = sorted(set(query.keys()) - allowed)
    if unknown:
        raise BadRequest(f"unknown parameter(s): {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    out: dict[str, Any] = {}
    for key in query.keys():
        if len(query.getall(key)) > 1:
            raise BadRequest(f"{key}: given more than once")
    state = query.get("state")
    if state is not None:
        if state not in JOB_STATES:
            raise BadRequest(f"state: {state!r} is not one of {', '.join(JOB_STATES)}")
        out["state"] = state
    for key in ("since", "until"):
        if key in query:
            out[key] = parse_time(key, query[key])
    if "since" in out and "until" in out and out["since"] > out["until"]:
        raise BadRequest("since is after until")
    for key in ("label", "user"):
        if key in query:
            if len(query[key]) > MAX_FILTER_CHARS:
                raise BadRequest(f"{key}: longer than {MAX_FILTER_CHARS} characters")
            out[key] = _utf8_text(key, query[key])
    limit = query.get("limit")
    if limit is not None:
        if not _UNSIGNED_INT.fullmatch(limit.strip()):
            raise BadRequest(f"limit: {_shown(limit)} is not an integer")
        n = int(limit)
        if not 1 <= n <= MAX_LIMIT:
            raise BadRequest(f"limit: {n} is outside 1..{MAX_LIMIT}")
        out["limit"] = n
    return out


class RateLimiter:
    """Token buckets per client: ``rate_per_s`` tokens a second, up to ``burst``
    (default: one second's worth, at least 1). ``rate_per_s`` 0 means no limit.
    At most ``max_clients`` buckets are kept (least recently seen dropped first)."""

    def __init__(self, rate_per_s: float, burst: float | None = None, *, max_clients: int = MAX_RATE_CLIENTS,
                 clock: Callable[[], float] = time.monotonic):
        self.rate = float(rate_per_s)
        self.burst = max(1.0, float(burst if burst is not None else rate_per_s))
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def take(self, key: Hashable) -> float:
        """Take one token for ``key``: 0.0 when allowed, else seconds until one is there."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True)
class Caller:
    """Who sent a request: over TCP (``uid`` None) or over the Unix socket."""

    uid: int | None  # the peer's uid on the Unix socket (SO_PEERCRED), None over TCP
    key: str  # rate-limit key: "ip:<address>" or "uid:<uid>"

    @property
    def on_socket(self) -> bool:
        return self.uid is not None

    @property
    def sees_all(self) -> bool:
        """TCP callers and root on the socket see every job."""
        return self.uid is None or self.uid == 0


# Where a request keeps its Caller, found once per request (the peer cannot change,
# but the transport is gone once the client hangs up).
_CALLER_KEY: Any = web.RequestKey("wattprint_caller", Caller) if hasattr(web, "RequestKey") else "wattprint_caller"

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_uid(request: web.BaseRequest) -> int | None:
    """The uid of the process at the other end of a Unix-socket request (None over
    TCP). Raises OSError when the kernel does not say."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("the client has gone")
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    _pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return uid


def _route(request: web.Request) -> str | None:
    """The path template of the route the request matched (None when none did)."""
    route = getattr(request.match_info, "route", None)
    resource = getattr(route, "resource", None)
    return getattr(resource, "canonical", None)


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
            _pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
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


class Api:
    """Routes of the HTTP API over a snapshot getter and a store reader."""

    def __init__(self, get_snapshot: Callable[[], Snapshot | None], reader: LedgerReader,
                 render_metrics: Callable[[], tuple[bytes, str]], *, host: str, bucket_s: int,
                 token: str = "", interval_s: float = 1.0, book: IntensityBook | None = None,
                 pue: float = 1.0, max_request_bytes: int = 65536, rate_limit_per_s: float = 0.0,
                 request_timeout_s: float = REQUEST_TIMEOUT_S, limiter: ConnectionLimiter | None = None,
                 max_labels_per_user: int | None = None, secrets: tuple[str, ...] = ()):
        self.book = book
        self.pue = pue
        self.host_name = host
        self.bucket_s = bucket_s
        self.get_snapshot = get_snapshot
        self.reader = reader
        self.render_metrics = render_metrics
        self.token = token
        self.interval_s = interval_s
        self.max_request_bytes = max_request_bytes
        self.request_timeout_s = request_timeout_s
        self.limiter = RateLimiter(rate_limit_per_s)
        self.connections = limiter
        self.max_labels_per_user = max_labels_per_user
        self.secrets = secrets  # redacted from what /healthz shows
        self._executor = ThreadPoolExecutor(2, thread_name_prefix="wattprint-api")
        self._poller: asyncio.Task[None] | None = None

    async def _off_loop(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._errors, self._limits, self._auth],
            client_max_size=self.max_request_bytes,
            handler_args={"max_line_size": PARSER_MAX_LINE_BYTES, "max_field_size": PARSER_MAX_FIELD_BYTES,
                          "keepalive_timeout": KEEPALIVE_TIMEOUT_S},
        )
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/api/v1/jobs", self.jobs)
        app.router.add_get("/api/v1/jobs/{id}", self.job)
        app.router.add_get("/api/v1/jobs/{id}/series", self.job_series)
        app.router.add_get("/api/v1/host", self.host)
        app.router.add_get("/api/v1/intensity", self.intensity)
        app.router.add_get("/api/v1/openapi.json", self.openapi)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, _app: web.Application) -> None:
        if self.connections is not None:
            self._poller = asyncio.create_task(self._poll_connections())

    async def _poll_connections(self) -> None:
        assert self.connections is not None
        while True:
            await asyncio.sleep(1.0)
            self.connections.poll()

    async def _cleanup(self, _app: web.Application) -> None:
        if self._poller is not None:
            self._poller.cancel()
        self._executor.shutdown(wait=False)

    def _with_note(self, job: dict[str, Any]) -> dict[str, Any]:
        job["label_note"] = label_note(job, self.max_labels_per_user)
        return job

    @staticmethod
    def caller(request: web.Request) -> Caller:
        """Who is calling (raises OSError when a Unix-socket peer cannot be identified)."""
        known = request.get(_CALLER_KEY)
        if known is not None:
            return known
        uid = peer_uid(request)
        who = Caller(uid=None, key=f"ip:{request.remote or '?'}") if uid is None else Caller(uid=uid, key=f"uid:{uid}")
        request[_CALLER_KEY] = who
        return who

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            return await handler(request)
        except BadRequest as exc:
            return error_response(400, str(exc))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = {404: "no such endpoint", 405: "method not allowed",
                       413: f"request body larger than {self.max_request_bytes} bytes"}.get(exc.status, exc.reason)
            resp = error_response(exc.status, message)
            for name in ("Allow", "Retry-After"):
                if name in exc.headers:
                    resp.headers[name] = exc.headers[name]
            return resp
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request %s %s failed", request.method, request.path)
            return error_response(500, "internal error (logged)")

    @web.middleware
    async def _limits(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Rate, request target and body limits, then the handler under a time limit."""
        try:
            who = self.caller(request)
        except ConnectionResetError:
            return error_response(400, "the client has gone")
        except OSError as exc:
            log.warning("cannot identify the peer of a Unix-socket request: %s", exc)
            return error_response(403, "cannot identify the caller (SO_PEERCRED failed)")
        wait = self.limiter.take(who.key)
        if wait > 0:
            resp = error_response(429, f"more than {self.limiter.rate:g} requests per second from this client")
            resp.headers["Retry-After"] = str(max(1, math.ceil(wait)))
            return resp
        if len(request.raw_path.encode("utf-8", "surrogateescape")) > MAX_URL_BYTES:
            return error_response(414, f"request target (path and query) longer than {MAX_URL_BYTES} bytes")
        if request.body_exists:
            length = request.content_length
            if length is not None and length > self.max_request_bytes:
                resp = error_response(413, f"request body larger than {self.max_request_bytes} bytes")
                resp.force_close()  # do not read (or wait for) the rest of the body
                return resp
            try:
                await request.read()  # aiohttp stops at client_max_size and raises 413
            except web.HTTPRequestEntityTooLarge:
                resp = error_response(413, f"request body larger than {self.max_request_bytes} bytes")
                resp.force_close()
                return resp
        try:
            async with asyncio.timeout(self.request_timeout_s) as deadline:
                return await handler(request)
        except TimeoutError:
            if not deadline.expired():
                raise
            log.warning("request %s %s took longer than %g s: answered 503", request.method, request.path,
                        self.request_timeout_s)
            return error_response(503, f"request took longer than {self.request_timeout_s:g} s")

    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        # Over TCP the token guards everything. On the Unix socket the caller's uid
        # decides what /api/v1 shows; /metrics and /healthz (every job) need the token.
        if self.token and (not self.caller(request).on_socket or _route(request) in SOCKET_TOKEN_PATHS):
            given = request.headers.get("Authorization", "")
            expected = f"Bearer {self.token}"
            if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode()):
                return error_response(401, "missing or wrong bearer token")
        return await handler(request)

    async def healthz(self, request: web.Request) -> web.Response:
        snap = self.get_snapshot()
        now = time.time()
        if snap is None:
            return _json({"status": "starting", "parts": []}, status=503)
        stale = now - snap.taken_at > max(5.0, 5 * self.interval_s)
        degraded = [h for h in snap.health if h.state == "degraded"]
        status = "stalled" if stale else ("degraded" if degraded else "ok")
        body = {
            "status": status,
            "tick": snap.tick,
            "last_tick_at": snap.taken_at,
            "last_tick_duration_s": snap.tick_duration_s,
            "parts": [{"name": h.name, "state": h.state, "detail": redact_text(h.detail, self.secrets),
                       "errors_total": h.errors_total, "since": h.since} for h in snap.health],
        }
        return _json(body, status=503 if stale else 200)

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.render_metrics()
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = content_type
        return resp

    async def jobs(self, request: web.Request) -> web.Response:
        filters = parse_job_filters(request.query)
        filters.setdefault("limit", 100)
        who = self.caller(request)
        if who.sees_all:
            jobs = await self._off_loop(self.reader.jobs, now=time.time(), **filters)
        else:
            jobs = await self._off_loop(self._own_jobs, who.uid, filters, time.time())
        return _json({"jobs": [self._with_note(j) for j in jobs], "count": len(jobs)})

    def _own_jobs(self, uid: int, filters: dict[str, Any], now: float) -> list[dict[str, Any]]:
        """The jobs of ``uid`` only (the store filters by uid)."""
        return self.reader.jobs(now=now, uid=uid, **filters)

    def _job_id(self, request: web.Request) -> str:
        job_id = request.match_info["id"]
        if len(job_id) > MAX_JOB_ID_CHARS:
            raise BadRequest(f"job id longer than {MAX_JOB_ID_CHARS} characters")
        return _utf8_text("job id", job_id)

    async def _visible_job(self, request: web.Request, job_id: str, now: float) -> dict[str, Any] | None:
        """The job, or None when there is none or the caller may not see it."""
        job = await self._off_loop(self.reader.job, job_id, now=now)
        if job is None:
            return None
        who = self.caller(request)
        if not who.sees_all and job["uid"] != who.uid:
            return None
        return job

    async def job(self, request: web.Request) -> web.Response:
        job_id = self._job_id(request)
        now = time.time()
        job = await self._visible_job(request, job_id, now)
        if job is None:
            return error_response(404, f"no job with id {_shown(job_id)}")
        self._with_note(job)
        job["carbon_hint"] = self.book.hint(job["energy_kwh"], job["duration_s"], job["co2e_g"], self.pue, now) \
            if self.book is not None else None
        return _json(job)

    async def job_series(self, request: web.Request) -> web.Response:
        job_id = self._job_id(request)
        job = await self._visible_job(request, job_id, time.time())
        if job is None:
            return error_response(404, f"no job with id {_shown(job_id)}")
        series = await self._off_loop(self.reader.job_series, job_id)
        return _json({"id": job_id, "bucket_s": self.bucket_s, "buckets": series})

    async def intensity(self, request: web.Request) -> web.Response:
        allowed = {"since", "until"}
        unknown = sorted(set(request.query.keys()) - allowed)
        if unknown:
            raise BadRequest(f"unknown parameter(s): {', '.join(unknown)} (allowed: since, until)")
        for key in request.query.keys():
            if len(request.query.getall(key)) > 1:
                raise BadRequest(f"{key}: given more than once")
        now = time.time()
        since = parse_time("since", request.query["since"]) if "since" in request.query else None
        until = parse_time("until", request.query["until"]) if "until" in request.query else None
        if since is not None and until is not None and since > until:
            raise BadRequest("since is after until")
        # Defaults: the day before and the two days after now (or after the bound given).
        if since is None:
            since = min(now, until if until is not None else now) - 86400
        if until is None:
            until = max(now, since) + 2 * 86400
        if self.book is None:
            return _json({"zone": "", "provider": "", "points": [], "current": None})
        points = await self._off_loop(self.reader.intensity, self.book.provider, self.book.zone, since, until)
        current = self.book.lookup(now)
        return _json({
            "zone": self.book.zone,
            "provider": self.book.provider,
            "points": [{"start": p["start"], "end": p["end"], "g_per_kwh": p["g_per_kwh"], "kind": p["kind"]}
                       for p in points],
            "current": {"g_per_kwh": current.g_per_kwh, "status": current.status, "basis": current.basis},
        })

    async def openapi(self, request: web.Request) -> web.Response:
        from .openapi import openapi_spec  # openapi.py reads this module's limits

        return _json(openapi_spec())

    async def host(self, request: web.Request) -> web.Response:
        totals = await self._off_loop(self.reader.host_totals)
        snap = self.get_snapshot()
        totals["power_w"] = [{"kind": d.kind, "device": d.device, "name": d.name, "power_w": d.power_w,
                              "source": d.source} for d in snap.devices] if snap else []
        totals["host"] = self.host_name
        totals["version"] = __version__
        return _json(totals)
