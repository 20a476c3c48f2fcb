"""The static provider: one annual-average intensity, repeated hourly, for when no live
provider is configured; plus the sourced table it reads (``data/grid_intensity_static.json``).

Zone syntax: an ISO 3166-1 alpha-2 (``DK``) or alpha-3 (``DNK``) country code, or
``WORLD``, case-insensitive. Zone keys of the live providers map to their country
(``DK1``/``DK2`` → DK, ``DK-DK2`` → DK, ``GB-region-13`` → GB, ``US-CAL-CISO`` → US).
An empty or unknown zone uses ``[grid] static_g_per_kwh`` (the points' zone is then the
configured zone, or ``static`` when empty, as daemon/carbon.py writes it) and says so
in ``source`` and ``last_warnings``: a fallback is never passed off as a country value.
Points are hourly, marked ``actual``, provider ``static``.

Precedence: a ``static_g_per_kwh`` set explicitly (``explicit_g_per_kwh``: the factory
passes it when the file, the environment or code set it, see ``config.is_set``) wins
over the table, whatever the zone; the points then keep the configured zone. Without
one, the table's entry for the zone is used. Either way ``note`` says in one line which
number is used and why, naming the table entry a zone was mapped to (``DK1`` → ``DK``);
``wattprint check-config`` prints it and the daemon logs it at start.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from importlib import resources
from typing import Any, Callable

import aiohttp

from .base import IntensityPoint, as_utc, ceil_time, floor_time, utcnow

RESOLUTION_S = 3600
MAX_POINTS = 24 * 62  # never produce more than two months of hourly points in one fetch
TABLE_FILE = "grid_intensity_static.json"


@dataclass(frozen=True)
class StaticEntry:
    code: str  # table key: ISO 3166-1 alpha-2, or WORLD
    name: str
    g_per_kwh: float
    year: int  # the year the figure describes
    source_id: str
    source_name: str

    @property
    def source(self) -> str:
        """Human-readable attribution, e.g. "Our World in Data … (Ember), 2023"."""
        return f"{self.source_name}, {self.year}"


@lru_cache(maxsize=1)
def load_table() -> dict[str, Any]:
    """The shipped table, parsed and checked (every zone names a known source)."""
    text = resources.files("wattprint.daemon").joinpath("data", TABLE_FILE).read_text(encoding="utf-8")
    table = json.loads(text)
    sources = table["sources"]
    for code, entry in table["zones"].items():
        if entry["source"] not in sources:
            raise ValueError(f"{TABLE_FILE}: zone {code} names unknown source {entry['source']!r}")
        if not (isinstance(entry["g_per_kwh"], (int, float)) and 0 <= entry["g_per_kwh"] < 2000):
            raise ValueError(f"{TABLE_FILE}: zone {code} has an implausible g_per_kwh {entry['g_per_kwh']!r}")
    return table


def _entry(code: str) -> StaticEntry:
    table = load_table()
    e = table["zones"][code]
    return StaticEntry(code=code, name=e["name"], g_per_kwh=float(e["g_per_kwh"]), year=int(e["year"]),
                       source_id=e["source"], source_name=table["sources"][e["source"]]["name"])


def lookup_static(zone: str) -> StaticEntry | None:
    """The table entry for ``zone`` (see the module doc for accepted forms), or None."""
    z = (zone or "").strip().upper()
    if not z:
        return None
    zones = load_table()["zones"]
    if z in zones:
        return _entry(z)
    for code, e in zones.items():
        if e.get("iso3") == z:
            return _entry(code)
    if re.fullmatch(r"DK[12]", z):
        return _entry("DK")
    head = z.split("-", 1)[0]
    if head != z and head in zones:
        return _entry(head)
    return None


class StaticProvider:
    """Hourly points at one constant intensity."""

    name = "static"
    resolution_s = RESOLUTION_S
    has_actuals = True

    def __init__(self, zone: str = "", fallback_g_per_kwh: float = 475.0, *,
                 explicit_g_per_kwh: float | None = None, now: Callable[[], datetime] = utcnow):
        entry = lookup_static(zone)
        self.entry = entry  # the table entry for the zone, even when an explicit value wins
        shown_zone = (zone or "").strip()
        mapped = f" (mapped to the table's {entry.code}, {entry.name})" if entry and entry.code != shown_zone.upper() else ""
        if explicit_g_per_kwh is not None:
            value = explicit_g_per_kwh
            if not (0 <= value < 5000):
                raise ValueError(f"static_g_per_kwh must be in 0..5000, got {value!r}")
            self.zone = shown_zone or "static"
            self.g_per_kwh = float(value)
            self.source = "[grid] static_g_per_kwh from the configuration"
            self.last_warnings: tuple[str, ...] = ()
            table = (f"; the shipped table's value for zone {shown_zone!r}{mapped}, {entry.g_per_kwh:g}, "
                     "is not used") if entry else ""
            self.note = f"static intensity {self.g_per_kwh:g} gCO2e/kWh: [grid] static_g_per_kwh is set{table}"
        elif entry is not None:
            self.zone = entry.code
            self.g_per_kwh = entry.g_per_kwh
            self.source = entry.source
            self.last_warnings = ()
            self.note = (f"static intensity {self.g_per_kwh:g} gCO2e/kWh: zone {shown_zone!r}{mapped} from the "
                         f"shipped table ({entry.source}); set [grid] static_g_per_kwh to use another number")
        else:
            if not (0 <= fallback_g_per_kwh < 5000):
                raise ValueError(f"static_g_per_kwh must be in 0..5000, got {fallback_g_per_kwh!r}")
            self.zone = shown_zone or "static"
            self.g_per_kwh = float(fallback_g_per_kwh)
            self.source = "[grid] static_g_per_kwh from the configuration"
            self.last_warnings = ((f"zone {zone!r} is not in the static table: " if zone else "no zone set: ")
                                  + f"using static_g_per_kwh = {self.g_per_kwh:g}",)
            self.note = f"static intensity {self.g_per_kwh:g} gCO2e/kWh: {self.last_warnings[0]}"
        self._now = now

    async def fetch(self, session: aiohttp.ClientSession | None, since: datetime, until: datetime) -> list[IntensityPoint]:
        start = floor_time(as_utc(since, "since"), RESOLUTION_S)
        end = ceil_time(as_utc(until, "until"), RESOLUTION_S)
        if end <= start:
            end = start + timedelta(seconds=RESOLUTION_S)
        hours = min(int((end - start).total_seconds() // RESOLUTION_S), MAX_POINTS)
        step = timedelta(seconds=RESOLUTION_S)
        return [IntensityPoint(start=start + i * step, end=start + (i + 1) * step, g_per_kwh=self.g_per_kwh,
                               kind="actual", zone=self.zone, provider="static") for i in range(hours)]
