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


# ------------------------------------------------------- damaged cursor (issue 11)


def _spooled_with_cursor(tmp_path: Path) -> None:
    """Three segments (4 lines each), 5 lines delivered: the cursor is inside segment 2."""
    with Spool(str(tmp_path), segment_bytes=150) as sp:
        for i in range(0, 12, 4):
            sp.append(lines(i, 4))
        assert len(segments(tmp_path)) == 3
        sp.commit(sp.peek(5)[1])


def _write_cursor(tmp_path: Path, segment: int, offset: int) -> None:
    (tmp_path / "cursor.json").write_text(f'{{"segment": {segment}, "offset": {offset}}}')


def test_cursor_ahead_of_the_files_replays_them(tmp_path: Path) -> None:
    _spooled_with_cursor(tmp_path)
    _write_cursor(tmp_path, 9, 0)
    with Spool(str(tmp_path)) as sp:
        assert sp.pending_lines == 8  # segments 2 and 3: nothing says they were delivered
        assert drain(sp) == lines(4, 8)
        repairs, what = sp.cursor_repair_counts()
        assert repairs["segment_ahead"] == 1 and sum(repairs.values()) == 1
        assert "segment 9" in what and "replaying" in what
        sp.append(lines(12, 1))
        seqs = [int(p.name[4:-4]) for p in segments(tmp_path)]
        assert max(seqs) >= 10  # numbering goes on past the cursor's


def test_cursor_past_the_end_of_its_segment_replays_that_segment(tmp_path: Path) -> None:
    _spooled_with_cursor(tmp_path)
    _write_cursor(tmp_path, 2, 10_000)
    with Spool(str(tmp_path)) as sp:
        assert drain(sp) == lines(4, 8)  # line 4 again (duplicate: harmless), nothing skipped
        repairs, _ = sp.cursor_repair_counts()
        assert repairs["offset_past_end"] == 1 and sum(repairs.values()) == 1


def test_cursor_off_a_record_boundary_replays_that_segment(tmp_path: Path) -> None:
    _spooled_with_cursor(tmp_path)
    _write_cursor(tmp_path, 2, 7)
    with Spool(str(tmp_path)) as sp:
        assert drain(sp) == lines(4, 8)
        assert sp.cursor_repair_counts()[0]["offset_misaligned"] == 1


def test_intact_cursor_is_no_repair(tmp_path: Path) -> None:
    _spooled_with_cursor(tmp_path)
    with Spool(str(tmp_path)) as sp:
        assert drain(sp) == lines(5, 7)
        assert sum(sp.cursor_repair_counts()[0].values()) == 0
    _write_cursor(tmp_path, 1, 0)  # a segment already deleted, none older on disk: normal
    with Spool(str(tmp_path)) as sp:
        assert sum(sp.cursor_repair_counts()[0].values()) == 0


def test_torn_region_in_an_older_segment_counts_as_unreadable(tmp_path: Path) -> None:
    with Spool(str(tmp_path), segment_bytes=150) as sp:
        for i in range(0, 12, 4):
            sp.append(lines(i, 4))
    first = segments(tmp_path)[0]
    data = first.read_bytes()
    first.write_bytes(data[:-5])  # not the newest segment: not a crash-cut append
    with Spool(str(tmp_path)) as sp:
        c = sp.counters()
        assert c["unreadable_bytes_total"] == c["torn_bytes_total"] > 0
        assert drain(sp) == lines(0, 3) + lines(4, 8)


# ------------------------------------------------ exact figures (kill mutants; docs/testing.md)
#
# Every record of these tests has the same size, so the expected byte counts, file
# names and counters below are worked out here from the lines written, not read back
# from the spool.

import json  # noqa: E402
import stat  # noqa: E402
import struct  # noqa: E402
import zlib  # noqa: E402


def fixed(i: int) -> str:
    return f"m v={i:04d}i {i:04d}"  # 14 bytes


def fixed_lines(start: int, n: int) -> list[str]:
    return [fixed(i) for i in range(start, start + n)]


