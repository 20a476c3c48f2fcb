"""The job book: the engine's in-memory account of jobs and devices, tick by tick.

Components are ``model.COMPONENTS`` (gpu, cpu, dram and ``other``, the node
remainder); the node's own reading (kind ``node``) is a device like any other: its
total is kept and stored, and attribution has already turned it into ``other``.

It follows each job's life (a job ends when its last process is gone; jobs running at
the last stop are continued by ``restore``), adds up energy per job and component,
devices' energy totals and the unattributed remainder, and prices each tick's energy
in CO2e (``carbon.co2e_g``: energy x the grid value of the provider interval (slot)
holding the tick x PUE). Per job and ledger bucket it keeps the energy per slot, so the
bucket's CO2e and energy-weighted intensity are exactly what the ledger books.
``settle`` later revises provisional slot values (new realised values or forecasts)
in the ledger and every affected job's CO2e.

From each tick it builds the ``TickRecord`` the sinks get and the ``TickRow`` the
store writes (``book_tick``), and the immutable ``Snapshot`` that /metrics and the
API read (``snapshot``); finished jobs leave the snapshot after the grace period,
the oldest-ended first beyond ``max_finished_in_metrics``.

Lifecycle (issue 16, daemon/footprint/): per tick, each job's occupancy of the
devices (item-seconds: GPU board-seconds by model, CPU socket-, DRAM GB- and
server-seconds; ``lifecycle.occupancy``, the same shares as energy) is added to the
job and stored with the tick; the devices' whole occupancy minus the jobs' is the
unattributed embodied carbon (``unattributed_embodied_co2e_grams_total``), so jobs +
unattributed = the devices' amortised total. A job's embodied, market-based CO2e and
water are restated from its energy, CO2e and occupancy with the footprint's factors
(``lifecycle.job_lifecycle``) whenever the snapshot is built; the record carries this
tick's embodied grams and water per job and the bucket's market-based grams.

Time: the wall clock only says which ledger bucket (and slot) a tick lands in and
stamps the outputs, so a wall clock step moves where energy is booked, never how much.

Node gaps: ``MeasuredWindow`` keeps, for the last ``MEASURED_WINDOW_S`` on the
monotonic clock, the measured (gpu + cpu + dram) energy, per job and in all, of the
ticks that had no node figure (only with a node source: the engine feeds it). A node reading that covers more than its tick (the node
source's booking of a gap, ``interval_s`` = the span) is compared with the measured
energy of the ticks of that span that had no node figure (``span_before``), and its
remainder goes to the jobs that ran in it: a job that has ended since still gets its
share while it is in the book (its totals and the ledger's row, its life left as it
was; ``JobTick.running`` False).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

from ..attribution import Attribution, SpanMeasured
from ..carbon import IntensityBook, co2e_g
from ..footprint.lifecycle import embodied_co2e_g, job_lifecycle, market_co2e_g, occupancy, water_l
from ..ledger import BASIS_RANK, JobTick, Ledger, TickRow
from ..model import (COMPONENTS, MEASURED_COMPONENTS, DeviceReading, DeviceState, Intensity, JobIdentity, JobRef, JobTotals,
                     SettledBucket, SourceHealth, Snapshot, TickRecord)
from ..procs import ProcessView

if TYPE_CHECKING:
    from ..footprint.factors import Footprint

log = logging.getLogger("wattprint.engine")
UNATTRIBUTED_EMBODIED = "unattributed_embodied_co2e_grams_total"  # a Snapshot.counters key

# How far back the measured energy of ticks is kept for node readings that cover a gap
# (the node source books a gap of at most its MAX_GAP_S = 600 s; a margin on top).
MEASURED_WINDOW_S = 660.0
SPAN_EDGE_S = 1e-3  # the tick at exactly now - span is the span's start: not in it


@dataclass(frozen=True, slots=True)
class _TickMeasured:
    mono: float
    measured_j: float
    job_measured_j: dict[str, float]


class MeasuredWindow:
    """The recent ticks' measured energy (module docstring), oldest first, bounded by
    ``keep_s`` on the monotonic clock. Only ticks with no node figure are kept (the
    others are never part of a gap), so with a BMC that answers it stays empty."""

    def __init__(self, keep_s: float = MEASURED_WINDOW_S) -> None:
        self.keep_s = keep_s
        self._ticks: deque[_TickMeasured] = deque()

    def add(self, now_mono: float, att: Attribution) -> None:
        """Remember this tick (after its attribution) if it had no node figure."""
        if att.node_j is None:
            jobs = {job_id: j for job_id, energy in att.job_energy_j.items()
                    if (j := sum(energy.get(c, 0.0) for c in MEASURED_COMPONENTS)) > 0.0}
            measured = sum(att.device_j.get(c, 0.0) for c in MEASURED_COMPONENTS)
            self._ticks.append(_TickMeasured(now_mono, measured, jobs))
        while self._ticks and now_mono - self._ticks[0].mono > self.keep_s:
            self._ticks.popleft()

    def span_before(self, now_mono: float, span_s: float, known_jobs: set[str] | None = None) -> SpanMeasured | None:
        """The measured energy of the ticks in (now - span_s, now) that had no node
        figure; None when there are none (the usual tick). A job not in ``known_jobs``
        (no longer in the book) counts as unattributed."""
        start = now_mono - span_s + SPAN_EDGE_S
        measured = 0.0
        jobs: dict[str, float] = {}
        found = False
        for t in reversed(self._ticks):
            if t.mono <= start:
                break
            if t.mono >= now_mono:
                continue
            found = True
            measured += t.measured_j
            for job_id, j in t.job_measured_j.items():
                if known_jobs is None or job_id in known_jobs:
                    jobs[job_id] = jobs.get(job_id, 0.0) + j
        return SpanMeasured(measured, jobs) if found else None


def _tick_span_s(readings: Sequence[DeviceReading], interval_s: float) -> float:
    """The time this tick's CPU, DRAM and server occupancy covers: the CPU/DRAM
    readings' interval (measured on the monotonic clock, so a skipped tick is covered
    by the next), else the GPUs', else the configured interval. Node readings may span
    a gap and never count."""
    for kinds in (("cpu", "dram"), ("gpu",)):
        spans = [r.interval_s for r in readings if r.kind in kinds]
        if spans:
            return max(spans)
    return interval_s


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
    # item -> item-seconds occupied over the job's life (the store's from earlier runs included)
    occupancy: dict[str, float] = field(default_factory=dict)


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


@dataclass(frozen=True)
class BookedTick:
    """One tick as booked: what the sinks get, what the store writes, and the grid
    value (of the tick's slot) it was priced with."""

    record: TickRecord
    row: TickRow
    intensity: Intensity


@dataclass(frozen=True)
class Settlement:
    """What ``settle`` changed: buckets, provider interval values, and the new per-job
    bucket figures for the settle sinks (None when none were asked for)."""

    buckets: int
    values: int
    settled: list[SettledBucket] | None


class JobBook:
    """Jobs, devices and CO2e in memory (see the module docstring). ``pue``,
    ``finished_grace_s`` and ``max_finished_in_metrics`` are fixed when it is built;
    the intensity book is handed to each call (the daemon swaps it in after building
    the engine)."""

    def __init__(self, ledger: Ledger, pue: float, finished_grace_s: float, max_finished_in_metrics: int,
                 footprint: Footprint | None = None) -> None:
        if footprint is None:
            from ..footprint.factors import default_footprint

            footprint = default_footprint()
        self.ledger = ledger
        self.pue = pue
        self.footprint = footprint
        self.finished_grace_s = finished_grace_s
        self.max_finished_in_metrics = max_finished_in_metrics
        self.jobs: dict[str, _JobState] = {}
        self.devices: dict[tuple[str, str], _DeviceAcc] = {}
        self.unattributed_total: dict[str, float] = {c: 0.0 for c in COMPONENTS}
        self.counters: dict[str, float] = {"gpu_invisible_process_energy_joules_total": 0.0,
                                           UNATTRIBUTED_EMBODIED: 0.0}
        self.tick = 0
        self.window = MeasuredWindow()  # recent ticks' measured energy (node gaps)
        self._restored = False
        # The current bucket and the value booked for each of its slots (slot_start -> value)
        self._slot_values: tuple[int, dict[int, Intensity]] | None = None
        # A finished job's totals as last published, with what they were computed from
        # (issue 18): up to max_finished_in_metrics finished jobs are in every snapshot and
        # rarely change (a settlement, a node gap's remainder), so they are built again only
        # when one of their inputs differs.
        self._finished_totals: dict[str, tuple[JobIdentity, float, dict[str, float], dict[str, float], JobTotals]] = {}

    # -- restore -------------------------------------------------------------
    def restore(self, job_rows: dict[str, dict], co2e_g: dict[str, float]) -> None:
        """Continue jobs that were running when the daemon last stopped (their occupancy
        read from the store)."""
        try:
            occupied = self.ledger.job_occupancy(list(job_rows))
        except Exception:  # the store is failing: the jobs continue with what the ledger adds
            log.debug("reading the jobs' occupancy failed", exc_info=True)
            occupied = {}
        for job_id, row in job_rows.items():
            ident = JobIdentity(
                job_id=job_id, label=row["label"], label_source=row["label_source"], uid=row["uid"],
                user=row["user"], command=row["command"], root_pid=row["root_pid"], started_at=row["started_at"],
                label_raw=row["label_raw"],
            )
            self.jobs[job_id] = _JobState(
                identity=ident,
                energy_j={c: float(row.get(f"{c}_j", 0.0)) for c in COMPONENTS},  # other_j: schema 4
                co2e_g=co2e_g.get(job_id, 0.0),
                running=True,
                ended_at=row["last_seen"],  # if not found again, it ended when last seen
                occupancy=dict(occupied.get(job_id, {})),
            )
        self._restored = True

    # -- one tick ------------------------------------------------------------
    def book_tick(self, wall: float, readings: Sequence[DeviceReading], view: ProcessView, att: Attribution,
                  book: IntensityBook, interval_s: float,
                  gpu_idle_floor_w: Mapping[str, float] | None = None) -> BookedTick:
        """Book one attributed tick: job lifecycle, per-job energy, CO2e and occupancy,
        device totals; returns the sinks' record and the store's row.
        ``gpu_idle_floor_w``: the idle floors attribution used (GPU occupancy shares)."""
        self.counters["gpu_invisible_process_energy_joules_total"] += att.gpu_invisible_j
        ended = self._end_jobs_gone(view, wall)
        fp = self.footprint
        job_occ, total_occ = occupancy(att, readings, view, fp, _tick_span_s(readings, interval_s), gpu_idle_floor_w)
        job_embodied: dict[str, float] = {}
        job_water: dict[str, float] = {}
        bucket_market: dict[str, float] = {}

        bucket = self.ledger.bucket_of(wall)
        intensity, slot = self._intensity_for(bucket, wall, book)
        g_per_kwh = intensity.g_per_kwh
        bucket_co2e: dict[str, float] = {}
        bucket_g: dict[str, float] = {}
        bucket_status: dict[str, str] = {}
        job_ticks: list[JobTick] = []
        for usage in view.jobs:
            ident = usage.identity
            energy = att.job_energy_j.get(ident.job_id, {})
            st = self.jobs.get(ident.job_id)
            if st is None:
                st = self.jobs[ident.job_id] = _JobState(ident, {c: 0.0 for c in COMPONENTS}, 0.0)
            st.running, st.ended_at = True, None
            self._add_job_energy(st, energy, bucket, slot, g_per_kwh, bucket_co2e, bucket_g, bucket_status,
                                 bucket_market)
            occ = job_occ.get(ident.job_id, {})
            for item, seconds in occ.items():
                st.occupancy[item] = st.occupancy.get(item, 0.0) + seconds
            job_embodied[ident.job_id] = embodied_co2e_g(occ, fp)
            job_water[ident.job_id] = water_l(sum(energy.values()), fp, self.pue)
            job_ticks.append(JobTick(
                identity=ident, energy_j=energy, gpu_seconds=att.gpu_seconds.get(ident.job_id, 0.0),
                gpu_memory_bytes=att.gpu_memory_bytes.get(ident.job_id, 0),
                # Per component, the weakest source of the devices that gave this job energy this
                # tick (attribution); the ledger keeps the weakest over the job's life.
                sources=dict(att.job_sources.get(ident.job_id, {})),
                steps=usage.steps,
                occupancy_s=occ,
            ))
        # Jobs no longer running that got a share of a node gap's remainder (attribution:
        # they ran in the span it covers): booked, their life left as it was.
        refs = {u.identity.job_id: JobRef(u.identity.job_id, u.identity.label, u.identity.user, u.identity.uid)
                for u in view.jobs}
        for job_id, energy in att.job_energy_j.items():
            st = self.jobs.get(job_id)
            if job_id in refs or st is None:
                continue
            self._add_job_energy(st, energy, bucket, slot, g_per_kwh, bucket_co2e, bucket_g, bucket_status,
                                 bucket_market)
            job_embodied[job_id] = 0.0  # it occupies nothing now: only its share of the node remainder
            job_water[job_id] = water_l(sum(energy.values()), fp, self.pue)
            ident = st.identity
            refs[job_id] = JobRef(job_id, ident.label, ident.user, ident.uid)
            job_ticks.append(JobTick(identity=ident, energy_j=energy, gpu_seconds=0.0, gpu_memory_bytes=0,
                                     sources=dict(att.job_sources.get(job_id, {})), running=False))

        device_rows = [(r.kind, r.device, r.energy_j, r.source) for r in readings]
        self._add_device_totals(readings, att)
        # Embodied conservation: the devices' amortised total of the tick = jobs + unattributed.
        self.counters[UNATTRIBUTED_EMBODIED] += max(0.0, embodied_co2e_g(total_occ, fp) - sum(job_embodied.values()))

        record = TickRecord(
            sampled_at=wall,
            interval_s=max((r.interval_s for r in readings), default=interval_s),
            readings=tuple(readings),
            jobs=refs,
            job_energy_j=att.job_energy_j,
            unattributed_j=att.unattributed_j,
            bucket_start=bucket,
            bucket_co2e_g=bucket_co2e,
            g_per_kwh=intensity.g_per_kwh,
            intensity_status=intensity.status,
            bucket_g_per_kwh=bucket_g,
            bucket_intensity_status=bucket_status,
            bucket_co2e_market_g=bucket_market,
            job_embodied_co2e_g=job_embodied,
            job_water_l=job_water,
        )
        row = TickRow(wall, job_ticks, device_rows, dict(att.unattributed_j), intensity, ended)
        return BookedTick(record, row, intensity)

    def _add_job_energy(self, st: _JobState, energy: Mapping[str, float], bucket: int, slot: int,
                        g_per_kwh: float, bucket_co2e: dict[str, float], bucket_g: dict[str, float],
                        bucket_status: dict[str, str], bucket_market: dict[str, float]) -> None:
        """Add a job's energy of this tick to its totals, CO2e and bucket (per slot), and
        its bucket's figures (market-based CO2e too) to the record's maps."""
        job_id = st.identity.job_id
        tick_j = 0.0
        for c in COMPONENTS:
            st.energy_j[c] += energy.get(c, 0.0)
            tick_j += energy.get(c, 0.0)
        # CO2e: this tick's energy x the value of the provider interval (slot) holding it.
        st.co2e_g += co2e_g(tick_j, g_per_kwh, self.pue)
        if st.bucket_start != bucket:  # (after a restart the bucket may hold energy already)
            st.bucket_start, st.slot_j = bucket, self._stored_slot_j(job_id, bucket)
        if tick_j:  # as the ledger books it (job_slots)
            st.slot_j[slot] = st.slot_j.get(slot, 0.0) + tick_j
        grams, mean_g, status = self._bucket_co2e(st.slot_j)
        bucket_co2e[job_id] = grams
        bucket_market[job_id] = market_co2e_g(sum(st.slot_j.values()), grams, self.footprint, self.pue)
        if mean_g is not None:
            bucket_g[job_id], bucket_status[job_id] = mean_g, status

    def _end_jobs_gone(self, view: ProcessView, wall: float) -> list[tuple[str, float]]:
        """Job lifecycle: a job ends when its last process is gone (a restored job not
        found again ended when last seen). Returns (job_id, ended_at) of those ending now."""
        live_ids = {j.identity.job_id for j in view.jobs}
        ended: list[tuple[str, float]] = []
        for job_id, st in self.jobs.items():
            if st.running and job_id not in live_ids:
                st.running = False
                st.ended_at = wall if not self._restored or st.ended_at is None else st.ended_at
                ended.append((job_id, st.ended_at))
        self._restored = False
        return ended

    def _add_device_totals(self, readings: Sequence[DeviceReading], att: Attribution) -> None:
        """Per device: the last power, the energy total, source, UUID and vendor; and
        the unattributed energy total per component."""
        for r in readings:
            acc = self.devices.get((r.kind, r.device))
            if acc is None:
                acc = self.devices[(r.kind, r.device)] = _DeviceAcc(r.kind, r.device, r.name)
            acc.power_w = r.power_w
            acc.energy_j_total += r.energy_j
            acc.source = r.source
            acc.uuid = r.uuid or acc.uuid
            acc.vendor = r.vendor or acc.vendor
        for c in COMPONENTS:
            self.unattributed_total[c] += att.unattributed_j.get(c, 0.0)

    def _intensity_for(self, bucket: int, wall: float, book: IntensityBook) -> tuple[Intensity, int]:
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
        looked = book.lookup(wall)
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
        # gj is Σ J x g/kWh: the formula applied to it at 1 g/kWh gives the grams.
        return co2e_g(gj, 1.0, self.pue), mean, "final" if final else "provisional"

    def _stored_slot_j(self, job_id: str, bucket: int) -> dict[int, float]:
        try:
            return self.ledger.job_slot_energy_j(job_id, bucket)
        except Exception:
            log.debug("reading a job's bucket failed", exc_info=True)
            return {}

    # -- publish -------------------------------------------------------------
    def snapshot(self, wall: float, intensity: Intensity, started_perf: float, duration_hint_s: float,
                 health: tuple[SourceHealth, ...], counters: dict[str, float],
                 counter_glitches: dict[tuple[str, str, str], float]) -> Snapshot:
        """Count the tick and build its immutable snapshot (after finished jobs past
        their grace period, or beyond the cap, have left the book). ``intensity``: the
        tick's grid value; ``started_perf``: ``time.perf_counter()`` when the tick began."""
        self._forget_finished(wall)
        self.tick += 1
        return Snapshot(
            taken_at=wall,
            tick=self.tick,
            tick_duration_s=time.perf_counter() - started_perf + duration_hint_s,
            devices=tuple(DeviceState(a.kind, a.device, a.name, a.power_w, a.energy_j_total, a.source, a.uuid,
                                      a.vendor)  # type: ignore[arg-type]
                          for a in sorted(self.devices.values(), key=lambda a: (a.kind, a.device))),
            jobs=tuple(self._job_totals(j, st) if st.running else self._finished_job_totals(j, st)
                       for j, st in self.jobs.items()),
            unattributed_j_total=dict(self.unattributed_total),
            health=health,
            grid_zone=intensity.zone,
            grid_provider=intensity.provider,
            grid_g_per_kwh=intensity.g_per_kwh,
            counters=counters,
            counter_glitches=counter_glitches,
        )

    def _job_totals(self, job_id: str, st: _JobState) -> JobTotals:
        """A job's totals, its lifecycle figures restated with the current factors."""
        life = job_lifecycle(st.energy_j, st.co2e_g, st.occupancy, self.footprint, self.pue)
        return JobTotals(job_id=job_id, label=st.identity.label, user=st.identity.user, uid=st.identity.uid,
                         energy_j=dict(st.energy_j), co2e_g=st.co2e_g,
                         state="running" if st.running else "finished",
                         embodied_co2e_g=life.embodied_co2e_g, co2e_market_g=life.co2e_market_g,
                         water_l=life.water_l)

    def _finished_job_totals(self, job_id: str, st: _JobState) -> JobTotals:
        """``_job_totals`` of a finished job, the last one built while its inputs are the same."""
        cached = self._finished_totals.get(job_id)
        if cached is not None:  # compared field by field, dicts in C (issue 18: 200 jobs a tick)
            ident, co2e, energy, occupancy, totals = cached
            if ident is st.identity and co2e == st.co2e_g and energy == st.energy_j and occupancy == st.occupancy:
                return totals
        totals = self._job_totals(job_id, st)
        self._finished_totals[job_id] = (st.identity, st.co2e_g, dict(st.energy_j), dict(st.occupancy), totals)
        return totals

    def _forget_finished(self, wall: float) -> None:
        """Finished jobs leave the snapshot (and /metrics) after the grace period, and the
        oldest-ended go first beyond max_finished_in_metrics (many short jobs: the series
        per scrape stay bounded; totals are in the store, the API and InfluxDB)."""
        gone: list[str] = []  # past the grace period
        finished: list[tuple[float, str]] = []  # the others; sorted only when over the cap (issue 18)
        for j, st in self.jobs.items():
            if not st.running:
                if st.ended_at is not None and wall - st.ended_at > self.finished_grace_s:
                    gone.append(j)
                else:
                    finished.append((st.ended_at or 0.0, j))
        if len(finished) > self.max_finished_in_metrics:
            gone += [j for _, j in sorted(finished)[:len(finished) - self.max_finished_in_metrics]]
        for job_id in gone:
            del self.jobs[job_id]
            self._finished_totals.pop(job_id, None)

    # -- settlement ----------------------------------------------------------
    def settle(self, book: IntensityBook, for_sinks: bool) -> Settlement:
        """Re-evaluate every provisional slot value against the intensity book (new
        realised values or forecasts arrived), looked up at the slot's middle.
        Changed values are rewritten in the ledger and every affected job's CO2e
        follows (Σ slot energy x slot value, as at write time); with ``for_sinks``,
        the new per-job bucket figures are read for the settle sinks."""
        changed: list[tuple[int, int, Intensity]] = []
        for row in self.ledger.bucket_intensities(("provisional",)):
            new = book.lookup((row["slot_start"] + row["slot_end"]) / 2)
            if BASIS_RANK.get(new.basis, 0) < BASIS_RANK.get(row["basis"], 0):
                continue  # less sure than what was booked (the book no longer holds the slot): keep it
            if (new.g_per_kwh, new.status, new.basis) != (row["g_per_kwh"], row["status"], row["basis"]):
                changed.append((row["bucket_start"], row["slot_start"], new))
        if not changed:
            return Settlement(0, 0, None)
        self.ledger.set_intensities(changed)
        self._slot_values = None  # the current bucket's values are read again at the next tick
        co2e = self.ledger.job_co2e_g(list(self.jobs), self.pue)
        for job_id, st in self.jobs.items():
            st.co2e_g = co2e.get(job_id, st.co2e_g)
        buckets = sorted({b for b, _, _ in changed})
        settled = None
        if for_sinks:
            settled = [
                SettledBucket(job=JobRef(r["job_id"], r["label"], r["user"], r["uid"]), bucket_start=r["bucket_start"],
                              co2e_g=r["gj"] * self.pue, g_per_kwh=r["g_per_kwh"], status=r["status"],
                              co2e_market_g=market_co2e_g(r["energy_j"], r["gj"] * self.pue, self.footprint,
                                                          self.pue))
                for r in self.ledger.bucket_job_energy(buckets) if r["g_per_kwh"] is not None
            ]
        return Settlement(len(buckets), len(changed), settled)
