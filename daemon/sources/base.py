"""The one interface every energy source implements, its typed errors, and the
counter-difference helper that handles wraparound and resets.

A source is polled from a worker thread once per tick. ``read()`` returns the energy
each of its devices used since the previous ``read()`` (the first call establishes
baselines and may return zero-energy readings). A source raises ``SourceError`` when
it cannot read at all; the engine then marks it degraded, counts it, and goes on with
the other sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from ..model import DeviceReading


class SourceError(Exception):
    """A source could not be read this tick. ``detail`` is shown in /healthz."""

    def __init__(self, detail: str, *, permanent: bool = False):
        super().__init__(detail)
        self.detail = detail
        self.permanent = permanent  # True: retrying is pointless until config changes


class Source(Protocol):
    """An energy source: GPUs, CPU packages, DRAM, or an estimate of them."""

    name: str  # health name, e.g. "gpu", "rapl", "cpu-estimate"

    def read(self, now_mono_s: float) -> Sequence[DeviceReading]:
        """Energy per device since the last call. Blocking; runs off the event loop."""
        ...

    def problems(self) -> list[str]:
        """Non-fatal problems of the last read (one GPU lost, one zone vanished).
        Empty when healthy. The readings of the last read are still valid."""
        ...

    def close(self) -> None:
        ...


@dataclass
class CounterDiff:
    """Difference of a monotonically increasing hardware counter between reads.

    ``max_value`` is the value at which the counter wraps to zero (RAPL's
    ``max_energy_range_uj``); ``None`` for counters that never wrap (NVML's u64
    millijoules), where going backwards means a reset (driver reload).
    """

    max_value: int | None = None
    last: int | None = None
    wraps: int = 0
    resets: int = 0

    def update(self, value: int) -> int | None:
        """Feed a new reading; return the increase since the previous one, or None for
        the first reading and after a reset (the caller substitutes a fallback)."""
        prev, self.last = self.last, value
        if prev is None:
            return None
        if value >= prev:
            return value - prev
        if self.max_value is not None and self.max_value > 0:
            self.wraps += 1
            return (self.max_value - prev) + value
        self.resets += 1
        return None