REC = 4 + 4 + 8 + len(fixed(0))  # length, CRC, append time, line: 30 bytes


def seg_name(seq: int) -> str:
    return f"seg-{seq:020d}.wal"


def names(directory: Path) -> list[str]:
    return [p.name for p in segments(directory)]


def exact_counters(**changed: int) -> dict[str, int]:
    base = {
        "appended_lines_total": 0, "committed_lines_total": 0, "dropped_lines_total": 0,
        "oversize_lines_total": 0, "corrupt_records_total": 0, "torn_bytes_total": 0,
        "unreadable_bytes_total": 0, "cursor_save_errors_total": 0, "pending_lines": 0, "segments": 0,
    }
    assert set(changed) <= set(base)
    return base | changed


def test_frame_record_bytes_are_exact(tmp_path: Path) -> None:
    payload = struct.pack("<d", 1.5) + b"m v=1i 1"
    assert spool_mod.frame_record("m v=1i 1", 1.5) == struct.pack("<II", len(payload), zlib.crc32(payload)) + payload
    # A lone surrogate (undecodable input) is replaced, never an exception.
    assert spool_mod.frame_record("a\udcffb", 0.0)[16:] == b"a?b"
    with Spool(str(tmp_path)) as sp:
        sp.append(["a\udcffb", ""])  # the empty line is a record of 8 payload bytes
        assert sp.peek(10)[0] == ["a?b", ""]
        assert sp.size_bytes == 2 * 16 + 3


def test_undecodable_payload_is_read_with_replacement(tmp_path: Path) -> None:
    payload = struct.pack("<d", 2.0) + b"bad\xffbyte"
    (tmp_path / seg_name(1)).write_bytes(struct.pack("<II", len(payload), zlib.crc32(payload)) + payload)
    with Spool(str(tmp_path)) as sp:
        assert sp.peek(10)[0] == ["bad\ufffdbyte"]


def test_files_cursor_and_counters_follow_a_known_history(tmp_path: Path) -> None:
    with Spool(str(tmp_path), segment_bytes=3 * REC) as sp:
        assert sp.counters() == exact_counters()
        assert sp.cursor_repair_counts() == ({r: 0 for r in spool_mod.CURSOR_REPAIR_REASONS}, "")
        sp.append(fixed_lines(0, 2))
        sp.append(fixed_lines(2, 1))  # fills segment 1 exactly: no new segment
        assert names(tmp_path) == [seg_name(1)]
        sp.append(fixed_lines(3, 1))
        assert names(tmp_path) == [seg_name(1), seg_name(2)]
        assert (sp.size_bytes, sp.pending_bytes, sp.pending_lines) == (4 * REC, 4 * REC, 4)
        assert stat.S_IMODE(os.stat(tmp_path / seg_name(1)).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(tmp_path / "lock").st_mode) == 0o600

        got, cursor = sp.peek(2)
        assert (got, cursor) == (fixed_lines(0, 2), spool_mod.SpoolCursor(1, 2 * REC, 2))
        assert sp.commit(cursor) == 2
        assert (sp.pending_bytes, sp.pending_lines) == (2 * REC, 2)
        assert json.loads((tmp_path / "cursor.json").read_text()) == {"segment": 1, "offset": 2 * REC}

        got, cursor = sp.peek(1)
        assert sp.commit(cursor) == 1  # segment 1 finished and delivered: deleted at once
        assert names(tmp_path) == [seg_name(2)]
        assert json.loads((tmp_path / "cursor.json").read_text()) == {"segment": 2, "offset": 0}
        assert sp.commit(cursor) == 0  # an old cursor changes nothing
        assert (sp.pending_bytes, sp.pending_lines, sp.size_bytes) == (REC, 1, REC)

        got, cursor = sp.peek(5)
        assert got == [fixed(3)] and sp.commit(cursor) == 1
        assert names(tmp_path) == [seg_name(2)]  # the active segment stays
        assert sp.counters() == exact_counters(appended_lines_total=4, committed_lines_total=4, segments=1)
        assert not (tmp_path / "cursor.json.tmp").exists()

    with Spool(str(tmp_path), segment_bytes=3 * REC) as sp:  # delivered, not active: deleted
        assert names(tmp_path) == [seg_name(2)] and sp.pending_bytes == 0
        assert sp.commit(sp.peek(1)[1]) == 0
        sp.append(fixed_lines(4, 1))
        assert names(tmp_path) == [seg_name(2), seg_name(3)]  # a new segment after a restart
        got, cursor = sp.peek(5)
        assert got == [fixed(4)] and cursor == spool_mod.SpoolCursor(3, REC, 1)
        assert sp.commit(cursor) == 1
        assert names(tmp_path) == [seg_name(3)]  # segment 2 went with the commit
        assert sp.counters() == exact_counters(appended_lines_total=1, committed_lines_total=1, segments=1)
    with Spool(str(tmp_path)) as sp:
        assert sp.commit(sp.peek(1)[1]) == 0
        assert sp.pending_bytes == 0 and sp.size_bytes == REC


