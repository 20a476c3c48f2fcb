"""Test helper: feed zones of a simulated powercap tree (tests/powercap.py) at constant
power while the test makes their counters misbehave the ways real RAPL counters have.

``GlitchingFeeder(tree, {zone: watts})`` writes every zone's ``energy_uj`` every
``period_s``: ``offset + energy fed so far`` (wrapped at ``max_energy_range_uj``, as the
hardware does, unless the test holds the counter above the range). The truth is the
energy fed, ``truth_j(zone, wall)`` = watts x (wall - start); glitches move the
counter (``offset``), never the energy fed:

- ``step_back(zone, uj)``: the counter goes back by ``uj`` (a 1 J step back is not a
  wrap);
- ``jump(zone, uj)``: the counter leaps forward by an amount no CPU can draw;
- ``above_range(zone, extra_uj)``: from now on the counter reads
  ``max_energy_range_uj + extra_uj`` and climbs from there (it does not wrap);
- ``wrap_to(zone, uj)``: the counter wraps to ``uj`` and counts normally again.

Writes are atomic (temp file + rename, as tests/powercap.py does); the daemon opens
``energy_uj`` afresh on every read.
"""

from __future__ import annotations

import os
import threading
import time

from powercap import PowercapTree


class GlitchingFeeder:
    def __init__(self, tree: PowercapTree, rates_w: dict[str, float], period_s: float = 0.02) -> None:
        self._tree = tree
        self._rates_w = dict(rates_w)
        self._period_s = period_s
        self._lock = threading.Lock()
        self._max_uj = {z: tree.max_energy_range_uj(z) for z in rates_w}
        self._offset_uj = {z: tree.energy(z) for z in rates_w}
        self._wrap = {z: True for z in rates_w}
        self.start_wall = time.time()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rapl-glitch-feeder", daemon=True)
        self._thread.start()

    # -- truth -----------------------------------------------------------------

    def rate_w(self, zone: str) -> float:
        return self._rates_w[zone]

    def truth_j(self, zone: str, wall: float) -> float:
        """Energy fed into ``zone`` from the start up to wall-clock time ``wall``."""
        return self._rates_w[zone] * max(0.0, wall - self.start_wall)

    # -- glitches ----------------------------------------------------------------

    def step_back(self, zone: str, uj: int) -> None:
        with self._lock:
            self._offset_uj[zone] -= uj
            self._write(zone, time.time())

    def jump(self, zone: str, uj: int) -> None:
        with self._lock:
            self._offset_uj[zone] += uj
            self._write(zone, time.time())

    def above_range(self, zone: str, extra_uj: int) -> None:
        with self._lock:
            now = time.time()
            self._wrap[zone] = False
            self._offset_uj[zone] = self._max_uj[zone] + extra_uj - self._fed_uj(zone, now)
            self._write(zone, now)

    def wrap_to(self, zone: str, uj: int) -> None:
        with self._lock:
            now = time.time()
            self._wrap[zone] = True
            self._offset_uj[zone] = uj - self._fed_uj(zone, now)
            self._write(zone, now)

    def is_above_range(self, zone: str) -> bool:
        with self._lock:
            return not self._wrap[zone]

    # -- internals -----------------------------------------------------------------

    def _fed_uj(self, zone: str, now: float) -> int:
        return round(self.truth_j(zone, now) * 1e6)

    def _write(self, zone: str, now: float) -> None:
        value = self._offset_uj[zone] + self._fed_uj(zone, now)
        if self._wrap[zone]:
            value %= self._max_uj[zone]
        path = self._tree.root / zone / "energy_uj"
        tmp = path.with_name(".energy_uj.glitching")
        tmp.write_text(f"{value}\n")
        os.replace(tmp, path)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self._period_s):
                with self._lock:
                    now = time.time()
                    for zone in self._rates_w:
                        self._write(zone, now)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"glitching feeder failed: {self.error!r}") from self.error
