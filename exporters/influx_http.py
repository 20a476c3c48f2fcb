"""The InfluxDB sink's HTTP side: one write request and how its answer is judged.

``InfluxWriter`` sends one batch of lines to InfluxDB and returns a ``WriteAnswer``,
never raising for a network error, a timeout or an error status:
- ``api = "v1"``: ``POST {url}/write?db=&rp=&precision=ns`` with aiohttp (gzip when
  asked), redirects not followed; ``Authorization: Token …`` or HTTP Basic auth.
  ``create_database`` sends ``CREATE DATABASE`` (any failure is only logged).
- ``api = "v2"``: influxdb-client's write service, called directly in a worker thread
  with redirects off and no retries of its own.

``classify`` maps an answer's status to what the delivery loop (influx.py) does with the
batch; ``backoff_delay_s`` is its jittered exponential backoff; ``not_delivered_detail``
and the error-text helpers make one-line texts for health and logs.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal

import aiohttp

from wattprint.daemon.httpdates import parse_retry_after

from .influx_config import InfluxConfig

log = logging.getLogger("wattprint.influx")

_ERROR_TEXT_MAX_CHARS = 300
_GZIP_LEVEL = 5

Action = Literal["ok", "not_delivered", "split", "bisect", "auth", "missing_db", "retry"]


@dataclass(frozen=True)
class WriteAnswer:
    """How one write request ended."""

    status: int | None  # HTTP status; None when no answer came (network error, timeout)
    message: str = ""  # the server's error text or the exception, one line
    retry_after_s: float | None = None
    timed_out: bool = False
    location: str = ""  # the Location header of a redirect
    content_type: str = ""


def classify(status: int | None) -> Action:
    """What to do with a batch after an answer with this status. Only 204 means the
    points were stored: InfluxDB answers every accepted write with 204, so any other
    2xx or a 3xx comes from something else (a proxy's login page, a moved endpoint)."""
    if status is None:
        return "retry"
    if status == 204:
        return "ok"
    if 200 <= status < 400:
        return "not_delivered"
    if status == 413:
        return "split"
    if status in (400, 422):
        return "bisect"
    if status in (401, 403):
        return "auth"
    if status == 404:
        return "missing_db"
    return "retry"  # 429, 5xx, and anything unexpected: keep the data


def backoff_delay_s(attempt: int, base_s: float, cap_s: float, rng: Callable[[], float]) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random, never above cap."""
    ceiling = min(cap_s, base_s * (2 ** min(attempt, 30)))
    return ceiling / 2 + rng() * ceiling / 2


def _one_line(text: str, limit: int = _ERROR_TEXT_MAX_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def not_delivered_detail(answer: WriteAnswer) -> str:
    """The health detail for a 3xx or a non-204 2xx answer (stable across retries)."""
    if answer.status is not None and 300 <= answer.status < 400:
        where = _one_line(answer.location, 200) if answer.location else "(no Location header)"
        return f"InfluxDB answered {answer.status} redirect to {where}; writes need a 204"
    kind = _one_line(answer.content_type.split(";")[0], 60) if answer.content_type else "no content type"
    return f"InfluxDB answered {answer.status} ({kind}) instead of 204; writes need a 204"


def _error_text(body: str) -> str:
    """The ``error`` (v1) or ``message`` (v2) of a JSON error body, else the body."""
    try:
        data = json.loads(body)
    except ValueError:
        return _one_line(body)
    if isinstance(data, dict):
        for key in ("error", "message"):
            if isinstance(data.get(key), str):
                return _one_line(data[key])
    return _one_line(body)


class InfluxWriter:
    """Write requests to one InfluxDB (v1 or v2, from ``cfg``). ``open`` and ``close``
    run on the event loop that calls ``write``."""

    def __init__(self, cfg: InfluxConfig) -> None:
        self.cfg = cfg
        base = cfg.url.rstrip("/")
        self._write_url = base + "/write"
        self._query_url = base + "/query"
        self._headers = {"Content-Type": "text/plain; charset=utf-8"}
        if cfg.token:
            self._headers["Authorization"] = f"Token {cfg.token}"
        elif cfg.username:
            basic = base64.b64encode(f"{cfg.username}:{cfg.password}".encode("utf-8")).decode("ascii")
            self._headers["Authorization"] = f"Basic {basic}"
        self._params = {"db": cfg.database, "precision": "ns"}
        if cfg.retention_policy:
            self._params["rp"] = cfg.retention_policy
        self._session: aiohttp.ClientSession | None = None
        self._v2_client: Any = None
        self._v2_write_api: Any = None

    async def open(self) -> None:
        """Make the v2 client or the v1 HTTP session."""
        if self.cfg.api == "v2":
            self._v2_client, self._v2_write_api = self._make_v2_client()
        else:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
                headers={"User-Agent": "wattprint"},
            )

    async def close(self) -> None:
        """Close what ``open`` made (the v2 client in a worker thread)."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._v2_client is not None:
            client, self._v2_client, self._v2_write_api = self._v2_client, None, None
            await asyncio.to_thread(client.close)

    async def write(self, chunk: list[str]) -> WriteAnswer:
        """Send ``chunk`` as one request; never raises for what the server or the
        network does (that is in the answer)."""
        if self.cfg.api == "v2":
            return await asyncio.to_thread(self._write_v2_sync, chunk)
        return await self._write_v1(chunk)

    def _encode_body(self, chunk: list[str]) -> bytes:
        body = "\n".join(chunk).encode("utf-8", "replace")
        return gzip.compress(body, compresslevel=_GZIP_LEVEL) if self.cfg.gzip else body

    async def _write_v1(self, chunk: list[str]) -> WriteAnswer:
        assert self._session is not None
        body = await asyncio.to_thread(self._encode_body, chunk)
        headers = dict(self._headers)
        if self.cfg.gzip:
            headers["Content-Encoding"] = "gzip"
        try:
            async with self._session.post(
                self._write_url, params=self._params, data=body, headers=headers, allow_redirects=False
            ) as resp:
                text = (await resp.content.read(4096)).decode("utf-8", "replace")
                return WriteAnswer(
                    resp.status, _error_text(text), parse_retry_after(resp.headers.get("Retry-After")),
                    location=resp.headers.get("Location", ""), content_type=resp.headers.get("Content-Type", ""),
                )
        except asyncio.TimeoutError:
            return WriteAnswer(None, f"no answer within {self.cfg.timeout_s:g} s", timed_out=True)
        except (aiohttp.ClientError, OSError) as exc:
            return WriteAnswer(None, _one_line(f"{type(exc).__name__}: {exc}"))

    async def create_database(self) -> None:
        """``CREATE DATABASE`` on v1 (once per sink; any failure is ignored)."""
        assert self._session is not None
        name = self.cfg.database.replace("\\", "\\\\").replace('"', '\\"')
        headers = {k: v for k, v in self._headers.items() if k != "Content-Type"}
        try:
            async with self._session.post(self._query_url, data={"q": f'CREATE DATABASE "{name}"'}, headers=headers) as resp:
                text = (await resp.content.read(4096)).decode("utf-8", "replace")
                log.info("influxdb: CREATE DATABASE %s -> HTTP %s %s", self.cfg.database, resp.status, _one_line(text))
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.info("influxdb: CREATE DATABASE %s failed: %s", self.cfg.database, exc)

    def _make_v2_client(self) -> tuple[Any, Any]:
        """The client (closed at stop) and its write service (see ``_write_v2_sync``)."""
        from influxdb_client import InfluxDBClient
        from influxdb_client.service.write_service import WriteService

        client = InfluxDBClient(
            url=self.cfg.url,
            token=self.cfg.token,
            org=self.cfg.org,
            timeout=int(self.cfg.timeout_s * 1000),
            enable_gzip=self.cfg.gzip,
            retries=False,
        )
        return client, WriteService(client.api_client)

    def _write_v2_sync(self, chunk: list[str]) -> WriteAnswer:
        """One synchronous influxdb-client write (runs in a worker thread).

        ``WriteApi.write`` treats any 2xx as success and returns nothing, and urllib3
        would follow redirects; so the write service is called directly with redirects
        off (the client is also made with ``retries=False``), and the status checked
        here: only 204 counts (``classify``)."""
        import urllib3
        from influxdb_client.client.exceptions import InfluxDBError
        from influxdb_client.rest import ApiException

        try:
            body = "\n".join(chunk).encode("utf-8", "replace")
            resp, status, headers = self._v2_write_api.post_write_with_http_info(
                org=self.cfg.org, bucket=self.cfg.bucket, body=body, precision="ns",
                content_type="text/plain; charset=utf-8",
                _return_http_data_only=False, _preload_content=False, urlopen_kw={"redirect": False},
            )
            try:
                text = resp.read(4096).decode("utf-8", "replace") if status != 204 else ""
            finally:
                resp.drain_conn()  # the connection goes back to the pool clean
                resp.release_conn()
            return WriteAnswer(status, _error_text(text), location=headers.get("Location", "") or "",
                               content_type=headers.get("Content-Type", "") or "")
        except ApiException as exc:
            body = exc.body.decode("utf-8", "replace") if isinstance(exc.body, bytes) else str(exc.body or exc.reason or "")
            headers = exc.headers or {}
            return WriteAnswer(exc.status, _error_text(body), parse_retry_after(getattr(exc, "retry_after", None)),
                               location=headers.get("Location", "") or "",
                               content_type=headers.get("Content-Type", "") or "")
        except urllib3.exceptions.TimeoutError:
            return WriteAnswer(None, f"no answer within {self.cfg.timeout_s:g} s", timed_out=True)
        except (urllib3.exceptions.HTTPError, InfluxDBError, OSError) as exc:
            return WriteAnswer(None, _one_line(f"{type(exc).__name__}: {exc}"))
