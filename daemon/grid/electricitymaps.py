"""Electricity Maps API v3: hourly carbon intensity (gCO2e/kWh) of one zone, as
IntensityPoints.

Zone syntax: an Electricity Maps zone key, e.g. ``DE``, ``DK-DK2``, ``US-CAR-DUK``
(required: with no zone the API would answer for the caller's IP location, so the
client always sends ``shouldUseFallbackCallerLookup=false`` and checks the zone of
every answer). Token in the ``auth-token`` header.

Per fetch: ``history`` (last 24 h) or ``past-range`` (older ``since``; on 403 it falls
back to ``history``), then ``latest``, then ``forecast`` when the plan allows it — a
403 there turns forecasts off for this provider and the fetch carries on. A point with
``isEstimated: true`` is Electricity Maps' estimate standing in for a measurement, so
it is marked ``forecast`` (provisional) until a measured value replaces it. Values are
lifecycle factors unless ``emission_factor_type="direct"``.

Legacy CO2 Signal v1 bodies (``{"status", "countryCode", "data"}``; api.co2signal.com is
offline) are refused: ``status: "no-data"`` as ``no_data``, anything else as ``bad_body``.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any, Callable

import aiohttp

from ..timefmt import iso_z
from .base import (
    MAX_TIMEOUT_S,
    IntensityPoint,
    ProviderError,
    as_utc,
    floor_time,
    get_json,
    normalise,
    parse_number,
    utcnow,
)

log = logging.getLogger("wattprint.grid.electricitymaps")

DEFAULT_BASE_URL = "https://api.electricitymaps.com"
RESOLUTION_S = 3600
HISTORY_S = 24 * 3600  # what /history covers
MAX_PAST_RANGE = timedelta(days=10)  # split longer past-range requests


def _fmt(t: datetime) -> str:
    return iso_z(as_utc(t))


def _check_legacy(body: Any) -> None:
    if isinstance(body, dict) and "countryCode" in body and "status" in body:
        if body.get("status") == "no-data":
            raise ProviderError("no_data", f"legacy CO2 Signal v1 answer: no data for {body.get('countryCode')!r}")
        raise ProviderError("bad_body", "legacy CO2 Signal v1 response shape (api.co2signal.com is offline); "
                                        "this client speaks Electricity Maps v3")


def parse_entries(entries: Any, *, zone: str, what: str, forecast: bool = False) -> list[IntensityPoint]:
    """IntensityPoints from a list of ``{carbonIntensity, datetime, isEstimated}``."""
    if not isinstance(entries, list):
        raise ProviderError("bad_body", f"{what}: expected a list of entries, got {type(entries).__name__}")
    points: list[IntensityPoint] = []
    for e in entries:
        if not isinstance(e, dict):
            continue
        if e.get("zone") not in (None, zone):
            raise ProviderError("bad_body", f"{what}: answer is for zone {e.get('zone')!r}, asked for {zone!r}")
        value = parse_number(e.get("carbonIntensity"))
        try:
            start = datetime.fromisoformat(str(e.get("datetime")))
        except ValueError:
            continue
        if value is None or start.tzinfo is None:
            continue
        kind = "forecast" if forecast or e.get("isEstimated") is True else "actual"
        points.append(IntensityPoint(start=start, end=start + timedelta(seconds=RESOLUTION_S), g_per_kwh=value,
                                     kind=kind, zone=zone, provider="electricitymaps"))  # type: ignore[arg-type]
    return points


def _body_zone(body: dict[str, Any], zone: str, what: str) -> None:
    if "zone" in body and body["zone"] != zone:
        raise ProviderError("bad_body", f"{what}: answer is for zone {body['zone']!r}, asked for {zone!r}")


def parse_latest(body: Any, *, zone: str) -> list[IntensityPoint]:
    _check_legacy(body)
    if not isinstance(body, dict) or "datetime" not in body:
        raise ProviderError("bad_body", "latest: expected an object with 'datetime' and 'carbonIntensity'")
    _body_zone(body, zone, "latest")
    return parse_entries([body], zone=zone, what="latest")


def parse_history(body: Any, *, zone: str, key: str) -> list[IntensityPoint]:
    """``key`` is "history" (/history), "data" (/past-range) or "forecast" (/forecast)."""
    _check_legacy(body)
    if not isinstance(body, dict) or key not in body:
        raise ProviderError("bad_body", f"{key}: expected an object with a {key!r} list")
    _body_zone(body, zone, key)
    return parse_entries(body[key], zone=zone, what=key, forecast=key == "forecast")


class ElectricityMapsProvider:
    """Electricity Maps v3 carbon intensity for one zone."""

    name = "electricitymaps"
    resolution_s = RESOLUTION_S
    has_actuals = True

    def __init__(self, zone: str, token: str, *, base_url: str = "", timeout_s: float = MAX_TIMEOUT_S,
                 emission_factor_type: str = "lifecycle", now: Callable[[], datetime] = utcnow):
        zone = (zone or "").strip()
        if not zone:
            raise ValueError("electricitymaps needs a zone, e.g. DE or DK-DK2 (without one the API "
                             "answers for the caller's IP location)")
        if not token:
            raise ValueError("electricitymaps needs a token ([grid] token)")
        if emission_factor_type not in ("lifecycle", "direct"):
            raise ValueError(f"emission_factor_type must be lifecycle or direct, got {emission_factor_type!r}")
        self.zone = zone
        self._token = token
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self.timeout_s = min(timeout_s, MAX_TIMEOUT_S)
        self.emission_factor_type = emission_factor_type
        self._now = now
        self.forecast_allowed = True  # set False after the plan refused /forecast once
        self.past_range_allowed = True
        self.last_warnings: tuple[str, ...] = ()

    def __repr__(self) -> str:  # never show the token
        return f"ElectricityMapsProvider(zone={self.zone!r})"

    async def _get(self, session: aiohttp.ClientSession, endpoint: str, **extra: str) -> Any:
        params = {"zone": self.zone, "shouldUseFallbackCallerLookup": "false",
                  "emissionFactorType": self.emission_factor_type, **extra}
        return await get_json(session, f"{self.base_url}/v3/carbon-intensity/{endpoint}", params=params,
                              headers={"auth-token": self._token}, timeout_s=self.timeout_s, now=self._now())

    async def _realised(self, session: aiohttp.ClientSession, since: datetime, now: datetime,
                        warnings: list[str]) -> list[IntensityPoint]:
        points: list[IntensityPoint] = []
        oldest_history = floor_time(now - timedelta(seconds=HISTORY_S), RESOLUTION_S)
        if since < oldest_history and self.past_range_allowed:
            start = since
            try:
                while start < oldest_history:
                    end = min(start + MAX_PAST_RANGE, oldest_history + timedelta(seconds=RESOLUTION_S))
                    body = await self._get(session, "past-range", start=_fmt(start), end=_fmt(end))
                    points.extend(parse_history(body, zone=self.zone, key="data"))
                    start = end
            except ProviderError as err:
                if err.reason != "auth" or err.status != 403:
                    raise
                self.past_range_allowed = False
                warnings.append("past-range not in this plan (HTTP 403): backfill limited to 24 h")
                log.info("electricitymaps %s: past-range refused (403); using history only", self.zone)
        body = await self._get(session, "history")
        points.extend(parse_history(body, zone=self.zone, key="history"))
        body = await self._get(session, "latest")
        points.extend(parse_latest(body, zone=self.zone))
        return points

    async def fetch(self, session: aiohttp.ClientSession, since: datetime, until: datetime) -> list[IntensityPoint]:
        now = as_utc(self._now(), "now")
        since = floor_time(as_utc(since, "since"), RESOLUTION_S)
        until = as_utc(until, "until")
        warnings: list[str] = []
        realised = await self._realised(session, since, now, warnings)
        predicted: list[IntensityPoint] = []
        if until > now and self.forecast_allowed:
            try:
                body = await self._get(session, "forecast")
                predicted = parse_history(body, zone=self.zone, key="forecast")
            except ProviderError as err:
                if err.reason == "auth" and err.status == 403:
                    self.forecast_allowed = False
                    warnings.append("forecast not in this plan (HTTP 403): carrying on without it")
                    log.info("electricitymaps %s: forecast refused (403); not asking again", self.zone)
                elif err.reason in ("auth", "rate_limited"):
                    raise
                else:
                    warnings.append(f"forecast unavailable: {err}")
        elif not self.forecast_allowed:
            warnings.append("forecast not in this plan")
        self.last_warnings = tuple(warnings)
        # /forecast first: for the same hour an estimate from history/latest is fresher
        # (and a measured value always wins); latest comes after history.
        result = [p for p in normalise(predicted + realised) if p.end > since and p.start < until]
        if not result:
            raise ProviderError("no_data", f"no carbon-intensity values for {self.zone} in the requested range")
        return result
