"""The store's SQLite schema, how a connection is opened, and how an older store is
checked and migrated in place when the writer opens it.

Schema versions: 1 (first release); 2 adds ``jobs.pruned_co2e_g`` (retention); 3 adds
``job_slots`` and one ``bucket_intensity`` row per slot of a bucket; 4 adds
``jobs.other_j`` (the node remainder, component ``other``; the bucket tables hold
components as rows, so ``other`` needs no new column there, and the node's own
energy is a ``device_buckets`` row of kind ``node``); 5 adds ``job_occupancy`` (per job
and item, the device-time it occupied, cumulative: embodied carbon, issue 16). Stores
of schema 4 gain the empty table (their jobs have no occupancy: embodied 0). Stores of schema 2 are migrated
in place: each old bucket becomes one slot spanning the bucket, so their CO2e is
unchanged; stores of schema 3 gain ``jobs.other_j`` = 0 (nothing was booked to it). A store that is not a SQLite database, fails SQLite's
``quick_check``, or is newer than this wattprint is refused with a ``LedgerError``
naming the file; it is never overwritten or replaced.
"""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 5  # 2: jobs.pruned_co2e_g (retention); 3: job_slots, bucket_intensity per slot; 4: jobs.other_j;
# 5: job_occupancy

SCHEMA = """
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
    pruned_co2e_g REAL NOT NULL DEFAULT 0,  -- CO2e (before PUE) of buckets deleted by retention
    other_j REAL NOT NULL DEFAULT 0  -- the node remainder (schema 4; last, as ALTER TABLE adds it)
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
-- Schema 5 (issue 16): the device-time a job occupied, per item ("gpu:<model>" board-seconds,
-- "cpu" socket-, "dram" GB-, "platform" server-seconds), cumulative over its life: its
-- embodied carbon is computed from it with the current factors when read.
CREATE TABLE IF NOT EXISTS job_occupancy (
    job_id TEXT NOT NULL,
    item TEXT NOT NULL,
    quantity_s REAL NOT NULL,
    PRIMARY KEY (job_id, item)
) WITHOUT ROWID;
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
BUCKET_INTENSITY_V3 = SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS bucket_intensity"):
                             SCHEMA.index("CREATE TABLE IF NOT EXISTS job_slots")]

OPEN_BUSY_TIMEOUT_S = 5.0  # at start: wait this long for another writer's lock
TICK_BUSY_TIMEOUT_MS = 200  # per tick: a locked store fails the write, not the tick
# SQLite's page cache of the daemon's own connections (the tick's writer, the API's
# reader), in KiB: SQLite's default is 2,000 KiB per connection, which fills as the
# store grows and was the daemon's slow RSS growth (issue 18). benchmarks/sqlite_cache.py
# (a half-day store of 32 jobs, 6.1 MiB): 512 KiB each is 3.2 MiB less RSS with both
# caches warm, the tick's write and the API's reads within noise of the default (256
# KiB made the tick's write 9 % dearer). The CLI's readers keep SQLite's default.
DAEMON_CACHE_KIB = 512


def bound_page_cache(conn: sqlite3.Connection, kib: int = DAEMON_CACHE_KIB) -> None:
    """Limit ``conn``'s page cache to ``kib`` KiB (``PRAGMA cache_size=-kib``)."""
    conn.execute(f"PRAGMA cache_size=-{int(kib)}")


class LedgerError(Exception):
    """The store cannot be opened or used; the message says which file and why."""


def is_locked(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return True
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def has_column(conn: sqlite3.Connection, table: str, column: str) -> bool:
    return any(r[1] == column for r in conn.execute(f"PRAGMA table_info({table})"))


def locked_error(path: str, exc: sqlite3.Error) -> LedgerError:
    return LedgerError(f"{path}: the store is locked by another process ({exc}): is another wattprint "
                       "daemon or a sqlite3 shell using it?")


def connect(path: str, readonly: bool) -> sqlite3.Connection:
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
        if is_locked(exc):
            raise locked_error(path, exc) from None
        raise LedgerError(f"{path}: cannot open the store: {exc}; the file is left as it is "
                          "(move it away to start with an empty store)") from None


def prepare(conn: sqlite3.Connection, path: str, bucket_s: int) -> None:
    """Check the writer's freshly opened store, create the schema or migrate it, all
    before the first tick; raises LedgerError (sqlite3 errors are the caller's to map)."""
    # Someone else writing (a sqlite3 shell, a backup): wait up to
    # OPEN_BUSY_TIMEOUT_S, then refuse to start rather than stall every tick.
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("ROLLBACK")
    # Fail at start, not on some later tick, when the file is damaged; and
    # check before writing anything (schema, migration) into it.
    problems = [str(r[0]) for r in conn.execute("PRAGMA quick_check(3)")]
    if problems != ["ok"]:
        found = " ".join("; ".join(problems).split())[:300]  # one line for the log
        raise LedgerError(f"{path}: the store is damaged (SQLite quick_check: {found}); "
                          "the file is left as it is (move it away to start with an empty store)")
    conn.executescript(SCHEMA)
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    if row is None:
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    elif int(row["value"]) > SCHEMA_VERSION:
        raise LedgerError(f"{path}: store schema {row['value']} is newer than this wattprint ({SCHEMA_VERSION})")
    if not has_column(conn, "jobs", "pruned_co2e_g"):  # schema 1 -> 2
        conn.execute("ALTER TABLE jobs ADD COLUMN pruned_co2e_g REAL NOT NULL DEFAULT 0")
    if not has_column(conn, "bucket_intensity", "slot_start"):  # schema 2 -> 3
        migrate_to_slots(conn, bucket_s)
    if not has_column(conn, "jobs", "other_j"):  # schema 3 -> 4
        conn.execute("ALTER TABLE jobs ADD COLUMN other_j REAL NOT NULL DEFAULT 0")
    conn.execute("UPDATE meta SET value=? WHERE key='schema_version' AND CAST(value AS INTEGER) < ?",
                 (str(SCHEMA_VERSION), SCHEMA_VERSION))
    conn.commit()


def migrate_to_slots(conn: sqlite3.Connection, bucket_s: int) -> None:
    """Schema 2 -> 3, inside the opening transaction (all or nothing): each old
    bucket's one intensity becomes one slot spanning the bucket, and each job's
    bucket energy its one slot row, so the CO2e of old buckets stays as it was."""
    c = conn
    if not c.in_transaction:
        c.execute("BEGIN")
    c.execute("ALTER TABLE bucket_intensity RENAME TO bucket_intensity_v2")
    c.execute(BUCKET_INTENSITY_V3)
    c.execute("""INSERT INTO bucket_intensity
                 SELECT bucket_start, bucket_start, bucket_start + ?, g_per_kwh, status, provider, zone, basis
                 FROM bucket_intensity_v2""", (bucket_s,))
    c.execute("DROP TABLE bucket_intensity_v2")
    c.execute("""INSERT OR IGNORE INTO job_slots
                 SELECT job_id, bucket_start, bucket_start, SUM(energy_j) FROM job_buckets
                 GROUP BY job_id, bucket_start""")
