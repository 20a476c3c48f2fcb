"""The GPU power sampler: a thread of its own that samples the power of every board
without an energy counter at ``[gpu] power_sample_hz`` and feeds each board's
integrator, so the energy is not aliased by reading power once per tick. It holds the
source's ``_gate`` while it calls the library, so a re-init never shuts the library
down under it.

``PowerSampler`` is a part of ``GpuSource`` (policy.py), which inherits it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from .state import Board, Feature, GpuState, PowerIntegrator
from .vendor import GpuError, GpuVendor

log = logging.getLogger("wattprint.gpu")


class PowerSampler:
    """The power sampler thread of ``GpuSource`` (see the module docstring)."""

    _vendor: GpuVendor
    _gate: Any  # threading.RLock
    _initialized: bool
    _clock: Callable[[], float]
    _power_sample_hz: float
    _sampler: threading.Thread | None
    _sampler_stop: threading.Event
    _power_targets: dict[str, tuple[Any, PowerIntegrator]]
    _feature: Callable[[GpuState, str], Feature]

    def _want_sampler(self, board: Board, st: GpuState) -> None:
        if not self._feature(st, "power").supported:
            return
        with self._gate:
            self._power_targets[st.uuid] = (board.handle, st.integrator)
        if self._sampler is None and self._power_sample_hz > 0:
            self._sampler = threading.Thread(target=self._sample_loop, name="wattprint-gpu-power", daemon=True)
            self._sampler.start()
            log.info("sampling GPU power at %g Hz for boards without an energy counter", self._power_sample_hz)

    def sample_power(self) -> int:
        """One round of the power sampler: sample each board without an energy counter
        and feed its integrator. Returns the number of samples taken."""
        taken = 0
        with self._gate:
            if not self._initialized:
                return 0
            for handle, integ in list(self._power_targets.values()):
                try:
                    watts = float(self._vendor.power_w(handle))
                except GpuError:
                    continue  # the tick's own read reports it
                integ.add(self._clock(), watts)
                taken += 1
        return taken

    def _sample_loop(self) -> None:
        period = 1.0 / self._power_sample_hz
        next_at = self._clock()
        while not self._sampler_stop.is_set():
            next_at += period
            delay = next_at - self._clock()
            if delay < 0:
                next_at = self._clock()  # fell behind: do not burst
                delay = 0.0
            if self._sampler_stop.wait(delay):
                return
            try:
                self.sample_power()
            except Exception:  # never let the sampler die; the tick's read reports errors
                log.debug("power sampler", exc_info=True)
