"""The source reader: every source read in parallel, each on a thread of its own,
against the tick's read deadline.

Each source gets one daemon thread; all of one source's calls (its reads, NVML's
included, and its ``close``) run there one at a time, so a read that hangs (a stuck
driver call) holds only its own thread, and being a daemon thread it never keeps the
process from exiting.

Faults (degrade, never die; the health board logs once on failure and once on
recovery):
- A source read that has not returned ``READ_DEADLINE_FRACTION`` x interval (or the
  engine's ``read_timeout_s``) after the tick started is left running: that source is
  skipped this tick and marked degraded ("read timed out"), counted in
  ``source_read_timeouts_total``, and no other read of it starts until the stuck one
  returns.
- Whatever the late read returns is booked with the next tick, merged with that tick's
  own read of the source (energy and interval add up, the weaker source kind wins, via
  attribution's ``weaker_source``), so a hang delays energy, it does not lose it.
- A source that raises ``SourceDisabled`` is disabled (nothing to measure yet, no
  fault); ``SourceError`` or any other exception degrades that source alone.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any, Callable, Sequence

from ..attribution import weaker_source
from ..health import HealthBoard
from ..model import DeviceReading
from ..sources.base import Source, SourceDisabled, SourceError

log = logging.getLogger("wattprint.engine")

READ_DEADLINE_FRACTION = 0.8  # of the interval: a source read not back by then is skipped


class _SourceWorker:
    """One daemon thread per source. Calls run there one at a time, so a read that
    hangs (a stuck driver call) holds only its own thread; being a daemon thread it
    never keeps the process from exiting."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.inflight: Future | None = None  # the read in progress (maybe from an earlier tick)
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=f"wattprint-source-{source.name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                return
            fut, fn, args = call
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever waits on the future
                fut.set_exception(exc)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        self._calls.put((fut, fn, args))
        return fut

    def busy(self) -> bool:
        return self.inflight is not None and not self.inflight.done()

    def stop(self) -> None:
        self._calls.put(None)


def _read_source(src: Source, now_mono: float) -> tuple[list[DeviceReading], list[str]]:
    """What runs on a source's thread: the read and its problems, together."""
    readings = list(src.read(now_mono))
    return readings, list(src.problems())


def _merge_readings(earlier: Sequence[DeviceReading], later: Sequence[DeviceReading]) -> list[DeviceReading]:
    """A late read's readings and the current read's, per device: energy and
    interval add up; everything else (power, processes, memory) is the later one's."""
    out = {(r.kind, r.device): r for r in earlier}
    for r in later:
        e = out.get((r.kind, r.device))
        if e is None:
            out[(r.kind, r.device)] = r
            continue
        interval = e.interval_s + r.interval_s
        energy = e.energy_j + r.energy_j
        weaker = weaker_source(e.source, r.source)
        out[(r.kind, r.device)] = dataclasses.replace(
            r, energy_j=energy, interval_s=interval, source=weaker,
            power_w=energy / interval if interval > 0 else r.power_w)
    return list(out.values())


class SourceReader:
    """Reads the sources for the tick (``read``), each on its own worker thread;
    registers each source with the health board (in the sources' order)."""

    def __init__(self, sources: Sequence[Source], health: HealthBoard) -> None:
        self.sources = sources
        self.health = health
        self.counters: dict[str, float] = {"source_read_timeouts_total": 0.0}
        for src in sources:
            health.register(src.name)
        self._workers = [_SourceWorker(src) for src in sources]

    def read(self, now_mono: float, budget_s: float) -> list[DeviceReading]:
        """Read every source in parallel, each on its own thread, and wait for them
        until ``budget_s`` from now (see the module docstring)."""
        budget = budget_s
        deadline = time.monotonic() + budget
        late: dict[int, Future] = {}  # a read that missed an earlier tick and is back now
        fresh: dict[int, Future] = {}
        for i, w in enumerate(self._workers):
            if w.busy():
                continue  # still stuck: never stack a second read on it
            if w.inflight is not None:
                late[i] = w.inflight
            w.inflight = fresh[i] = w.submit(_read_source, w.source, now_mono)
        if fresh:
            wait_futures(list(fresh.values()), timeout=max(0.0, deadline - time.monotonic()))

        readings: list[DeviceReading] = []
        for i, w in enumerate(self._workers):
            src = w.source
            got: list[DeviceReading] = []
            if i in late:
                try:
                    got, _ = late[i].result()
                except Exception:  # its error is stale; the fresh read speaks for the source now
                    log.debug("late read of %s failed", src.name, exc_info=True)
            fut = fresh.get(i)
            if fut is None or not fut.done():
                self.counters["source_read_timeouts_total"] += 1
                self.health.fail(src.name, f"read timed out (no answer within {budget:.3g} s); "
                                           "not read again until that read returns")
                readings.extend(got)
                continue
            w.inflight = None
            try:
                now_got, problems = fut.result()
            except SourceDisabled as exc:  # nothing to measure yet (no GPU driver): no fault
                self.health.disable(src.name, exc.detail)
                readings.extend(got)
                continue
            except SourceError as exc:
                self.health.fail(src.name, exc.detail)
                readings.extend(got)
                continue
            except Exception as exc:  # a bug or an unexpected driver error: degrade, go on
                log.debug("source %s raised", src.name, exc_info=(type(exc), exc, exc.__traceback__))
                self.health.fail(src.name, f"unexpected {type(exc).__name__}: {exc}")
                readings.extend(got)
                continue
            if problems:
                self.health.fail(src.name, "; ".join(problems))
            else:
                self.health.ok(src.name)
            readings.extend(_merge_readings(got, now_got) if got else now_got)
        return readings

    def counter_glitches(self) -> dict[tuple[str, str, str], float]:
        """(source, device, reason) -> count, from every source that offers
        ``counter_glitches()`` (optional; see sources/base.py)."""
        out: dict[tuple[str, str, str], float] = {}
        for src in self.sources:
            get = getattr(src, "counter_glitches", None)
            if get is None:
                continue
            try:
                for (device, reason), n in get().items():
                    out[(src.name, device, reason)] = float(n)
            except Exception:  # a source bug must not fail the tick
                log.debug("counter_glitches of %s failed", src.name, exc_info=True)
        return out

    def close(self) -> None:
        """Close every source on its own thread (waiting up to 5 s each); a source
        whose read is still stuck in the driver is left alone (its thread is a daemon)."""
        closing: list[tuple[_SourceWorker, Future]] = []
        for w in self._workers:
            if w.busy():  # a read is stuck in the driver: leave it (its thread is a daemon)
                log.warning("source %s: a read is still stuck; not closed", w.source.name)
            else:
                closing.append((w, w.submit(w.source.close)))  # on the source's own thread
            w.stop()
        for w, fut in closing:
            try:
                fut.result(timeout=5.0)
            except Exception:
                log.debug("closing %s failed", w.source.name, exc_info=True)
