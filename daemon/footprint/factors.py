"""The lifecycle factors a job's footprint is computed with (issue 16), each with its
value, unit and source: from the shipped, versioned data file
``daemon/data/footprint_factors.json`` or, where the host set one, from the config
(``[footprint]`` and ``[market]``, source ``config: [footprint] <key>``).

- GPU manufacturing footprint by model (kgCO2e per board). A reading's model name (as
  NVML or amdsmi report it, "NVIDIA H100 80GB HBM3") is normalised much as plan.py
  does (case ignored, the words NVIDIA, Tesla, GeForce, Quadro dropped, runs of spaces,
  '-', '_' and '/' one space) and matched against every entry's normalised substrings;
  the longest match wins, and a match is of whole words ("A100" does not match "RTX
  A1000" or "A100X", "B200" not "GB200"; "H100" matches "H100 80GB HBM3"). Config
  entries (``[footprint] gpu_kgco2e``) are tried first. A model nothing matches takes
  its class default (datacenter, consumer/workstation, AMD Instinct) with
  ``default=True``.
- CPU per socket, DRAM per GB, the platform (chassis, motherboard, PSU, storage) per
  server, the service life, the on-site WUE and the grid's EWIF (by ``[grid] zone``
  mapped to a country as the static grid table does: ``DK1`` -> DK, ``US-CAL-CISO`` ->
  US; else the world default).
- Market-based instruments (``[market]``): only from the config.

A ``Footprint`` is immutable after construction; ``gpu()`` caches its answers (the
cache only ever holds the one answer for a name, so concurrent readers are safe).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import Config

DATA_FILE = "footprint_factors.json"
SECONDS_PER_YEAR = 365.25 * 86400.0
CONFIG_VERSION = "config"

# The unit each factor kind carries (the data file must agree; checked at load).
UNITS: dict[str, str] = {
    "gpu": "kgCO2e/device",
    "cpu": "kgCO2e/socket",
    "dram": "kgCO2e/GB",
    "platform": "kgCO2e/server",
    "service_life": "year",
    "wue": "L/kWh",
    "ewif": "L/kWh",
    "market.contract": "gCO2e/kWh",
    "market.residual": "gCO2e/kWh",
}
GPU_CLASSES: tuple[str, ...] = ("datacenter", "consumer_workstation", "amd_instinct")

_VENDOR_WORDS = re.compile(r"\b(nvidia|tesla|geforce|quadro)\b")
_CONSUMER_WORDS = re.compile(r"\b(geforce|rtx|gtx|titan|quadro|radeon)\b", re.IGNORECASE)
_AMD_INSTINCT = re.compile(r"\b(instinct|mi\d{2,3}[a-z]*)\b", re.IGNORECASE)

log = logging.getLogger("wattprint.footprint")


@dataclass(frozen=True, slots=True)
class Factor:
    """One number a footprint used, with what it is and where it comes from."""

    name: str  # "gpu:NVIDIA H100 80GB HBM3" | "cpu" | "dram" | "platform" | "service_life" | "wue" | "ewif"
    #            | "market.contract" | "market.residual"
    value: float
    unit: str  # see UNITS
    source: str  # citation (data file) or "config: [footprint] <key>"
    version: str  # data file version, or "config"
    default: bool = False  # a class default standing in for an unknown model

    def as_dict(self) -> dict[str, Any]:
        """The API/JSON form: {name, value, unit, source, version, default}."""
        return {"name": self.name, "value": self.value, "unit": self.unit, "source": self.source,
                "version": self.version, "default": self.default}


@dataclass(frozen=True)
class Market:
    """Contractual instruments for market-based CO2e (GHG Protocol Scope 2)."""

    share: float  # 0..1 of energy covered by contracts
    contract: Factor | None  # gCO2e/kWh of the supplier/PPA contract (None when share == 0)
    residual: Factor | None  # gCO2e/kWh residual mix; None -> location-based for the rest


@dataclass(frozen=True, slots=True)
class _GpuEntry:
    key: str  # normalised match substring
    model: str  # the data file's model name (or the config key)
    gpu_class: str
    factor: Factor  # name "gpu:<model>"; renamed per reading name in Footprint.gpu


def normalise(name: str) -> str:
    """A model name as matched: lower case, the vendor words removed, each run of
    spaces, '-', '_' and '/' one space ("NVIDIA A100-SXM4-80GB" -> "a100 sxm4 80gb")."""
    n = _VENDOR_WORDS.sub(" ", name.lower())
    return re.sub(r"[\s\-_/]+", " ", n).strip()


def _matches(key: str, name: str) -> bool:
    """``key`` occurs in ``name`` (both normalised) as whole words: it does not run on
    into a letter or digit on either side ("h100" matches "h100 nvl", not "h1000" or
    "gh100")."""
    if not key:
        return False
    start = name.find(key)
    while start >= 0:
        end = start + len(key)
        left_ok = start == 0 or not name[start - 1].isalnum() or not key[0].isalnum()
        right_ok = end >= len(name) or not name[end].isalnum() or not key[-1].isalnum()
        if left_ok and right_ok:
            return True
        start = name.find(key, start + 1)
    return False


def gpu_class_of(name: str) -> str:
    """The class an unknown GPU model falls in: AMD Instinct, consumer/workstation
    (GeForce, RTX, GTX, TITAN, Quadro, Radeon), else datacenter."""
    if _AMD_INSTINCT.search(name):
        return "amd_instinct"
    if _CONSUMER_WORDS.search(name):
        return "consumer_workstation"
    return "datacenter"


class FactorFileError(ValueError):
    """The shipped data file is malformed (a packaging bug, not a user error)."""


def _walk_numbers(node: Any, path: str, out: list[str]) -> None:
    """Every number in the file must be the ``value`` of an object with a non-empty
    unit and source; collect the paths of those that are not."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else key
            if key == "value" and isinstance(value, (int, float)) and not isinstance(value, bool):
                unit, source = node.get("unit"), node.get("source")
                if not (isinstance(unit, str) and unit.strip()):
                    out.append(f"{here}: no unit")
                if not (isinstance(source, str) and source.strip()):
                    out.append(f"{here}: no source")
                if not math.isfinite(float(value)) or value < 0:
                    out.append(f"{here}: {value!r} is not a finite number >= 0")
            else:
                _walk_numbers(value, here, out)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _walk_numbers(value, f"{path}[{i}]", out)
    elif isinstance(node, bool) or node is None:
        return
    elif isinstance(node, (int, float)):
        out.append(f"{path}: bare number {node!r} (every number needs an object with value, unit and source)")


