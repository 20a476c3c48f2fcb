"""Intensity series: lookup, merge (actual beats forecast, newer fetch wins) and the
lowest-intensity window, including a brute-force cross-check."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wattprint.daemon.grid.base import IntensityPoint
from wattprint.daemon.grid.series import covers, intensity_at, lowest_window, merge, slot_at

UTC = timezone.utc
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def pt(minute: int, g: float, kind: str = "actual", width_min: int = 30) -> IntensityPoint:
    start = T0 + timedelta(minutes=minute)
    return IntensityPoint(start=start, end=start + timedelta(minutes=width_min), g_per_kwh=g, kind=kind,  # type: ignore[arg-type]
                          zone="GB", provider="test")


def at(minute: float) -> datetime:
    return T0 + timedelta(minutes=minute)


# -- intensity_at ---------------------------------------------------------------------

def test_intensity_at_covering_point():
    series = [pt(0, 100), pt(30, 200), pt(60, 300)]
    assert intensity_at(series, at(0)).g_per_kwh == 100
    assert intensity_at(series, at(29.99)).g_per_kwh == 100
    assert intensity_at(series, at(30)).g_per_kwh == 200  # [start, end): the boundary belongs to the next
    assert covers(intensity_at(series, at(75)), at(75))


def test_intensity_at_stand_in_after_gap_and_end():
    series = [pt(0, 100), pt(90, 300)]  # gap 30..90
    p = intensity_at(series, at(45))
    assert p.g_per_kwh == 100 and not covers(p, at(45))  # latest before t stands in
    late = intensity_at(series, at(600))
    assert late.g_per_kwh == 300 and not covers(late, at(600))


def test_intensity_at_before_series_or_empty():
    assert intensity_at([pt(30, 1)], at(0)) is None
    assert intensity_at([], at(0)) is None


# -- slot_at ----------------------------------------------------------------------------

def test_slot_at_is_the_covering_interval():
    series = [pt(0, 100, width_min=5), pt(5, 300, width_min=5)]
    assert slot_at(series, at(0), 300) == (at(0), at(5))
    assert slot_at(series, at(4.99), 300) == (at(0), at(5))
    assert slot_at(series, at(5), 300) == (at(5), at(10))  # [start, end): the boundary belongs to the next


def test_slot_at_in_a_gap_or_past_the_end_follows_the_last_points_grid():
    series = [pt(0, 100), pt(120, 300)]  # 30-minute points, a gap 30..120
    assert slot_at(series, at(45), 300) == (at(30), at(60))
    assert slot_at(series, at(100), 300) == (at(90), at(120))
    assert slot_at(series, at(110.5), 300) == (at(90), at(120))
    assert slot_at(series, at(151), 300) == (at(150), at(180))  # past the end
    assert slot_at([pt(0, 1), pt(40, 2)], at(35), 300) == (at(30), at(40))  # cut at the next point's start


def test_slot_at_without_an_earlier_point_uses_the_default_grid():
    assert slot_at([], at(7), 300) == (at(5), at(10))
    assert slot_at([pt(8, 1)], at(7), 300) == (at(5), at(8))  # cut at the first point
    with pytest.raises(ValueError):
        slot_at([], at(0), 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.sampled_from([5, 15, 30, 60])), max_size=12),
       st.floats(0, 400, allow_nan=False))
def test_slot_at_always_holds_t_and_never_overlaps_another_point(raw, minute):
    series = merge([], [pt(m, 1.0, width_min=w) for m, w in raw])
    t = at(minute)
    start, end = slot_at(series, t, 300)
    assert start <= t < end
    found = intensity_at(series, t)  # the value used for t: its interval is the slot
    if found is not None and covers(found, t):
        assert start == found.start and end <= found.end
    for p in series:
        if p.start > t:
            assert end <= p.start


def test_intensity_at_requires_aware_time():
    with pytest.raises(ValueError):
        intensity_at([pt(0, 1)], datetime(2024, 1, 1))


# -- merge ----------------------------------------------------------------------------

def test_merge_actual_replaces_forecast():
    merged = merge([pt(0, 100, "forecast"), pt(30, 110, "forecast")], [pt(0, 90, "actual")])
    assert [(p.g_per_kwh, p.kind) for p in merged] == [(90, "actual"), (110, "forecast")]


def test_merge_forecast_never_replaces_actual():
    merged = merge([pt(0, 90, "actual")], [pt(0, 100, "forecast")])
    assert [(p.g_per_kwh, p.kind) for p in merged] == [(90, "actual")]


def test_merge_newer_fetch_wins_for_same_kind():
    assert merge([pt(0, 90, "actual")], [pt(0, 95, "actual")])[0].g_per_kwh == 95  # revised actual
    assert merge([pt(0, 100, "forecast")], [pt(0, 120, "forecast")])[0].g_per_kwh == 120  # updated forecast


def test_merge_sorts_and_keeps_inputs():
    existing = [pt(60, 3), pt(0, 1)]
    new = [pt(30, 2)]
    merged = merge(existing, new)
    assert [p.g_per_kwh for p in merged] == [1, 2, 3]
    assert [p.g_per_kwh for p in existing] == [3, 1]  # not mutated


# -- lowest_window --------------------------------------------------------------------

def test_lowest_window_aligned():
    series = [pt(0, 300), pt(30, 100), pt(60, 50), pt(90, 200), pt(120, 400)]
    w = lowest_window(series, 3600, now=at(150))
    assert (w.start, w.end, w.mean_g_per_kwh) == (at(30), at(90), 75.0)


def test_lowest_window_unaligned_duration_ends_on_a_boundary():
    # 45-minute window: 30..75 → (100*30 + 50*15)/45 = 83.3, but 45..90 → (100*15 + 50*30)/45 = 66.7:
    # the best window ends on a boundary without starting on one.
    series = [pt(0, 300), pt(30, 100), pt(60, 50), pt(90, 200)]
    w = lowest_window(series, 45 * 60, now=at(120))
    assert w.start == at(45) and w.end == at(90)
    assert w.mean_g_per_kwh == pytest.approx((100 * 15 + 50 * 30) / 45)


def test_lowest_window_skips_gaps():
    series = [pt(0, 10), pt(60, 10), pt(90, 500), pt(120, 600)]  # gap 30..60
    w = lowest_window(series, 3600, now=at(150))
    assert (w.start, w.end) == (at(60), at(120))
    assert w.mean_g_per_kwh == pytest.approx(255)


def test_lowest_window_lookback_and_forecast():
    day = 24 * 60
    series = [pt(0, 1)] + [pt(day + 30 * i, 200 - i, "actual" if i < 4 else "forecast") for i in range(8)]
    # the 1 g/kWh point is older than the lookback: ignored; the lowest is in the forecast
    w = lowest_window(series, 3600, now=at(day + 120))
    assert w.start == at(day + 180) and w.mean_g_per_kwh == pytest.approx((194 + 193) / 2)


def test_lowest_window_none_when_series_too_short():
    assert lowest_window([pt(0, 1)], 3600, now=at(30)) is None
    assert lowest_window([], 60, now=at(0)) is None
    with pytest.raises(ValueError):
        lowest_window([pt(0, 1)], 0, now=at(0))


def test_lowest_window_ties_go_to_earliest():
    series = [pt(0, 100), pt(30, 100), pt(60, 100)]
    assert lowest_window(series, 1800, now=at(90)).start == at(0)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.integers(min_value=0, max_value=500), min_size=1, max_size=12),
       gaps=st.lists(st.booleans(), min_size=12, max_size=12),
       width=st.sampled_from([5, 30]),
       duration_min=st.integers(min_value=5, max_value=120))
def test_lowest_window_matches_brute_force(values, gaps, width, duration_min):
    series, minute = [], 0
    for i, g in enumerate(values):
        if gaps[i]:
            minute += width  # leave a hole
        series.append(pt(minute, g, width_min=width))
        minute += width
    now = series[-1].end
    got = lowest_window(series, duration_min * 60, now=now, lookback_s=10 ** 7)

    # Brute force on a one-minute grid (all boundaries are whole minutes).
    best = None
    for s in range(0, minute - duration_min + 1):
        total, ok = 0.0, True
        for m in range(s, s + duration_min):
            p = intensity_at(series, at(m))
            if p is None or not covers(p, at(m)):
                ok = False
                break
            total += p.g_per_kwh
        if ok and (best is None or total / duration_min < best[1] - 1e-9):
            best = (s, total / duration_min)
    if best is None:
        assert got is None
    else:
        assert got is not None
        assert got.mean_g_per_kwh == pytest.approx(best[1], abs=1e-6)
        assert got.start == at(best[0])
