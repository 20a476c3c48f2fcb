"""The tick engine: once per interval, read every source, attribute, book in the
ledger, hand the tick to the sinks, and publish a new immutable snapshot.

The schedule is drift-free (tick k is due at t0 + k x interval on the monotonic
clock; a late tick skips the missed slots and counts them). All blocking work (NVML,
/proc, sysfs, SQLite) runs off the event loop, so the HTTP API stays responsive:
the tick runs on one worker thread, and each source's ``read`` on a thread of its
own (all of one source's calls, NVML's included, stay on that one thread).

Time: integration uses the monotonic clock only (sources get ``now_mono``); the wall
clock only says which ledger bucket a tick lands in and stamps the outputs, so a wall
clock step (NTP correcting a wrong clock, by hand) moves where energy is booked,
never how much, and never the schedule.

Faults (degrade, never die; log once on failure and once on recovery):
- A source read that has not returned ``READ_DEADLINE_FRACTION`` x interval after the
  tick started is left running: that source is skipped this tick and marked degraded
  ("read timed out"), and no other read of it starts until the stuck one returns.
  Whatever the late read returns is booked with the next tick (merged with that
  tick's own read of the source), so a hang delays energy, it does not lose it.
- A store write that fails (disk full, locked, broken) marks ``store`` degraded; the
  tick's rows are kept in memory (up to ``STORE_BACKLOG_MAX_TICKS``, oldest dropped
  and counted beyond that) and written, oldest first, with the next ticks once the
  store works again. Snapshots, /metrics and the sinks go on meanwhile.
- Retention: once an hour (and at the first tick) the ledger drops what is older
  than ``retention_days`` (``Ledger.prune``), on the tick thread. It pauses while the
  wall clock has stepped by more than a day against the monotonic clock since start,
  so a clock stepped far ahead while the daemon runs cannot delete recent data (a
  clock that is already wrong when the daemon starts cannot be told from a right one).

Order within a tick: the sinks (the InfluxDB spool's durable append) get the tick
before the store commits it, so a crash between the two leaves InfluxDB with a
point the ledger lacks (the ledger loses at most that last tick anyway), never a
committed tick that InfluxDB will never see.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .attribution import GpuIdleFloor, attribute, weaker_source
from .carbon import IntensityBook
from .health import HealthBoard
from .ledger import BASIS_RANK, J_PER_KWH, Intensity, JobTick, Ledger, TickRow
from .model import COMPONENTS, DeviceReading, DeviceState, JobRef, JobTotals, SettledBucket, Snapshot, TickRecord
from .procs import JobIdentity, ProcessTracker, ProcessView
from .sources.base import Source, SourceDisabled, SourceError

log = logging.getLogger("wattprint.engine")

TickSink = Callable[[TickRecord], None]
SettleSink = Callable[[list[SettledBucket]], None]

READ_DEADLINE_FRACTION = 0.8  # of the interval: a source read not back by then is skipped
STORE_BACKLOG_MAX_TICKS = 3600  # ticks kept in memory while the store cannot be written
STORE_BACKLOG_CHUNK = 600  # at most this many kept ticks written per tick when it can again
PRUNE_EVERY_S = 3600.0  # retention runs at most this often (monotonic seconds)
CLOCK_STEP_PAUSES_PRUNE_S = 86400.0


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


@dataclass
class _JobState:
    identity: JobIdentity
    energy_j: dict[str, float]
    co2e_g: float
    running: bool = True
    ended_at: float | None = None
    bucket_start: int = -1  # the ledger bucket of the last tick
    # J per slot (slot_start) in that bucket, the store's from earlier runs included
    slot_j: dict[int, float] = field(default_factory=dict)


@dataclass
class _DeviceAcc:
    kind: str
    device: str
    name: str
    power_w: float = 0.0
    energy_j_total: float = 0.0
    source: str = "counter"
    uuid: str = ""
    vendor: str = ""


@dataclass
class Engine:
    """Owns the sources, the process tracker, the ledger writer and the snapshot."""

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
    retention_days: float = 400.0  # [daemon] retention_days; 0 or less: keep everything
    read_timeout_s: float | None = None  # per-source read deadline; None: READ_DEADLINE_FRACTION x interval
    sinks: list[TickSink] = field(default_factory=list)
    settle_sinks: list[SettleSink] = field(default_factory=list)
    snapshot: Snapshot | None = None
    _executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="wattprint-tick"))
    _jobs: dict[str, _JobState] = field(default_factory=dict)
    _devices: dict[tuple[str, str], _DeviceAcc] = field(default_factory=dict)
    _unattributed_total: dict[str, float] = field(default_factory=lambda: {c: 0.0 for c in COMPONENTS})
    _tick: int = 0
    _restored: bool = False
    _counters: dict[str, float] = field(default_factory=lambda: {
        "tick_overruns_total": 0.0, "tick_errors_total": 0.0, "source_read_timeouts_total": 0.0,
        "store_pending_ticks": 0.0, "store_ticks_dropped_total": 0.0, "store_pruned_rows_total": 0.0,
        "gpu_invisible_process_energy_joules_total": 0.0})
    _gpu_idle: GpuIdleFloor = field(default_factory=GpuIdleFloor)  # per GPU: lowest power with no process on it
    extra_counters: Callable[[], dict[str, float]] | None = None
    # The current bucket and the value booked for each of its slots (slot_start -> value)
    _slot_values: tuple[int, dict[int, Intensity]] | None = None
    _workers: list[_SourceWorker] = field(default_factory=list)
    _store_backlog: list[TickRow] = field(default_factory=list)
    _last_prune_mono: float | None = None
    _clock_offset_s: float | None = None  # wall - monotonic at the first tick
    _prune_paused_logged: bool = False
    _last_tick_error: str = ""

    def __post_init__(self) -> None:
        for src in self.sources:
            self.health.register(src.name)
        self.health.register("processes")
        self.health.register("store")
        self._workers = [_SourceWorker(src) for src in self.sources]

    # -- restore -------------------------------------------------------------
    def restore(self, job_rows: dict[str, dict], co2e_g: dict[str, float]) -> None:
        """Continue jobs that were running when the daemon last stopped."""
        for job_id, row in job_rows.items():
            ident = JobIdentity(
                job_id=job_id, label=row["label"], label_source=row["label_source"], uid=row["uid"],
                user=row["user"], command=row["command"], root_pid=row["root_pid"], started_at=row["started_at"],
                label_raw=row["label_raw"],
            )
            self._jobs[job_id] = _JobState(
                identity=ident,
                energy_j={c: row[f"{c}_j"] for c in COMPONENTS},
                co2e_g=co2e_g.get(job_id, 0.0),
                running=True,
                ended_at=row["last_seen"],  # if not found again, it ended when last seen
            )
        self._restored = True

    # -- one tick ------------------------------------------------------------
    def _read_budget_s(self) -> float:
        return self.read_timeout_s if self.read_timeout_s is not None else READ_DEADLINE_FRACTION * self.interval_s

    def _read_sources(self, now_mono: float) -> list[DeviceReading]:
        """Read every source in parallel, each on its own thread, and wait for them
        until the tick's read deadline (see the module docstring)."""
        budget = self._read_budget_s()
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
                self._counters["source_read_timeouts_total"] += 1
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

    def tick_blocking(self, now_mono: float, wall: float, duration_hint_s: float = 0.0) -> Snapshot:
        """One tick, synchronously. Runs on the worker thread (tests may call it directly)."""
        started = time.perf_counter()
        readings = self._read_sources(now_mono)
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
        self._gpu_idle.observe(readings)
        att = attribute(readings, view, self.idle_policy, self._gpu_idle.floor_w)
        self._counters["gpu_invisible_process_energy_joules_total"] += att.gpu_invisible_j

        # Job lifecycle: a job ends when its last process is gone.
        live_ids = {j.identity.job_id for j in view.jobs}
        ended: list[tuple[str, float]] = []
        for job_id, st in self._jobs.items():
            if st.running and job_id not in live_ids:
                st.running = False
                st.ended_at = wall if not self._restored or st.ended_at is None else st.ended_at
                ended.append((job_id, st.ended_at))
        self._restored = False

        bucket = self.ledger.bucket_of(wall)
        intensity, slot = self._intensity_for(bucket, wall)
        g_per_kwh = intensity.g_per_kwh
        bucket_co2e: dict[str, float] = {}
        bucket_g: dict[str, float] = {}
        bucket_status: dict[str, str] = {}
        job_ticks: list[JobTick] = []
        for usage in view.jobs:
            ident = usage.identity
            energy = att.job_energy_j.get(ident.job_id, {})
            st = self._jobs.get(ident.job_id)
            if st is None:
                st = self._jobs[ident.job_id] = _JobState(ident, {c: 0.0 for c in COMPONENTS}, 0.0)
            st.running, st.ended_at = True, None
            tick_j = 0.0
            for c in COMPONENTS:
                st.energy_j[c] += energy.get(c, 0.0)
                tick_j += energy.get(c, 0.0)
            # CO2e: this tick's energy x the value of the provider interval (slot) holding it.
            st.co2e_g += tick_j / J_PER_KWH * g_per_kwh * self.pue
            if st.bucket_start != bucket:  # (after a restart the bucket may hold energy already)
                st.bucket_start, st.slot_j = bucket, self._stored_slot_j(ident.job_id, bucket)
            if tick_j:  # as the ledger books it (job_slots)
                st.slot_j[slot] = st.slot_j.get(slot, 0.0) + tick_j
            grams, mean_g, status = self._bucket_co2e(st.slot_j)
            bucket_co2e[ident.job_id] = grams
            if mean_g is not None:
                bucket_g[ident.job_id], bucket_status[ident.job_id] = mean_g, status
            job_ticks.append(JobTick(
                identity=ident, energy_j=energy, gpu_seconds=att.gpu_seconds.get(ident.job_id, 0.0),
                gpu_memory_bytes=att.gpu_memory_bytes.get(ident.job_id, 0),
                # Per component, the weakest source of the devices that gave this job energy this
                # tick (attribution); the ledger keeps the weakest over the job's life.
                sources=dict(att.job_sources.get(ident.job_id, {})),
                steps=usage.steps,
            ))

        device_rows = [(r.kind, r.device, r.energy_j, r.source) for r in readings]

        for r in readings:
            acc = self._devices.get((r.kind, r.device))
            if acc is None:
                acc = self._devices[(r.kind, r.device)] = _DeviceAcc(r.kind, r.device, r.name)
            acc.power_w = r.power_w
            acc.energy_j_total += r.energy_j
            acc.source = r.source
            acc.uuid = r.uuid or acc.uuid
            acc.vendor = r.vendor or acc.vendor
        for c in COMPONENTS:
            self._unattributed_total[c] += att.unattributed_j.get(c, 0.0)

        record = TickRecord(
            sampled_at=wall,
            interval_s=max((r.interval_s for r in readings), default=self.interval_s),
            readings=tuple(readings),
            jobs={u.identity.job_id: JobRef(u.identity.job_id, u.identity.label, u.identity.user, u.identity.uid)
                  for u in view.jobs},
            job_energy_j=att.job_energy_j,
            unattributed_j=att.unattributed_j,
            bucket_start=bucket,
            bucket_co2e_g=bucket_co2e,
            g_per_kwh=intensity.g_per_kwh,
            intensity_status=intensity.status,
            bucket_g_per_kwh=bucket_g,
            bucket_intensity_status=bucket_status,
        )
        self._feed(self.sinks, record)
        self._store(TickRow(wall, job_ticks, device_rows, dict(att.unattributed_j), intensity, ended))
        self._maybe_prune(now_mono, wall)

        # Finished jobs leave the snapshot (and /metrics) after the grace period, and the
        # oldest-ended go first beyond max_finished_in_metrics (many short jobs: the series
        # per scrape stay bounded; totals are in the store, the API and InfluxDB).
        for job_id in [j for j, st in self._jobs.items()
                       if not st.running and st.ended_at is not None and wall - st.ended_at > self.finished_grace_s]:
            del self._jobs[job_id]
        finished = sorted((st.ended_at or 0.0, j) for j, st in self._jobs.items() if not st.running)
        for _, job_id in finished[:max(0, len(finished) - self.max_finished_in_metrics)]:
            del self._jobs[job_id]

        self._tick += 1
        snap = Snapshot(
            taken_at=wall,
            tick=self._tick,
            tick_duration_s=time.perf_counter() - started + duration_hint_s,
            devices=tuple(DeviceState(a.kind, a.device, a.name, a.power_w, a.energy_j_total, a.source, a.uuid,
                                      a.vendor)  # type: ignore[arg-type]
                          for a in sorted(self._devices.values(), key=lambda a: (a.kind, a.device))),
            jobs=tuple(JobTotals(job_id=j, label=st.identity.label, user=st.identity.user, uid=st.identity.uid,
                                 energy_j=dict(st.energy_j), co2e_g=st.co2e_g,
                                 state="running" if st.running else "finished")
                       for j, st in self._jobs.items()),
            unattributed_j_total=dict(self._unattributed_total),
            health=self.health.snapshot(),
            grid_zone=intensity.zone if intensity else self.intensity.zone,
            grid_provider=intensity.provider if intensity else self.intensity.provider,
            grid_g_per_kwh=intensity.g_per_kwh if intensity else None,
            counters={**self._counters, **self.tracker.counters(),
                      **(self.extra_counters() if self.extra_counters else {})},
            counter_glitches=self._counter_glitches(),
        )
        self.snapshot = snap
        return snap

    def _counter_glitches(self) -> dict[tuple[str, str, str], float]:
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

    def _intensity_for(self, bucket: int, wall: float) -> tuple[Intensity, int]:
        """The value for the provider interval (slot) holding ``wall``, with the
        slot's bounds cut to the bucket, and the slot's start: the value booked for
        that slot of the bucket (this run or a previous one), else the book's value
        now. Settlement revises it later."""
        cached = self._slot_values
        if cached is None or cached[0] != bucket:
            try:
                values = self.ledger.slot_intensities(bucket)
            except Exception:  # the store is failing: its write will say so
                log.debug("reading the bucket's slot intensities failed", exc_info=True)
                values = {}
            cached = self._slot_values = (bucket, values)
        looked = self.intensity.lookup(wall)
        start, end = self.ledger.slot_of(wall, looked)
        found = cached[1].setdefault(start, looked)
        # The bounds of this tick's slot, so the ledger books it under the same start.
        return dataclasses.replace(found, start=float(start), end=float(end)), start

    def _bucket_co2e(self, slot_j: dict[int, float]) -> tuple[float, float | None, str]:
        """A job's bucket so far, from its J per slot and the slots' values: grams
        (x PUE), the energy-weighted mean intensity (None: no value known) and
        ``final`` when every slot's value is final."""
        values = self._slot_values[1] if self._slot_values is not None else {}
        gj = known_j = 0.0
        final = True
        for slot, j in slot_j.items():
            v = values.get(slot)
            if v is None:
                final = False
                continue
            gj += j * v.g_per_kwh
            known_j += j
            final = final and v.status == "final"
        mean = gj / known_j if known_j > 0 else None
        return gj / J_PER_KWH * self.pue, mean, "final" if final else "provisional"

    def _stored_slot_j(self, job_id: str, bucket: int) -> dict[int, float]:
        try:
            return self.ledger.job_slot_energy_j(job_id, bucket)
        except Exception:
            log.debug("reading a job's bucket failed", exc_info=True)
            return {}

    # -- store ---------------------------------------------------------------
    def _store(self, row: TickRow) -> None:
        """Book this tick, after any ticks kept from while the store failed."""
        backlog = self._store_backlog
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
                if self._counters["store_ticks_dropped_total"] == 0:
                    log.error("store: %d tick(s) could not be stored for over %d ticks and were dropped from "
                              "the ledger (counted in wattprint_store_ticks_dropped_total)",
                              drop, STORE_BACKLOG_MAX_TICKS)
                self._counters["store_ticks_dropped_total"] += drop
            self.health.fail("store", f"{type(exc).__name__}: {exc} (ticks are kept in memory and written "
                                      "when the store works again)")
        else:
            self.health.ok("store")
        self._counters["store_pending_ticks"] = float(len(backlog))

    def _maybe_prune(self, now_mono: float, wall: float) -> None:
        if self.retention_days <= 0 or self._store_backlog:
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
        cutoff = wall - self.retention_days * 86400.0
        started = time.perf_counter()
        try:
            deleted = self.ledger.prune(cutoff)
        except Exception as exc:
            log.warning("retention: pruning the store failed: %s: %s", type(exc).__name__, exc)
            return
        total = sum(deleted.values())
        self._counters["store_pruned_rows_total"] += total
        if total:
            log.info("retention: deleted %d row(s) older than %g days in %.2f s (%s)", total, self.retention_days,
                     time.perf_counter() - started, ", ".join(f"{k} {v}" for k, v in deleted.items() if v))

    def _feed(self, sinks: Sequence[Callable[[Any], None]], value: Any) -> None:
        """Hand ``value`` to every sink; a failing sink degrades "sinks", never the tick."""
        for sink in sinks:
            try:
                sink(value)
            except Exception as exc:
                log.debug("sink failed", exc_info=True)
                self.health.fail("sinks", f"{type(exc).__name__}: {exc}")

    # -- settlement ----------------------------------------------------------
    def settle_blocking(self) -> int:
        """Re-evaluate every provisional slot value against the intensity book (new
        realised values or forecasts arrived), looked up at the slot's middle.
        Changed values are rewritten in the ledger, every affected job's CO2e follows
        (Σ slot energy x slot value, as at write time), and the settle sinks get the
        new per-job bucket figures. Runs on the tick thread; returns buckets changed."""
        changed: list[tuple[int, int, Intensity]] = []
        for row in self.ledger.bucket_intensities(("provisional",)):
            new = self.intensity.lookup((row["slot_start"] + row["slot_end"]) / 2)
            if BASIS_RANK.get(new.basis, 0) < BASIS_RANK.get(row["basis"], 0):
                continue  # less sure than what was booked (the book no longer holds the slot): keep it
            if (new.g_per_kwh, new.status, new.basis) != (row["g_per_kwh"], row["status"], row["basis"]):
                changed.append((row["bucket_start"], row["slot_start"], new))
        if not changed:
            return 0
        self.ledger.set_intensities(changed)
        self._slot_values = None  # the current bucket's values are read again at the next tick
        co2e = self.ledger.job_co2e_g(list(self._jobs), self.pue)
        for job_id, st in self._jobs.items():
            st.co2e_g = co2e.get(job_id, st.co2e_g)
        buckets = sorted({b for b, _, _ in changed})
        if self.settle_sinks:
            settled = [
                SettledBucket(job=JobRef(r["job_id"], r["label"], r["user"], r["uid"]), bucket_start=r["bucket_start"],
                              co2e_g=r["gj"] * self.pue, g_per_kwh=r["g_per_kwh"], status=r["status"])
                for r in self.ledger.bucket_job_energy(buckets) if r["g_per_kwh"] is not None
            ]
            self._feed(self.settle_sinks, settled)
        log.info("settled %d bucket(s) (%d provider interval value(s)) with new grid intensity",
                 len(buckets), len(changed))
        return len(buckets)

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
        self._executor.shutdown(wait=True)  # no tick runs past this point
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
        if self._store_backlog:
            try:
                self.ledger.record_ticks(self._store_backlog)
                self._store_backlog.clear()
            except Exception as exc:
                log.error("store: %d tick(s) kept in memory could not be written at stop: %s",
                          len(self._store_backlog), exc)
        self.tracker.close()
        self.ledger.close()
