"""Node power accounting (issue 19): the remainder ``other`` = node - (gpu + cpu + dram),
its two policies, conservation against the node, the node below the measured components,
the engine's health and counter for it, and the store's v3 -> v4 migration.

Every expected figure is hand arithmetic from the readings the test writes."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import pytest
from attribution_inputs import SimNvmlEngine, gpu, view
from gpusim import gpu as sim_gpu
from gpusim import proc, write_sim
from hypothesis import given
from hypothesis import strategies as st
from wattprint.daemon.attribution import attribute
from wattprint.daemon.csvout import HEADER, job_row
from wattprint.daemon.ledger import (
    SCHEMA_VERSION,
    Intensity,
    JobTick,
    Ledger,
    LedgerReader,
)
from wattprint.daemon.model import (
    COMPONENTS,
    MEASURED_COMPONENTS,
    DeviceReading,
)
from wattprint.daemon.procs import JobIdentity
from wattprint.daemon.report import NODE_NOTE_WITH, NODE_NOTE_WITHOUT, format_report

V3_DDL = Path(__file__).parent / "fixtures" / "ledger" / "schema_v3.sql"
STATIC = Intensity(400.0, "final", "static", "DK1", "static")


def node(energy_j: float, method: str = "redfish", source: str = "counter") -> DeviceReading:
    return DeviceReading("node", "node", energy_j, energy_j, source, 1.0, name=method)  # type: ignore[arg-type]


def total(energy: dict[str, float]) -> float:
    return sum(energy[c] for c in COMPONENTS)


# The example: node 1,000 W; GPUs 420 W (job 1), 140 W (job 2), 140 W idle (no process).
EXAMPLE = [gpu("gpu0", 420.0, (10,)), gpu("gpu1", 140.0, (20,)), gpu("gpu2", 140.0), node(1000.0)]


def test_proportional_remainder_is_each_jobs_share_of_the_wall_meter():
    a = attribute(EXAMPLE, view(1, 2), remainder_policy="proportional")
    # other = 1000 - 700 = 300, split 420 : 140 : 140 (unattributed measured)
    assert a.job_energy_j["j1"]["other"] == pytest.approx(180.0)
    assert a.job_energy_j["j2"]["other"] == pytest.approx(60.0)
    assert a.unattributed_j["other"] == pytest.approx(60.0)
    assert total(a.job_energy_j["j1"]) == pytest.approx(600.0)
    assert total(a.job_energy_j["j2"]) == pytest.approx(200.0)
    assert total(a.unattributed_j) == pytest.approx(200.0)
    assert a.device_j["other"] == pytest.approx(300.0)
    assert (a.node_j, a.node_method, a.node_below_j) == (1000.0, "redfish", 0.0)
    # the other share comes from the node's counter; the job says which BMC method
    assert a.job_sources["j1"] == {"gpu": "counter", "other": "counter", "node": "redfish"}


def test_unattributed_policy_books_all_of_the_remainder_unattributed():
    a = attribute(EXAMPLE, view(1, 2), remainder_policy="unattributed")
    assert (a.job_energy_j["j1"]["other"], a.job_energy_j["j2"]["other"]) == (0.0, 0.0)
    assert total(a.job_energy_j["j1"]) == pytest.approx(420.0)
    assert total(a.job_energy_j["j2"]) == pytest.approx(140.0)
    assert a.unattributed_j["other"] == pytest.approx(300.0)
    assert total(a.unattributed_j) == pytest.approx(440.0)
    assert "node" not in a.job_sources["j1"]  # no node share booked to it


def test_node_below_the_components_books_no_remainder_and_says_so():
    readings = [gpu("gpu0", 420.0, (10,)), gpu("gpu1", 280.0), node(650.0, source="power")]
    a = attribute(readings, view(1))
    assert a.device_j["other"] == 0.0
    assert a.job_energy_j["j1"] == {"gpu": 420.0, "cpu": 0.0, "dram": 0.0, "other": 0.0}
    assert a.unattributed_j["other"] == 0.0
    assert a.node_below_j == pytest.approx(50.0)


def test_without_a_node_reading_other_is_zero_everywhere():
    a = attribute(EXAMPLE[:3], view(1, 2))
    assert a.device_j["other"] == 0.0 and a.unattributed_j["other"] == 0.0
    assert all(e["other"] == 0.0 for e in a.job_energy_j.values())
    assert (a.node_j, a.node_method, a.node_below_j) == (None, "", 0.0)
    assert "node" not in a.job_sources["j1"] and "other" not in a.job_sources["j1"]


def test_a_zero_node_reading_is_a_figure_below_the_components():
    """The node source returns no reading for its baseline tick; a 0 J reading is a
    figure (a tick a counter correction took to 0 with no held power to cover it), and
    below the measured components it is counted, never booked as if no BMC were there."""
    a = attribute([gpu("gpu0", 420.0, (10,)), node(0.0)], view(1))
    assert (a.node_j, a.node_below_j, a.device_j["other"], a.node_carry_j) == (0.0, 420.0, 0.0, 0.0)
    assert "node" not in a.job_sources["j1"]


def held(energy_j: float, held_j: float) -> DeviceReading:
    """A node reading from a BMC counter: ``held_j`` from the held power, ``energy_j``
    after the counter's correction."""
    return DeviceReading("node", "node", energy_j, held_j, "counter", 1.0, name="redfish", held_j=held_j)  # type: ignore[arg-type]


