"""GridFetcher: fetch at start and every interval, backfill window, Retry-After,
backoff retries, health reporting, and never raising into the loop. Real APScheduler
jobs with sub-second intervals against the local server. Every body here is SYNTHETIC:
the scheduler runs on the real clock, so its bodies are dated around now (the recorded
fixtures are replayed in test_grid_clients.py)."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone

from grid_server import GridServer, Reply
from wattprint.daemon.grid.base import IntensityPoint, ProviderError
from wattprint.daemon.grid.carbonintensity_uk import CarbonIntensityUKProvider
from wattprint.daemon.grid.scheduler import GridFetcher
from wattprint.daemon.health import HealthBoard

UTC = timezone.utc


def T(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def uk_body_now() -> Reply:
    """SYNTHETIC national body shaped like the recorded ones, dated around the real
    clock (the scheduler works in real time): 4 realised windows, then 4 forecasts."""
    now = datetime.now(UTC)
    first = now.replace(minute=0 if now.minute < 30 else 30, second=0, microsecond=0) - timedelta(hours=2)
    data = []
    for i in range(8):
        start = first + timedelta(minutes=30 * i)
        data.append({"from": start.strftime("%Y-%m-%dT%H:%MZ"),
                     "to": (start + timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%MZ"),
                     "intensity": {"forecast": 200 + i, "actual": 190 + i if i < 4 else None, "index": "moderate"}})
    return Reply.json({"data": data})


class Sink:
    """on_points callback that records each delivery (async, as the store's will be)."""

    def __init__(self) -> None:
        self.batches: list[list[IntensityPoint]] = []
        self.times: list[float] = []

    async def __call__(self, points: list[IntensityPoint]) -> None:
        self.batches.append(points)
        self.times.append(time.monotonic())


async def wait_for(cond, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def test_fetches_at_start_and_every_interval():
    async def main():
        async with GridServer() as srv:
            srv.set("uk:national", uk_body_now())
            health, sink = HealthBoard(), Sink()
            fetcher = GridFetcher(CarbonIntensityUKProvider("GB", base_url=srv.url), sink, health,
                                  interval_s=0.25, jitter_s=0.05)
            t0 = time.monotonic()
            fetcher.start()
            await wait_for(lambda: len(sink.batches) >= 3)
            fetcher.shutdown()
            n = len(srv.seen("uk:national"))
            await asyncio.sleep(0.5)
            return sink, health, srv.seen("uk:national"), t0, n

    sink, health, reqs, t0, n_at_shutdown = asyncio.run(main())
    assert sink.times[0] - t0 < 0.5  # first fetch right at start
    assert len(sink.batches[0]) == 8
    assert [p.kind for p in sink.batches[0]] == ["actual"] * 4 + ["forecast"] * 4
    assert health.get("grid").state == "ok"
    assert len(reqs) == n_at_shutdown  # nothing after shutdown
    gaps = [b - a for a, b in zip(sink.times, sink.times[1:])]
    assert all(0.15 < g < 0.8 for g in gaps), gaps
    # first window: 48 h back (no realised point known yet) to 48 h ahead
    first = reqs[0].params
    now = datetime.now(UTC)
    since = datetime.fromisoformat(first["from"])
    assert abs((now - since) - timedelta(hours=48)) < timedelta(minutes=31)


class FakeProvider:
    """A provider whose answers are scripted: lists of points or exceptions."""

    name, zone, resolution_s, has_actuals = "fake", "Z", 1800, True

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[datetime, datetime]] = []
        self.last_warnings: tuple[str, ...] = ()
        self.active = 0
        self.max_active = 0
        self.delay_s = 0.0

    async def fetch(self, session, since, until):
        self.calls.append((since, until))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
            if isinstance(answer, BaseException):
                raise answer
            return answer
        finally:
            self.active -= 1


def point(start: str, kind: str = "actual", g: float = 100.0) -> IntensityPoint:
    s = T(start)
    return IntensityPoint(start=s, end=s + timedelta(minutes=30), g_per_kwh=g, kind=kind,  # type: ignore[arg-type]
                          zone="Z", provider="fake")


def test_window_backfills_then_follows_last_actual():
    now = [T("2024-01-12T12:00")]
    provider = FakeProvider([point("2024-01-12T11:00"), point("2024-01-12T11:30"),
                             point("2024-01-12T12:00", "forecast")])
    fetcher = GridFetcher(provider, Sink(), HealthBoard(), interval_s=3600, now=lambda: now[0],
                          backfill_s=48 * 3600, forecast_s=24 * 3600, overlap_s=3600)
    assert fetcher.window() == (T("2024-01-10T12:00"), T("2024-01-13T12:00"))
    asyncio.run(fetcher.run_once())
    assert fetcher.last_actual_end == T("2024-01-12T12:00")  # forecasts do not count
    now[0] = T("2024-01-12T13:00")
    assert fetcher.window() == (T("2024-01-12T11:00"), T("2024-01-13T13:00"))
    # after a long outage the backfill is capped
    now[0] = T("2024-01-20T00:00")
    assert fetcher.window()[0] == T("2024-01-18T00:00")


def test_seeded_last_actual_end():
    fetcher = GridFetcher(FakeProvider([]), Sink(), HealthBoard(), now=lambda: T("2024-01-12T12:00"),
                          last_actual_end=T("2024-01-12T10:00"), overlap_s=1800)
    assert fetcher.window()[0] == T("2024-01-12T09:30")


def test_429_retry_after_schedules_one_retry():
    async def main():
        async with GridServer() as srv:
            # SYNTHETIC 429 (no captured one exists), then a good answer.
            srv.script("uk:national", Reply(status=429, body='{"error":"rate"}', headers={"Retry-After": "1"}))
            srv.set("uk:national", uk_body_now())
            health, sink = HealthBoard(), Sink()
            fetcher = GridFetcher(CarbonIntensityUKProvider("GB", base_url=srv.url), sink, health,
                                  interval_s=3600, jitter_s=0)
            fetcher.start()
            await wait_for(lambda: len(srv.seen("uk:national")) >= 1)
            await asyncio.sleep(0.1)
            degraded = health.get("grid")
            t_first = time.monotonic()
            await wait_for(lambda: len(sink.batches) == 1, timeout_s=4)
            waited = time.monotonic() - t_first
            fetcher.shutdown()
            return degraded, health.get("grid"), waited, len(srv.seen("uk:national"))

    degraded, recovered, waited, n_requests = asyncio.run(main())
    assert degraded.state == "degraded" and "rate_limited" in degraded.detail and "Retry-After 1 s" in degraded.detail
    assert recovered.state == "ok" and recovered.errors_total == 1
    assert 0.7 < waited < 2.5
    assert n_requests == 2


def test_retry_after_blocks_interval_runs():
    """While a Retry-After is pending, regular runs do not call the API."""
    async def main():
        async with GridServer() as srv:
            srv.set("uk:national", Reply(status=429, body="", headers={"Retry-After": "30"}))  # SYNTHETIC
            health = HealthBoard()
            fetcher = GridFetcher(CarbonIntensityUKProvider("GB", base_url=srv.url), Sink(), health,
                                  interval_s=0.1, jitter_s=0)
            fetcher.start()
            await asyncio.sleep(0.6)
            fetcher.shutdown()
            return len(srv.seen("uk:national")), fetcher.runs, health.get("grid")

    n_requests, runs, state = asyncio.run(main())
    assert n_requests == 1 and runs >= 4
    assert state.state == "degraded"


def test_server_error_degrades_then_backoff_retry_recovers():
    async def main():
        async with GridServer() as srv:
            srv.script("uk:national", Reply(status=500, body='{"error":"x"}'),  # SYNTHETIC
                       Reply(body="<html>oops</html>", content_type="text/html"))  # SYNTHETIC
            srv.set("uk:national", uk_body_now())
            health, sink = HealthBoard(), Sink()
            fetcher = GridFetcher(CarbonIntensityUKProvider("GB", base_url=srv.url), sink, health,
                                  interval_s=3600, jitter_s=0, retry_base_s=0.1)
            fetcher.start()
            await wait_for(lambda: len(sink.batches) == 1)
            fetcher.shutdown()
            return health.get("grid"), len(srv.seen("uk:national"))

    state, n = asyncio.run(main())
    assert n == 3  # 500, then HTML, then the good answer: two backoff retries
    assert state.state == "ok" and state.errors_total == 2


def test_failures_never_raise_into_the_loop():
    async def main():
        provider = FakeProvider(RuntimeError("bug in a provider"), ProviderError("auth", "HTTP 401"),
                                [point("2024-01-12T11:00")])
        health = HealthBoard()
        fetcher = GridFetcher(provider, Sink(), health, interval_s=0.1, jitter_s=0)
        details = []
        fetcher.start()
        await wait_for(lambda: fetcher.runs >= 1)
        details.append(health.get("grid").detail)
        await wait_for(lambda: fetcher.runs >= 2)
        details.append(health.get("grid").detail)
        await wait_for(lambda: fetcher.runs >= 3)
        fetcher.shutdown()
        return details, health.get("grid")

    details, final = asyncio.run(main())
    assert "unexpected RuntimeError: bug in a provider" in details[0]
    assert details[1] == "fake Z: auth: HTTP 401"
    assert final.state == "ok" and final.errors_total == 2


def test_on_points_failure_is_reported():
    def broken_store(points):
        raise OSError("disk full")

    health = HealthBoard()
    fetcher = GridFetcher(FakeProvider([point("2024-01-12T11:00")]), broken_store, health)
    assert asyncio.run(fetcher.run_once()) == []
    assert health.get("grid").state == "degraded" and "disk full" in health.get("grid").detail
    assert fetcher.last_actual_end is None  # not stored: fetch it again next time


def test_sync_callback_and_warnings_in_health():
    got = []
    provider = FakeProvider([point("2024-01-12T11:00")])
    provider.last_warnings = ("forecast not in this plan",)
    health = HealthBoard()
    fetcher = GridFetcher(provider, got.extend, health)
    asyncio.run(fetcher.run_once())
    assert len(got) == 1
    assert health.get("grid").state == "ok" and health.get("grid").detail == "forecast not in this plan"


def test_one_fetch_at_a_time():
    async def main():
        provider = FakeProvider([point("2024-01-12T11:00")])
        provider.delay_s = 0.3
        fetcher = GridFetcher(provider, Sink(), HealthBoard(), interval_s=0.05, jitter_s=0)
        fetcher.start()
        await asyncio.sleep(0.8)
        fetcher.shutdown()
        return provider

    provider = asyncio.run(main())
    assert provider.max_active == 1
    assert 2 <= len(provider.calls) <= 4  # coalesced: not one per 50 ms tick
