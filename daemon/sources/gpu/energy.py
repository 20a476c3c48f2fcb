"""A GPU board's energy over one read: the difference of its energy counter
(``CounterDiff.step``: first, difference, wrapped, reset, implausible; source
"counter"), the previous average power x dt when the counter cannot be trusted, or,
for a board without a counter, its sampled power integrated by trapezoid (source
"power"), sampled both at each read and by the sampler thread (sampler.py).

``BoardEnergy`` is a part of ``GpuSource`` (policy.py), which inherits it.
Vendor-neutral: the counter and power come through ``GpuVendor``.
"""

from __future__ import annotations

from typing import Any, Callable

from ...model import EnergySource
from ..base import CounterDiff, CounterStepKind
from .state import Board, Feature, GpuState, Lost, NoEnergy
from .vendor import GpuError, GpuErrorKind, GpuVendor


class BoardEnergy:
    """The energy of one board per read, for ``GpuSource`` (see the module docstring)."""

    _vendor: GpuVendor
    _problems: list[str]
    _feature: Callable[[GpuState, str], Feature]
    _unsupported: Callable[..., Any]
    _want_sampler: Callable[[Board, GpuState], None]

    def _energy(self, board: Board, st: GpuState, now: float,
                dt: float) -> tuple[float, EnergySource, float | None]:
        """(joules since the last read, source, average or sampled power or None).
        Raises GpuError (GPU skipped, baseline kept) or Lost."""
        counter = self._feature(st, "energy_counter")
        if counter.supported:
            try:
                count = self._vendor.energy(board.handle)
            except GpuError as exc:
                if exc.kind is GpuErrorKind.LOST:
                    raise Lost(exc.text) from None
                if exc.kind is not GpuErrorKind.NOT_SUPPORTED:
                    raise
                self._unsupported(board, counter, "energy_counter", "energy counter", exc.why)
                st.counter = CounterDiff(max_value=None)
            else:
                st.counter.max_value = count.max_value
                step = st.counter.step(count.value)
                if step.kind is CounterStepKind.DIFFERENCE or step.kind is CounterStepKind.WRAPPED:
                    assert step.delta is not None
                    return step.delta / count.ticks_per_joule, "counter", None
                if step.kind is CounterStepKind.FIRST:  # the baseline; one power sample so the first reading shows a power
                    return 0.0, "counter", self._power_w_quiet(board, st)
                if step.kind is CounterStepKind.RESET and st.lost_since_read:
                    # Back from a loss with the counter restarted (a GPU reset): the
                    # value is the energy since the restart; before it, nothing was
                    # measured. Never the last power x the whole gap (phantom energy
                    # charged to whoever runs on the GPU now).
                    self._problems.append(f"{board.device}: energy counter restarted while the GPU was lost: "
                                          "the energy of the gap before the restart is unknown (not booked); "
                                          "the energy since the restart is booked unattributed")
                    st.energy_unplaced = True  # when in the gap it was used, and by whom, is unknown
                    return count.value / count.ticks_per_joule, "counter", None
                if step.kind is CounterStepKind.RESET:
                    self._problems.append(f"{board.device}: energy counter went backwards (driver reload?): "
                                          "this interval uses the previous average power")
                else:  # IMPLAUSIBLE: a value no counter of this width can hold
                    self._problems.append(f"{board.device}: energy counter reading not trusted ({step.reason}): "
                                          "this interval uses the previous average power")
                fallback_w = st.last_avg_power_w
                if fallback_w is None:
                    fallback_w = self._power_w_quiet(board, st)
                return (fallback_w or 0.0) * dt, "power", fallback_w
        # No energy counter: sampled power (here and on the sampler thread), integrated.
        watts = self._power_w(board, st)
        if watts is None and not self._feature(st, "power").supported:
            raise NoEnergy()
        if watts is not None:
            st.integrator.add(now, watts)
        self._want_sampler(board, st)
        energy_j, span, last_w = st.integrator.take()
        avg_w = energy_j / span if span > 0 else last_w
        return energy_j, "power", avg_w

    def _power_w_quiet(self, board: Board, st: GpuState) -> float | None:
        try:
            return self._power_w(board, st)
        except (GpuError, Lost):
            return None

    def _power_w(self, board: Board, st: GpuState) -> float | None:
        feat = self._feature(st, "power")
        if not feat.supported:
            return None
        try:
            return float(self._vendor.power_w(board.handle))
        except GpuError as exc:
            if exc.kind is GpuErrorKind.LOST:
                raise Lost(exc.text) from None
            if exc.kind is GpuErrorKind.NOT_SUPPORTED:
                self._unsupported(board, feat, "power", "power usage", exc.why)
                return None
            raise
