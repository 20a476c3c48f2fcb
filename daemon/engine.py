"""The tick engine: once per interval, read every source, attribute, book in the
ledger, hand the tick to the sinks, and publish a new immutable snapshot.

The schedule is drift-free (tick k is due at t0 + k x interval on the monotonic
clock; a late tick skips the missed slots and counts them). All blocking work (NVML,
/proc, sysfs, SQLite) runs on one worker thread, never on the event loop, so the
HTTP API stays responsive and the order of NVML calls stays simple.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .attribution import attribute
from .carbon import IntensityBook
from .health import HealthBoard
from .ledger import J_PER_KWH, Intensity, JobTick, Ledger
from .model import COMPONENTS, DeviceReading, DeviceState, JobRef, JobTotals, SettledBucket, Snapshot, TickRecord
from .procs import JobIdentity, ProcessTracker, ProcessView
from .sources.base import Source, SourceError

log = logging.getLogger("wattprint.engine")

TickSink = Callable[[TickRecord], None]
SettleSink = Callable[[list[SettledBucket]], None]


@dataclass
class _JobState:
    identity: JobIdentity
    energy_j: dict[str, float]
    co2e_g: float
    running: bool = True
    ended_at: float | None = None
    bucket_start: int = -1  # the ledger bucket of the last tick
    bucket_j: float = 0.0  # energy booked in that bucket by this daemon run


@dataclass
class _DeviceAcc:
    kind: str
    device: str
    name: str
    power_w: float = 0.0
    energy_j_total: float = 0.0
    source: str = "counter"


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
    idle_policy: str = "unattributed"
    sinks: list[TickSink] = field(default_factory=list)
    settle_sinks: list[SettleSink] = field(default_factory=list)
    snapshot: Snapshot | None = None
    _executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="wattprint-tick"))
    _jobs: dict[str, _JobState] = field(default_factory=dict)
    _devices: dict[tuple[str, str], _DeviceAcc] = field(default_factory=dict)
    _unattributed_total: dict[str, float] = field(default_factory=lambda: {c: 0.0 for c in COMPONENTS})
    _tick: int = 0
    _restored: bool = False
    _counters: dict[str, float] = field(default_factory=lambda: {"tick_overruns_total": 0.0, "tick_errors_total": 0.0})
    extra_counters: Callable[[], dict[str, float]] | None = None
    _bucket_intensity: tuple[int, Intensity] | None = None

    def __post_init__(self) -> None:
        for src in self.sources:
            self.health.register(src.name)
        self.health.register("processes")
        self.health.register("store")

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
    def _read_sources(self, now_mono: float) -> list[DeviceReading]:
        readings: list[DeviceReading] = []
        for src in self.sources:
            try:
                got = list(src.read(now_mono))
            except SourceError as exc:
                self.health.fail(src.name, exc.detail)
                continue
            except Exception as exc:  # a bug or an unexpected driver error: degrade, go on
                log.debug("source %s raised", src.name, exc_info=True)
                self.health.fail(src.name, f"unexpected {type(exc).__name__}: {exc}")
                continue
            problems = src.problems()
            if problems:
                self.health.fail(src.name, "; ".join(problems))
            else:
                self.health.ok(src.name)
            readings.extend(got)
        return readings

    def tick_blocking(self, now_mono: float, wall: float, duration_hint_s: float = 0.0) -> Snapshot:
        """One tick, synchronously. Runs on the worker thread (tests may call it directly)."""
        started = time.perf_counter()
        readings = self._read_sources(now_mono)
        gpu_pids = {p.pid for r in readings if r.kind == "gpu" for p in r.processes}
        try:
            view = self.tracker.observe(now_mono, gpu_pids)
            self.health.ok("processes")
        except Exception as exc:
            log.debug("process scan failed", exc_info=True)
            self.health.fail("processes", f"{type(exc).__name__}: {exc}")
            view = ProcessView(jobs=(), pid_to_job={}, cpu_busy_s=0.0, mem_used_bytes=0, scanned=False)
        att = attribute(readings, view, self.idle_policy)

        # Job lifecycle: a job ends when its last process is gone.
        live_ids = {j.identity.job_id for j in view.jobs}
        ended: list[tuple[str, float]] = []
        for job_id, st in self._jobs.items():
            if st.running and job_id not in live_ids:
                st.running = False
                st.ended_at = wall if not self._restored or st.ended_at is None else st.ended_at
                ended.append((job_id, st.ended_at))
        self._restored = False

        sources_by_kind: dict[str, str] = {}
        for r in readings:
            # The weakest source of a component names it: estimate < power < counter.
            prev = sources_by_kind.get(r.kind)
            rank = {"counter": 0, "power": 1, "estimate": 2}
            if prev is None or rank[r.source] > rank[prev]:
                sources_by_kind[r.kind] = r.source

        bucket = self.ledger.bucket_of(wall)
        intensity = self._intensity_for(bucket, wall)
        g_per_kwh = intensity.g_per_kwh if intensity is not None else 0.0
        bucket_co2e: dict[str, float] = {}
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
            st.co2e_g += tick_j / J_PER_KWH * g_per_kwh * self.pue
            if st.bucket_start != bucket:  # (after a restart the bucket may hold energy already)
                st.bucket_start, st.bucket_j = bucket, self.ledger.job_bucket_energy_j(ident.job_id, bucket)
            st.bucket_j += tick_j
            bucket_co2e[ident.job_id] = st.bucket_j / J_PER_KWH * g_per_kwh * self.pue
            job_ticks.append(JobTick(
                identity=ident, energy_j=energy, gpu_seconds=att.gpu_seconds.get(ident.job_id, 0.0),
                gpu_memory_bytes=att.gpu_memory_bytes.get(ident.job_id, 0),
                sources={c: sources_by_kind[c] for c in COMPONENTS if c in sources_by_kind and energy.get(c)},
            ))

        device_rows = [(r.kind, r.device, r.energy_j, r.source) for r in readings]
        try:
            self.ledger.record_tick(wall, job_ticks, device_rows, att.unattributed_j, intensity, ended)
            self.health.ok("store")
        except Exception as exc:
            log.debug("store write failed", exc_info=True)
            self.health.fail("store", f"{type(exc).__name__}: {exc}")

        for r in readings:
            acc = self._devices.get((r.kind, r.device))
            if acc is None:
                acc = self._devices[(r.kind, r.device)] = _DeviceAcc(r.kind, r.device, r.name)
            acc.power_w = r.power_w
            acc.energy_j_total += r.energy_j
            acc.source = r.source
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
            g_per_kwh=intensity.g_per_kwh if intensity else None,
            intensity_status=intensity.status if intensity else "",
        )
        for sink in self.sinks:
            try:
                sink(record)
            except Exception as exc:
                log.debug("sink failed", exc_info=True)
                self.health.fail("sinks", f"{type(exc).__name__}: {exc}")

        # Finished jobs leave the snapshot (and /metrics) after the grace period.
        for job_id in [j for j, st in self._jobs.items()
                       if not st.running and st.ended_at is not None and wall - st.ended_at > self.finished_grace_s]:
            del self._jobs[job_id]

        self._tick += 1
        snap = Snapshot(
            taken_at=wall,
            tick=self._tick,
            tick_duration_s=time.perf_counter() - started + duration_hint_s,
            devices=tuple(DeviceState(a.kind, a.device, a.name, a.power_w, a.energy_j_total, a.source)  # type: ignore[arg-type]
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
            counters={**self._counters, **(self.extra_counters() if self.extra_counters else {})},
        )
        self.snapshot = snap
        return snap

    def _intensity_for(self, bucket: int, wall: float) -> Intensity | None:
        """One intensity per ledger bucket: the one stored for it (this run or a
        previous one), else the book's value now. Settlement revises it later."""
        cached = self._bucket_intensity
        if cached is not None and cached[0] == bucket:
            return cached[1]
        found = self.ledger.bucket_intensity(bucket) or self.intensity.lookup(wall)
        self._bucket_intensity = (bucket, found)
        return found

    # -- settlement ----------------------------------------------------------
    def settle_blocking(self) -> int:
        """Re-evaluate every provisional bucket against the intensity book (new
        realised values or forecasts arrived). Changed buckets are rewritten in the
        ledger, every affected job's CO2e follows, and the settle sinks get the new
        per-job bucket figures. Runs on the tick thread; returns buckets changed."""
        half = self.ledger.bucket_s / 2
        changed: list[tuple[int, Intensity]] = []
        for row in self.ledger.bucket_intensities(("provisional",)):
            new = self.intensity.lookup(row["bucket_start"] + half)
            if (new.g_per_kwh, new.status, new.basis) != (row["g_per_kwh"], row["status"], row["basis"]):
                changed.append((row["bucket_start"], new))
        if not changed:
            return 0
        self.ledger.set_intensities(changed)
        self._bucket_intensity = None
        co2e = self.ledger.job_co2e_g(list(self._jobs), self.pue)
        for job_id, st in self._jobs.items():
            st.co2e_g = co2e.get(job_id, st.co2e_g)
        if self.settle_sinks:
            settled = [
                SettledBucket(job=JobRef(r["job_id"], r["label"], r["user"], r["uid"]), bucket_start=r["bucket_start"],
                              co2e_g=r["energy_j"] / J_PER_KWH * r["g_per_kwh"] * self.pue,
                              g_per_kwh=r["g_per_kwh"], status=r["status"])
                for r in self.ledger.bucket_job_energy([b for b, _ in changed])
            ]
            for sink in self.settle_sinks:
                try:
                    sink(settled)
                except Exception as exc:
                    log.debug("settle sink failed", exc_info=True)
                    self.health.fail("sinks", f"{type(exc).__name__}: {exc}")
        log.info("settled %d bucket(s) with new grid intensity", len(changed))
        return len(changed)

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
            except Exception:
                self._counters["tick_errors_total"] += 1
                log.exception("tick failed")
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
        for src in self.sources:
            try:
                src.close()
            except Exception:
                log.debug("closing %s failed", src.name, exc_info=True)
        self._executor.shutdown(wait=True)
        self.tracker.close()
        self.ledger.close()
