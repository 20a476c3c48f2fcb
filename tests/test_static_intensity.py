"""Static grid intensity precedence (issue 11): an explicitly set
``[grid] static_g_per_kwh`` wins over the shipped table, whatever the zone; without
one the table's entry is used, and a zone mapped to another entry (DK1 -> DK) says
so in ``wattprint check-config`` and in the daemon's log at start. Through the REAL
daemon (/api/v1/intensity) and the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daemon_harness import DaemonProcess
from wattprint.daemon.config import GridConfig, is_set, load_config
from wattprint.daemon.grid import make_provider
from wattprint.daemon.grid.static import StaticProvider, lookup_static

DK_TABLE_G_PER_KWH = 151.65  # the shipped table's DK entry (Ember/OWID 2023)
STATIC_DK1_EXPLICIT = '[grid]\nprovider = "static"\nzone = "DK1"\nstatic_g_per_kwh = 82.5\n'
STATIC_DK1_TABLE = '[grid]\nprovider = "static"\nzone = "DK1"\n'


def check_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wattprint.daemon", "check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, env=env)


def test_table_value_is_what_the_test_expects() -> None:
    entry = lookup_static("DK1")
    assert entry is not None and (entry.code, entry.g_per_kwh) == ("DK", DK_TABLE_G_PER_KWH)


def test_explicit_value_wins_over_the_table(tmp_path: Path) -> None:
    p = tmp_path / "w.toml"
    p.write_text(STATIC_DK1_EXPLICIT)
    cfg = load_config(p, env={})
    assert is_set(cfg.grid.static_g_per_kwh) and cfg.grid.static_g_per_kwh == 82.5
    provider = make_provider(cfg.grid)
    assert isinstance(provider, StaticProvider)
    assert (provider.zone, provider.g_per_kwh) == ("DK1", 82.5)
    assert "static_g_per_kwh" in provider.source
    # Set to the default's own value, it still counts as set (and wins).
    same = load_config(None, env={"WATTPRINT_GRID_ZONE": "DK1", "WATTPRINT_GRID_STATIC_G_PER_KWH": "475"})
    assert make_provider(same.grid).g_per_kwh == 475.0
    # Not set: the table.
    assert not is_set(GridConfig().static_g_per_kwh)
    table = make_provider(GridConfig(zone="DK1"))
    assert (table.zone, table.g_per_kwh) == ("DK", DK_TABLE_G_PER_KWH)
    assert "mapped to the table's DK" in table.note
    # Set in code (GridConfig(...)): set, so it wins too.
    assert make_provider(GridConfig(zone="DK", static_g_per_kwh=60.0)).g_per_kwh == 60.0


def test_check_config_says_which_number_and_why(tmp_path: Path) -> None:
    explicit = tmp_path / "explicit.toml"
    explicit.write_text(STATIC_DK1_EXPLICIT)
    r = check_config(explicit)
    assert r.returncode == 0, r.stderr
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("# grid:")]
    assert "static intensity 82.5 gCO2e/kWh: [grid] static_g_per_kwh is set" in line
    assert "'DK1' (mapped to the table's DK, Denmark), 151.65, is not used" in line

    table = tmp_path / "table.toml"
    table.write_text(STATIC_DK1_TABLE)
    r = check_config(table)
    assert r.returncode == 0, r.stderr
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("# grid:")]
    assert "static intensity 151.65 gCO2e/kWh: zone 'DK1' (mapped to the table's DK, Denmark) from the shipped table" in line


@pytest.mark.parametrize("toml, expected", [(STATIC_DK1_EXPLICIT, 82.5), (STATIC_DK1_TABLE, DK_TABLE_G_PER_KWH)])
def test_real_daemon_uses_the_explicit_number(tmp_path: Path, toml: str, expected: float) -> None:
    daemon = DaemonProcess(tmp_path, sim_file=None, powercap_root=None, extra_toml=toml)
    try:
        daemon.start()
        body = daemon.get("/api/v1/intensity")
        assert body["provider"] == "static"
        assert body["current"]["g_per_kwh"] == expected
        assert body["zone"] == ("DK1" if expected == 82.5 else "DK")  # a table value carries the table's code
        assert {p["g_per_kwh"] for p in body["points"]} <= {expected}  # (static: no fetched series)
        m = daemon.metrics()
        assert m[("wattprint_grid_intensity_grams_per_kwh", (("provider", "static"), ("zone", body["zone"])))] == expected
        log = daemon.log_path.read_text(errors="replace")
        (line,) = [ln for ln in log.splitlines() if "wattprint: grid: static intensity" in ln]
        assert f"static intensity {expected:g} gCO2e/kWh" in line and "mapped to the table's DK" in line
        assert daemon.stop() == 0
    finally:
        daemon.kill()
