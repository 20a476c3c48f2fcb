"""A local aiohttp server that stands in for the grid-intensity APIs in tests.

It serves recorded response bodies from ``tests/fixtures/grid`` (see PROVENANCE.md
there) and scripted synthetic replies on paths shaped like each real API:

- Energi Data Service: ``/dataset/{name}``                       → route ``eds:{name}``
- UK Carbon Intensity: ``/intensity/{from}/{to}``                 → ``uk:national``
  ``/regional/intensity/{from}/{to}/regionid/{id}``               → ``uk:regionid``
  ``/regional/intensity/{from}/{to}/postcode/{outcode}``          → ``uk:postcode``
- Electricity Maps v3: ``/v3/carbon-intensity/{latest|history|past-range|forecast}``
                                                                  → ``em:{kind}``

Every request is recorded (route, path, path parameters, query, headers) so tests can
assert what the client sent. ``set(route, reply)`` fixes a route's reply;
``script(route, *replies)`` queues one-shot replies (faults: status codes, delays, HTML,
empty bodies) served before it. With ``em_token`` set, Electricity Maps routes answer
401 unless the ``auth-token`` header matches, as the real API does.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "grid"


def fixture_path(name: str) -> Path:
    return FIXTURES / name


def fixture_bytes(name: str) -> bytes:
    return fixture_path(name).read_bytes()


def fixture_json(name: str) -> Any:
    return json.loads(fixture_bytes(name))


@dataclass
class Reply:
    """One HTTP answer. ``body`` may be bytes, str, or JSON-able data."""

    status: int = 200
    body: bytes | str | dict[str, Any] | list[Any] = b""
    content_type: str | None = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # sleep before answering (for timeouts)

    @classmethod
    def fixture(cls, name: str, status: int = 200) -> "Reply":
        """A recorded body from the fixtures folder, byte for byte."""
        return cls(status=status, body=fixture_bytes(name))

    @classmethod
    def json(cls, data: Any, status: int = 200, **kw: Any) -> "Reply":
        return cls(status=status, body=json.dumps(data).encode(), **kw)

    def encoded(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode("utf-8")
        return json.dumps(self.body).encode()


@dataclass(frozen=True)
class Seen:
    """A request the server received."""

    route: str
    path: str
    params: dict[str, str]  # path parameters: from, to, id, outcode, dataset, kind
    query: dict[str, str]
    headers: dict[str, str]


_ROUTES: list[tuple[str, re.Pattern[str]]] = [
    ("eds", re.compile(r"^/dataset/(?P<dataset>[A-Za-z0-9_]+)/?$")),
    ("uk:regionid", re.compile(r"^/regional/intensity/(?P<from>[^/]+)/(?P<to>[^/]+)/regionid/(?P<id>\d+)/?$")),
    ("uk:postcode", re.compile(r"^/regional/intensity/(?P<from>[^/]+)/(?P<to>[^/]+)/postcode/(?P<outcode>[A-Za-z0-9]+)/?$")),
    ("uk:national", re.compile(r"^/intensity/(?P<from>[^/]+)/(?P<to>[^/]+)/?$")),
    ("em", re.compile(r"^/v3/carbon-intensity/(?P<kind>latest|history|past-range|forecast)/?$")),
]


class GridServer:
    """``async with GridServer() as srv:`` then point a provider at ``srv.url``."""

    def __init__(self, *, em_token: str | None = None) -> None:
        self.em_token = em_token
        self.requests: list[Seen] = []
        self._defaults: dict[str, Reply] = {}
        self._scripted: dict[str, deque[Reply]] = defaultdict(deque)
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- scripting -------------------------------------------------------------------

    def set(self, route: str, reply: Reply) -> None:
        self._defaults[route] = reply

    def script(self, route: str, *replies: Reply) -> None:
        self._scripted[route].extend(replies)

    def seen(self, route: str) -> list[Seen]:
        return [r for r in self.requests if r.route == route]

    # -- serving ---------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        route, params = "unknown", {}
        for name, pattern in _ROUTES:
            m = pattern.match(request.path)
            if m:
                params = dict(m.groupdict())
                if name == "eds":
                    route = f"eds:{params['dataset']}"
                elif name == "em":
                    route = f"em:{params['kind']}"
                else:
                    route = name
                break
        self.requests.append(Seen(route=route, path=request.path, params=params,
                                  query=dict(request.query), headers={k.lower(): v for k, v in request.headers.items()}))
        if route.startswith("em:") and self.em_token is not None and request.headers.get("auth-token") != self.em_token:
            return web.json_response({"status": "error", "message": "Invalid auth-token"}, status=401)
        if self._scripted[route]:
            reply = self._scripted[route].popleft()
        elif route in self._defaults:
            reply = self._defaults[route]
        else:
            return web.json_response({"error": f"no reply scripted for {route} ({request.path})"}, status=404)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        headers = dict(reply.headers)
        if reply.content_type is not None:
            headers["Content-Type"] = reply.content_type
        return web.Response(status=reply.status, body=reply.encoded(), headers=headers)

    async def start(self) -> "GridServer":
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> "GridServer":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