def test_commit_across_segments_counts_each_line_once(tmp_path: Path) -> None:
    with Spool(str(tmp_path), segment_bytes=2 * REC) as sp:
        for i in range(6):
            sp.append(fixed_lines(i, 1))  # segments 1, 2, 3 with two appends of one line each
        assert sp.commit(sp.peek(1)[1]) == 1
        got, cursor = sp.peek(4)
        assert got == fixed_lines(1, 4) and cursor == spool_mod.SpoolCursor(3, REC, 1)
        assert sp.commit(cursor) == 4  # one of segment 1, two of 2, one of 3
        assert names(tmp_path) == [seg_name(3)]
        assert sp.counters() == exact_counters(appended_lines_total=6, committed_lines_total=5,
                                               pending_lines=1, segments=1)
        assert sp.peek(5)[0] == [fixed(5)]


def test_reopen_numbers_segments_after_the_last_one(tmp_path: Path) -> None:
    with Spool(str(tmp_path), segment_bytes=REC) as sp:
        sp.append(fixed_lines(0, 1))
        sp.append(fixed_lines(1, 1))
    with Spool(str(tmp_path)) as sp:
        sp.append(fixed_lines(2, 1))
    assert names(tmp_path) == [seg_name(1), seg_name(2), seg_name(3)]
    _write_cursor(tmp_path, 9, 0)  # ahead of the files: numbering goes on after it
    with Spool(str(tmp_path)) as sp:
        sp.append(fixed_lines(3, 1))
        assert names(tmp_path) == [seg_name(1), seg_name(2), seg_name(3), seg_name(10)]
        assert sp.peek(10)[0] == fixed_lines(0, 4)


def test_segments_before_the_cursor_are_deleted_on_open(tmp_path: Path) -> None:
    with Spool(str(tmp_path), segment_bytes=2 * REC) as sp:
        for i in range(0, 6, 2):
            sp.append(fixed_lines(i, 2))
    _write_cursor(tmp_path, 3, 0)  # (as after a crash between the commit and the unlink)
    with Spool(str(tmp_path)) as sp:
        assert names(tmp_path) == [seg_name(3)]
        assert sp.pending_lines == 2 and sp.peek(10)[0] == fixed_lines(4, 2)
        assert sum(sp.cursor_repair_counts()[0].values()) == 0
    _write_cursor(tmp_path, 3, REC)  # on a boundary inside the segment
    with Spool(str(tmp_path)) as sp:
        assert sp.pending_lines == 1 and sp.pending_bytes == REC and sp.peek(10)[0] == [fixed(5)]


