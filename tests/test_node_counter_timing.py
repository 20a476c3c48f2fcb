"""The node source's counter corrections against tick timing, through the real engine.

The BMC here is scripted on the test's own hand-moved clock (``ScriptedBmc``: the power
the test sets, its energy counter that power integrated on that clock), read by the
real ``NodeSource`` with its polling done by hand at chosen instants between ticks, and
the real engine ticking a simulated NVML (GPU 0 at 420 W for job A, GPU 1 at 280 W with
no process: 700 W measured). Truth is what the test set: the BMC's power and its
counter; every expected figure below is arithmetic on those.

- Samples that alias with the ticks (two in one tick, none in the next, as a BMC polled
  at about the tick's own period does) correct nothing under steady power: every tick's
  node figure is the power x the tick (the held energy splits at each counter value's
  reading time). Before, such a pattern gave figures of 2,000 J and 0 J, and the 0 J
  tick was booked as if there were no BMC, so jobs + unattributed exceeded the node with
  health "ok".
- A power drop between two samples 3 s apart: the held power over-books, the next
  counter value takes it back, and the tick it lands in falls below the measured
  components. That is a correction, not a meter below its components: not counted,
  health ok, the uncovered part carried against the next ticks' remainder, so over
  the run jobs + unattributed equals the node's energy, which equals the BMC's counter.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from attribution_inputs import SimNvmlEngine
from gpusim import gpu as sim_gpu
from gpusim import proc, write_sim
from wattprint.daemon.model import COMPONENTS
from wattprint.daemon.sources.node import BmcSample, NodeSource

MEASURED_W = 700.0  # GPU 0 420 W (job A) + GPU 1 280 W (no process)


class ScriptedBmc:
    """A BMC client on the test's clock: ``power_w`` as set, the counter its integral."""

    def __init__(self, clock: Callable[[], float], power_w: float) -> None:
        self.clock = clock
        self.power_w = power_w
        self.counter_j = 0.0
        self.at = clock()

    def _integrate(self) -> None:
        now = self.clock()
        self.counter_j += self.power_w * (now - self.at)
        self.at = now

    def set_power(self, watts: float) -> None:
        self._integrate()
        self.power_w = watts

    def counter_at_j(self) -> float:
        self._integrate()
        return self.counter_j

    def read(self) -> BmcSample:
        self._integrate()
        return BmcSample(power_w=self.power_w, energy_j=self.counter_j, power_age_s=0.0, energy_age_s=0.0)

    def close(self) -> None:
        pass


class Run:
    """The engine on the hand clock; ``tick(polls, drop=...)`` polls the BMC at the given
    offsets (seconds into the coming tick), optionally sets its power at an offset,
    then runs the tick (1 s after the previous one)."""

    def __init__(self, make_engine, tmp_path, labelled_process) -> None:
        self.job = labelled_process("node-timing-a")
        time.sleep(0.3)
        sim = tmp_path / "sim.json"
        write_sim(sim, [sim_gpu(0, power_w=420.0, processes=[proc(self.job.pid, sm_util=100)]),
                        sim_gpu(1, power_w=280.0, processes=[])])
        self.clock_s = 0.0
        self.bmc = ScriptedBmc(lambda: self.clock_s, 1000.0)
        self.src = NodeSource(self.bmc, "redfish", start=False, clock=lambda: self.clock_s, max_age_s=30.0)
        self.run = SimNvmlEngine(make_engine, sim, self.src, remainder_policy="proportional")
        self.clock_s = self.run.mono
        self.bmc.at = self.clock_s

    def tick(self, polls: tuple[float, ...] = (), power: tuple[float, float] | None = None):
        base = self.run.mono
        events = [(o, "poll") for o in polls] + ([(power[0], "power")] if power else [])
        for offset, what in sorted(events):
            self.clock_s = base + offset
            if what == "poll":
                self.src.poll_once()
            else:
                self.bmc.set_power(power[1])  # type: ignore[index]
        self.clock_s = base + 1.0
        return self.run.tick()


def node_total(snap) -> float:
    return sum(d.energy_j_total for d in snap.devices if d.kind == "node")


def booked(snap) -> float:
    return sum(sum(j.energy_j[c] for c in COMPONENTS) for j in snap.jobs) + sum(
        snap.unattributed_j_total[c] for c in COMPONENTS)


def job_other(snap, label: str) -> float:
    return next(j.energy_j["other"] for j in snap.jobs if j.label == label)


def health(snap, name: str) -> str:
    return {h.name: h.state for h in snap.health}[name]


