"""The logic of ``wattprint estimate`` (this module is `plan`, not `sources/estimate`, which is
the TDP x utilisation fallback power source): plan a run before starting it.

E = Σ Pᵢ · countᵢ · Uᵢ · T, where Pᵢ is a device's rated power (watts, from the shipped
table ``data/gpu_rated_power.json`` or given as a number), Uᵢ its expected utilisation
and T the run's length in hours; CO2e = E · PUE · intensity (g/kWh). ``energy_kwh`` is
the devices' energy; the PUE applies to the CO2e only, as in the ledger.

SPEC is ``MODEL_OR_WATTS[:COUNT[:UTILISATION]]``: ``V100:10:0.8`` is ten V100s at 80 %,
``200:2:0.6`` two 200 W devices at 60 %. COUNT defaults to 1 and UTILISATION to 1.0.

Lifecycle parts (``--embodied``, ``--water``; issue 16, docs/carbon.md "Lifecycle
footprint"), with the factors of a ``Footprint`` (daemon/footprint/factors.py):

- embodied = Σ countᵢ x Fᵢ x 1000 x T x 3600 / life_s grams, Fᵢ the GPU board's
  manufacturing footprint (kgCO2e, by model; a device given in watts takes the
  datacenter class default and says so) and life_s the service life in seconds. The
  boards are occupied for the whole run, whatever their utilisation. GPU boards only:
  a plan names no host, so its CPU, DRAM and platform are not counted.
- water = E x (WUE + PUE x EWIF) litres, E the devices' energy in kWh.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from .footprint.factors import Factor, Footprint

TABLE_FILE = "gpu_rated_power.json"
MAX_WATTS = 100_000.0  # one device; anything above is a typo
MAX_COUNT = 1_000_000
_VENDOR_WORDS = re.compile(r"\b(nvidia|tesla|geforce|quadro)\b")


@dataclass(frozen=True)
class RatedModel:
    model: str  # canonical name, e.g. "V100-SXM2"
    rated_w: float
    rating: str  # "TDP" or "TGP"
    source: str  # the datasheet it comes from


@dataclass(frozen=True)
class DeviceSpec:
    """One ``--device`` argument, resolved."""

    spec: str  # as written
    model: str | None  # canonical model name; None when given in watts
    rated_w: float
    count: int
    utilisation: float
    source: str  # where rated_w comes from ("given in watts" or a datasheet)

    @property
    def power_w(self) -> float:
        return self.rated_w * self.count * self.utilisation


@dataclass(frozen=True)
class EstimateResult:
    devices: tuple[DeviceSpec, ...]
    hours: float
    g_per_kwh: float | None
    pue: float
    intensity_source: str
    power_kw: float
    energy_kwh: float
    co2e_g: float | None


@dataclass(frozen=True)
class LifecycleEstimate:
    """The ``--embodied`` / ``--water`` parts of a plan; None for a part not asked for."""

    embodied_co2e_g: float | None
    water_l: float | None
    gpu_factors: tuple[Factor, ...]  # one per device spec, in order (embodied only)
    device_embodied_g: tuple[float, ...]  # each device spec's share of embodied_co2e_g
    factors: tuple[Factor, ...]  # every factor used (each once)
    devices: tuple[DeviceSpec, ...] = ()


def _normalise(name: str) -> str:
    n = _VENDOR_WORDS.sub(" ", name.lower())
    return re.sub(r"[\s\-_/]+", "", n)


@lru_cache(maxsize=1)
def load_models() -> dict[str, RatedModel]:
    """Normalised name or alias → RatedModel, from the shipped table."""
    text = resources.files("wattprint.daemon").joinpath("data", TABLE_FILE).read_text(encoding="utf-8")
    table = json.loads(text)
    sources = table["sources"]
    out: dict[str, RatedModel] = {}
    for m in table["models"]:
        model = RatedModel(model=m["model"], rated_w=float(m["rated_w"]), rating=m["rating"],
                           source=sources[m["source"]]["document"])
        for name in [m["model"], *m.get("aliases", [])]:
            key = _normalise(name)
            if key in out and out[key].model != model.model:
                raise ValueError(f"{TABLE_FILE}: {name!r} names both {out[key].model} and {model.model}")
            out[key] = model
    return out


def known_models() -> list[str]:
    """Canonical model names in the table, sorted."""
    return sorted({m.model for m in load_models().values()})


def find_model(name: str) -> RatedModel:
    """The table entry for ``name`` (case, spaces, '-', '_' and vendor words ignored).
    Raises ValueError listing close matches."""
    models = load_models()
    key = _normalise(name)
    if key in models:
        return models[key]
    # Variants that extend the name ("A100-PCIE" → A100-PCIE-40GB, -80GB) first, then look-alikes.
    prefixed = sorted({m.model for k, m in models.items() if key and k.startswith(key)})
    close_keys = difflib.get_close_matches(key, list(models), n=5, cutoff=0.6)
    close = list(dict.fromkeys([*prefixed, *(models[k].model for k in close_keys)]))[:5]
    hint = f"; close matches: {', '.join(close)}" if close else f"; known models: {', '.join(known_models())}"
    raise ValueError(f"unknown GPU model {name!r}{hint} (or give the rated power in watts, e.g. 250:1:0.8)")


def parse_spec(spec: str) -> DeviceSpec:
    """``MODEL_OR_WATTS[:COUNT[:UTILISATION]]`` → DeviceSpec. Raises ValueError."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty device spec: expected MODEL_OR_WATTS[:COUNT[:UTILISATION]], e.g. V100:10:0.8")
    parts = [p.strip() for p in spec.strip().split(":")]
    if len(parts) > 3:
        raise ValueError(f"device spec {spec!r} has {len(parts)} fields: expected MODEL_OR_WATTS[:COUNT[:UTILISATION]]")
    head = parts[0]
    if not head:
        raise ValueError(f"device spec {spec!r}: missing model or watts before the first ':'")

    model: str | None
    try:
        watts = float(head)
    except ValueError:
        found = find_model(head)
        model, rated_w, source = found.model, found.rated_w, found.source
    else:
        if not math.isfinite(watts) or not 0 < watts <= MAX_WATTS:
            raise ValueError(f"device spec {spec!r}: power {head!r} W must be > 0 and at most {MAX_WATTS:g}")
        model, rated_w, source = None, watts, "given in watts"

    count = 1
    if len(parts) >= 2 and parts[1] != "":
        if not re.fullmatch(r"\d+", parts[1]):
            raise ValueError(f"device spec {spec!r}: count {parts[1]!r} must be a whole number ≥ 1")
        count = int(parts[1])
        if not 1 <= count <= MAX_COUNT:
            raise ValueError(f"device spec {spec!r}: count {count} must be ≥ 1")

    utilisation = 1.0
    if len(parts) == 3 and parts[2] != "":
        try:
            utilisation = float(parts[2])
        except ValueError:
            raise ValueError(f"device spec {spec!r}: utilisation {parts[2]!r} is not a number in (0, 1]") from None
        if not math.isfinite(utilisation) or not 0 < utilisation <= 1:
            raise ValueError(f"device spec {spec!r}: utilisation {parts[2]} must be in (0, 1] (0.8 means 80 %)")

    return DeviceSpec(spec=spec, model=model, rated_w=rated_w, count=count, utilisation=utilisation, source=source)


