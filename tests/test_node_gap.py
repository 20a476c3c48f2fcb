"""A node gap booked from the BMC's energy counter (issue 19: "a BMC stall of 10 s leaves
every tick on time and the totals right").

When the node source has no trustworthy reading for a while (stale readings, a BMC that
stopped answering), the ticks of that span have no node figure. With an energy counter
that did not go back, the first fresh tick books the counter's difference over the gap
in one reading whose ``interval_s`` is the whole span (daemon/sources/node/source.py);
attribution compares it with the measured energy of all the ticks it covers (the job
book's window, daemon/engine/book.py) and splits the remainder by each job's measured
energy over that span, a job that ended in the gap included. Power-only BMCs, and a
counter reset in the gap, keep the gap unbooked (a baseline of 0 J).

Every expected figure is hand arithmetic from what the test writes: the simulated GPU
powers, the node energy the stub returns, the counter values the Redfish test server
answered (``served_energy_j``).
"""

from __future__ import annotations

import time

import pytest
from attribution_inputs import SimNvmlEngine, gpu, view
from gpusim import gpu as sim_gpu
from gpusim import proc, write_sim
from redfish_server import RedfishBmc
from wattprint.daemon.attribution import SpanMeasured, attribute
from wattprint.daemon.engine.book import MeasuredWindow
from wattprint.daemon.ledger import LedgerReader
from wattprint.daemon.model import COMPONENTS, DeviceReading
from wattprint.daemon.sources.node import NodeSource, RedfishClient

TICK_S = 0.05


def node(energy_j: float, interval_s: float) -> DeviceReading:
    return DeviceReading("node", "node", energy_j, energy_j / interval_s, "counter", interval_s,  # type: ignore[arg-type]
                         name="redfish")


def total(energy) -> float:
    return sum(energy.get(c, 0.0) for c in COMPONENTS)


# ------------------------------------------------------------ attribution + window


def test_a_10_tick_gap_splits_its_remainder_over_the_span_by_hand():
    """Ticks at mono 1..10: tick 0 had a node figure; ticks 1..9 none (the BMC stalled);
    tick 10 brings the counter's difference over the 10 s: 10,000 J (1,000 W).
    GPUs: gpu0 420 W (job 1 throughout), gpu1 140 W (job 2 in ticks 1..5, then nobody),
    gpu2 140 W idle. Measured over the span: 10 x 700 = 7,000 J, so other = 3,000 J;
    weights: job 1 10 x 420 = 4,200, job 2 5 x 140 = 700, unattributed 2,100:
    job 1 1,800 J, job 2 300 J (ended, not in this tick), unattributed 900 J."""
    window = MeasuredWindow()
    window.add(0.0, attribute([gpu("gpu0", 420.0, (10,)), gpu("gpu1", 140.0, (20,)), gpu("gpu2", 140.0),
                               node(1000.0, 1.0)], view(1, 2)))
    for t in range(1, 10):
        pids = (20,) if t <= 5 else ()
        jobs = (1, 2) if t <= 5 else (1,)
        window.add(float(t), attribute([gpu("gpu0", 420.0, (10,)), gpu("gpu1", 140.0, pids), gpu("gpu2", 140.0)],
                                       view(*jobs)))
    span = window.span_before(10.0, 10.0, known_jobs={"j1", "j2"})
    assert span is not None
    assert span.measured_j == pytest.approx(9 * 700.0)  # ticks 1..9 (tick 0 had its own node figure)
    assert span.job_measured_j == pytest.approx({"j1": 9 * 420.0, "j2": 5 * 140.0})
    now = [gpu("gpu0", 420.0, (10,)), gpu("gpu1", 140.0), gpu("gpu2", 140.0), node(10_000.0, 10.0)]
    a = attribute(now, view(1), span=span)
    assert a.device_j["other"] == pytest.approx(3000.0)
    assert a.job_energy_j["j1"]["other"] == pytest.approx(1800.0)
    assert a.job_energy_j["j2"] == pytest.approx({"gpu": 0.0, "cpu": 0.0, "dram": 0.0, "other": 300.0})
    assert a.unattributed_j["other"] == pytest.approx(900.0)
    assert a.job_sources["j2"] == {"other": "counter", "node": "redfish"}
    # Over the whole span, jobs + unattributed (every component) = the node's 10,000 J.
    booked = 9 * 700.0 + sum(total(e) for e in a.job_energy_j.values()) + total(a.unattributed_j)
    assert booked == pytest.approx(10_000.0)
    # Under "unattributed" all of it stays unattributed.
    u = attribute(now, view(1), remainder_policy="unattributed", span=span)
    assert u.unattributed_j["other"] == pytest.approx(3000.0) and "j2" not in u.job_energy_j


