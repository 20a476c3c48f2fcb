"""``Retry-After`` (RFC 9110 10.2.3): the one parser (daemon/httpdates.py) and what both
of its callers do with each form: the grid clients (a 429 from a provider) and the
InfluxDB writer (a 429 from InfluxDB).

A non-finite or negative delay is not delay-seconds (``1*DIGIT``): it is ignored, as if
the header were absent. Before, the InfluxDB writer read ``inf`` as "wait forever"
(capped: 600 s without writing) and both read ``-1`` as "retry at once".
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiohttp
import pytest
from fake_influx import FakeInflux, error
from grid_server import GridServer, Reply
from wattprint.daemon.config import InfluxConfig
from wattprint.daemon.grid import ProviderError
from wattprint.daemon.grid.carbonintensity_uk import CarbonIntensityUKProvider
from wattprint.daemon.httpdates import parse_retry_after
from wattprint.exporters.influx import InfluxSink

NOW = datetime(2024, 1, 12, 9, 0, tzinfo=timezone.utc)
NOW_S = NOW.timestamp()
IN_90_S = "Fri, 12 Jan 2024 09:01:30 GMT"  # NOW + 90 s as an HTTP-date
INVALID = ["inf", "nan", "-1", "Infinity", "-inf", "+5", "1e3", "-0.5", "", "   ", "soon"]


@pytest.mark.parametrize(("value", "seconds"), [
    ("120", 120.0), (" 0 ", 0.0), ("1.5", 1.5), ("007", 7.0),
    (IN_90_S, 90.0),
    ("Fri, 12 Jan 2024 08:00:00 GMT", 0.0),  # a date in the past: retry now
    ("Friday, 12-Jan-24 09:00:10 GMT", 10.0),  # RFC 850 form, obsolete but allowed
    ("Fri Jan 12 09:00:20 2024", 20.0),  # asctime form: no zone, read as GMT
])
def test_valid_forms(value: str, seconds: float) -> None:
    assert parse_retry_after(value, now_s=NOW_S) == seconds


@pytest.mark.parametrize("value", [*INVALID, None, "1" * 400])
def test_invalid_forms_are_ignored(value: str | None) -> None:
    assert parse_retry_after(value, now_s=NOW_S) is None


def test_http_date_without_now_uses_the_wall_clock() -> None:
    when = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=30)
    got = parse_retry_after(email.utils.format_datetime(when, usegmt=True))
    assert got is not None and 28.0 <= got <= 30.0 and math.isfinite(got)


# ------------------------------------------------------------------ the grid clients

def _grid_429(header: str) -> ProviderError:
    async def main() -> ProviderError:
        async with GridServer() as srv:
            srv.set("uk:national", Reply(status=429, body='{"error":"slow down"}', headers={"Retry-After": header}))
            provider = CarbonIntensityUKProvider("GB", base_url=srv.url, now=lambda: NOW)
            with pytest.raises(ProviderError) as info:
                async with aiohttp.ClientSession() as session:
                    await provider.fetch(session, NOW - timedelta(hours=3), NOW - timedelta(hours=1))
            return info.value

    return asyncio.run(main())


@pytest.mark.parametrize("header", ["inf", "nan", "-1"])
def test_grid_ignores_an_invalid_retry_after(header: str) -> None:
    err = _grid_429(header)
    assert err.reason == "rate_limited" and err.status == 429
    assert err.retry_after_s is None  # the fetcher's own backoff applies
    assert "Retry-After" not in str(err)


@pytest.mark.parametrize(("header", "seconds"), [("120", 120.0), (IN_90_S, 90.0)])
def test_grid_takes_a_valid_retry_after(header: str, seconds: float) -> None:
    err = _grid_429(header)
    assert err.reason == "rate_limited" and err.retry_after_s == seconds
    assert f"Retry-After {seconds:g} s" in str(err)


# ------------------------------------------------------------------ the InfluxDB writer

LINES = [f"device_power,device=gpu0,host=h,kind=gpu watts={i}.5 {1_700_000_000_000_000_000 + i}" for i in range(3)]


def _influx_429_gap_s(tmp_path: Path, header: str) -> tuple[float, float, float]:
    """One 429 with ``header``, then 204: (seconds between the two writes, wall time
    of the first write, wall time of the second). The writer's own backoff is capped
    at 0.05 s and its Retry-After cap is the default 600 s."""
    out: list[float] = []

    async def main() -> None:
        fake = FakeInflux()
        await fake.start()
        try:
            fake.push(error(429, "too many requests", **{"Retry-After": header}))
            cfg = InfluxConfig(enabled=True, url=fake.url, database="wattprint", batch_size=100,
                               flush_interval_s=0.05, timeout_s=2.0, gzip=False, spool_max_bytes=64 * 1024 * 1024)
            sink = InfluxSink(cfg, str(tmp_path / "spool"), None, backoff_base_s=0.02, backoff_cap_s=0.05,
                              auth_retry_s=0.3, rng=lambda: 0.5)
            wall0, mono0 = time.time(), time.monotonic()
            sink.submit(LINES)
            sink.start()
            deadline = time.monotonic() + 8.0
            while sink.stats()["points_written_total"] < len(LINES) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await sink.stop()
            assert [w.status for w in fake.writes] == [429, 204], "delivered after one retry"
            first, second = fake.writes
            out.extend([second.at_s - first.at_s, wall0 + first.at_s - mono0, wall0 + second.at_s - mono0])
        finally:
            await fake.stop()

    asyncio.run(main())
    return out[0], out[1], out[2]


@pytest.mark.parametrize("header", ["inf", "nan", "-1"])
def test_influx_ignores_an_invalid_retry_after(tmp_path: Path, header: str) -> None:
    # Old code: "inf" waited the 600 s cap (this test would time out); now the backoff applies.
    gap_s, _, _ = _influx_429_gap_s(tmp_path, header)
    assert gap_s < 2.0


def test_influx_takes_delta_seconds(tmp_path: Path) -> None:
    gap_s, _, _ = _influx_429_gap_s(tmp_path, "1")
    assert gap_s >= 0.95  # the header, not the 0.05 s backoff cap


def test_influx_takes_an_http_date(tmp_path: Path) -> None:
    when_s = math.floor(time.time()) + 2  # 1 to 2 s from now, in whole seconds as HTTP-dates are
    header = email.utils.formatdate(when_s, usegmt=True)
    _, first_wall_s, second_wall_s = _influx_429_gap_s(tmp_path, header)
    assert first_wall_s < when_s <= second_wall_s + 0.05
