"""The health board's causes: a part degraded by two causes is ok only when both have
recovered, logs once per episode, and a cause's ``ok`` never revives a part it did not
degrade (a disabled part stays disabled)."""

from __future__ import annotations

import logging

import pytest
from wattprint.daemon.health import HealthBoard


def test_a_part_is_ok_only_when_every_cause_has_recovered(caplog: pytest.LogCaptureFixture) -> None:
    board = HealthBoard()
    board.register("node")
    with caplog.at_level(logging.INFO, logger="wattprint.health"):
        board.fail("node", "below the components", cause="accounting")
        for _ in range(3):
            board.ok("node")  # the source's clean reads
            board.fail("node", "below the components", cause="accounting")
        assert board.get("node").state == "degraded"  # type: ignore[union-attr]
        board.ok("node", cause="accounting")
        assert board.get("node").state == "ok"  # type: ignore[union-attr]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["node degraded: below the components", "node recovered"]
    assert board.get("node").errors_total == 4  # type: ignore[union-attr]


def test_both_causes_show_and_the_remaining_one_keeps_it_degraded() -> None:
    board = HealthBoard()
    board.register("node")
    board.fail("node", "read timed out")
    board.fail("node", "below the components", cause="accounting")
    assert board.get("node").detail == "read timed out; below the components"  # type: ignore[union-attr]
    board.ok("node")
    part = board.get("node")
    assert (part.state, part.detail) == ("degraded", "below the components")  # type: ignore[union-attr]


def test_a_cause_that_did_not_fail_does_not_revive_a_disabled_part() -> None:
    board = HealthBoard()
    board.register("node")
    board.disable("node", "no BMC configured")
    board.ok("node", cause="accounting")
    assert board.get("node").state == "disabled"  # type: ignore[union-attr]
