"""The store's read side for the HTTP API and the CLI: ``StoreReader`` answers with
typed records (``JobRecord``, ``SeriesBucket``, ``HostRows``, ``IntensityRow``); the
JSON objects the API serves are built from them in daemon/api_views.py.

Readers open their own read-only connection; WAL lets them read while the writer
writes. Queries that must agree with each other (a job's energy and its CO2e; device,
attributed and unattributed totals) run in one read transaction. A store of an older
schema (1, 2 or 3, before a daemon of this version migrated it) is read as it is
(a schema-3 job has no ``other_j``: its ``other`` reads 0; a store before schema 5 has
no ``job_occupancy``: its jobs' occupancy reads empty, so their embodied carbon is 0).

All query values are bound parameters; nothing from users is ever formatted into SQL.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from ..model import COMPONENTS
from .co2e_sql import SLOT_VALUES, SLOTS, co2e_rows
from .schema import LedgerError, connect, has_column


@dataclass(frozen=True, slots=True)
class JobCarbon:
    """A job's carbon sums from its slots: ``gj`` grams before PUE (retention's pruned
    grams included), energy that had no intensity, how many slots are provisional and
    the zones used (comma-joined, None when none)."""

    gj: float
    no_intensity_j: float
    provisional: int
    zones: str | None


@dataclass(frozen=True, slots=True)
class SlurmRecord:
    """What Slurm said about a job, and its steps (batch, extern, interactive first,
    then by number)."""

    job_id: str
    name: str
    array_job_id: str
    array_task_id: str
    partition: str
    user: str
    steps: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One job as stored: its jobs row (energy per component, sources decoded), its
    carbon sums (None when the store has no CO2e row for it) and its Slurm record."""

    id: str
    host: str
    label: str
    label_raw: str
    label_source: str
    user: str
    uid: int
    command: str
    root_pid: int
    state: str
    started_at: float
    ended_at: float | None
    last_seen: float
    gpu_seconds: float
    peak_gpu_memory_bytes: int
    energy_j: Mapping[str, float]  # component -> J, in COMPONENTS order
    sources: Mapping[str, Any]  # component -> counter | power | estimate
    carbon: JobCarbon | None
    slurm: SlurmRecord | None
    # item -> item-seconds the job occupied (schema 5, issue 16); empty when none is stored
    occupancy_s: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_row(cls, r: sqlite3.Row, carbon: JobCarbon | None, slurm: SlurmRecord | None,
                 occupancy_s: Mapping[str, float] | None = None) -> JobRecord:
        return cls(
            id=r["id"], host=r["host"], label=r["label"], label_raw=r["label_raw"], label_source=r["label_source"],
            user=r["user"], uid=r["uid"], command=r["command"], root_pid=r["root_pid"], state=r["state"],
            started_at=r["started_at"], ended_at=r["ended_at"], last_seen=r["last_seen"],
            gpu_seconds=r["gpu_seconds"], peak_gpu_memory_bytes=r["peak_gpu_memory_bytes"],
            # a store of schema 3 or older (not yet migrated by a daemon) has no other_j: 0
            energy_j={c: (r[f"{c}_j"] if f"{c}_j" in r.keys() else 0.0) for c in COMPONENTS},
            sources=json.loads(r["sources"] or "{}"),
            carbon=carbon, slurm=slurm, occupancy_s=dict(occupancy_s or {}),
        )


@dataclass(frozen=True, slots=True)
class SlotValue:
    """A job's energy in one slot of a bucket and the value booked for the slot (all
    None but the energy when the slot has no value)."""

    energy_j: float
    g_per_kwh: float | None
    status: str | None
    provider: str | None
    zone: str | None
    basis: str | None


@dataclass(frozen=True, slots=True)
class SeriesBucket:
    """A job's energy per component in one bucket, and its slots in that bucket."""

    start: int
    energy_j: dict[str, float]  # component -> J (every component, 0.0 when none)
    slots: tuple[SlotValue, ...]


@dataclass(frozen=True, slots=True)
class DeviceTotal:
    kind: str
    device: str
    energy_j: float
    source: str


@dataclass(frozen=True, slots=True)
class HostRows:
    """Store-wide sums, read in one transaction: per device, and per component the
    attributed (jobs) and unattributed energy (only components that have rows)."""

    devices: tuple[DeviceTotal, ...]
    attributed_j: Mapping[str, float]
    unattributed_j: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class IntensityRow:
    start: int
    end: int
    g_per_kwh: float
    kind: str
    fetched_at: float


