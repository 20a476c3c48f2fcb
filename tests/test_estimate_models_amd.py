"""`wattprint estimate`'s model table knows AMD Instinct (MI250X, MI300X, MI325X) and
NVIDIA Blackwell (B200, GB200), with the vendors' rated board power (sources in
daemon/data/gpu_rated_power.json: AMD's specification pages, NVIDIA's Blackwell datasheets)."""

from __future__ import annotations

import pytest
from wattprint.daemon.plan import estimate, find_model


@pytest.mark.parametrize("name, model, watts", [
    ("MI250X", "MI250X", 560.0),  # AMD: TBP 500 W, 560 W peak
    ("AMD Instinct MI300X", "MI300X", 750.0),  # AMD: TBP 750 W peak; amdsmi's market name
    ("mi325x", "MI325X", 1000.0),  # AMD: TBP 1000 W peak
    ("NVIDIA B200", "B200", 1000.0),  # HGX B200: up to 1,000 W
    ("GB200", "GB200", 1200.0),  # GB200 NVL72: up to 1,200 W per Blackwell GPU
])
def test_new_models_and_their_rated_power(name, model, watts):
    m = find_model(name)
    assert (m.model, m.rated_w) == (model, watts)
    assert "AMD" in m.source or "NVIDIA" in m.source


def test_estimate_with_an_mi300x_box():
    # 8 x MI300X at 50 % for 2 h: 8 x 750 W x 0.5 x 2 h = 6 kWh.
    result = estimate(["MI300X:8:0.5"], hours=2.0, g_per_kwh=100.0)
    assert result.energy_kwh == pytest.approx(6.0)
    assert result.co2e_g == pytest.approx(600.0)
