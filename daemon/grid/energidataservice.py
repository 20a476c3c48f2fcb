"""Energi Data Service (Denmark): realised ``CO2Emis`` and forecast ``CO2EmisProg``,
5-minute CO2 intensity of consumed electricity in g/kWh, as IntensityPoints.

Zones: ``DK1`` (West Denmark) or ``DK2`` (East Denmark); empty means ``DK1``. The API
is asked with ``timezone=UTC`` and keyed on ``Minutes5UTC``. A record that carries only
``Minutes5DK`` (Danish local time) is converted through Europe/Copenhagen, walking the
records in time order so that the hour repeated when DST ends maps to two distinct
UTC hours and nothing is duplicated or shifted. The retired CKAN shape
(``{"success", "result": {"records"}}``) is refused as ``bad_body``.

Data: CC BY 4.0, "Source: Energinet (www.energidataservice.dk)".
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone
from typing import Any, Callable
from zoneinfo import ZoneInfo

import aiohttp

from .base import (
    IntensityPoint,
    Kind,
    ProviderError,
    ceil_time,
    floor_time,
    get_json,
    normalise,
    parse_number,
    utcnow,
    as_utc,
    MAX_TIMEOUT_S,
)

log = logging.getLogger("wattprint.grid.energidataservice")

DEFAULT_BASE_URL = "https://api.energidataservice.dk"
REALISED_DATASET = "CO2Emis"
FORECAST_DATASET = "CO2EmisProg"
ZONES = ("DK1", "DK2")
RESOLUTION_S = 300
COPENHAGEN = ZoneInfo("Europe/Copenhagen")
_MAX_PAGES = 20
# Forecasts start this far before now: the realised series lags by up to ~30 min
# (updated every 15 minutes), and the forecast fills that gap.
_FORECAST_LEAD_S = 3600


def parse_utc_naive(text: str) -> datetime:
    """``2023-01-01T22:55:00`` (no offset; UTC by definition) → aware UTC datetime."""
    t = datetime.fromisoformat(text)
    if t.tzinfo is not None:
        return t.astimezone(timezone.utc)
    return t.replace(tzinfo=timezone.utc)


def local_dk_to_utc(local_times: list[datetime]) -> list[datetime]:
    """Convert naive Danish local times (one per record, in record order) to UTC.

    The hour repeated when DST ends (e.g. 02:00–02:59 on 2023-10-29) is ambiguous on
    its own; the records are therefore walked in time order and each ambiguous time
    takes the earliest UTC instant after the previous record's, so the first pass
    through the hour is CEST and the second CET. Record order is taken from the
    unambiguous records (newest first, as the API sends them, or oldest first).
    """
    if not local_times:
        return []
    unambiguous = [t for t in local_times
                   if t.replace(tzinfo=COPENHAGEN, fold=0).utcoffset() == t.replace(tzinfo=COPENHAGEN, fold=1).utcoffset()]
    descending = True
    if len(unambiguous) >= 2:
        ups = sum(1 for a, b in zip(unambiguous, unambiguous[1:]) if b > a)
        downs = sum(1 for a, b in zip(unambiguous, unambiguous[1:]) if b < a)
        descending = downs > ups
    order = list(range(len(local_times)))
    if descending:
        order.reverse()
    out: list[datetime | None] = [None] * len(local_times)
    previous: datetime | None = None
    for i in order:
        t = local_times[i]
        first = t.replace(tzinfo=COPENHAGEN, fold=0).astimezone(timezone.utc)
        second = t.replace(tzinfo=COPENHAGEN, fold=1).astimezone(timezone.utc)
        if first == second:
            chosen = first
        else:
            early, late = sorted((first, second))
            chosen = early if previous is None or early > previous else late
        out[i] = chosen
        previous = chosen
    return [t for t in out if t is not None]


def parse_records(body: Any, *, zone: str, kind: Kind, dataset: str) -> tuple[list[IntensityPoint], int]:
    """IntensityPoints for ``zone`` from a ``/dataset/{name}`` body, and the ``total``
    the server reported. Raises ProviderError(bad_body) for any other shape."""
    if not isinstance(body, dict):
        raise ProviderError("bad_body", f"{dataset}: expected a JSON object, got {type(body).__name__}")
    if "result" in body and ("success" in body or "help" in body):
        raise ProviderError("bad_body", f"{dataset}: legacy CKAN response shape (datastore_search_sql, retired in 2022); "
                                        "this client speaks the /dataset API")
    records = body.get("records")
    if not isinstance(records, list):
        raise ProviderError("bad_body", f"{dataset}: no 'records' list in the response")
    total = body.get("total")
    total_n = total if isinstance(total, int) and not isinstance(total, bool) else len(records)

    mine: list[dict[str, Any]] = []
    for rec in records:
        if not isinstance(rec, dict):
            continue
        area = rec.get("PriceArea")
        if area is not None and area != zone:
            continue
        mine.append(rec)

    starts: list[datetime | None] = [None] * len(mine)
    dk_only: list[int] = []
    for i, rec in enumerate(mine):
        utc_text = rec.get("Minutes5UTC")
        if isinstance(utc_text, str):
            try:
                starts[i] = parse_utc_naive(utc_text)
            except ValueError:
                pass
        elif isinstance(rec.get("Minutes5DK"), str):
            dk_only.append(i)
    if dk_only:
        local: list[datetime] = []
        keep: list[int] = []
        for i in dk_only:
            try:
                t = datetime.fromisoformat(mine[i]["Minutes5DK"])
            except ValueError:
                continue
            if t.tzinfo is not None:
                starts[i] = t.astimezone(timezone.utc)
                continue
            local.append(t)
            keep.append(i)
        for i, t in zip(keep, local_dk_to_utc(local)):
            starts[i] = t

    if mine and all(not isinstance(r.get("Minutes5UTC"), str) and not isinstance(r.get("Minutes5DK"), str)
                    for r in mine):
        raise ProviderError("bad_body", f"{dataset}: records carry neither Minutes5UTC nor Minutes5DK "
                                        "(a different dataset?)")
    points: list[IntensityPoint] = []
    skipped = 0
    for rec, start in zip(mine, starts):
        value = parse_number(rec.get("CO2Emission"))
        if start is None or value is None:
            skipped += 1
            continue
        points.append(IntensityPoint(start=start, end=start + timedelta(seconds=RESOLUTION_S), g_per_kwh=value,
                                     kind=kind, zone=zone, provider="energidataservice"))
    if skipped:
        log.debug("%s %s: skipped %d records without a time or a value", dataset, zone, skipped)
    return points, total_n


def _fmt(t: datetime) -> str:
    return as_utc(t).strftime("%Y-%m-%dT%H:%M")


class EnergiDataServiceProvider:
    """CO2Emis (actual) and CO2EmisProg (forecast) for DK1 or DK2."""

    name = "energidataservice"
    resolution_s = RESOLUTION_S
    has_actuals = True

    def __init__(self, zone: str = "", *, base_url: str = "", timeout_s: float = MAX_TIMEOUT_S,
                 page_limit: int | None = None, now: Callable[[], datetime] = utcnow):
        zone = (zone or "DK1").strip().upper()
        if zone not in ZONES:
            raise ValueError(f"energidataservice zone must be DK1 or DK2, got {zone!r}")
        self.zone = zone
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self.timeout_s = min(timeout_s, MAX_TIMEOUT_S)
        self._now = now
        self.page_limit = page_limit  # records per request; None: the whole range in one page
        self.last_warnings: tuple[str, ...] = ()

    async def _dataset(self, session: aiohttp.ClientSession, dataset: str, kind: Kind,
                       start: datetime, end: datetime) -> list[IntensityPoint]:
        """All records of ``dataset`` for this zone in [start, end), following pages."""
        expected = max(1, int((end - start).total_seconds() // RESOLUTION_S))
        limit = self.page_limit or expected + 24
        points: list[IntensityPoint] = []
        offset = 0
        for _ in range(_MAX_PAGES):
            params = {
                "start": _fmt(start),
                "end": _fmt(end),
                "timezone": "UTC",
                "filter": json.dumps({"PriceArea": [self.zone]}, separators=(",", ":")),
                "columns": "Minutes5UTC,Minutes5DK,PriceArea,CO2Emission",
                "sort": "Minutes5UTC DESC",
                "limit": str(limit),
            }
            if offset:
                params["offset"] = str(offset)
            try:
                body = await get_json(session, f"{self.base_url}/dataset/{dataset}", params=params,
                                      timeout_s=self.timeout_s, now=self._now())
            except ProviderError as err:
                if err.reason == "auth":
                    # The service has no authentication: a 403 from it is its rate limiter.
                    raise ProviderError("rate_limited", f"{dataset}: {err.message} (Energi Data Service "
                                        "answers 403 when rate-limited)", retry_after_s=err.retry_after_s,
                                        status=err.status) from None
                raise
            page, total = parse_records(body, zone=self.zone, kind=kind, dataset=dataset)
            points.extend(page)
            records = body.get("records") or []
            offset += len(records)
            if not records or offset >= total or len(records) < limit:
                break
        return points

    async def fetch(self, session: aiohttp.ClientSession, since: datetime, until: datetime) -> list[IntensityPoint]:
        now = as_utc(self._now(), "now")
        since = floor_time(as_utc(since, "since"), RESOLUTION_S)
        until = ceil_time(as_utc(until, "until"), RESOLUTION_S)
        warnings: list[str] = []

        realised_end = min(until, ceil_time(now, RESOLUTION_S))
        realised: list[IntensityPoint] = []
        if realised_end > since:
            realised = await self._dataset(session, REALISED_DATASET, "actual", since, realised_end)

        forecast: list[IntensityPoint] = []
        forecast_start = max(since, floor_time(now - timedelta(seconds=_FORECAST_LEAD_S), RESOLUTION_S))
        if until > forecast_start:
            try:
                forecast = await self._dataset(session, FORECAST_DATASET, "forecast", forecast_start, until)
            except ProviderError as err:
                warnings.append(f"forecast unavailable: {err}")
                log.info("energidataservice %s: %s: %s", self.zone, FORECAST_DATASET, err)

        self.last_warnings = tuple(warnings)
        points = [p for p in normalise(forecast + realised) if p.end > since and p.start < until]
        if not points:
            raise ProviderError("no_data", f"{REALISED_DATASET}/{FORECAST_DATASET}: no values for {self.zone} "
                                           f"between {_fmt(since)}Z and {_fmt(until)}Z")
        return points
