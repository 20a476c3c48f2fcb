"""The ledger: per-job energy by component in time buckets, job metadata, device and
unattributed totals, and the grid intensity used for each bucket, in SQLite.

One writer (the tick thread) commits once per tick, so a crash loses at most the last
tick. One daemon per store: the writer holds an exclusive ``flock`` on
``<store>.lock`` while it is open, and a store that is locked by someone else, is
not a SQLite database or fails SQLite's ``quick_check`` at start is refused with a
``LedgerError`` naming the file; it is never overwritten or replaced.

Retention: ``Ledger.prune(before)`` deletes the buckets (job, device, unattributed,
intensity) that end at or before the bucket boundary at ``before``, the grid series
that ended by then, and the finished jobs that ended before that boundary. A job
that outlives the cut keeps its totals: the CO2e of its deleted buckets is folded
into ``jobs.pruned_co2e_g`` first, and its energy totals live in the jobs row. Readers (HTTP API, CLI) open their own connections; WAL lets them read while the
writer writes.

CO2e is never stored as a number that could go stale: it is computed as
Σ energy x intensity x PUE over the provider intervals ("slots") each bucket's energy
fell in. Each tick's energy is booked twice in the same transaction: per component
in ``job_buckets`` and, all components together, per slot in ``job_slots``; the
intensity used for a slot of a bucket is one ``bucket_intensity`` row (a slot is the
provider's interval cut to the bucket, so a bucket holds at most
bucket_s / resolution of them, and exactly one when the provider's resolution is at
least the bucket). Settling a slot's value (provisional -> final) revises every
affected job at once, with the same arithmetic as at write time. Stores of schema 2
(one intensity per bucket) are migrated in place: each old bucket becomes one slot
spanning the bucket, so their CO2e is unchanged.

All query values are bound parameters; nothing from users is ever formatted into SQL.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .carbon import J_PER_KWH
from .model import COMPONENTS, Intensity, JobIdentity

SCHEMA_VERSION = 3  # 2: jobs.pruned_co2e_g (retention); 3: job_slots, bucket_intensity per slot

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    label TEXT NOT NULL,
    label_raw TEXT NOT NULL DEFAULT '',
    label_source TEXT NOT NULL,
    uid INTEGER NOT NULL,
    user TEXT NOT NULL,
    command TEXT NOT NULL,
    root_pid INTEGER NOT NULL,
    state TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL,
    last_seen REAL NOT NULL,
    gpu_seconds REAL NOT NULL DEFAULT 0,
    peak_gpu_memory_bytes INTEGER NOT NULL DEFAULT 0,
    gpu_j REAL NOT NULL DEFAULT 0,
    cpu_j REAL NOT NULL DEFAULT 0,
    dram_j REAL NOT NULL DEFAULT 0,
    sources TEXT NOT NULL DEFAULT '{}',
    pruned_co2e_g REAL NOT NULL DEFAULT 0  -- CO2e (before PUE) of buckets deleted by retention
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, started_at);
CREATE TABLE IF NOT EXISTS job_buckets (
    job_id TEXT NOT NULL,
    bucket_start INTEGER NOT NULL,
    component TEXT NOT NULL,
    energy_j REAL NOT NULL,
    PRIMARY KEY (job_id, bucket_start, component)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS device_buckets (
    kind TEXT NOT NULL,
    device TEXT NOT NULL,
    bucket_start INTEGER NOT NULL,
    energy_j REAL NOT NULL,
    source TEXT NOT NULL,
    PRIMARY KEY (kind, device, bucket_start)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS unattributed_buckets (
    component TEXT NOT NULL,
    bucket_start INTEGER NOT NULL,
    energy_j REAL NOT NULL,
    PRIMARY KEY (component, bucket_start)
) WITHOUT ROWID;
-- Retention (prune) and settlement select by time: keep that cheap on a big store.
CREATE INDEX IF NOT EXISTS job_buckets_start ON job_buckets (bucket_start);
CREATE INDEX IF NOT EXISTS device_buckets_start ON device_buckets (bucket_start);
CREATE INDEX IF NOT EXISTS unattributed_buckets_start ON unattributed_buckets (bucket_start);
CREATE INDEX IF NOT EXISTS jobs_ended ON jobs (state, ended_at);
CREATE TABLE IF NOT EXISTS intensity_points (
    provider TEXT NOT NULL,
    zone TEXT NOT NULL,
    start INTEGER NOT NULL,        -- seconds since epoch, at the provider's resolution
    end INTEGER NOT NULL,
    g_per_kwh REAL NOT NULL,
    kind TEXT NOT NULL,            -- actual | forecast
    fetched_at REAL NOT NULL,
    PRIMARY KEY (provider, zone, start)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bucket_intensity (
    bucket_start INTEGER NOT NULL,
    slot_start INTEGER NOT NULL,   -- the provider interval [slot_start, slot_end), cut to the bucket
    slot_end INTEGER NOT NULL,
    g_per_kwh REAL NOT NULL,
    status TEXT NOT NULL,          -- provisional | final
    provider TEXT NOT NULL,
    zone TEXT NOT NULL,
    basis TEXT NOT NULL,           -- actual | forecast | latest | fallback | static
    PRIMARY KEY (bucket_start, slot_start)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS job_slots (
    job_id TEXT NOT NULL,
    bucket_start INTEGER NOT NULL,
    slot_start INTEGER NOT NULL,   -- a bucket_intensity slot of this bucket
    energy_j REAL NOT NULL,        -- all components
    PRIMARY KEY (job_id, bucket_start, slot_start)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS job_slots_start ON job_slots (bucket_start);
-- Slurm jobs (daemon/slurm.py): what Slurm says about the job, and the steps seen.
CREATE TABLE IF NOT EXISTS slurm_jobs (
    job_id TEXT PRIMARY KEY,
    slurm_job_id TEXT NOT NULL,
    name TEXT NOT NULL,            -- <job id> or <array job id>_<task id>
    array_job_id TEXT NOT NULL,
    array_task_id TEXT NOT NULL,
    partition TEXT NOT NULL,
    user TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS slurm_steps (
    job_id TEXT NOT NULL,
    step TEXT NOT NULL,            -- batch | extern | interactive | <n>
    PRIMARY KEY (job_id, step)
) WITHOUT ROWID;
"""
_BUCKET_INTENSITY_V3 = _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS bucket_intensity"):
                               _SCHEMA.index("CREATE TABLE IF NOT EXISTS job_slots")]


