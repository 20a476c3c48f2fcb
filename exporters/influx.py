"""Deliver line protocol to InfluxDB through the on-disk spool, off the tick path.

``InfluxSink.submit`` (tick path) only appends to the spool (one write + fdatasync).
A background asyncio task (``start`` / ``stop``) reads the spool in batches of
``batch_size`` lines every ``flush_interval_s`` (back to back while a backlog remains),
sends them, and commits them only once the server has them (at-least-once; replays
overwrite identical points in InfluxDB).

APIs:
- ``api = "v1"``: ``POST {url}/write?db=&rp=&precision=ns`` with aiohttp. Credentials:
  ``token`` as ``Authorization: Token …`` (also InfluxDB 2.x/3.x v1 compatibility),
  else ``username``/``password`` as HTTP Basic auth (kept out of URLs and logs). A
  ``404 database not found`` makes the sink try ``CREATE DATABASE`` once (failure ignored).
- ``api = "v2"``: influxdb-client's synchronous write API (no batching, no retries of
  its own: this module batches and retries) in a worker thread; org, bucket, token.

Answers and what happens to the batch:
- 204, and only 204 (v1 and v2): delivered, committed. Redirects are never followed
  (a POST answered by a redirect to a login page or a moved endpoint would otherwise
  "succeed" on a page that stores nothing).
- 3xx, or a 2xx other than 204 (a proxy's HTML page, a "200 OK" from something that is
  not InfluxDB): not delivered; kept and retried with backoff; health degraded ("InfluxDB
  answered 302 redirect to …; writes need a 204").
- 400 / 422 (malformed or partially rejected): the batch is bisected until the rejected
  line(s) are alone; each is appended with the server's reason to the bounded
  dead-letter file ``dead-letter.lp`` in the spool directory and counted as dropped
  (``rejected``); the rest is delivered.
- 413: the batch is split in halves until it fits; a single line still too large goes
  to the dead-letter file (``too_large``).
- 401 / 403: kept; health degraded ("auth"); retried every ``auth_retry_s``.
- the spool cannot be written (disk full): the tick's lines are dropped and counted
  (``spool_error``); health degraded ("spool write failed") until an append works
  again, however well delivery of what is already spooled goes meanwhile.
- network error, timeout (``timeout_s``), 404, 429, 5xx and any other answer: kept;
  retried after ``Retry-After`` (capped at ``retry_after_cap_s`` = 600 s) when given,
  else after a jittered exponential backoff capped at ``backoff_cap_s`` = 60 s.
Progress inside a batch (halves already delivered) is kept in memory across retries.

Lost or set-aside lines (dead-lettered, dropped by the spool's cap, corrupt in the
spool, refused at submit, not storable) and spool cursor repairs open a "loss
episode": the ``influxdb`` part is degraded, its detail says how many lines (shown as
at least 1, at least 10, at least 100, … so the detail, and the log line a new detail brings,
changes only a few times per episode) and why, and it ends ``loss_hold_s`` (60 s)
after the last loss with one summary log line. Nothing is logged per line.

Everything is counted; ``stats()`` returns the figures for /healthz and /metrics, and
``InfluxSinkCollector`` exposes the counters by reason as labelled metrics.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import aiohttp
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from wattprint.daemon.health import HealthBoard
from wattprint.daemon.httpdates import parse_retry_after
from wattprint.daemon.timefmt import iso_z

from . import lineprotocol
from .influx_config import InfluxConfig
from .spool import Spool, SpoolCursor

log = logging.getLogger("wattprint.influx")

HEALTH_PART = "influxdb"
DEAD_LETTER_FILE = "dead-letter.lp"
DEFAULT_DEAD_LETTER_MAX_BYTES = 16 * 1024 * 1024
BACKOFF_CAP_S = 60.0
RETRY_AFTER_CAP_S = 600.0
AUTH_RETRY_S = 60.0
LOSS_HOLD_S = 60.0  # a loss keeps the sink degraded this long after the last lost line
_ERROR_TEXT_MAX_CHARS = 300
_GZIP_LEVEL = 5

Action = Literal["ok", "not_delivered", "split", "bisect", "auth", "missing_db", "retry"]

# Why lines were lost or set aside; keys of ``points_dropped_total`` made by the sink
# (the spool's and the encoder's reasons are added in ``stats``), in report order.
_LOSS_TEXT: dict[str, tuple[str, str]] = {  # reason: (noun, what happened)
    "rejected": ("dead-lettered", "InfluxDB rejected them"),
    "too_large": ("dead-lettered", "too large for InfluxDB even alone"),
    "dead_letter_unwritable": ("lost", "rejected by InfluxDB and the dead-letter file could not be written"),
    "invalid": ("dropped", "they contained a line break"),
    "spool_full": ("dropped", "spool full (spool_max_bytes reached; oldest lines go first)"),
    "spool_corrupt": ("dropped", "corrupt in the spool (checksum mismatch)"),
    "spool_oversize": ("dropped", "longer than the spool's line limit"),
}


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


def shown_count(n: int) -> str:
    """``n`` for a health detail: "at least" the power of ten at or below it, so the
    detail (and with it the log) changes once per tenfold, however many lines follow;
    the exact count is in the metrics and in the episode's summary line."""
    power = 1
    while power * 10 <= n:
        power *= 10
    return f"at least {power}"


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


