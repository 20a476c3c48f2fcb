"""Finished jobs' totals in the snapshot (issue 18): up to ``max_finished_in_metrics``
finished jobs are in every tick's snapshot; their ``JobTotals`` (lifecycle figures
included) are built again only when what they are computed from changed: a settlement
(CO2e), a node gap's remainder booked to a job that has ended (energy); and the cache
leaves with the job."""

from __future__ import annotations

import pytest
from test_lifecycle import (
    CONTRACT,
    EWIF,
    PUE,
    RESIDUAL,
    STATIC,
    WUE,
    cpu,
    footprint,
    gpu,
    make_book,
    mem_proc,
    view,
)
from wattprint.daemon.attribution import attribute

T0 = 1_795_000_000.0
G_PER_KWH = 300.0  # STATIC


def _truth_water_l(energy_j: float) -> float:
    return energy_j / 3.6e6 * (WUE + PUE * EWIF)


def _truth_market_g(energy_j: float) -> float:
    return PUE * energy_j / 3.6e6 * (0.6 * CONTRACT + 0.4 * RESIDUAL)


def test_a_finished_jobs_totals_are_reused_until_their_inputs_change(tmp_path):
    book, ledger = make_book(tmp_path, footprint())
    both = view({1: (0.5, 0), 2: (0.5, 0)}, cpu_busy_s=1.0, cpu_total_s=2.0)
    readings = [gpu("gpu0", 300.0, (mem_proc(10, 4), mem_proc(20, 4))), cpu(40.0)]
    # j1 and j2 share gpu0 by memory (150 J each) and each has 0.5 of the CPU's 2.0 CPU-s (40 x 0.5 / 2)
    for k in range(3):
        booked = book.book_tick(T0 + k, readings, both, attribute(readings, both), STATIC, 1.0)
        ledger.record_ticks([booked.row])
    only1 = view({1: (0.5, 0)}, cpu_busy_s=0.5, cpu_total_s=2.0)
    readings1 = [gpu("gpu0", 300.0, (mem_proc(10, 4),)), cpu(40.0)]

    def tick(k: int, extra_j2: float = 0.0):  # j2 has ended; extra: a node remainder share booked to it
        att = attribute(readings1, only1)
        if extra_j2:
            att.job_energy_j["j2"] = {"other": extra_j2}
        booked = book.book_tick(T0 + k, readings1, only1, att, STATIC, 1.0)
        ledger.record_ticks([booked.row])
        return book.snapshot(T0 + k, STATIC.lookup(T0 + k), 0.0, 0.0, (), {}, {})

    a, b = tick(3), tick(4)
    ja, jb = ({j.job_id: j for j in s.jobs} for s in (a, b))
    assert ja["j2"].state == "finished" and ja["j2"] is jb["j2"]  # the same object: not built again
    assert ja["j1"] is not jb["j1"] and jb["j1"].energy_j["gpu"] > ja["j1"].energy_j["gpu"]
    e2 = 3 * (150.0 + 40.0 * 0.5 / 2.0)
    assert sum(jb["j2"].energy_j.values()) == pytest.approx(e2)
    assert jb["j2"].water_l == pytest.approx(_truth_water_l(e2), rel=1e-9)

    # A node gap's remainder booked to the ended job: its totals follow at once.
    jc = {j.job_id: j for j in tick(5, extra_j2=36.0).jobs}
    assert jc["j2"] is not jb["j2"]
    assert jc["j2"].energy_j["other"] == pytest.approx(36.0)
    assert jc["j2"].co2e_g == pytest.approx((e2 + 36.0) / 3.6e6 * G_PER_KWH * PUE, rel=1e-9)
    assert jc["j2"].water_l == pytest.approx(_truth_water_l(e2 + 36.0), rel=1e-9)
    assert jc["j2"].co2e_market_g == pytest.approx(_truth_market_g(e2 + 36.0), rel=1e-9)

    # A settlement rewrites its CO2e (as JobBook.settle does): restated (the market has a
    # residual factor here, so its market-based grams stay those of its energy).
    book.jobs["j2"].co2e_g = 2.5
    jd = {j.job_id: j for j in tick(6).jobs}
    assert jd["j2"].co2e_g == 2.5 and jd["j2"] is not jc["j2"]
    assert jd["j2"].co2e_market_g == pytest.approx(_truth_market_g(e2 + 36.0), rel=1e-9)

    # Past the grace period the job leaves the snapshot, and its cached totals with it.
    late = book.snapshot(T0 + 6 + 301.0, STATIC.lookup(T0 + 307.0), 0.0, 0.0, (), {}, {})
    assert [j.job_id for j in late.jobs] == ["j1"]
    assert book._finished_totals == {}
    ledger.close()


def test_finished_jobs_beyond_the_cap_leave_the_cache_too(tmp_path):
    book, ledger = make_book(tmp_path, footprint())
    book.max_finished_in_metrics = 1
    readings = [cpu(40.0)]
    for n in (1, 2, 3):  # one job after another, each ends when the next starts
        v = view({n: (0.5, 0)}, cpu_busy_s=0.5, cpu_total_s=2.0)
        booked = book.book_tick(T0 + n, readings, v, attribute(readings, v), STATIC, 1.0)
        ledger.record_ticks([booked.row])
        snap = book.snapshot(T0 + n, STATIC.lookup(T0 + n), 0.0, 0.0, (), {}, {})
    assert sorted((j.job_id, j.state) for j in snap.jobs) == [("j2", "finished"), ("j3", "running")]
    assert sorted(book._finished_totals) == ["j2"]
    ledger.close()
