"""The JSON objects the HTTP API (and the CLI, which prints the same objects) serves
from the store: a job, a job's series, the host totals and the intensity series.

``JobViews`` is the store's reader (``ledger.StoreReader``, typed records) plus the
accounting settings the objects are computed with (PUE, price per kWh, currency); the
functions here turn records into the API's objects, field for field as
daemon/openapi.py documents them:

- CO2e = grams before PUE (Σ slot energy x slot intensity, from the store) x PUE;
  ``co2e_status`` is ``final`` only when no slot is provisional and all energy had an
  intensity; the mean intensity is energy-weighted; cost = kWh x PUE x price.
- A bucket's carbon figures come from the job's slots in it (``bucket_values``).
- Lifecycle (issue 16): ``embodied_co2e_g``, ``co2e_market_g``, ``water_l`` and
  ``sci_g`` are computed when read (``footprint.lifecycle.job_lifecycle``) from the
  stored energy, CO2e and occupancy with the footprint's current factors, so they are
  restated when factors change; the single-job view adds ``occupancy_s`` and the
  ``factors`` used. A job stored before schema 5 has no occupancy: embodied 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from .carbon import BASIS_RANK, J_PER_KWH, co2e_g
from .footprint.lifecycle import job_lifecycle
from .ledger.reader import (
    HostRows,
    IntensityRow,
    JobRecord,
    SeriesBucket,
    SlotValue,
    StoreReader,
)
from .model import COMPONENTS

if TYPE_CHECKING:
    from .footprint.factors import Footprint


def job_json(rec: JobRecord, now: float, pue: float, price_per_kwh: float, currency: str,
             footprint: Footprint | None = None, detail: bool = False) -> dict[str, Any]:
    """A job object (``Job`` in the OpenAPI document); ``now`` ends a running job's
    duration. With a ``footprint``, its lifecycle figures; ``detail`` (the single-job
    view) adds its occupancy and the factors used."""
    energy = dict(rec.energy_j)
    total_j = sum(energy.values())
    kwh = total_j / J_PER_KWH
    carbon = rec.carbon
    gj = carbon.gj if carbon is not None else 0.0  # grams before PUE
    no_int = carbon.no_intensity_j if carbon is not None else 0.0
    provisional = bool(carbon.provisional) if carbon is not None else False
    end = rec.ended_at if rec.ended_at is not None else (rec.last_seen if rec.state == "finished" else now)
    out = {
        "id": rec.id,
        "label": rec.label,
        "label_raw": rec.label_raw,
        "label_sanitised": rec.label != rec.label_raw,
        "label_source": rec.label_source,
        "host": rec.host,
        "user": rec.user,
        "uid": rec.uid,
        "command": rec.command,
        "root_pid": rec.root_pid,
        "state": rec.state,
        "started_at": rec.started_at,
        "ended_at": rec.ended_at,
        "last_seen": rec.last_seen,
        "duration_s": max(0.0, end - rec.started_at),
        "energy_j": {**energy, "total": total_j},
        "energy_kwh": kwh,
        # node: the BMC method that gave the job a share of the node remainder; none without
        "energy_sources": {**dict(rec.sources), "node": str(rec.sources.get("node") or "none")},
        "co2e_g": gj * pue,
        "co2e_status": "provisional" if (provisional or no_int > 0) else "final",
        "intensity_g_per_kwh_avg": (gj / (total_j / J_PER_KWH)) if total_j > 0 else None,
        "zone": (carbon.zones or "") if carbon is not None else "",
        "pue": pue,
        "gpu_seconds": rec.gpu_seconds,
        "peak_gpu_memory_bytes": rec.peak_gpu_memory_bytes,
        "cost": {"amount": kwh * pue * price_per_kwh, "currency": currency, "price_per_kwh": price_per_kwh},
        "slurm": None if rec.slurm is None else {
            "job_id": rec.slurm.job_id, "name": rec.slurm.name, "array_job_id": rec.slurm.array_job_id,
            "array_task_id": rec.slurm.array_task_id, "partition": rec.slurm.partition, "user": rec.slurm.user,
            "steps": list(rec.slurm.steps)},
    }
    if footprint is not None:
        life = job_lifecycle(total_j, gj * pue, rec.occupancy_s, footprint, pue)
        out.update({"embodied_co2e_g": life.embodied_co2e_g, "co2e_market_g": life.co2e_market_g,
                    "water_l": life.water_l, "sci_g": life.sci_g})
        if detail:
            items = sorted(rec.occupancy_s)
            out["occupancy_s"] = {item: rec.occupancy_s[item] for item in items}
            out["factors"] = [f.as_dict() for f in footprint.factors_for(items)]
    return out


def bucket_values(slots: Sequence[SlotValue], pue: float) -> dict[str, Any]:
    """One bucket's carbon figures for the job series, from the job's slots in it: the
    CO2e is Σ energy x value (x PUE); the intensity shown is the energy-weighted mean;
    the status is ``final`` only when every slot has a final value (``missing`` when
    none has a value); provider and zone as used (comma-joined if several); the basis
    is the least sure of the slots' (fallback < latest < forecast < actual, static)."""
    energy_x_g = known_j = 0.0  # Σ energy_j x g_per_kwh, Σ energy_j, over slots with a value
    statuses: set[str] = set()
    providers: set[str] = set()
    zones: set[str] = set()
    bases: set[str] = set()
    missing = False
    for s in slots:
        if s.g_per_kwh is None:
            missing = True
            continue
        energy_x_g += s.energy_j * s.g_per_kwh
        known_j += s.energy_j
        statuses.add(str(s.status))
        providers.add(str(s.provider))
        zones.add(str(s.zone))
        bases.add(str(s.basis))
    if not statuses:
        return {"g_per_kwh": None, "intensity_status": "missing", "intensity_provider": None,
                "intensity_zone": None, "intensity_basis": None, "co2e_g": 0.0}
    return {
        "g_per_kwh": energy_x_g / known_j if known_j > 0 else None,
        "intensity_status": "final" if statuses == {"final"} and not missing else "provisional",
        "intensity_provider": ",".join(sorted(providers)),
        "intensity_zone": ",".join(sorted(zones)),
        "intensity_basis": min(bases, key=lambda b: (BASIS_RANK.get(b, -1), b)),
        # Σ co2e_g(e, g, pue) over the slots, summed before the one division
        "co2e_g": co2e_g(energy_x_g, 1.0, pue),
    }


