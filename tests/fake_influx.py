"""A scripted stand-in for InfluxDB's write endpoints, for fault tests.

Serves ``POST /write`` (v1), ``POST /api/v2/write`` (v2), ``POST /query`` and a
``/login`` page (200, HTML: what a login proxy redirects to) on a free loopback port,
inside the test's own event loop. Each write request is answered by the next entry of
``script`` (a ``Reply``, or a function of the request's lines returning one), then by
``rule`` (a function of the lines), else 204. Every request is recorded (path, query,
headers, decompressed lines, status); the lines of requests answered 204 (what InfluxDB
stores) are collected in ``accepted``, in arrival order: a scripted 200 or 3xx stands
for a proxy's page, which stores nothing.

``Reply(delay_s=...)`` hangs before answering; a hang cut short by ``stop()`` (the
client gave up long before) records the request as ``hung`` and accepts nothing.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Union

from aiohttp import web

LOOPBACK = "127.0.0.1"
LOGIN_PAGE = "<!doctype html><html><head><title>Sign in</title></head><body><form>…</form></body></html>"


@dataclass(frozen=True)
class Reply:
    status: int = 204
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


def error(status: int, message: str, **headers: str) -> Reply:
    """An InfluxDB-style JSON error answer."""
    return Reply(status, json.dumps({"error": message}), dict(headers))


Rule = Callable[[list[str]], Union[Reply, None]]
ScriptEntry = Union[Reply, Rule]


@dataclass
class Request:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    lines: list[str]
    at_s: float  # time.monotonic() when it arrived
    status: int | None = None
    hung: bool = False


class FakeInflux:
    """See the module docstring. ``await start()`` -> base URL; ``await stop()``."""

    def __init__(self) -> None:
        self.script: deque[ScriptEntry] = deque()
        self.rule: Rule | None = None
        self.requests: list[Request] = []
        self.queries: list[Request] = []
        self.accepted: list[str] = []
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._release = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def writes(self) -> list[Request]:
        return [r for r in self.requests if r.path.endswith("/write")]

    def push(self, *entries: ScriptEntry) -> None:
        self.script.extend(entries)

    async def start(self, port: int = 0) -> str:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/write", self._write)
        app.router.add_post("/api/v2/write", self._write)
        app.router.add_post("/query", self._query)
        app.router.add_route("*", "/login", self._login)  # where a scripted redirect can point
        self._release = asyncio.Event()
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOOPBACK, port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.url

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _body_lines(self, request: web.Request) -> list[str]:
        raw = await request.read()  # aiohttp already undoes Content-Encoding: gzip
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8")
        return text.split("\n") if text else []

    def _next_reply(self, lines: list[str]) -> Reply:
        while self.script:
            entry = self.script.popleft()
            reply = entry if isinstance(entry, Reply) else entry(lines)
            if reply is not None:
                return reply
        if self.rule is not None:
            reply = self.rule(lines)
            if reply is not None:
                return reply
        return Reply(204)

    async def _write(self, request: web.Request) -> web.Response:
        lines = await self._body_lines(request)
        record = Request(request.path, dict(request.query), dict(request.headers), lines, time.monotonic())
        self.requests.append(record)
        reply = self._next_reply(lines)
        record.status = reply.status
        if reply.delay_s > 0:
            try:
                await asyncio.wait_for(self._release.wait(), timeout=reply.delay_s)
                record.hung = True  # released by stop(): the client is long gone
                raise web.HTTPServiceUnavailable()
            except asyncio.TimeoutError:
                pass
        if reply.status == 204:
            self.accepted.extend(lines)
        if "Content-Type" in reply.headers:  # e.g. a proxy's text/html page
            return web.Response(status=reply.status, body=reply.body.encode(), headers=reply.headers)
        return web.Response(status=reply.status, text=reply.body or None, headers=reply.headers,
                            content_type="application/json" if reply.body else None)

    async def _login(self, request: web.Request) -> web.Response:
        """A login page, as a proxy in front of InfluxDB serves it: 200, HTML, stores nothing."""
        self.requests.append(Request(request.path, dict(request.query), dict(request.headers), [], time.monotonic(), 200))
        return web.Response(status=200, text=LOGIN_PAGE, content_type="text/html")

    async def _query(self, request: web.Request) -> web.Response:
        form = await request.post()
        record = Request(request.path, {k: str(v) for k, v in form.items()}, dict(request.headers), [], time.monotonic(), 200)
        self.queries.append(record)
        return web.json_response({"results": [{"statement_id": 0}]})