def test_a_correction_below_the_components_is_carried_and_the_span_adds_up_to_the_node():
    """Node 1,000 W held; a counter value shows one tick's worth too much was booked, so
    the source takes it from the next figure (0 J), then normal ticks. Measured 700 J
    a tick (job 1 420 J, 280 J unattributed). By hand: tick 1 other 1,300; tick 2 other
    0, carry 700 (not below: the held 1,000 J covered the components); tick 3 remainder
    300 pays 300 (carry 400); tick 4 300 (carry 100); tick 5 200 booked, carry 0. The five
    ticks book 5,000 J = the node's five figures; no tick is a node below its components."""
    figures = [(2000.0, 1000.0), (0.0, 1000.0), (1000.0, 1000.0), (1000.0, 1000.0), (1000.0, 1000.0)]
    carry, others, booked, below = 0.0, [], 0.0, []
    for energy_j, held_j in figures:
        a = attribute([gpu("gpu0", 420.0, (10,)), gpu("gpu1", 280.0), held(energy_j, held_j)], view(1),
                      node_carry_j=carry)
        carry = a.node_carry_j
        others.append(a.device_j["other"])
        below.append(a.node_below_j)
        booked += sum(total(e) for e in a.job_energy_j.values()) + total(a.unattributed_j)
    assert others == pytest.approx([1300.0, 0.0, 0.0, 0.0, 200.0])
    assert below == [0.0] * 5 and carry == 0.0
    assert booked == pytest.approx(5000.0)


def test_a_low_meter_is_below_not_carried_and_the_carry_waits():
    # The BMC's own power (650 J held) is below the components (700 J): a meter below, counted.
    a = attribute([gpu("gpu0", 420.0, (10,)), gpu("gpu1", 280.0), held(650.0, 650.0)], view(1), node_carry_j=50.0)
    assert (a.node_below_j, a.node_carry_j, a.device_j["other"]) == (pytest.approx(50.0), 50.0, 0.0)
    # No node figure this tick: the carry passes through untouched.
    a = attribute([gpu("gpu0", 420.0, (10,))], view(1), node_carry_j=80.0)
    assert (a.node_j, a.node_carry_j, a.node_below_j) == (None, 80.0, 0.0)
    # A gap's reading (held 0 J) below the span's measured energy is below, not carried.
    a = attribute([gpu("gpu0", 420.0, (10,)), held(300.0, 0.0)], view(1))
    assert (a.node_below_j, a.node_carry_j) == (pytest.approx(120.0), 0.0)


def test_a_node_reading_with_nothing_measured_stays_unattributed():
    a = attribute([node(300.0)], view(1))
    assert a.job_energy_j["j1"]["other"] == 0.0
    assert a.unattributed_j["other"] == pytest.approx(300.0)


