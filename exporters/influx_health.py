"""The InfluxDB sink's health and loss reporting: one health detail made of what is
failing now (delivery, spool appends) and what the current loss episode lost.

Lost or set-aside lines (dead-lettered, dropped by the spool's cap, corrupt in the
spool, refused at submit, not storable) and spool cursor repairs open a "loss
episode": the ``influxdb`` part is degraded, its detail says how many lines (shown as
at least 1, at least 10, at least 100, ... so the detail, and the log line a new detail
brings, changes only a few times per episode) and why, and it ends ``loss_hold_s``
(60 s) after the last loss with one summary log line. Nothing is logged per line.

``SinkHealth`` is a part of ``InfluxSink`` (influx.py), which inherits it: it uses the
sink's spool, dead-letter file, counters and locks.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from wattprint.daemon.health import HealthBoard
from wattprint.daemon.timefmt import iso_z

from .dead_letter import DeadLetterFile
from .influx_http import _one_line
from .spool import Spool

log = logging.getLogger("wattprint.influx")

HEALTH_PART = "influxdb"
LOSS_HOLD_S = 60.0  # a loss keeps the sink degraded this long after the last lost line

# Why lines were lost or set aside; keys of ``points_dropped_total`` made by the sink
# (the spool's and the encoder's reasons are added in ``stats``), in report order.
_LOSS_TEXT: dict[str, tuple[str, str]] = {  # reason: (noun, what happened)
    "rejected": ("dead-lettered", "InfluxDB rejected them"),
    "too_large": ("dead-lettered", "too large for InfluxDB even alone"),
    "dead_letter_unwritable": ("lost", "rejected by InfluxDB and the dead-letter file could not be written"),
    "invalid": ("dropped", "they contained a line break"),
    "spool_full": ("dropped", "spool full (spool_max_bytes reached; oldest lines go first)"),
    "spool_corrupt": ("dropped", "corrupt in the spool (checksum mismatch)"),
    "spool_oversize": ("dropped", "longer than the spool's line limit"),
}


def shown_count(n: int) -> str:
    """``n`` for a health detail: "at least" the power of ten at or below it, so the
    detail (and with it the log) changes once per tenfold, however many lines follow;
    the exact count is in the metrics and in the episode's summary line."""
    power = 1
    while power * 10 <= n:
        power *= 10
    return f"at least {power}"


class SinkHealth:
    """Health and loss episodes of ``InfluxSink`` (see the module docstring)."""

    _spool: Spool
    _dead_letter: DeadLetterFile
    _health: HealthBoard | None
    _lock: threading.Lock
    _last_error: str
    _last_error_at: float | None
    _last_detail: str
    _health_lock: threading.RLock
    _clock: Callable[[], float]
    _loss_hold_s: float
    _delivery_detail: str
    _spool_detail: str
    _episode: dict[str, int]
    _episode_why: dict[str, str]
    _episode_started: float | None
    _last_loss_at: float | None
    _spool_seen: dict[str, int]
    _repairs_seen: int

    def _report_ok(self) -> None:
        """A write was delivered: delivery is healthy again."""
        with self._health_lock:
            self._delivery_detail = ""
            self._update_health(failure=False)

    def _report_failure(self, detail: str, message: str) -> None:
        """Delivery failed (the data is kept): one failure, ``detail`` in health."""
        with self._lock:
            self._last_error = message
            self._last_error_at = time.time()
        with self._health_lock:
            self._delivery_detail = detail
            self._update_health(failure=True, message=message)

    def _lost(self, reason: str, n: int, why: str, report: bool = True) -> None:
        """``n`` lines were lost or set aside for ``reason``: part of the loss episode."""
        if n <= 0:
            return
        with self._health_lock:
            if not self._episode:
                self._episode_started = time.time()
            self._episode[reason] = self._episode.get(reason, 0) + n
            if why:
                self._episode_why.setdefault(reason, why)
            self._last_loss_at = self._clock()
            if report:
                self._update_health(failure=True)

    def _check_spool(self) -> None:
        """Turn what the spool counted since the last look (cap drops, corrupt records,
        oversize lines, unreadable bytes, cursor repairs) into losses."""
        counters = self._spool.counters()
        repairs, last_repair = self._spool.cursor_repair_counts()
        with self._health_lock:
            changed = False
            for key, reason in (("dropped_lines_total", "spool_full"), ("corrupt_records_total", "spool_corrupt"),
                                ("oversize_lines_total", "spool_oversize"), ("unreadable_bytes_total", "spool_unreadable")):
                new = counters[key] - self._spool_seen.get(key, 0)
                if new > 0:
                    self._spool_seen[key] = counters[key]
                    self._lost(reason, new, "", report=False)
                    changed = True
            n_repairs = sum(repairs.values())
            if n_repairs > self._repairs_seen:
                self._lost("spool_cursor", n_repairs - self._repairs_seen, last_repair, report=False)
                self._episode_why["spool_cursor"] = last_repair
                self._repairs_seen = n_repairs
                changed = True
            if changed:
                self._update_health(failure=True)

    def _loss_details(self) -> list[str]:
        out: list[str] = []
        for reason, n in self._episode.items():
            why = self._episode_why.get(reason, "")
            if reason == "spool_unreadable":
                out.append(f"{shown_count(n)} bytes of the spool unreadable (records lost)")
            elif reason == "spool_cursor":
                out.append(f"spool cursor repaired: {why}")
            else:
                noun, what = _LOSS_TEXT[reason]
                lines = "line" if n < 10 else "lines"  # "at least 1 line", "at least 10 lines"
                out.append(f"{shown_count(n)} {lines} {noun}: {what}" + (f" ({why})" if why else ""))
        return out

    def _update_health(self, failure: bool, message: str = "") -> None:
        """Report the sink's state: degraded while delivery or spool appends fail or a
        loss episode lasts (``failure``: count one more error), else ok. Logs (through
        the health board) only when the detail changes; ends a loss episode whose last
        loss is ``loss_hold_s`` old, with one summary line."""
        with self._health_lock:
            if self._episode and self._last_loss_at is not None \
                    and self._clock() - self._last_loss_at >= self._loss_hold_s:
                summary = ", ".join(f"{reason}: {n}" for reason, n in self._episode.items())
                started = self._episode_started or time.time()
                log.info("influxdb: nothing lost for %g s; the episode that began %s lost or set aside %s "
                         "(dead-lettered lines are in %s)", self._loss_hold_s,
                         iso_z(started),
                         summary, self._dead_letter.path)
                self._episode.clear()
                self._episode_why.clear()
                self._episode_started = None
            parts = [p for p in (self._delivery_detail, self._spool_detail) if p] + self._loss_details()
            detail = _one_line("; ".join(parts), 600)
            if detail:
                if failure or detail != self._last_detail:
                    if self._health is not None:
                        self._health.fail(HEALTH_PART, detail)
                    elif detail != self._last_detail:
                        log.warning("influxdb degraded: %s%s", detail, f" ({message})" if message else "")
            elif self._last_detail:
                if self._health is not None:
                    self._health.ok(HEALTH_PART)
                else:
                    log.info("influxdb recovered")
            self._last_detail = detail
