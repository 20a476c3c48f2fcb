"""/metrics with many finished jobs (issue 18): the text of a finished job's series is
kept from one tick's render to the next while the book hands over the same totals, and
the body stays byte for byte what prometheus_client's ``generate_latest`` writes, when
running and finished jobs interleave, when a finished job's figures change (a new
object), when a node appears (the ``other`` series), and with hostile labels."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from test_prometheus_exporter import NASTY, NASTY_USER
from wattprint.daemon.model import DeviceState, JobTotals, Snapshot
from wattprint.exporters import prometheus as prom
from wattprint.exporters.prometheus import build_registry, render


def job(n: int, state: str, gpu_j: float, label: str = "", user: str = "alice") -> JobTotals:
    return JobTotals(job_id=f"{n}-1", label=label or f"l{n}", user=user, uid=1000, state=state,  # type: ignore[arg-type]
                     energy_j={"gpu": gpu_j, "cpu": 2.5, "dram": 0.125, "other": 0.0},
                     co2e_g=gpu_j / 10, embodied_co2e_g=0.5, co2e_market_g=gpu_j / 20, water_l=0.01)


NODE = DeviceState(kind="node", device="bmc", name="", power_w=500.0, energy_j_total=1e6, source="counter")


def test_finished_jobs_text_is_kept_across_ticks_and_identical_to_generate_latest() -> None:
    finished = [job(100 + i, "finished", 10.0 * i, label=NASTY if i == 3 else "", user=NASTY_USER if i == 4 else "u")
                for i in range(20)]
    current: dict[str, Snapshot] = {}
    registry = build_registry(lambda: current["snap"])
    bodies = []
    for tick in range(4):
        running = [job(n, "running", 100.0 * tick + n) for n in range(3)]
        jobs = [running[0], *finished[:10], running[1], *finished[10:], running[2]]  # interleaved, as the book's dict
        if tick == 2:  # a settlement: one finished job's figures change (the book builds a new object)
            finished[5] = job(105, "finished", 999.0, user="u")
            jobs[6] = finished[5]
        devices = (NODE,) if tick == 3 else ()  # a node reading: the "other" series appear
        current["snap"] = Snapshot(taken_at=1.0 + tick, tick=tick, tick_duration_s=0.001, jobs=tuple(jobs),
                                   devices=devices)
        body = render(registry)[0]
        assert body == generate_latest(registry)
        bodies.append(body.decode())
        kept = prom._finished_job_parts
        assert sorted(kept) == sorted(id(j) for j in finished)  # the finished jobs, and only they
        assert all(kept[id(j)][0] is j for j in finished)
    assert 'wattprint_job_energy_joules_total{job_id="105-1",kind="gpu",label="l105",user="u"} 999.0' in bodies[2]
    assert 'job_id="105-1",kind="gpu",label="l105",user="u"} 50.0' in bodies[1]
    assert 'kind="other"' not in bodies[2] and 'job_id="100-1",kind="other",label="l100",user="u"} 0.0' in bodies[3]


def test_a_finished_job_seen_again_is_not_rendered_again() -> None:
    done = job(7, "finished", 1.0)
    registry = build_registry(lambda: Snapshot(taken_at=1.0, tick=1, tick_duration_s=0.001, jobs=(done,)))
    render(registry)
    parts = prom._finished_job_parts[id(done)]
    registry2 = build_registry(lambda: Snapshot(taken_at=2.0, tick=2, tick_duration_s=0.001,
                                                jobs=(job(8, "running", 3.0), done)))
    assert render(registry2)[0] == generate_latest(registry2)
    assert prom._finished_job_parts[id(done)] is parts  # used as kept, not built again


label_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)) | st.sampled_from('\\"\n{}=,'),
                     max_size=30)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(labels=st.lists(st.tuples(label_text, label_text, st.booleans()), min_size=1, max_size=8),
       value=st.floats(allow_nan=False) | st.sampled_from([0.0, 1e21, -0.0]))
def test_hostile_finished_jobs_render_as_generate_latest_twice(labels: list[tuple[str, str, bool]],
                                                                value: float) -> None:
    jobs = tuple(JobTotals(job_id=f"{i}-1", label=lab, user=user, uid=i, state="finished" if fin else "running",
                           energy_j={"gpu": value, "cpu": 1.0}, co2e_g=value)
                 for i, (lab, user, fin) in enumerate(labels))
    for tick in (1, 2):  # the second render uses the kept text of the finished ones
        snap = Snapshot(taken_at=float(tick), tick=tick, tick_duration_s=0.002, jobs=jobs)
        registry = build_registry(lambda snap=snap: snap)
        assert render(registry)[0] == generate_latest(registry)