def test_power_sampled_node_makes_the_other_source_power():
    a = attribute([gpu("gpu0", 400.0, (10,)), node(500.0, method="ipmi", source="power")], view(1))
    assert a.job_energy_j["j1"]["other"] == pytest.approx(100.0)
    assert a.job_sources["j1"] == {"gpu": "counter", "other": "power", "node": "ipmi"}


@given(
    gpus=st.lists(st.tuples(st.floats(0, 2000), st.integers(0, 3)), min_size=0, max_size=4),
    node_j=st.one_of(st.none(), st.floats(0, 1e4)),
    policy=st.sampled_from(["proportional", "unattributed"]),
)
def test_conservation_for_every_component_and_against_the_node(gpus, node_j, policy):
    """Jobs + unattributed = device for every component, other included; and whenever
    the node reading is at least the measured components, all of it adds to the node."""
    readings = [gpu(f"gpu{i}", e, (10 * owner,) if owner else ()) for i, (e, owner) in enumerate(gpus)]
    if node_j is not None:
        readings.append(node(node_j))
    a = attribute(readings, view(1, 2, 3), remainder_policy=policy)
    for c in COMPONENTS:
        jobs_c = sum(e[c] for e in a.job_energy_j.values())
        assert jobs_c >= 0.0 and a.unattributed_j[c] >= 0.0
        assert jobs_c + a.unattributed_j[c] == pytest.approx(a.device_j[c], rel=1e-12, abs=1e-6)
    measured = sum(e for e, _ in gpus)
    everything = sum(total(e) for e in a.job_energy_j.values()) + total(a.unattributed_j)
    if node_j is None:
        assert a.device_j["other"] == 0.0 and a.node_below_j == 0.0
        assert everything == pytest.approx(measured, rel=1e-12, abs=1e-6)
    elif node_j >= measured:
        assert everything == pytest.approx(node_j, rel=1e-12, abs=1e-6)
    else:
        assert a.device_j["other"] == 0.0 and a.node_below_j == pytest.approx(measured - node_j)
        assert everything == pytest.approx(measured, rel=1e-12, abs=1e-6)


# ---------------------------------------------------------------- the engine