def estimate(specs: Sequence[DeviceSpec | str], hours: float, g_per_kwh: float | None, pue: float = 1.0,
             intensity_source: str = "") -> EstimateResult:
    """Power, energy and CO2e of running ``specs`` for ``hours``.

    ``g_per_kwh`` None: no intensity known, ``co2e_g`` is None. Raises ValueError."""
    devices = tuple(parse_spec(s) if isinstance(s, str) else s for s in specs)
    if not devices:
        raise ValueError("no devices: give at least one --device SPEC")
    if isinstance(hours, bool) or not isinstance(hours, (int, float)) or not math.isfinite(hours) or hours <= 0:
        raise ValueError(f"hours must be a number > 0, got {hours!r}")
    if not isinstance(pue, (int, float)) or not math.isfinite(pue) or not 1.0 <= pue <= 5.0:
        raise ValueError(f"pue must be in 1.0..5.0, got {pue!r}")
    if g_per_kwh is not None and (not isinstance(g_per_kwh, (int, float)) or not math.isfinite(g_per_kwh)
                                  or not 0 <= g_per_kwh <= 5000):
        raise ValueError(f"g_per_kwh must be in 0..5000, got {g_per_kwh!r}")
    power_w = math.fsum(d.power_w for d in devices)
    power_kw = power_w / 1000.0
    energy_kwh = power_kw * float(hours)
    # carbon.co2e_g's formula, in kWh as the plan is (going through joules would change
    # the last printed digit of about 1 estimate in 400).
    co2e_g = None if g_per_kwh is None else energy_kwh * float(pue) * float(g_per_kwh)
    return EstimateResult(devices=devices, hours=float(hours), g_per_kwh=None if g_per_kwh is None else float(g_per_kwh),
                          pue=float(pue), intensity_source=intensity_source, power_kw=power_kw,
                          energy_kwh=energy_kwh, co2e_g=co2e_g)


