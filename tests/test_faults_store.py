"""The fault matrix, the SQLite store (issue 7): the disk under the state dir full
(store and spool, with the real influxd up), store writes failing in-process (the
backlog kept in memory and written later, its cap), and the store corrupt, locked or
held by a second daemon at start (a clear error, the store left as it is). What every
case checks: tests/faults_common.py.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from daemon_harness import DaemonProcess, sample, wait_ticks
from faults_common import (
    INFLUX_DB,
    Cadence,
    assert_conserved,
    assert_contiguous,
    assert_logged_once,
    assert_no_traceback,
    assert_part,
    degraded_parts,
    energy,
    health,
    influx_gpu0_stamps,
    influx_toml,
    log_lines,
    make_daemon,
    my_jobs,
    rate,
    tick_at,
    until_ticks,
    wait_drained,
    wait_job,
    wait_part,
)
from gpusim import gpu, proc, write_sim
from wattprint.daemon.ledger import JobTick, Ledger, LedgerReader
from wattprint.daemon.procs import JobIdentity
from wattprint.daemon.sources.gpu import NvmlGpuSource
from wattprint.daemon.sources.nvml_sim import SimulatedNvml


class PipedDaemon(DaemonProcess):
    """The daemon with its output pumped through a pipe into the log file, so that a
    file size limit (RLIMIT_FSIZE) put on the daemon never applies to its log."""

    def start(self, timeout_s: float = 20.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wattprint.daemon", "run", "--config", str(self.config_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env)
        source = self.proc.stdout

        def pump() -> None:
            with open(self.log_path, "ab") as out:
                for chunk in iter(lambda: source.read1(65536), b""):
                    out.write(chunk)
                    out.flush()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.get("/healthz", allow_error=True).get("tick", 0) >= 1:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"daemon not ready after {timeout_s}s:\n{self.log_tail()}")


class SmallDisk:
    """A nearly full filesystem under the daemon's state_dir.

    Preferred: a small tmpfs mounted there (root). Else a loop-mounted ext4 image.
    Else (no mount rights) RLIMIT_FSIZE on the daemon process: writes past the size
    each file has when ``fill()`` is called fail with EFBIG, as a full disk fails them
    with ENOSPC. Without any of these the test skips, but fails under CI=true."""

    def __init__(self, directory: Path, size_mb: int = 24):
        self.dir = directory
        self.mode = ""
        self.filler = directory / "filler"
        self.image = directory.parent / "small-disk.img"
        self.pid: int | None = None
        directory.mkdir(parents=True, exist_ok=True)
        why: list[str] = []
        forced = os.environ.get("WATTPRINT_TEST_SMALL_DISK", "")  # tmpfs | loop | fsize: try only that
        if forced == "fsize":
            self.mode = "fsize"
            return
        if os.geteuid() == 0 and forced in ("", "tmpfs"):
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0750", "tmpfs", str(directory)],
                               capture_output=True, text=True)
            if r.returncode == 0:
                self.mode = "tmpfs"
                return
            why.append(f"tmpfs: {r.stderr.strip()}")
        if os.geteuid() == 0 and forced in ("", "loop"):
            if shutil.which("mkfs.ext4"):
                with open(self.image, "wb") as fh:
                    fh.truncate(size_mb << 20)
                mk = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(self.image)], capture_output=True, text=True)
                r = subprocess.run(["mount", "-o", "loop", str(self.image), str(directory)], capture_output=True, text=True)
                if mk.returncode == 0 and r.returncode == 0:
                    self.mode = "loop"
                    return
                why.append(f"loop: {(mk.stderr + r.stderr).strip()}")
        if os.geteuid() != 0:
            why.append("not root: no mount")
        self.mode = "fsize"  # works unprivileged too: lowering a child's soft limit
        self.why = "; ".join(why)

    def attach(self, pid: int) -> None:
        self.pid = pid

    def fill(self) -> None:
        if self.mode == "fsize":
            assert self.pid is not None
            limit = 1  # no write past the first byte of any file: as full as a disk gets
            _, hard = resource.prlimit(self.pid, resource.RLIMIT_FSIZE)
            resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (limit, hard))
            return
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            block = b"\0" * 65536
            while True:
                try:
                    os.write(fd, block)
                except OSError:
                    if len(block) == 1:
                        break
                    block = block[: len(block) // 16]
        finally:
            os.close(fd)

    def free(self) -> None:
        if self.mode == "fsize":
            assert self.pid is not None
            _, hard = resource.prlimit(self.pid, resource.RLIMIT_FSIZE)
            resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (hard, hard))
            return
        self.filler.unlink(missing_ok=True)

    def close(self) -> None:
        if self.mode in ("tmpfs", "loop"):
            if subprocess.run(["umount", str(self.dir)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(self.dir)], capture_output=True)
        self.image.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[SmallDisk]:
    disk = SmallDisk(tmp_path / "state")
    try:
        yield disk
    finally:
        disk.close()


def test_disk_full_for_the_store_and_the_spool(tmp_path, labelled_process, tag, small_disk, influxdb_server):
    """The disk under the state dir fills (store and spool), with the real influxd up.
    What the spool could not write is dropped and counted; in influxd the points are
    contiguous and once each up to the fill and again after the disk is free."""
    influxdb_server.create_database(INFLUX_DB)
    job = labelled_process(f"full-{tag}")
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=200.0, processes=[proc(job.pid, used_memory_bytes=None, sm_util=90)])])
    kind = PipedDaemon if small_disk.mode == "fsize" else DaemonProcess
    daemon = make_daemon(tmp_path, cls=kind, sim_file=sim, powercap_root=None,
                         extra_toml=influx_toml(influxdb_server.url))
    try:
        daemon.start()
        small_disk.attach(daemon.proc.pid)
        wait_job(daemon, f"full-{tag}")
        until_ticks(daemon, lambda: len(influx_gpu0_stamps(influxdb_server)) > 0, "first points in influxd")
        wait_ticks(daemon, 1)
        cadence = Cadence(daemon)

        wait_drained(daemon)
        filled_after = tick_at(daemon.metrics())  # everything up to this tick is in influxd
        small_disk.fill()
        wait_part(daemon, "store", "degraded")
        wait_part(daemon, "influxdb", "degraded", contains="spool write failed")
        assert_part(daemon, "store", "degraded")
        assert degraded_parts(daemon) == {"store", "influxdb"}
        m1 = daemon.metrics()
        jobs1 = my_jobs(daemon, f"full-{tag}")
        cadence.watch_ticks(4)
        m2 = daemon.metrics()
        # The rest goes on: in-memory totals, metrics and the API (reads) keep working.
        assert rate(m1, m2, "gpu", "gpu0") == pytest.approx(200.0, rel=0.03)
        [mine] = my_jobs(daemon, f"full-{tag}")
        assert mine["id"] == jobs1[0]["id"] and mine["state"] == "running"
        assert sample(m2, "wattprint_store_pending_ticks") >= 3
        assert sample(m2, "wattprint_influx_points_dropped_spool_error_total") > \
            sample(m1, "wattprint_influx_points_dropped_spool_error_total")
        assert_conserved(daemon)

        small_disk.free()
        wait_part(daemon, "store", "ok")
        wait_part(daemon, "influxdb", "ok")
        freed_at = tick_at(daemon.metrics())
        wait_ticks(daemon, 2)
        wait_drained(daemon)
        cadence.check()
        m3 = daemon.metrics()
        stamps = influx_gpu0_stamps(influxdb_server)
        before = [t for t in stamps if t / 1e9 <= filled_after + 1e-3]
        after = [t for t in stamps if t / 1e9 > freed_at + 1e-3]
        assert_contiguous(before)  # up to the fill: all there, once each
        assert_contiguous(after)  # since the disk is free: all there, once each
        assert before[-1] / 1e9 >= filled_after - 1.6  # (the tick after the drain may have been lost)
        assert after[-1] / 1e9 == pytest.approx(tick_at(m3), abs=1.6)
        assert len(stamps) == len(set(stamps))
        assert sample(m3, "wattprint_store_pending_ticks") == 0
        # The ledger caught up: the ticks kept in memory while the disk was full were
        # written afterwards, so the store has as much energy as the in-memory totals.
        host = assert_conserved(daemon)
        ledger_gpu = host["device_energy_j"]["gpu"]
        assert ledger_gpu == pytest.approx(energy(m3, "gpu", "gpu0"), abs=200.0 * 1.5)
        for name in ("store", "influxdb"):
            assert_logged_once(daemon, name)
        assert_no_traceback(daemon)
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_store_write_failures_are_kept_and_written_later(tmp_path, labelled_process, tag, monkeypatch, make_engine):
    """In-process: ticks that could not be stored are written, in order, once the
    store works again; beyond the in-memory cap the oldest are dropped and counted."""
    import wattprint.daemon.engine.store as engine_mod  # the store writer reads STORE_BACKLOG_MAX_TICKS

    job = labelled_process(f"backlog-{tag}")
    time.sleep(0.3)
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=100.0, processes=[proc(job.pid, sm_util=80)])])
    clock = {"mono": 100.0, "wall": 1_795_000_000.0}
    engine = make_engine(sources=[NvmlGpuSource(SimulatedNvml(str(sim), clock=lambda: clock["mono"]))],
                         read_timeout_s=5.0)
    ledger, path = engine.ledger, engine.ledger.path
    real = ledger.record_ticks
    broken = {"on": False}

    def record_ticks(rows):
        if broken["on"]:
            raise sqlite3.OperationalError("database or disk is full")
        return real(rows)

    monkeypatch.setattr(ledger, "record_ticks", record_ticks)

    def tick():
        clock["mono"] += 1.0
        clock["wall"] += 1.0
        return engine.tick_blocking(clock["mono"], clock["wall"])

    try:
        tick()
        broken["on"] = True
        for _ in range(10):
            snap = tick()
        assert {h.name: h.state for h in snap.health}["store"] == "degraded"
        assert snap.counters["store_pending_ticks"] == 10
        broken["on"] = False
        snap = tick()
        assert {h.name: h.state for h in snap.health}["store"] == "ok"
        assert snap.counters["store_pending_ticks"] == 0
        reader = LedgerReader(path)
        [mine] = [j for j in reader.jobs(label=f"backlog-{tag}", now=clock["wall"])]
        assert mine["energy_j"]["gpu"] == pytest.approx(1100.0, rel=1e-9)  # 11 intervals, none lost
        assert reader.host_totals()["device_energy_j"]["gpu"] == pytest.approx(1100.0, rel=1e-9)

        monkeypatch.setattr(engine_mod, "STORE_BACKLOG_MAX_TICKS", 5)
        broken["on"] = True
        for _ in range(8):
            snap = tick()
        assert snap.counters["store_pending_ticks"] == 5
        assert snap.counters["store_ticks_dropped_total"] == 3
        broken["on"] = False
        tick()
        assert reader.host_totals()["device_energy_j"]["gpu"] == pytest.approx(1100.0 + 600.0, rel=1e-9)
        reader.close()
    finally:
        engine.close()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _make_store(path: Path, jobs: int = 300) -> None:
    """A real store with some history (several pages)."""
    ledger = Ledger(str(path), host="testhost", bucket_s=60)
    for j in range(jobs):
        ident = JobIdentity(job_id=f"{1000 + j}-1", label=f"old-{j}", label_source="WATTPRINT_JOB", uid=0,
                            user="root", command="python", root_pid=1000 + j, started_at=1_790_000_000.0 + j)
        ledger.record_tick(1_790_000_000.0 + 60 * j, [JobTick(ident, {"gpu": 100.0}, 1.0, 0, {"gpu": "counter"})],
                           [("gpu", "gpu0", 150.0, "counter")], {"gpu": 50.0}, None)
    ledger.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    ledger.close()


def _start_fails(daemon: DaemonProcess) -> int:
    with pytest.raises(RuntimeError, match="daemon exited"):
        daemon.start(timeout_s=30.0)
    assert daemon.proc is not None
    return daemon.proc.returncode


@pytest.mark.parametrize("damage", ["garbage", "pages"])
def test_corrupt_store_at_start_is_a_clear_error(tmp_path, damage):
    state = tmp_path / "state"
    state.mkdir()
    store = state / "wattprint.sqlite3"
    if damage == "garbage":
        store.write_bytes(b"definitely not SQLite\n" * 500)
    else:
        _make_store(store)
        data = bytearray(store.read_bytes())
        for i in range(3 * 4096 + 100, 6 * 4096, 7):  # scribble over a few b-tree pages
            data[i] = (data[i] * 31 + 7) & 0xFF
        store.write_bytes(bytes(data))
    before = _sha256(store)
    daemon = make_daemon(tmp_path, sim_file=None, powercap_root=None)
    try:
        code = _start_fails(daemon)
        assert code != 0
        [line] = log_lines(daemon, "cannot start:")
        assert str(store) in line and " ERROR " in line
        assert ("not a database" in line) if damage == "garbage" else ("malformed" in line or "damaged" in line)
        assert "left as it is" in line
        assert_no_traceback(daemon)
        assert _sha256(store) == before  # not overwritten, not replaced: nothing dropped
    finally:
        daemon.kill()


def test_locked_store_at_start_is_a_clear_error(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    store = state / "wattprint.sqlite3"
    _make_store(store, jobs=5)
    holder = sqlite3.connect(str(store), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # someone else is writing (a sqlite3 shell, a backup)
    daemon = make_daemon(tmp_path, sim_file=None, powercap_root=None)
    try:
        t0 = time.monotonic()
        code = _start_fails(daemon)
        assert code != 0 and time.monotonic() - t0 < 20
        [line] = log_lines(daemon, "cannot start:")
        assert str(store) in line and "locked" in line
        assert_no_traceback(daemon)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        daemon.kill()
    check = sqlite3.connect(str(store))
    assert check.execute("SELECT count(*), sum(gpu_j) FROM jobs").fetchone() == (5, 500.0)  # untouched
    check.close()


def test_second_daemon_on_the_same_store_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = make_daemon(tmp_path / "a", sim_file=None, powercap_root=None)
    state = tmp_path / "a" / "state"
    second = make_daemon(tmp_path / "b", sim_file=None, powercap_root=None,
                           env={"WATTPRINT_DAEMON_STATE_DIR": str(state)})
    try:
        first.start()
        code = _start_fails(second)
        assert code != 0
        [line] = log_lines(second, "cannot start:")
        assert str(state / "wattprint.sqlite3") in line and "another wattprint" in line
        assert_no_traceback(second)
        cadence = Cadence(first)
        wait_ticks(first, 2)
        cadence.check()  # the first one is not disturbed
        assert health(first)["status"] == "ok"
        assert first.stop() == 0
    finally:
        first.kill()
        second.kill()