class NodeStub:
    """A tiny node Source: a "node" reading of ``power_w`` x the tick's interval."""

    name = "node"

    def __init__(self) -> None:
        self.power_w = 0.0
        self.last: float | None = None

    def read(self, now_mono_s: float) -> list[DeviceReading]:
        dt, self.last = (0.0 if self.last is None else now_mono_s - self.last), now_mono_s
        if dt <= 0:
            return []
        return [DeviceReading("node", "node", self.power_w * dt, self.power_w, "counter", dt,  # type: ignore[arg-type]
                              name="redfish")]

    def problems(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


def test_engine_books_other_and_degrades_node_once_per_episode(tmp_path, labelled_process, make_engine, caplog):
    job = labelled_process("node-acct")
    time.sleep(0.3)
    sim = tmp_path / "sim.json"
    write_sim(sim, [sim_gpu(0, power_w=420.0, processes=[proc(job.pid, sm_util=100)]),
                    sim_gpu(1, power_w=280.0, processes=[])])
    stub = NodeStub()
    stub.power_w = 1000.0
    run = SimNvmlEngine(make_engine, sim, stub)
    engine, tick = run.engine, run.tick

    tick()  # baseline
    for _ in range(5):
        snap = tick()
    [mine] = [j for j in snap.jobs if j.label == "node-acct"]
    # 5 s: gpu 420 W; other 300 W x 420/700
    assert mine.energy_j["gpu"] == pytest.approx(5 * 420.0, rel=1e-6)
    assert mine.energy_j["other"] == pytest.approx(5 * 180.0, rel=1e-6)
    [node_dev] = [d for d in snap.devices if d.kind == "node"]
    assert (node_dev.device, node_dev.energy_j_total) == ("node", pytest.approx(5 * 1000.0))
    assert snap.unattributed_j_total["other"] == pytest.approx(5 * 120.0, rel=1e-6)
    assert {h.name: h.state for h in snap.health}["node"] == "ok"

    caplog.set_level(logging.INFO, logger="wattprint.health")
    stub.power_w = 600.0  # below the 700 W measured: an episode of 3 ticks
    for _ in range(3):
        snap = tick()
    health = {h.name: h for h in snap.health}
    assert health["node"].state == "degraded" and "below" in health["node"].detail
    assert snap.counters["node_below_components_total"] == 3.0
    [mine] = [j for j in snap.jobs if j.label == "node-acct"]
    assert mine.energy_j["other"] == pytest.approx(5 * 180.0, rel=1e-6)  # nothing booked while below
    stub.power_w = 1000.0
    tick()  # the episode ends; the next clean read says so
    snap = tick()
    assert {h.name: h.state for h in snap.health}["node"] == "ok"
    lines = [r.getMessage() for r in caplog.records if r.name == "wattprint.health" and "node" in r.getMessage()]
    assert len([m for m in lines if "degraded" in m]) == 1, lines
    assert len([m for m in lines if "recovered" in m]) == 1, lines
    assert snap.counters["node_below_components_total"] == 3.0

    # the store: the job's other and the node device, and host conservation per component
    engine.store.flush()
    reader = LedgerReader(engine.ledger.path)
    try:
        [rec] = [j for j in reader.jobs(now=run.wall) if j["label"] == "node-acct"]
        assert rec["energy_j"]["other"] == pytest.approx(7 * 180.0, rel=1e-6)
        assert rec["energy_j"]["total"] == pytest.approx(7 * 600.0 + 3 * 420.0, rel=1e-6)
        assert rec["energy_sources"]["node"] == "redfish"
        host = reader.host_totals()
        assert host["node_energy_j"] == pytest.approx(7 * 1000.0 + 3 * 600.0)
        for c in COMPONENTS:
            assert host["attributed_energy_j"][c] + host["unattributed_energy_j"][c] == pytest.approx(
                host["device_energy_j"][c], rel=1e-9, abs=1e-9)
    finally:
        reader.close()


def test_engine_unattributed_policy(tmp_path, labelled_process, make_engine):
    job = labelled_process("node-unattr")
    time.sleep(0.3)
    sim = tmp_path / "sim.json"
    write_sim(sim, [sim_gpu(0, power_w=420.0, processes=[proc(job.pid, sm_util=100)])])
    stub = NodeStub()
    stub.power_w = 600.0
    run = SimNvmlEngine(make_engine, sim, stub, remainder_policy="unattributed")
    for _ in range(4):
        snap = run.tick()
    [mine] = [j for j in snap.jobs if j.label == "node-unattr"]
    assert mine.energy_j["other"] == 0.0
    assert snap.unattributed_j_total["other"] == pytest.approx(3 * 180.0, rel=1e-6)


# ---------------------------------------------------------------- the store


def _v3_store(path: str) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(V3_DDL.read_text())
    conn.execute("INSERT INTO meta VALUES ('schema_version', '3')")
    conn.execute("""INSERT INTO jobs (id, host, label, label_source, uid, user, command, root_pid, state,
                                      started_at, last_seen, gpu_j, cpu_j, dram_j, sources)
                    VALUES ('7-1', 'h', 'old', 'WATTPRINT_JOB', 0, 'root', 'python', 7, 'running',
                            1000.0, 1010.0, 360.0, 36.0, 3.6, '{"gpu": "counter"}')""")
    conn.execute("INSERT INTO job_buckets VALUES ('7-1', 960, 'gpu', 360.0)")
    conn.commit()
    conn.close()


def test_a_v3_store_is_read_as_is_and_migrated_to_v4(tmp_path):
    path = str(tmp_path / "s.sqlite3")
    _v3_store(path)
    reader = LedgerReader(path)  # the CLI reading a store no v4 daemon has opened
    try:
        old = reader.job("7-1", now=2000.0)
        assert old["energy_j"] == {"gpu": 360.0, "cpu": 36.0, "dram": 3.6, "other": 0.0,
                                   "total": pytest.approx(399.6)}
    finally:
        reader.close()

    led = Ledger(path, host="h", bucket_s=60)
    try:
        conn = sqlite3.connect(path)
        assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (str(SCHEMA_VERSION),)
        assert SCHEMA_VERSION >= 4  # v3 -> the current schema (5: job_occupancy)
        assert conn.execute("SELECT gpu_j, cpu_j, dram_j, other_j FROM jobs").fetchall() == [(360.0, 36.0, 3.6, 0.0)]
        conn.close()
        # the restored job goes on, now with a node remainder
        row = led.running_jobs()["7-1"]
        job = JobIdentity(job_id="7-1", label="old", label_source="WATTPRINT_JOB", uid=0, user="root",
                          command="python", root_pid=7, started_at=1000.0)
        assert row["other_j"] == 0.0
        led.record_tick(1020.0, [JobTick(job, {"gpu": 420.0, "cpu": 0.0, "dram": 0.0, "other": 180.0}, 1.0, 0,
                                         {"gpu": "counter", "other": "counter", "node": "redfish"})],
                        [("gpu", "gpu0", 700.0, "counter"), ("node", "node", 1000.0, "counter")],
                        {"gpu": 280.0, "cpu": 0.0, "dram": 0.0, "other": 120.0}, STATIC)
    finally:
        led.close()
    reader = LedgerReader(path)
    try:
        j = reader.job("7-1", now=2000.0)
        assert j["energy_j"] == {"gpu": 780.0, "cpu": 36.0, "dram": 3.6, "other": 180.0,
                                 "total": pytest.approx(999.6)}
        assert j["energy_sources"] == {"gpu": "counter", "other": "counter", "node": "redfish"}
        [_b960, b1020] = reader.job_series("7-1")
        assert b1020["energy_j"] == {"gpu": 420.0, "cpu": 0.0, "dram": 0.0, "other": 180.0, "total": 600.0}
        host = reader.host_totals()
        assert host["node_energy_j"] == 1000.0
        assert host["device_energy_j"]["other"] == 300.0
        assert [d["kind"] for d in host["devices"]] == ["gpu", "node"]
    finally:
        reader.close()
    # a v4 store opens again unchanged
    Ledger(path, host="h", bucket_s=60).close()


def test_a_new_store_and_a_migrated_one_have_the_same_jobs_columns(tmp_path):
    new, old = str(tmp_path / "new.sqlite3"), str(tmp_path / "old.sqlite3")
    Ledger(new, host="h", bucket_s=60).close()
    _v3_store(old)
    Ledger(old, host="h", bucket_s=60).close()
    cols = [[r[1] for r in sqlite3.connect(p).execute("PRAGMA table_info(jobs)")] for p in (new, old)]
    assert cols[0] == cols[1] and cols[0][-1] == "other_j"


# ---------------------------------------------------------------- what users read


def _job(other_j: float, node_method: str | None) -> dict:
    energy = {"gpu": 420.0 * 3600, "cpu": 0.0, "dram": 0.0, "other": other_j}
    sources = {"gpu": "counter", "node": node_method or "none"}
    if other_j:
        sources["other"] = "counter"
    return {"id": "1-2", "label": "l", "label_raw": "l", "user": "u", "host": "h", "command": "c",
            "state": "finished", "started_at": 0.0, "ended_at": 3600.0, "duration_s": 3600.0,
            "energy_j": {**energy, "total": sum(energy.values())}, "energy_kwh": sum(energy.values()) / 3.6e6,
            "energy_sources": sources, "co2e_g": 1.0, "co2e_status": "final", "zone": "DK1", "pue": 1.0,
            "intensity_g_per_kwh_avg": 1.0, "gpu_seconds": 3600.0, "peak_gpu_memory_bytes": 0,
            "cost": {"amount": 0.0, "currency": "EUR", "price_per_kwh": 0.0}}


def test_report_has_an_other_line_and_says_what_it_means():
    text = format_report(_job(180.0 * 3600, "redfish"))
    [line] = [ln for ln in text.splitlines() if ln.startswith("  OTHER ")]
    assert line.split()[:3] == ["OTHER", "0.180", "648,000"] and "node from redfish" in line
    assert NODE_NOTE_WITH in text
    text = format_report(_job(0.0, None))
    assert [ln.split() for ln in text.splitlines() if ln.startswith("  OTHER ")] == [["OTHER", "0", "0", "-"]]
    assert NODE_NOTE_WITHOUT in text


def test_csv_appends_other_energy_kwh_last():
    assert HEADER[-1] == "other_energy_kwh"
    row = dict(zip(HEADER, job_row(_job(180.0 * 3600, "redfish"))))
    assert row["other_energy_kwh"] == "0.180000000"
    assert row["energy_sources"] == "gpu=counter;node=redfish;other=counter"
    assert row["gpu_energy_kwh"] == "0.420000000"


def test_measured_components_are_the_components_but_other():
    assert COMPONENTS == ("gpu", "cpu", "dram", "other")
    assert MEASURED_COMPONENTS == ("gpu", "cpu", "dram")


# ---------------------------------------------------------------- exporters


def _snapshot(with_node: bool):
    from wattprint.daemon.model import DeviceState, JobTotals, Snapshot

    devices = [DeviceState("gpu", "gpu0", "H100", 420.0, 4200.0, "counter")]
    if with_node:
        devices.append(DeviceState("node", "node", "redfish", 1000.0, 10000.0, "counter"))  # type: ignore[arg-type]
    other = 1800.0 if with_node else 0.0
    return Snapshot(taken_at=1.0, tick=10, tick_duration_s=0.01, devices=tuple(devices),
                    jobs=(JobTotals("j1", "l1", "u", 0, {"gpu": 4200.0, "cpu": 0.0, "dram": 0.0, "other": other},
                                    1.0, "running"),),
                    unattributed_j_total={"gpu": 0.0, "cpu": 0.0, "dram": 0.0, "other": 10000.0 - 4200.0 - other
                                          if with_node else 0.0})


def _prom(with_node: bool) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families
    from wattprint.exporters.prometheus import build_registry, render

    body, _ = render(build_registry(lambda: _snapshot(with_node)))
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(body.decode()) for s in f.samples}


