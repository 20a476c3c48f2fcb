"""The tick: ``Engine`` runs the schedule and, once per interval, one tick in a
straight line through the stages:

    read the sources (reader.py) -> observe processes (procs) -> attribute
    (attribution) -> book (book.py) -> feed the sinks -> store (store.py)
    -> publish the snapshot (book.py)

The snapshot is published last so that it shows this tick's store and sink health
and counters; exporters only read it.

Schedule: drift-free (tick k is due at t0 + k x interval on the monotonic clock; a
late tick skips the missed slots and counts them in ``tick_overruns_total``). All
blocking work (NVML, /proc, sysfs, SQLite) runs off the event loop, so the HTTP API
stays responsive: the tick runs on one worker thread (``run_blocking`` runs other
work there, never racing a tick), and each source's ``read`` on a thread of its own
(reader.py).

Time: integration uses the monotonic clock only (sources get ``now_mono``); the wall
clock only says which ledger bucket a tick lands in and stamps the outputs, so a wall
clock step (NTP correcting a wrong clock, by hand) moves where energy is booked,
never how much, and never the schedule.

Faults (degrade, never die): a tick that raises is counted in ``tick_errors_total``
and logged once per distinct error; the next tick runs on schedule. A process scan
that fails degrades ``processes`` and the tick goes on with no jobs (all energy
unattributed). A failing sink degrades ``sinks``, never the tick. Source reads and
their deadline: reader.py; the store's backlog and retention: store.py. A node
reading below the measured components (attribution books the remainder ``other`` as
0) is counted in ``node_below_components_total`` and holds ``node`` degraded while it
lasts (``[node] remainder`` is ``remainder_policy``); a counter correction's shortfall
is carried to the next tick's attribution instead (attribution.py), and one not paid
within ``NODE_CARRY_MAX_S`` is dropped and counted the same way. A node reading that covers a gap
(more than its tick) is compared with the measured energy of the gap's ticks, kept in
the book's window (book.py, "Node gaps").

Order within a tick: the sinks (the InfluxDB spool's durable append) get the tick
before the store commits it, so a crash between the two leaves InfluxDB with a
point the ledger lacks (the ledger loses at most that last tick anyway), never a
committed tick that InfluxDB will never see.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..attribution import Attribution, GpuIdleFloor, attribute
from ..carbon import IntensityBook
from ..health import HealthBoard
from ..ledger import Ledger
from ..model import DeviceReading, SettledBucket, Snapshot, TickRecord
from ..procs import ProcessTracker, ProcessView
from ..sources.base import Source
from .book import JobBook
from .reader import READ_DEADLINE_FRACTION, SourceReader
from .store import StoreWriter

if TYPE_CHECKING:
    from ..footprint.factors import Footprint

log = logging.getLogger("wattprint.engine")

TickSink = Callable[[TickRecord], None]
SettleSink = Callable[[list[SettledBucket]], None]
CounterFeed = Callable[[], dict[str, float]]  # figures that become wattprint_<key> self-metrics
NODE_HEALTH = "node"  # the node source's health part (sources/node)
NODE_BELOW_DETAIL = ("the node's input power from the BMC is below the GPU, CPU and DRAM measured in the same "
                     "tick: the remainder (other) is booked as 0 (counted in "
                     "wattprint_node_below_components_total)")
# A counter correction's carry (attribution.py) not paid off by the node's remainder
# within this long is dropped and counted as a node below its components: the node's
# power has not been above the components by enough to cover it.
NODE_CARRY_MAX_S = 120.0


def feed(sinks: Sequence[Callable[[Any], None]], value: Any, health: HealthBoard) -> None:
    """Hand ``value`` to every sink; a failing sink degrades "sinks", never the tick."""
    for sink in sinks:
        try:
            sink(value)
        except Exception as exc:
            log.debug("sink failed", exc_info=True)
            health.fail("sinks", f"{type(exc).__name__}: {exc}")


@dataclass
class Engine:
    """Owns the sources (through the reader), the process tracker, the job book, the
    store writer and the snapshot. ``pue``, ``finished_grace_s``,
    ``max_finished_in_metrics`` are read when it is built; ``intensity`` may be
    swapped afterwards (the daemon does), as may the feed lists be appended to."""

    sources: Sequence[Source]
    tracker: ProcessTracker
    ledger: Ledger
    intensity: IntensityBook
    health: HealthBoard
    interval_s: float = 1.0
    pue: float = 1.0
    finished_grace_s: float = 300.0
    max_finished_in_metrics: int = 200  # finished jobs kept in the snapshot at most (newest ended)
    idle_policy: str = "unattributed"
    remainder_policy: str = "proportional"  # [node] remainder: proportional | unattributed
    retention_days: float = 400.0  # [daemon] retention_days; 0 or less: keep everything
    read_timeout_s: float | None = None  # per-source read deadline; None: READ_DEADLINE_FRACTION x interval
    # Lifecycle factors (daemon/footprint/): None = default_footprint() (shipped data, no config)
    footprint: Footprint | None = None
    sinks: list[TickSink] = field(default_factory=list)
    settle_sinks: list[SettleSink] = field(default_factory=list)
    # Each feed's figures become wattprint_<key> self-metrics, merged in list order (a later
    # feed's key wins); called on the tick thread at each snapshot.
    counter_feeds: list[CounterFeed] = field(default_factory=list)
    snapshot: Snapshot | None = None
    reader: SourceReader = field(init=False)
    book: JobBook = field(init=False)
    store: StoreWriter = field(init=False)
    _executor: ThreadPoolExecutor = field(
        init=False, default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="wattprint-tick"))
    _counters: dict[str, float] = field(
        init=False, default_factory=lambda: {"tick_overruns_total": 0.0, "tick_errors_total": 0.0,
                                             "node_below_components_total": 0.0})
    _gpu_idle: GpuIdleFloor = field(init=False, default_factory=GpuIdleFloor)  # per GPU: lowest power, no process
    _last_tick_error: str = field(init=False, default="")
    _has_node: bool = field(init=False, default=False)  # a node source (health name "node") is read
    _node_carry_j: float = field(init=False, default=0.0)  # attribution's carry, handed back next tick
    _node_carry_since: float | None = field(init=False, default=None)  # monotonic: when the carry began

    def __post_init__(self) -> None:
        # Health parts in this order: the sources, processes, store.
        self.reader = SourceReader(self.sources, self.health)
        self.health.register("processes")
        self.store = StoreWriter(self.ledger, self.health)
        self.book = JobBook(self.ledger, self.pue, self.finished_grace_s, self.max_finished_in_metrics,
                            self.footprint)
        self._has_node = any(getattr(s, "name", "") == NODE_HEALTH for s in self.sources)

    def restore(self, job_rows: dict[str, dict], co2e_g: dict[str, float]) -> None:
        """Continue jobs that were running when the daemon last stopped."""
        self.book.restore(job_rows, co2e_g)

    # -- one tick ------------------------------------------------------------
    def tick_blocking(self, now_mono: float, wall: float, duration_hint_s: float = 0.0) -> Snapshot:
        """One tick, synchronously. Runs on the worker thread (tests may call it directly)."""
        started = time.perf_counter()
        readings = self.reader.read(now_mono, self._read_budget_s())
        view = self._observe_processes(now_mono, readings)
        att = self._attribute(readings, view, now_mono)
        booked = self.book.book_tick(wall, readings, view, att, self.intensity, self.interval_s,
                                     self._gpu_idle.floor_w)
        feed(self.sinks, booked.record, self.health)
        self.store.write(booked.row)
        self.store.maybe_prune(now_mono, wall, self.retention_days)
        self.snapshot = self.book.snapshot(wall, booked.intensity, started, duration_hint_s,
                                           health=self.health.snapshot(), counters=self._counters_now(),
                                           counter_glitches=self.reader.counter_glitches())
        return self.snapshot

    def _read_budget_s(self) -> float:
        return self.read_timeout_s if self.read_timeout_s is not None else READ_DEADLINE_FRACTION * self.interval_s

    def _observe_processes(self, now_mono: float, readings: Sequence[DeviceReading]) -> ProcessView:
        """The tracker's view of jobs and processes; a failing scan degrades
        ``processes`` and gives an empty view (no jobs)."""
        # A PID not visible here (another PID namespace) must not pull in a process that has its number.
        gpu_pids = {p.pid for r in readings if r.kind == "gpu" for p in r.processes if p.visible}
        try:
            view = self.tracker.observe(now_mono, gpu_pids)
            label_problem = self.tracker.label_problem()  # e.g. other users' environments unreadable
            if label_problem:
                self.health.fail("processes", label_problem)
            else:
                self.health.ok("processes")
        except Exception as exc:
            log.debug("process scan failed", exc_info=True)
            self.health.fail("processes", f"{type(exc).__name__}: {exc}")
            view = ProcessView(jobs=(), pid_to_job={}, cpu_busy_s=0.0, mem_used_bytes=0, scanned=False)
        return view

    def _attribute(self, readings: Sequence[DeviceReading], view: ProcessView, now_mono: float) -> Attribution:
        """Split each device's energy over the jobs (GPU idle floor learnt first). A node
        reading that covers a span (a gap the node source booked from its counter) is
        compared with the measured energy of that span's earlier ticks with no node
        figure (the book's window)."""
        self._gpu_idle.observe(readings)
        span_s = max((r.interval_s for r in readings if r.kind == "node"), default=0.0)
        span = self.book.window.span_before(now_mono, span_s, set(self.book.jobs)) if span_s > 0.0 else None
        att = attribute(readings, view, self.idle_policy, self._gpu_idle.floor_w, self.remainder_policy, span,
                        self._node_carry_j)
        if self._has_node:  # (without a node source no reading ever covers a gap)
            self.book.window.add(now_mono, att)
        self._check_node(att, now_mono)
        return att

    def _check_node(self, att: Attribution, now_mono: float) -> None:
        """A node reading below the measured components (the remainder booked as 0) is
        counted in ``node_below_components_total`` and degrades ``node`` for as long
        as it lasts (one log line per episode: a cause of its own on the health board,
        so the source's clean reads do not end the episode). A counter correction's
        carry is handed to the next tick; one older than ``NODE_CARRY_MAX_S`` is dropped
        and counted the same way (the measured energy it stood for stays booked)."""
        below = att.node_below_j > 0.0
        self._node_carry_j = att.node_carry_j
        if self._node_carry_j <= 0.0:
            self._node_carry_since = None
        elif self._node_carry_since is None:
            self._node_carry_since = now_mono
        elif now_mono - self._node_carry_since > NODE_CARRY_MAX_S:
            log.debug("node: a counter correction's carry of %.1f J not covered in %.0f s: dropped",
                      self._node_carry_j, NODE_CARRY_MAX_S)
            self._node_carry_j, self._node_carry_since, below = 0.0, None, True
        if below:
            self._counters["node_below_components_total"] += 1
            self.health.fail(NODE_HEALTH, NODE_BELOW_DETAIL, cause="accounting")
        else:
            self.health.ok(NODE_HEALTH, cause="accounting")

    def _counters_now(self) -> dict[str, float]:
        """The engine's self-metrics: the tick's, the reader's, the store's, the book's,
        the tracker's, then each counter feed's, in that order (a later key wins)."""
        out = {**self._counters, "node_carry_joules": self._node_carry_j, **self.reader.counters,
               **self.store.counters, **self.book.counters, **self.tracker.counters()}
        for counter_feed in self.counter_feeds:
            out.update(counter_feed())
        return out

    # -- settlement ----------------------------------------------------------
    def settle_blocking(self) -> int:
        """Re-evaluate every provisional slot value against the intensity book (new
        realised values or forecasts arrived), looked up at the slot's middle.
        Changed values are rewritten in the ledger, every affected job's CO2e follows
        (Σ slot energy x slot value, as at write time), and the settle sinks get the
        new per-job bucket figures. Runs on the tick thread; returns buckets changed."""
        done = self.book.settle(self.intensity, for_sinks=bool(self.settle_sinks))
        if done.buckets == 0:
            return 0
        if done.settled is not None:
            feed(self.settle_sinks, done.settled, self.health)
        log.info("settled %d bucket(s) (%d provider interval value(s)) with new grid intensity",
                 done.buckets, done.values)
        return done.buckets

    # -- schedule ------------------------------------------------------------
    async def run(self, stop: asyncio.Event, on_first_tick: Callable[[], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        k = 0
        first = True
        while not stop.is_set():
            wall = time.time()
            try:
                await loop.run_in_executor(self._executor, self.tick_blocking, time.monotonic(), wall)
            except Exception as exc:
                self._counters["tick_errors_total"] += 1
                text = f"{type(exc).__name__}: {exc}"
                if text != self._last_tick_error:  # once per distinct error, not once per tick
                    self._last_tick_error = text
                    log.exception("tick failed (counted in wattprint_tick_errors_total; logged again only "
                                  "when the error changes)")
                else:
                    log.debug("tick failed again: %s", text)
            if first and on_first_tick is not None:
                first = False
                on_first_tick()
            k += 1
            due = t0 + k * self.interval_s
            now = loop.time()
            if now > due:  # overran: skip the slots we missed, keep the phase
                missed = int((now - due) // self.interval_s) + 1
                self._counters["tick_overruns_total"] += missed
                k += missed
                due = t0 + k * self.interval_s
            try:
                await asyncio.wait_for(stop.wait(), timeout=max(0.0, due - loop.time()))
            except asyncio.TimeoutError:
                pass

    async def run_blocking(self, fn: Callable, *args):  # type: ignore[no-untyped-def]
        """Run ``fn`` on the tick thread (for work that must not race a tick)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        """Stop: no tick runs past this point; sources closed on their threads, what the
        store kept in memory written once more, tracker and ledger closed."""
        self._executor.shutdown(wait=True)  # no tick runs past this point
        self.reader.close()
        self.store.flush()
        self.tracker.close()
        self.ledger.close()