class LedgerError(Exception):
    """The store cannot be opened or used; the message says which file and why."""


OPEN_BUSY_TIMEOUT_S = 5.0  # at start: wait this long for another writer's lock
TICK_BUSY_TIMEOUT_MS = 200  # per tick: a locked store fails the write, not the tick
PRUNE_TABLES = ("job_buckets", "job_slots", "device_buckets", "unattributed_buckets", "bucket_intensity")
BASIS_RANK = {"fallback": 0, "latest": 1, "forecast": 2, "actual": 3, "static": 3}  # how sure a value is


def _is_locked(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return True
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _has_column(conn: sqlite3.Connection, table: str, column: str) -> bool:
    return any(r[1] == column for r in conn.execute(f"PRAGMA table_info({table})"))


@dataclass(frozen=True, slots=True)
class TickRow:
    """Everything one tick books (``Ledger.record_ticks``)."""

    wall_s: float
    jobs: Sequence["JobTick"]
    device_j: Sequence[tuple[str, str, float, str]]  # kind, device, J, source
    unattributed_j: Mapping[str, float]
    intensity: "Intensity | None"
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


def _sources_merge(tick_sources: Mapping[str, str]) -> tuple[str, list[str]]:
    """SQL (and its parameters) for ``jobs.sources`` after a tick: per component in
    ``tick_sources``, the weaker of the stored source and the tick's (estimate < power
    < counter), so the column describes the job's whole life, across restarts too.
    Only component names from COMPONENTS are formatted into the SQL; values are bound."""
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
    if not parts:
        return "sources", []
    return f"json_set(sources, {', '.join(parts)})", params


def _connect(path: str, readonly: bool) -> sqlite3.Connection:
    conn: sqlite3.Connection | None = None
    try:
        if readonly:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0, check_same_thread=False)
        else:
            conn = sqlite3.connect(path, timeout=OPEN_BUSY_TIMEOUT_S, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.row_factory = sqlite3.Row
        return conn
    except sqlite3.Error as exc:
        if conn is not None:
            conn.close()
        if _is_locked(exc):
            raise LedgerError(f"{path}: the store is locked by another process ({exc}): is another wattprint "
                              "daemon or a sqlite3 shell using it?") from None
        raise LedgerError(f"{path}: cannot open the store: {exc}; the file is left as it is "
                          "(move it away to start with an empty store)") from None


class Ledger:
    """Writer side of the store. Not thread-safe: used from the tick thread only
    (``open``/``close`` too); readers use ``LedgerReader``."""

    def __init__(self, path: str, host: str, bucket_s: int):
        self.path = path
        self.host = host
        self.bucket_s = bucket_s
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._lock_fd = self._take_lock(path)
        try:
            self.conn = _connect(path, readonly=False)
        except LedgerError:
            self._release_lock()
            raise
        try:
            # Someone else writing (a sqlite3 shell, a backup): wait up to
            # OPEN_BUSY_TIMEOUT_S, then refuse to start rather than stall every tick.
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("ROLLBACK")
            # Fail at start, not on some later tick, when the file is damaged; and
            # check before writing anything (schema, migration) into it.
            problems = [str(r[0]) for r in self.conn.execute("PRAGMA quick_check(3)")]
            if problems != ["ok"]:
                found = " ".join("; ".join(problems).split())[:300]  # one line for the log
                raise LedgerError(f"{path}: the store is damaged (SQLite quick_check: {found}); "
                                  "the file is left as it is (move it away to start with an empty store)")
            self.conn.executescript(_SCHEMA)
            row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self.conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row["value"]) > SCHEMA_VERSION:
                raise LedgerError(f"{path}: store schema {row['value']} is newer than this wattprint ({SCHEMA_VERSION})")
            if not _has_column(self.conn, "jobs", "pruned_co2e_g"):  # schema 1 -> 2
                self.conn.execute("ALTER TABLE jobs ADD COLUMN pruned_co2e_g REAL NOT NULL DEFAULT 0")
            if not _has_column(self.conn, "bucket_intensity", "slot_start"):  # schema 2 -> 3
                self._migrate_to_slots()
            self.conn.execute("UPDATE meta SET value=? WHERE key='schema_version' AND CAST(value AS INTEGER) < ?",
                              (str(SCHEMA_VERSION), SCHEMA_VERSION))
            self.conn.commit()
        except LedgerError:
            self._close_all()
            raise
        except sqlite3.DatabaseError as exc:
            self._close_all()
            if _is_locked(exc):
                raise LedgerError(f"{path}: the store is locked by another process ({exc}): is another wattprint "
                                  "daemon or a sqlite3 shell using it?") from None
            raise LedgerError(f"{path}: not a usable wattprint store: {exc}; the file is left as it is "
                              "(move it away to start with an empty store)") from None
        # From now on a lock held by someone else fails one tick's write (the engine
        # keeps the tick and retries), instead of blocking the tick for seconds.
        self.conn.execute(f"PRAGMA busy_timeout={TICK_BUSY_TIMEOUT_MS}")

    def _migrate_to_slots(self) -> None:
        """Schema 2 -> 3, inside the opening transaction (all or nothing): each old
        bucket's one intensity becomes one slot spanning the bucket, and each job's
        bucket energy its one slot row, so the CO2e of old buckets stays as it was."""
        c = self.conn
        if not c.in_transaction:
            c.execute("BEGIN")
        c.execute("ALTER TABLE bucket_intensity RENAME TO bucket_intensity_v2")
        c.execute(_BUCKET_INTENSITY_V3)
        c.execute("""INSERT INTO bucket_intensity
                     SELECT bucket_start, bucket_start, bucket_start + ?, g_per_kwh, status, provider, zone, basis
                     FROM bucket_intensity_v2""", (self.bucket_s,))
        c.execute("DROP TABLE bucket_intensity_v2")
        c.execute("""INSERT OR IGNORE INTO job_slots
                     SELECT job_id, bucket_start, bucket_start, SUM(energy_j) FROM job_buckets
                     GROUP BY job_id, bucket_start""")

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

    def record_ticks(self, rows: Sequence["TickRow"]) -> None:
        """Book several ticks, in order, in one transaction (all or nothing): a tick
        that could not be stored is retried together with the next one."""
        with self.conn:
            for row in rows:
                self._book(row.wall_s, row.jobs, row.device_j, row.unattributed_j, row.intensity, row.ended)

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
        c = self.conn
        for jt in jobs:
            ident = jt.identity
            c.execute(
                """INSERT INTO jobs (id, host, label, label_raw, label_source, uid, user, command, root_pid,
                                     state, started_at, last_seen, sources)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?)
                   ON CONFLICT(id) DO NOTHING""",
                (ident.job_id, self.host, ident.label, ident.label_raw, ident.label_source, ident.uid, ident.user,
                 ident.command, ident.root_pid, ident.started_at, wall_s, json.dumps(dict(jt.sources))),
            )
            if ident.slurm is not None:
                sj = ident.slurm
                c.execute("INSERT INTO slurm_jobs VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(job_id) DO NOTHING",
                          (ident.job_id, sj.job_id, sj.name, sj.array_job_id, sj.array_task_id, sj.partition, sj.user))
                c.executemany("INSERT INTO slurm_steps VALUES (?, ?) ON CONFLICT DO NOTHING",
                              [(ident.job_id, step) for step in sorted(jt.steps)])
            merge_sql, merge_params = _sources_merge(jt.sources)
            c.execute(
                f"""UPDATE jobs SET last_seen=?, state='running', ended_at=NULL,
                       gpu_seconds=gpu_seconds+?, peak_gpu_memory_bytes=max(peak_gpu_memory_bytes, ?),
                       gpu_j=gpu_j+?, cpu_j=cpu_j+?, dram_j=dram_j+?,
                       sources={merge_sql}
                   WHERE id=?""",
                (wall_s, jt.gpu_seconds, jt.gpu_memory_bytes,
                 jt.energy_j.get("gpu", 0.0), jt.energy_j.get("cpu", 0.0), jt.energy_j.get("dram", 0.0),
                 *merge_params, ident.job_id),
            )
            for comp in COMPONENTS:
                e = jt.energy_j.get(comp, 0.0)
                if e:
                    c.execute(
                        """INSERT INTO job_buckets VALUES (?, ?, ?, ?)
                           ON CONFLICT(job_id, bucket_start, component)
                           DO UPDATE SET energy_j = energy_j + excluded.energy_j""",
                        (ident.job_id, bucket, comp, e),
                    )
            slot_j = sum(jt.energy_j.get(comp, 0.0) for comp in COMPONENTS)
            if slot_j:
                slot_rows.append((ident.job_id, bucket, slot_start, slot_j))
        if slot_rows:  # every job's energy of this tick against the tick's slot, in one statement
            c.executemany(
                """INSERT INTO job_slots VALUES (?, ?, ?, ?)
                   ON CONFLICT(job_id, bucket_start, slot_start)
                   DO UPDATE SET energy_j = energy_j + excluded.energy_j""",
                slot_rows,
            )
        for kind, device, e, source in device_j:
            c.execute(
                """INSERT INTO device_buckets VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT(kind, device, bucket_start)
                   DO UPDATE SET energy_j = energy_j + excluded.energy_j, source = excluded.source""",
                (kind, device, bucket, e, source),
            )
        for comp, e in unattributed_j.items():
            if not e:
                continue
            c.execute(
                """INSERT INTO unattributed_buckets VALUES (?, ?, ?)
                   ON CONFLICT(component, bucket_start)
                   DO UPDATE SET energy_j = energy_j + excluded.energy_j""",
                (comp, bucket, e),
            )
        if intensity is not None:  # the first value booked for a slot stays until settlement revises it
            c.execute(
                "INSERT OR IGNORE INTO bucket_intensity VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (bucket, slot_start, slot_end, intensity.g_per_kwh, intensity.status, intensity.provider,
                 intensity.zone, intensity.basis),
            )
        for job_id, ended_at in ended:
            c.execute("UPDATE jobs SET state='finished', ended_at=? WHERE id=? AND state='running'", (ended_at, job_id))

    def finish_jobs(self, ended: Iterable[tuple[str, float]]) -> None:
        with self.conn:
            for job_id, ended_at in ended:
                self.conn.execute("UPDATE jobs SET state='finished', ended_at=? WHERE id=? AND state='running'", (ended_at, job_id))

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
                           SUM(s.energy_j * COALESCE(i.g_per_kwh, 0)) / 3600000.0 AS gj,
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
        return {r["job_id"]: r["gj"] * pue for r in _co2e_rows(self.conn, job_ids).values()}

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
        with c:
            c.execute(
                """UPDATE jobs SET pruned_co2e_g = pruned_co2e_g + COALESCE((
                       SELECT SUM(s.energy_j * COALESCE(i.g_per_kwh, 0)) / 3600000.0
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
            for table in PRUNE_TABLES:
                deleted[table] = c.execute(f"DELETE FROM {table} WHERE bucket_start < ?", (cut,)).rowcount
            deleted["intensity_points"] = c.execute(
                "DELETE FROM intensity_points WHERE end <= ?", (cut,)).rowcount
        return deleted

    def close(self) -> None:
        self._close_all()


# Where a job's energy per slot and the slot values come from. A store of schema 2
# (read as it is, before a daemon migrated it) has one value per bucket: each bucket
# is then its own single slot, exactly how the migration turns it into schema 3.
_SLOTS = {True: "job_slots", False: "(SELECT job_id, bucket_start, bucket_start AS slot_start, "
                                    "SUM(energy_j) AS energy_j FROM job_buckets GROUP BY job_id, bucket_start)"}
_SLOT_VALUES = {True: "bucket_intensity", False: "(SELECT bucket_start, bucket_start AS slot_start, g_per_kwh, "
                                                 "status, provider, zone, basis FROM bucket_intensity)"}


def _co2e_rows(conn: sqlite3.Connection, job_ids: list[str], pruned: bool = True,
               slots: bool = True) -> dict[str, sqlite3.Row]:
    """CO2e figures per job (``gj``: grams before PUE), one row for every known job."""
    out: dict[str, sqlite3.Row] = {}
    template = (_JOB_CO2E_SQL.replace("{pruned}", "j.pruned_co2e_g" if pruned else "0.0")
                .replace("{slots}", _SLOTS[slots]).replace("{values}", _SLOT_VALUES[slots]))
    for i in range(0, len(job_ids), 500):
        chunk = job_ids[i : i + 500]
        sql = template.format(marks=",".join("?" * len(chunk)))
        for row in conn.execute(sql, chunk):
            out[row["job_id"]] = row
    return out


_JOB_CO2E_SQL = """
SELECT j.id AS job_id,
       {pruned} + COALESCE(SUM(s.energy_j * COALESCE(i.g_per_kwh, 0)), 0) / 3600000.0 AS gj,
       COALESCE(SUM(CASE WHEN i.g_per_kwh IS NULL THEN s.energy_j ELSE 0 END), 0) AS no_intensity_j,
       COALESCE(SUM(CASE WHEN i.status = 'provisional' THEN 1 ELSE 0 END), 0) AS provisional,
       GROUP_CONCAT(DISTINCT i.zone) AS zones
FROM jobs j
LEFT JOIN {slots} s ON s.job_id = j.id
LEFT JOIN {values} i ON i.bucket_start = s.bucket_start AND i.slot_start = s.slot_start
WHERE j.id IN ({marks})
GROUP BY j.id
"""


def _bucket_values(slots: Sequence[sqlite3.Row], pue: float) -> dict[str, Any]:
    """One bucket's carbon figures for the job series, from the job's slots in it
    (energy_j, g_per_kwh, status, provider, zone, basis of each): the CO2e is
    Σ energy x value (x PUE); the intensity shown is the energy-weighted mean; the
    status is ``final`` only when every slot has a final value (``missing`` when none
    has a value); provider and zone as used (comma-joined if several); the basis is
    the least sure of the slots' (fallback < latest < forecast < actual, static)."""
    gj = known_j = 0.0
    statuses: set[str] = set()
    providers: set[str] = set()
    zones: set[str] = set()
    bases: set[str] = set()
    missing = False
    for s in slots:
        if s["g_per_kwh"] is None:
            missing = True
            continue
        gj += s["energy_j"] * s["g_per_kwh"]
        known_j += s["energy_j"]
        statuses.add(s["status"])
        providers.add(s["provider"])
        zones.add(s["zone"])
        bases.add(s["basis"])
    if not statuses:
        return {"g_per_kwh": None, "intensity_status": "missing", "intensity_provider": None,
                "intensity_zone": None, "intensity_basis": None, "co2e_g": 0.0}
    return {
        "g_per_kwh": gj / known_j if known_j > 0 else None,
        "intensity_status": "final" if statuses == {"final"} and not missing else "provisional",
        "intensity_provider": ",".join(sorted(providers)),
        "intensity_zone": ",".join(sorted(zones)),
        "intensity_basis": min(bases, key=lambda b: (BASIS_RANK.get(b, -1), b)),
        "co2e_g": gj / J_PER_KWH * pue,
    }


class LedgerReader:
    """Read side of the store for the HTTP API and the CLI. Thread-safe via a lock."""

    def __init__(self, path: str, pue: float = 1.0, price_per_kwh: float = 0.0, currency: str = "EUR"):
        if not os.path.exists(path):
            raise LedgerError(f"{path}: no store here (has the daemon run with this state_dir?)")
        self.conn = _connect(path, readonly=True)
        self.pue = pue
        self.price_per_kwh = price_per_kwh
        self.currency = currency
        self._lock = threading.Lock()
        self._pruned_column: bool | None = None  # a schema-1 store has none
        self._slot_tables: bool | None = None  # a store before schema 3 has one intensity per bucket

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def _read(self) -> Iterator[None]:
        """Under the lock, in one read transaction: several queries see the same
        commit (a job's energy and its CO2e from the same ticks)."""
        with self._lock:
            self.conn.execute("BEGIN")
            try:
                yield
            finally:
                self.conn.rollback()

    def _slots(self) -> bool:
        if not self._slot_tables:  # until a daemon has migrated the store
            self._slot_tables = _has_column(self.conn, "bucket_intensity", "slot_start")
        return self._slot_tables

    def _co2e(self, job_ids: list[str]) -> dict[str, sqlite3.Row]:
        if self._pruned_column is None or not self._pruned_column:
            self._pruned_column = _has_column(self.conn, "jobs", "pruned_co2e_g")
        return _co2e_rows(self.conn, job_ids, pruned=self._pruned_column, slots=self._slots())

    def _slurm(self, job_ids: list[str]) -> dict[str, dict[str, Any]]:
        """job id -> the job's ``slurm`` object (for Slurm jobs only)."""
        out: dict[str, dict[str, Any]] = {}
        if not job_ids:
            return out
        marks = ",".join("?" * len(job_ids))
        try:
            rows = self.conn.execute(f"SELECT * FROM slurm_jobs WHERE job_id IN ({marks})", job_ids).fetchall()
        except sqlite3.OperationalError:  # a store no daemon of this version has opened yet
            return out
        for r in rows:
            out[r["job_id"]] = {"job_id": r["slurm_job_id"], "name": r["name"], "array_job_id": r["array_job_id"],
                                "array_task_id": r["array_task_id"], "partition": r["partition"], "user": r["user"],
                                "steps": []}
        for r in self.conn.execute(f"SELECT job_id, step FROM slurm_steps WHERE job_id IN ({marks})", job_ids):
            if r["job_id"] in out:
                out[r["job_id"]]["steps"].append(r["step"])
        for obj in out.values():  # batch, extern, interactive first, then steps by number
            obj["steps"].sort(key=lambda s: (s.isdigit(), int(s) if s.isdigit() else 0, s))
        return out

    def _job_obj(self, r: sqlite3.Row, co2: sqlite3.Row | None, now: float,
                 slurm: dict[str, Any] | None = None) -> dict[str, Any]:
        energy = {c: r[f"{c}_j"] for c in COMPONENTS}
        total_j = sum(energy.values())
        kwh = total_j / J_PER_KWH
        gj = co2["gj"] if co2 is not None else 0.0
        co2e_g = gj * self.pue
        no_int = co2["no_intensity_j"] if co2 is not None else 0.0
        provisional = bool(co2["provisional"]) if co2 is not None else False
        end = r["ended_at"] if r["ended_at"] is not None else (r["last_seen"] if r["state"] == "finished" else now)
        return {
            "id": r["id"],
            "label": r["label"],
            "label_raw": r["label_raw"],
            "label_sanitised": r["label"] != r["label_raw"],
            "label_source": r["label_source"],
            "host": r["host"],
            "user": r["user"],
            "uid": r["uid"],
            "command": r["command"],
            "root_pid": r["root_pid"],
            "state": r["state"],
            "started_at": r["started_at"],
            "ended_at": r["ended_at"],
            "last_seen": r["last_seen"],
            "duration_s": max(0.0, end - r["started_at"]),
            "energy_j": {**energy, "total": total_j},
            "energy_kwh": kwh,
            "energy_sources": json.loads(r["sources"] or "{}"),
            "co2e_g": co2e_g,
            "co2e_status": "provisional" if (provisional or no_int > 0) else "final",
            "intensity_g_per_kwh_avg": (gj / (total_j / J_PER_KWH)) if total_j > 0 else None,
            "zone": (co2["zones"] or "") if co2 is not None else "",
            "pue": self.pue,
            "gpu_seconds": r["gpu_seconds"],
            "peak_gpu_memory_bytes": r["peak_gpu_memory_bytes"],
            "cost": {"amount": kwh * self.pue * self.price_per_kwh, "currency": self.currency,
                     "price_per_kwh": self.price_per_kwh},
            "slurm": slurm,
        }

    def jobs(self, *, state: str | None = None, since: float | None = None, until: float | None = None,
             label: str | None = None, user: str | None = None, limit: int = 100, now: float,
             uid: int | None = None) -> list[dict[str, Any]]:
        where: list[str] = []
        params: list[Any] = []
        if uid is not None:
            where.append("uid = ?")
            params.append(uid)
        if state:
            where.append("state = ?")
            params.append(state)
        if since is not None:  # jobs active at or after `since`
            where.append("COALESCE(ended_at, last_seen) >= ?")
            params.append(since)
        if until is not None:
            where.append("started_at < ?")
            params.append(until)
        if label is not None:
            # the exported label, or the label as the user set it (a job filed under
            # "_overflow" by the label cap, or sanitised, is found by what was set)
            where.append("(label = ? OR label_raw = ?)")
            params.extend((label, label))
        if user is not None:
            where.append("user = ?")
            params.append(user)
        sql = "SELECT * FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY started_at DESC, id LIMIT ?"
        params.append(limit)
        with self._read():
            rows = self.conn.execute(sql, params).fetchall()
            co2 = self._co2e([r["id"] for r in rows])
            slurm = self._slurm([r["id"] for r in rows])
        return [self._job_obj(r, co2.get(r["id"]), now, slurm.get(r["id"])) for r in rows]

    def job(self, job_id: str, now: float) -> dict[str, Any] | None:
        with self._read():
            r = self.conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if r is None:
                return None
            co2 = self._co2e([job_id])
            slurm = self._slurm([job_id])
        return self._job_obj(r, co2.get(job_id), now, slurm.get(job_id))

    def job_series(self, job_id: str) -> list[dict[str, Any]]:
        """Per bucket: energy per component, and the carbon figures from the job's
        slots in it (``_bucket_values``: intensity = energy-weighted mean)."""
        with self._read():
            rows = self.conn.execute(
                """SELECT bucket_start, component, energy_j FROM job_buckets
                   WHERE job_id = ? ORDER BY bucket_start, component""",
                (job_id,),
            ).fetchall()
            slots = self._slots()
            slot_rows = self.conn.execute(
                f"""SELECT s.bucket_start, s.energy_j, i.g_per_kwh, i.status, i.provider, i.zone, i.basis
                    FROM {_SLOTS[slots]} s LEFT JOIN {_SLOT_VALUES[slots]} i
                         ON i.bucket_start = s.bucket_start AND i.slot_start = s.slot_start
                    WHERE s.job_id = ? ORDER BY s.bucket_start, s.slot_start""",
                (job_id,),
            ).fetchall()
        by_bucket: dict[int, list[sqlite3.Row]] = {}
        for r in slot_rows:
            by_bucket.setdefault(r["bucket_start"], []).append(r)
        buckets: dict[int, dict[str, Any]] = {}
        for r in rows:
            b = buckets.setdefault(r["bucket_start"], {"start": r["bucket_start"],
                                                       "energy_j": {c: 0.0 for c in COMPONENTS}})
            b["energy_j"][r["component"]] += r["energy_j"]
        out = []
        for b in buckets.values():
            b["energy_j"]["total"] = sum(b["energy_j"].values())
            b.update(_bucket_values(by_bucket.get(b["start"], []), self.pue))
            out.append(b)
        return out

    def intensity(self, provider: str, zone: str, since: float, until: float) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.conn.execute(
                """SELECT start, end, g_per_kwh, kind, fetched_at FROM intensity_points
                   WHERE provider=? AND zone=? AND end > ? AND start < ? ORDER BY start""",
                (provider, zone, since, until)).fetchall()
        return [dict(r) for r in rows]

    def host_totals(self) -> dict[str, Any]:
        # One read transaction: a tick committed between the three queries would make
        # device != attributed + unattributed in the answer (tests/test_invariants.py).
        with self._read():
            devices = self.conn.execute(
                "SELECT kind, device, SUM(energy_j) AS e, MAX(source) AS source FROM device_buckets GROUP BY kind, device ORDER BY kind, device"
            ).fetchall()
            attributed = self.conn.execute(
                "SELECT component, SUM(energy_j) AS e FROM job_buckets GROUP BY component").fetchall()
            unattributed = self.conn.execute(
                "SELECT component, SUM(energy_j) AS e FROM unattributed_buckets GROUP BY component").fetchall()
        dev_by_kind = {c: 0.0 for c in COMPONENTS}
        for d in devices:
            dev_by_kind[d["kind"]] = dev_by_kind.get(d["kind"], 0.0) + d["e"]
        att = {c: 0.0 for c in COMPONENTS} | {r["component"]: r["e"] for r in attributed}
        un = {c: 0.0 for c in COMPONENTS} | {r["component"]: r["e"] for r in unattributed}
        return {
            "devices": [{"kind": d["kind"], "device": d["device"], "energy_j": d["e"], "source": d["source"]} for d in devices],
            "device_energy_j": dev_by_kind,
            "attributed_energy_j": att,
            "unattributed_energy_j": un,
        }