def test_a_gap_node_below_the_spans_measured_books_no_remainder():
    span = SpanMeasured(measured_j=9 * 700.0, job_measured_j={"j1": 9 * 420.0})
    a = attribute([gpu("gpu0", 700.0, (10,)), node(6_500.0, 10.0)], view(1), span=span)
    assert a.device_j["other"] == 0.0 and a.node_below_j == pytest.approx(500.0)


def test_the_window_ignores_ticks_with_a_node_figure_and_forgets_old_ticks():
    window = MeasuredWindow(keep_s=5.0)
    for t in range(10):
        readings = [gpu("gpu0", 100.0, (10,))] + ([node(200.0, 1.0)] if t % 2 else [])
        window.add(float(t), attribute(readings, view(1)))
    # Within (9 - 4, 9): ticks 6 and 8 had no node figure; 7 had one; 5 is the edge.
    span = window.span_before(9.0, 4.0)
    assert span is not None and span.measured_j == pytest.approx(200.0)
    # The usual tick (node every tick, span = one interval): nothing to add.
    assert window.span_before(9.0, 1.0) is None
    # Ticks older than keep_s are forgotten (0 and 2 are; 4 is exactly 5 s old: kept), and
    # a job the book no longer has counts as unattributed.
    assert window.span_before(9.0, 100.0, known_jobs=set()) == SpanMeasured(300.0, {})


# ------------------------------------------------------------ the engine