def check_data(data: Any) -> list[str]:
    """Problems with a parsed data file: unsourced or unitless numbers, missing parts,
    units that differ from ``UNITS``. Empty when the file is good."""
    problems: list[str] = []
    if not isinstance(data, dict):
        return ["the file is not a JSON object"]
    _walk_numbers(data, "", problems)
    if not (isinstance(data.get("version"), str) and data["version"]):
        problems.append("version: missing (a non-empty string)")

    def want(path: str, entry: Any, kind: str) -> None:
        if not isinstance(entry, dict) or "value" not in entry:
            problems.append(f"{path}: missing (an object with value, unit, source)")
        elif entry.get("unit") != UNITS[kind]:
            problems.append(f"{path}: unit {entry.get('unit')!r}, expected {UNITS[kind]!r}")

    for i, m in enumerate(data.get("gpu_models", [])):
        want(f"gpu_models[{i}].embodied", m.get("embodied"), "gpu")
        if not m.get("match") or not all(isinstance(s, str) and normalise(s) for s in m["match"]):
            problems.append(f"gpu_models[{i}].match: needs one or more non-empty model substrings")
        if m.get("class") not in GPU_CLASSES:
            problems.append(f"gpu_models[{i}].class: {m.get('class')!r} is not one of {', '.join(GPU_CLASSES)}")
    classes = data.get("gpu_classes", {})
    if "datacenter" not in classes:
        problems.append("gpu_classes.datacenter: missing (the default for unknown models)")
    for name, entry in classes.items():
        if name not in GPU_CLASSES:
            problems.append(f"gpu_classes.{name}: not one of {', '.join(GPU_CLASSES)}")
        want(f"gpu_classes.{name}.embodied", entry.get("embodied") if isinstance(entry, dict) else None, "gpu")
    for path, kind in (("cpu", "cpu"), ("dram", "dram"), ("platform", "platform"),
                       ("service_life", "service_life"), ("wue", "wue")):
        want(path, data.get(path), kind)
    ewif = data.get("ewif", {})
    want("ewif.default", ewif.get("default") if isinstance(ewif, dict) else None, "ewif")
    for code, entry in (ewif.get("zones", {}) if isinstance(ewif, dict) else {}).items():
        want(f"ewif.zones.{code}", entry, "ewif")
    return problems


