"""Which grid intensity applies to a moment: the static figure, or the provider's
series (actual when published, else forecast or the latest value, provisional).

The ledger stores the chosen value per bucket; settlement later replaces provisional
buckets with realised values.
"""

from __future__ import annotations

import threading

from .config import GridConfig
from .ledger import Intensity


class IntensityBook:
    """Answers ``lookup(wall_s)`` from the tick thread; updated by the grid fetcher."""

    def __init__(self, grid: GridConfig):
        self._grid = grid
        self._lock = threading.Lock()
        self._static = Intensity(
            g_per_kwh=grid.static_g_per_kwh, status="final", provider="static",
            zone=grid.zone or "static", basis="static",
        )

    @property
    def provider(self) -> str:
        return self._grid.provider

    @property
    def zone(self) -> str:
        return self._grid.zone or "static"

    def lookup(self, wall_s: float) -> Intensity | None:
        with self._lock:
            return self._static
