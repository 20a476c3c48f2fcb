"""The plain-text job report and the everyday-equivalents table: numbers rounded as
documented, equivalents computed from the shipped table, hostile labels shown on one
line with control characters visible, provisional vs final CO2e, the optional hint,
and a job object straight from a real store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wattprint.daemon.ledger import Intensity, JobTick, Ledger, LedgerReader
from wattprint.daemon.procs import JobIdentity
from wattprint.daemon.report import equivalents, fmt_sig, format_report, printable

TABLE = Path(__file__).resolve().parent.parent / "daemon" / "data" / "equivalents.json"
GIB = 1 << 30


def lora_job(**changes: object) -> dict:
    """The motivating case: a LoRA fine-tune, 0.694 kWh, 57.26 g CO2e at 82.5 g/kWh."""
    job = {
        "id": "4242-170000000000", "label": "lora-7b", "label_raw": "lora-7b", "label_sanitised": False,
        "label_source": "WATTPRINT_JOB", "host": "gpu01", "user": "alice", "uid": 1000, "command": "python",
        "root_pid": 4242, "state": "finished", "started_at": 1_700_000_000.0, "ended_at": 1_700_013_930.0,
        "last_seen": 1_700_013_930.0, "duration_s": 13_930.0,
        "energy_j": {"gpu": 2_200_000.0, "cpu": 220_000.0, "dram": 78_400.0, "total": 2_498_400.0},
        "energy_kwh": 2_498_400.0 / 3.6e6,
        "energy_sources": {"gpu": "counter", "cpu": "counter", "dram": "estimate"},
        "co2e_g": 57.26, "co2e_status": "final", "intensity_g_per_kwh_avg": 82.5, "zone": "DK2", "pue": 1.0,
        "gpu_seconds": 13_900.0, "peak_gpu_memory_bytes": 15 * GIB,
        "cost": {"amount": 0.20820, "currency": "EUR", "price_per_kwh": 0.3},
    }
    job.update(changes)
    return job


def line_with(text: str, needle: str) -> str:
    hits = [line for line in text.splitlines() if needle in line]
    assert len(hits) == 1, (needle, text)
    return hits[0]


@pytest.mark.parametrize("value, shown", [
    (0.6940, "0.694"), (57.26, "57.3"), (1234.5, "1,230"), (0.000694444, "0.000694"),
    (9.996, "10.0"), (99.96, "100"), (0.1, "0.100"), (0.0, "0"), (238.7, "239"), (-0.5, "-0.500"),
])
def test_fmt_sig_three_significant_figures(value, shown):
    assert fmt_sig(value) == shown


def test_report_numbers_are_rounded_from_the_job():
    text = format_report(lora_job())
    assert text.endswith("\n")
    assert text.startswith("Job 4242-170000000000\n")
    gpu = line_with(text, "  GPU  ")
    assert gpu.split() == ["GPU", "0.611", "2,200,000", "counter"]  # 2.2 MJ = 0.6111 kWh
    assert line_with(text, "  CPU  ").split() == ["CPU", "0.0611", "220,000", "counter"]
    assert line_with(text, "  DRAM  ").split() == ["DRAM", "0.0218", "78,400", "estimate"]  # 0.021777 kWh
    assert line_with(text, "total").split() == ["total", "0.694", "2,500,000"]
    assert "CO2e          57.3 g (final)" in text
    assert "82.5 gCO2e/kWh average, zone DK2, PUE 1.00" in text
    assert "duration 3:52:10 (13,930.0 s)" in text
    assert "3.86 GPU-hours" in text  # 13,900 s
    assert "Peak GPU mem  15.00 GiB" in text
    assert "Cost          0.21 EUR at 0.3 EUR/kWh" in text
    assert "started  2023-11-14 22:13:20 UTC" in text
    assert "ended    2023-11-15 02:05:30 UTC" in text
    assert "Carbon-aware hint" not in text


def test_equivalents_are_computed_from_the_shipped_table():
    table = json.loads(TABLE.read_text())["equivalents"]
    got = equivalents(0.694, 57.26)
    assert [e["id"] for e in got] == [e["id"] for e in table]
    for entry, eq in zip(table, got):
        amount = 0.694 if entry["basis"] == "kWh" else 57.26
        assert eq["count"] == pytest.approx(amount / entry["per_unit"], rel=1e-12)
        assert eq["basis"] == entry["basis"] and eq["source"] == entry["source"]
    by_id = {e["id"]: e["count"] for e in got}
    assert by_id["image_generations"] == pytest.approx(0.694 / 0.002907)  # 2.907 Wh each
    assert by_id["led_bulb_hours"] == pytest.approx(69.4)  # 10 W
    assert by_id["car_km"] == pytest.approx(57.26 / (400 / 1.609344), rel=1e-4)  # EPA 400 g/mile

    text = format_report(lora_job())
    for eq in equivalents(lora_job()["energy_kwh"], 57.26):
        assert line_with(text, eq["text"]).split()[0] == fmt_sig(eq["count"])
    assert line_with(text, "AI image generations").split()[0] == "239"
    assert line_with(text, "km driven").split()[0] == "0.230"


def test_every_equivalent_names_its_source_or_says_it_is_arithmetic():
    for entry in json.loads(TABLE.read_text())["equivalents"]:
        assert entry["basis"] in ("kWh", "gCO2e") and entry["per_unit"] > 0 and entry["text"]
        src = entry["source"]
        if src is None:
            assert "arithmetic" in entry["note"].lower()
        else:
            assert src["name"] and src["url"].startswith("https://") and 1990 < src["year"] < 2100


def test_control_characters_in_untrusted_text_are_visible_on_one_line():
    hostile = "train\x1b[2J\nrm -rf /\r\tok\x00\u2028end"
    plain = format_report(lora_job())
    text = format_report(lora_job(label=hostile, user="bob\nroot", command="py\x07thon"))
    assert len(text.splitlines()) == len(plain.splitlines())  # nothing added a line
    for ch in "\x1b\r\t\x00\x07\u2028":
        assert ch not in text
    assert line_with(text, "label").strip() == r"label    train\x1b[2J\nrm -rf /\r\tok\x00\u2028end"
    assert line_with(text, "user").strip() == r"user     bob\nroot"
    assert line_with(text, "command").strip() == r"command  py\x07thon"


def test_sanitised_label_shows_what_was_set():
    text = format_report(lora_job(label="my_job_", label_raw="my job\n", label_sanitised=True))
    assert r"as set   my job\n (sanitised for export)" in text


def test_printable_cuts_long_text():
    assert printable("a" * 300, 10) == "a" * 9 + "…"
    assert printable("short", 10) == "short"


def test_provisional_and_final():
    assert "(final)" in format_report(lora_job())
    text = format_report(lora_job(co2e_status="provisional"))
    assert "(provisional:" in line_with(text, "CO2e ")
    assert "revised when realised values arrive" in text


def test_running_job_zero_energy_and_no_price():
    job = lora_job(state="running", ended_at=None, energy_j={"gpu": 0.0, "cpu": 0.0, "dram": 0.0, "total": 0.0},
                   energy_kwh=0.0, energy_sources={}, co2e_g=0.0, intensity_g_per_kwh_avg=None, gpu_seconds=0.0,
                   peak_gpu_memory_bytes=0, cost={"amount": 0.0, "currency": "EUR", "price_per_kwh": 0.0})
    text = format_report(job)
    assert "ended    - (still running)" in text
    assert line_with(text, "  GPU  ").split() == ["GPU", "0", "0", "-"]
    assert "no average (no energy yet)" in text
    assert "Cost          not configured ([accounting] price_per_kwh)" in text


def test_series_and_hint_blocks():
    series = [{"g_per_kwh": 61.04, "intensity_status": "final"},
              {"g_per_kwh": 104.2, "intensity_status": "provisional"},
              {"g_per_kwh": None, "intensity_status": "missing"}]
    hint = {"window_start": 1_700_050_000.0, "co2e_g": 41.04, "g_per_kwh": 62.13, "saving_g": 16.22}
    text = format_report(lora_job(), series, hint)
    assert "range 61.0-104 gCO2e/kWh over 3 bucket(s), 1 provisional, 1 without intensity yet" in text
    block = text.split("Carbon-aware hint\n", 1)[1]
    assert block == ("  Started at 2023-11-15 12:06:40 UTC, this job would have emitted about "
                     "41.0 g CO2e (62.1 gCO2e/kWh): 16.2 g less.\n")


def test_report_of_a_job_object_from_a_real_store(tmp_path):
    """The report reads exactly the fields LedgerReader produces."""
    path = str(tmp_path / "s.sqlite3")
    ledger = Ledger(path, host="h", bucket_s=60)
    ident = JobIdentity(job_id="77-1", label="real", label_source="WATTPRINT_JOB", uid=1000, user="alice",
                        command="python", root_pid=77, started_at=6000.0, label_raw="real")
    for i in range(90):
        ledger.record_tick(6000.0 + i,
                           [JobTick(ident, {"gpu": 40.0, "cpu": 4.0, "dram": 0.0}, gpu_seconds=1.0,
                                    gpu_memory_bytes=3 * GIB, sources={"gpu": "counter", "cpu": "estimate"})],
                           [("gpu", "gpu0", 40.0, "counter"), ("cpu", "cpu", 4.0, "estimate")], {},
                           Intensity(100.0, "provisional", "static", "DK1", "forecast"))
    ledger.close()
    reader = LedgerReader(path, pue=1.2, price_per_kwh=0.5, currency="DKK")
    job = reader.job("77-1", now=7000.0)
    series = reader.job_series("77-1")
    reader.close()
    text = format_report(job, series)
    kwh = 90 * 44.0 / 3.6e6
    assert line_with(text, "total").split()[1] == fmt_sig(kwh) == "0.00110"
    assert line_with(text, "  GPU  ").split()[1:] == [fmt_sig(90 * 40.0 / 3.6e6), "3,600", "counter"]
    assert line_with(text, "  CPU  ").split()[-1] == "estimate"
    assert f"CO2e          {fmt_sig(kwh * 100.0 * 1.2)} g (provisional:" in text
    assert "zone DK1, PUE 1.20" in text
    assert "Peak GPU mem  3.00 GiB" in text
    assert f"{fmt_sig(kwh * 1.2 * 0.5)} DKK at 0.5 DKK/kWh x PUE 1.20" in text
    assert "over 2 bucket(s), 2 provisional" in text


def test_lifecycle_section_names_every_figure_and_factor():
    """Issue 16: the job's embodied, SCI, market-based CO2e and water beside the
    operational CO2e, its occupancy and every factor with unit, source and version
    (a class default marked as such); the SCI's gCO2e equivalents too."""
    factors = [
        {"name": "gpu:NVIDIA H200", "value": 150.0, "unit": "kgCO2e/device", "source": "class default (datacenter)",
         "version": "2026.12.1", "default": True},
        {"name": "service_life", "value": 5.0, "unit": "year", "source": "config: [footprint] service_life_years",
         "version": "config", "default": False},
    ]
    job = lora_job(embodied_co2e_g=12.34, co2e_market_g=40.0, water_l=1.5, sci_g=57.26 + 12.34,
                   occupancy_s={"gpu:NVIDIA H200": 27_800.0, "cpu": 13_900.0}, factors=factors)
    text = format_report(job)
    block = text.split("Lifecycle\n", 1)[1].split("\n\n", 1)[0]
    assert line_with(block, "  embodied ").split()[1:3] == ["12.3", "g"]
    assert line_with(block, "SCI").split()[1:3] == [fmt_sig(57.26 + 12.34), "g"]
    assert line_with(block, "market-based").split()[1:3] == ["40.0", "g"]
    assert line_with(block, "  water ").split()[1:3] == ["1.50", "L"]
    assert line_with(block, "board-s").split() == ["gpu:NVIDIA", "H200", "27,800", "board-s"]
    assert line_with(block, "    cpu").split()[-2:] == ["13,900", "socket-s"]
    assert "[class default: model not in the data file]" in line_with(block, "kgCO2e/device")
    assert "config: [footprint] service_life_years (version config)" in block
    assert "with embodied carbon (SCI" in text
    # a job object without lifecycle fields (an older daemon's answer) has no section
    assert "Lifecycle" not in format_report(lora_job())