def test_prometheus_other_and_node_series_only_with_a_node():
    got = _prom(True)
    job = {"job_id": "j1", "label": "l1", "user": "u"}
    assert got[("wattprint_job_energy_joules_total", frozenset({**job, "kind": "other"}.items()))] == 1800.0
    assert got[("wattprint_unattributed_energy_joules_total", frozenset({"kind": "other"}.items()))] == 4000.0
    assert got[("wattprint_device_energy_joules_total", frozenset({"kind": "node", "device": "node"}.items()))] \
        == 10000.0
    got = _prom(False)  # without a BMC: the series of before, no kind="other"
    assert not [k for k in got if ("kind", "other") in k[1] or ("kind", "node") in k[1]]
    assert got[("wattprint_job_energy_joules_total", frozenset({**job, "kind": "gpu"}.items()))] == 4200.0


def test_influx_other_points_only_on_ticks_with_a_node_reading():
    from wattprint.daemon.model import JobRef, TickRecord
    from wattprint.exporters.influx_points import tick_to_lines

    def lines(with_node: bool) -> list[str]:
        a = attribute(EXAMPLE if with_node else EXAMPLE[:3], view(1, 2))
        rec = TickRecord(sampled_at=1_795_000_000.0, interval_s=1.0,
                         readings=tuple(EXAMPLE if with_node else EXAMPLE[:3]),
                         jobs={f"j{n}": JobRef(f"j{n}", f"l{n}", "root", 0) for n in (1, 2)},
                         job_energy_j=a.job_energy_j, unattributed_j=a.unattributed_j)
        return tick_to_lines(rec, host="h")

    def joules(line: str) -> float:
        [field] = [f for f in line.split(" ")[1].split(",") if f.startswith("joules=")]
        return float(field.removeprefix("joules="))

    with_node = lines(True)
    assert [joules(ln) for ln in with_node if ln.startswith("job_energy") and "kind=other" in ln] == [
        pytest.approx(180.0), pytest.approx(60.0)]
    assert [joules(ln) for ln in with_node if ln.startswith("unattributed_energy,host=h,kind=other")] == [
        pytest.approx(60.0)]
    assert [joules(ln) for ln in with_node if ln.startswith("device_power") and "kind=node" in ln] == [1000.0]
    assert not [ln for ln in lines(False) if "kind=other" in ln or "kind=node" in ln]