class GapNode:
    """A node Source: ``power_w`` x the time since its last reading; [] while ``dark``
    (the first fresh tick after it covers the whole gap, as the counter case)."""

    name = "node"

    def __init__(self, power_w: float) -> None:
        self.power_w = power_w
        self.dark = False
        self.last: float | None = None

    def read(self, now_mono_s: float) -> list[DeviceReading]:
        if self.dark:
            return []
        last, self.last = self.last, now_mono_s
        if last is None:
            return []
        return [node(self.power_w * (now_mono_s - last), now_mono_s - last)]

    def problems(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


def test_engine_books_a_gap_to_the_jobs_of_the_span_an_ended_one_included(tmp_path, labelled_process, make_engine):
    a_proc = labelled_process("gap-a")
    b_proc = labelled_process("gap-b")
    time.sleep(0.3)
    sim = tmp_path / "sim.json"

    def gpus(b_running: bool) -> None:
        write_sim(sim, [sim_gpu(0, power_w=420.0, processes=[proc(a_proc.pid, sm_util=100)]),
                        sim_gpu(1, power_w=140.0, processes=[proc(b_proc.pid, sm_util=100)] if b_running else []),
                        sim_gpu(2, power_w=140.0, processes=[])])

    gpus(True)
    stub = GapNode(1000.0)
    run = SimNvmlEngine(make_engine, sim, stub)
    engine, tick = run.engine, run.tick

    tick()  # baseline
    for _ in range(3):  # 3 ticks with a node figure: other 300 J = 180 (A) + 60 (B) + 60
        tick()
    stub.dark = True
    for t in range(1, 10):  # 9 ticks with no node figure; B's process ends after the 5th
        snap = tick()
        if t == 5:
            labelled_process.end(b_proc)
            gpus(False)
    jobs = {j.label: j for j in snap.jobs}
    assert jobs["gap-b"].state == "finished"
    assert jobs["gap-a"].energy_j["other"] == pytest.approx(3 * 180.0)  # nothing yet for the gap
    stub.dark = False
    snap = tick()  # the counter's difference over the 10 s: 10,000 J
    jobs = {j.label: j for j in snap.jobs}
    # The gap: measured 7,000 J (A 4,200, B 5 x 140 = 700), other 3,000 J: A 1,800, B 300.
    assert jobs["gap-a"].energy_j["other"] == pytest.approx(3 * 180.0 + 1800.0, rel=1e-6)
    assert jobs["gap-b"].energy_j["other"] == pytest.approx(3 * 60.0 + 300.0, rel=1e-6)
    assert jobs["gap-b"].state == "finished"
    assert snap.unattributed_j_total["other"] == pytest.approx(3 * 60.0 + 900.0, rel=1e-6)
    [node_dev] = [d for d in snap.devices if d.kind == "node"]
    assert node_dev.energy_j_total == pytest.approx(13_000.0)
    booked = sum(total(j.energy_j) for j in snap.jobs) + total(snap.unattributed_j_total)
    assert booked == pytest.approx(node_dev.energy_j_total, rel=1e-9)  # the wall meter, gap included

    engine.store.flush()
    reader = LedgerReader(engine.ledger.path)
    try:
        recs = {j["label"]: j for j in reader.jobs(now=run.wall)}
        assert recs["gap-b"]["state"] == "finished"  # its life is left as it was
        assert recs["gap-b"]["energy_j"]["other"] == pytest.approx(480.0, rel=1e-6)
        assert recs["gap-a"]["energy_j"]["other"] == pytest.approx(2340.0, rel=1e-6)
        host = reader.host_totals()
        assert host["node_energy_j"] == pytest.approx(13_000.0)
        for c in COMPONENTS:
            assert host["attributed_energy_j"][c] + host["unattributed_energy_j"][c] == pytest.approx(
                host["device_energy_j"][c], rel=1e-9, abs=1e-9)
    finally:
        reader.close()


# ------------------------------------------------------------ the source (Redfish test BMC)


def client(bmc: RedfishBmc) -> RedfishClient:
    return RedfishClient(bmc.url, bmc.username, bmc.password, timeout_s=2.0)


def run(src: NodeSource, n: int, poll_every: int = 0) -> list[list[DeviceReading]]:
    out = []
    for i in range(n):
        time.sleep(TICK_S)
        if poll_every and i % poll_every == 0:
            src.poll_once()
        out.append(list(src.read(time.monotonic())))
    return out


def test_power_only_bmc_leaves_the_gap_unbooked(bmc: RedfishBmc) -> None:
    bmc.set_power(800.0)
    bmc.energy_counter = False  # power only: nothing measured the gap
    src = NodeSource(client(bmc), "redfish", start=False, max_age_s=30.0)
    run(src, 4, poll_every=2)
    bmc.stale_s = 120.0
    assert all(got == [] for got in run(src, 6, poll_every=2))
    bmc.stale_s = 0.0
    [back] = run(src, 1, poll_every=1)
    assert back == []  # a baseline, as before: no node figure for this tick
    [(r,)] = run(src, 1)
    assert r.interval_s == pytest.approx(TICK_S, abs=0.05)  # its own tick only, not the gap
    assert r.energy_j == pytest.approx(800.0 * r.interval_s, rel=1e-9)


def test_a_counter_reset_in_the_gap_is_counted_and_rebaselined(bmc: RedfishBmc) -> None:
    bmc.set_power(800.0)
    src = NodeSource(client(bmc), "redfish", start=False, max_age_s=30.0)
    run(src, 6, poll_every=2)
    bmc.stale_s = 120.0
    run(src, 6, poll_every=2)
    bmc.reset_energy()
    bmc.stale_s = 0.0
    [back] = run(src, 1, poll_every=1)
    assert back == []  # re-baselined: the gap not booked
    assert src.counters()["node_counter_resets_total"] == 1


def test_ipmi_power_only_gap_is_not_booked_on_the_real_simulator(tmp_path) -> None:
    """IPMI has no energy counter: after a span with no fresh reading (here: no poll for
    longer than max_age_s) the first fresh reading is a new baseline, the gap unbooked."""
    from bmc import SENSOR, IpmiSimBmc
    from wattprint.daemon.sources.node import IpmiClient

    sim = IpmiSimBmc(tmp_path / "bmc").start()
    try:
        watts = sim.set_power(1000.0)
        c = IpmiClient("127.0.0.1", sim.username, sim.password, port=sim.port, sensor=SENSOR, cipher_suite=3,
                       timeout_s=5.0)
        src = NodeSource(c, "ipmi", start=False, max_age_s=0.3)
        src.poll_once()
        assert list(src.read(time.monotonic())) == []  # the baseline: no figure of its own
        time.sleep(0.05)
        (r,) = src.read(time.monotonic())
        assert r.energy_j == pytest.approx(watts * r.interval_s, rel=1e-9)
        time.sleep(0.5)  # the held power is now older than max_age_s: no node figure
        assert list(src.read(time.monotonic())) == []
        time.sleep(0.2)
        assert list(src.read(time.monotonic())) == []
        src.poll_once()
        assert list(src.read(time.monotonic())) == []  # a baseline: the gap not booked
        time.sleep(0.05)
        (r,) = src.read(time.monotonic())
        assert r.energy_j == pytest.approx(watts * r.interval_s, rel=1e-9)
    finally:
        sim.stop()
