"""InfluxSink against a scripted server: every answer class (204, 400, 401, 403, 404, 413,
422, 429 + Retry-After, 500, 503, a hang, a refused connection), what is delivered,
retried, kept, dead-lettered and counted, for v1 (aiohttp) and v2 (influxdb-client)."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from fake_influx import FakeInflux, Reply, error
from servers import free_port

from wattprint.daemon.config import InfluxConfig
from wattprint.daemon.health import HealthBoard
from wattprint.exporters.influx import (
    DEAD_LETTER_FILE,
    HEALTH_PART,
    InfluxSink,
    backoff_delay_s,
    classify,
    parse_retry_after,
)


def make_cfg(url: str, **overrides: Any) -> InfluxConfig:
    values: dict[str, Any] = dict(
        enabled=True, url=url, database="wattprint", batch_size=100, flush_interval_s=0.05,
        timeout_s=2.0, gzip=False, spool_max_bytes=64 * 1024 * 1024,
    )
    values.update(overrides)
    return InfluxConfig(**values)


def make_sink(cfg: InfluxConfig, tmp_path: Path, health: HealthBoard | None = None, **overrides: Any) -> InfluxSink:
    options: dict[str, Any] = dict(backoff_base_s=0.02, backoff_cap_s=0.1, auth_retry_s=0.3, rng=lambda: 0.5)
    options.update(overrides)
    return InfluxSink(cfg, str(tmp_path / "spool"), health, **options)


def points(start: int, n: int, tag: str = "ok") -> list[str]:
    return [f"device_power,device=gpu0,host=h,kind=gpu,t={tag} watts={i}.5 {1_700_000_000_000_000_000 + i}" for i in range(start, start + n)]


def part_state(health: HealthBoard) -> str:
    part = health.get(HEALTH_PART)
    return part.state if part is not None else "missing"


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)


Scenario = Callable[[FakeInflux], Awaitable[None]]


def with_server(scenario: Scenario) -> None:
    async def main() -> None:
        fake = FakeInflux()
        await fake.start()
        try:
            await scenario(fake)
        finally:
            await fake.stop()

    asyncio.run(main())


# ------------------------------------------------------------------------ pure helpers


@pytest.mark.parametrize(
    ("status", "action"),
    [(204, "ok"), (200, "not_delivered"), (201, "not_delivered"), (302, "not_delivered"), (307, "not_delivered"),
     (400, "bisect"), (422, "bisect"), (413, "split"), (401, "auth"), (403, "auth"),
     (404, "missing_db"), (429, "retry"), (500, "retry"), (503, "retry"), (None, "retry"), (418, "retry")],
)
def test_classify(status: int | None, action: str) -> None:
    assert classify(status) == action


def test_parse_retry_after() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-3") is None  # not delay-seconds (tests/test_retry_after.py)
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now_s=1445412480.0) == pytest.approx(30.0)


def test_backoff_is_exponential_jittered_and_capped() -> None:
    assert backoff_delay_s(0, 1.0, 60.0, lambda: 0.0) == 0.5
    assert backoff_delay_s(0, 1.0, 60.0, lambda: 1.0) == 1.0
    assert backoff_delay_s(3, 1.0, 60.0, lambda: 1.0) == 8.0
    assert backoff_delay_s(10, 1.0, 60.0, lambda: 1.0) == 60.0
    assert backoff_delay_s(10_000, 1.0, 60.0, lambda: 0.0) == 30.0


# ------------------------------------------------------------------------------ 204


def test_204_delivers_in_order_in_batches_and_commits(tmp_path: Path) -> None:
    async def scenario(fake: FakeInflux) -> None:
        sink = make_sink(make_cfg(fake.url, batch_size=4, retention_policy="week"), tmp_path)
        sink.submit(points(0, 5))
        sink.submit(points(5, 5))
        sink.start()
        await eventually(lambda: sink.stats()["points_written_total"] == 10)
        await sink.stop()
        assert fake.accepted == points(0, 10)
        assert [len(r.lines) for r in fake.writes] == [4, 4, 2]
        assert fake.writes[0].query == {"db": "wattprint", "rp": "week", "precision": "ns"}
        stats = sink.stats()
        assert stats["spool_pending_points"] == 0 and stats["points_retried_total"] == 0
        assert sum(stats["points_dropped_total"].values()) == stats["points_dropped_total"]["no_fields"]

    with_server(scenario)


def test_gzip_body_and_credentials(tmp_path: Path) -> None:
    async def scenario(fake: FakeInflux) -> None:
        sink = make_sink(make_cfg(fake.url, gzip=True, username="wp", password="s3cret"), tmp_path / "a")
        sink.submit(points(0, 3))
        sink.start()
        await eventually(lambda: sink.stats()["points_written_total"] == 3)
        await sink.stop()
        request = fake.writes[0]
        assert request.headers["Content-Encoding"] == "gzip"
        assert request.headers["Authorization"] == "Basic " + base64.b64encode(b"wp:s3cret").decode()
        assert "u" not in request.query and "p" not in request.query  # never in the URL
        assert request.lines == points(0, 3)

        sink = make_sink(make_cfg(fake.url, token="tok-123"), tmp_path / "b")
        sink.submit(points(3, 1))
        sink.start()
        await eventually(lambda: sink.stats()["points_written_total"] == 1)
        await sink.stop()
        assert fake.writes[-1].headers["Authorization"] == "Token tok-123"

    with_server(scenario)


# ------------------------------------------------------------------------ 400 / 422


@pytest.mark.parametrize("status", [400, 422])
def test_bad_lines_are_isolated_to_the_dead_letter_file_and_the_rest_delivered(tmp_path: Path, status: int) -> None:
    good = points(0, 14)
    bad = [f"device_power,host=h BAD{i}=x {i}" for i in range(2)]
    batch = good[:5] + [bad[0]] + good[5:11] + [bad[1]] + good[11:]

    def rule(lines: list[str]) -> Reply | None:
        if any("BAD" in line for line in lines):
            return error(status, "unable to parse 'device_power,host=h BAD': invalid field format")
        return None

    async def scenario(fake: FakeInflux) -> None:
        fake.rule = rule
        health = HealthBoard()
        sink = make_sink(make_cfg(fake.url, batch_size=100), tmp_path, health)
        sink.submit(batch)
        sink.start()
        await eventually(lambda: sink.stats()["points_dropped_total"]["rejected"] == 2)
        await eventually(lambda: sink.stats()["spool_pending_points"] == 0)
        await sink.stop()
        assert fake.accepted == good  # every good line exactly once, in order
        stats = sink.stats()
        assert stats["points_written_total"] == 14
        assert stats["points_retried_total"] > 0 and stats["batches_split_total"] > 0
        assert "invalid field format" in stats["last_error"]
        text = (tmp_path / "spool" / DEAD_LETTER_FILE).read_text()
        for line in bad:
            assert f"\n{line}\n" in text
        assert text.count(f"# ") == 2 and f"HTTP {status}: unable to parse" in text
        # a rejected line is lost to InfluxDB: the sink says so (one episode, a count, why)
        part = health.get(HEALTH_PART)
        assert part is not None and part.state == "degraded"
        assert part.detail.startswith("at least 1 line dead-lettered: InfluxDB rejected them (HTTP ")
        assert "unable to parse" in part.detail
        # no resend once settled (Prometheus compliance: 400 -> not sent again)
        n = len(fake.writes)
        sink2 = make_sink(make_cfg(fake.url), tmp_path)
        sink2.start()
        await asyncio.sleep(0.2)
        await sink2.stop()
        assert len(fake.writes) == n

    with_server(scenario)


def test_dead_letter_file_is_bounded(tmp_path: Path) -> None:
    async def scenario(fake: FakeInflux) -> None:
        fake.rule = lambda lines: error(400, "nope " + "x" * 200)
        sink = make_sink(make_cfg(fake.url, batch_size=1), tmp_path, dead_letter_max_bytes=2000)
        sink.submit(points(0, 40))
        sink.start()
        await eventually(lambda: sink.stats()["points_dropped_total"]["rejected"] == 40)
        await sink.stop()
        spool_dir = tmp_path / "spool"
        assert (spool_dir / DEAD_LETTER_FILE).stat().st_size <= 2000
        assert (spool_dir / (DEAD_LETTER_FILE + ".1")).stat().st_size <= 2000

    with_server(scenario)


# ------------------------------------------------------------------------------ 413


def test_413_splits_the_batch_until_it_fits(tmp_path: Path) -> None:
    async def scenario(fake: FakeInflux) -> None:
        fake.rule = lambda lines: error(413, "request entity too large") if len(lines) > 3 else None
        sink = make_sink(make_cfg(fake.url, batch_size=50), tmp_path)
        sink.submit(points(0, 20))
        sink.start()
        await eventually(lambda: sink.stats()["points_written_total"] == 20)
        await sink.stop()
        assert fake.accepted == points(0, 20)
        assert all(len(r.lines) <= 3 for r in fake.writes if r.status == 204)
        stats = sink.stats()
        assert stats["batches_split_total"] >= 7
        assert sum(stats["points_dropped_total"].values()) == stats["points_dropped_total"]["no_fields"]

    with_server(scenario)


def test_413_on_a_single_line_dead_letters_it(tmp_path: Path) -> None:
    huge = 'device_power,host=h s="' + "x" * 5000 + '" 1'

    async def scenario(fake: FakeInflux) -> None:
        fake.rule = lambda lines: error(413, "too large") if any(len(line) > 1000 for line in lines) else None
        sink = make_sink(make_cfg(fake.url), tmp_path)
        sink.submit(points(0, 3) + [huge] + points(3, 3))
        sink.start()
        await eventually(lambda: sink.stats()["points_dropped_total"]["too_large"] == 1)
        await eventually(lambda: sink.stats()["points_written_total"] == 6)
        await sink.stop()
        assert fake.accepted == points(0, 6)
        assert huge in (tmp_path / "spool" / DEAD_LETTER_FILE).read_text()

    with_server(scenario)


# ------------------------------------------------------------------------ 401 / 403


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failure_keeps_the_data_degrades_and_retries_slowly(tmp_path: Path, status: int) -> None:
    async def scenario(fake: FakeInflux) -> None:
        fake.push(error(status, "authorization failed"), error(status, "authorization failed"))
        health = HealthBoard()
        sink = make_sink(make_cfg(fake.url), tmp_path, health, auth_retry_s=0.4)
        sink.submit(points(0, 5))
        sink.start()
        await eventually(lambda: len(fake.writes) >= 1)
        await eventually(lambda: part_state(health) == "degraded")
        part = health.get(HEALTH_PART)
        assert part is not None and part.detail == f"auth (HTTP {status})"
        assert sink.stats()["spool_pending_points"] == 5
        await eventually(lambda: sink.stats()["points_written_total"] == 5)
        await sink.stop()
        times = [r.at_s for r in fake.writes]
        assert len(times) == 3
        assert times[1] - times[0] >= 0.35 and times[2] - times[1] >= 0.35  # slow, fixed retry
        assert fake.accepted == points(0, 5)
        stats = sink.stats()
        assert stats["points_retried_total"] == 10
        assert sum(stats["points_dropped_total"].values()) == stats["points_dropped_total"]["no_fields"]
        part = health.get(HEALTH_PART)
        assert part is not None and part.state == "ok" and part.errors_total == 2

    with_server(scenario)


# --------------------------------------------------------------- 429 / 500 / 503


def test_429_retry_after_is_honoured(tmp_path: Path) -> None:
    async def scenario(fake: FakeInflux) -> None:
        fake.push(error(429, "too many requests", **{"Retry-After": "1"}))
        sink = make_sink(make_cfg(fake.url), tmp_path, backoff_cap_s=0.05)
        sink.submit(points(0, 4))
        sink.start()
        await eventually(lambda: sink.stats()["points_written_total"] == 4)
        await sink.stop()
        first, second = fake.writes
        assert first.status == 429 and second.status == 204
        assert second.at_s - first.at_s >= 0.95  # the header, not the 0.05 s backoff cap
        assert second.lines == first.lines == points(0, 4)
        assert sink.stats()["points_retried_total"] == 4

    with_server(scenario)


def test_retry_after_is_capped(tmp_path: Path) -> None:
    async def scenario(fake: FakeInflux) -> None:
        fake.push(error(503, "overloaded", **{"Retry-After": "3600"}))
        sink = make_sink(make_cfg(fake.url), tmp_path, retry_after_cap_s=0.3)
        sink.submit(points(0, 2))
        sink.start()
        await eventually(lambda: sink.stats()["points_written_total"] == 2, timeout=5)
        await sink.stop()
        assert 0.25 <= fake.writes[1].at_s - fake.writes[0].at_s < 2.0

    with_server(scenario)


def test_5xx_sequence_retries_with_backoff_then_delivers_once(tmp_path: Path) -> None:
    # influxdb-client's own test shape: 503 -> 429 + Retry-After -> 500 -> ok
    async def scenario(fake: FakeInflux) -> None:
        fake.push(error(503, "unavailable"), error(429, "slow down", **{"Retry-After": "0.3"}), error(500, "internal"))
        health = HealthBoard()
        sink = make_sink(make_cfg(fake.url), tmp_path, health, backoff_base_s=0.1, backoff_cap_s=0.4)
        sink.submit(points(0, 6))
        sink.start()
        await eventually(lambda: part_state(health) == "degraded")
        await eventually(lambda: sink.stats()["points_written_total"] == 6)
        await sink.stop()
        statuses = [r.status for r in fake.writes]
        assert statuses == [503, 429, 500, 204]
        gaps = [b.at_s - a.at_s for a, b in zip(fake.writes, fake.writes[1:])]
        assert gaps[0] >= 0.07  # backoff attempt 0: 0.1 * (0.5 + 0.5 * 0.5)
        assert gaps[1] >= 0.28  # Retry-After 0.3
        assert gaps[2] >= 0.28  # backoff attempt 2: min(0.4, 0.4) * 0.75
        assert fake.accepted == points(0, 6)
        stats = sink.stats()
        assert stats["points_retried_total"] == 18
        assert stats["last_error"] == "HTTP 500: internal"
        part = health.get(HEALTH_PART)
        assert part is not None and part.state == "ok" and part.errors_total == 3

    with_server(scenario)


def test_hang_times_out_and_the_batch_is_sent_again(tmp_path: Path) -> None:
    async def scenario(fake: FakeInflux) -> None:
        fake.push(Reply(204, delay_s=30))
        health = HealthBoard()
        sink = make_sink(make_cfg(fake.url, timeout_s=0.3), tmp_path, health)
        sink.submit(points(0, 3))
        sink.start()
        t0 = time.monotonic()
        await eventually(lambda: sink.stats()["points_written_total"] == 3)
        assert time.monotonic() - t0 < 5  # gave up after timeout_s, not after the server's 30 s
        part = health.get(HEALTH_PART)
        assert part is not None and part.errors_total == 1 and part.state == "ok"
        await sink.stop()
        assert len(fake.writes) == 2 and fake.writes[1].lines == points(0, 3)
        assert fake.accepted == points(0, 3)
        assert sink.stats()["last_error"].startswith("no answer within 0.3 s")

    with_server(scenario)


def test_submit_never_waits_for_the_network(tmp_path: Path) -> None:
    async def scenario(fake: FakeInflux) -> None:
        fake.rule = lambda lines: Reply(204, delay_s=30)
        sink = make_sink(make_cfg(fake.url, timeout_s=5.0), tmp_path)
        sink.start()
        sink.submit(points(0, 50))
        await eventually(lambda: len(fake.writes) >= 1)  # a request is hanging now
        t0 = time.perf_counter()
        for i in range(50):
            sink.submit(points(100 + i * 50, 50))
        elapsed = time.perf_counter() - t0
        assert elapsed < 1.0, f"50 submits took {elapsed:.3f} s"
        assert sink.stats()["spool_pending_points"] == 2550
        await sink.stop()
        assert sink.stats()["points_written_total"] == 0

    with_server(scenario)


def test_refused_connection_keeps_everything_until_the_server_appears(tmp_path: Path) -> None:
    async def main() -> None:
        port = free_port()
        health = HealthBoard()
        sink = make_sink(make_cfg(f"http://127.0.0.1:{port}"), tmp_path, health, backoff_cap_s=0.05)
        sink.start()
        sink.submit(points(0, 4))
        await eventually(lambda: sink.stats()["points_retried_total"] >= 8)
        part = health.get(HEALTH_PART)
        assert part is not None and (part.state, part.detail) == ("degraded", "unreachable")
        sink.submit(points(4, 4))
        assert sink.stats()["spool_pending_points"] == 8
        fake = FakeInflux()
        await fake.start(port=port)
        try:
            await eventually(lambda: sink.stats()["points_written_total"] == 8)
            await sink.stop()
            assert fake.accepted == points(0, 8)
        finally:
            await fake.stop()

    asyncio.run(main())


# ------------------------------------------------------------------------- v1 extras


def test_missing_database_is_created_once(tmp_path: Path) -> None:
    async def scenario(fake: FakeInflux) -> None:
        fake.push(error(404, 'database not found: "wattprint"'))
        sink = make_sink(make_cfg(fake.url, database='watt"print'), tmp_path)
        sink.submit(points(0, 2))
        sink.start()
        await eventually(lambda: sink.stats()["points_written_total"] == 2)
        await sink.stop()
        assert [q.query["q"] for q in fake.queries] == ['CREATE DATABASE "watt\\"print"']
        assert [r.status for r in fake.writes] == [404, 204]

    with_server(scenario)


# ------------------------------------------------------------------------ lifecycle


def test_stop_keeps_undelivered_lines_and_a_new_sink_replays_them(tmp_path: Path) -> None:
    async def scenario(fake: FakeInflux) -> None:
        fake.rule = lambda lines: error(503, "down")
        sink = make_sink(make_cfg(fake.url, batch_size=3), tmp_path)
        sink.start()
        sink.submit(points(0, 10))
        await eventually(lambda: len(fake.writes) >= 2)
        await sink.stop()
        assert fake.accepted == []

        fake.rule = None
        sink = make_sink(make_cfg(fake.url, batch_size=3), tmp_path)
        assert sink.stats()["spool_pending_points"] == 10
        sink.start()
        await eventually(lambda: sink.stats()["points_written_total"] == 10)
        await sink.stop()
        assert fake.accepted == points(0, 10)

    with_server(scenario)


def test_stop_flushes_what_was_just_submitted(tmp_path: Path) -> None:
    async def scenario(fake: FakeInflux) -> None:
        sink = make_sink(make_cfg(fake.url, flush_interval_s=30.0), tmp_path)
        sink.start()
        await asyncio.sleep(0.1)  # the task is now waiting out the long interval
        sink.submit(points(0, 3))
        await sink.stop()
        assert fake.accepted == points(0, 3)

    with_server(scenario)


def test_lines_with_newlines_are_refused_at_submit(tmp_path: Path) -> None:
    async def scenario(fake: FakeInflux) -> None:
        sink = make_sink(make_cfg(fake.url), tmp_path)
        sink.submit(points(0, 2) + ["m v=1 1\nevil v=1 2", "m v=1 1\r"] + points(2, 1))
        sink.start()
        await eventually(lambda: sink.stats()["points_written_total"] == 3)
        await sink.stop()
        assert fake.accepted == points(0, 3)
        assert sink.stats()["points_dropped_total"]["invalid"] == 2

    with_server(scenario)


def test_submit_after_stop_is_counted_not_raised(tmp_path: Path) -> None:
    async def scenario(fake: FakeInflux) -> None:
        sink = make_sink(make_cfg(fake.url), tmp_path)
        sink.start()
        await sink.stop()
        sink.submit(points(0, 3))
        assert sink.stats()["points_dropped_total"]["spool_error"] == 3
        assert "spool write failed" in sink.stats()["last_error"]

    with_server(scenario)


def test_spool_cap_drops_are_reported(tmp_path: Path) -> None:
    async def scenario(fake: FakeInflux) -> None:
        fake.rule = lambda lines: error(503, "down")
        sink = make_sink(make_cfg(fake.url, spool_max_bytes=8192), tmp_path)
        for i in range(0, 2000, 20):
            sink.submit(points(i, 20))
        stats = sink.stats()
        assert stats["points_dropped_total"]["spool_full"] > 0
        assert stats["spool_bytes"] <= 8192 + 4096 + 2048
        assert stats["spool_oldest_age_s"] >= 0.0
        await sink.stop()

    with_server(scenario)


# -------------------------------------------------------------------------------- v2


def test_v2_api_through_influxdb_client(tmp_path: Path) -> None:
    def rule(lines: list[str]) -> Reply | None:
        if any("BAD" in line for line in lines):
            return Reply(400, '{"code":"invalid","message":"unable to parse BAD"}')
        return None

    async def scenario(fake: FakeInflux) -> None:
        fake.rule = rule
        fake.push(Reply(429, '{"code":"too many requests","message":"slow down"}', {"Retry-After": "0.2"}))
        cfg = make_cfg(fake.url, api="v2", org="acme", bucket="energy", token="tok-v2", gzip=True)
        sink = make_sink(cfg, tmp_path)
        batch = points(0, 3) + ["device_power,host=h BAD=x 1"] + points(3, 3)
        sink.submit(batch)
        sink.start()
        await eventually(lambda: sink.stats()["points_written_total"] == 6)
        await eventually(lambda: sink.stats()["points_dropped_total"]["rejected"] == 1)
        await sink.stop()
        assert fake.accepted == points(0, 6)
        first = fake.writes[0]
        assert first.path == "/api/v2/write" and first.status == 429
        assert first.query["org"] == "acme" and first.query["bucket"] == "energy" and first.query["precision"] == "ns"
        assert first.headers["Authorization"] == "Token tok-v2"
        assert fake.writes[1].at_s - first.at_s >= 0.18
        assert sink.stats()["last_error"] == "HTTP 400: unable to parse BAD"

    with_server(scenario)


def test_v2_unreachable_is_retried(tmp_path: Path) -> None:
    async def main() -> None:
        port = free_port()
        cfg = make_cfg(f"http://127.0.0.1:{port}", api="v2", org="acme", bucket="energy", token="t", timeout_s=0.5)
        health = HealthBoard()
        sink = make_sink(cfg, tmp_path, health, backoff_cap_s=0.05)
        sink.submit(points(0, 2))
        sink.start()
        await eventually(lambda: sink.stats()["points_retried_total"] >= 4)
        part = health.get(HEALTH_PART)
        assert part is not None and part.state == "degraded"
        fake = FakeInflux()
        await fake.start(port=port)
        try:
            await eventually(lambda: sink.stats()["points_written_total"] == 2)
            await sink.stop()
        finally:
            await fake.stop()
        assert fake.accepted == points(0, 2)

    asyncio.run(main())


# ------------------------------------------------- only 204 is delivered (issue 11)


def _html(status: int = 200) -> Reply:
    return Reply(status, "<html><body>Sign in</body></html>", {"Content-Type": "text/html; charset=utf-8"})


@pytest.mark.parametrize("api", ["v1", "v2"])
@pytest.mark.parametrize("kind", ["302", "307", "200-html"])
def test_redirect_or_page_is_not_delivery(tmp_path: Path, api: str, kind: str) -> None:
    """A redirect (to a page that answers 200) or a 200 page keeps every line, degrades
    the sink with a clear detail, and the lines are delivered exactly once after."""

    async def scenario(fake: FakeInflux) -> None:
        if kind == "200-html":
            bad = _html()
        else:
            bad = Reply(int(kind), "", {"Location": fake.url + "/login"})
        fake.push(bad, bad, bad)
        health = HealthBoard()
        extra: dict[str, Any] = dict(api="v2", org="acme", bucket="energy", token="t") if api == "v2" else {}
        sink = make_sink(make_cfg(fake.url, **extra), tmp_path, health)
        sink.submit(points(0, 5))
        sink.start()
        await eventually(lambda: len(fake.writes) >= 1)
        await eventually(lambda: part_state(health) == "degraded")
        part = health.get(HEALTH_PART)
        assert part is not None
        if kind == "200-html":
            assert part.detail == "InfluxDB answered 200 (text/html) instead of 204; writes need a 204"
        else:
            assert part.detail == f"InfluxDB answered {kind} redirect to {fake.url}/login; writes need a 204"
        assert sink.stats()["spool_pending_points"] == 5
        await eventually(lambda: sink.stats()["points_written_total"] == 5)
        await sink.stop()
        assert fake.accepted == points(0, 5)  # exactly once
        assert [r.status for r in fake.writes] == [int(kind.split("-")[0])] * 3 + [204]
        assert not any(r.path == "/login" for r in fake.requests)  # never followed
        stats = sink.stats()
        reason = "not_204" if kind == "200-html" else "redirect"
        assert stats["write_failures_total"] == {reason: 3}
        assert stats["points_retried_total"] == 15
        part = health.get(HEALTH_PART)
        assert part is not None and part.state == "ok" and part.errors_total == 3

    with_server(scenario)


# ------------------------------------------------------------ loss episodes (issue 11)


def test_dead_letter_episode_logs_a_bounded_number_of_lines_and_ends_with_a_summary(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(fake: FakeInflux) -> None:
        fake.rule = lambda lines: error(400, "bad request from the proxy " + lines[0][:40])
        health = HealthBoard()
        sink = make_sink(make_cfg(fake.url, batch_size=16), tmp_path, health, loss_hold_s=0.5)
        sink.start()
        for i in range(0, 300, 10):
            sink.submit(points(i, 10))
        await eventually(lambda: sink.stats()["points_dropped_total"]["rejected"] == 300)
        part = health.get(HEALTH_PART)
        assert part is not None and part.state == "degraded"
        assert part.detail.startswith("at least 100 lines dead-lettered: InfluxDB rejected them (HTTP 400: bad request")
        fake.rule = None
        sink.submit(points(300, 5))
        await eventually(lambda: sink.stats()["points_written_total"] == 5)
        await eventually(lambda: part_state(health) == "ok", timeout=5)
        await sink.stop()
        assert fake.accepted == points(300, 5)
        text = (tmp_path / "spool" / DEAD_LETTER_FILE).read_text()
        assert all(f"\n{line}\n" in text for line in points(0, 300))

    with caplog.at_level("INFO"):
        with_server(scenario)
    messages = [r.getMessage() for r in caplog.records]
    # at least 1, 10, 100: three degraded lines, one summary, one recovery; never one per line
    assert len([m for m in messages if "degraded" in m and "dead-lettered" in m]) == 3, messages
    [summary] = [m for m in messages if "nothing lost for" in m]
    assert "rejected: 300" in summary
    assert len(messages) <= 8, messages


def test_spool_cap_drops_degrade_the_sink_even_while_the_server_answers(tmp_path: Path) -> None:
    async def scenario(fake: FakeInflux) -> None:
        fake.rule = lambda lines: Reply(204, delay_s=30)  # slow: the spool fills up meanwhile
        health = HealthBoard()
        sink = make_sink(make_cfg(fake.url, spool_max_bytes=8192, timeout_s=5.0), tmp_path, health)
        for i in range(0, 2000, 20):
            sink.submit(points(i, 20))
        part = health.get(HEALTH_PART)
        dropped = sink.stats()["points_dropped_total"]["spool_full"]
        assert dropped > 0
        assert part is not None and part.state == "degraded"
        assert "dropped: spool full" in part.detail
        await sink.stop()

    with_server(scenario)


def test_unwritable_dead_letter_file_is_counted_and_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(fake: FakeInflux) -> None:
        fake.rule = lambda lines: error(400, "nope")
        health = HealthBoard()
        sink = make_sink(make_cfg(fake.url), tmp_path, health)
        (tmp_path / "spool" / DEAD_LETTER_FILE).mkdir()  # a directory: cannot be appended to
        sink.submit(points(0, 20))
        sink.start()
        await eventually(lambda: sink.stats()["points_dropped_total"]["rejected"] == 20)
        await sink.stop()
        stats = sink.stats()
        assert stats["points_dropped_total"]["dead_letter_unwritable"] == 20
        part = health.get(HEALTH_PART)
        assert part is not None and "dead-letter file could not be written" in part.detail

    with caplog.at_level("INFO"):
        with_server(scenario)
    assert len([r for r in caplog.records if "cannot write dead-letter file" in r.getMessage()]) == 1
