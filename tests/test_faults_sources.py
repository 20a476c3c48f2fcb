"""The fault matrix, energy sources (issue 7): faults in the GPU (NVML) and RAPL
sources, injected into the real daemon process, and a source read that blocks past its
deadline in the real Engine in-process.

Cases: a GPU lost mid-run; NVML hanging (sim ``hang_s``); NVML features unsupported;
a RAPL zone unreadable, then back; RAPL wrapping on consecutive ticks; a powercap zone
vanishing; a stuck source read left behind at the deadline and booked late. What every
case checks: tests/faults_common.py.
"""

from __future__ import annotations

import threading
import time

import pytest
from daemon_harness import sample, wait_ticks
from faults_common import (
    Cadence,
    ZoneFeeder,
    assert_conserved,
    assert_logged_once,
    assert_no_traceback,
    assert_part,
    degraded_parts,
    energy,
    log_lines,
    make_daemon,
    my_jobs,
    rate,
    wait_job,
    wait_part,
)
from gpusim import gpu, proc, write_sim
from powercap import PowercapTree
from wattprint.daemon.model import DeviceReading
from wattprint.daemon.procs import ProcessTracker
from wattprint.daemon.sources.rapl import RaplSource


def test_gpu_lost_mid_run(tmp_path, labelled_process, tag):
    job = labelled_process(f"lost-{tag}")
    sim = tmp_path / "sim.json"
    gpus = lambda lost: [gpu(0, power_w=250.0, processes=[proc(job.pid, sm_util=90)]),  # noqa: E731
                         gpu(1, power_w=100.0, processes=[proc(job.pid, sm_util=50)], lost=lost)]
    write_sim(sim, gpus(False))
    daemon = make_daemon(tmp_path, sim_file=sim, powercap_root=None)
    try:
        daemon.start()
        wait_job(daemon, f"lost-{tag}")
        wait_ticks(daemon, 2)
        m0 = daemon.metrics()
        cadence = Cadence(daemon)

        write_sim(sim, gpus(True))  # gpu1 falls off the bus
        wait_part(daemon, "gpu", "degraded", contains="gpu1")
        assert_part(daemon, "gpu", "degraded", contains="GpuIsLost")
        assert degraded_parts(daemon) == {"gpu"}
        m1 = daemon.metrics()
        cadence.watch_ticks(4)
        m2 = daemon.metrics()
        assert rate(m1, m2, "gpu", "gpu0") == pytest.approx(250.0, rel=0.03)  # the other GPU goes on
        assert energy(m2, "gpu", "gpu1") == energy(m1, "gpu", "gpu1")  # nothing read from the lost one

        write_sim(sim, gpus(False))  # back (e.g. after a reset)
        wait_part(daemon, "gpu", "ok")
        wait_ticks(daemon, 2)
        cadence.check()
        m3 = daemon.metrics()
        # The lost span is booked when it is back: the counter kept its baseline.
        assert rate(m0, m3, "gpu", "gpu1") == pytest.approx(100.0, rel=0.03)
        assert rate(m0, m3, "gpu", "gpu0") == pytest.approx(250.0, rel=0.03)
        assert_part(daemon, "gpu", "ok")
        assert_logged_once(daemon, "gpu")
        assert_conserved(daemon)
        assert_no_traceback(daemon)
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_nvml_hanging_call_does_not_stop_the_tick(tmp_path, labelled_process, tag):
    job = labelled_process(f"hang-{tag}")
    sim = tmp_path / "sim.json"
    gpus = lambda hang: [gpu(0, power_w=200.0, processes=[proc(job.pid, sm_util=90)]),  # noqa: E731
                         gpu(1, power_w=100.0, hang_s=hang)]
    write_sim(sim, gpus(0))
    daemon = make_daemon(tmp_path, sim_file=sim, powercap_root=None)
    try:
        daemon.start()
        wait_job(daemon, f"hang-{tag}")
        wait_ticks(daemon, 2)
        m0 = daemon.metrics()
        cadence = Cadence(daemon)

        write_sim(sim, gpus(2.5))  # NVML blocks 2.5 s in every read of gpu1
        wait_part(daemon, "gpu", "degraded", timeout_s=5.0, contains="timed out")
        assert_part(daemon, "gpu", "degraded", contains="read timed out")
        assert degraded_parts(daemon) == {"gpu"}
        cadence.watch_ticks(6)  # several stuck reads in a row; the ticks go on
        m1 = daemon.metrics()
        assert sample(m1, "wattprint_source_read_timeouts_total") >= 3
        assert sample(m1, "wattprint_source_errors_total", source="gpu") >= 3

        write_sim(sim, gpus(0))
        wait_part(daemon, "gpu", "ok", timeout_s=10.0)
        wait_ticks(daemon, 2)
        cadence.check()
        m2 = daemon.metrics()
        # What the stuck reads measured was booked when they returned: nothing lost.
        assert rate(m0, m2, "gpu", "gpu0") == pytest.approx(200.0, rel=0.03)
        assert rate(m0, m2, "gpu", "gpu1") == pytest.approx(100.0, rel=0.03)
        assert_logged_once(daemon, "gpu")
        assert_conserved(daemon)
        [mine] = my_jobs(daemon, f"hang-{tag}")
        # The job is alone on gpu0: all of gpu0's energy since the job appeared is its.
        assert mine["energy_j"]["gpu"] == pytest.approx(energy(m2, "gpu", "gpu0"), rel=0.05)
        assert_no_traceback(daemon)
        assert daemon.stop() == 0  # a stop is not held up by the driver
    finally:
        daemon.kill()


