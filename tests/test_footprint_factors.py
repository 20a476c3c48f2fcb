"""The lifecycle factors (issue 16): the shipped data file, model matching, class
defaults, ``[footprint]`` / ``[market]`` overrides and their errors.

Truth comes from the data file itself (read here with ``json``, not through the code
under test) and from the config the test writes.

- Every number in daemon/data/footprint_factors.json sits in an object with a
  non-empty unit and source (``WATTPRINT_TEST_FACTORS_FILE`` points the check at another
  file; a test runs it on mutated copies and expects it to fail).
- GPU model names as NVML / amdsmi report them match the data file's entries (whole
  words, longest match), unknown ones take a class default flagged ``default=True``.
- A factor set in the config wins and says ``config: [footprint] <key>``; bad values
  are clear config errors.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from wattprint.daemon.config import (
    Config,
    ConfigError,
    FootprintConfig,
    MarketConfig,
    load_config,
)
from wattprint.daemon.footprint import build_footprint, default_footprint, factors

REPO = Path(__file__).resolve().parent.parent
DATA_FILE = REPO / "daemon" / "data" / "footprint_factors.json"


def data() -> dict[str, Any]:
    return json.loads(DATA_FILE.read_text(encoding="utf-8"))


def gpu_entry(match: str) -> dict[str, Any]:
    (entry,) = [m for m in data()["gpu_models"] if match in m["match"]]
    return entry


# ----------------------------------------------------------------- every number sourced


def unsourced_numbers(node: Any, path: str = "") -> list[str]:
    """Paths of numbers that are not the ``value`` of an object with a non-empty
    ``unit`` and ``source`` (booleans are not numbers here)."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else key
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                unit, source = node.get("unit"), node.get("source")
                if key != "value" or not (isinstance(unit, str) and unit.strip()) \
                        or not (isinstance(source, str) and source.strip()):
                    found.append(here)
            else:
                found += unsourced_numbers(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                found.append(f"{path}[{i}]")
            else:
                found += unsourced_numbers(value, f"{path}[{i}]")
    return found


def factor_objects(node: Any) -> Iterator[dict[str, Any]]:
    """Every object in the file holding a numeric ``value``."""
    if isinstance(node, dict):
        if isinstance(node.get("value"), (int, float)):
            yield node
        for value in node.values():
            yield from factor_objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from factor_objects(value)


def test_every_factor_in_the_data_file_has_a_unit_and_a_source() -> None:
    path = Path(os.environ.get("WATTPRINT_TEST_FACTORS_FILE") or DATA_FILE)
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(doc.get("version"), str) and doc["version"], "the data file needs a version"
    assert not unsourced_numbers(doc), f"numbers without a unit or source: {unsourced_numbers(doc)}"
    assert len(list(factor_objects(doc))) >= 10  # the walk really reaches the factors


@pytest.mark.parametrize("mutation", ["drop unit", "empty source", "drop source", "bare number"])
def test_the_source_check_fails_on_a_mutated_copy(tmp_path: Path, mutation: str) -> None:
    """The test above, run by pytest on a copy of the file with one factor spoiled,
    fails; the loader's own check rejects the copy too."""
    doc = data()
    for i, target in enumerate(factor_objects(doc)):
        spoiled = copy.deepcopy(doc)
        victim = list(factor_objects(spoiled))[i]
        if mutation == "drop unit":
            del victim["unit"]
        elif mutation == "empty source":
            victim["source"] = " "
        elif mutation == "drop source":
            del victim["source"]
        else:
            victim["note_kg"] = 12.5
        assert unsourced_numbers(spoiled), (mutation, target)
        assert factors.check_data(spoiled), (mutation, target)
    copy_path = tmp_path / "footprint_factors.json"
    spoiled = data()
    if mutation == "drop unit":
        del spoiled["cpu"]["unit"]
    else:
        spoiled["cpu"]["source"] = ""
    copy_path.write_text(json.dumps(spoiled), encoding="utf-8")
    env = {**os.environ, "WATTPRINT_TEST_FACTORS_FILE": str(copy_path)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"{__file__}::test_every_factor_in_the_data_file_has_a_unit_and_a_source"],
                       env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 1 and "1 failed" in r.stdout, r.stdout[-2000:]


def test_the_loader_accepts_the_shipped_file_and_its_version() -> None:
    assert factors.check_data(data()) == []
    assert default_footprint().version == data()["version"]


# ---------------------------------------------------------------------- model matching


@pytest.mark.parametrize(("reported", "match"), [
    ("NVIDIA H100 80GB HBM3", "H100"),
    ("NVIDIA H100 PCIe", "H100"),
    ("NVIDIA H100 NVL", "H100"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA A100-PCIE-40GB", "A100"),
    ("NVIDIA B200", "B200"),
    ("NVIDIA L4", "L4"),
    ("Tesla P100-PCIE-16GB", "P100"),
    ("NVIDIA TITAN RTX", "TITAN RTX"),
    ("NVIDIA RTX A4500", "RTX A4500"),
    ("NVIDIA GeForce GTX 1080 Ti", "GTX 1080 Ti"),
])
def test_reported_model_names_match_their_entry(reported: str, match: str) -> None:
    entry = gpu_entry(match)
    f = default_footprint().gpu(reported)
    assert f.value == entry["embodied"]["value"] and f.unit == "kgCO2e/device"
    assert f.default is False and f.name == f"gpu:{reported}"
    assert entry["embodied"]["source"] in f.source and f.version == data()["version"]
    assert default_footprint().item(f"gpu:{reported}") == f


@pytest.mark.parametrize(("reported", "cls"), [
    ("NVIDIA H200", "datacenter"),          # no published H200 figure
    ("NVIDIA L40S", "datacenter"),
    ("NVIDIA GB200", "datacenter"),         # whole words: not B200
    ("NVIDIA A100X", "datacenter"),         # not A100
    ("AMD Instinct MI300X", "datacenter"),  # no AMD class in the data: the datacenter default
    ("NVIDIA GeForce RTX 4090", "consumer_workstation"),
    ("NVIDIA RTX A1000", "consumer_workstation"),  # not A100
    ("AMD Radeon RX 7900 XTX", "consumer_workstation"),
    ("", "datacenter"),
])
def test_unknown_models_take_their_class_default_and_say_so(reported: str, cls: str) -> None:
    f = default_footprint().gpu(reported)
    assert f.default is True
    assert f.value == data()["gpu_classes"][cls]["embodied"]["value"]
    assert f.source.startswith(f"class default ({cls} GPU;")


def test_the_longest_match_wins_and_config_entries_come_first() -> None:
    cfg = Config(footprint=FootprintConfig(gpu_kgco2e={"H100": 100.0, "H100 NVL": 200.0, "nvidia l4": 7.0}))
    fp = build_footprint(cfg)
    assert fp.gpu("NVIDIA H100 NVL").value == 200.0
    assert fp.gpu("NVIDIA H100 80GB HBM3").value == 100.0
    assert fp.gpu("NVIDIA H100 80GB HBM3").source == 'config: [footprint] gpu_kgco2e."H100"'
    assert fp.gpu("NVIDIA L4").value == 7.0  # vendor words ignored in the key too
    assert fp.gpu("NVIDIA A100-SXM4-80GB").value == gpu_entry("A100")["embodied"]["value"]  # data file


# --------------------------------------------------------------- defaults and overrides


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "wattprint.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_come_from_the_data_file_with_its_sources(tmp_path: Path) -> None:
    doc = data()
    fp = build_footprint(load_config(write(tmp_path, "[footprint]\ncpu_sockets = 2\ndram_gb = 512.0\n"), env={}))
    for got, entry, unit in ((fp.cpu, doc["cpu"], "kgCO2e/socket"), (fp.dram, doc["dram"], "kgCO2e/GB"),
                             (fp.platform, doc["platform"], "kgCO2e/server"), (fp.wue, doc["wue"], "L/kWh"),
                             (fp.ewif, doc["ewif"]["default"], "L/kWh"),
                             (fp.service_life, doc["service_life"], "year")):
        assert got.value == entry["value"] and got.unit == unit == entry["unit"]
        assert entry["source"] in got.source and got.version == doc["version"] and not got.default
    assert fp.life_s == doc["service_life"]["value"] * 365.25 * 86400
    assert (fp.cpu_sockets, fp.dram_gb) == (2, 512.0)
    assert fp.market.share == 0 and fp.market.contract is None and fp.market.residual is None


def test_config_overrides_win_and_name_their_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[footprint]\nservice_life_years = 4\ncpu_kgco2e_per_socket = 30\n"
                           "dram_kgco2e_per_gb = 0.5\nplatform_kgco2e = 2500\nwue_l_per_kwh = 0.2\n"
                           "ewif_l_per_kwh = 3.5\ngpu_kgco2e = { \"H200\" = 210.5 }\n"
                           "[market]\ncontract_share = 0.6\ncontract_g_per_kwh = 20\nresidual_g_per_kwh = 410\n")
    fp = build_footprint(load_config(path, env={}))
    for got, key, value in ((fp.service_life, "service_life_years", 4.0), (fp.cpu, "cpu_kgco2e_per_socket", 30.0),
                            (fp.dram, "dram_kgco2e_per_gb", 0.5), (fp.platform, "platform_kgco2e", 2500.0),
                            (fp.wue, "wue_l_per_kwh", 0.2), (fp.ewif, "ewif_l_per_kwh", 3.5)):
        assert (got.value, got.source, got.version) == (value, f"config: [footprint] {key}", "config")
    assert fp.life_s == 4 * 365.25 * 86400
    h200 = fp.gpu("NVIDIA H200")
    assert (h200.value, h200.default, h200.version) == (210.5, False, "config")
    assert fp.market.share == 0.6
    assert fp.market.contract is not None and fp.market.contract.value == 20.0
    assert fp.market.contract.source == "config: [market] contract_g_per_kwh"
    assert fp.market.residual is not None and fp.market.residual.unit == "gCO2e/kWh"
    assert fp.market.residual.value == 410.0
    names = [f.name for f in fp.factors_for(["gpu:NVIDIA H200", "cpu", "gpu:NVIDIA H200", "platform"])]
    assert names == ["gpu:NVIDIA H200", "cpu", "platform", "service_life", "wue", "ewif",
                     "market.contract", "market.residual"]


def test_environment_overrides(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""), env={"WATTPRINT_FOOTPRINT_WUE_L_PER_KWH": "0.5",
                                                "WATTPRINT_FOOTPRINT_GPU_KGCO2E": "L40S=120, H100 NVL=190",
                                                "WATTPRINT_MARKET_CONTRACT_SHARE": "1",
                                                "WATTPRINT_MARKET_CONTRACT_G_PER_KWH": "0"})
    fp = build_footprint(cfg)
    assert (fp.wue.value, fp.wue.source) == (0.5, "config: [footprint] wue_l_per_kwh")
    assert fp.gpu("NVIDIA L40S").value == 120.0 and fp.gpu("NVIDIA H100 NVL").value == 190.0
    assert fp.market.share == 1.0 and fp.market.contract is not None and fp.market.contract.value == 0.0