@pytest.mark.parametrize(
    ("content", "reason", "what"),
    [
        ("{not json", "unreadable",
         "cursor file unreadable (JSONDecodeError): replaying every segment on disk"),
        ('{"segment": 2}', "unreadable", "cursor file unreadable (KeyError): replaying every segment on disk"),
        ('{"segment": 0, "offset": 5}', "unreadable",
         "cursor file holds segment 0, offset 5: replaying every segment on disk"),
        ('{"segment": 2, "offset": -1}', "unreadable",
         "cursor file holds segment 2, offset -1: replaying every segment on disk"),
        ('{"segment": 9, "offset": 2}', "segment_ahead",  # offset 2 is a segment on disk: no matter
         "cursor names segment 9, which is not on disk, while older segments 2..3 are: replaying them"),
        ('{"segment": 2, "offset": 10000}', "offset_past_end",
         f"cursor offset 10000 is past the readable end of segment 2 ({4 * REC} bytes): "
         "replaying that segment from its start"),
        ('{"segment": 2, "offset": 7}', "offset_misaligned",
         "cursor offset 7 is not on a record boundary of segment 2: replaying that segment from its start"),
    ],
)
def test_each_cursor_repair_is_counted_and_described(tmp_path: Path, content: str, reason: str, what: str) -> None:
    with Spool(str(tmp_path), segment_bytes=4 * REC) as sp:
        for i in range(0, 12, 4):
            sp.append(fixed_lines(i, 4))
        sp.commit(sp.peek(5)[1])  # segment 1 delivered and gone; cursor inside segment 2
    (tmp_path / "cursor.json").write_text(content)
    with Spool(str(tmp_path)) as sp:
        repairs, last = sp.cursor_repair_counts()
        assert repairs == {r: int(r == reason) for r in spool_mod.CURSOR_REPAIR_REASONS}
        assert last == what
        assert sp.pending_lines == 8  # segments 2 and 3 replayed whole, nothing skipped
        assert sp.pending_bytes == 8 * REC
        assert drain(sp) == fixed_lines(4, 8)


def test_torn_tails_count_their_bytes_and_only_older_ones_as_lost(tmp_path: Path) -> None:
    with Spool(str(tmp_path), segment_bytes=2 * REC) as sp:
        for i in range(0, 6, 2):
            sp.append(fixed_lines(i, 2))
    for seq, cut in ((1, 5), (2, 5), (3, 3)):
        path = tmp_path / seg_name(seq)
        path.write_bytes(path.read_bytes()[:-cut])
    with Spool(str(tmp_path)) as sp:
        torn = (REC - 5) + (REC - 5) + (REC - 3)  # from the start of each cut record
        assert sp.counters() == exact_counters(torn_bytes_total=torn, unreadable_bytes_total=2 * (REC - 5),
                                               pending_lines=3, segments=3)
        assert drain(sp) == [fixed(0), fixed(2), fixed(4)]


def test_impossible_length_ends_the_segment_as_torn(tmp_path: Path) -> None:
    with Spool(str(tmp_path)) as sp:
        sp.append(fixed_lines(0, 1))
    junk = b"abc"  # a length shorter than the time stamp, even with a matching CRC
    with open(tmp_path / seg_name(1), "ab") as fh:
        fh.write(struct.pack("<II", len(junk), zlib.crc32(junk)) + junk)
    with Spool(str(tmp_path)) as sp:
        assert sp.counters() == exact_counters(torn_bytes_total=8 + 3, pending_lines=1, segments=1)
        assert sp.peek(10)[0] == [fixed(0)]


