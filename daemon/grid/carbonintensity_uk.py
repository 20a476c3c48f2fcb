"""UK Carbon Intensity API (NESO): half-hourly gCO2/kWh for Great Britain, national
(forecast and actual) or regional (forecast only), as IntensityPoints.

Zone syntax (case-insensitive):
- ``GB`` (or empty): national, ``/intensity/{from}/{to}``. ``actual`` when published,
  else the ``forecast`` value marked ``forecast``.
- ``GB-region-N``: one region by id (1–17, e.g. ``GB-region-13`` is London),
  ``/regional/intensity/{from}/{to}/regionid/N``.
- ``GB-postcode-OUTCODE``: the region of an outward postcode (e.g. ``GB-postcode-RG10``),
  ``/regional/intensity/{from}/{to}/postcode/OUTCODE``.
Regional data are forecasts only, so every regional point is ``forecast``
(``has_actuals`` is False).

API quirks handled: a from/to request returns the window ending at ``from`` and leaves
out the one containing ``to``; ranges are capped at 14 days (requests are split);
``data`` is a list on some endpoints and an object on others; 200 with ``{}``,
duplicates, gaps and nulls happen. Data: CC BY 4.0.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta
from typing import Any, Callable

import aiohttp

from .base import (
    MAX_TIMEOUT_S,
    IntensityPoint,
    ProviderError,
    as_utc,
    ceil_time,
    floor_time,
    get_json,
    normalise,
    parse_number,
    utcnow,
)

log = logging.getLogger("wattprint.grid.carbonintensity_uk")

DEFAULT_BASE_URL = "https://api.carbonintensity.org.uk"
RESOLUTION_S = 1800
MAX_RANGE = timedelta(days=14)
_REGION_RE = re.compile(r"^GB-REGION-(\d{1,2})$", re.IGNORECASE)
_POSTCODE_RE = re.compile(r"^GB-POSTCODE-([A-Z]{1,2}[0-9][0-9A-Z]?)$", re.IGNORECASE)


def parse_zone(zone: str) -> tuple[str, str, str]:
    """(normalised zone, scope, key): scope is "national", "regionid" or "postcode"."""
    z = (zone or "GB").strip()
    if z.upper() == "GB":
        return "GB", "national", ""
    m = _REGION_RE.match(z)
    if m:
        region = int(m.group(1))
        if not 1 <= region <= 17:
            raise ValueError(f"carbonintensity_uk region id must be 1..17, got {region} in {zone!r}")
        return f"GB-region-{region}", "regionid", str(region)
    m = _POSTCODE_RE.match(z)
    if m:
        outcode = m.group(1).upper()
        return f"GB-postcode-{outcode}", "postcode", outcode
    raise ValueError(f"carbonintensity_uk zone must be GB, GB-region-N or GB-postcode-OUTCODE "
                     f"(e.g. GB-postcode-RG10), got {zone!r}")


def _fmt(t: datetime) -> str:
    return as_utc(t).strftime("%Y-%m-%dT%H:%MZ")


def _windows(body: Any) -> list[dict[str, Any]]:
    """The list of ``{from, to, intensity}`` windows in any of the API's shapes."""
    if not isinstance(body, dict):
        raise ProviderError("bad_body", f"expected a JSON object, got {type(body).__name__}")
    if "data" not in body:
        if "error" in body:
            raise ProviderError("bad_body", "error object in a 200 response")
        raise ProviderError("bad_body", "no 'data' in the response" + (" (empty {} body)" if not body else ""))
    data = body["data"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ProviderError("bad_body", f"'data' is a {type(data).__name__}, expected a list or an object")
    windows: list[dict[str, Any]] = []
    for item in data:
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("data"), list):  # regional: {regionid, ..., data: [windows]}
            windows.extend(w for w in item["data"] if isinstance(w, dict))
        elif "intensity" in item or "from" in item:
            windows.append(item)
    if data and not windows:
        raise ProviderError("bad_body", "the response holds no intensity windows (not an /intensity endpoint?)")
    return windows


def parse_body(body: Any, *, zone: str, regional: bool) -> list[IntensityPoint]:
    """IntensityPoints from one response body (unsorted, possibly duplicated)."""
    points: list[IntensityPoint] = []
    for w in _windows(body):
        try:
            start = datetime.fromisoformat(str(w.get("from")))
            end = datetime.fromisoformat(str(w.get("to")))
        except ValueError:
            continue
        if start.tzinfo is None or end.tzinfo is None or end <= start:
            continue
        intensity = w.get("intensity")
        if not isinstance(intensity, dict):
            continue
        actual = None if regional else parse_number(intensity.get("actual"))
        forecast = parse_number(intensity.get("forecast"))
        if actual is not None:
            value, kind = actual, "actual"
        elif forecast is not None:
            value, kind = forecast, "forecast"
        else:
            continue
        points.append(IntensityPoint(start=start, end=end, g_per_kwh=value, kind=kind,  # type: ignore[arg-type]
                                     zone=zone, provider="carbonintensity_uk"))
    return points


class CarbonIntensityUKProvider:
    """National or regional GB intensity from api.carbonintensity.org.uk."""

    name = "carbonintensity_uk"
    resolution_s = RESOLUTION_S

    def __init__(self, zone: str = "", *, base_url: str = "", timeout_s: float = MAX_TIMEOUT_S,
                 now: Callable[[], datetime] = utcnow):
        self.zone, self.scope, self.key = parse_zone(zone)
        self.has_actuals = self.scope == "national"
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self.timeout_s = min(timeout_s, MAX_TIMEOUT_S)
        self._now = now
        self.last_warnings: tuple[str, ...] = ()

    def _url(self, start: datetime, end: datetime) -> str:
        span = f"{_fmt(start)}/{_fmt(end)}"
        if self.scope == "national":
            return f"{self.base_url}/intensity/{span}"
        return f"{self.base_url}/regional/intensity/{span}/{self.scope}/{self.key}"

    async def fetch(self, session: aiohttp.ClientSession, since: datetime, until: datetime) -> list[IntensityPoint]:
        since = floor_time(as_utc(since, "since"), RESOLUTION_S)
        # The window containing ``to`` is left out: ask for one more.
        until = ceil_time(as_utc(until, "until"), RESOLUTION_S)
        request_to = until + timedelta(seconds=RESOLUTION_S)
        points: list[IntensityPoint] = []
        start = since
        while start < request_to:
            end = min(start + MAX_RANGE, request_to)
            body = await get_json(session, self._url(start, end), timeout_s=self.timeout_s, now=self._now())
            points.extend(parse_body(body, zone=self.zone, regional=self.scope != "national"))
            start = end
        self.last_warnings = ()
        result = [p for p in normalise(points) if p.end > since and p.start < until]
        if not result:
            raise ProviderError("no_data", f"no intensity windows for {self.zone} between {_fmt(since)} and {_fmt(until)}")
        return result