class StoreReader:
    """Read side of the store. Thread-safe via a lock."""

    def __init__(self, path: str):
        if not os.path.exists(path):
            raise LedgerError(f"{path}: no store here (has the daemon run with this state_dir?)")
        self.conn = connect(path, readonly=True)
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
            self._slot_tables = has_column(self.conn, "bucket_intensity", "slot_start")
        return self._slot_tables

    def _co2e(self, job_ids: list[str]) -> dict[str, JobCarbon]:
        if self._pruned_column is None or not self._pruned_column:
            self._pruned_column = has_column(self.conn, "jobs", "pruned_co2e_g")
        rows = co2e_rows(self.conn, job_ids, pruned=self._pruned_column, slots=self._slots())
        return {job_id: JobCarbon(r["gj"], r["no_intensity_j"], r["provisional"], r["zones"])
                for job_id, r in rows.items()}

    def _slurm(self, job_ids: list[str]) -> dict[str, SlurmRecord]:
        """job id -> the job's Slurm record (for Slurm jobs only)."""
        if not job_ids:
            return {}
        marks = ",".join("?" * len(job_ids))
        try:
            rows = self.conn.execute(f"SELECT * FROM slurm_jobs WHERE job_id IN ({marks})", job_ids).fetchall()
        except sqlite3.OperationalError:  # a store no daemon of this version has opened yet
            return {}
        steps: dict[str, list[str]] = {r["job_id"]: [] for r in rows}
        for r in self.conn.execute(f"SELECT job_id, step FROM slurm_steps WHERE job_id IN ({marks})", job_ids):
            if r["job_id"] in steps:
                steps[r["job_id"]].append(r["step"])
        return {
            r["job_id"]: SlurmRecord(
                r["slurm_job_id"], r["name"], r["array_job_id"], r["array_task_id"], r["partition"], r["user"],
                # batch, extern, interactive first, then steps by number
                tuple(sorted(steps[r["job_id"]], key=lambda s: (s.isdigit(), int(s) if s.isdigit() else 0, s))))
            for r in rows
        }

    def _occupancy(self, job_ids: list[str]) -> dict[str, dict[str, float]]:
        """job id -> item -> item-seconds (jobs with no rows left out; {} before schema 5)."""
        out: dict[str, dict[str, float]] = {}
        for i in range(0, len(job_ids), 500):
            chunk = job_ids[i : i + 500]
            try:
                rows = self.conn.execute(
                    f"SELECT job_id, item, quantity_s FROM job_occupancy WHERE job_id IN ({','.join('?' * len(chunk))})",
                    chunk).fetchall()
            except sqlite3.OperationalError:  # a store no daemon of schema 5 has opened yet
                return {}
            for r in rows:
                out.setdefault(r["job_id"], {})[r["item"]] = float(r["quantity_s"])
        return out

    def job_records(self, *, state: str | None = None, since: float | None = None, until: float | None = None,
                    label: str | None = None, user: str | None = None, limit: int = 100,
                    uid: int | None = None) -> list[JobRecord]:
        """Jobs newest first (by start), filtered: ``since`` keeps jobs active at or
        after it, ``until`` jobs started before it; ``label`` matches the exported
        label or the label as set."""
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
            occupied = self._occupancy([r["id"] for r in rows])
        return [JobRecord.from_row(r, co2.get(r["id"]), slurm.get(r["id"]), occupied.get(r["id"])) for r in rows]

    def job_record(self, job_id: str) -> JobRecord | None:
        with self._read():
            r = self.conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if r is None:
                return None
            co2 = self._co2e([job_id])
            slurm = self._slurm([job_id])
            occupied = self._occupancy([job_id])
        return JobRecord.from_row(r, co2.get(job_id), slurm.get(job_id), occupied.get(job_id))

    def series_buckets(self, job_id: str) -> list[SeriesBucket]:
        """Per bucket of the job (in time order): energy per component and the job's
        slots in it with their values, from one read transaction."""
        with self._read():
            rows = self.conn.execute(
                """SELECT bucket_start, component, energy_j FROM job_buckets
                   WHERE job_id = ? ORDER BY bucket_start, component""",
                (job_id,),
            ).fetchall()
            slots = self._slots()
            slot_rows = self.conn.execute(
                f"""SELECT s.bucket_start, s.energy_j, i.g_per_kwh, i.status, i.provider, i.zone, i.basis
                    FROM {SLOTS[slots]} s LEFT JOIN {SLOT_VALUES[slots]} i
                         ON i.bucket_start = s.bucket_start AND i.slot_start = s.slot_start
                    WHERE s.job_id = ? ORDER BY s.bucket_start, s.slot_start""",
                (job_id,),
            ).fetchall()
        by_bucket: dict[int, list[SlotValue]] = {}
        for r in slot_rows:
            by_bucket.setdefault(r["bucket_start"], []).append(
                SlotValue(r["energy_j"], r["g_per_kwh"], r["status"], r["provider"], r["zone"], r["basis"]))
        energy: dict[int, dict[str, float]] = {}
        for r in rows:
            e = energy.setdefault(r["bucket_start"], {c: 0.0 for c in COMPONENTS})
            e[r["component"]] = e.get(r["component"], 0.0) + r["energy_j"]
        return [SeriesBucket(start, e, tuple(by_bucket.get(start, ()))) for start, e in energy.items()]

    def intensity_rows(self, provider: str, zone: str, since: float, until: float) -> list[IntensityRow]:
        with self._lock:
            rows = self.conn.execute(
                """SELECT start, end, g_per_kwh, kind, fetched_at FROM intensity_points
                   WHERE provider=? AND zone=? AND end > ? AND start < ? ORDER BY start""",
                (provider, zone, since, until)).fetchall()
        return [IntensityRow(r["start"], r["end"], r["g_per_kwh"], r["kind"], r["fetched_at"]) for r in rows]

    def host_rows(self) -> HostRows:
        # One read transaction: a tick committed between the three queries would make
        # device != attributed + unattributed in the answer (tests/test_invariants.py).
        with self._read():
            devices = self.conn.execute(
                "SELECT kind, device, SUM(energy_j) AS e, MAX(source) AS source FROM device_buckets "
                "GROUP BY kind, device ORDER BY kind, device"
            ).fetchall()
            attributed = self.conn.execute(
                "SELECT component, SUM(energy_j) AS e FROM job_buckets GROUP BY component").fetchall()
            unattributed = self.conn.execute(
                "SELECT component, SUM(energy_j) AS e FROM unattributed_buckets GROUP BY component").fetchall()
        return HostRows(
            devices=tuple(DeviceTotal(d["kind"], d["device"], d["e"], d["source"]) for d in devices),
            attributed_j={r["component"]: r["e"] for r in attributed},
            unattributed_j={r["component"]: r["e"] for r in unattributed},
        )
