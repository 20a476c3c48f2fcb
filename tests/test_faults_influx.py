"""The fault matrix, InfluxDB and its spool (issue 7): the real influxd hanging
(through tests/fault_proxy.py) and down while the spool fills past its cap, each
checked for completeness and duplicates in what arrived; the spool on a full disk,
in-process. What every case checks: tests/faults_common.py.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any, Iterator

import pytest
from daemon_harness import sample, wait_ticks
from fault_proxy import FaultProxy
from faults_common import (
    INFLUX_DB,
    Cadence,
    assert_conserved,
    assert_contiguous,
    assert_logged_once,
    assert_no_traceback,
    assert_part,
    degraded_parts,
    influx_gpu0_stamps,
    influx_job_joules,
    influx_toml,
    log_lines,
    make_daemon,
    part,
    rate,
    tick_at,
    until_ticks,
    wait_drained,
    wait_job,
    wait_part,
)
from gpusim import gpu, proc, write_sim


@pytest.fixture
def real_influx(influxdb_server, background_app) -> Iterator[tuple[FaultProxy, Any]]:
    """The real influxd (tests/servers.py), behind the fault proxy (tests/fault_proxy.py)
    whose mode the test switches ("forward", "hang", ...): (proxy, server). Hanging
    requests are released afterwards, so the proxy stops at once."""
    influxdb_server.create_database(INFLUX_DB)
    proxy = FaultProxy(influxdb_server.url, hang_max_s=300.0)
    proxy.url = background_app(proxy.app()).url
    try:
        yield proxy, influxdb_server
    finally:
        proxy.release()


def test_influxdb_hanging(tmp_path, labelled_process, tag, real_influx):
    """The real influxd behind a proxy that accepts the writes and never answers (the
    client's timeout fires). Nothing reaches influxd meanwhile, the spool keeps every
    point; when it answers again everything arrives: complete (one device_power point
    per tick, no gap; the job's joules in influxd equal its total) and never twice (no
    line acknowledged twice, no duplicate timestamp)."""
    proxy, influx = real_influx
    proxy.set("hang")
    job = labelled_process(f"ihang-{tag}")
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=120.0, processes=[proc(job.pid, used_memory_bytes=None, sm_util=90)])])
    daemon = make_daemon(tmp_path, sim_file=sim, powercap_root=None, extra_toml=influx_toml(proxy.url))
    try:
        daemon.start()
        cadence = Cadence(daemon)
        job_id = wait_job(daemon, f"ihang-{tag}")["id"]
        wait_part(daemon, "influxdb", "degraded", contains="timeout")
        assert_part(daemon, "influxdb", "degraded")
        assert degraded_parts(daemon) == {"influxdb"}
        m1 = daemon.metrics()
        cadence.watch_ticks(4)
        m2 = daemon.metrics()
        # Nothing delivered; the spool grows with every tick (and keeps all of it).
        assert sample(m2, "wattprint_spool_pending_points") > sample(m1, "wattprint_spool_pending_points") > 0
        span = tick_at(m2) - tick_at(m1)
        assert sample(m2, "wattprint_spool_oldest_age_seconds") >= span - 0.5
        assert sample(m2, "wattprint_influx_points_dropped_spool_full_total") == 0
        assert not proxy.delivered and influx_gpu0_stamps(influx) == []
        assert rate(m1, m2, "gpu", "gpu0") == pytest.approx(120.0, rel=0.03)
        cadence.check()

        proxy.set("forward")  # it answers again: the backlog goes out
        wait_part(daemon, "influxdb", "ok", timeout_s=30.0)
        wait_drained(daemon)
        # The job ends, so its total stops moving; then a clean stop flushes the rest.
        labelled_process.end(job)
        write_sim(sim, [gpu(0, power_w=120.0, processes=[])])
        until_ticks(daemon, lambda: daemon.get(f"/api/v1/jobs/{urllib.parse.quote(job_id, safe='')}")["state"]
                    == "finished", "job finished")
        final = daemon.get(f"/api/v1/jobs/{urllib.parse.quote(job_id, safe='')}")
        ticks = sample(daemon.metrics(), "wattprint_ticks_total")
        assert_logged_once(daemon, "influxdb")
        assert_conserved(daemon)
        assert_no_traceback(daemon)
        assert daemon.stop() == 0

        # Complete: every tick's device_power point, the job's every joule...
        stamps = influx_gpu0_stamps(influx)
        assert_contiguous(stamps)
        assert len(stamps) >= ticks, (len(stamps), ticks)
        assert influx_job_joules(influx, job_id) == pytest.approx(final["energy_j"]["total"], rel=1e-6)
        # ...and never twice: no line was acknowledged by influxd more than once.
        assert proxy.delivered_twice() == []
    finally:
        proxy.set("forward")
        proxy.release()  # a hanging handler returns, so the proxy can stop
        daemon.kill()


def test_spool_at_its_cap_drops_the_oldest_and_counts_them(tmp_path, labelled_process, tag, influxdb_server):
    """The real influxd is down (stopped) while the spool fills past its 4 KiB cap: the
    oldest points are dropped and counted, the spool stays bounded. When influxd is back
    (the sender finds it at its next retry; the spool may drop more meanwhile) what was
    kept arrives: no point twice, the missing ticks no more than the lines the daemon
    counted as dropped, and once delivery has resumed no further drop and every tick's
    point, without a gap. (The batch the sender held while retrying is delivered when
    influxd returns, so the very first tick's point may survive the cap.)"""
    influxdb_server.create_database(INFLUX_DB)
    influxdb_server.stop()  # down from the start
    job = labelled_process(f"cap-{tag}")
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=120.0, processes=[proc(job.pid, used_memory_bytes=None, sm_util=90)])])
    daemon = make_daemon(tmp_path, sim_file=sim, powercap_root=None,
                         extra_toml=influx_toml(influxdb_server.url, spool_max_bytes=4096))
    try:
        daemon.start()
        first_tick_at = tick_at(daemon.metrics())
        cadence = Cadence(daemon)
        wait_part(daemon, "influxdb", "degraded", contains="unreachable")
        assert_part(daemon, "influxdb", "degraded")
        assert degraded_parts(daemon) == {"influxdb"}
        for _ in range(30):  # one check per tick until points are being dropped
            m = daemon.metrics()
            # Bounded: the cap, plus the active segment's last append (one tick's lines,
            # more when other labelled jobs run on this machine).
            assert sample(m, "wattprint_spool_bytes") <= 4096 + 64 * 1024
            if sample(m, "wattprint_influx_points_dropped_spool_full_total") > 0:
                break
            wait_ticks(daemon, 1)
        wait_ticks(daemon, 2)
        m = daemon.metrics()
        assert sample(m, "wattprint_spool_bytes") <= 4096 + 64 * 1024
        assert sample(m, "wattprint_influx_points_dropped_spool_full_total") > 0
        cadence.check()
        # One line when it became unreachable, then one when data began to be lost
        # (spool full), then at most one per tenfold of lost lines: never one per tick.
        down = log_lines(daemon, "wattprint.health: influxdb degraded:")
        assert "unreachable" in down[0] and " WARNING " in down[0], down
        assert down[1:] and all("spool full" in line for line in down[1:]), down
        assert len(down) <= 4, down
        assert not log_lines(daemon, "wattprint.health: influxdb recovered")

        influxdb_server.start()  # back: what the spool kept goes out
        # Reachable again; still degraded: the loss episode lasts 60 s after the last
        # drop (docs/influxdb.md), and it says so.
        until_ticks(daemon, lambda: "unreachable" not in part(daemon, "influxdb")["detail"], "influxd reachable", 30)
        assert_part(daemon, "influxdb", "degraded", contains="spool full")
        wait_drained(daemon)
        m_back = daemon.metrics()  # delivering again: from this tick on nothing may be lost
        wait_ticks(daemon, 3)
        wait_drained(daemon)
        m_end = daemon.metrics()
        assert sample(m_end, "wattprint_influx_points_dropped_spool_full_total") == \
            sample(m_back, "wattprint_influx_points_dropped_spool_full_total")
        stamps = influx_gpu0_stamps(influxdb_server)
        assert len(stamps) == len(set(stamps)), "duplicate timestamps"
        # Every tick wrote one gpu0 point; the missing ones are accounted for by the
        # daemon's drop count (each missing tick lost at least that line).
        missing = sample(m_end, "wattprint_ticks_total") - len(stamps)
        assert 0 < missing <= sample(m_end, "wattprint_influx_points_dropped_spool_full_total"), (missing, stamps)
        assert stamps[0] / 1e9 >= first_tick_at - 1e-3
        since_back = [t for t in stamps if t / 1e9 >= tick_at(m_back) - 1e-3]
        assert len(since_back) >= 3
        assert_contiguous(since_back)  # since delivery resumed: every tick, once each
        assert since_back[0] / 1e9 == pytest.approx(tick_at(m_back), abs=1e-3)
        assert since_back[-1] / 1e9 == pytest.approx(tick_at(m_end), abs=1.6)
        assert_conserved(daemon)
        assert_no_traceback(daemon)
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_spool_on_a_full_disk_leaves_no_empty_segments_and_keeps_its_position(tmp_path, monkeypatch):
    import wattprint.exporters.spool as spool_mod
    from wattprint.exporters.spool import Spool

    real_write, real_replace = os.write, os.replace
    full = {"on": False}

    def write(fd, data):
        if full["on"]:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    def replace(src, dst):
        if full["on"]:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(spool_mod.os, "write", write)
    monkeypatch.setattr(spool_mod.os, "replace", replace)
    with Spool(str(tmp_path), segment_bytes=4096) as sp:
        sp.append([f"m v={i}i {i}" for i in range(3)])
        lines, cursor = sp.peek(10)
        full["on"] = True
        for i in range(50):  # a long disk-full spell: every append fails
            with pytest.raises(OSError):
                sp.append([f"m v={i}i {i}" * 300])  # (each would need a new segment)
        assert sp.commit(cursor) == 3  # delivered meanwhile: the cursor file cannot be written
        assert sp.cursor_save_errors_total == 1
        assert len(list(tmp_path.glob("seg-*.wal"))) <= 1  # no trail of empty segment files
        full["on"] = False
        sp.append(["m v=99i 99"])
        assert sp.peek(10)[0] == ["m v=99i 99"]  # position kept in memory, nothing replayed twice now

