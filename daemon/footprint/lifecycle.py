"""A job's lifecycle figures beside its location-based CO2e (issue 16): embodied
carbon from the device-time it occupied, market-based CO2e and water. Pure
functions, no I/O; the factors come from a ``Footprint`` (factors.py). docs/carbon.md
("Lifecycle") states the method; in short:

- E = a job's energy, all components (gpu + cpu + dram + other), IT energy; kWh = E /
  ``J_PER_KWH``.
- Market-based CO2e: ``PUE x kWh x share x contract + (1 - share) x (PUE x kWh x
  residual`` when a residual mix is configured, else the location-based CO2e of that
  part of the energy, ``(1 - share) x co2e_g``). ``share`` = ``[market]
  contract_share`` (0: market == location unless a residual mix is set).
- Water: ``kWh x (WUE + PUE x EWIF)`` litres.
- Embodied: ``Σ over items factor_kg x 1000 x item_seconds / life_s``, items and
  their occupancy (``occupancy``) below. ``sci_g`` = co2e_g + embodied_co2e_g.

Occupancy per tick, in "item-seconds" (``occupancy``), shares exactly as energy is
attributed (daemon/attribution.py):

- ``gpu:<board model name>`` board-seconds: per GPU reading, the job's share of that
  reading's GPU energy from attribution's per-process split
  (``attribution.gpu_process_energy_j``, the same idle floor; memory or equal weights
  when the reading's energy is 0) x ``reading.board_share`` x ``reading.interval_s``.
  A partition (MIG GPU instance) uses its parent board's model name (the board's own
  reading in the same tick). What belongs to no job (no process, a process of no job,
  a process not visible here, a reading that is not attributable) is unattributed.
- ``cpu`` socket-seconds: job cpu_j / device cpu_j of the tick (0 when the device
  figure is 0) x cpu_sockets x the tick's interval.
- ``dram`` GB-seconds: job RSS / used memory (attribution's DRAM share, also without a
  DRAM reading) x dram_gb x the tick's interval.
- ``platform`` server-seconds (chassis, motherboard, PSU, storage): job measured (gpu +
  cpu + dram) J / all measured J of the tick (0 when none) x the tick's interval.

The devices' own occupancy (``total``) is the whole device-time: every GPU reading's
``board_share x interval_s``, and cpu_sockets, dram_gb and one server x the tick's
interval, so jobs + unattributed == total for every item (conservation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

from ..attribution import Attribution, gpu_process_energy_j
from ..carbon import J_PER_KWH
from ..model import MEASURED_COMPONENTS, DeviceReading, GpuProcessUse

if TYPE_CHECKING:
    from ..procs import ProcessView
    from .factors import Footprint

GPU_ITEM_PREFIX = "gpu:"
ITEMS_FIXED = ("cpu", "dram", "platform")


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """One job's (or one bucket's, one tick's) lifecycle figures."""

    embodied_co2e_g: float
    co2e_market_g: float
    water_l: float
    sci_g: float  # location-based co2e_g + embodied_co2e_g


def energy_total_j(energy_j: float | Mapping[str, float]) -> float:
    """All components' energy; a mapping's ``total`` key (the API's) is not counted twice."""
    if isinstance(energy_j, Mapping):
        return float(sum(v for k, v in energy_j.items() if k != "total"))
    return float(energy_j)


def embodied_co2e_g(occupancy_s: Mapping[str, float], fp: Footprint) -> float:
    """Σ over items factor_kg x 1000 x item-seconds / life_s (grams)."""
    if fp.life_s <= 0:
        return 0.0
    return sum(fp.item(item).value * 1000.0 * seconds / fp.life_s
               for item, seconds in occupancy_s.items() if seconds)


def market_co2e_g(energy_j: float, co2e_g: float, fp: Footprint, pue: float) -> float:
    """Market-based CO2e of ``energy_j`` whose location-based CO2e is ``co2e_g``."""
    market = fp.market
    kwh = energy_j / J_PER_KWH
    share = min(max(float(market.share), 0.0), 1.0)
    contract_g = pue * kwh * share * market.contract.value if (market.contract is not None and share > 0) else 0.0
    if market.residual is not None:
        rest_g = (1.0 - share) * pue * kwh * market.residual.value
    else:
        rest_g = (1.0 - share) * co2e_g
    return contract_g + rest_g


def water_l(energy_j: float, fp: Footprint, pue: float) -> float:
    """kWh x (WUE + PUE x EWIF) litres."""
    return energy_j / J_PER_KWH * (fp.wue.value + pue * fp.ewif.value)


