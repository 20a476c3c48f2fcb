"""Which grid intensity applies to a moment, and how sure we are of it.

The book holds the provider's series (at the provider's own resolution) and answers
``lookup(wall_s)`` for the tick thread:

- a realised (``actual``) value covering that moment: ``final``;
- a forecast covering it, or the latest earlier value standing in: ``provisional``;
- nothing known yet (provider down since start): the configured
  ``static_g_per_kwh``, ``provisional``, basis ``fallback``.

Each value comes with the provider interval ("slot", ``Intensity.start``/``end``)
it is for: the covering point's ``[start, end)``; for a stand-in, the interval the
value for that moment will have (the latest point's width on its grid); with nothing
known, the ``FALLBACK_SLOT_S`` grid (5 minutes divides every provider's resolution,
so settlement can give each such slot its own provider value later). The static
provider is always ``final`` and has no slot (its value holds for a whole bucket).

The ledger books each tick's energy against the slot of the tick and stores the
chosen value per slot of a bucket; ``Engine.settle_blocking`` replaces provisional
slot values (looked up again at the slot's middle) when better data arrive.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from typing import Iterable

from .config import GridConfig
from .grid.base import IntensityPoint
from .grid.series import covers, intensity_at, lowest_window, merge, slot_at
from .model import Intensity
from .timefmt import utc

J_PER_KWH = 3.6e6  # joules in a kilowatt-hour: the one copy of this unit


def co2e_g(energy_j: float, g_per_kwh: float, pue: float = 1.0) -> float:
    """The one CO2e formula: IT energy (J) x facility overhead (PUE) x grid intensity
    (gCO2e/kWh) -> grams CO2e."""
    return energy_j / J_PER_KWH * g_per_kwh * pue


# How sure an intensity value is, by its basis (settlement never replaces a value by a
# less sure one; a bucket shows the least sure basis of its slots).
BASIS_RANK = {"fallback": 0, "latest": 1, "forecast": 2, "actual": 3, "static": 3}

KEEP_S = 4 * 86400  # points older than this are dropped from memory (the store keeps them)
FALLBACK_SLOT_S = 300  # slot width while no value is known: divides 5, 30 and 60 minutes


def _utc(wall_s: float) -> datetime:
    return utc(wall_s)


class IntensityBook:
    """The intensity series in memory; updated by the grid fetcher, read by ticks."""

    def __init__(self, grid: GridConfig, provider_name: str, zone: str, static_g_per_kwh: float | None = None):
        self.provider = provider_name
        self.zone = zone
        self._fallback_g_per_kwh = grid.static_g_per_kwh
        self._static_g_per_kwh = static_g_per_kwh  # set for the static provider
        self._lock = threading.Lock()
        self._points: list[IntensityPoint] = []

    @property
    def is_static(self) -> bool:
        return self._static_g_per_kwh is not None

    def update(self, points: Iterable[IntensityPoint], now_s: float) -> None:
        cutoff = _utc(now_s) - timedelta(seconds=KEEP_S)
        with self._lock:
            merged = merge(self._points, points)
            self._points = [p for p in merged if p.end > cutoff]

    def points(self) -> list[IntensityPoint]:
        with self._lock:
            return list(self._points)

    def lookup(self, wall_s: float) -> Intensity:
        if self._static_g_per_kwh is not None:
            return Intensity(self._static_g_per_kwh, "final", self.provider, self.zone, "static")
        t = _utc(wall_s)
        with self._lock:
            point = intensity_at(self._points, t)
            slot = slot_at(self._points, t, FALLBACK_SLOT_S)
        start, end = slot[0].timestamp(), slot[1].timestamp()
        if point is None:
            return Intensity(self._fallback_g_per_kwh, "provisional", self.provider, self.zone, "fallback", start, end)
        if not covers(point, t):
            return Intensity(point.g_per_kwh, "provisional", self.provider, self.zone, "latest", start, end)
        if point.kind == "actual":
            return Intensity(point.g_per_kwh, "final", self.provider, self.zone, "actual", start, end)
        return Intensity(point.g_per_kwh, "provisional", self.provider, self.zone, "forecast", start, end)

    def hint(self, energy_j: float, duration_s: float, job_co2e_g: float, pue: float, now_s: float) -> dict | None:
        """The CO2e the same job (``energy_j``, ``job_co2e_g`` as booked) would have had
        in the lowest-intensity window of its length in the known series (past day and
        forecast); None when not knowable."""
        if self.is_static or energy_j <= 0 or duration_s <= 0:
            return None
        with self._lock:
            points = list(self._points)
        window = lowest_window(points, duration_s, _utc(now_s))
        if window is None:
            return None
        best_g = co2e_g(energy_j, window.mean_g_per_kwh, pue)
        return {
            "window_start": window.start.timestamp(),
            "window_end": window.end.timestamp(),
            "g_per_kwh": window.mean_g_per_kwh,
            "co2e_g": best_g,
            "saving_g": max(0.0, job_co2e_g - best_g),
        }