@pytest.mark.parametrize(("zone", "code"), [("US", "US"), ("USA", "US"), ("US-CAL-CISO", "US"), ("us", "US"),
                                            ("DE", None), ("", None), ("DK1", None)])
def test_ewif_follows_the_grid_zone(tmp_path: Path, zone: str, code: str | None) -> None:
    doc = data()
    fp = build_footprint(load_config(write(tmp_path, f"[grid]\nzone = {json.dumps(zone)}\n"), env={}))
    want = doc["ewif"]["zones"][code] if code else doc["ewif"]["default"]
    assert fp.ewif.value == want["value"] and want["source"] in fp.ewif.source


def test_detected_sockets_and_dram(tmp_path: Path) -> None:
    cpu_root = tmp_path / "cpu"
    for cpu, package in enumerate(["0", "0", "1", "1"]):
        topo = cpu_root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(package + "\n")
    (cpu_root / "cpufreq").mkdir()  # not a CPU
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384000 kB\nMemFree:         1000 kB\n")
    fp = build_footprint(Config(), cpu_root=str(cpu_root), meminfo=str(meminfo))
    assert fp.cpu_sockets == 2
    assert fp.dram_gb == 16384000 * 1024 / 2**30
    # Nothing readable: one socket, no DRAM
    fp = build_footprint(Config(), cpu_root=str(tmp_path / "none"), meminfo=str(tmp_path / "none"))
    assert (fp.cpu_sockets, fp.dram_gb) == (1, 0.0)
    # Set in the config: not detected
    fp = build_footprint(Config(footprint=FootprintConfig(cpu_sockets=4, dram_gb=2048.0)),
                         cpu_root=str(cpu_root), meminfo=str(meminfo))
    assert (fp.cpu_sockets, fp.dram_gb) == (4, 2048.0)