def job_lifecycle(energy_j: float | Mapping[str, float], co2e_g: float, occupancy_s: Mapping[str, float],
                  fp: Footprint, pue: float) -> Lifecycle:
    """A job's lifecycle figures from its energy (J, all components; or a component ->
    J mapping), its location-based CO2e and its occupancy (item -> item-seconds), with
    the footprint's current factors (so stored figures are restated when factors change)."""
    e = energy_total_j(energy_j)
    embodied = embodied_co2e_g(occupancy_s, fp)
    return Lifecycle(
        embodied_co2e_g=embodied,
        co2e_market_g=market_co2e_g(e, co2e_g, fp, pue),
        water_l=water_l(e, fp, pue),
        sci_g=co2e_g + embodied,
    )


def _gpu_weights(reading: DeviceReading, idle_floor_w: float) -> list[float]:
    """Per process of ``reading`` its share (0..1) of the reading, as attribution
    splits its energy; memory (else equal) weights when the energy is 0; [] when
    nothing on it is attributable."""
    procs = reading.processes
    if not procs or not reading.attributable:
        return []
    energy = reading.energy_j
    if energy > 0:
        return [j / energy for j in gpu_process_energy_j(reading, idle_floor_w)]
    mem = [p.used_memory_bytes for p in procs]
    if all(m is not None and m >= 0 for m in mem) and sum(mem) > 0:  # type: ignore[arg-type]
        total = float(sum(mem))  # type: ignore[arg-type]
        return [float(m) / total for m in mem]  # type: ignore[arg-type]
    return [1.0 / len(procs)] * len(procs)


def gpu_item(reading: DeviceReading, board_names: Mapping[str, str]) -> str:
    """``gpu:<model>``: the board's name; a partition's is its parent board's (from
    the board's own reading in the same tick; its own name when that is missing)."""
    name = board_names.get(reading.parent, reading.name) if reading.parent else reading.name
    return GPU_ITEM_PREFIX + name


def _job_of(proc: GpuProcessUse, view: ProcessView) -> str | None:
    return view.pid_to_job.get(proc.pid) if proc.visible else None


def occupancy(att: Attribution, readings: Sequence[DeviceReading], view: ProcessView, fp: Footprint,
              interval_s: float, gpu_idle_floor_w: Mapping[str, float] | None = None,
              ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """One tick's occupancy (module docstring): per job item -> item-seconds, and the
    devices' whole occupancy of the tick (item -> item-seconds). ``interval_s``: the
    tick's interval (CPU, DRAM, platform); GPUs use each reading's own interval.
    ``gpu_idle_floor_w``: the idle floors attribution used (per GPU device)."""
    floors = gpu_idle_floor_w or {}
    known = {j.identity.job_id for j in view.jobs}
    per_job: dict[str, dict[str, float]] = {}
    total: dict[str, float] = {}

    def add(job_id: str, item: str, seconds: float) -> None:
        if seconds > 0.0:
            d = per_job.setdefault(job_id, {})
            d[item] = d.get(item, 0.0) + seconds

    board_names = {r.device: r.name for r in readings if r.kind == "gpu" and not r.parent}
    for r in readings:
        if r.kind != "gpu":
            continue
        item = gpu_item(r, board_names)
        board_s = max(r.board_share, 0.0) * max(r.interval_s, 0.0)
        total[item] = total.get(item, 0.0) + board_s
        for proc, weight in zip(r.processes, _gpu_weights(r, floors.get(r.device, 0.0))):
            job = _job_of(proc, view)
            if job is not None and job in known:
                add(job, item, weight * board_s)

    tick_s = max(interval_s, 0.0)
    device_cpu_j = att.device_j.get("cpu", 0.0)
    mem_total = max(view.mem_used_bytes, sum(j.rss_bytes for j in view.jobs))
    measured_j = sum(att.device_j.get(c, 0.0) for c in MEASURED_COMPONENTS)
    for j in view.jobs:
        job_id = j.identity.job_id
        energy = att.job_energy_j.get(job_id, {})
        if device_cpu_j > 0:
            add(job_id, "cpu", energy.get("cpu", 0.0) / device_cpu_j * fp.cpu_sockets * tick_s)
        if mem_total > 0:
            add(job_id, "dram", j.rss_bytes / mem_total * fp.dram_gb * tick_s)
        if measured_j > 0:
            job_measured = sum(energy.get(c, 0.0) for c in MEASURED_COMPONENTS)
            add(job_id, "platform", job_measured / measured_j * tick_s)
    total["cpu"] = total.get("cpu", 0.0) + fp.cpu_sockets * tick_s
    total["dram"] = total.get("dram", 0.0) + fp.dram_gb * tick_s
    total["platform"] = total.get("platform", 0.0) + tick_s
    return per_job, total