class DeadLetterFile:
    """Append-only file of rejected lines, each preceded by ``# <UTC time> <reason>``.

    When it would grow past ``max_bytes`` it is renamed to ``<name>.1`` (replacing the
    previous one) and a new file is started: at most about 2 x max_bytes on disk. The
    lines can be fixed and replayed as they are (``#`` lines are comments).
    """

    def __init__(self, path: str, max_bytes: int = DEFAULT_DEAD_LETTER_MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.lines_total = 0
        self._failing = False

    def add(self, line: str, reason: str) -> bool:
        """Append one line; False when the file cannot be written (logged once per
        failure spell; the caller counts the line as lost)."""
        stamp = iso_z(time.time())
        entry = f"# {stamp} {_one_line(reason, 1000)}\n{line}\n".encode("utf-8", "replace")
        try:
            try:
                size = os.path.getsize(self.path)
            except FileNotFoundError:
                size = 0
            if size > 0 and size + len(entry) > self.max_bytes:
                os.replace(self.path, self.path + ".1")
            with open(self.path, "ab") as fh:
                fh.write(entry)
            self.lines_total += 1
        except OSError as exc:
            if not self._failing:
                log.error("cannot write dead-letter file %s: %s", self.path, exc)
            self._failing = True
            return False
        if self._failing:
            log.info("dead-letter file %s is writable again", self.path)
            self._failing = False
        return True


class InfluxSink:
    """Spool-backed InfluxDB writer. ``submit`` from the tick path; ``start``/``stop``
    from the event loop that runs the delivery task."""

    def __init__(
        self,
        cfg: InfluxConfig,
        spool_dir: str,
        health: HealthBoard | None = None,
        *,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = BACKOFF_CAP_S,
        retry_after_cap_s: float = RETRY_AFTER_CAP_S,
        auth_retry_s: float = AUTH_RETRY_S,
        dead_letter_max_bytes: int = DEFAULT_DEAD_LETTER_MAX_BYTES,
        loss_hold_s: float = LOSS_HOLD_S,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self._spool = Spool(spool_dir, max_bytes=cfg.spool_max_bytes)
        self._dead_letter = DeadLetterFile(os.path.join(spool_dir, DEAD_LETTER_FILE), dead_letter_max_bytes)
        self._health = health
        if health is not None:
            health.register(HEALTH_PART)
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._retry_after_cap_s = retry_after_cap_s
        self._auth_retry_s = auth_retry_s
        self._rng = rng
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

        self._lock = threading.Lock()  # counters: submit() may run on another thread
        self._submitted = 0
        self._written = 0
        self._retried = 0
        self._requests = 0
        self._splits = 0
        self._dropped = {"rejected": 0, "too_large": 0, "dead_letter_unwritable": 0, "invalid": 0, "spool_error": 0}
        self._failures: dict[str, int] = {}  # write requests that delivered nothing, by reason
        self._last_error = ""
        self._last_error_at: float | None = None
        self._last_detail = ""

        # Health: one detail made of what is wrong now (delivery, spool appends) and
        # what was lost in the current loss episode; see _update_health.
        self._health_lock = threading.RLock()
        self._clock = clock
        self._loss_hold_s = loss_hold_s
        self._delivery_detail = ""  # delivery failing: why (cleared by a 204)
        self._spool_detail = ""  # appends failing: why (cleared by an append that works)
        self._episode: dict[str, int] = {}  # reason -> lines lost in this loss episode
        self._episode_why: dict[str, str] = {}  # reason -> the first error text of the episode
        self._episode_started: float | None = None  # wall clock
        self._last_loss_at: float | None = None  # self._clock()
        self._spool_seen: dict[str, int] = {}  # spool counters already turned into losses
        self._repairs_seen = 0

        self._task: asyncio.Task[None] | None = None
        self._stop_event: asyncio.Event | None = None
        self._session: aiohttp.ClientSession | None = None
        self._v2_client: Any = None
        self._v2_write_api: Any = None
        self._inflight: deque[list[str]] | None = None
        self._inflight_cursor: SpoolCursor | None = None
        self._attempt = 0
        self._failing = False  # delivery to the server is failing
        self._spool_failing = False  # appending to the spool is failing (disk full): lines are dropped
        self._db_create_tried = False
        self._check_spool()  # what opening the spool found (corrupt records, a damaged cursor)

    # ------------------------------------------------------------------ tick path

    def submit(self, lines: Sequence[str]) -> None:
        """Queue ``lines`` for delivery: one durable spool append, no network. Never
        raises: a spool failure is counted (dropped, ``spool_error``) and reported.
        A line containing a newline or carriage return (not made by ``lineprotocol``)
        would become several lines on the wire: it is dropped and counted (``invalid``)."""
        if any("\n" in line or "\r" in line for line in lines):
            kept = [line for line in lines if "\n" not in line and "\r" not in line]
            with self._lock:
                self._dropped["invalid"] += len(lines) - len(kept)
            self._lost("invalid", len(lines) - len(kept), "")
            lines = kept
        if not lines:
            return
        try:
            self._spool.append(lines)
        except (OSError, ValueError) as exc:
            with self._lock:
                self._dropped["spool_error"] += len(lines)
                self._last_error = f"spool write failed: {exc}"
                self._last_error_at = time.time()
            with self._health_lock:  # degraded while it lasts (not a loss episode: it has a clear end)
                self._spool_failing = True
                self._spool_detail = "spool write failed: new lines are dropped"
                self._update_health(failure=True)
            return
        with self._lock:
            self._submitted += len(lines)
        with self._health_lock:
            if self._spool_failing:  # the disk takes lines again
                self._spool_failing = False
                self._spool_detail = ""
                self._update_health(failure=False)
        self._check_spool()  # the size cap may have dropped old lines

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the delivery task on the running event loop (idempotent)."""
        if self._task is not None:
            return
        self._stop_event = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="wattprint-influx-sink")

    async def stop(self) -> None:
        """Stop delivering: finish the request in flight, try one last flush of what is
        spooled (at most ``timeout_s``) unless the server is failing, close the spool.
        Whatever is not delivered stays in the spool for the next start."""
        task = self._task
        if task is not None and self._stop_event is not None:
            self._stop_event.set()
            try:
                await asyncio.wait_for(task, timeout=3 * self.cfg.timeout_s + 5.0)
            except asyncio.TimeoutError:
                log.warning("influxdb sink did not stop in time; cancelled")
            except Exception:  # the task's own failure, already logged there
                pass
            self._task = None
        self._spool.close()

    async def _run(self) -> None:
        try:
            if self.cfg.api == "v2":
                self._v2_client, self._v2_write_api = self._make_v2_client()
            else:
                self._session = aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
                    headers={"User-Agent": "wattprint"},
                )
            assert self._stop_event is not None
            while not self._stop_event.is_set():
                try:
                    wait_s = await self._drain(deadline=None)
                except (OSError, ValueError) as exc:  # the spool failed; keep trying
                    self._failing = True
                    self._report_failure("spool read failed", f"spool read failed: {exc}")
                    wait_s = backoff_delay_s(self._attempt, self._backoff_base_s, self._backoff_cap_s, self._rng)
                    self._attempt += 1
                self._check_spool()
                self._update_health(failure=False)  # ends a loss episode once its hold is over
                await self._sleep(min(wait_s, self._loss_hold_s) if self._episode else wait_s)
            if not self._failing:
                await self._drain(deadline=time.monotonic() + self.cfg.timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("influxdb sink stopped by an unexpected error")
            raise
        finally:
            if self._session is not None:
                await self._session.close()
                self._session = None
            if self._v2_client is not None:
                client, self._v2_client, self._v2_write_api = self._v2_client, None, None
                await asyncio.to_thread(client.close)

    async def _sleep(self, seconds: float) -> None:
        assert self._stop_event is not None
        if seconds <= 0:
            return
        try:
            await asyncio.wait_for(self._stop_event.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    # ------------------------------------------------------------------ delivery

    async def _drain(self, deadline: float | None) -> float:
        """Send batches until the spool is empty or a send fails; returns how long to
        wait before the next pass. With a ``deadline`` (final flush) it keeps going
        after stop was asked, until the deadline."""
        assert self._stop_event is not None
        while True:
            if self._inflight is None:
                lines, cursor = await asyncio.to_thread(self._spool.peek, self.cfg.batch_size)
                if not lines:
                    await asyncio.to_thread(self._spool.commit, cursor)  # past corrupt records, if any
                    return self.cfg.flush_interval_s
                self._inflight = deque([lines])
                self._inflight_cursor = cursor
                self._check_spool()  # records that went bad since they were checked
            retry_in_s = await self._send_inflight(deadline)
            if retry_in_s is not None:
                return retry_in_s
            assert self._inflight_cursor is not None
            await asyncio.to_thread(self._spool.commit, self._inflight_cursor)
            self._inflight = None
            self._inflight_cursor = None
            if self._stop_event.is_set() and (deadline is None or time.monotonic() > deadline):
                return 0.0

    async def _send_inflight(self, deadline: float | None) -> float | None:
        """Work through the in-flight batch. None when all of it is settled (delivered
        or dead-lettered); else the seconds to wait before trying again."""
        chunks = self._inflight
        assert chunks is not None
        while chunks:
            if deadline is not None and time.monotonic() > deadline:
                return 0.0
            chunk = chunks[0]
            answer = await self._write(chunk)
            with self._lock:
                self._requests += 1
            action = classify(answer.status)
            if action == "ok":
                chunks.popleft()
                with self._lock:
                    self._written += len(chunk)
                self._attempt = 0
                self._failing = False
                self._report_ok()
                continue
            if action == "not_delivered":  # a redirect or a page: nothing was stored
                with self._lock:
                    self._retried += len(chunk)
                    reason = "redirect" if answer.status is not None and answer.status >= 300 else "not_204"
                    self._failures[reason] = self._failures.get(reason, 0) + 1
                self._failing = True
                detail = not_delivered_detail(answer)
                self._report_failure(detail, f"{detail}: {answer.message}" if answer.message else detail)
                delay = backoff_delay_s(self._attempt, self._backoff_base_s, self._backoff_cap_s, self._rng)
                self._attempt += 1
                return delay
            if action in ("split", "bisect"):
                chunks.popleft()
                if len(chunk) > 1:
                    mid = len(chunk) // 2
                    chunks.appendleft(chunk[mid:])
                    chunks.appendleft(chunk[:mid])
                    with self._lock:
                        self._retried += len(chunk)
                        self._splits += 1
                    continue
                reason = "too_large" if action == "split" else "rejected"
                why = f"HTTP {answer.status}: {answer.message}"
                kept = await asyncio.to_thread(self._dead_letter.add, chunk[0], why)
                with self._lock:
                    self._dropped[reason] += 1
                    if not kept:
                        self._dropped["dead_letter_unwritable"] += 1
                    self._last_error = why
                    self._last_error_at = time.time()
                # Counted and shown in health; no log line per line (see _lost).
                self._lost(reason, 1, _one_line(why, 160))
                if not kept:
                    self._lost("dead_letter_unwritable", 1, "")
                continue
            if action == "missing_db" and self.cfg.api == "v1" and not self._db_create_tried:
                self._db_create_tried = True
                await self._create_database()
                continue
            # Keep the data and try again later.
            if answer.status is None:
                detail = "timeout" if answer.timed_out else "unreachable"
                message = answer.message
                reason = detail
            else:
                detail = f"HTTP {answer.status}"
                message = f"HTTP {answer.status}: {answer.message}"
                reason = "auth" if action == "auth" else (
                    "missing_db" if action == "missing_db" else f"http_{answer.status // 100}xx")
            with self._lock:
                self._retried += len(chunk)
                self._failures[reason] = self._failures.get(reason, 0) + 1
            self._failing = True
            if action == "auth":
                self._report_failure(f"auth (HTTP {answer.status})", message)
                return self._auth_retry_s
            self._report_failure(detail, message)
            if answer.retry_after_s is not None and answer.retry_after_s > 0:
                self._attempt += 1
                return min(answer.retry_after_s, self._retry_after_cap_s)
            delay = backoff_delay_s(self._attempt, self._backoff_base_s, self._backoff_cap_s, self._rng)
            self._attempt += 1
            return delay
        return None

    async def _write(self, chunk: list[str]) -> WriteAnswer:
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

    async def _create_database(self) -> None:
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

    # ------------------------------------------------------------------ health, figures

    def _report_ok(self) -> None:
        """A write was delivered: delivery is healthy again."""
        with self._health_lock:
            self._delivery_detail = ""
            self._update_health(failure=False)

    def _report_failure(self, detail: str, message: str) -> None:
        """Delivery failed (the data is kept): one failure, ``detail`` in health."""
        with self._lock:
            self._last_error = message
            self._last_error_at = time.time()
        with self._health_lock:
            self._delivery_detail = detail
            self._update_health(failure=True, message=message)

    def _lost(self, reason: str, n: int, why: str, report: bool = True) -> None:
        """``n`` lines were lost or set aside for ``reason``: part of the loss episode."""
        if n <= 0:
            return
        with self._health_lock:
            if not self._episode:
                self._episode_started = time.time()
            self._episode[reason] = self._episode.get(reason, 0) + n
            if why:
                self._episode_why.setdefault(reason, why)
            self._last_loss_at = self._clock()
            if report:
                self._update_health(failure=True)

    def _check_spool(self) -> None:
        """Turn what the spool counted since the last look (cap drops, corrupt records,
        oversize lines, unreadable bytes, cursor repairs) into losses."""
        counters = self._spool.counters()
        repairs, last_repair = self._spool.cursor_repair_counts()
        with self._health_lock:
            changed = False
            for key, reason in (("dropped_lines_total", "spool_full"), ("corrupt_records_total", "spool_corrupt"),
                                ("oversize_lines_total", "spool_oversize"), ("unreadable_bytes_total", "spool_unreadable")):
                new = counters[key] - self._spool_seen.get(key, 0)
                if new > 0:
                    self._spool_seen[key] = counters[key]
                    self._lost(reason, new, "", report=False)
                    changed = True
            n_repairs = sum(repairs.values())
            if n_repairs > self._repairs_seen:
                self._lost("spool_cursor", n_repairs - self._repairs_seen, last_repair, report=False)
                self._episode_why["spool_cursor"] = last_repair
                self._repairs_seen = n_repairs
                changed = True
            if changed:
                self._update_health(failure=True)

    def _loss_details(self) -> list[str]:
        out: list[str] = []
        for reason, n in self._episode.items():
            why = self._episode_why.get(reason, "")
            if reason == "spool_unreadable":
                out.append(f"{shown_count(n)} bytes of the spool unreadable (records lost)")
            elif reason == "spool_cursor":
                out.append(f"spool cursor repaired: {why}")
            else:
                noun, what = _LOSS_TEXT[reason]
                lines = "line" if n < 10 else "lines"  # "at least 1 line", "at least 10 lines"
                out.append(f"{shown_count(n)} {lines} {noun}: {what}" + (f" ({why})" if why else ""))
        return out

    def _update_health(self, failure: bool, message: str = "") -> None:
        """Report the sink's state: degraded while delivery or spool appends fail or a
        loss episode lasts (``failure``: count one more error), else ok. Logs (through
        the health board) only when the detail changes; ends a loss episode whose last
        loss is ``loss_hold_s`` old, with one summary line."""
        with self._health_lock:
            if self._episode and self._last_loss_at is not None \
                    and self._clock() - self._last_loss_at >= self._loss_hold_s:
                summary = ", ".join(f"{reason}: {n}" for reason, n in self._episode.items())
                started = self._episode_started or time.time()
                log.info("influxdb: nothing lost for %g s; the episode that began %s lost or set aside %s "
                         "(dead-lettered lines are in %s)", self._loss_hold_s,
                         iso_z(started),
                         summary, self._dead_letter.path)
                self._episode.clear()
                self._episode_why.clear()
                self._episode_started = None
            parts = [p for p in (self._delivery_detail, self._spool_detail) if p] + self._loss_details()
            detail = _one_line("; ".join(parts), 600)
            if detail:
                if failure or detail != self._last_detail:
                    if self._health is not None:
                        self._health.fail(HEALTH_PART, detail)
                    elif detail != self._last_detail:
                        log.warning("influxdb degraded: %s%s", detail, f" ({message})" if message else "")
            elif self._last_detail:
                if self._health is not None:
                    self._health.ok(HEALTH_PART)
                else:
                    log.info("influxdb recovered")
            self._last_detail = detail

    def stats(self) -> dict[str, Any]:
        """Counters since this sink was made, plus the spool's state."""
        spool = self._spool.counters()
        repairs, _ = self._spool.cursor_repair_counts()
        encoder = lineprotocol.counters.snapshot()
        with self._lock:
            return {
                "points_submitted_total": self._submitted,
                "points_written_total": self._written,
                "points_retried_total": self._retried,
                "points_dropped_total": {
                    "rejected": self._dropped["rejected"],
                    "too_large": self._dropped["too_large"],
                    "dead_letter_unwritable": self._dropped["dead_letter_unwritable"],
                    "invalid": self._dropped["invalid"],
                    "spool_error": self._dropped["spool_error"],
                    "spool_full": spool["dropped_lines_total"],
                    "spool_corrupt": spool["corrupt_records_total"],
                    "spool_oversize": spool["oversize_lines_total"],
                    "no_fields": encoder["points_skipped_no_fields"],
                },
                "requests_total": self._requests,
                "batches_split_total": self._splits,
                "spool_bytes": self._spool.size_bytes,
                "spool_pending_points": spool["pending_lines"],
                "spool_oldest_age_s": self._spool.oldest_age_s,
                "spool_torn_bytes_total": spool["torn_bytes_total"],
                "spool_unreadable_bytes_total": spool["unreadable_bytes_total"],
                "spool_cursor_save_errors_total": spool["cursor_save_errors_total"],
                "spool_cursor_repairs_total": repairs,
                "write_failures_total": dict(self._failures),
                "loss_episode": dict(self._episode),
                "dead_letter_path": self._dead_letter.path,
                "last_error": self._last_error,
                "last_error_at": self._last_error_at,
            }


class InfluxSinkCollector(Collector):
    """The sink's counters by reason, as labelled Prometheus metrics (register it on the
    daemon's registry): ``wattprint_influx_points_dropped_total{reason}``,
    ``wattprint_influx_write_failures_total{reason}`` and
    ``wattprint_spool_cursor_repairs_total{reason}``."""

    def __init__(self, sink: InfluxSink) -> None:
        self._sink = sink

    def collect(self) -> Any:
        stats = self._sink.stats()
        dropped = CounterMetricFamily(
            "wattprint_influx_points_dropped", "InfluxDB lines lost or set aside (dead-lettered), by reason.",
            labels=["reason"])
        for reason, n in sorted(stats["points_dropped_total"].items()):
            dropped.add_metric([reason], float(n))
        failures = CounterMetricFamily(
            "wattprint_influx_write_failures",
            "InfluxDB write requests that stored nothing (the lines were kept and retried), by reason.",
            labels=["reason"])
        for reason in ("redirect", "not_204", "unreachable", "timeout", "auth", "missing_db",
                       "http_4xx", "http_5xx"):
            failures.add_metric([reason], float(stats["write_failures_total"].get(reason, 0)))
        for reason, n in sorted(stats["write_failures_total"].items()):
            if reason not in ("redirect", "not_204", "unreachable", "timeout", "auth", "missing_db",
                              "http_4xx", "http_5xx"):
                failures.add_metric([reason], float(n))
        repairs = CounterMetricFamily(
            "wattprint_spool_cursor_repairs", "Spool cursors found damaged and repaired by replaying, by reason.",
            labels=["reason"])
        for reason, n in sorted(stats["spool_cursor_repairs_total"].items()):
            repairs.add_metric([reason], float(n))
        return [dropped, failures, repairs]
