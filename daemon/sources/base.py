"""The one interface every energy source implements, its typed errors, and the
counter-difference helper that handles wraparound and resets.

A source is polled from a worker thread once per tick. ``read()`` returns the energy
each of its devices used since the previous ``read()`` (the first call establishes
baselines and may return zero-energy readings). A source raises ``SourceError`` when
it cannot read at all; the engine then marks it degraded, counts it, and goes on with
the other sources. ``SourceDisabled`` (a ``SourceError``) says there is nothing to
measure yet (no driver): the source is shown disabled and still read every tick.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Mapping, Protocol, Sequence

from ..model import DeviceReading


class SourceError(Exception):
    """A source could not be read this tick. ``detail`` is shown in /healthz. The
    engine retries every tick whatever the cause (a read is cheap, and a permission or
    driver fixed by hand is then picked up without a restart)."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class SourceDisabled(SourceError):
    """Nothing to measure yet, and that is no fault (no GPU driver loaded): the engine
    shows the source as *disabled* with ``detail``, not degraded, and keeps reading it."""


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


# (device, reason) -> how many readings of that device's counter were not trusted.
# A source may offer ``counter_glitches() -> CounterGlitches`` (optional; the engine
# looks it up with getattr and shows it as wattprint_counter_glitches_total). The
# mapping returned must not change afterwards (return a new one after each change),
# since the engine reads it from another thread.
CounterGlitches = Mapping[tuple[str, str], int]


class CounterStepKind(Enum):
    """What one new reading of a counter means (as Alumet's CounterDiff result)."""

    FIRST = "first"  # no previous reading: this one is the baseline
    DIFFERENCE = "difference"  # went up by a plausible amount
    WRAPPED = "wrapped"  # went down, and (max - prev) + value is a plausible increase
    RESET = "reset"  # went down on a counter that never wraps (driver reload)
    IMPLAUSIBLE = "implausible"  # a step no hardware makes; see ``CounterStep.reason``


@dataclass(frozen=True, slots=True)
class CounterStep:
    """The typed result of ``CounterDiff.step``. ``delta`` is the increase for
    DIFFERENCE and WRAPPED, None otherwise. ``reason`` (IMPLAUSIBLE only) is one of
    ``backwards`` (went down by less than a plausible wrap), ``above_range`` (the
    value is above the counter's range) or ``jump`` (went up by more than
    ``max_delta``)."""

    kind: CounterStepKind
    delta: int | None = None
    reason: str = ""


@dataclass
class CounterDiff:
    """Difference of a monotonically increasing hardware counter between reads.

    ``max_value`` is the value at which the counter wraps to zero (RAPL's
    ``max_energy_range_uj``, a GPU vendor's counter width); ``None`` for counters that
    never wrap (NVML's u64 millijoules), where going backwards means a reset (driver
    reload).

    Fed by ``step``, which says what each new reading means as a typed
    ``CounterStep`` (first, difference, wrapped, reset, or implausible with a physics
    bound on the increase), so "no previous reading" and "the counter was reset" are
    never confused. Used by the RAPL and GPU sources.
    """

    max_value: int | None = None
    last: int | None = None
    wraps: int = 0
    resets: int = 0
    implausible: int = 0

    def step(self, value: int, max_delta: int | None = None) -> CounterStep:
        """Feed a new reading; say what it means (``CounterStep``). The new reading
        always becomes the baseline, whatever the result, so one bad step costs one
        interval, never the ones after it.

        ``max_delta`` is the largest increase physics allows since the previous
        reading (None: no bound). A wrap is accepted only when ``(max - prev) + value``
        is within it; a counter that went down by less than that is ``backwards``.
        A value above ``max_value`` is ``above_range``, and so is any step from such
        a value that is not a plain increase (a wrap from outside the range has no
        meaningful size). Nothing here ever returns a negative delta."""
        prev, self.last = self.last, value
        if prev is None:
            return CounterStep(CounterStepKind.FIRST)
        limit = self.max_value if self.max_value is not None and self.max_value > 0 else None
        if limit is not None and value > limit:
            return self._implausible("above_range")
        if value >= prev:
            delta = value - prev
            if max_delta is not None and delta > max_delta:
                return self._implausible("jump")
            return CounterStep(CounterStepKind.DIFFERENCE, delta)
        if limit is None:
            self.resets += 1
            return CounterStep(CounterStepKind.RESET)
        if prev > limit:
            return self._implausible("above_range")
        wrapped = (limit - prev) + value
        if max_delta is not None and wrapped > max_delta:
            return self._implausible("backwards")
        self.wraps += 1
        return CounterStep(CounterStepKind.WRAPPED, wrapped)

    def _implausible(self, reason: str) -> CounterStep:
        self.implausible += 1
        return CounterStep(CounterStepKind.IMPLAUSIBLE, reason=reason)