def test_nvml_unsupported_features_use_sampled_power_and_stay_ok(tmp_path, labelled_process, tag):
    job = labelled_process(f"unsup-{tag}")
    # Two processes: the collector asks for per-process utilisation only when a GPU is
    # shared (a sole process gets all of it), so one process would never meet the
    # unsupported call.
    other = labelled_process(f"unsup2-{tag}")
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=180.0, energy_counter=False, util_supported=False,
                        processes=[proc(job.pid, sm_util=90), proc(other.pid, sm_util=10)])])
    daemon = make_daemon(tmp_path, sim_file=sim, powercap_root=None)
    try:
        daemon.start()
        found = wait_job(daemon, f"unsup-{tag}")
        assert found["energy_sources"]["gpu"] == "power"
        m1 = daemon.metrics()
        cadence = Cadence(daemon)
        cadence.watch_ticks(4)
        cadence.check()
        m2 = daemon.metrics()
        assert rate(m1, m2, "gpu", "gpu0") == pytest.approx(180.0, rel=0.03)
        info = {dict(labels)["source"] for (metric, labels) in m2
                if metric == "wattprint_device_info" and dict(labels)["device"] == "gpu0"}
        assert info == {"power"}
        assert_part(daemon, "gpu", "ok")  # unsupported is a fact, not a fault
        assert log_lines(daemon, "wattprint.health: gpu degraded") == []
        assert len(log_lines(daemon, "energy counter not supported")) == 1  # said once, not per tick
        assert len(log_lines(daemon, "process utilisation not supported")) == 1
        assert_conserved(daemon)
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_rapl_zone_unreadable_then_back(tmp_path, labelled_process, tag):
    tree = PowercapTree(tmp_path / "powercap")
    zones = tree.add_package(0, dram=True)
    pkg, dram = zones["package"], zones["dram"]
    feeder = ZoneFeeder(tree, {pkg: 30.0, dram: 6.0})
    daemon = make_daemon(tmp_path, sim_file=None, powercap_root=tree.root)
    energy_file = tree.root / pkg / "energy_uj"
    try:
        daemon.start()
        wait_ticks(daemon, 3)
        m0 = daemon.metrics()
        cadence = Cadence(daemon)

        feeder.hold(pkg)  # energy_uj becomes unreadable (root ignores modes: make it a directory)
        energy_file.unlink()
        energy_file.mkdir()
        wait_part(daemon, "rapl", "degraded", contains="Is a directory")
        assert_part(daemon, "rapl", "degraded", contains="package-0")
        assert degraded_parts(daemon) == {"rapl"}
        m1 = daemon.metrics()
        cadence.watch_ticks(4)
        m2 = daemon.metrics()
        assert rate(m1, m2, "dram", "dram-0") == pytest.approx(6.0, rel=0.03)  # the other zone goes on
        assert energy(m2, "cpu", "package-0") == energy(m1, "cpu", "package-0")

        energy_file.rmdir()
        feeder.release(pkg)  # readable again; the counter ran on meanwhile
        wait_part(daemon, "rapl", "ok")
        wait_ticks(daemon, 2)
        cadence.check()
        m3 = daemon.metrics()
        assert rate(m0, m3, "cpu", "package-0") == pytest.approx(30.0, rel=0.03)  # the gap is booked
        assert rate(m0, m3, "dram", "dram-0") == pytest.approx(6.0, rel=0.03)
        assert_logged_once(daemon, "rapl")
        assert_conserved(daemon)
        assert_no_traceback(daemon)
        assert daemon.stop() == 0
    finally:
        feeder.stop()
        daemon.kill()


