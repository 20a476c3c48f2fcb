"""Fetch grid intensity on the daemon's event loop: at start, then every interval
(coalesced, one at a time, jittered), and hand the points to a callback.

Each run asks the provider for the past not yet realised — from the end of the last
``actual`` point (less ``overlap_s`` to pick up revisions), or ``backfill_s`` back after
a start or a long outage — up to ``forecast_s`` ahead. A 429 schedules one retry after
its Retry-After; timeouts and server errors schedule a retry with backoff; every
failure marks the ``grid`` part degraded in the HealthBoard and nothing is ever raised
into the event loop or the scheduler.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from datetime import datetime, timedelta
from typing import Awaitable, Callable

import aiohttp
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from ..health import HealthBoard
from .base import IntensityPoint, IntensityProvider, ProviderError, as_utc, utcnow

log = logging.getLogger("wattprint.grid.scheduler")

HEALTH_NAME = "grid"
OnPoints = Callable[[list[IntensityPoint]], Awaitable[None] | None]


class GridFetcher:
    """Periodic, failure-proof fetching of one provider's intensity series."""

    JOB_ID = "wattprint-grid-fetch"
    RETRY_JOB_ID = "wattprint-grid-retry"

    def __init__(
        self,
        provider: IntensityProvider,
        on_points: OnPoints,
        health: HealthBoard,
        interval_s: float = 3600.0,
        jitter_s: float | None = None,
        *,
        backfill_s: float = 48 * 3600.0,
        forecast_s: float = 48 * 3600.0,
        overlap_s: float = 3600.0,
        last_actual_end: datetime | None = None,
        retry_base_s: float = 60.0,
        max_retry_after_s: float = 3600.0,
        scheduler: AsyncIOScheduler | None = None,
        now: Callable[[], datetime] = utcnow,
    ):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.provider = provider
        self.on_points = on_points
        self.health = health
        self.interval_s = float(interval_s)
        # Default jitter: a tenth of the interval, at most 5 minutes.
        self.jitter_s = min(300.0, self.interval_s / 10) if jitter_s is None else float(jitter_s)
        self.backfill_s = backfill_s
        self.forecast_s = forecast_s
        self.overlap_s = overlap_s
        self.retry_base_s = retry_base_s
        self.max_retry_after_s = max_retry_after_s
        self.last_actual_end = as_utc(last_actual_end) if last_actual_end else None
        self._now = now
        self._own_scheduler = scheduler is None
        self._scheduler = scheduler or AsyncIOScheduler(timezone="UTC")
        self._lock = asyncio.Lock()
        self._not_before: datetime | None = None  # honour Retry-After across jobs
        self._failures = 0
        self.runs = 0  # completed runs, successful or not (for tests and /healthz)
        self.last_error: ProviderError | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Schedule the job (first run now). Call from the running event loop."""
        self.health.register(HEALTH_NAME)
        self._scheduler.add_job(
            self.run_once,
            trigger=IntervalTrigger(seconds=self.interval_s, jitter=self.jitter_s or None, timezone="UTC"),
            id=self.JOB_ID,
            name=f"grid fetch ({self.provider.name} {self.provider.zone})",
            next_run_time=self._now(),
            coalesce=True,
            max_instances=1,
            misfire_grace_time=None,
            replace_existing=True,
        )
        if self._own_scheduler and not self._scheduler.running:
            self._scheduler.start()

    def shutdown(self) -> None:
        """Remove this fetcher's jobs; stop the scheduler if this fetcher created it."""
        for job_id in (self.JOB_ID, self.RETRY_JOB_ID):
            try:
                self._scheduler.remove_job(job_id)
            except Exception:  # JobLookupError, or the scheduler already stopped
                pass
        if self._own_scheduler and self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    # -- one run ---------------------------------------------------------------------

    def window(self) -> tuple[datetime, datetime]:
        """(since, until) for the next fetch."""
        now = as_utc(self._now(), "now")
        oldest = now - timedelta(seconds=self.backfill_s)
        since = oldest
        if self.last_actual_end is not None:
            since = max(oldest, min(now, self.last_actual_end - timedelta(seconds=self.overlap_s)))
        return since, now + timedelta(seconds=self.forecast_s)

    async def run_once(self) -> list[IntensityPoint]:
        """Fetch once and deliver the points. Never raises; returns what was delivered."""
        if self._lock.locked():
            log.debug("grid fetch already running; skipping this one")
            return []
        async with self._lock:
            try:
                return await self._run()
            except Exception as exc:  # last line of defence: never into the loop
                log.exception("grid fetch failed unexpectedly")
                self.health.fail(HEALTH_NAME, f"{self._label()}: unexpected {type(exc).__name__}: {exc}")
                return []
            finally:
                self.runs += 1

    def _label(self) -> str:
        return f"{self.provider.name} {self.provider.zone}"

    async def _run(self) -> list[IntensityPoint]:
        now = as_utc(self._now(), "now")
        if self._not_before is not None and now < self._not_before:
            log.debug("grid fetch skipped: rate-limited until %s", self._not_before.isoformat())
            return []
        since, until = self.window()
        try:
            async with aiohttp.ClientSession() as session:
                points = await self.provider.fetch(session, since, until)
        except ProviderError as err:
            self._on_failure(err)
            return []
        except asyncio.TimeoutError:  # a provider that timed out on its own
            self._on_failure(ProviderError("timeout", "no answer in time"))
            return []

        try:
            result = self.on_points(points)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            log.exception("storing grid intensity points failed")
            self.health.fail(HEALTH_NAME, f"{self._label()}: storing points failed: {type(exc).__name__}: {exc}")
            return []

        actual_ends = [p.end for p in points if p.kind == "actual"]
        if actual_ends:
            newest = max(actual_ends)
            if self.last_actual_end is None or newest > self.last_actual_end:
                self.last_actual_end = newest
        self._failures = 0
        self._not_before = None
        self.last_error = None
        warnings = tuple(getattr(self.provider, "last_warnings", ()) or ())
        self.health.ok(HEALTH_NAME, "; ".join(warnings))
        return points

    def _on_failure(self, err: ProviderError) -> None:
        self.last_error = err
        self._failures += 1
        self.health.fail(HEALTH_NAME, f"{self._label()}: {err}")
        now = as_utc(self._now(), "now")
        delay_s: float | None
        if err.reason == "rate_limited":
            wait = err.retry_after_s if err.retry_after_s is not None else self.retry_base_s
            delay_s = min(max(wait, 1.0), self.max_retry_after_s)
            self._not_before = now + timedelta(seconds=delay_s)
        elif err.reason in ("timeout", "http_error", "bad_body", "no_data"):
            delay_s = min(self.retry_base_s * 2 ** (self._failures - 1), self.interval_s)
        else:  # auth: retrying soon will not help; the next interval tries again
            delay_s = None
        if delay_s is not None and delay_s < self.interval_s:
            self._schedule_retry(now + timedelta(seconds=delay_s))

    def _schedule_retry(self, when: datetime) -> None:
        try:
            self._scheduler.add_job(
                self.run_once,
                trigger=DateTrigger(run_date=when, timezone="UTC"),
                id=self.RETRY_JOB_ID,
                name=f"grid fetch retry ({self._label()})",
                coalesce=True,
                max_instances=1,
                misfire_grace_time=None,
                replace_existing=True,
            )
            log.info("grid fetch: retry scheduled at %s", when.isoformat())
        except Exception as exc:  # scheduler stopped meanwhile
            log.debug("grid fetch: could not schedule a retry: %s", exc)