@lru_cache(maxsize=1)
def load_data() -> dict[str, Any]:
    """The shipped data file, parsed and checked (``check_data``)."""
    text = resources.files("wattprint.daemon").joinpath("data", DATA_FILE).read_text(encoding="utf-8")
    data = json.loads(text)
    problems = check_data(data)
    if problems:
        raise FactorFileError(f"{DATA_FILE}: " + "; ".join(problems))
    return data


def _cite(entry: Mapping[str, Any]) -> str:
    """An entry's citation: its source, its URL when it has one, and its derivation."""
    text = str(entry["source"])
    if entry.get("derivation"):
        text += f" ({entry['derivation']})"
    if entry.get("url"):
        text += f" <{entry['url']}>"
    return text


def _file_factor(name: str, entry: Mapping[str, Any], version: str, default: bool = False) -> Factor:
    return Factor(name=name, value=float(entry["value"]), unit=str(entry["unit"]), source=_cite(entry),
                  version=version, default=default)


def _config_factor(name: str, value: float, section: str, key: str) -> Factor:
    return Factor(name=name, value=float(value), unit=UNITS[name.split(":", 1)[0]],
                  source=f"config: [{section}] {key}", version=CONFIG_VERSION)


def shipped_value(path: str) -> float:
    """A number of the shipped file by dotted path ("service_life", "ewif.default"),
    for the config's defaults."""
    node: Any = load_data()
    for part in path.split("."):
        node = node[part]
    return float(node["value"])


def ewif_zone_entry(zone: str) -> tuple[str, Mapping[str, Any]] | None:
    """The shipped EWIF entry for a grid zone: an ISO alpha-2 or alpha-3 code, or a
    live provider's zone mapped to its country (``DK1`` -> DK, ``DK-DK2`` -> DK,
    ``GB-region-13`` -> GB, ``US-CAL-CISO`` -> US), as grid/static.py maps zones.
    None for an empty or unknown zone."""
    z = (zone or "").strip().upper()
    if not z:
        return None
    zones: Mapping[str, Any] = load_data()["ewif"].get("zones", {})
    if z in zones:
        return z, zones[z]
    for code, entry in zones.items():
        if entry.get("iso3", "").upper() == z:
            return code, entry
    if re.fullmatch(r"DK[12]", z) and "DK" in zones:
        return "DK", zones["DK"]
    head = z.split("-", 1)[0]
    if head != z and head in zones:
        return head, zones[head]
    return None


def detect_cpu_sockets(cpu_root: str = "/sys/devices/system/cpu") -> int:
    """Distinct physical package ids of the CPUs, 1 when none can be read."""
    ids: set[str] = set()
    for path in glob.glob(os.path.join(cpu_root, "cpu[0-9]*", "topology", "physical_package_id")):
        try:
            with open(path, encoding="ascii") as fh:
                ids.add(fh.read().strip())
        except (OSError, UnicodeDecodeError):
            continue
    ids.discard("")
    ids.discard("-1")
    return max(1, len(ids))


