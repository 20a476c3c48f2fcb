"""The HTTP API (aiohttp): health, Prometheus metrics and per-job totals as JSON.

Every error is JSON ``{"error": {"status": N, "message": "..."}}`` with a 4xx status;
an unexpected failure is logged and answered with a generic 500 message, never a
traceback. Store reads run off the event loop. An optional bearer token (``[http]
token``) is compared in constant time.

Limits, checked before anything else is done for a request: a per-client token
bucket (``[http] rate_limit_per_s``, keyed by the peer address, or by the caller's
uid on the Unix socket; 429 with ``Retry-After``), the request target (path and
query, ``MAX_URL_BYTES``; 414), the body (``[http] max_request_bytes``; 413) and the
time a request may take (``REQUEST_TIMEOUT_S``; 503).

Connections (caps, the request-head deadline, parser errors as JSON) are
``api_server``'s; query parsing and the JSON answers ``api_requests``'; the job, series
and host objects are built in ``api_views``.

On the Unix socket (``[http] socket``) the kernel tells the daemon who is calling
(``SO_PEERCRED``): a caller other than root sees only the jobs of its own uid (the
list is filtered; another user's job id answers 404). ``/metrics`` and ``/healthz``
are the same as over TCP, bearer token included.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import socket
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Hashable

from aiohttp import web

from . import __version__
from .api_requests import (  # noqa: F401  (re-exported: the names callers import from here)
    JOB_STATES,
    MAX_FILTER_CHARS,
    MAX_JOB_ID_CHARS,
    MAX_LIMIT,
    MAX_URL_BYTES,
    BadRequest,
    error_response,
    json_response,
    parse_job_filters,
    parse_time,
    shown,
    utf8_text,
)
from .api_server import (  # noqa: F401  (re-exported: the names callers import from here)
    ACCEPT_ERROR_MESSAGE,
    PARSER_MAX_FIELD_BYTES,
    PARSER_MAX_LINE_BYTES,
    PEERCRED,
    RESERVED_FDS,
    ConnectionLimiter,
    fitting_max_connections,
    raise_nofile_limit,
    start_runner,
)
from .api_views import JobViews
from .carbon import IntensityBook
from .config import redact_text
from .model import Snapshot
from .report import label_note

log = logging.getLogger("wattprint.api")

REQUEST_TIMEOUT_S = 30.0  # a request still being handled after this answers 503
KEEPALIVE_TIMEOUT_S = 15.0  # idle keep-alive connections are closed after this
MAX_RATE_CLIENTS = 10_000  # token buckets kept; the least recently seen client is forgotten first
SOCKET_TOKEN_PATHS = frozenset({"/metrics", "/healthz"})  # need the bearer token on the Unix socket too


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


def peer_uid(request: web.BaseRequest) -> int | None:
    """The uid of the process at the other end of a Unix-socket request (None over
    TCP). Raises OSError when the kernel does not say."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("the client has gone")
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    _pid, uid, _gid = PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size))
    return uid


def _route(request: web.Request) -> str | None:
    """The path template of the route the request matched (None when none did)."""
    route = getattr(request.match_info, "route", None)
    resource = getattr(route, "resource", None)
    return getattr(resource, "canonical", None)


class Api:
    """Routes of the HTTP API over a snapshot getter and a store reader."""

    def __init__(self, get_snapshot: Callable[[], Snapshot | None], reader: JobViews,
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
            return json_response({"status": "starting", "parts": []}, status=503)
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
        return json_response(body, status=503 if stale else 200)

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
        return json_response({"jobs": [self._with_note(j) for j in jobs], "count": len(jobs)})

    def _own_jobs(self, uid: int, filters: dict[str, Any], now: float) -> list[dict[str, Any]]:
        """The jobs of ``uid`` only (the store filters by uid)."""
        return self.reader.jobs(now=now, uid=uid, **filters)

    def _job_id(self, request: web.Request) -> str:
        job_id = request.match_info["id"]
        if len(job_id) > MAX_JOB_ID_CHARS:
            raise BadRequest(f"job id longer than {MAX_JOB_ID_CHARS} characters")
        return utf8_text("job id", job_id)

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
            return error_response(404, f"no job with id {shown(job_id)}")
        self._with_note(job)
        job["carbon_hint"] = self.book.hint(job["energy_j"]["total"], job["duration_s"], job["co2e_g"], self.pue, now) \
            if self.book is not None else None
        return json_response(job)

    async def job_series(self, request: web.Request) -> web.Response:
        job_id = self._job_id(request)
        job = await self._visible_job(request, job_id, time.time())
        if job is None:
            return error_response(404, f"no job with id {shown(job_id)}")
        series = await self._off_loop(self.reader.job_series, job_id)
        return json_response({"id": job_id, "bucket_s": self.bucket_s, "buckets": series})

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
            return json_response({"zone": "", "provider": "", "points": [], "current": None})
        points = await self._off_loop(self.reader.intensity, self.book.provider, self.book.zone, since, until)
        current = self.book.lookup(now)
        return json_response({
            "zone": self.book.zone,
            "provider": self.book.provider,
            "points": [{"start": p["start"], "end": p["end"], "g_per_kwh": p["g_per_kwh"], "kind": p["kind"]}
                       for p in points],
            "current": {"g_per_kwh": current.g_per_kwh, "status": current.status, "basis": current.basis},
        })

    async def openapi(self, request: web.Request) -> web.Response:
        from .openapi import openapi_spec  # openapi.py reads this module's limits

        return json_response(openapi_spec())

    async def host(self, request: web.Request) -> web.Response:
        totals = await self._off_loop(self.reader.host_totals)
        snap = self.get_snapshot()
        totals["power_w"] = [{"kind": d.kind, "device": d.device, "name": d.name, "power_w": d.power_w,
                              "source": d.source} for d in snap.devices] if snap else []
        totals["host"] = self.host_name
        totals["version"] = __version__
        return json_response(totals)
