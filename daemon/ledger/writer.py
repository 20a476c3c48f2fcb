"""The store's writer: ``Ledger`` books each tick's energy per job, component and
bucket, device and unattributed totals and the intensity used per slot; keeps the
provider's series; revises slot values at settlement; and deletes old buckets
(retention). One writer (the tick thread) commits once per tick, so a crash loses at
most the last tick.

One daemon per store: the writer holds an exclusive ``flock`` on ``<store>.lock``
while it is open; a store locked by someone else is refused with a ``LedgerError``.

Each tick's energy is booked twice in the same transaction: per component in
``job_buckets`` and, all components together, per slot in ``job_slots``; the
intensity used for a slot of a bucket is one ``bucket_intensity`` row (a slot is the
provider's interval cut to the bucket, so a bucket holds at most bucket_s /
resolution of them, and exactly one when the provider's resolution is at least the
bucket). Settling a slot's value (provisional -> final) revises every affected job
at once, with the same arithmetic as at write time.

Retention: ``Ledger.prune(before)`` deletes the buckets (job, device, unattributed,
intensity) that end at or before the bucket boundary at ``before``, the grid series
that ended by then, and the finished jobs that ended before that boundary. A job
that outlives the cut keeps its totals: the CO2e of its deleted buckets is folded
into ``jobs.pruned_co2e_g`` first, and its energy totals live in the jobs row.

Occupancy (schema 5, issue 16): each tick adds every job's device-time per item to
its cumulative ``job_occupancy`` rows in the same transaction; retention deletes the
rows of the jobs it deletes (a kept job keeps all of its occupancy).

All query values are bound parameters; nothing from users is ever formatted into SQL.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sqlite3
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from ..carbon import J_PER_KWH
from ..model import COMPONENTS, Intensity, JobIdentity
from .co2e_sql import PER_KWH_SQL, co2e_rows
from .schema import (
    TICK_BUSY_TIMEOUT_MS,
    LedgerError,
    bound_page_cache,
    connect,
    is_locked,
    locked_error,
    prepare,
)

PRUNE_TABLES = ("job_buckets", "job_slots", "device_buckets", "unattributed_buckets", "bucket_intensity")
KNOWN_JOBS_MAX = 100_000  # bound of Ledger._known (running jobs whose identity rows are written)


@dataclass(frozen=True, slots=True)
class TickRow:
    """Everything one tick books (``Ledger.record_ticks``)."""

    wall_s: float
    jobs: Sequence[JobTick]
    device_j: Sequence[tuple[str, str, float, str]]  # kind, device, J, source
    unattributed_j: Mapping[str, float]
    intensity: Intensity | None
    ended: Sequence[tuple[str, float]] = ()  # job_id, ended_at


@dataclass(frozen=True, slots=True)
class JobTick:
    """One job's share of one tick, as the ledger books it."""

    identity: JobIdentity
    energy_j: Mapping[str, float]  # component -> J
    gpu_seconds: float
    gpu_memory_bytes: int
    sources: Mapping[str, str]  # component -> counter | power | estimate
    steps: frozenset[str] = frozenset()  # Slurm steps of its processes in this tick
    # False: a job that has ended, booked a share of a node gap's remainder (engine/book.py):
    # its energy is added, its state, last_seen and ended_at are left as they are.
    running: bool = True
    # item -> item-seconds the job occupied in this tick (embodied carbon, issue 16;
    # daemon/footprint/lifecycle.py), added to ``job_occupancy``.
    occupancy_s: Mapping[str, float] = field(default_factory=dict)


# jobs.<component>_j += ? for every component (names from COMPONENTS only; values bound)
_ENERGY_SET_SQL = ", ".join(f"{comp}_j={comp}_j+?" for comp in COMPONENTS)