def test_each_corrupt_record_is_counted_once(tmp_path: Path) -> None:
    with Spool(str(tmp_path)) as sp:
        sp.append(fixed_lines(0, 5))
    _flip_byte_of_record(segments(tmp_path)[-1], 1)
    _flip_byte_of_record(segments(tmp_path)[-1], 3)
    with Spool(str(tmp_path)) as sp:
        assert sp.counters()["corrupt_records_total"] == 2 and sp.pending_lines == 3
        assert drain(sp, batch=2) == [fixed(0), fixed(2), fixed(4)]
        # (not the active segment after a restart: deleted once delivered)
        assert sp.counters() == exact_counters(corrupt_records_total=2, committed_lines_total=3, segments=0)
    with Spool(str(tmp_path)) as sp:  # after open: two records go bad
        sp.append(fixed_lines(5, 4))
        _flip_byte_of_record(segments(tmp_path)[-1], 0)
        _flip_byte_of_record(segments(tmp_path)[-1], 2)
        assert sp.peek(10)[0] == [fixed(6), fixed(8)]
        assert sp.pending_lines == 2
        assert drain(sp, batch=1) == [fixed(6), fixed(8)]
        assert sp.counters() == exact_counters(appended_lines_total=4, corrupt_records_total=2,
                                               committed_lines_total=2, segments=1)


@pytest.mark.parametrize("chunk", [1, 7, 16, REC, 100])
def test_small_read_chunks_give_the_same_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(spool_mod, "_READ_CHUNK_BYTES", chunk)
    with Spool(str(tmp_path)) as sp:
        sp.append(fixed_lines(0, 6))
    path = tmp_path / seg_name(1)
    path.write_bytes(path.read_bytes()[:-4])
    with Spool(str(tmp_path)) as sp:
        assert sp.counters()["torn_bytes_total"] == REC - 4
        got, cursor = sp.peek(2)
        assert got == fixed_lines(0, 2) and cursor == spool_mod.SpoolCursor(1, 2 * REC, 2)
        sp.commit(cursor)
        assert sp.peek(10)[0] == fixed_lines(2, 3)


