"""What the tracker reads per tick (issue 18): the periodic re-read of every process is
spread over the ticks of ``rescan_interval_s`` (no tick pays for all of them, none is
skipped), /proc listings report only what changed, and stat is parsed from bytes.

Real processes; the tick clock is the test's (``now_mono_s``), so slices are exact."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from wattprint.daemon.procs import ProcessTracker
from wattprint.daemon.procs.scan import (
    PAGE_SIZE,
    PidLister,
    parse_stat,
    parse_stat_bytes,
)

N_IDLE = 60


@pytest.fixture
def idle_processes():
    procs = [subprocess.Popen(["sleep", "120"], start_new_session=True) for _ in range(N_IDLE)]
    time.sleep(1.2)  # older than a second: not "young" (re-read every tick) any more
    yield {p.pid for p in procs}
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def counting(tracker: ProcessTracker) -> list[set[int]]:
    """Record, per observe, the PIDs whose stat the tracker read."""
    reads: list[set[int]] = []
    original = tracker._stats.read

    def read(pid: int):  # type: ignore[no-untyped-def]
        reads[-1].add(pid)
        return original(pid)

    tracker._stats.read = read  # type: ignore[method-assign]
    return reads


def test_periodic_reread_is_spread_over_the_interval_and_covers_every_process(idle_processes):
    interval = 10.0
    t = ProcessTracker(rescan_interval_s=interval, max_labels_per_user=100_000)
    reads = counting(t)
    t0 = 1000.0
    for k in range(2 * int(interval)):  # two rescan intervals of 1 s ticks
        reads.append(set())
        t.observe(t0 + k, [])
    # The first observe reads everything (nothing is known yet).
    assert idle_processes <= reads[0]
    # The second interval starts at tick 10: every idle process is re-read exactly
    # once over its ticks 10..19, and no tick reads more than its share (+1 for rounding).
    second = reads[int(interval):]
    per_tick = [len(r & idle_processes) for r in second]
    assert max(per_tick) <= math.ceil(N_IDLE / interval) + 1, per_tick
    assert sum(per_tick) == N_IDLE
    assert set().union(*second) >= idle_processes
    # The first interval's ticks 1..9 re-read none of them (they were all read at tick 0).
    assert all(not (r & idle_processes) for r in reads[1:int(interval)])


def test_rescan_not_longer_than_a_tick_reads_everything_every_tick(idle_processes):
    t = ProcessTracker(rescan_interval_s=0.5, max_labels_per_user=100_000)
    reads = counting(t)
    for k in range(3):
        reads.append(set())
        view = t.observe(2000.0 + k, [])
        assert view.scanned
        assert idle_processes <= reads[-1]


def test_a_process_that_execs_with_a_label_is_found_within_the_rescan_interval(tmp_path: Path):
    # Unlabelled when first seen (and no longer young), then it execs into a labelled
    # program: only the periodic re-read notices (its command changed) and reads its
    # label again, as the old all-at-once re-read did.
    go = tmp_path / "go"
    script = f"while [ ! -e {go} ]; do sleep 0.05; done; exec env WATTPRINT_JOB=late-exec sleep 60"
    p = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    try:
        time.sleep(1.2)
        interval = 6.0
        t = ProcessTracker(rescan_interval_s=interval, max_labels_per_user=100_000)
        t0 = 5000.0
        first = t.observe(t0, [])
        assert p.pid not in first.pid_to_job
        go.write_text("")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with open(f"/proc/{p.pid}/stat", "rb") as fh:
                if b"(sleep)" in fh.read():
                    break
            time.sleep(0.05)
        found_at = None
        for k in range(1, 2 * int(interval) + 1):
            view = t.observe(t0 + k, [])
            job = next((j for j in view.jobs if p.pid in j.pids), None)
            if job is not None:
                assert job.identity.label == "late-exec"
                found_at = k
                break
        assert found_at is not None and found_at <= 2 * interval
    finally:
        p.kill()
        p.wait()


def test_pid_lister_reports_only_changes(tmp_path: Path):
    for name in ("1", "22", "333", "self", "meminfo"):
        (tmp_path / name).mkdir()
    lister = PidLister(str(tmp_path))
    new, gone, names = lister.changes()
    assert new == {1, 22, 333} and gone == set() and "self" in names
    (tmp_path / "22").rmdir()
    (tmp_path / "4444").mkdir()
    new, gone, _ = lister.changes()
    assert new == {4444} and gone == {22}
    assert lister.changes()[:2] == (set(), set())


def test_stat_parsed_from_bytes_matches_proc5_fields():
    # proc(5): field 2 comm in parentheses (may hold spaces and ')'), 4 ppid, 5 pgrp,
    # 14 utime, 15 stime, 16 cutime, 17 cstime, 22 starttime, 24 rss (pages).
    fields = ["S", "7", "8"] + [str(100 + i) for i in range(6, 52)]
    comm = b"we)ird (na\xffme"
    data = b"4242 (" + comm + b") " + " ".join(fields).encode() + b"\n"
    st = parse_stat_bytes(4242, data)
    f = {n: int(fields[n - 3]) for n in range(4, 52)}
    assert st.comm == comm.decode("utf-8", "replace")
    assert (st.ppid, st.pgid) == (f[4], f[5])
    assert st.cpu_ticks == f[14] + f[15]
    assert st.child_cpu_ticks == f[16] + f[17]
    assert st.start_ticks == f[22]
    assert st.rss_bytes == f[24] * PAGE_SIZE
    # The text parser gives the same reading for the same file.
    assert parse_stat(4242, data.decode("utf-8", "surrogateescape")) == st


def test_own_stat_reads_back():
    with open(f"/proc/{os.getpid()}/stat", "rb") as fh:
        st = parse_stat_bytes(os.getpid(), fh.read())
    assert st.pid == os.getpid() and st.ppid == os.getppid() and st.comm
    assert sys.executable  # (the test process is python)


def test_threads_created_elsewhere_do_not_list_proc_and_new_processes_are_probed():
    """A thread is a new PID: the tracker probes the few new PIDs instead of listing
    /proc, finds that they were threads, and still finds a new process at once."""
    import threading

    t = ProcessTracker(rescan_interval_s=1000, max_labels_per_user=100_000)
    listings: list[int] = []
    original = t._lister.changes

    def changes():  # type: ignore[no-untyped-def]
        listings.append(1)
        return original()

    t._lister.changes = changes  # type: ignore[method-assign]
    t.observe(7000.0, [])
    listings.clear()
    for k in range(1, 4):
        threads = [threading.Thread(target=lambda: None) for _ in range(5)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        t.observe(7000.0 + k, [])
    assert listings == []  # no /proc listing for 15 threads
    job = subprocess.Popen(["sleep", "30"], env={**os.environ, "WATTPRINT_JOB": "probed"}, start_new_session=True)
    try:
        time.sleep(0.1)
        view = t.observe(7004.0, [])
        assert listings == []
        assert any(job.pid in j.pids and j.identity.label == "probed" for j in view.jobs)
    finally:
        job.kill()
        job.wait()
    # Once it is gone, the listing at the next rescan interval forgets it.
    t2 = t.observe(7004.0 + 1000, [])
    assert listings == [1] and job.pid not in t._by_pid and job.pid not in t2.pid_to_job
