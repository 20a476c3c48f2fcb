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
writer writes. CO2e is never stored as a number that could go stale: it is computed
from bucket energy x the bucket's intensity x PUE, so settling an intensity value
(provisional -> final) revises every affected job at once.

All query values are bound parameters; nothing from users is ever formatted into SQL.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from .model import COMPONENTS
from .procs import JobIdentity

SCHEMA_VERSION = 2  # 2: jobs.pruned_co2e_g (retention)
J_PER_KWH = 3.6e6

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
    bucket_start INTEGER PRIMARY KEY,
    g_per_kwh REAL NOT NULL,
    status TEXT NOT NULL,          -- provisional | final
    provider TEXT NOT NULL,
    zone TEXT NOT NULL,
    basis TEXT NOT NULL            -- actual | forecast | latest | static
);
"""


class LedgerError(Exception):
    """The store cannot be opened or used; the message says which file and why."""


OPEN_BUSY_TIMEOUT_S = 5.0  # at start: wait this long for another writer's lock
TICK_BUSY_TIMEOUT_MS = 200  # per tick: a locked store fails the write, not the tick
PRUNE_TABLES = ("job_buckets", "device_buckets", "unattributed_buckets", "bucket_intensity")


def _is_locked(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return True
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _has_column(conn: sqlite3.Connection, table: str, column: str) -> bool:
    return any(r[1] == column for r in conn.execute(f"PRAGMA table_info({table})"))


@dataclass(frozen=True, slots=True)
class Intensity:
    g_per_kwh: float
    status: str  # provisional | final
    provider: str
    zone: str
    basis: str  # actual | forecast | latest | static


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
            c.execute(
                """UPDATE jobs SET last_seen=?, state='running', ended_at=NULL,
                       gpu_seconds=gpu_seconds+?, peak_gpu_memory_bytes=max(peak_gpu_memory_bytes, ?),
                       gpu_j=gpu_j+?, cpu_j=cpu_j+?, dram_j=dram_j+?,
                       sources=json_patch(sources, ?)
                   WHERE id=?""",
                (wall_s, jt.gpu_seconds, jt.gpu_memory_bytes,
                 jt.energy_j.get("gpu", 0.0), jt.energy_j.get("cpu", 0.0), jt.energy_j.get("dram", 0.0),
                 json.dumps(dict(jt.sources)), ident.job_id),
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
        if intensity is not None:
            c.execute(
                "INSERT OR IGNORE INTO bucket_intensity VALUES (?, ?, ?, ?, ?, ?)",
                (bucket, intensity.g_per_kwh, intensity.status, intensity.provider, intensity.zone, intensity.basis),
            )
        for job_id, ended_at in ended:
            c.execute("UPDATE jobs SET state='finished', ended_at=? WHERE id=? AND state='running'", (ended_at, job_id))

    def finish_jobs(self, ended: Iterable[tuple[str, float]]) -> None:
        with self.conn:
            for job_id, ended_at in ended:
                self.conn.execute("UPDATE jobs SET state='finished', ended_at=? WHERE id=? AND state='running'", (ended_at, job_id))

    def set_intensity(self, bucket_start: int, intensity: Intensity) -> None:
        """Replace a bucket's intensity (settlement: provisional -> final)."""
        with self.conn:
            self.conn.execute(
                "INSERT OR REPLACE INTO bucket_intensity VALUES (?, ?, ?, ?, ?, ?)",
                (bucket_start, intensity.g_per_kwh, intensity.status, intensity.provider, intensity.zone, intensity.basis),
            )

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

    def bucket_job_energy(self, bucket_starts: list[int]) -> list[sqlite3.Row]:
        """(job_id, label, user, uid, bucket_start, energy_j, g_per_kwh, status) for the
        given buckets: what settlement rewrites downstream."""
        out: list[sqlite3.Row] = []
        for i in range(0, len(bucket_starts), 500):
            chunk = bucket_starts[i : i + 500]
            out.extend(self.conn.execute(
                f"""SELECT b.job_id, j.label, j.user, j.uid, b.bucket_start, SUM(b.energy_j) AS energy_j,
                           i.g_per_kwh, i.status
                    FROM job_buckets b JOIN jobs j ON j.id = b.job_id
                    JOIN bucket_intensity i ON i.bucket_start = b.bucket_start
                    WHERE b.bucket_start IN ({",".join("?" * len(chunk))})
                    GROUP BY b.job_id, b.bucket_start""", chunk))
        return out

    def set_intensities(self, values: list[tuple[int, Intensity]]) -> None:
        with self.conn:
            self.conn.executemany(
                "INSERT OR REPLACE INTO bucket_intensity VALUES (?, ?, ?, ?, ?, ?)",
                [(b, i.g_per_kwh, i.status, i.provider, i.zone, i.basis) for b, i in values],
            )

    def bucket_intensities(self, statuses: tuple[str, ...] = ("provisional",)) -> list[sqlite3.Row]:
        return self.conn.execute(
            f"SELECT * FROM bucket_intensity WHERE status IN ({','.join('?' * len(statuses))}) ORDER BY bucket_start",
            statuses).fetchall()

    def bucket_intensity(self, bucket_start: int) -> Intensity | None:
        r = self.conn.execute("SELECT * FROM bucket_intensity WHERE bucket_start=?", (bucket_start,)).fetchone()
        if r is None:
            return None
        return Intensity(r["g_per_kwh"], r["status"], r["provider"], r["zone"], r["basis"])

    def job_bucket_energy_j(self, job_id: str, bucket_start: int) -> float:
        r = self.conn.execute("SELECT SUM(energy_j) FROM job_buckets WHERE job_id=? AND bucket_start=?",
                              (job_id, bucket_start)).fetchone()
        return float(r[0] or 0.0)

    def provisional_buckets(self) -> list[int]:
        return [r[0] for r in self.conn.execute(
            "SELECT bucket_start FROM bucket_intensity WHERE status='provisional' ORDER BY bucket_start")]

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
                       SELECT SUM(b.energy_j * COALESCE(i.g_per_kwh, 0)) / 3600000.0
                       FROM job_buckets b LEFT JOIN bucket_intensity i ON i.bucket_start = b.bucket_start
                       WHERE b.job_id = jobs.id AND b.bucket_start < ?), 0)
                   WHERE NOT (state = 'finished' AND COALESCE(ended_at, last_seen) < ?)
                     AND id IN (SELECT job_id FROM job_buckets WHERE bucket_start < ?)""",
                (cut, cut, cut))
            deleted["jobs"] = c.execute(
                "DELETE FROM jobs WHERE state = 'finished' AND COALESCE(ended_at, last_seen) < ?", (cut,)).rowcount
            for table in PRUNE_TABLES:
                deleted[table] = c.execute(f"DELETE FROM {table} WHERE bucket_start < ?", (cut,)).rowcount
            deleted["intensity_points"] = c.execute(
                "DELETE FROM intensity_points WHERE end <= ?", (cut,)).rowcount
        return deleted

    def close(self) -> None:
        self._close_all()


def _co2e_rows(conn: sqlite3.Connection, job_ids: list[str], pruned: bool = True) -> dict[str, sqlite3.Row]:
    """CO2e figures per job (``gj``: grams before PUE), one row for every known job."""
    out: dict[str, sqlite3.Row] = {}
    template = _JOB_CO2E_SQL.replace("{pruned}", "j.pruned_co2e_g" if pruned else "0.0")
    for i in range(0, len(job_ids), 500):
        chunk = job_ids[i : i + 500]
        sql = template.format(marks=",".join("?" * len(chunk)))
        for row in conn.execute(sql, chunk):
            out[row["job_id"]] = row
    return out


_JOB_CO2E_SQL = """
SELECT j.id AS job_id,
       {pruned} + COALESCE(SUM(b.energy_j * COALESCE(i.g_per_kwh, 0)), 0) / 3600000.0 AS gj,
       COALESCE(SUM(CASE WHEN i.g_per_kwh IS NULL THEN b.energy_j ELSE 0 END), 0) AS no_intensity_j,
       COALESCE(SUM(CASE WHEN i.status = 'provisional' THEN 1 ELSE 0 END), 0) AS provisional,
       GROUP_CONCAT(DISTINCT i.zone) AS zones