def test_rapl_wrapping_on_consecutive_ticks(tmp_path):
    # In-process first, exactly: a counter that wraps between every pair of reads.
    tree = PowercapTree(tmp_path / "exact")
    z = tree.add_package(0, max_energy_range_uj=10_000_000, dram=False, core=False, start_uj=9_000_000)
    src = RaplSource(str(tree.root))
    src.read(0.0)
    total = 0.0
    for i in range(1, 11):
        tree.advance(z["package"], 7_000_000)  # 0.7 of the range per interval: a wrap at most reads
        (r,) = src.read(float(i))
        total += r.energy_j
        assert r.energy_j == 7.0 and r.power_w == 7.0
    assert total == 70.0
    assert src._states[0].diff.wraps >= 6  # wrapped on consecutive reads, counted each time

    # The real daemon: 20 W into a 30 J range wraps every 1.5 s, so most ticks see a wrap.
    tree = PowercapTree(tmp_path / "powercap")
    zones = tree.add_package(0, max_energy_range_uj=30_000_000, dram=True)
    feeder = ZoneFeeder(tree, {zones["package"]: 20.0, zones["dram"]: 4.0})
    daemon = make_daemon(tmp_path, sim_file=None, powercap_root=tree.root)
    try:
        daemon.start()
        wait_ticks(daemon, 2)
        m1 = daemon.metrics()
        cadence = Cadence(daemon)
        wraps0 = feeder.wraps[zones["package"]]
        cadence.watch_ticks(7)
        cadence.check(max_overruns=0)  # a late tick could alias a whole range: none may be late
        m2 = daemon.metrics()
        assert feeder.wraps[zones["package"]] - wraps0 >= 4
        assert rate(m1, m2, "cpu", "package-0") == pytest.approx(20.0, rel=0.02)
        assert rate(m1, m2, "dram", "dram-0") == pytest.approx(4.0, rel=0.02)
        assert_part(daemon, "rapl", "ok")
        assert log_lines(daemon, "wattprint.health: rapl degraded") == []
        assert_conserved(daemon)
        assert daemon.stop() == 0
    finally:
        feeder.stop()
        daemon.kill()


def test_powercap_zone_vanishes_mid_run(tmp_path):
    tree = PowercapTree(tmp_path / "powercap")
    zones = tree.add_package(0, dram=True, start_uj=50_000_000_000)
    pkg, dram = zones["package"], zones["dram"]
    feeder = ZoneFeeder(tree, {pkg: 25.0, dram: 5.0})
    daemon = make_daemon(tmp_path, sim_file=None, powercap_root=tree.root)
    try:
        daemon.start()
        wait_ticks(daemon, 3)
        cadence = Cadence(daemon)

        feeder.hold(dram)
        tree.remove_zone(dram)  # the dram zone vanishes (module unloaded)
        wait_part(daemon, "rapl", "degraded", contains="vanished")
        assert_part(daemon, "rapl", "degraded", contains="dram-0")
        assert degraded_parts(daemon) == {"rapl"}
        m1 = daemon.metrics()
        cadence.watch_ticks(3)
        m2 = daemon.metrics()
        assert rate(m1, m2, "cpu", "package-0") == pytest.approx(25.0, rel=0.03)
        assert energy(m2, "dram", "dram-0") == energy(m1, "dram", "dram-0")

        # It comes back with its counter restarted far below the old value: a fresh
        # baseline, not a "wrap" worth most of a 262 kJ range.
        tree.add_zone(dram, "dram", start_uj=0)
        feeder.restart(dram, 0)
        wait_part(daemon, "rapl", "ok")
        m3 = daemon.metrics()
        wait_ticks(daemon, 3)
        cadence.check()
        m4 = daemon.metrics()
        assert energy(m4, "dram", "dram-0") - energy(m2, "dram", "dram-0") < 5.0 * 8
        assert rate(m3, m4, "dram", "dram-0") == pytest.approx(5.0, rel=0.05)
        assert_logged_once(daemon, "rapl")
        assert_conserved(daemon)
        assert_no_traceback(daemon)
        assert daemon.stop() == 0
    finally:
        feeder.stop()
        daemon.kill()


def test_source_read_deadline_in_process(make_engine):
    """A read that blocks is left behind at the deadline; no second read of that
    source starts while it is stuck; what it returns late is booked with the next
    tick, merged with that tick's own read."""
    gate = threading.Event()
    calls: list[float] = []

    class Stuck:
        name = "stuck"

        def read(self, now):
            calls.append(now)
            if len(calls) == 2:
                gate.wait(30)
            return [DeviceReading(kind="cpu", device="pkg", energy_j=10.0, power_w=10.0, source="counter",
                                  interval_s=1.0)]

        def problems(self):
            return []

        def close(self):
            pass

    engine = make_engine(sources=[Stuck()], tracker=ProcessTracker(), interval_s=0.5,
                         read_timeout_s=None)  # the real deadline: 0.8 x the interval
    try:
        wall = 1_795_000_000.0
        engine.tick_blocking(1.0, wall)
        t0 = time.monotonic()
        snap = engine.tick_blocking(2.0, wall + 1)
        assert time.monotonic() - t0 < 0.45 + 0.3  # 0.8 x 0.5 s, plus the rest of the tick
        h = {x.name: x for x in snap.health}["stuck"]
        assert h.state == "degraded" and "timed out" in h.detail
        engine.tick_blocking(3.0, wall + 2)
        assert len(calls) == 2  # no read stacked on the stuck one
        gate.set()
        time.sleep(0.1)
        snap = engine.tick_blocking(4.0, wall + 3)
        assert len(calls) == 3
        assert {x.name: x.state for x in snap.health}["stuck"] == "ok"
        [dev] = snap.devices
        assert dev.energy_j_total == pytest.approx(30.0)  # 1st + late 2nd + 3rd read: nothing lost
        assert snap.counters["source_read_timeouts_total"] == 2
    finally:
        engine.close()

