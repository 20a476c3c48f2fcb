"""Test helper: an aiohttp reverse proxy in front of a real influxd whose answers to
``POST /write`` a test switches at any moment.

Modes (``FaultProxy.set(mode)``; each stays until the next ``set``):

- ``"forward"``: pass the request to influxd and return its answer (204 when stored);
- ``"500"``: 500 with a JSON error (a failing server);
- ``"400"``: 400 for every write, whatever it holds (InfluxDB refusing everything);
- ``"503"``: 503 with ``Retry-After: <retry_after_s>`` (an outage announced properly);
- ``"302"`` / ``"307"``: a redirect to ``/login``, a page that answers 200 with HTML
  (a login proxy, a moved endpoint);
- ``"html"``: 200 with an HTML body (a captive page that is not InfluxDB);
- ``"hang"``: no answer; the request is never forwarded. A request that hangs keeps
  hanging after the mode changes (as one sent to a stuck server does): it ends when the
  client gives up and closes the connection (its timeout), ``hang_max_s`` passes, or
  ``release()`` is called (the test's cleanup). So a client whose write hung sees a
  timeout, never some other answer because the test moved on meanwhile.

Only ``"forward"`` lets anything reach influxd. The proxy records every answer it gave
(``answers``: ``(mode, status)`` per request) and every line influxd acknowledged with
204 (``delivered``: line -> how many times), so a test can tell what the sink was told.
Serve ``FaultProxy.app()`` with conftest's ``background_app`` fixture and set ``url``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import aiohttp
from aiohttp import web

MODES = ("forward", "500", "400", "503", "302", "307", "html", "hang")
LOGIN_PAGE = "<html><body><form action=/login method=post>Sign in</form></body></html>"


class FaultProxy:
    """The proxy's state; thread-safe (the test thread switches modes while the
    server's loop answers)."""

    def __init__(self, influx_url: str, *, retry_after_s: int = 1, hang_max_s: float = 30.0) -> None:
        self.influx_url = influx_url.rstrip("/")
        self.retry_after_s = retry_after_s
        self.hang_max_s = hang_max_s
        self.url = ""  # the proxy's own base URL, set once it is served
        self._lock = threading.Lock()
        self._mode = "forward"
        self.answers: list[tuple[str, int]] = []
        self.delivered: Counter[str] = Counter()
        self._session: aiohttp.ClientSession | None = None
        self._released = False

    # -- control (test thread) ------------------------------------------------

    @property
    def mode(self) -> str:
        with self._lock:
            return self._mode

    def set(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown proxy mode {mode!r} (known: {', '.join(MODES)})")
        with self._lock:
            self._mode = mode

    def release(self) -> None:
        """End every hanging request now (cleanup: the proxy can stop)."""
        with self._lock:
            self._released = True

    def answer_counts(self) -> Counter[tuple[str, int]]:
        with self._lock:
            return Counter(self.answers)

    def delivered_twice(self) -> list[str]:
        """Lines influxd acknowledged (204) more than once (re-sent after delivery)."""
        with self._lock:
            return [line for line, n in self.delivered.items() if n > 1]

    # -- server (its own loop) --------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/write", self._write)
        app.router.add_route("*", "/login", self._login)
        app.on_cleanup.append(self._close_session)
        return app

    async def _close_session(self, _app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    async def _login(self, request: web.Request) -> web.Response:
        return web.Response(text=LOGIN_PAGE, content_type="text/html")

    def _record(self, mode: str, status: int) -> None:
        with self._lock:
            self.answers.append((mode, status))

    async def _write(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()  # aiohttp undoes Content-Encoding: gzip
        mode = self.mode
        if mode == "hang":
            deadline = time.monotonic() + self.hang_max_s
            while not self._released and time.monotonic() < deadline and not _client_gone(request):
                await asyncio.sleep(0.05)
            # The client gave up (its timeout is shorter); nothing was forwarded.
            self._record("hang", 504)
            return web.json_response({"error": "proxy: gave up"}, status=504)
        if mode == "500":
            self._record(mode, 500)
            return web.json_response({"error": "proxy: internal error"}, status=500)
        if mode == "400":
            self._record(mode, 400)
            return web.json_response({"error": "proxy: bad request"}, status=400)
        if mode == "503":
            self._record(mode, 503)
            return web.json_response({"error": "proxy: influxdb unavailable"}, status=503,
                                     headers={"Retry-After": str(self.retry_after_s)})
        if mode in ("302", "307"):
            self._record(mode, int(mode))
            return web.Response(status=int(mode), headers={"Location": self.url + "/login"})
        if mode == "html":
            self._record(mode, 200)
            return web.Response(text="<html><body>This page has moved.</body></html>", content_type="text/html")
        if self._session is None:
            self._session = aiohttp.ClientSession()
        async with self._session.post(self.influx_url + "/write", params=request.query, data=body) as r:
            text = await r.read()
            status = r.status
        self._record("forward", status)
        if status == 204:
            with self._lock:
                self.delivered.update(line for line in body.decode("utf-8", "replace").split("\n") if line)
        return web.Response(status=status, body=text,
                            content_type=r.content_type if text else None)


def _client_gone(request: web.Request) -> bool:
    """The client closed the connection (gave up waiting)."""
    transport = request.transport
    return transport is None or transport.is_closing()