FROM jobs j
LEFT JOIN job_buckets b ON b.job_id = j.id
LEFT JOIN bucket_intensity i ON i.bucket_start = b.bucket_start
WHERE j.id IN ({marks})
GROUP BY j.id
"""


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

    def close(self) -> None:
        self.conn.close()

    def _co2e(self, job_ids: list[str]) -> dict[str, sqlite3.Row]:
        if self._pruned_column is None or not self._pruned_column:
            self._pruned_column = _has_column(self.conn, "jobs", "pruned_co2e_g")
        return _co2e_rows(self.conn, job_ids, pruned=self._pruned_column)

    def _job_obj(self, r: sqlite3.Row, co2: sqlite3.Row | None, now: float) -> dict[str, Any]:
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
            where.append("label = ?")
            params.append(label)
        if user is not None:
            where.append("user = ?")
            params.append(user)
        sql = "SELECT * FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY started_at DESC, id LIMIT ?"
        params.append(limit)
        with self._lock:
            rows = self.conn.execute(sql, params).fetchall()
            co2 = self._co2e([r["id"] for r in rows])
        return [self._job_obj(r, co2.get(r["id"]), now) for r in rows]

    def job(self, job_id: str, now: float) -> dict[str, Any] | None:
        with self._lock:
            r = self.conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if r is None:
                return None
            co2 = self._co2e([job_id])
        return self._job_obj(r, co2.get(job_id), now)

    def job_series(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.conn.execute(
                """SELECT b.bucket_start, b.component, b.energy_j, i.g_per_kwh, i.status, i.provider, i.zone, i.basis
                   FROM job_buckets b LEFT JOIN bucket_intensity i ON i.bucket_start = b.bucket_start
                   WHERE b.job_id = ? ORDER BY b.bucket_start, b.component""",
                (job_id,),
            ).fetchall()
        buckets: dict[int, dict[str, Any]] = {}
        for r in rows:
            b = buckets.setdefault(r["bucket_start"], {
                "start": r["bucket_start"], "energy_j": {c: 0.0 for c in COMPONENTS},
                "g_per_kwh": r["g_per_kwh"], "intensity_status": r["status"] or "missing",
                "intensity_provider": r["provider"], "intensity_zone": r["zone"], "intensity_basis": r["basis"],
            })
            b["energy_j"][r["component"]] += r["energy_j"]
        out = []
        for b in buckets.values():
            total = sum(b["energy_j"].values())
            b["energy_j"]["total"] = total
            b["co2e_g"] = total / J_PER_KWH * (b["g_per_kwh"] or 0.0) * self.pue
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
        with self._lock:
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
