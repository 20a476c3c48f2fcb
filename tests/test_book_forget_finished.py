"""Which finished jobs leave the book each tick (issue 18: one pass over the book, sorted
only when over the cap), checked against the rule written out here: every finished job
past ``finished_grace_s`` goes; of the others, the oldest-ended go (ties by job id, a
job without an end time as ended at 0) beyond ``max_finished_in_metrics``; running jobs
always stay. And a finished job's cached totals are rebuilt when its occupancy changes."""

from __future__ import annotations

import random

from test_lifecycle import footprint, make_book
from wattprint.daemon.engine.book import _JobState
from wattprint.daemon.model import COMPONENTS, JobIdentity

WALL = 1_795_000_000.0


def _expected_kept(states: dict[str, _JobState], wall: float, grace_s: float, cap: int) -> set[str]:
    running = {j for j, st in states.items() if st.running}
    within = [(st.ended_at or 0.0, j) for j, st in states.items()
              if not st.running and not (st.ended_at is not None and wall - st.ended_at > grace_s)]
    within.sort()
    return running | {j for _, j in within[max(0, len(within) - cap):]}


def _state(job_id: str, running: bool, ended_at: float | None) -> _JobState:
    return _JobState(JobIdentity(job_id=job_id, label=job_id, label_source="WATTPRINT_JOB", uid=1000, user="u",
                                 command="sh", root_pid=1, started_at=WALL - 500.0),
                     {c: 1.0 for c in COMPONENTS}, 0.5, running=running, ended_at=ended_at)


def test_forget_finished_keeps_the_running_and_the_newest_within_grace(tmp_path):
    rng = random.Random(18)
    for case in range(200):
        tmp = tmp_path / f"c{case}"
        tmp.mkdir()
        book, ledger = make_book(tmp, footprint())
        book.finished_grace_s = rng.choice([0.0, 5.0, 60.0, 300.0])
        book.max_finished_in_metrics = rng.choice([0, 1, 3, 10, 200])
        states = {}
        for n in range(rng.randrange(0, 40)):
            running = rng.random() < 0.3
            ended = None if running or rng.random() < 0.1 else WALL - rng.choice([0.0, 1.0, 4.0, 30.0, 100.0, 400.0])
            states[f"j{n}"] = _state(f"j{n}", running, ended)
        book.jobs = dict(states)
        for j, st in states.items():
            if not st.running:
                book._finished_job_totals(j, st)  # fill the cache
        want = _expected_kept(states, WALL, book.finished_grace_s, book.max_finished_in_metrics)
        book._forget_finished(WALL)
        assert set(book.jobs) == want, case
        assert set(book._finished_totals) <= want
        ledger.close()


def test_a_finished_jobs_totals_follow_its_occupancy(tmp_path):
    book, ledger = make_book(tmp_path, footprint())
    st = _state("j1", False, WALL)
    st.occupancy["cpu"] = 10.0
    first = book._finished_job_totals("j1", st)
    assert book._finished_job_totals("j1", st) is first
    st.occupancy["cpu"] = 20.0  # truth: twice the item-seconds, twice the embodied share
    second = book._finished_job_totals("j1", st)
    assert second is not first
    assert second.embodied_co2e_g == 2 * first.embodied_co2e_g > 0
    ledger.close()