def test_item_rejects_unknown_items() -> None:
    with pytest.raises(KeyError):
        default_footprint().item("gpu0")


# --------------------------------------------------------------------------- bad config


@pytest.mark.parametrize(("text", "expected"), [
    ("[footprint]\ncpu_kgco2e_per_socket = -1\n", "[footprint] cpu_kgco2e_per_socket: -1.0 is outside 0.0.."),
    ("[footprint]\nwue_l_per_kwh = -0.1\n", "[footprint] wue_l_per_kwh: -0.1 is outside"),
    ("[footprint]\nservice_life_years = 0\n", "[footprint] service_life_years: 0.0 is outside 0.1.."),
    ("[footprint]\ngpu_kgco2e = { \"H100\" = -5 }\n", "[footprint] gpu_kgco2e: 'H100': -5 kgCO2e is outside"),
    ("[footprint]\ngpu_kgco2e = { \"H100\" = \"a lot\" }\n", "[footprint] gpu_kgco2e: 'H100': expected a number"),
    ("[footprint]\ngpu_kgco2e = { \"NVIDIA\" = 5 }\n", "[footprint] gpu_kgco2e: 'NVIDIA': the name matches no GPU"),
    ("[footprint]\ngpu_kgco2e = 5\n", "[footprint] gpu_kgco2e: expected a table of name = number"),
    ("[footprint]\ncpu_sockets = 1.5\n", "[footprint] cpu_sockets: expected an integer"),
    ("[footprint]\nembodied = 1\n", "[footprint] embodied: unknown key"),
    ("[market]\ncontract_share = 1.5\ncontract_g_per_kwh = 10\n", "[market] contract_share: 1.5 is outside 0.0..1.0"),
    ("[market]\ncontract_share = -0.1\n", "[market] contract_share: -0.1 is outside 0.0..1.0"),
    ("[market]\ncontract_share = 0.6\n", "[market] contract_g_per_kwh: required when contract_share > 0"),
    ("[market]\nresidual_g_per_kwh = -3\n", "[market] residual_g_per_kwh: -3.0 is outside"),
])
def test_bad_values_are_clear_config_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert any(p.startswith(f"{path}: {expected}") for p in err.value.problems), err.value.problems