def detect_dram_gb(meminfo: str = "/proc/meminfo") -> float:
    """Installed memory in GB (GiB, as DIMM capacities are counted) from MemTotal; 0.0
    when it cannot be read. MemTotal is a little below the installed capacity (the
    kernel's reserved memory), so the DRAM footprint errs low, never high."""
    try:
        with open(meminfo, encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    parts = line.split()
                    return int(parts[1]) * 1024 / 2**30 if parts[2].lower() == "kb" else int(parts[1]) / 2**30
    except (OSError, UnicodeDecodeError, ValueError, IndexError):
        pass
    return 0.0


class Footprint:
    """The factors in effect: immutable after construction, safe to read from any thread."""

    __slots__ = (
        "_gpu_cache",
        "_gpu_classes",
        "_gpu_models",
        "_gpu_overrides",
        "cpu",
        "cpu_sockets",
        "dram",
        "dram_gb",
        "ewif",
        "life_s",
        "market",
        "notes",
        "platform",
        "service_life",
        "version",
        "wue",
    )

    def __init__(self, *, version: str, service_life: Factor, cpu: Factor, dram: Factor, platform: Factor,
                 wue: Factor, ewif: Factor, market: Market, cpu_sockets: int, dram_gb: float,
                 gpu_models: Iterable[_GpuEntry] = (), gpu_overrides: Iterable[_GpuEntry] = (),
                 gpu_classes: Mapping[str, Factor] | None = None, notes: tuple[str, ...] = ()):
        if service_life.value <= 0:
            raise ValueError(f"service life must be > 0 years, got {service_life.value!r}")
        self.version = version
        self.service_life = service_life
        self.life_s = service_life.value * SECONDS_PER_YEAR
        self.cpu, self.dram, self.platform = cpu, dram, platform
        self.wue, self.ewif = wue, ewif
        self.market = market
        self.cpu_sockets = int(cpu_sockets)
        self.dram_gb = float(dram_gb)
        # Longest key first: the first match is the longest.
        self._gpu_overrides = tuple(sorted(gpu_overrides, key=lambda e: -len(e.key)))
        self._gpu_models = tuple(sorted(gpu_models, key=lambda e: -len(e.key)))
        self._gpu_classes = dict(gpu_classes or {})
        if "datacenter" not in self._gpu_classes:
            raise ValueError("a footprint needs a datacenter GPU class default")
        self._gpu_cache: dict[str, Factor] = {}
        self.notes = notes  # how zone-dependent and detected values were chosen (check-config)

    def gpu(self, model_name: str) -> Factor:
        """The factor of a GPU board by its reported model name: the longest matching
        config entry, else the longest matching data-file entry, else the class default
        (``default=True``). The factor's name is ``gpu:<model_name>``."""
        found = self._gpu_cache.get(model_name)
        if found is not None:
            return found
        key = normalise(model_name)
        name = f"gpu:{model_name}"
        entry = next((e for e in self._gpu_overrides if _matches(e.key, key)), None)
        if entry is None:
            entry = next((e for e in self._gpu_models if _matches(e.key, key)), None)
        if entry is not None:
            base = entry.factor
            source = base.source if base.version == CONFIG_VERSION else f"{entry.model}: {base.source}"
            found = Factor(name=name, value=base.value, unit=base.unit, source=source, version=base.version)
        else:
            cls = gpu_class_of(model_name)
            base = self._gpu_classes.get(cls) or self._gpu_classes["datacenter"]
            cls_used = cls if cls in self._gpu_classes else "datacenter"
            shown = model_name if model_name.strip() else "(no model name)"
            found = Factor(name=name, value=base.value, unit=base.unit,
                           source=f"class default ({cls_used} GPU; model {shown!r} is not in the data file): "
                                  f"{base.source}",
                           version=base.version, default=True)
            # Said once per model (the cache): the figure is a class default, not the model's.
            log.warning("footprint: GPU model %r has no entry in the footprint data file: its embodied carbon "
                        "uses the %s class default, %g %s (set [footprint] gpu_kgco2e to your own figure)",
                        shown, cls_used, base.value, base.unit)
        self._gpu_cache[model_name] = found
        return found

    def item(self, item: str) -> Factor:
        """The factor of an occupancy item: ``gpu:<name>``, ``cpu``, ``dram`` or ``platform``."""
        if item.startswith("gpu:"):
            return self.gpu(item[4:])
        if item == "cpu":
            return self.cpu
        if item == "dram":
            return self.dram
        if item == "platform":
            return self.platform
        raise KeyError(f"unknown footprint item {item!r} (gpu:<model>, cpu, dram, platform)")

    def factors_for(self, items: Iterable[str]) -> list[Factor]:
        """Every factor a job's figures used: each item's (in the order given, once),
        the service life, WUE and EWIF, and the market instruments in effect."""
        out: list[Factor] = []
        seen: set[str] = set()
        for item in items:
            if item in seen:
                continue
            seen.add(item)
            out.append(self.item(item))
        out += [self.service_life, self.wue, self.ewif]
        if self.market.contract is not None:
            out.append(self.market.contract)
        if self.market.residual is not None:
            out.append(self.market.residual)
        return out

    def describe(self) -> str:
        """One line: the factors in effect and where they come from (check-config, logs)."""
        def src(f: Factor) -> str:
            return "config" if f.version == CONFIG_VERSION else f"data {f.version}"

        parts = [
            f"service life {self.service_life.value:g} y ({src(self.service_life)})",
            f"cpu {self.cpu.value:g} kg/socket x {self.cpu_sockets} ({src(self.cpu)})",
            f"dram {self.dram.value:g} kg/GB x {self.dram_gb:.1f} GB ({src(self.dram)})",
            f"platform {self.platform.value:g} kg ({src(self.platform)})",
            f"WUE {self.wue.value:g} L/kWh ({src(self.wue)})",
            f"EWIF {self.ewif.value:g} L/kWh ({src(self.ewif)})",
        ]
        if self.market.share > 0 and self.market.contract is not None:
            rest = (f"residual {self.market.residual.value:g} g/kWh" if self.market.residual is not None
                    else "location-based for the rest")
            parts.append(f"market {self.market.share:g} at {self.market.contract.value:g} g/kWh, {rest}")
        elif self.market.residual is not None:
            parts.append(f"market residual {self.market.residual.value:g} g/kWh")
        text = f"factors {self.version}: " + "; ".join(parts)
        return text + ("; " + "; ".join(self.notes) if self.notes else "")


def _shipped_parts(data: Mapping[str, Any]) -> tuple[str, list[_GpuEntry], dict[str, Factor]]:
    version = str(data["version"])
    models: list[_GpuEntry] = []
    for m in data.get("gpu_models", []):
        factor = _file_factor(f"gpu:{m['model']}", m["embodied"], version)
        for s in m["match"]:
            models.append(_GpuEntry(key=normalise(s), model=m["model"], gpu_class=m["class"], factor=factor))
    classes = {name: _file_factor(f"gpu:{name}", entry["embodied"], version, default=True)
               for name, entry in data["gpu_classes"].items()}
    return version, models, classes


def default_footprint() -> Footprint:
    """The shipped data alone: no config, one socket, DRAM from MemTotal, the world EWIF,
    no market instruments."""
    data = load_data()
    version, models, classes = _shipped_parts(data)
    return Footprint(
        version=version,
        service_life=_file_factor("service_life", data["service_life"], version),
        cpu=_file_factor("cpu", data["cpu"], version),
        dram=_file_factor("dram", data["dram"], version),
        platform=_file_factor("platform", data["platform"], version),
        wue=_file_factor("wue", data["wue"], version),
        ewif=_file_factor("ewif", data["ewif"]["default"], version),
        market=Market(share=0.0, contract=None, residual=None),
        cpu_sockets=1,
        dram_gb=detect_dram_gb(),
        gpu_models=models,
        gpu_classes=classes,
    )


def build_footprint(cfg: Config, *, cpu_root: str = "/sys/devices/system/cpu",
                    meminfo: str = "/proc/meminfo") -> Footprint:
    """The shipped data with the config's ``[footprint]`` and ``[market]`` overrides; a
    value set in the config wins and says ``config: [footprint] <key>``. The config is
    already validated (config.py)."""
    from ..config import is_set

    data = load_data()
    version, models, classes = _shipped_parts(data)
    fc = cfg.footprint
    notes: list[str] = []

    def pick(name: str, key: str, value: float, entry: Mapping[str, Any]) -> Factor:
        if is_set(value):
            return _config_factor(name, value, "footprint", key)
        return _file_factor(name, entry, version)

    overrides = [
        _GpuEntry(key=normalise(sub), model=sub, gpu_class="",
                  factor=_config_factor(f"gpu:{sub}", kg, "footprint", f"gpu_kgco2e.{json.dumps(sub)}"))
        for sub, kg in fc.gpu_kgco2e.items()
    ]
    if is_set(fc.ewif_l_per_kwh):
        ewif = _config_factor("ewif", fc.ewif_l_per_kwh, "footprint", "ewif_l_per_kwh")
    else:
        found = ewif_zone_entry(cfg.grid.zone)
        if found is not None:
            code, entry = found
            ewif = _file_factor("ewif", entry, version)
            mapped = f" (mapped to {code})" if code != cfg.grid.zone.strip().upper() else ""
            notes.append(f"EWIF for [grid] zone {cfg.grid.zone!r}{mapped}")
        else:
            ewif = _file_factor("ewif", data["ewif"]["default"], version)
            why = f"zone {cfg.grid.zone!r} has no EWIF entry" if cfg.grid.zone.strip() else "no [grid] zone"
            notes.append(f"EWIF world default ({why})")
    sockets = fc.cpu_sockets
    if sockets == 0:
        sockets = detect_cpu_sockets(cpu_root)
        notes.append(f"{sockets} CPU socket(s) detected")
    dram_gb = fc.dram_gb
    if dram_gb == 0:
        dram_gb = detect_dram_gb(meminfo)
        notes.append(f"{dram_gb:.1f} GB DRAM detected")
    mc = cfg.market
    contract = (_config_factor("market.contract", mc.contract_g_per_kwh, "market", "contract_g_per_kwh")
                if mc.contract_share > 0 else None)
    residual = (_config_factor("market.residual", mc.residual_g_per_kwh, "market", "residual_g_per_kwh")
                if is_set(mc.residual_g_per_kwh) else None)
    return Footprint(
        version=version,
        service_life=pick("service_life", "service_life_years", fc.service_life_years, data["service_life"]),
        cpu=pick("cpu", "cpu_kgco2e_per_socket", fc.cpu_kgco2e_per_socket, data["cpu"]),
        dram=pick("dram", "dram_kgco2e_per_gb", fc.dram_kgco2e_per_gb, data["dram"]),
        platform=pick("platform", "platform_kgco2e", fc.platform_kgco2e, data["platform"]),
        wue=pick("wue", "wue_l_per_kwh", fc.wue_l_per_kwh, data["wue"]),
        ewif=ewif,
        market=Market(share=float(mc.contract_share), contract=contract, residual=residual),
        cpu_sockets=sockets,
        dram_gb=dram_gb,
        gpu_models=models,
        gpu_overrides=overrides,
        gpu_classes=classes,
        notes=tuple(notes),
    )
