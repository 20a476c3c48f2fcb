"""`wattprint estimate` as users run it: E = sum(P x count x U) x T and its CO2e."""

from __future__ import annotations

import json
import subprocess
import sys

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
