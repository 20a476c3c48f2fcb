"""`wattprint estimate` as users run it: E = sum(P x count x U) x T and its CO2e."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def wattprint(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wattprint.daemon", *args], capture_output=True, text=True, timeout=60)


def test_estimate_json_matches_the_formula():
    # V100 (SXM2) is rated 300 W in NVIDIA's datasheet: 300 x 10 x 0.8 + 200 x 2 x 0.6 = 2640 W.
    # (Issue 4 quotes 2.88 kW / 138.24 kWh, which would need a 330 W V100; see CHANGELOG.)
    r = wattprint("estimate", "--device", "V100:10:0.8", "--device", "200:2:0.6", "--hours", "48",
                  "--g-per-kwh", "100", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["power_kw"] == pytest.approx(2.64)
    assert doc["energy_kwh"] == pytest.approx(126.72)
    assert doc["co2e_g"] == pytest.approx(12672.0)
    assert [d["rated_w"] for d in doc["inputs"]["devices"]] == [300.0, 200.0]
    assert doc["inputs"]["g_per_kwh"] == 100.0 and doc["inputs"]["pue"] == 1.0


def test_estimate_zone_table_and_pue():
    r = wattprint("estimate", "--device", "300:1:1", "--hours", "10", "--zone", "DK", "--pue", "1.5", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["energy_kwh"] == pytest.approx(3.0)
    assert doc["co2e_g"] == pytest.approx(3.0 * 1.5 * doc["inputs"]["g_per_kwh"])
    assert "DK" in doc["inputs"]["intensity_source"]
    text = wattprint("estimate", "--device", "300:1:1", "--hours", "10", "--zone", "DK")
    assert text.returncode == 0 and "kWh" in text.stdout


@pytest.mark.parametrize("args,needle", [
    (["--device", "Z999", "--hours", "1"], "unknown GPU model"),
    (["--device", "V100:0", "--hours", "1"], "count"),
    (["--device", "V100:1:1.5", "--hours", "1"], "utilisation"),
    (["--device", "V100", "--hours", "-1"], "hours"),
    (["--device", "V100", "--hours", "1", "--zone", "Atlantis"], "not in the shipped table"),
    (["--device", "V100", "--hours", "1", "--zone", "DK", "--g-per-kwh", "5"], "not both"),
])
def test_estimate_bad_input_is_a_clear_error(args, needle):
    r = wattprint("estimate", *args)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------- --embodied / --water (issue 16)

DATA = json.loads((Path(__file__).resolve().parent.parent / "daemon" / "data" / "footprint_factors.json")
                  .read_text(encoding="utf-8"))
YEAR_H = 365.25 * 24


def test_estimate_embodied_and_water_by_hand(tmp_path):
    config = tmp_path / "wattprint.toml"
    config.write_text('[footprint]\ngpu_kgco2e = { "H100" = 200.0 }\nservice_life_years = 4.0\n'
                      'wue_l_per_kwh = 0.5\newif_l_per_kwh = 2.0\n')
    r = wattprint("estimate", "--device", "H100:8", "--device", "300:2:0.5", "--hours", "48", "--pue", "1.5",
                  "--g-per-kwh", "100", "--embodied", "--water", "--config", str(config), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    # H100 SXM is rated 700 W (NVIDIA datasheet): (700 x 8 + 300 x 2 x 0.5) W x 48 h = 283.2 kWh
    assert doc["energy_kwh"] == pytest.approx(283.2)
    # Boards occupied for the whole run: 8 x 200 kg + 2 x the datacenter class default, 48 h of 4 years
    default_kg = DATA["gpu_classes"]["datacenter"]["embodied"]["value"]
    h100_g = 8 * 200_000 * 48 / (4 * YEAR_H)
    watts_g = 2 * default_kg * 1000 * 48 / (4 * YEAR_H)
    assert doc["embodied_co2e_g"] == pytest.approx(h100_g + watts_g, abs=0.001)
    assert doc["water_l"] == pytest.approx(283.2 * (0.5 + 1.5 * 2.0))  # 991.2 L
    devices = doc["lifecycle"]["devices"]
    assert [d["embodied_co2e_g"] for d in devices] == [pytest.approx(h100_g, abs=0.001),
                                                       pytest.approx(watts_g, abs=0.001)]
    by_name = {f["name"]: f for f in doc["lifecycle"]["factors"]}
    assert by_name["gpu:H100-SXM"]["source"] == 'config: [footprint] gpu_kgco2e."H100"'
    watts = by_name["gpu:(given in watts)"]
    assert watts["default"] is True and watts["value"] == default_kg and "given in watts" in watts["source"]
    assert by_name["service_life"]["value"] == 4.0 and by_name["service_life"]["version"] == "config"
    assert by_name["ewif"]["value"] == 2.0 and by_name["wue"]["source"] == "config: [footprint] wue_l_per_kwh"
    # the operational figures are unchanged by the flags
    assert doc["co2e_g"] == pytest.approx(283.2 * 1.5 * 100)


def test_estimate_lifecycle_uses_the_shipped_factors_and_the_zone(tmp_path):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    r = wattprint("estimate", "--device", "A100-SXM:4", "--hours", "10", "--zone", "US", "--water", "--embodied",
                  "--config", str(empty), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    a100 = next(m for m in DATA["gpu_models"] if "A100" in m["match"])["embodied"]["value"]
    life_y = DATA["service_life"]["value"]
    assert doc["embodied_co2e_g"] == pytest.approx(4 * a100 * 1000 * 10 / (life_y * YEAR_H), abs=0.001)
    # A100 SXM rated 400 W: 4 x 400 W x 10 h = 16 kWh; PUE 1
    assert doc["energy_kwh"] == pytest.approx(16.0)
    assert doc["water_l"] == pytest.approx(16.0 * (DATA["wue"]["value"] + DATA["ewif"]["zones"]["US"]["value"]))
    versions = {f["version"] for f in doc["lifecycle"]["factors"]}
    assert versions == {DATA["version"]}
    # no zone: the world default EWIF
    r = wattprint("estimate", "--device", "A100-SXM:4", "--hours", "10", "--g-per-kwh", "50", "--water",
                  "--config", str(empty), "--json")
    doc = json.loads(r.stdout)
    assert "embodied_co2e_g" not in doc
    assert doc["water_l"] == pytest.approx(16.0 * (DATA["wue"]["value"] + DATA["ewif"]["default"]["value"]))


def test_estimate_lifecycle_text_and_errors(tmp_path):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    r = wattprint("estimate", "--device", "RTX-4090:2", "--hours", "5", "--embodied", "--config", str(empty))
    assert r.returncode == 0, r.stderr
    assert "embodied:" in r.stdout and "water:" not in r.stdout
    assert "class default" in r.stdout  # no RTX 4090 figure in the data file
    consumer = DATA["gpu_classes"]["consumer_workstation"]["embodied"]["value"]
    grams = 2 * consumer * 1000 * 5 / (DATA["service_life"]["value"] * YEAR_H)
    assert f"embodied:  {round(grams, 3):g} g CO2e" in r.stdout
    plain = wattprint("estimate", "--device", "RTX-4090:2", "--hours", "5", "--json")
    assert "embodied_co2e_g" not in json.loads(plain.stdout) and "lifecycle" not in json.loads(plain.stdout)
    bad = tmp_path / "bad.toml"
    bad.write_text("[footprint]\nwue_l_per_kwh = -1\n")
    r = wattprint("estimate", "--device", "V100", "--hours", "1", "--water", "--config", str(bad))
    assert r.returncode == 2 and "wue_l_per_kwh" in r.stderr and "Traceback" not in r.stderr
