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

This module is the delivery loop (spool to server, retries, splits); the parts it uses:
influx_http.py (the v1/v2 write requests, answer classification, backoff),
dead_letter.py (the dead-letter file), influx_health.py (health detail and loss
episodes), influx_collector.py (the labelled Prometheus series). Their names are
importable from here as before.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from collections import deque
from typing import Any, Callable, Sequence

from wattprint.daemon.health import HealthBoard
from wattprint.daemon.httpdates import parse_retry_after

from . import lineprotocol
from .dead_letter import DEAD_LETTER_FILE, DEFAULT_DEAD_LETTER_MAX_BYTES, DeadLetterFile
from .influx_collector import InfluxSinkCollector
from .influx_config import InfluxConfig
from .influx_health import _LOSS_TEXT, HEALTH_PART, LOSS_HOLD_S, SinkHealth, shown_count
from .influx_http import (
    _ERROR_TEXT_MAX_CHARS,
    _GZIP_LEVEL,
    Action,
    InfluxWriter,
    WriteAnswer,
    _error_text,
    _one_line,
    backoff_delay_s,
    classify,
    not_delivered_detail,
)
from .spool import Spool, SpoolCursor

log = logging.getLogger("wattprint.influx")

BACKOFF_CAP_S = 60.0
RETRY_AFTER_CAP_S = 600.0
AUTH_RETRY_S = 60.0

__all__ = [
    "AUTH_RETRY_S", "BACKOFF_CAP_S", "DEAD_LETTER_FILE", "DEFAULT_DEAD_LETTER_MAX_BYTES", "HEALTH_PART",
    "LOSS_HOLD_S", "RETRY_AFTER_CAP_S", "Action", "DeadLetterFile", "InfluxSink", "InfluxSinkCollector",
    "InfluxWriter", "WriteAnswer", "_ERROR_TEXT_MAX_CHARS", "_GZIP_LEVEL", "_LOSS_TEXT", "_error_text",
    "_one_line", "backoff_delay_s", "classify", "not_delivered_detail", "parse_retry_after", "shown_count",
]


class InfluxSink(SinkHealth):
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
        self._writer = InfluxWriter(cfg)

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
            await self._writer.open()
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
            await self._writer.close()

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
            answer = await self._writer.write(chunk)
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
                await self._writer.create_database()
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

    # ------------------------------------------------------------------ figures

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