def _r(x: float | None, digits: int = 6) -> float | None:
    """Round away binary noise (2.6399999999999997 → 2.64) for display and JSON."""
    return None if x is None else round(x, digits)


def estimate_json(result: EstimateResult) -> dict[str, Any]:
    """The ``--json`` document: ``power_kw``, ``energy_kwh``, ``co2e_g`` and the inputs used."""
    return {
        "power_kw": _r(result.power_kw),
        "energy_kwh": _r(result.energy_kwh),
        "co2e_g": _r(result.co2e_g, 3),
        "inputs": {
            "devices": [
                {
                    "spec": d.spec,
                    "model": d.model,
                    "rated_w": d.rated_w,
                    "count": d.count,
                    "utilisation": d.utilisation,
                    "power_w": _r(d.power_w),
                    "rated_w_source": d.source,
                }
                for d in result.devices
            ],
            "hours": result.hours,
            "g_per_kwh": result.g_per_kwh,
            "intensity_source": result.intensity_source,
            "pue": result.pue,
        },
        "formula": "energy_kwh = sum(rated_w * count * utilisation) / 1000 * hours; co2e_g = energy_kwh * pue * g_per_kwh",
    }


WATTS_ONLY_NAME = "gpu:(given in watts)"


def lifecycle(result: EstimateResult, fp: Footprint, embodied: bool = True, water: bool = True) -> LifecycleEstimate:
    """Embodied CO2e of the planned GPU boards over the run and the run's water
    (module docstring), with the factors used."""
    import dataclasses

    gpu_factors: list[Factor] = []
    used: dict[str, Factor] = {}
    embodied_g: float | None = None
    grams: list[float] = []
    if embodied:
        for d in result.devices:
            if d.model is None:  # given in watts: no model to look up
                base = fp.gpu("")
                f = dataclasses.replace(base, name=WATTS_ONLY_NAME, source=f"device given in watts: {base.source}")
            else:
                f = fp.gpu(d.model)
            gpu_factors.append(f)
            used.setdefault(f.name, f)
            grams.append(d.count * f.value * 1000.0 * result.hours * 3600.0 / fp.life_s)
        embodied_g = math.fsum(grams)
        used.setdefault(fp.service_life.name, fp.service_life)
    water_l: float | None = None
    if water:
        water_l = result.energy_kwh * (fp.wue.value + result.pue * fp.ewif.value)
        used.setdefault(fp.wue.name, fp.wue)
        used.setdefault(fp.ewif.name, fp.ewif)
    return LifecycleEstimate(embodied_co2e_g=embodied_g, water_l=water_l, gpu_factors=tuple(gpu_factors),
                             device_embodied_g=tuple(grams), factors=tuple(used.values()), devices=result.devices)


def lifecycle_json(life: LifecycleEstimate) -> dict[str, Any]:
    """The lifecycle keys added to the ``--json`` document."""
    out: dict[str, Any] = {}
    if life.embodied_co2e_g is not None:
        out["embodied_co2e_g"] = _r(life.embodied_co2e_g, 3)
    if life.water_l is not None:
        out["water_l"] = _r(life.water_l, 6)
    formulas = []
    if life.embodied_co2e_g is not None:
        formulas.append("embodied_co2e_g = sum(count * gpu_kgco2e * 1000 * hours * 3600 / life_s), "
                        "life_s = service_life_years * 365.25 * 86400 (GPU boards only)")
    if life.water_l is not None:
        formulas.append("water_l = energy_kwh * (wue_l_per_kwh + pue * ewif_l_per_kwh)")
    out["lifecycle"] = {
        "devices": [{"spec": d.spec, "count": d.count, "factor": f.name, "kgco2e_per_board": f.value,
                     "default": f.default, "embodied_co2e_g": _r(g, 3)}
                    for d, f, g in zip(life.devices, life.gpu_factors, life.device_embodied_g)],
        "factors": [f.as_dict() for f in life.factors],
        "formula": "; ".join(formulas),
    }
    return out
