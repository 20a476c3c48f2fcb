"""The store writer: each tick's rows into the ledger (SQLite), a backlog kept in
memory while the store fails, and retention.

Faults (degrade, never die; the health board logs once on failure and once on
recovery):
- A store write that fails (disk full, locked, broken) marks ``store`` degraded; the
  tick's rows are kept in memory (up to ``STORE_BACKLOG_MAX_TICKS``, oldest dropped
  and counted in ``store_ticks_dropped_total`` beyond that, logged once) and written,
  oldest first (at most ``STORE_BACKLOG_CHUNK`` per tick), with the next ticks once
  the store works again. ``store_pending_ticks`` says how many are kept. Snapshots,
  /metrics and the sinks go on meanwhile. At stop, what is kept is written once more.
- Retention: once an hour (``PRUNE_EVERY_S``, and at the first tick) the ledger drops
  what is older than ``retention_days`` (``Ledger.prune``), on the tick thread, never
  while ticks are kept in memory. It pauses while the wall clock has stepped by more
  than a day (``CLOCK_STEP_PAUSES_PRUNE_S``) against the monotonic clock since the
  first tick, so a clock stepped far ahead while the daemon runs cannot delete recent
  data (a clock that is already wrong when the daemon starts cannot be told from a
  right one). Rows deleted are counted in ``store_pruned_rows_total``.
"""

from __future__ import annotations

import logging
import time

from ..health import HealthBoard
from ..ledger import Ledger, TickRow

log = logging.getLogger("wattprint.engine")

STORE_BACKLOG_MAX_TICKS = 3600  # ticks kept in memory while the store cannot be written
STORE_BACKLOG_CHUNK = 600  # at most this many kept ticks written per tick when it can again
PRUNE_EVERY_S = 3600.0  # retention runs at most this often (monotonic seconds)
CLOCK_STEP_PAUSES_PRUNE_S = 86400.0


class StoreWriter:
    """Writes ticks to the ledger (``write``), keeps them while it fails, prunes old
    rows (``maybe_prune``); registers ``store`` with the health board."""

    def __init__(self, ledger: Ledger, health: HealthBoard) -> None:
        self.ledger = ledger
        self.health = health
        self.counters: dict[str, float] = {
            "store_pending_ticks": 0.0, "store_ticks_dropped_total": 0.0, "store_pruned_rows_total": 0.0}
        self.backlog: list[TickRow] = []
        self._last_prune_mono: float | None = None
        self._clock_offset_s: float | None = None  # wall - monotonic at the first tick
        self._prune_paused_logged = False
        health.register("store")

    def write(self, row: TickRow) -> None:
        """Book this tick, after any ticks kept from while the store failed."""
        backlog = self.backlog
        backlog.append(row)
        try:
            while backlog:
                chunk = backlog[:STORE_BACKLOG_CHUNK]
                self.ledger.record_ticks(chunk)
                del backlog[:len(chunk)]
                if backlog and len(chunk) == STORE_BACKLOG_CHUNK:
                    break  # the rest with the next ticks: keep this tick short
        except Exception as exc:
            log.debug("store write failed", exc_info=True)
            if len(backlog) > STORE_BACKLOG_MAX_TICKS:
                drop = len(backlog) - STORE_BACKLOG_MAX_TICKS
                del backlog[:drop]
                if self.counters["store_ticks_dropped_total"] == 0:
                    log.error("store: %d tick(s) could not be stored for over %d ticks and were dropped from "
                              "the ledger (counted in wattprint_store_ticks_dropped_total)",
                              drop, STORE_BACKLOG_MAX_TICKS)
                self.counters["store_ticks_dropped_total"] += drop
            self.health.fail("store", f"{type(exc).__name__}: {exc} (ticks are kept in memory and written "
                                      "when the store works again)")
        else:
            self.health.ok("store")
        self.counters["store_pending_ticks"] = float(len(backlog))

    def maybe_prune(self, now_mono: float, wall: float, retention_days: float) -> None:
        """Retention, at most every ``PRUNE_EVERY_S`` (see the module docstring);
        ``retention_days`` 0 or less keeps everything."""
        if retention_days <= 0 or self.backlog:
            return
        offset = wall - now_mono
        if self._clock_offset_s is None:
            self._clock_offset_s = offset
        if self._last_prune_mono is not None and now_mono - self._last_prune_mono < PRUNE_EVERY_S:
            return
        self._last_prune_mono = now_mono
        step = offset - self._clock_offset_s
        if abs(step) > CLOCK_STEP_PAUSES_PRUNE_S:
            if not self._prune_paused_logged:
                self._prune_paused_logged = True
                log.warning("retention paused: the wall clock has stepped by %+.0f s since the daemon started "
                            "(restart the daemon once the clock is right)", step)
            return
        cutoff = wall - retention_days * 86400.0
        started = time.perf_counter()
        try:
            deleted = self.ledger.prune(cutoff)
        except Exception as exc:
            log.warning("retention: pruning the store failed: %s: %s", type(exc).__name__, exc)
            return
        total = sum(deleted.values())
        self.counters["store_pruned_rows_total"] += total
        if total:
            log.info("retention: deleted %d row(s) older than %g days in %.2f s (%s)", total, retention_days,
                     time.perf_counter() - started, ", ".join(f"{k} {v}" for k, v in deleted.items() if v))

    def flush(self) -> None:
        """At stop: write what is kept in memory, once; log if that fails too."""
        if self.backlog:
            try:
                self.ledger.record_ticks(self.backlog)
                self.backlog.clear()
            except Exception as exc:
                log.error("store: %d tick(s) kept in memory could not be written at stop: %s",
                          len(self.backlog), exc)
