"""Turn what a tick measured (and CO2e / grid figures) into the contract's InfluxDB lines.

Measurements (a public contract, documented in docs/influxdb.md):
- ``device_power``  tags host, kind, device;           fields watts, joules, source
                    (kind ``node``: the node's input power from its BMC)
- ``job_energy``    tags host, job_id, label, user, kind; field joules
                    (kind ``other``: the job's share of the node remainder)
- ``job_co2e``      tags host, job_id, label, user;    fields grams, g_per_kwh, status,
                    market_grams (market-based CO2e of the bucket, issue 16)
- ``job_footprint`` tags host, job_id, label, user;    fields embodied_grams, water_litres
                    (this tick's amounts; a job with both 0 this tick has no point)
- ``grid_intensity`` tags zone, provider, kind (actual|forecast); field g_per_kwh
- ``unattributed_energy`` tags host, kind; field joules   (extension of the contract)

Every point is stamped with the time it describes (the tick's ``sampled_at``, or the
bucket / interval start the caller passes), never with the time it is written, and
every series has a fixed tag set. Writing the same point again (spool replay after an
outage or a crash, or a settled CO2e figure replacing a provisional one) therefore
overwrites it in InfluxDB instead of adding a second point. ``joules`` is always the
energy of that one interval, so a sum over time gives the total; so are
``embodied_grams`` and ``water_litres`` of ``job_footprint``.
"""

from __future__ import annotations

import math
from typing import Literal

from wattprint.daemon.model import COMPONENTS, TickRecord

from .lineprotocol import counters, encode_point, ns_from_s

DEVICE_POWER = "device_power"
JOB_ENERGY = "job_energy"
JOB_CO2E = "job_co2e"
GRID_INTENSITY = "grid_intensity"
UNATTRIBUTED_ENERGY = "unattributed_energy"
JOB_FOOTPRINT = "job_footprint"


def _component_order(components: object) -> list[str]:
    """Known components first in their usual order, then any others sorted."""
    keys = list(components)  # type: ignore[call-overload]
    known = [c for c in COMPONENTS if c in keys]
    return known + sorted(k for k in keys if k not in COMPONENTS)


def tick_to_lines(record: TickRecord, host: str) -> list[str]:
    """``device_power``, ``job_energy``, ``unattributed_energy`` and ``job_footprint``
    lines for one tick, all stamped ``record.sampled_at``. Points with no finite field
    are left out."""
    ts_ns = ns_from_s(record.sampled_at)
    lines: list[str] = []
    # ``other`` (the node remainder) only on a tick with a node reading (or when not 0), so
    # that without a BMC the points are those of before.
    with_other = any(r.kind == "node" for r in record.readings)
    for reading in record.readings:
        line = encode_point(
            DEVICE_POWER,
            {"host": host, "kind": reading.kind, "device": reading.device},
            {"watts": float(reading.power_w), "joules": float(reading.energy_j), "source": reading.source},
            ts_ns,
        )
        if line is not None:
            lines.append(line)
    for job_id in sorted(record.job_energy_j):
        ref = record.jobs.get(job_id)
        label = ref.label if ref is not None else ""
        user = ref.user if ref is not None else ""
        by_component = record.job_energy_j[job_id]
        for kind in _component_order(by_component):
            if kind == "other" and not with_other and not by_component[kind]:
                continue
            line = encode_point(
                JOB_ENERGY,
                {"host": host, "job_id": job_id, "label": label, "user": user, "kind": kind},
                {"joules": float(by_component[kind])},
                ts_ns,
            )
            if line is not None:
                lines.append(line)
    for kind in _component_order(record.unattributed_j):
        if kind == "other" and not with_other and not record.unattributed_j[kind]:
            continue
        line = encode_point(
            UNATTRIBUTED_ENERGY,
            {"host": host, "kind": kind},
            {"joules": float(record.unattributed_j[kind])},
            ts_ns,
        )
        if line is not None:
            lines.append(line)
    lines += footprint_lines(record, host, ts_ns)
    return lines


def footprint_lines(record: TickRecord, host: str, ts_ns: int) -> list[str]:
    """``job_footprint`` points: per job, this tick's embodied CO2e (grams) and water
    (litres), so ``SUM`` over time gives a job's totals. A job whose two figures are both
    0 this tick (or that has neither) gets no point: it adds nothing to a sum, and an idle
    fleet writes no extra points. A non-finite figure is left out of its point (counted)."""
    lines: list[str] = []
    embodied, water = record.job_embodied_co2e_g, record.job_water_l
    for job_id in sorted(set(embodied) | set(water)):
        grams = float(embodied.get(job_id, 0.0))
        litres = float(water.get(job_id, 0.0))
        if grams == 0.0 and litres == 0.0:
            continue
        ref = record.jobs.get(job_id)
        line = encode_point(
            JOB_FOOTPRINT,
            {"host": host, "job_id": job_id, "label": ref.label if ref is not None else "",
             "user": ref.user if ref is not None else ""},
            {"embodied_grams": grams, "water_litres": litres},
            ts_ns,
        )
        if line is not None:
            lines.append(line)
    return lines


def job_co2e_line(
    *,
    host: str,
    job_id: str,
    label: str,
    user: str,
    grams: float,
    g_per_kwh: float,
    status: Literal["provisional", "final"],
    at_s: float,
    market_grams: float | None = None,
) -> str | None:
    """One ``job_co2e`` point for a job's bucket starting at ``at_s`` (wall-clock s).

    Settlement writes the same (host, job_id, label, user, at_s) again with the final
    figures and ``status="final"``; InfluxDB keeps the last write. None (counted as a
    point without fields) when ``grams`` is not finite; a non-finite ``g_per_kwh`` or
    ``market_grams`` is left out of the point. ``market_grams`` (the bucket's
    market-based CO2e) is left out when None (a point without it leaves an earlier
    value of that field in place: InfluxDB merges the fields of one series and time).
    """
    if not math.isfinite(grams):
        counters.add("points_skipped_no_fields")
        return None
    fields: dict[str, float | str] = {"grams": float(grams), "g_per_kwh": float(g_per_kwh), "status": status}
    if market_grams is not None:
        fields["market_grams"] = float(market_grams)
    return encode_point(
        JOB_CO2E,
        {"host": host, "job_id": job_id, "label": label, "user": user},
        fields,
        ns_from_s(at_s),
    )


def grid_intensity_line(
    *,
    zone: str,
    provider: str,
    kind: Literal["actual", "forecast"],
    g_per_kwh: float,
    at_s: float,
    host: str = "",
) -> str | None:
    """One ``grid_intensity`` point for the interval starting at ``at_s`` (wall-clock s).
    ``host`` (the daemon that fetched it; extension) is a tag when given, so a dashboard
    can show the intensity its selected hosts used. None when ``g_per_kwh`` is not finite."""
    tags = {"zone": zone, "provider": provider, "kind": kind}
    if host:
        tags["host"] = host
    return encode_point(
        GRID_INTENSITY,
        tags,
        {"g_per_kwh": float(g_per_kwh)},
        ns_from_s(at_s),
    )
