"""Reading /proc: one process's stat, the PID list, and machine-wide figures.

Reads /proc directly (cheaper than psutil's per-attribute calls). Nothing here
keeps per-process state except ``StatFiles``, the stat files of job processes held
open between ticks; which processes to read when is the tracker's policy
(daemon/procs/tracker.py).
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
    lpar = text.index("(")
    rpar = text.rindex(")")
    comm = text[lpar + 1 : rpar]
    rest = text[rpar + 2 :].split()
    # rest[0] is field 3 (state); field n is rest[n - 3].
    return ProcStat(
        pid=pid,
        comm=comm,
        ppid=int(rest[1]),
        pgid=int(rest[2]),
        cpu_ticks=int(rest[11]) + int(rest[12]),
        child_cpu_ticks=int(rest[13]) + int(rest[14]),
        start_ticks=int(rest[19]),
        rss_bytes=int(rest[21]) * PAGE_SIZE,
    )


def read_stat(pid: int, proc_root: str = "/proc") -> ProcStat | None:
    try:
        with open(f"{proc_root}/{pid}/stat", "r", encoding="utf-8", errors="replace") as fh:
            return parse_stat(pid, fh.read())
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
            return parse_stat(pid, os.pread(fd, 4096, 0).decode("utf-8", "replace"))
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
