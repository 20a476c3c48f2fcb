"""Reading /proc: one process's stat, the PID list, and machine-wide figures.

Reads /proc directly (cheaper than psutil's per-attribute calls). Nothing here
keeps per-process state except ``StatFiles``, the stat files of job processes held
open between ticks, and ``PidLister``, the names of the last /proc listing; which
processes to read when is the tracker's policy (daemon/procs/tracker.py).

Costs (issue 18, docs/benchmarks.md): a stat file is parsed from bytes (only
``comm`` is decoded); a /proc listing is ``os.listdir`` plus a set difference on the
names against the last listing, so ``int()`` runs only on the names new or gone; and
when only a few PIDs were handed out since the last look, they are probed one by one
(``is_process``, about 9 us each) instead of listing /proc (about 1 ms with 2,000
processes): a thread created anywhere on the box is a new PID too.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MAX_HELD_FILES = 4096  # job processes whose stat file stays open between ticks


@dataclass(frozen=True, slots=True)
class ProcStat:
    """One reading of /proc/<pid>/stat (the fields wattprint needs)."""

    pid: int
    comm: str
    ppid: int
    pgid: int
    cpu_ticks: int  # utime + stime, in clock ticks
    child_cpu_ticks: int  # cutime + cstime: CPU time of reaped children
    start_ticks: int  # start time after boot, in clock ticks
    rss_bytes: int


def parse_stat(pid: int, text: str) -> ProcStat:
    """Parse /proc/<pid>/stat; ``comm`` may contain spaces and parentheses."""
    return parse_stat_bytes(pid, text.encode("utf-8", "surrogateescape"))


def parse_stat_bytes(pid: int, data: bytes) -> ProcStat:
    """Parse /proc/<pid>/stat as read (bytes): only ``comm`` is decoded (invalid
    UTF-8 replaced, as a text read with ``errors="replace"`` would)."""
    lpar = data.index(b"(")
    rpar = data.rindex(b")")
    comm = data[lpar + 1 : rpar].decode("utf-8", "replace")
    rest = data[rpar + 2 :].split(None, 23)
    # rest[0] is field 3 (state); field n is rest[n - 3].
    # Positional: pid, comm, ppid, pgid, cpu_ticks, child_cpu_ticks, start_ticks, rss_bytes.
    return ProcStat(pid, comm, int(rest[1]), int(rest[2]), int(rest[11]) + int(rest[12]),
                    int(rest[13]) + int(rest[14]), int(rest[19]), int(rest[21]) * PAGE_SIZE)


def read_stat(pid: int, proc_root: str = "/proc") -> ProcStat | None:
    try:
        with open(f"{proc_root}/{pid}/stat", "rb") as fh:
            return parse_stat_bytes(pid, fh.read())
    except (OSError, ValueError, IndexError):
        return None


class StatFiles:
    """The stat files of job processes, held open between ticks: pread is about 3x
    cheaper than open+read+close, and a held file never follows a reused PID (it
    fails once its process is gone)."""

    def __init__(self, proc_root: str = "/proc") -> None:
        self.proc_root = proc_root
        self._fds: dict[int, int] = {}  # pid -> open /proc/PID/stat

    def read(self, pid: int) -> ProcStat | None:
        """Stat of ``pid``, through its held file when there is one."""
        fd = self._fds.get(pid)
        if fd is None:
            return read_stat(pid, self.proc_root)
        try:
            return parse_stat_bytes(pid, os.pread(fd, 4096, 0))
        except (OSError, ValueError, IndexError):
            os.close(self._fds.pop(pid))
            # Its process is gone; another may have the PID already.
            return read_stat(pid, self.proc_root)

    def hold(self, pids: set[int]) -> None:
        """Keep stat files open for exactly ``pids`` (at most ``MAX_HELD_FILES``)."""
        for pid in self._fds.keys() - pids:
            os.close(self._fds.pop(pid))
        for pid in pids - self._fds.keys():
            if len(self._fds) >= MAX_HELD_FILES:
                break
            try:
                self._fds[pid] = os.open(f"{self.proc_root}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue

    def close(self) -> None:
        self.hold(set())


def list_pids(proc_root: str = "/proc") -> set[int]:
    """Every PID in /proc (one getdents walk)."""
    return {int(e.name) for e in os.scandir(proc_root) if e.name.isdigit()}


class PidLister:
    """Lists /proc and tells what changed since its last listing: ``os.listdir`` and a
    set difference on the names, ``int()`` only on the names new or gone (non-numeric
    names such as ``self`` or ``meminfo`` are in both listings and never looked at)."""

    def __init__(self, proc_root: str = "/proc") -> None:
        self.proc_root = proc_root
        self._names: set[str] = set()

    def changes(self) -> tuple[set[int], set[int], set[str]]:
        """(PIDs listed now and not last time, PIDs listed last time and not now, the
        names listed now)."""
        names = set(os.listdir(self.proc_root))
        new = {int(n) for n in names - self._names if n.isdigit()}
        gone = {int(n) for n in self._names - names if n.isdigit()}
        self._names = names
        return new, gone, names

    def add(self, pids: set[int]) -> None:
        """PIDs found without a listing (``is_process``): a later listing that no
        longer shows them reports them gone."""
        self._names.update(str(pid) for pid in pids)


PROBE_MAX_PIDS = 64  # at most this many new PIDs since the last look: probe them, else list /proc


def is_process(pid: int, proc_root: str = "/proc") -> bool:
    """True when ``pid`` is a live process (a thread group leader), False for a
    thread of another process or a PID not in use. /proc lists only processes, but
    ``/proc/TID`` of a thread can be opened all the same; its ``Tgid`` tells."""
    try:
        with open(f"{proc_root}/{pid}/status", "rb") as fh:
            head = fh.read(512)
    except OSError:
        return False
    at = head.find(b"\nTgid:")
    if at < 0:
        return False
    try:
        return int(head[at + 6 : head.index(b"\n", at + 1)]) == pid
    except ValueError:
        return False


def last_pid(proc_root: str = "/proc") -> int | None:
    """The last PID the kernel handed out (/proc/loadavg), or None."""
    try:
        with open(f"{proc_root}/loadavg") as fh:
            return int(fh.read().split()[4])
    except (OSError, ValueError, IndexError):
        return None


def uptime_ticks(proc_root: str = "/proc") -> int:
    """Clock ticks since boot (/proc/uptime), or 0 when unreadable."""
    try:
        with open(f"{proc_root}/uptime") as fh:
            return int(float(fh.read().split()[0]) * CLK_TCK)
    except (OSError, ValueError):
        return 0


def process_uid(pid: int, proc_root: str = "/proc") -> int:
    """The owner of /proc/<pid> (the process's real uid), or -1 when it is gone."""
    try:
        return os.stat(f"{proc_root}/{pid}").st_uid
    except OSError:
        return -1


def boot_time_s(proc_root: str = "/proc") -> float:
    with open(f"{proc_root}/stat", "r") as fh:
        for line in fh:
            if line.startswith("btime "):
                return float(line.split()[1])
    raise RuntimeError("no btime in /proc/stat")  # pragma: no cover


def read_cpu_ticks(proc_root: str = "/proc") -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    with open(f"{proc_root}/stat", "r") as fh:
        first = fh.readline().split()
    values = [int(v) for v in first[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already part of user time
    return total - idle, total


def read_mem_used_bytes(proc_root: str = "/proc") -> int:
    """MemTotal - MemAvailable, in bytes."""
    info: dict[str, int] = {}
    with open(f"{proc_root}/meminfo", "r") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                info[key] = int(rest.split()[0]) * 1024
    return max(0, info.get("MemTotal", 0) - info.get("MemAvailable", 0))


_user_cache: dict[int, str] = {}


def user_name(uid: int) -> str:
    name = _user_cache.get(uid)
    if name is None:
        try:
            # A passwd name need not be UTF-8: keep it printable and encodable.
            name = pwd.getpwuid(uid).pw_name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except KeyError:
            name = str(uid)
        _user_cache[uid] = name
    return name