def _sources_merge(tick_sources: Mapping[str, str]) -> tuple[str, list[str]]:
    """SQL (and its parameters) for ``jobs.sources`` after a tick: per component in
    ``tick_sources``, the weaker of the stored source and the tick's (estimate < power
    < counter), so the column describes the job's whole life, across restarts too; and
    ``node`` (the BMC method that gave the job a share of the node remainder), the
    latest one. Only component names from COMPONENTS are formatted into the SQL;
    values are bound."""
    parts: list[str] = []
    params: list[str] = []
    for comp in COMPONENTS:
        new = tick_sources.get(comp)
        if new is None:
            continue
        old = f"json_extract(sources, '$.{comp}')"
        parts.append(f"'$.{comp}', CASE WHEN {old} = 'estimate' OR ? = 'estimate' THEN 'estimate' "
                     f"WHEN {old} = 'power' OR ? = 'power' THEN 'power' ELSE ? END")
        params += [new, new, new]
    node = tick_sources.get("node")
    if node:  # the BMC method that gave the job its node share (redfish | ipmi): the latest
        parts.append("'$.node', ?")
        params.append(node)
    if not parts:
        return "sources", []
    return f"json_set(sources, {', '.join(parts)})", params


class Ledger:
    """Writer side of the store. Not thread-safe: used from the tick thread only
    (``open``/``close`` too); readers use ``StoreReader``."""

    def __init__(self, path: str, host: str, bucket_s: int):
        self.path = path
        self.host = host
        self.bucket_s = bucket_s
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._lock_fd = self._take_lock(path)
        try:
            self.conn = connect(path, readonly=False)
        except LedgerError:
            self._release_lock()
            raise
        try:
            prepare(self.conn, path, bucket_s)
        except LedgerError:
            self._close_all()
            raise
        except sqlite3.DatabaseError as exc:
            self._close_all()
            if is_locked(exc):
                raise locked_error(path, exc) from None
            raise LedgerError(f"{path}: not a usable wattprint store: {exc}; the file is left as it is "
                              "(move it away to start with an empty store)") from None
        # From now on a lock held by someone else fails one tick's write (the engine
        # keeps the tick and retries), instead of blocking the tick for seconds.
        self.conn.execute(f"PRAGMA busy_timeout={TICK_BUSY_TIMEOUT_MS}")
        bound_page_cache(self.conn)  # 512 KiB instead of SQLite's 2,000 (issue 18: RSS)
        # What committed ticks already wrote for running jobs (issue 18): a known job's
        # identity row (jobs, slurm_jobs) is not written again, its sources are merged
        # only when the tick's differ from the last merged ones, its Slurm steps only
        # when new ones appear. Entries go when the job ends; ``_pending`` holds what
        # the open transaction wrote, moved here only once it commits.
        self._known: dict[str, tuple[dict[str, str], frozenset[str]]] = {}
        self._pending: dict[str, tuple[dict[str, str], frozenset[str]]] = {}

    @staticmethod
    def _take_lock(path: str) -> int:
        lock_path = path + ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise LedgerError(f"{lock_path}: cannot open the store's lock file: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise LedgerError(f"{path}: the store is in use by another wattprint daemon ({lock_path} is locked); "
                              "two daemons must not share a state_dir") from None
        return fd

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _close_all(self) -> None:
        try:
            self.conn.close()
        finally:
            self._release_lock()

    def bucket_of(self, wall_s: float) -> int:
        return int(wall_s // self.bucket_s) * self.bucket_s

    def slot_of(self, wall_s: float, intensity: Intensity | None) -> tuple[int, int]:
        """``[start, end)`` of the slot a tick at ``wall_s`` booked with ``intensity``
        falls in: the value's provider interval cut to the tick's bucket; the whole
        bucket when the value is not tied to an interval (static) or does not hold
        ``wall_s``."""
        bucket = self.bucket_of(wall_s)
        bucket_end = bucket + self.bucket_s
        if intensity is None or intensity.start is None or intensity.end is None:
            return bucket, bucket_end
        start = max(bucket, math.floor(intensity.start))
        end = min(bucket_end, math.ceil(intensity.end))
        if not start <= wall_s < end:
            return bucket, bucket_end
        return start, end

    def running_jobs(self) -> dict[str, dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM jobs WHERE state='running'").fetchall()
        return {r["id"]: dict(r) for r in rows}

    def record_tick(
        self,
        wall_s: float,
        jobs: Iterable[JobTick],
        device_j: Iterable[tuple[str, str, float, str]],  # kind, device, J, source
        unattributed_j: Mapping[str, float],
        intensity: Intensity | None,
        ended: Iterable[tuple[str, float]] = (),  # job_id, ended_at
    ) -> None:
        """Book one tick in one transaction."""
        self.record_ticks([TickRow(wall_s, tuple(jobs), tuple(device_j), dict(unattributed_j), intensity,
                                   tuple(ended))])

    def record_ticks(self, rows: Sequence[TickRow]) -> None:
        """Book several ticks, in order, in one transaction (all or nothing): a tick
        that could not be stored is retried together with the next one."""
        self._pending.clear()
        try:
            with self.conn:
                for row in rows:
                    self._book(row.wall_s, row.jobs, row.device_j, row.unattributed_j, row.intensity, row.ended)
        except BaseException:
            self._pending.clear()  # rolled back: the next try writes every row again
            raise
        self._known.update(self._pending)
        self._pending.clear()
        for row in rows:
            for job_id, _ in row.ended:
                self._known.pop(job_id, None)
        if len(self._known) > KNOWN_JOBS_MAX:  # jobs that vanished without an end: start over
            self._known.clear()

    def _book(
        self,
        wall_s: float,
        jobs: Iterable[JobTick],
        device_j: Iterable[tuple[str, str, float, str]],
        unattributed_j: Mapping[str, float],
        intensity: Intensity | None,
        ended: Iterable[tuple[str, float]],
    ) -> None:
        bucket = self.bucket_of(wall_s)
        slot_start, slot_end = self.slot_of(wall_s, intensity)
        slot_rows: list[tuple[str, int, int, float]] = []
        bucket_rows: list[tuple[str, int, str, float]] = []
        updates: dict[tuple[bool, str], list[tuple[Any, ...]]] = {}  # (running, sources SQL) -> UPDATE rows
        c = self.conn
        known, pending = self._known, self._pending
        for jt in jobs:
            ident = jt.identity
            job_id = ident.job_id
            seen = pending.get(job_id) or known.get(job_id)
            if seen is None:  # new to this writer: its identity row (kept if the store has it)
                c.execute(
                    """INSERT INTO jobs (id, host, label, label_raw, label_source, uid, user, command, root_pid,
                                         state, started_at, last_seen, sources)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?)
                       ON CONFLICT(id) DO NOTHING""",
                    (job_id, self.host, ident.label, ident.label_raw, ident.label_source, ident.uid, ident.user,
                     ident.command, ident.root_pid, ident.started_at, wall_s, json.dumps(dict(jt.sources))),
                )
                if ident.slurm is not None:
                    sj = ident.slurm
                    c.execute("INSERT INTO slurm_jobs VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(job_id) DO NOTHING",
                              (job_id, sj.job_id, sj.name, sj.array_job_id, sj.array_task_id, sj.partition, sj.user))
            if ident.slurm is not None and not (seen is not None and jt.steps <= seen[1]):
                c.executemany("INSERT INTO slurm_steps VALUES (?, ?) ON CONFLICT DO NOTHING",
                              [(job_id, step) for step in sorted(jt.steps)])
            # The merge keeps the weaker source per component (and the latest node method):
            # merging the same sources again changes nothing, so a known job's are merged
            # only when they differ from the last merged ones.
            if seen is None or seen[0] != jt.sources:
                merge_sql, merge_params = _sources_merge(jt.sources)
            else:
                merge_sql, merge_params = "sources", []
            # Remembered once committed; a job booked after its end (node gap share) is not.
            if jt.running and (seen is None or merge_params or not jt.steps <= seen[1]):
                pending[job_id] = (dict(jt.sources), jt.steps | seen[1] if seen is not None else jt.steps)
            energy = jt.energy_j
            updates.setdefault((jt.running, merge_sql), []).append(
                (*((wall_s,) if jt.running else ()), jt.gpu_seconds, jt.gpu_memory_bytes,
                 *(energy.get(comp, 0.0) for comp in COMPONENTS), *merge_params, job_id))
            slot_j = 0.0
            for comp in COMPONENTS:
                e = energy.get(comp, 0.0)
                if e:
                    bucket_rows.append((job_id, bucket, comp, e))
                    slot_j += e
            if slot_j:
                slot_rows.append((job_id, bucket, slot_start, slot_j))
        for (running, merge_sql), params in updates.items():  # one statement per shape
            life_sql = "last_seen=?, state='running', ended_at=NULL," if running else ""
            c.executemany(
                f"""UPDATE jobs SET {life_sql}
                       gpu_seconds=gpu_seconds+?, peak_gpu_memory_bytes=max(peak_gpu_memory_bytes, ?),
                       {_ENERGY_SET_SQL}{"" if merge_sql == "sources" else f", sources={merge_sql}"}
                   WHERE id=?""",
                params,
            )
        if bucket_rows:
            c.executemany(
                """INSERT INTO job_buckets VALUES (?, ?, ?, ?)
                   ON CONFLICT(job_id, bucket_start, component)
                   DO UPDATE SET energy_j = energy_j + excluded.energy_j""",
                bucket_rows,
            )
        if slot_rows:  # every job's energy of this tick against the tick's slot, in one statement
            c.executemany(
                """INSERT INTO job_slots VALUES (?, ?, ?, ?)
                   ON CONFLICT(job_id, bucket_start, slot_start)
                   DO UPDATE SET energy_j = energy_j + excluded.energy_j""",
                slot_rows,
            )
        c.executemany(
            """INSERT INTO device_buckets VALUES (?, ?, ?, ?, ?)
               ON CONFLICT(kind, device, bucket_start)
               DO UPDATE SET energy_j = energy_j + excluded.energy_j, source = excluded.source""",
            [(kind, device, bucket, e, source) for kind, device, e, source in device_j],
        )
        c.executemany(
            """INSERT INTO unattributed_buckets VALUES (?, ?, ?)
               ON CONFLICT(component, bucket_start)
               DO UPDATE SET energy_j = energy_j + excluded.energy_j""",
            [(comp, bucket, e) for comp, e in unattributed_j.items() if e],
        )
        if intensity is not None:  # the first value booked for a slot stays until settlement revises it
            c.execute(
                "INSERT OR IGNORE INTO bucket_intensity VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (bucket, slot_start, slot_end, intensity.g_per_kwh, intensity.status, intensity.provider,
                 intensity.zone, intensity.basis),
            )
        for job_id, ended_at in ended:
            c.execute("UPDATE jobs SET state='finished', ended_at=? WHERE id=? AND state='running'", (ended_at, job_id))
        # Each job's occupancy of this tick, added to its cumulative rows (issue 16), in one statement.
        occupancy_rows = [(jt.identity.job_id, item, seconds) for jt in jobs
                          for item, seconds in jt.occupancy_s.items() if seconds]
        if occupancy_rows:
            c.executemany(
                """INSERT INTO job_occupancy VALUES (?, ?, ?)
                   ON CONFLICT(job_id, item) DO UPDATE SET quantity_s = quantity_s + excluded.quantity_s""",
                occupancy_rows,
            )

    def job_occupancy(self, job_ids: list[str]) -> dict[str, dict[str, float]]:
        """job_id -> item -> item-seconds stored (jobs without rows are left out)."""
        out: dict[str, dict[str, float]] = {}
        for i in range(0, len(job_ids), 500):
            chunk = job_ids[i : i + 500]
            for r in self.conn.execute(
                    f"SELECT job_id, item, quantity_s FROM job_occupancy WHERE job_id IN ({','.join('?' * len(chunk))})",
                    chunk):
                out.setdefault(r[0], {})[r[1]] = float(r[2])
        return out

    def finish_jobs(self, ended: Iterable[tuple[str, float]]) -> None:
        with self.conn:
            for job_id, ended_at in ended:
                self.conn.execute("UPDATE jobs SET state='finished', ended_at=? WHERE id=? AND state='running'", (ended_at, job_id))
                self._known.pop(job_id, None)

    def store_points(self, points: Iterable[Any], fetched_at: float) -> None:
        """Keep a provider's series (IntensityPoint values). An actual value is never
        replaced by a forecast for the same interval."""
        with self.conn:
            self.conn.executemany(
                """INSERT INTO intensity_points VALUES (?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(provider, zone, start) DO UPDATE SET
                       end = excluded.end, g_per_kwh = excluded.g_per_kwh, kind = excluded.kind,
                       fetched_at = excluded.fetched_at
                   WHERE NOT (intensity_points.kind = 'actual' AND excluded.kind = 'forecast')""",
                [(p.provider, p.zone, int(p.start.timestamp()), int(p.end.timestamp()), p.g_per_kwh, p.kind, fetched_at)
                 for p in points],
            )

    def load_points(self, provider: str, zone: str, since: float) -> list[tuple[int, int, float, str]]:
        return [tuple(r) for r in self.conn.execute(
            "SELECT start, end, g_per_kwh, kind FROM intensity_points WHERE provider=? AND zone=? AND end > ? ORDER BY start",
            (provider, zone, since))]

    def bucket_job_energy(self, bucket_starts: list[int]) -> list[dict[str, Any]]:
        """Per job and bucket of the given buckets: job_id, label, user, uid,
        bucket_start, energy_j, gj (grams before PUE: Σ slot energy x slot intensity),
        g_per_kwh (the energy-weighted mean intensity; None when no slot has one) and
        status (``final`` when every slot with energy has a final value): what
        settlement rewrites downstream."""
        out: list[dict[str, Any]] = []
        for i in range(0, len(bucket_starts), 500):
            chunk = bucket_starts[i : i + 500]
            for r in self.conn.execute(
                f"""SELECT s.job_id, j.label, j.user, j.uid, s.bucket_start, SUM(s.energy_j) AS energy_j,
                           SUM(s.energy_j * COALESCE(i.g_per_kwh, 0)) / {PER_KWH_SQL} AS gj,
                           SUM(CASE WHEN i.g_per_kwh IS NULL THEN 0 ELSE s.energy_j END) AS known_j,
                           MIN(CASE WHEN i.status = 'final' THEN 1 ELSE 0 END) AS final
                    FROM job_slots s JOIN jobs j ON j.id = s.job_id
                    LEFT JOIN bucket_intensity i ON i.bucket_start = s.bucket_start AND i.slot_start = s.slot_start
                    WHERE s.bucket_start IN ({",".join("?" * len(chunk))})
                    GROUP BY s.job_id, s.bucket_start""", chunk):
                out.append({
                    "job_id": r["job_id"], "label": r["label"], "user": r["user"], "uid": r["uid"],
                    "bucket_start": r["bucket_start"], "energy_j": r["energy_j"], "gj": r["gj"],
                    "g_per_kwh": r["gj"] * J_PER_KWH / r["known_j"] if r["known_j"] > 0 else None,
                    "status": "final" if r["final"] else "provisional",
                })
        return out

    def set_intensities(self, values: Sequence[tuple[int, int, Intensity]]) -> None:
        """Settlement: replace the value of slots (bucket_start, slot_start) already
        booked; their boundaries stay."""
        with self.conn:
            self.conn.executemany(
                """UPDATE bucket_intensity SET g_per_kwh=?, status=?, provider=?, zone=?, basis=?
                   WHERE bucket_start=? AND slot_start=?""",
                [(i.g_per_kwh, i.status, i.provider, i.zone, i.basis, b, s) for b, s, i in values],
            )

    def bucket_intensities(self, statuses: tuple[str, ...] = ("provisional",)) -> list[sqlite3.Row]:
        """The ``bucket_intensity`` rows (one per slot of a bucket) of these statuses."""
        return self.conn.execute(
            f"""SELECT * FROM bucket_intensity WHERE status IN ({','.join('?' * len(statuses))})
                ORDER BY bucket_start, slot_start""",
            statuses).fetchall()

    def slot_intensities(self, bucket_start: int) -> dict[int, Intensity]:
        """slot_start -> the value booked for that slot of the bucket (with its bounds)."""
        return {r["slot_start"]: Intensity(r["g_per_kwh"], r["status"], r["provider"], r["zone"], r["basis"],
                                           r["slot_start"], r["slot_end"])
                for r in self.conn.execute("SELECT * FROM bucket_intensity WHERE bucket_start=?", (bucket_start,))}

    def job_slot_energy_j(self, job_id: str, bucket_start: int) -> dict[int, float]:
        """slot_start -> J of the job in that slot of the bucket (all components)."""
        return {r[0]: float(r[1]) for r in self.conn.execute(
            "SELECT slot_start, energy_j FROM job_slots WHERE job_id=? AND bucket_start=?", (job_id, bucket_start))}

    def provisional_buckets(self) -> list[int]:
        return [r[0] for r in self.conn.execute(
            "SELECT DISTINCT bucket_start FROM bucket_intensity WHERE status='provisional' ORDER BY bucket_start")]

    def job_co2e_g(self, job_ids: list[str], pue: float) -> dict[str, float]:
        """CO2e of each job from its buckets and their intensity (grams)."""
        return {r["job_id"]: r["gj"] * pue for r in co2e_rows(self.conn, job_ids).values()}

    def prune(self, before_wall_s: float) -> dict[str, int]:
        """Retention: delete what ended before ``before_wall_s``, in one transaction.

        The cut is the bucket boundary at or before ``before_wall_s``: buckets that
        start before it (so end at or before it) go from every bucket table alike, so
        ``attributed + unattributed = device`` still holds for what is left; grid
        points that ended by the cut go; finished jobs that ended before the cut go
        (all their buckets are before it). A job that is kept (running, or ended
        after the cut) keeps its totals: its energy is in its jobs row, and the CO2e
        of its deleted buckets is added to ``pruned_co2e_g`` first. Returns the rows
        deleted per table."""
        cut = self.bucket_of(before_wall_s)
        deleted: dict[str, int] = {}
        c = self.conn
        self._known.clear()  # jobs rows go: the next tick writes every job's identity again
        with c:
            c.execute(
                f"""UPDATE jobs SET pruned_co2e_g = pruned_co2e_g + COALESCE((
                       SELECT SUM(s.energy_j * COALESCE(i.g_per_kwh, 0)) / {PER_KWH_SQL}
                       FROM job_slots s LEFT JOIN bucket_intensity i
                            ON i.bucket_start = s.bucket_start AND i.slot_start = s.slot_start
                       WHERE s.job_id = jobs.id AND s.bucket_start < ?), 0)
                   WHERE NOT (state = 'finished' AND COALESCE(ended_at, last_seen) < ?)
                     AND id IN (SELECT job_id FROM job_slots WHERE bucket_start < ?)""",
                (cut, cut, cut))
            deleted["jobs"] = c.execute(
                "DELETE FROM jobs WHERE state = 'finished' AND COALESCE(ended_at, last_seen) < ?", (cut,)).rowcount
            c.execute("DELETE FROM slurm_jobs WHERE job_id NOT IN (SELECT id FROM jobs)")
            c.execute("DELETE FROM slurm_steps WHERE job_id NOT IN (SELECT id FROM jobs)")
            deleted["job_occupancy"] = c.execute(
                "DELETE FROM job_occupancy WHERE job_id NOT IN (SELECT id FROM jobs)").rowcount
            for table in PRUNE_TABLES:
                deleted[table] = c.execute(f"DELETE FROM {table} WHERE bucket_start < ?", (cut,)).rowcount
            deleted["intensity_points"] = c.execute(
                "DELETE FROM intensity_points WHERE end <= ?", (cut,)).rowcount
        return deleted

    def close(self) -> None:
        self._close_all()
