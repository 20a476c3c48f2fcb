"""CounterDiff (daemon/sources/base.py), on its own: every boundary of ``step``, with
and without a physics bound, with the expected increase worked out here from the
counter values written, and a property test that a counter advanced by known amounts (wrapping like RAPL's)
is read back exactly. The RAPL source's use of it is in tests/test_rapl.py."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from wattprint.daemon.sources.base import CounterDiff, CounterStep, CounterStepKind, SourceError

FIRST, DIFFERENCE, WRAPPED, RESET, IMPLAUSIBLE = (
    CounterStepKind.FIRST, CounterStepKind.DIFFERENCE, CounterStepKind.WRAPPED, CounterStepKind.RESET,
    CounterStepKind.IMPLAUSIBLE)


def counts(d: CounterDiff) -> tuple[int, int, int]:
    return (d.wraps, d.resets, d.implausible)


# -- step without a physics bound (the GPU sources' path: every wrap accepted) ----------


def test_unbounded_first_reading_is_the_baseline() -> None:
    d = CounterDiff(max_value=1000)
    assert d.step(400) == CounterStep(FIRST)
    assert d.last == 400 and counts(d) == (0, 0, 0)


def test_unbounded_equal_value_is_zero_not_a_wrap() -> None:
    d = CounterDiff(max_value=1000, last=400)
    assert d.step(400) == CounterStep(DIFFERENCE, 0)
    assert counts(d) == (0, 0, 0)


def test_unbounded_increase_and_wrap_are_exact() -> None:
    d = CounterDiff(max_value=1000, last=400)
    assert d.step(650) == CounterStep(DIFFERENCE, 250)
    assert d.step(30) == CounterStep(WRAPPED, (1000 - 650) + 30)  # 380
    assert d.last == 30 and counts(d) == (1, 0, 0)


def test_without_a_range_going_down_is_a_reset_not_a_first_reading() -> None:
    # The old ``update`` said None for both: a caller could not tell them apart.
    for max_value in (None, 0):  # 0: an unusable range, as good as none
        d = CounterDiff(max_value=max_value, last=500)
        assert d.step(499) == CounterStep(RESET)
        assert d.last == 499 and counts(d) == (0, 1, 0)
        assert d.step(510) == CounterStep(DIFFERENCE, 11)  # the value after the reset is the new baseline


def test_unbounded_smallest_positive_range_still_wraps_and_resets_add_up() -> None:
    d = CounterDiff(max_value=1, last=1)
    assert d.step(0) == CounterStep(WRAPPED, (1 - 1) + 0) and counts(d) == (1, 0, 0)
    never = CounterDiff(max_value=None, last=9)
    assert never.step(5) == CounterStep(RESET) and never.step(2) == CounterStep(RESET)
    assert counts(never) == (0, 2, 0)


# -- step (RAPL's path: typed, and bounded by physics) ----------------------------------


def test_step_first_reading() -> None:
    d = CounterDiff(max_value=1000)
    assert d.step(7, max_delta=1) == CounterStep(FIRST)
    assert d.last == 7 and counts(d) == (0, 0, 0)


def test_step_difference_up_to_the_bound_inclusive() -> None:
    d = CounterDiff(max_value=1000, last=100)
    assert d.step(100, max_delta=50) == CounterStep(DIFFERENCE, 0)
    assert d.step(150, max_delta=50) == CounterStep(DIFFERENCE, 50)  # exactly the bound
    assert d.step(201, max_delta=50) == CounterStep(IMPLAUSIBLE, reason="jump")  # one over
    assert d.last == 201 and counts(d) == (0, 0, 1)
    assert d.step(202, max_delta=None) == CounterStep(DIFFERENCE, 1)  # no bound


def test_step_value_at_the_top_of_the_range_is_in_range() -> None:
    d = CounterDiff(max_value=1000, last=990)
    assert d.step(1000, max_delta=50) == CounterStep(DIFFERENCE, 10)
    assert d.step(1001, max_delta=50) == CounterStep(IMPLAUSIBLE, reason="above_range")
    assert counts(d) == (0, 0, 1)


def test_step_wrap_from_the_top_of_the_range() -> None:
    d = CounterDiff(max_value=1000, last=1000)  # prev == max: still in range
    assert d.step(5, max_delta=50) == CounterStep(WRAPPED, 5)  # (1000 - 1000) + 5
    assert counts(d) == (1, 0, 0)


def test_step_wrap_up_to_the_bound_inclusive() -> None:
    d = CounterDiff(max_value=1000, last=980)
    assert d.step(30, max_delta=50) == CounterStep(WRAPPED, 50)  # (1000 - 980) + 30: the bound
    d = CounterDiff(max_value=1000, last=980)
    assert d.step(31, max_delta=50) == CounterStep(IMPLAUSIBLE, reason="backwards")
    assert d.last == 31 and counts(d) == (0, 0, 1)
    d = CounterDiff(max_value=1000, last=980)
    assert d.step(31, max_delta=None) == CounterStep(WRAPPED, 51)


def test_step_from_above_the_range_is_never_a_wrap() -> None:
    d = CounterDiff(max_value=1000, last=1500)
    assert d.step(10, max_delta=None) == CounterStep(IMPLAUSIBLE, reason="above_range")
    assert d.last == 10 and counts(d) == (0, 0, 1)
    assert d.step(20, max_delta=None) == CounterStep(DIFFERENCE, 10)


def test_step_without_a_range_going_down_is_a_reset() -> None:
    for max_value in (None, 0):
        d = CounterDiff(max_value=max_value, last=500)
        assert d.step(10**12, max_delta=None) == CounterStep(DIFFERENCE, 10**12 - 500)  # no range to exceed
        assert d.step(3, max_delta=10) == CounterStep(RESET)
        assert d.last == 3 and counts(d) == (0, 1, 0)
        assert d.step(8, max_delta=10) == CounterStep(DIFFERENCE, 5)


def test_step_smallest_positive_range_still_wraps_and_resets_add_up() -> None:
    d = CounterDiff(max_value=1, last=1)
    assert d.step(0, max_delta=5) == CounterStep(WRAPPED, 0) and counts(d) == (1, 0, 0)
    never = CounterDiff(max_value=None, last=9)
    assert never.step(5).kind is RESET and never.step(2).kind is RESET
    assert counts(never) == (0, 2, 0)


def test_counter_step_defaults() -> None:
    step = CounterStep(RESET)
    assert (step.delta, step.reason) == (None, "")


def test_source_error_carries_detail() -> None:
    err = SourceError("zone gone")
    assert (str(err), err.detail) == ("zone gone", "zone gone")


# -- property: a wrapping counter advanced by known amounts reads back exactly -----------


@settings(max_examples=150, deadline=None)
@given(
    max_value=st.integers(1, 10**6),
    start=st.integers(0, 10**6),
    steps=st.lists(st.integers(0, 10**6), min_size=1, max_size=40),
)
def test_known_increments_are_recovered_with_and_without_a_bound(max_value: int, start: int,
                                                                 steps: list[int]) -> None:
    start %= max_value + 1
    steps = [s % max_value for s in steps]  # less than one whole range between two reads
    upd, stp = CounterDiff(max_value=max_value), CounterDiff(max_value=max_value)
    assert upd.step(start).kind is FIRST and stp.step(start).kind is FIRST
    value, wraps = start, 0
    for inc in steps:
        # The counter wraps modulo max_value: the increase is (max - prev) + new.
        new = value + inc
        if new > max_value:
            new -= max_value
            wraps += 1
        free = upd.step(new)
        assert free.delta == inc and free.kind in (DIFFERENCE, WRAPPED)
        got = stp.step(new, max_delta=inc)
        assert got.delta == inc and got.kind in (DIFFERENCE, WRAPPED)
        value = new
    assert upd.wraps == stp.wraps == wraps
    assert (upd.resets, stp.resets, stp.implausible) == (0, 0, 0)