def test_a_segment_cut_short_after_open_stops_reading_safely(tmp_path: Path) -> None:
    with Spool(str(tmp_path)) as sp:
        sp.append(fixed_lines(0, 3))
        path = tmp_path / seg_name(1)
        path.write_bytes(path.read_bytes()[: REC + REC // 2])
        got, cursor = sp.peek(10)
        assert got == [fixed(0)] and cursor == spool_mod.SpoolCursor(1, REC, 1)


def test_size_cap_drops_exactly_the_oldest_undelivered_lines(tmp_path: Path) -> None:
    clock = Clock(100.0)
    with Spool(str(tmp_path), max_bytes=4 * REC, segment_bytes=2 * REC, clock=clock) as sp:
        sp.append(fixed_lines(0, 2))  # segment 1
        clock.t = 101.0
        sp.append(fixed_lines(2, 2))  # segment 2
        cursor = sp.peek(3)[1]
        assert cursor == spool_mod.SpoolCursor(2, REC, 1) and sp.commit(cursor) == 3
        clock.t = 102.0
        sp.append(fixed_lines(4, 2))  # segment 3: 4 * REC on disk, not above the cap
        assert sp.counters()["dropped_lines_total"] == 0 and names(tmp_path) == [seg_name(2), seg_name(3)]
        clock.t = 103.0
        sp.append(fixed_lines(6, 2))  # segment 4: segment 2 goes, with its one undelivered line
        assert names(tmp_path) == [seg_name(3), seg_name(4)]
        assert sp.counters() == exact_counters(appended_lines_total=8, committed_lines_total=3,
                                               dropped_lines_total=1, pending_lines=4, segments=2)
        clock.t = 110.0
        assert sp.oldest_age_s == 8.0  # line 4, appended at 102
        assert sp.pending_bytes == 4 * REC
        assert drain(sp) == fixed_lines(4, 4)
        assert sp.counters() == exact_counters(appended_lines_total=8, committed_lines_total=7,
                                               dropped_lines_total=1, segments=1)


def test_size_cap_with_two_segments(tmp_path: Path) -> None:
    with Spool(str(tmp_path), max_bytes=3 * REC, segment_bytes=2 * REC) as sp:
        sp.append(fixed_lines(0, 2))
        sp.append(fixed_lines(2, 2))  # 4 * REC > cap: segment 1 goes
        assert names(tmp_path) == [seg_name(2)]
        assert sp.counters()["dropped_lines_total"] == 2
    with Spool(str(tmp_path / "one"), max_bytes=REC, segment_bytes=10 * REC) as sp:
        sp.append(fixed_lines(0, 3))  # the active segment alone is above the cap: kept
        assert sp.counters()["dropped_lines_total"] == 0 and sp.pending_lines == 3


def test_oversize_limit_is_inclusive_and_counted_per_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_mod, "_MAX_PAYLOAD_BYTES", 100)
    fits, over = "x" * (100 - 8), "y" * (100 - 8 + 1)  # payload = 8-byte stamp + line
    with Spool(str(tmp_path)) as sp:
        sp.append([over, fits, over, "z"])
        sp.append([over])
        assert sp.counters()["oversize_lines_total"] == 3
        assert drain(sp) == [fits, "z"]
    with Spool(str(tmp_path)) as sp:  # the longest record is read back after a restart
        assert sp.counters()["torn_bytes_total"] == 0


def test_errors_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        Spool(str(tmp_path / "a"), max_bytes=0)
    assert str(err.value) == "max_bytes must be positive"
    sp = Spool(str(tmp_path / "b"), max_bytes=1)  # the smallest cap is allowed
    with pytest.raises(ValueError) as err:
        sp.peek(0)
    assert str(err.value) == "max_lines must be at least 1"
    with pytest.raises(SpoolLockedError) as locked:
        Spool(str(tmp_path / "b"))
    assert str(locked.value) == f"spool directory {tmp_path / 'b'} is in use by another writer"
    sp.close()
    sp.close()  # idempotent
    with pytest.raises(ValueError) as err:
        sp.append(["m v=1i 1"])
    assert str(err.value) == "spool is closed"


@pytest.mark.parametrize(
    ("max_bytes", "segment_bytes"),
    [(1000, 4096), (1_000_001, 125_000), (2**30, 16 * 1024 * 1024), (spool_mod.DEFAULT_MAX_BYTES, 16 * 1024 * 1024)],
)
def test_default_segment_size(tmp_path: Path, max_bytes: int, segment_bytes: int) -> None:
    with Spool(str(tmp_path), max_bytes=max_bytes) as sp:
        assert sp.segment_bytes == segment_bytes and isinstance(sp.segment_bytes, int)


def test_cursor_save_errors_are_counted_and_the_commit_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    with Spool(str(tmp_path)) as sp:
        sp.append(fixed_lines(0, 3))
        monkeypatch.setattr(spool_mod.os, "replace", refuse)
        assert sp.commit(sp.peek(1)[1]) == 1
        assert sp.commit(sp.peek(1)[1]) == 1
        assert sp.counters()["cursor_save_errors_total"] == 2
        assert sp.peek(5)[0] == [fixed(2)]  # in memory the commits hold


def test_oldest_age_of_one_line_and_of_none_readable(tmp_path: Path) -> None:
    clock = Clock(50.0)
    with Spool(str(tmp_path / "a"), clock=clock) as sp:
        sp.append(fixed_lines(0, 1))
        assert sp.oldest_age_s == 0.0  # appended just now
        clock.t = 55.0
        assert sp.oldest_age_s == 5.0
        _flip_byte_of_record(segments(tmp_path / "a")[-1], 0)
        assert sp.peek(5)[0] == [] and sp.pending_lines == 0
        assert sp.oldest_age_s == 0.0  # nothing pending any more
    clock.t = 50.0
    with Spool(str(tmp_path), clock=clock) as sp:
        sp.append(fixed_lines(0, 1))
        clock.t = 55.0
    with Spool(str(tmp_path), clock=clock) as sp:
        _flip_byte_of_record(segments(tmp_path)[-1], 0)  # the only line goes bad after open
        assert sp.oldest_age_s == 0.0
        assert sp.pending_lines == 0


def test_stray_files_are_not_segments(tmp_path: Path) -> None:
    for stray in ("seg-00000000000000000007.tmp", "seg-backup.wal", "x-00000000000000000008.wal"):
        (tmp_path / stray).write_bytes(b"junk")
    with Spool(str(tmp_path)) as sp:
        assert sp.counters() == exact_counters()
        sp.append(fixed_lines(0, 1))
        assert names(tmp_path) == [seg_name(1), "seg-backup.wal"] and sp.peek(5)[0] == [fixed(0)]


def test_segment_ahead_message_names_the_oldest_and_newest(tmp_path: Path) -> None:
    with Spool(str(tmp_path), segment_bytes=REC) as sp:
        for i in range(3):
            sp.append(fixed_lines(i, 1))
    _write_cursor(tmp_path, 9, 0)
    with Spool(str(tmp_path)) as sp:
        assert sp.cursor_repair_counts()[1] == (
            "cursor names segment 9, which is not on disk, while older segments 1..3 are: replaying them")


def test_short_writes_are_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    monkeypatch.setattr(spool_mod.os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    with Spool(str(tmp_path)) as sp:
        sp.append(fixed_lines(0, 3))
        assert sp.size_bytes == 3 * REC and (tmp_path / seg_name(1)).stat().st_size == 3 * REC
        assert sp.peek(5)[0] == fixed_lines(0, 3)


def test_failed_first_append_leaves_no_empty_segment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    with Spool(str(tmp_path)) as sp:
        real = os.fdatasync
        monkeypatch.setattr(spool_mod.os, "fdatasync", full)
        for _ in range(3):
            with pytest.raises(OSError):
                sp.append(fixed_lines(0, 1))
        assert names(tmp_path) == [] and sp.counters() == exact_counters()
        monkeypatch.setattr(spool_mod.os, "fdatasync", real)
        sp.append(fixed_lines(1, 1))
        assert names(tmp_path) == [seg_name(4)] and sp.peek(5)[0] == [fixed(1)]


def test_garbage_shorter_than_a_header_is_a_torn_tail(tmp_path: Path) -> None:
    with Spool(str(tmp_path)) as sp:
        sp.append(fixed_lines(0, 2))
    with open(tmp_path / seg_name(1), "ab") as fh:
        fh.write(b"\x01\x02")
    with Spool(str(tmp_path)) as sp:
        assert sp.counters() == exact_counters(torn_bytes_total=2, pending_lines=2, segments=1)


def test_everything_delivered_after_a_restart_then_appends_go_on(tmp_path: Path) -> None:
    with Spool(str(tmp_path)) as sp:
        sp.append(fixed_lines(0, 2))
    with Spool(str(tmp_path), max_bytes=3 * REC, segment_bytes=2 * REC) as sp:
        assert drain(sp) == fixed_lines(0, 2)
        assert names(tmp_path) == [] and sp.pending_bytes == 0 and sp.size_bytes == 0
        sp.append(fixed_lines(2, 2))
        sp.append(fixed_lines(4, 2))  # 4 * REC > cap: segment 2 goes, with both its lines
        assert names(tmp_path) == [seg_name(3)]
        assert sp.counters() == exact_counters(appended_lines_total=4, committed_lines_total=2,
                                               dropped_lines_total=2, pending_lines=2, segments=1)
        got, cursor = sp.peek(5)
        assert got == fixed_lines(4, 2) and sp.commit(cursor) == 2


def test_records_gone_bad_after_open_are_not_delivered_nor_counted(tmp_path: Path) -> None:
    with Spool(str(tmp_path), segment_bytes=3 * REC) as sp:
        sp.append(fixed_lines(0, 3))
        sp.append(fixed_lines(3, 3))
        _flip_byte_of_record(tmp_path / seg_name(1), 1)
        got, cursor = sp.peek(4)
        assert got == [fixed(0), fixed(2), fixed(3), fixed(4)] and cursor == spool_mod.SpoolCursor(2, 2 * REC, 2)
        assert sp.commit(cursor) == 4
        assert sp.counters() == exact_counters(appended_lines_total=6, committed_lines_total=4,
                                               corrupt_records_total=1, pending_lines=1, segments=1)
