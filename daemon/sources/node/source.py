"""The node source: the node's input energy per tick, from its BMC, without ever
waiting for the BMC.

A BMC answers in tens of milliseconds to many seconds, and updates its readings every
few seconds. So ``NodeSource`` reads it on its own thread, every ``poll_interval_s``,
each read with its own deadline (``timeout_s``), and ``read(now_mono_s)`` (the tick's)
only takes what that thread left: it never blocks on the BMC.

Energy per tick:
- Between BMC samples, the tick's energy is the last power times the tick's interval
  (the power is held).
- Counters win over sampled power: when the BMC has an energy counter, each new counter
  value re-anchors the total. The tick in which it arrives books the correction
  ``(counter difference since the previous value) - (energy booked since then)``, so
  over any span of ticks between two counter values the energy returned sums to the
  counter's difference. The held energy booked since the previous value splits at
  the new value's reading time: what the tick booked after it belongs to the next
  span, so samples that arrive two in one tick and none in the next correct nothing
  under steady power. A correction below zero is taken from the following ticks
  (never a negative tick); each reading carries its held energy (``held_j``) so
  attribution can tell such a tick from a meter below the components.
- The first trustworthy tick (and the first after a gap that is not booked) is a
  baseline: ``read`` returns ``[]`` for it, so a 0 J reading is always a figure.
- A reading older than ``max_age_s`` (its ``ReadingTime`` against the BMC's ``Date``)
  is stale: not used, counted (``node_stale_readings_total``), health degraded. When
  the held power is older than ``max_age_s`` (stale readings, or the BMC has not
  answered), ``read`` returns ``[]``: nothing is booked for those ticks (they have no
  node figure). With an energy counter the gap is booked when the BMC is back: if the
  counter did not go back and its step is plausible for the whole span, the first
  fresh tick books the counter difference not yet booked (since the last counter
  value, less the held power booked after it) in one reading whose ``interval_s`` is
  the whole span since the last tick that had a node figure (attribution compares it
  with the measured energy of all the ticks it covers; a gap longer than ``MAX_GAP_S``
  is a new baseline). Without a counter (power
  only, as IPMI) nothing measured the gap: it is not booked, and the first fresh
  reading is a new baseline (no reading for that tick); so is one after a reset or an implausible step
  during the gap.
- A counter that went back is a reset (``node_counter_resets_total``) and one that
  rose faster than ``MAX_NODE_POWER_W`` allows is implausible
  (``node_implausible_steps_total``): either is re-baselined, its step not booked
  (the held power stands for that span), and the source is degraded until the next
  good step.
- HTTP 401/403 (or an IPMI session refused) degrades the source with a message that
  names the credentials.

Health (name ``node``): ok, degraded (``problems()``; the health board logs once per
episode and once on recovery), disabled when no ``[node]`` source is configured.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from ...model import DeviceReading
from .sample import BmcError, BmcSample

log = logging.getLogger("wattprint.node")

# A node's input power above this is no hardware's: a counter step implying more is
# implausible (the largest single servers draw about 15 kW; a rack-scale tray less).
MAX_NODE_POWER_W = 100_000.0
# The longest gap booked from the counter when the BMC is back: the engine compares such a
# reading with the measured energy of the ticks it covers, which it keeps this long at
# least (daemon/engine/book.py MEASURED_WINDOW_S). A longer gap is a new baseline.
MAX_GAP_S = 600.0
DEVICE = "node"


class BmcClient(Protocol):
    """What the node source needs of a BMC client (Redfish or IPMI)."""

    def read(self) -> BmcSample: ...

    def close(self) -> None: ...


class _HeldTick(NamedTuple):
    """The tick being read, for the counter values it folds in: its span on the
    monotonic clock and the power it held (0 when it books no held power)."""

    start_mono: float
    end_mono: float
    rate_w: float

    def after_j(self, at_mono: float) -> float:
        """The held energy this tick booked after ``at_mono`` (a counter value's reading
        time): it belongs to the span after that value, not to the one it closes."""
        return self.rate_w * (self.end_mono - min(max(at_mono, self.start_mono), self.end_mono))


@dataclass
class _Pending:
    """A sample the polling thread took, waiting for the next tick."""

    sample: BmcSample
    fetched_mono: float  # local monotonic time the answer arrived


class NodeSource:
    """A ``Source`` (daemon/sources/base.py) named ``node``: one DeviceReading
    (kind="node", device="node") per tick from the BMC's power / energy counter."""

    name = "node"

    def __init__(self, client: BmcClient, method: str, *, poll_interval_s: float = 5.0,
                 max_age_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 start: bool = True):
        self.method = method  # "redfish" | "ipmi": DeviceReading.name and energy_sources' node
        self.poll_interval_s = poll_interval_s
        self.max_age_s = max_age_s
        self._client = client
        self._clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pending: list[_Pending] = []
        # Polling thread's view (under _lock).
        self._poll_error: BmcError | None = None
        self._counters: dict[str, float] = {
            "node_reads_total": 0.0,
            "node_read_errors_total": 0.0,
            "node_read_timeouts_total": 0.0,
            "node_auth_errors_total": 0.0,
            "node_stale_readings_total": 0.0,
            "node_counter_resets_total": 0.0,
            "node_implausible_steps_total": 0.0,
        }
        # Tick's view (read() only; one caller at a time).
        self._last_read_mono: float | None = None
        self._power_w: float | None = None
        self._power_at_mono = 0.0  # when the held power was measured (local monotonic)
        self._anchor_j: float | None = None  # counter value of the last anchor
        self._anchor_mono = 0.0
        self._held_since_anchor_j = 0.0  # held-power energy booked since the anchor
        self._correction_j = 0.0  # to book in this tick (counter difference - booked)
        self._debt_j = 0.0  # a negative correction not yet taken from ticks
        self._live = False  # the last tick returned a reading (booking is continuous)
        self._last_live_mono: float | None = None  # the last tick that returned a reading
        self._gap_steps = False  # a good counter step was taken while dark (the gap is measured)
        self._gap_broken = False  # a reset / implausible step while dark (the gap is lost)
        self._stale_episode = False
        self._counter_episode = ""  # "reset" | "implausible" while unresolved
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._poll_loop, name="wattprint-node", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ polling thread
    def _poll_loop(self) -> None:
        next_at = self._clock()
        while not self._stop.is_set():
            self.poll_once()
            next_at += self.poll_interval_s
            now = self._clock()
            next_at = max(next_at, now)  # a read ran past its slot: start again from now, no burst
            self._stop.wait(max(0.0, next_at - now))

    def poll_once(self) -> None:
        """One read of the BMC (on the polling thread; tests call it directly)."""
        try:
            sample = self._client.read()
        except BmcError as exc:
            with self._lock:
                self._poll_error = exc
                self._counters["node_read_errors_total"] += 1
                if exc.kind == "timeout":
                    self._counters["node_read_timeouts_total"] += 1
                elif exc.kind == "auth":
                    self._counters["node_auth_errors_total"] += 1
            return
        except Exception as exc:  # a client bug must not end the thread
            log.debug("node: BMC read raised", exc_info=True)
            with self._lock:
                self._poll_error = BmcError("protocol", f"unexpected {type(exc).__name__}: {exc}")
                self._counters["node_read_errors_total"] += 1
            return
        with self._lock:
            self._poll_error = None
            self._counters["node_reads_total"] += 1
            self._pending.append(_Pending(sample, self._clock()))
            del self._pending[:-16]  # never grows if nobody reads

    # ------------------------------------------------------------------ the tick
    def read(self, now_mono_s: float) -> Sequence[DeviceReading]:
        """The node's energy since the previous call; never waits for the BMC. ``[]``
        when there is no node figure for this tick (no fresh power, or a baseline)."""
        with self._lock:
            pending, self._pending = self._pending, []
        last, self._last_read_mono = self._last_read_mono, now_mono_s
        dt = 0.0 if last is None else max(0.0, now_mono_s - last)
        # This tick's held energy first (it belongs to the span that ends with any
        # counter value arriving now), then the samples that arrived.
        held_power = self._power_w if self._fresh(now_mono_s) else None
        held_j = held_power * dt if (held_power is not None and self._live) else 0.0
        self._held_since_anchor_j += held_j
        tick = _HeldTick(now_mono_s - dt, now_mono_s, held_j / dt if dt > 0.0 else 0.0)
        for p in pending:
            self._take(p, tick)
        if not self._fresh(now_mono_s):
            self._correction_j += held_j  # counted as booked above, but this tick books nothing
            self._go_dark()
            return []
        if not self._live:  # first trustworthy reading (or back after a gap)
            gap_booked = (self._gap_steps and not self._gap_broken and self._last_live_mono is not None
                          and now_mono_s - self._last_live_mono <= MAX_GAP_S)
            since = self._last_live_mono
            self._live, self._last_live_mono = True, now_mono_s
            self._gap_steps = self._gap_broken = False
            if gap_booked and since is not None:  # the counter measured the gap: book it, over its span
                energy = self._correction_j - self._debt_j
                self._correction_j = self._debt_j = 0.0
                if energy < 0.0:
                    self._debt_j, energy = -energy, 0.0
                return [self._reading(energy, max(0.0, now_mono_s - since), held_j=0.0)]
            # A baseline: booking starts at this tick; it has no node figure of its own.
            self._correction_j = 0.0
            self._debt_j = 0.0
            self._held_since_anchor_j = 0.0
            return []
        self._last_live_mono = now_mono_s
        energy = held_j + self._correction_j - self._debt_j
        self._correction_j = 0.0
        self._debt_j = 0.0
        if energy < 0.0:
            self._debt_j, energy = -energy, 0.0
        return [self._reading(energy, dt, held_j=held_j)]

    def _reading(self, energy_j: float, dt: float, *, held_j: float) -> DeviceReading:
        return DeviceReading(kind="node", device=DEVICE, energy_j=energy_j, power_w=self._power_w or 0.0,  # type: ignore[arg-type]
                             source="counter" if self._anchor_j is not None else "power",
                             interval_s=dt, name=self.method, attributable=True, held_j=held_j)

    def _fresh(self, now_mono_s: float) -> bool:
        return self._power_w is not None and now_mono_s - self._power_at_mono <= self.max_age_s

    def _go_dark(self) -> None:
        """No trustworthy power: nothing booked for this tick. What the counter said and
        what was booked since its last value are kept: a good counter step while dark
        (``_take_counter``) adds the unbooked difference to the correction, which the
        first fresh tick books over the whole gap; without one (no counter, a reset) that
        tick is a new baseline."""
        self._live = False

    def _take(self, p: _Pending, tick: _HeldTick) -> None:
        """Fold one BMC sample into the state (on the tick's thread)."""
        s = p.sample
        stale = False
        if s.power_w is not None:
            age = s.power_age_s or 0.0
            if age > self.max_age_s or s.power_w < 0 or s.power_w > MAX_NODE_POWER_W:
                stale = True
                self._power_at_mono = float("-inf")  # stop holding the last power now
            else:
                self._power_w = s.power_w
                self._power_at_mono = p.fetched_mono - age
        if s.energy_j is not None:
            age = s.energy_age_s or 0.0
            if age > self.max_age_s:
                stale = True
                self._power_at_mono = float("-inf")
            else:
                self._take_counter(s.energy_j, p.fetched_mono - age, tick, derive_power=s.power_w is None)
        if stale:
            with self._lock:
                self._counters["node_stale_readings_total"] += 1
        self._stale_episode = stale

    def _take_counter(self, value_j: float, at_mono: float, tick: _HeldTick, derive_power: bool) -> None:
        anchor, anchor_mono = self._anchor_j, self._anchor_mono
        self._anchor_j, self._anchor_mono = value_j, at_mono
        # The held energy booked since the previous value splits at this value's reading
        # time: what this tick booked after it starts the next span (so a counter value
        # arriving a tick late, or two in one tick, corrects nothing under steady power).
        after_j = min(tick.after_j(at_mono), self._held_since_anchor_j)
        before_j = self._held_since_anchor_j - after_j
        self._held_since_anchor_j = after_j
        if anchor is None:  # the first value: a baseline
            return
        step = value_j - anchor
        span = max(at_mono - anchor_mono, 1e-3)
        if step < 0:
            with self._lock:
                self._counters["node_counter_resets_total"] += 1
            self._counter_episode = "reset"  # the held power stands for that span
            self._gap_broken = self._gap_broken or not self._live  # a gap across a reset: re-baselined
            return
        if step > MAX_NODE_POWER_W * span:  # implausible for the span (a whole gap's, while dark)
            with self._lock:
                self._counters["node_implausible_steps_total"] += 1
            self._counter_episode = "implausible"
            self._gap_broken = self._gap_broken or not self._live
            return
        self._counter_episode = ""
        if derive_power:  # a counter without a power sensor: the power is its rate
            self._power_w = step / span
            self._power_at_mono = at_mono
        if not self._live:  # while dark: the step (less what was booked since the anchor) is the gap's
            self._gap_steps = True
        self._correction_j += step - before_j

    # ------------------------------------------------------------------ health, metrics
    def problems(self) -> list[str]:
        """Why the node figure may be missing or wrong now (empty: healthy). Stable
        sentences per episode, so the health board logs each episode once."""
        out: list[str] = []
        with self._lock:
            err = self._poll_error
        if err is not None:
            out.append(f"BMC read failed ({self.method}): {err.detail}")
        if self._stale_episode:
            out.append(f"stale BMC reading: older than max_age_s ({self.max_age_s:g} s); not booked")
        if self._counter_episode == "reset":
            out.append("the BMC's energy counter went back (reset): re-baselined, that span booked from power")
        elif self._counter_episode == "implausible":
            out.append(f"the BMC's energy counter jumped by more than {MAX_NODE_POWER_W:g} W allows: "
                       "re-baselined, that span booked from power")
        if not out and self._power_w is not None and self._last_read_mono is not None \
                and not self._fresh(self._last_read_mono):
            out.append(f"no fresh BMC reading for more than max_age_s ({self.max_age_s:g} s); node energy not booked "
                       "(with an energy counter, the gap is booked when the BMC answers again)")
        return out

    def counters(self) -> dict[str, float]:
        """Self-metrics (``wattprint_<key>``): BMC reads, errors (timeouts and refused
        credentials among them), stale readings, counter resets and implausible steps."""
        with self._lock:
            return dict(self._counters)

    def close(self) -> None:
        """Stop the polling thread and the client (a read in progress is abandoned: the
        thread is a daemon thread, and the IPMI client kills its ipmitool)."""
        self._stop.set()
        abort = getattr(self._client, "abort", None)  # IPMI: kill an ipmitool still running
        if callable(abort):
            abort()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        try:
            self._client.close()
        except Exception:  # closing a session on a dead BMC: nothing to do
            log.debug("node: closing the BMC client failed", exc_info=True)