def test_a_bad_environment_table_names_its_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, ""), env={"WATTPRINT_FOOTPRINT_GPU_KGCO2E": "H100"})
    (problem,) = err.value.problems
    assert problem.startswith("environment WATTPRINT_FOOTPRINT_GPU_KGCO2E: [footprint] gpu_kgco2e: expected NAME=")


def test_zero_share_needs_no_contract_and_market_defaults_are_unset() -> None:
    fp = build_footprint(Config(market=MarketConfig(residual_g_per_kwh=300.0)))
    assert fp.market.contract is None
    assert fp.market.residual is not None and fp.market.residual.source == "config: [market] residual_g_per_kwh"


def test_check_config_prints_the_factors_in_effect(tmp_path: Path) -> None:
    path = write(tmp_path, "[grid]\nzone = \"US-CAL-CISO\"\n[footprint]\ncpu_sockets = 2\ndram_gb = 64.0\n"
                           "wue_l_per_kwh = 0.3\ngpu_kgco2e = { \"H100\" = 170.0 }\n")
    r = subprocess.run([sys.executable, "-m", "wattprint.daemon", "check-config", "--config", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert 'gpu_kgco2e = {"H100" = 170.0}' in r.stdout  # the effective config is TOML
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("# footprint:")]
    doc = data()
    assert f"factors {doc['version']}:" in line
    assert "WUE 0.3 L/kWh (config)" in line
    assert f"EWIF {doc['ewif']['zones']['US']['value']:g} L/kWh (data {doc['version']})" in line
    assert "x 2 (data" in line and "x 64.0 GB" in line
