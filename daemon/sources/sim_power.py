"""Simulated board power over time, shared by the NVML and amdsmi simulators.

A GPU's power in a sim file is a constant (``power_w``) or a cycle of ``[watts, seconds]``
steps (``power_pattern``). Each time the file is re-read the simulator appends the new
profile to a timeline, a list of ``(from clock s, PowerProfile)`` in ascending order (the
first entry also stands for all time before it), so energy and power over any recent
span use the power that was in force at each moment. Both simulators keep such a
timeline per GPU and integrate their energy counters from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["PowerProfile", "Timeline", "energy_between_j", "instant_w", "new_timeline", "update_timeline"]


@dataclass(frozen=True)
class PowerProfile:
    """Power over time: a constant, or a cycle of (watts, seconds) steps from ``t0``."""

    watts: float
    steps: tuple[tuple[float, float], ...] = ()
    t0: float = 0.0

    def instant_w(self, t: float) -> float:
        if not self.steps:
            return self.watts
        x = (t - self.t0) % sum(s for _, s in self.steps)
        for w, s in self.steps:
            if x < s:
                return w
            x -= s
        return self.steps[-1][0]

    def energy_j(self, a: float, b: float) -> float:
        """Joules drawn from clock time ``a`` to ``b`` (b >= a)."""
        if b <= a:
            return 0.0
        if not self.steps:
            return self.watts * (b - a)
        return self._cumulative(b) - self._cumulative(a)

    def _cumulative(self, t: float) -> float:
        period = sum(s for _, s in self.steps)
        cycles = math.floor((t - self.t0) / period)
        x = (t - self.t0) - cycles * period
        acc = cycles * sum(w * s for w, s in self.steps)
        for w, s in self.steps:
            take = min(x, s)
            acc += w * take
            x -= take
            if x <= 0:
                break
        return acc


Timeline = list[tuple[float, PowerProfile]]


def energy_between_j(power: Timeline, a: float, b: float) -> float:
    """Joules drawn from clock time ``a`` to ``b`` under the timeline ``power``."""
    total = 0.0
    for i, (start, prof) in enumerate(power):
        lo = a if i == 0 else max(a, start)
        hi = b if i + 1 == len(power) else min(b, power[i + 1][0])
        if hi > lo:
            total += prof.energy_j(lo, hi)
    return total


def instant_w(power: Timeline, t: float) -> float:
    """Watts drawn at clock time ``t`` under the timeline ``power``."""
    prof = power[0][1]
    for start, p in power:
        if start <= t:
            prof = p
    return prof.instant_w(t)


def new_timeline(power_w: float, pattern: tuple[tuple[float, float], ...], now: float) -> Timeline:
    """The timeline of a GPU first seen at ``now`` (a pattern starts its cycle then)."""
    return [(now, PowerProfile(power_w, pattern, now))]


def update_timeline(power: Timeline, power_w: float, pattern: tuple[tuple[float, float], ...],
                    now: float, history_s: float) -> None:
    """Apply a re-read of the sim file at ``now``: append the new profile if it changed (a
    re-read of the same pattern keeps its cycle's start) and drop entries that ended more
    than ``history_s`` ago."""
    prev = power[-1][1]
    if pattern:
        t0 = prev.t0 if prev.steps == pattern else now
        profile = PowerProfile(power_w, pattern, t0)
    else:
        profile = PowerProfile(power_w)
    if profile != prev:
        power.append((now, profile))
    keep = [k for k, (start, _) in enumerate(power) if start <= now - history_s]
    if keep:
        del power[:keep[-1]]