def series_json(buckets: Sequence[SeriesBucket], pue: float) -> list[dict[str, Any]]:
    """The job series: per bucket, energy per component with its total, and the
    bucket's carbon figures (``bucket_values``)."""
    out = []
    for b in buckets:
        energy = dict(b.energy_j)
        energy["total"] = sum(energy.values())
        out.append({"start": b.start, "energy_j": energy, **bucket_values(b.slots, pue)})
    return out


def host_json(rows: HostRows) -> dict[str, Any]:
    """Host totals: per device, and per component the device, attributed and
    unattributed energy (every component present, 0.0 when none). ``other`` has no
    device of its own: its device figure is the remainder booked (attributed +
    unattributed); the node's own energy (devices of kind ``node``) is
    ``node_energy_j``."""
    dev_by_kind = {c: 0.0 for c in COMPONENTS}
    node_j = 0.0
    for d in rows.devices:
        if d.kind == "node":
            node_j += d.energy_j
        else:
            dev_by_kind[d.kind] = dev_by_kind.get(d.kind, 0.0) + d.energy_j
    attributed = {c: 0.0 for c in COMPONENTS} | dict(rows.attributed_j)
    unattributed = {c: 0.0 for c in COMPONENTS} | dict(rows.unattributed_j)
    dev_by_kind["other"] = attributed["other"] + unattributed["other"]
    return {
        "devices": [{"kind": d.kind, "device": d.device, "energy_j": d.energy_j, "source": d.source}
                    for d in rows.devices],
        "device_energy_j": dev_by_kind,
        "attributed_energy_j": attributed,
        "unattributed_energy_j": unattributed,
        "node_energy_j": node_j,
    }


def intensity_json(rows: Sequence[IntensityRow]) -> list[dict[str, Any]]:
    return [{"start": r.start, "end": r.end, "g_per_kwh": r.g_per_kwh, "kind": r.kind, "fetched_at": r.fetched_at}
            for r in rows]


class JobViews(StoreReader):
    """The store as the API's JSON objects, with the accounting settings they are
    computed with. Thread-safe (the reader's lock)."""

    def __init__(self, path: str, pue: float = 1.0, price_per_kwh: float = 0.0, currency: str = "EUR",
                 footprint: Footprint | None = None):
        super().__init__(path)
        self.pue = pue
        self.price_per_kwh = price_per_kwh
        self.currency = currency
        if footprint is None:  # the shipped factors, no config
            from .footprint.factors import default_footprint

            footprint = default_footprint()
        self.footprint = footprint

    def _job_json(self, rec: JobRecord, now: float, detail: bool = False) -> dict[str, Any]:
        return job_json(rec, now, self.pue, self.price_per_kwh, self.currency, self.footprint, detail)

    def jobs(self, *, state: str | None = None, since: float | None = None, until: float | None = None,
             label: str | None = None, user: str | None = None, limit: int = 100, now: float,
             uid: int | None = None) -> list[dict[str, Any]]:
        records = self.job_records(state=state, since=since, until=until, label=label, user=user, limit=limit,
                                   uid=uid)
        return [self._job_json(r, now) for r in records]

    def job(self, job_id: str, now: float) -> dict[str, Any] | None:
        rec = self.job_record(job_id)
        return None if rec is None else self._job_json(rec, now, detail=True)

    def job_series(self, job_id: str) -> list[dict[str, Any]]:
        return series_json(self.series_buckets(job_id), self.pue)

    def intensity(self, provider: str, zone: str, since: float, until: float) -> list[dict[str, Any]]:
        return intensity_json(self.intensity_rows(provider, zone, since, until))

    def host_totals(self) -> dict[str, Any]:
        return host_json(self.host_rows())
