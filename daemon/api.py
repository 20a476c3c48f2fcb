"""The HTTP API (aiohttp): health, Prometheus metrics and per-job totals as JSON.

Every error is JSON ``{"error": {"status": N, "message": "..."}}`` with a 4xx status;
an unexpected failure is logged and answered with a generic 500 message, never a
traceback. Store reads run off the event loop. An optional bearer token (``[http]
token``) is compared in constant time.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, Awaitable, Callable

from aiohttp import web

from .carbon import IntensityBook
from .ledger import LedgerReader
from .model import Snapshot

log = logging.getLogger("wattprint.api")

MAX_LIMIT = 10_000
JOB_STATES = ("running", "finished")


class BadRequest(Exception):
    pass


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, allow_nan=False, default=str), status=status,
                        content_type="application/json")


def error_response(status: int, message: str) -> web.Response:
    return _json({"error": {"status": status, "message": message}}, status=status)


def parse_time(name: str, value: str) -> float:
    """Seconds since epoch, or an ISO 8601 date-time (naive means UTC)."""
    value = value.strip()
    try:
        t = float(value)
    except ValueError:
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise BadRequest(f"{name}: {value!r} is neither seconds since epoch nor an ISO 8601 time") from None
        if dt.tzinfo is None:
            from datetime import timezone
            dt = dt.replace(tzinfo=timezone.utc)
        return dt.timestamp()
    if not math.isfinite(t) or t < 0:
        raise BadRequest(f"{name}: {value!r} is not a valid time")
    return t


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
            if len(query[key]) > 1024:
                raise BadRequest(f"{key}: longer than 1024 characters")
            out[key] = query[key]
    limit = query.get("limit")
    if limit is not None:
        try:
            n = int(limit)
        except ValueError:
            raise BadRequest(f"limit: {limit!r} is not an integer") from None
        if not 1 <= n <= MAX_LIMIT:
            raise BadRequest(f"limit: {n} is outside 1..{MAX_LIMIT}")
        out["limit"] = n
    return out


class Api:
    """Routes of the HTTP API over a snapshot getter and a store reader."""

    def __init__(self, get_snapshot: Callable[[], Snapshot | None], reader: LedgerReader,
                 render_metrics: Callable[[], tuple[bytes, str]], *, host: str, bucket_s: int,
                 token: str = "", interval_s: float = 1.0, book: IntensityBook | None = None,
                 pue: float = 1.0):
        self.book = book
        self.pue = pue
        self.host_name = host
        self.bucket_s = bucket_s
        self.get_snapshot = get_snapshot
        self.reader = reader
        self.render_metrics = render_metrics
        self.token = token
        self.interval_s = interval_s
        self._executor = ThreadPoolExecutor(2, thread_name_prefix="wattprint-api")

    async def _off_loop(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._auth], client_max_size=64 * 1024)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/api/v1/jobs", self.jobs)
        app.router.add_get("/api/v1/jobs/{id}", self.job)
        app.router.add_get("/api/v1/jobs/{id}/series", self.job_series)
        app.router.add_get("/api/v1/host", self.host)
        app.router.add_get("/api/v1/intensity", self.intensity)
        app.router.add_get("/api/v1/openapi.json", self.openapi)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _cleanup(self, _app: web.Application) -> None:
        self._executor.shutdown(wait=False)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            return await handler(request)
        except BadRequest as exc:
            return error_response(400, str(exc))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = {404: "no such endpoint", 405: "method not allowed"}.get(exc.status, exc.reason)
            return error_response(exc.status, message)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request %s %s failed", request.method, request.path)
            return error_response(500, "internal error (logged)")

    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if self.token:
            given = request.headers.get("Authorization", "")
            expected = f"Bearer {self.token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
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
            "parts": [{"name": h.name, "state": h.state, "detail": h.detail, "errors_total": h.errors_total,
                       "since": h.since} for h in snap.health],
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
        jobs = await self._off_loop(self.reader.jobs, now=time.time(), **filters)
        return _json({"jobs": jobs, "count": len(jobs)})

    def _job_id(self, request: web.Request) -> str:
        job_id = request.match_info["id"]
        if len(job_id) > 128:
            raise BadRequest("job id longer than 128 characters")
        return job_id

    async def job(self, request: web.Request) -> web.Response:
        job_id = self._job_id(request)
        now = time.time()
        job = await self._off_loop(self.reader.job, job_id, now=now)
        if job is None:
            return error_response(404, f"no job with id {job_id!r}")
        job["carbon_hint"] = self.book.hint(job["energy_kwh"], job["duration_s"], job["co2e_g"], self.pue, now) \
            if self.book is not None else None
        return _json(job)

    async def job_series(self, request: web.Request) -> web.Response:
        job_id = self._job_id(request)
        job = await self._off_loop(self.reader.job, job_id, now=time.time())
        if job is None:
            return error_response(404, f"no job with id {job_id!r}")
        series = await self._off_loop(self.reader.job_series, job_id)
        return _json({"id": job_id, "bucket_s": self.bucket_s, "buckets": series})

    async def intensity(self, request: web.Request) -> web.Response:
        allowed = {"since", "until"}
        unknown = sorted(set(request.query.keys()) - allowed)
        if unknown:
            raise BadRequest(f"unknown parameter(s): {', '.join(unknown)} (allowed: since, until)")
        now = time.time()
        since = parse_time("since", request.query["since"]) if "since" in request.query else now - 86400
        until = parse_time("until", request.query["until"]) if "until" in request.query else now + 2 * 86400
        if since > until:
            raise BadRequest("since is after until")
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
        return _json(totals)
