"""IntensityBook (daemon/carbon.py) field by field: every value, status, basis and slot
of ``lookup``, the memory window of ``update`` and the numbers of the carbon-aware
``hint``; the expected figures are computed here from the points this test wrote
(issue 13: mutation testing of the carbon arithmetic, scripts/mutation.sh)."""

from __future__ import annotations

from datetime import datetime, timezone


from wattprint.daemon.carbon import FALLBACK_SLOT_S, KEEP_S, IntensityBook
from wattprint.daemon.config import GridConfig
from wattprint.daemon.grid.base import IntensityPoint
from wattprint.daemon.ledger import Intensity

T0 = 1_795_003_200  # an hour boundary
STEP = 300


def pt(k: int, g: float, kind: str = "forecast", width: int = STEP) -> IntensityPoint:
    return IntensityPoint(start=datetime.fromtimestamp(T0 + STEP * k, timezone.utc),
                          end=datetime.fromtimestamp(T0 + STEP * k + width, timezone.utc),
                          g_per_kwh=g, kind=kind, zone="DK1", provider="energidataservice")  # type: ignore[arg-type]


def book(fallback: float = 250.0) -> IntensityBook:
    return IntensityBook(GridConfig(static_g_per_kwh=fallback), "energidataservice", "DK1")


def test_static_book_is_final_without_slot_and_has_no_hint():
    b = IntensityBook(GridConfig(static_g_per_kwh=999.0), "static", "DE", static_g_per_kwh=321.0)
    assert b.is_static is True
    assert b.lookup(T0 + 17.0) == Intensity(321.0, "final", "static", "DE", "static", None, None)
    assert b.hint(energy_j=7200000.0, duration_s=600.0, job_co2e_g=642.0, pue=1.0, now_s=T0) is None
    assert book().is_static is False


def test_every_field_of_each_kind_of_lookup():
    b = book(fallback=250.0)
    assert b.lookup(T0 + 1234.5) == Intensity(250.0, "provisional", "energidataservice", "DK1", "fallback",
                                              float(T0 + 1200), float(T0 + 1200 + FALLBACK_SLOT_S))
    b.update([pt(0, 80.0, "actual"), pt(1, 300.0, "forecast")], now_s=T0)
    assert b.lookup(T0 + 10.0) == Intensity(80.0, "final", "energidataservice", "DK1", "actual",
                                            float(T0), float(T0 + STEP))
    assert b.lookup(T0 + STEP + 299.0) == Intensity(300.0, "provisional", "energidataservice", "DK1", "forecast",
                                                    float(T0 + STEP), float(T0 + 2 * STEP))
    # Past the series: the latest value stands in, on its own 5-minute grid.
    assert b.lookup(T0 + 2 * STEP) == Intensity(300.0, "provisional", "energidataservice", "DK1", "latest",
                                                float(T0 + 2 * STEP), float(T0 + 3 * STEP))
    # Before the series: nothing known for that moment, the fallback on the epoch grid.
    assert b.lookup(T0 - 1.0) == Intensity(250.0, "provisional", "energidataservice", "DK1", "fallback",
                                           float(T0 - FALLBACK_SLOT_S), float(T0))


def test_update_merges_and_keeps_four_days():
    b = book()
    b.update([pt(0, 100.0), pt(1, 200.0)], now_s=T0)
    b.update([pt(1, 150.0, "actual"), pt(2, 120.0)], now_s=T0)
    assert [(p.start.timestamp(), p.g_per_kwh, p.kind) for p in b.points()] == [
        (T0, 100.0, "forecast"), (T0 + STEP, 150.0, "actual"), (T0 + 2 * STEP, 120.0, "forecast")]
    copy = b.points()
    copy.clear()  # a copy: the book is unchanged
    assert len(b.points()) == 3
    # Slot 0 ends at T0 + 300: at now = that + KEEP_S it is exactly at the cutoff (dropped);
    # slot 1 ends 300 s later (kept).
    b.update([], now_s=T0 + STEP + KEEP_S)
    assert [p.start.timestamp() for p in b.points()] == [T0 + STEP, T0 + 2 * STEP]
    b.update([], now_s=T0 + 2 * STEP + KEEP_S - 1.0)  # slot 1 ends a second after the cutoff
    assert [p.start.timestamp() for p in b.points()] == [T0 + STEP, T0 + 2 * STEP]
    b.update([], now_s=T0 + 2 * STEP + KEEP_S)
    assert [p.start.timestamp() for p in b.points()] == [T0 + 2 * STEP]


def test_hint_is_the_lowest_window_of_the_jobs_length():
    b = book()
    b.update([pt(0, 400.0), pt(1, 100.0), pt(2, 300.0), pt(3, 500.0)], now_s=T0)
    now = T0 + 4 * STEP
    # A 10-minute job of 2 kWh (7.2 MJ): the lowest 600 s window is [T0 + 300, T0 + 900) at (100 + 300) / 2.
    h = b.hint(energy_j=7200000.0, duration_s=600.0, job_co2e_g=1000.0, pue=1.5, now_s=now)
    assert h == {"window_start": float(T0 + STEP), "window_end": float(T0 + 3 * STEP),
                 "g_per_kwh": 200.0, "co2e_g": 2.0 * 200.0 * 1.5, "saving_g": 1000.0 - 600.0}
    # A job that did better than the window saves nothing (never negative).
    h = b.hint(energy_j=7200000.0, duration_s=600.0, job_co2e_g=500.0, pue=1.5, now_s=now)
    assert h is not None and h["saving_g"] == 0.0 and h["co2e_g"] == 600.0
    # No energy, no duration, a window longer than the series: no hint.
    assert b.hint(energy_j=0.0, duration_s=600.0, job_co2e_g=1.0, pue=1.0, now_s=now) is None
    assert b.hint(energy_j=-3600000.0, duration_s=600.0, job_co2e_g=1.0, pue=1.0, now_s=now) is None
    assert b.hint(energy_j=3600000.0, duration_s=0.0, job_co2e_g=1.0, pue=1.0, now_s=now) is None
    assert b.hint(energy_j=3600000.0, duration_s=-5.0, job_co2e_g=1.0, pue=1.0, now_s=now) is None
    assert b.hint(energy_j=3600000.0, duration_s=4 * STEP + 1.0, job_co2e_g=1.0, pue=1.0, now_s=now) is None
    # A tiny energy and duration still get a hint (the bounds are > 0, not >= 1).
    h = b.hint(energy_j=1800000.0, duration_s=0.5, job_co2e_g=1.0, pue=1.0, now_s=now)
    assert h is not None and h["g_per_kwh"] == 100.0 and h["co2e_g"] == 50.0
    # "now" sets the look-back: a day after the series' end, nothing is left to look at.
    assert b.hint(energy_j=3600000.0, duration_s=600.0, job_co2e_g=1.0, pue=1.0, now_s=T0 + 4 * STEP + 86400) is None
