"""Bounded, crash-safe on-disk spool: lines wait here, in order, until the store has them.

The one job of this module is to keep accepted lines across outages and restarts,
within a size cap. It knows nothing about InfluxDB.

Directory layout::

    seg-00000000000000000001.wal   append-only segment files, oldest first
    cursor.json                    {"segment": N, "offset": B}: first undelivered byte
    lock                           flock()ed while a Spool has the directory open

Each segment is a sequence of records, one per line::

    u32 LE payload length | u32 LE CRC32(payload) | payload
    payload = f64 LE wall-clock time of the append (s) + the line in UTF-8

Guarantees and limits:
- ``append`` writes all its lines with one ``write`` and one ``fdatasync``: once it
  returns, the lines survive a crash or power loss. When the disk refuses (full), it
  raises and keeps nothing of that call (the caller counts the lines as dropped); a
  segment that got nothing is removed again, so a long disk-full spell leaves no
  trail of empty files. The daemon appends once per tick,
  so a crash loses at most the tick being appended.
- Delivery is at-least-once: ``peek`` returns lines and a cursor without removing them;
  ``commit(cursor)`` drops them. The cursor file is replaced atomically but not
  fsynced: after a power loss the last commits may be forgotten and those lines are
  delivered again (harmless for InfluxDB, which overwrites identical points). When
  the cursor file cannot be written (disk full) the commit still holds in memory; it
  is counted in ``cursor_save_errors_total`` and a restart would replay those lines.
- The cursor is checked against the segments on disk when the spool opens (and the
  in-memory position whenever lines are read). InfluxDB overwrites identical points,
  so replaying a line twice is harmless while skipping one loses it: every doubt is
  resolved by replaying. An unreadable cursor file replays everything on disk; a
  cursor naming a segment that is not on disk while older segments are ("ahead of the
  files") replays those older segments; an offset past the readable end of its
  segment, or one that is not on a record boundary, replays that segment from its
  start. Each repair is counted by reason in ``cursor_repairs`` and described in
  ``last_cursor_repair``. Only a cursor that names an existing segment and a record
  boundary inside it makes the segments before it count as delivered (deleted).
- On open every segment is read and checked. A torn tail (a record cut short by a
  crash, or a length that cannot be right) ends that segment's readable data; its bytes
  are counted in ``torn_bytes_total``; a torn region in a segment that is not the
  newest cannot come from a crash during an append (appends after a restart go to a
  new segment), so its bytes are also counted in ``unreadable_bytes_total`` (lost). A record whose CRC does not match is skipped
  and counted in ``corrupt_records_total`` (its length is trusted; if that length was
  the corrupted part, the next records fail their CRC too and are counted as well).
  Appends after a restart always go to a new segment, so old tails are never extended.
- Size cap: when the segment files together exceed ``max_bytes``, whole segments are
  deleted, oldest first, and their undelivered lines counted in ``dropped_lines_total``.
  The active segment is never deleted, so the cap is exceeded only when that segment
  alone is larger (``segment_bytes`` plus one append at most; ``segment_bytes`` is an
  eighth of the cap, between 4 KiB and 16 MiB, unless given).

Thread-safe: one lock serialises append, peek and commit (the tick thread appends, the
delivery task peeks and commits).
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator, Sequence

SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".wal"
CURSOR_FILE = "cursor.json"
LOCK_FILE = "lock"

_HEADER = struct.Struct("<II")  # payload length, CRC32 of payload
_STAMP = struct.Struct("<d")  # append time, wall-clock seconds
MAX_LINE_BYTES = 16 * 1024 * 1024  # longer lines are refused (counted), never spooled
_MAX_PAYLOAD_BYTES = _STAMP.size + MAX_LINE_BYTES
_READ_CHUNK_BYTES = 1024 * 1024
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
# Why a cursor was not trusted as it stood (each repair replays, never skips).
CURSOR_REPAIR_REASONS = ("unreadable", "segment_ahead", "offset_past_end", "offset_misaligned")


class SpoolLockedError(RuntimeError):
    """Another Spool (in this or another process) has the directory open."""


@dataclass(frozen=True)
class SpoolCursor:
    """A position in the spool: just after the last line of a peeked batch.

    ``index`` is the number of valid records in ``segment`` before ``offset``.
    """

    segment: int
    offset: int
    index: int

    def key(self) -> tuple[int, int]:
        return (self.segment, self.offset)


@dataclass
class _Segment:
    seq: int
    path: str
    size: int = 0  # readable bytes (a torn tail beyond this is ignored)
    records: int = 0  # valid records
    bad_offsets: set[int] = field(default_factory=set)  # records with a bad CRC, counted once


def _segment_name(seq: int) -> str:
    return f"{SEGMENT_PREFIX}{seq:020d}{SEGMENT_SUFFIX}"


def _parse_segment_name(name: str) -> int | None:
    if not (name.startswith(SEGMENT_PREFIX) and name.endswith(SEGMENT_SUFFIX)):
        return None
    digits = name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)]
    return int(digits) if digits.isdigit() else None


def frame_record(line: str, appended_at_s: float) -> bytes:
    """One record as stored on disk."""
    payload = _STAMP.pack(appended_at_s) + line.encode("utf-8", "replace")
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _records(fh: BinaryIO, start: int, end: int) -> Iterator[tuple[int, int, bytes | None]]:
    """Records in ``[start, end)`` of an open segment as ``(rec_start, rec_end, payload)``;
    ``payload`` is None when its CRC does not match. A record that does not fit before
    ``end`` (torn tail) or has an impossible length ends the iteration with
    ``(rec_start, -1, None)``."""
    fh.seek(start)
    buf = b""
    buf_off = start  # file offset of buf[0]
    pos = start

    def fill(n: int) -> bool:
        nonlocal buf, buf_off
        while buf_off + len(buf) - pos < n:
            want = min(max(_READ_CHUNK_BYTES, n), end - (buf_off + len(buf)))
            if want <= 0:
                return False
            chunk = fh.read(want)
            if not chunk:
                return False
            buf = buf[pos - buf_off :] + chunk
            buf_off = pos
        return True

    while pos < end:
        if not fill(_HEADER.size):
            yield (pos, -1, None)
            return
        length, crc = _HEADER.unpack_from(buf, pos - buf_off)
        if length < _STAMP.size or length > _MAX_PAYLOAD_BYTES or not fill(_HEADER.size + length):
            yield (pos, -1, None)
            return
        begin = pos - buf_off + _HEADER.size
        payload = buf[begin : begin + length]
        rec_end = pos + _HEADER.size + length
        yield (pos, rec_end, payload if zlib.crc32(payload) == crc else None)
        pos = rec_end


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """A bounded FIFO of lines on disk; see the module docstring."""

    def __init__(
        self,
        directory: str,
        max_bytes: int = DEFAULT_MAX_BYTES,
        segment_bytes: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or max(4096, min(16 * 1024 * 1024, max_bytes // 8))
        self._clock = clock
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._active_fd: int | None = None  # appends go to self._segments[-1] while set
        self._next_seq = 1
        self._committed = SpoolCursor(1, 0, 0)
        self._pending_lines = 0
        self._oldest_appended_s: float | None = None  # cache; None = unknown
        self.appended_lines_total = 0
        self.committed_lines_total = 0
        self.dropped_lines_total = 0  # cap reached: oldest segments deleted
        self.oversize_lines_total = 0  # refused by append (longer than MAX_LINE_BYTES)
        self.corrupt_records_total = 0
        self.torn_bytes_total = 0
        self.cursor_save_errors_total = 0  # cursor.json could not be written (replays, never loss)
        self.unreadable_bytes_total = 0  # torn region in a segment that was not the newest: lost
        self.cursor_repairs: dict[str, int] = {reason: 0 for reason in CURSOR_REPAIR_REASONS}
        self.last_cursor_repair = ""  # what the last repair found and did, one line
        os.makedirs(directory, exist_ok=True)
        self._lock_fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolLockedError(f"spool directory {directory} is in use by another writer") from None
        self._open_existing()

    # ------------------------------------------------------------------ opening

    def _load_cursor(self) -> tuple[int, int] | None:
        """The saved position; None when there is no cursor file, or when it cannot be
        read or makes no sense (then counted as an ``unreadable`` repair)."""
        path = os.path.join(self.directory, CURSOR_FILE)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
            segment, offset = int(data["segment"]), int(data["offset"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._repair("unreadable", f"cursor file unreadable ({type(exc).__name__}): replaying every segment on disk")
            return None
        if segment < 1 or offset < 0:
            self._repair("unreadable", f"cursor file holds segment {segment}, offset {offset}: replaying every segment on disk")
            return None
        return segment, offset

    def _repair(self, reason: str, what: str) -> None:
        self.cursor_repairs[reason] += 1
        self.last_cursor_repair = what

    def _open_existing(self) -> None:
        seqs = sorted(
            seq for seq in (_parse_segment_name(n) for n in os.listdir(self.directory)) if seq is not None
        )
        cursor = self._load_cursor()
        if seqs:
            self._next_seq = seqs[-1] + 1
        if cursor is not None:
            self._next_seq = max(self._next_seq, cursor[0] + 1)
            older = [seq for seq in seqs if seq < cursor[0]]
            if cursor[0] not in seqs and older:
                # Ahead of the files: nothing says the older segments were delivered.
                self._repair(
                    "segment_ahead",
                    f"cursor names segment {cursor[0]}, which is not on disk, while older segments "
                    f"{older[0]}..{older[-1]} are: replaying them",
                )
                cursor = None
        committed: SpoolCursor | None = None
        for seq in seqs:
            path = os.path.join(self.directory, _segment_name(seq))
            if cursor is not None and seq < cursor[0]:
                os.unlink(path)  # delivered before the last shutdown or crash
                continue
            limit = cursor[1] if cursor is not None and seq == cursor[0] else None
            seg, boundary, index = self._scan_segment(seq, path, limit, newest=seq == seqs[-1])
            self._segments.append(seg)
            if limit is not None:
                committed = SpoolCursor(seq, boundary, index)
                if limit > seg.size:
                    self._repair(
                        "offset_past_end",
                        f"cursor offset {limit} is past the readable end of segment {seq} ({seg.size} bytes): "
                        "replaying that segment from its start",
                    )
                    committed = SpoolCursor(seq, 0, 0)
                elif boundary != limit:
                    self._repair(
                        "offset_misaligned",
                        f"cursor offset {limit} is not on a record boundary of segment {seq}: "
                        "replaying that segment from its start",
                    )
                    committed = SpoolCursor(seq, 0, 0)
        if committed is None:
            committed = SpoolCursor(self._segments[0].seq if self._segments else self._next_seq, 0, 0)
        self._committed = committed
        self._pending_lines = sum(s.records for s in self._segments) - committed.index

    def _scan_segment(self, seq: int, path: str, limit: int | None, newest: bool = True) -> tuple[_Segment, int, int]:
        """Check every record of a segment. Returns it, and the last record boundary at
        or before ``limit`` with the number of valid records before that boundary."""
        seg = _Segment(seq=seq, path=path)
        file_size = os.path.getsize(path)
        boundary, index = 0, 0
        with open(path, "rb") as fh:
            for rec_start, rec_end, payload in _records(fh, 0, file_size):
                if rec_end < 0:
                    self.torn_bytes_total += file_size - rec_start
                    if not newest:  # not a crash-cut append: records were lost
                        self.unreadable_bytes_total += file_size - rec_start
                    break
                if payload is None:
                    seg.bad_offsets.add(rec_start)
                    self.corrupt_records_total += 1
                else:
                    seg.records += 1
                seg.size = rec_end
                if limit is not None and rec_end <= limit:
                    boundary, index = rec_end, seg.records
        return seg, boundary, index

    # ------------------------------------------------------------------ writing

    def append(self, lines: Sequence[str]) -> None:
        """Store ``lines`` durably (write + fdatasync) after everything already spooled.

        Raises OSError when the disk refuses (nothing of this call is kept then), and
        ValueError after ``close``.
        """
        now = self._clock()
        frames: list[bytes] = []
        oversize = 0
        for line in lines:
            frame = frame_record(line, now)
            if len(frame) - _HEADER.size > _MAX_PAYLOAD_BYTES:
                oversize += 1
                continue
            frames.append(frame)
        data = b"".join(frames)
        with self._lock:
            if self._lock_fd < 0:
                raise ValueError("spool is closed")
            self.oversize_lines_total += oversize
            if not frames:
                return
            active = self._segments[-1] if self._active_fd is not None else None
            if active is None or (active.size > 0 and active.size + len(data) > self.segment_bytes):
                self._rotate()
                active = self._segments[-1]
            assert self._active_fd is not None
            try:
                view = memoryview(data)
                while view:
                    written = os.write(self._active_fd, view)
                    view = view[written:]
                os.fdatasync(self._active_fd)
            except OSError:
                try:
                    os.ftruncate(self._active_fd, active.size)
                except OSError:
                    pass
                self._close_active()  # the next append starts a fresh segment
                if active.size == 0:  # (disk full: never leave one empty file per failed append)
                    self._segments.remove(active)
                    self._unlink(active.path)
                raise
            active.size += len(data)
            active.records += len(frames)
            self._pending_lines += len(frames)
            self.appended_lines_total += len(frames)
            if self._pending_lines == len(frames):
                self._oldest_appended_s = now
            self._enforce_cap()

    def _rotate(self) -> None:
        self._close_active()
        seq = self._next_seq
        self._next_seq += 1
        path = os.path.join(self.directory, _segment_name(seq))
        self._active_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        _fsync_dir(self.directory)
        self._segments.append(_Segment(seq=seq, path=path))

    def _close_active(self) -> None:
        if self._active_fd is not None:
            os.close(self._active_fd)
            self._active_fd = None

    def _enforce_cap(self) -> None:
        while len(self._segments) > 1 and self.size_bytes_unlocked() > self.max_bytes:
            seg = self._segments.pop(0)
            undelivered = seg.records - (self._committed.index if seg.seq == self._committed.segment else 0)
            if seg.seq >= self._committed.segment:
                self.dropped_lines_total += undelivered
                self._pending_lines -= undelivered
                self._committed = SpoolCursor(self._segments[0].seq, 0, 0)
                self._oldest_appended_s = None
            self._unlink(seg.path)

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ reading

    def _read(self, max_lines: int) -> tuple[list[tuple[float, str]], SpoolCursor]:
        """Up to ``max_lines`` undelivered (append time, line) pairs and the cursor after them."""
        out: list[tuple[float, str]] = []
        cursor = self._committed
        for seg in self._segments:
            if len(out) >= max_lines:
                break
            if seg.seq < self._committed.segment:
                continue
            same = seg.seq == self._committed.segment
            if same and self._committed.offset > seg.size:  # cannot happen; never skip lines
                self._repair(
                    "offset_past_end",
                    f"position {self._committed.offset} is past the end of segment {seg.seq} ({seg.size} bytes): "
                    "replaying that segment from its start",
                )
                self._pending_lines += self._committed.index
                self._committed = cursor = SpoolCursor(seg.seq, 0, 0)
            start = self._committed.offset if same else 0
            index = self._committed.index if same else 0
            if start >= seg.size:
                continue
            with open(seg.path, "rb") as fh:
                for rec_start, rec_end, payload in _records(fh, start, seg.size):
                    if rec_end < 0:  # cannot happen inside the checked region; stop safely
                        break
                    if payload is None:
                        if rec_start not in seg.bad_offsets:  # went bad since it was checked
                            seg.bad_offsets.add(rec_start)
                            seg.records -= 1
                            self._pending_lines -= 1
                            self.corrupt_records_total += 1
                    else:
                        index += 1
                        (stamp,) = _STAMP.unpack_from(payload)
                        out.append((stamp, payload[_STAMP.size :].decode("utf-8", "replace")))
                    cursor = SpoolCursor(seg.seq, rec_end, index)
                    if len(out) >= max_lines:
                        break
        return out, cursor

    def peek(self, max_lines: int) -> tuple[list[str], SpoolCursor]:
        """The oldest undelivered lines (at most ``max_lines``) and the cursor to commit
        once they are delivered. Peeking again without a commit returns the same lines."""
        if max_lines < 1:
            raise ValueError("max_lines must be at least 1")
        with self._lock:
            records, cursor = self._read(max_lines)
        return [line for _, line in records], cursor

    def commit(self, cursor: SpoolCursor) -> int:
        """Drop everything before ``cursor`` (delivered). Returns the lines dropped.

        A cursor at or before the committed position (e.g. its lines were already
        dropped by the size cap) changes nothing.
        """
        with self._lock:
            old = self._committed
            if cursor.key() <= old.key():
                return 0
            delivered = 0
            keep: list[_Segment] = []
            for seg in self._segments:
                before = old.index if seg.seq == old.segment else 0
                if seg.seq < cursor.segment:
                    delivered += seg.records - before
                    self._unlink(seg.path)
                    continue
                if seg.seq == cursor.segment:
                    delivered += cursor.index - before
                keep.append(seg)
            self._segments = keep
            self._committed = cursor
            # A finished, fully delivered segment is deleted at once.
            if keep and keep[0].seq == cursor.segment and cursor.offset >= keep[0].size:
                is_active = self._active_fd is not None and len(keep) == 1
                if not is_active:
                    self._unlink(keep.pop(0).path)
                    self._committed = SpoolCursor(keep[0].seq if keep else self._next_seq, 0, 0)
            self._pending_lines -= delivered
            self.committed_lines_total += delivered
            self._oldest_appended_s = None
            try:
                self._save_cursor()
            except OSError:  # disk full: the position lives on in memory; at worst a
                self.cursor_save_errors_total += 1  # restart delivers these lines again
            return delivered

    def _save_cursor(self) -> None:
        path = os.path.join(self.directory, CURSOR_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"segment": self._committed.segment, "offset": self._committed.offset}, fh)
        os.replace(tmp, path)

    # ------------------------------------------------------------------ figures

    def size_bytes_unlocked(self) -> int:
        return sum(seg.size for seg in self._segments)

    @property
    def size_bytes(self) -> int:
        """Bytes of segment files on disk (delivered records of live segments included)."""
        with self._lock:
            return self.size_bytes_unlocked()

    @property
    def pending_bytes(self) -> int:
        """Bytes of undelivered records (framing included)."""
        with self._lock:
            return self.size_bytes_unlocked() - (
                self._committed.offset if any(s.seq == self._committed.segment for s in self._segments) else 0
            )

    @property
    def pending_lines(self) -> int:
        with self._lock:
            return self._pending_lines

    @property
    def oldest_age_s(self) -> float:
        """Seconds since the oldest undelivered line was appended; 0.0 when none."""
        with self._lock:
            if self._pending_lines <= 0:
                return 0.0
            if self._oldest_appended_s is None:
                records, _ = self._read(1)
                if not records:
                    return 0.0
                self._oldest_appended_s = records[0][0]
            return max(0.0, self._clock() - self._oldest_appended_s)

    def counters(self) -> dict[str, int]:
        """Counters since this Spool was opened (repairs: ``cursor_repair_counts()``)."""
        with self._lock:
            return {
                "appended_lines_total": self.appended_lines_total,
                "committed_lines_total": self.committed_lines_total,
                "dropped_lines_total": self.dropped_lines_total,
                "oversize_lines_total": self.oversize_lines_total,
                "corrupt_records_total": self.corrupt_records_total,
                "torn_bytes_total": self.torn_bytes_total,
                "unreadable_bytes_total": self.unreadable_bytes_total,
                "cursor_save_errors_total": self.cursor_save_errors_total,
                "pending_lines": self._pending_lines,
                "segments": len(self._segments),
            }

    def cursor_repair_counts(self) -> tuple[dict[str, int], str]:
        """Cursor repairs by reason since this Spool was opened, and the last one described."""
        with self._lock:
            return dict(self.cursor_repairs), self.last_cursor_repair

    def close(self) -> None:
        """Close the files and release the directory lock (idempotent)."""
        with self._lock:
            self._close_active()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
