"""The on-disk spool: order, at-least-once peek/commit, restart, size cap, torn tails,
bad checksums, a SIGKILLed writer, and the cost of an append on the tick path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wattprint.exporters import spool as spool_mod
from wattprint.exporters.spool import Spool, SpoolLockedError


def lines(start: int, n: int) -> list[str]:
    return [f"m,host=h v={i}i {i}" for i in range(start, start + n)]


def drain(sp: Spool, batch: int = 7) -> list[str]:
    out: list[str] = []
    while True:
        got, cursor = sp.peek(batch)
        sp.commit(cursor)
        if not got:
            return out
        out.extend(got)


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("seg-*.wal"))


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_append_peek_commit_in_order(tmp_path: Path) -> None:
    with Spool(str(tmp_path)) as sp:
        sp.append(lines(0, 3))
        sp.append(lines(3, 3))
        first, cursor = sp.peek(4)
        assert first == lines(0, 4)
        again, _ = sp.peek(4)
        assert again == first  # no commit: the same lines again (at-least-once)
        assert sp.commit(cursor) == 4
        rest, cursor = sp.peek(100)
        assert rest == lines(4, 2)
        sp.commit(cursor)
        assert sp.peek(10)[0] == []
        assert sp.pending_lines == 0
        c = sp.counters()
        assert c["appended_lines_total"] == 6 and c["committed_lines_total"] == 6


def test_many_segments_keep_order_and_delivered_segments_are_deleted(tmp_path: Path) -> None:
    with Spool(str(tmp_path), max_bytes=1 << 20, segment_bytes=200) as sp:
        for i in range(0, 100, 5):
            sp.append(lines(i, 5))
        assert len(segments(tmp_path)) > 5
        assert drain(sp) == lines(0, 100)
        assert len(segments(tmp_path)) <= 1  # only the active segment may stay
        assert sp.pending_bytes == 0


def test_reopen_continues_from_the_committed_position(tmp_path: Path) -> None:
    sp = Spool(str(tmp_path), segment_bytes=300)
    for i in range(0, 40, 4):
        sp.append(lines(i, 4))
    sp.commit(sp.peek(13)[1])
    sp.peek(5)  # peeked, never committed: must come back after a restart
    sp.close()

    sp = Spool(str(tmp_path), segment_bytes=300)
    assert sp.pending_lines == 27
    sp.append(lines(40, 2))
    assert drain(sp) == lines(13, 29)
    sp.close()

    sp = Spool(str(tmp_path))
    assert sp.pending_lines == 0 and sp.peek(5)[0] == []
    sp.close()


def test_unreadable_cursor_file_means_replay_from_the_start(tmp_path: Path) -> None:
    with Spool(str(tmp_path)) as sp:
        sp.append(lines(0, 5))
        sp.commit(sp.peek(2)[1])
    (tmp_path / "cursor.json").write_text("{not json")
    with Spool(str(tmp_path)) as sp:
        assert sp.peek(10)[0] == lines(0, 5)  # delivered twice: allowed (at-least-once)


def test_size_cap_drops_oldest_segments_and_counts_them(tmp_path: Path) -> None:
    with Spool(str(tmp_path), max_bytes=4096, segment_bytes=512) as sp:
        for i in range(0, 400, 4):
            sp.append(lines(i, 4))
            assert sp.size_bytes <= 4096 + 512
        c = sp.counters()
        assert c["dropped_lines_total"] > 0
        assert c["dropped_lines_total"] + c["pending_lines"] == 400
        remaining = drain(sp)
        assert remaining == lines(400 - len(remaining), len(remaining))  # the newest survive, in order


def test_commit_of_a_batch_whose_segment_was_dropped_is_harmless(tmp_path: Path) -> None:
    with Spool(str(tmp_path), max_bytes=4096, segment_bytes=512) as sp:
        sp.append(lines(0, 4))
        batch, cursor = sp.peek(4)
        for i in range(4, 400, 4):
            sp.append(lines(i, 4))  # the peeked segment is dropped meanwhile
        assert sp.commit(cursor) == 0
        c = sp.counters()
        assert c["dropped_lines_total"] + c["pending_lines"] + c["committed_lines_total"] == 400
        assert sp.peek(1)[0] != batch[:1]


def test_torn_tail_is_skipped_counted_and_appends_go_on(tmp_path: Path) -> None:
    with Spool(str(tmp_path)) as sp:
        sp.append(lines(0, 5))
    seg = segments(tmp_path)[-1]
    size = seg.stat().st_size
    with open(seg, "r+b") as fh:
        fh.truncate(size - 3)  # cut into the last record
    with open(seg, "ab") as fh:
        fh.write(b"\x01\x02")  # and some garbage, as a crash mid-write leaves
    with Spool(str(tmp_path)) as sp:
        assert sp.counters()["torn_bytes_total"] > 0
        assert sp.pending_lines == 4
        sp.append(lines(5, 2))
        assert drain(sp) == lines(0, 4) + lines(5, 2)


def _flip_byte_of_record(seg: Path, record_index: int) -> None:
    data = bytearray(seg.read_bytes())
    pos = 0
    for _ in range(record_index):
        length = int.from_bytes(data[pos : pos + 4], "little")
        pos += 8 + length
    data[pos + 8 + 10] ^= 0xFF  # a byte inside the payload
    seg.write_bytes(bytes(data))


def test_bad_checksum_record_is_skipped_and_counted(tmp_path: Path) -> None:
    with Spool(str(tmp_path)) as sp:
        sp.append(lines(0, 5))
    _flip_byte_of_record(segments(tmp_path)[-1], 1)
    with Spool(str(tmp_path)) as sp:
        assert sp.counters()["corrupt_records_total"] == 1
        assert sp.pending_lines == 4
        assert drain(sp) == [lines(0, 5)[i] for i in (0, 2, 3, 4)]


def test_corruption_after_open_is_skipped_and_counted_once(tmp_path: Path) -> None:
    with Spool(str(tmp_path)) as sp:
        sp.append(lines(0, 5))
        _flip_byte_of_record(segments(tmp_path)[-1], 3)
        assert sp.peek(10)[0] == [lines(0, 5)[i] for i in (0, 1, 2, 4)]
        assert sp.peek(10)[0] == [lines(0, 5)[i] for i in (0, 1, 2, 4)]
        assert sp.counters()["corrupt_records_total"] == 1
        assert sp.pending_lines == 4


def test_oldest_age(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    with Spool(str(tmp_path), clock=clock) as sp:
        assert sp.oldest_age_s == 0.0
        sp.append(lines(0, 2))
        clock.t = 1010.0
        sp.append(lines(2, 2))
        clock.t = 1030.0
        assert sp.oldest_age_s == pytest.approx(30.0)
        sp.commit(sp.peek(2)[1])
        assert sp.oldest_age_s == pytest.approx(20.0)
    with Spool(str(tmp_path), clock=clock) as sp:  # read back from disk
        assert sp.oldest_age_s == pytest.approx(20.0)
        sp.commit(sp.peek(10)[1])
        assert sp.oldest_age_s == 0.0


def test_second_writer_is_refused(tmp_path: Path) -> None:
    sp = Spool(str(tmp_path))
    with pytest.raises(SpoolLockedError):
        Spool(str(tmp_path))
    sp.close()
    Spool(str(tmp_path)).close()


def test_append_after_close_is_refused(tmp_path: Path) -> None:
    sp = Spool(str(tmp_path))
    sp.close()
    with pytest.raises(ValueError):
        sp.append(lines(0, 1))


def test_failed_append_keeps_nothing_and_the_next_append_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Spool(str(tmp_path)) as sp:
        sp.append(lines(0, 2))
        real_fdatasync = os.fdatasync

        def failing_fdatasync(fd: int) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(spool_mod.os, "fdatasync", failing_fdatasync)
        with pytest.raises(OSError):
            sp.append(lines(2, 2))
        monkeypatch.setattr(spool_mod.os, "fdatasync", real_fdatasync)
        sp.append(lines(4, 2))
        assert drain(sp) == lines(0, 2) + lines(4, 2)
    with Spool(str(tmp_path)) as sp:
        assert sp.counters()["torn_bytes_total"] == 0


def test_oversize_line_is_refused_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_mod, "_MAX_PAYLOAD_BYTES", 100)
    with Spool(str(tmp_path)) as sp:
        sp.append(["m v=1i 1", "m s=\"" + "x" * 200 + "\" 2"])
        assert sp.counters()["oversize_lines_total"] == 1
        assert drain(sp) == ["m v=1i 1"]


_WRITER = """
import sys
from wattprint.exporters.spool import Spool
sp = Spool(sys.argv[1])
i = 0
while True:
    sp.append([f"m,host=h v={j}i {j}" for j in range(i, i + 10)])
    i += 10
    sys.stdout.write(f"{i}\\n")
    sys.stdout.flush()
"""


def test_sigkilled_writer_loses_nothing_it_acknowledged(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    acked = 0
    deadline = time.monotonic() + 20
    while acked < 500 and time.monotonic() < deadline:
        acked = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert acked >= 500
    with Spool(str(tmp_path)) as sp:
        got = drain(sp, batch=1000)
    assert len(got) >= acked
    assert got == lines(0, len(got))  # a gap-free prefix, in order


def test_append_is_cheap_enough_for_the_tick(tmp_path: Path) -> None:
    tick = [f"job_energy,host=h,job_id=j{i},kind=gpu,label=l,user=u joules=1.5 1700000000000000000" for i in range(60)]
    with Spool(str(tmp_path)) as sp:
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            sp.append(tick)
            times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    print(f"spool append of 60 lines: median {median * 1e3:.2f} ms, max {times[-1] * 1e3:.2f} ms")
    assert median < 0.25
