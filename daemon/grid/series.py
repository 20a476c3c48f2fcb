"""Pure functions over an intensity series (a list of IntensityPoint for one provider
and zone): look up the value for an instant and the provider interval ("slot") that
holds it, merge a new fetch into what is known, and find the lowest-intensity window
of a given length (the carbon-aware hint).

A series is kept sorted by ``start`` with one point per start; ``merge`` returns it in
that form and the other functions expect it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Iterable, Sequence

from .base import IntensityPoint, as_utc


def intensity_at(points: Sequence[IntensityPoint], t: datetime) -> IntensityPoint | None:
    """The point whose ``[start, end)`` covers ``t``; else the latest point that starts
    before ``t`` (a stand-in: check ``p.start <= t < p.end`` to tell); else None."""
    if not points:
        return None
    t = as_utc(t, "t")
    i = bisect.bisect_right(points, t, key=lambda p: p.start) - 1
    if i < 0:
        return None
    return points[i]


def slot_at(points: Sequence[IntensityPoint], t: datetime, default_s: int) -> tuple[datetime, datetime]:
    """The provider interval ("slot") ``[start, end)`` that holds ``t``: energy used at
    ``t`` is booked against this interval's intensity.

    - A point covers ``t``: that point's ``[start, end)``.
    - In a gap or past the end of the series: the interval of the latest earlier
      point's width on that point's grid (its ``end`` + k x width), the interval a
      value for ``t`` will have when it arrives from a regular provider.
    - Before the series (or none): the ``default_s`` interval of the UTC epoch grid.

    In every case the slot is cut at the next point's start, so slots never overlap
    a known point they do not belong to, and ``start <= t < end`` always holds.
    """
    if default_s <= 0:
        raise ValueError(f"default_s must be > 0, got {default_s!r}")
    t = as_utc(t, "t")
    i = bisect.bisect_right(points, t, key=lambda p: p.start) - 1
    if i >= 0 and points[i].start <= t < points[i].end:
        start, end = points[i].start, points[i].end
    else:
        if i >= 0:
            width, origin = points[i].end - points[i].start, points[i].end
        else:
            width, origin = timedelta(seconds=default_s), datetime.fromtimestamp(0, t.tzinfo)
        start = origin + ((t - origin) // width) * width
        end = start + width
    if i + 1 < len(points) and points[i + 1].start < end:
        end = points[i + 1].start  # > t: bisect_right put it after t
    return start, end


def covers(point: IntensityPoint, t: datetime) -> bool:
    """True when ``t`` lies in ``[point.start, point.end)``."""
    return point.start <= as_utc(t, "t") < point.end


def merge(existing: Iterable[IntensityPoint], new: Iterable[IntensityPoint]) -> list[IntensityPoint]:
    """``existing`` updated with ``new``, sorted by start, one point per start.

    For the same start: an actual replaces a forecast; a forecast never replaces an
    actual; between two of the same kind the newer fetch (``new``) wins, so revised
    actuals and updated forecasts take effect.
    """
    by_start: dict[datetime, IntensityPoint] = {p.start: p for p in existing}
    for p in new:
        prev = by_start.get(p.start)
        if prev is not None and prev.kind == "actual" and p.kind == "forecast":
            continue
        by_start[p.start] = p
    return [by_start[k] for k in sorted(by_start)]


@dataclass(frozen=True)
class LowWindow:
    """The lowest-intensity window found: ``[start, end)`` and its time-weighted mean."""

    start: datetime
    end: datetime
    mean_g_per_kwh: float


def _runs(points: Sequence[IntensityPoint]) -> list[list[tuple[datetime, datetime, float]]]:
    """Contiguous runs of (start, end, g_per_kwh) segments; a gap starts a new run.
    A point that overlaps the next one is cut at the next one's start."""
    runs: list[list[tuple[datetime, datetime, float]]] = []
    current: list[tuple[datetime, datetime, float]] = []
    for i, p in enumerate(points):
        end = p.end
        if i + 1 < len(points) and points[i + 1].start < end:
            end = points[i + 1].start
        if current and current[-1][1] != p.start:
            runs.append(current)
            current = []
        current.append((p.start, end, p.g_per_kwh))
    if current:
        runs.append(current)
    return runs


def lowest_window(points: Sequence[IntensityPoint], duration_s: float, now: datetime,
                  lookback_s: float = 86400.0) -> LowWindow | None:
    """The window of ``duration_s`` with the lowest mean intensity, looking at the known
    series from ``now - lookback_s`` (past day by default) to its end (forecasts included).

    Windows must lie wholly inside contiguous data (no gaps). Candidate windows start or
    end on a point boundary, which is where the minimum of a step function's moving
    average lies. Ties go to the earliest window. None when no window fits.
    """
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s!r}")
    earliest = as_utc(now, "now") - timedelta(seconds=lookback_s)
    kept = [p for p in points if p.end > earliest]
    dur = timedelta(seconds=duration_s)
    best: LowWindow | None = None
    for run in _runs(kept):
        run_start = max(run[0][0], earliest)
        run_end = run[-1][1]
        if run_end - run_start < dur:
            continue
        # Cumulative integral (g/kWh · s) at each segment start.
        starts = [s for s, _, _ in run]
        cum = [0.0]
        for s, e, g in run:
            cum.append(cum[-1] + g * (e - s).total_seconds())

        def integral_to(t: datetime) -> float:
            i = max(0, bisect.bisect_right(starts, t) - 1)
            s, _, g = run[i]
            return cum[i] + g * (t - s).total_seconds()

        candidates = {run_start}
        for s, e, _ in run:
            candidates.add(s)
            candidates.add(e - dur)
        for c in sorted(candidates):
            if c < run_start or c + dur > run_end:
                continue
            mean = (integral_to(c + dur) - integral_to(c)) / duration_s
            if best is None or mean < best.mean_g_per_kwh - 1e-9:
                best = LowWindow(start=c, end=c + dur, mean_g_per_kwh=mean)
    return best