def test_samples_aliasing_with_the_ticks_correct_nothing_under_steady_power(make_engine, tmp_path, labelled_process):
    r = Run(make_engine, tmp_path, labelled_process)
    snap = r.tick((0.5,))  # the first counter value: the baseline tick, no node figure of its own
    assert node_total(snap) == 0.0
    # The next value's correction books the 0.5 s between the first value and the
    # baseline tick (the held power started there): 1,500 J.
    snap = r.tick((0.5,))
    assert node_total(snap) == pytest.approx(1500.0, rel=1e-9)
    pattern = [(0.5,), (0.1, 0.9), (), (0.5,), (0.05, 0.95), (), (0.3,), (), (0.2, 0.6, 0.99)]
    for polls in pattern * 3:
        before_node, before_a = node_total(snap), job_other(snap, "node-timing-a")
        snap = r.tick(polls)
        # 1,000 W x 1 s each tick, whatever arrived in it; other = 300 J, job A 60 % of it.
        assert node_total(snap) - before_node == pytest.approx(1000.0, rel=1e-9), polls
        assert job_other(snap, "node-timing-a") - before_a == pytest.approx(180.0, rel=1e-9), polls
        assert booked(snap) == pytest.approx(node_total(snap), rel=1e-9)  # (the GPUs' first read is a baseline too)
        assert health(snap, "node") == "ok"
    assert snap.counters["node_below_components_total"] == 0.0


def test_a_power_drop_between_samples_is_carried_not_below_and_the_run_adds_up(make_engine, tmp_path,
                                                                               labelled_process):
    r = Run(make_engine, tmp_path, labelled_process)
    r.tick((0.5,))  # the baseline
    for _ in range(3):
        snap = r.tick((0.5,))
    start_node, start_booked = node_total(snap), booked(snap)
    start_a, start_counter = job_other(snap, "node-timing-a"), r.bmc.counter_at_j()
    figures = []
    # The power drops to 800 W 0.2 s into a tick; the BMC is next read 2.9 s later, so
    # the held 1,000 W over-books 200 W x ~2.7 s; the value that shows it lands in a
    # tick whose held energy (1,000 J) less that correction is below the 700 J measured.
    plan = [((), (0.2, 800.0)), ((), None), ((), None), ((0.1,), None)] + [((0.5,), None)] * 12
    carries = []
    for polls, power in plan:
        before = node_total(snap)
        snap = r.tick(polls, power)
        figures.append(node_total(snap) - before)
        assert health(snap, "node") == "ok", figures
        # The gauge is what the ticks booked beyond the node's total since the start.
        carries.append(snap.counters["node_carry_joules"])
        assert carries[-1] == pytest.approx((booked(snap) - start_booked) - (node_total(snap) - start_node),
                                            rel=1e-9, abs=1e-6)
    assert min(figures) < MEASURED_W, figures  # the scenario did put a tick below the components
    assert max(carries) > 0.0 and carries[-1] == 0.0
    assert snap.counters["node_below_components_total"] == 0.0
    # The node's energy over the span is the BMC counter's difference, plus the held
    # 800 W booked after the last value (read 0.5 s into the last tick).
    node_span = node_total(snap) - start_node
    truth = r.bmc.counter_at_j() - start_counter
    assert node_span == pytest.approx(truth, rel=1e-9)
    assert truth == pytest.approx(1000.0 * 0.2 + 800.0 * (len(plan) - 0.2), rel=1e-9)
    # Every joule of it booked once (the carry paid off by the remainder since), and job
    # A has 60 % of the remainder over the span (its GPU is 420 of the 700 W measured).
    span_s = float(len(plan))
    assert booked(snap) - start_booked == pytest.approx(node_span, rel=1e-9)
    assert job_other(snap, "node-timing-a") - start_a == pytest.approx(0.6 * (node_span - MEASURED_W * span_s),
                                                                       rel=1e-9)


def test_a_carry_the_remainder_never_pays_is_dropped_and_counted_after_its_limit(make_engine, tmp_path,
                                                                                labelled_process):
    """The power drops to exactly the measured 700 W: the correction's carry is never
    paid (the remainder stays 0), so after NODE_CARRY_MAX_S it is dropped, counted as a
    node below its components and ``node`` is degraded: the measured energy it stood
    for stays booked above the node's figure, and health says so."""
    from wattprint.daemon.engine.tick import NODE_CARRY_MAX_S

    r = Run(make_engine, tmp_path, labelled_process)
    for _ in range(4):
        snap = r.tick((0.5,))
    # (The tick after the first value at 700 W takes a second, smaller correction: the
    # 0.9 s after that value in its own tick were held at 1,000 W.)
    plan = [((), (0.2, 700.0)), ((), None), ((), None), ((0.1,), None), ((0.5,), None), ((0.5,), None)]
    for polls, power in plan:
        snap = r.tick(polls, power)
    start_node, start_booked = node_total(snap), booked(snap)
    carried_j = start_booked - start_node
    assert carried_j > 0.0  # the correction's shortfall, carried
    states = []
    for _ in range(int(NODE_CARRY_MAX_S) + 3):
        snap = r.tick((0.5,))
        states.append(health(snap, "node"))
        # Nothing pays it: every tick books its 700 J measured, the node's figure 700 J.
        assert booked(snap) - node_total(snap) == pytest.approx(carried_j, rel=1e-9)
    # The carry began in the plan's 4th tick, 3 s before this loop's first: it is dropped
    # in the first tick more than NODE_CARRY_MAX_S after it (one episode, then ok again).
    first_over = next(i for i in range(len(states)) if i + 3 > NODE_CARRY_MAX_S)
    assert states.index("degraded") == first_over, states
    assert states.count("degraded") == 1 and states[-1] == "ok"
    assert snap.counters["node_below_components_total"] == 1.0
