"""Process discovery: which live processes belong to which job, and what each used.

Reads /proc directly (cheaper than psutil's per-attribute calls). A full scan of /proc
runs at most every ``rescan_interval_s`` (or at once when a GPU shows a process we do
not know); between scans only the processes of known jobs are re-read. Per-process
state is keyed by (pid, start time) so a reused PID is a new process.

A job is found, in order, by its label (the first of ``label_env`` present in the
process's environment; children inherit it) or, for processes seen on a GPU without a
label, by their process group. Command lines and environments are read only to find
the label and are never kept or exported: only the executable name (``comm``) is.
"""

from __future__ import annotations

import os
import pwd
import time
from dataclasses import dataclass, field
from typing import Iterable

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MAX_LABEL_CHARS = 256


@dataclass(frozen=True, slots=True)
class ProcStat:
    """One reading of /proc/<pid>/stat (the fields wattprint needs)."""

    pid: int
    comm: str
    ppid: int
    pgid: int
    cpu_ticks: int  # utime + stime, in clock ticks
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
        start_ticks=int(rest[19]),
        rss_bytes=int(rest[21]) * PAGE_SIZE,
    )


def read_stat(pid: int, proc_root: str = "/proc") -> ProcStat | None:
    try:
        with open(f"{proc_root}/{pid}/stat", "r", encoding="utf-8", errors="replace") as fh:
            return parse_stat(pid, fh.read())
    except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError, IndexError, OSError):
        return None


def read_label(pid: int, names: tuple[str, ...], proc_root: str = "/proc") -> tuple[str, str] | None:
    """(variable, value) of the first of ``names`` set (non-empty) in the process's
    initial environment, or None.

    Only the wanted variables are kept; the rest of the environment is discarded
    at once (it may hold secrets). Unreadable environments (other users' processes
    without CAP_SYS_PTRACE, kernel threads) give None.
    """
    try:
        with open(f"{proc_root}/{pid}/environ", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    found: dict[str, str] = {}
    wanted = {n.encode() + b"=": n for n in names}
    for entry in data.split(b"\x00"):
        for prefix, name in wanted.items():
            if entry.startswith(prefix) and name not in found:
                found[name] = entry[len(prefix):].decode("utf-8", errors="replace")
    for name in names:
        value = found.get(name)
        if value:
            return name, value[:MAX_LABEL_CHARS]
    return None


def boot_time_s(proc_root: str = "/proc") -> float:
    with open(f"{proc_root}/stat", "r") as fh:
        for line in fh:
            if line.startswith("btime "):
                return float(line.split()[1])
    raise RuntimeError("no btime in /proc/stat")  # pragma: no cover


def read_cpu_busy_ticks(proc_root: str = "/proc") -> tuple[int, int]:
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
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        _user_cache[uid] = name
    return name


@dataclass(frozen=True, slots=True)
class JobIdentity:
    """Who a job is. ``job_id`` = leader PID + leader start time: stable across daemon
    restarts and unique per host even when PIDs are reused."""

    job_id: str
    label: str  # "" for process-group jobs
    label_source: str  # the env variable it came from, or "pgid"
    uid: int
    user: str
    command: str  # executable name of the leader, never the command line
    root_pid: int
    started_at: float  # wall time the leader started


@dataclass(frozen=True, slots=True)
class JobUsage:
    """What one job's processes used in one tick."""

    identity: JobIdentity
    pids: frozenset[int]
    cpu_s: float  # CPU seconds used in the interval by the job's processes
    rss_bytes: int


@dataclass(frozen=True, slots=True)
class ProcessView:
    """The process side of one tick: jobs, their usage, and machine-wide figures."""

    jobs: tuple[JobUsage, ...]
    pid_to_job: dict[int, str]
    cpu_busy_s: float  # all CPUs, non-idle seconds in the interval
    mem_used_bytes: int
    scanned: bool  # True when this tick did a full /proc scan


@dataclass
class _Proc:
    stat: ProcStat
    uid: int
    label: str | None
    label_source: str | None
    job: "JobIdentity | None" = None


@dataclass
class ProcessTracker:
    """Keeps per-process state between ticks and groups processes into jobs."""

    label_env: tuple[str, ...] = ("WATTPRINT_JOB", "SLURM_JOB_ID")
    rescan_interval_s: float = 5.0
    proc_root: str = "/proc"
    _procs: dict[tuple[int, int], _Proc] = field(default_factory=dict)
    _tracked: set[int] = field(default_factory=set)  # pids re-read every tick
    _last_scan_mono: float = float("-inf")
    _last_cpu: dict[tuple[int, int], int] = field(default_factory=dict)
    _last_busy: int | None = None
    _boot_time: float = 0.0

    def __post_init__(self) -> None:
        self._boot_time = boot_time_s(self.proc_root)

    def _load(self, pid: int, st: ProcStat) -> _Proc:
        key = (pid, st.start_ticks)
        known = self._procs.get(key)
        if known is not None:
            known.stat = st
            return known
        try:
            uid = os.stat(f"{self.proc_root}/{pid}").st_uid
        except OSError:
            uid = -1
        found = read_label(pid, self.label_env, self.proc_root)
        source, label = found if found is not None else (None, None)
        proc = _Proc(stat=st, uid=uid, label=label, label_source=source)
        self._procs[key] = proc
        return proc

    def _scan_all(self) -> dict[int, _Proc]:
        live: dict[int, _Proc] = {}
        for entry in os.scandir(self.proc_root):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            st = read_stat(pid, self.proc_root)
            if st is None:
                continue
            live[pid] = self._load(pid, st)
        return live

    def _reread(self, pids: Iterable[int]) -> dict[int, _Proc]:
        live: dict[int, _Proc] = {}
        for pid in pids:
            st = read_stat(pid, self.proc_root)
            if st is not None:
                live[pid] = self._load(pid, st)
        return live

    def observe(self, now_mono_s: float, gpu_pids: Iterable[int]) -> ProcessView:
        """Read the processes that matter this tick and group them into jobs."""
        gpu_pids = set(gpu_pids)
        unknown_gpu = any(p not in self._tracked for p in gpu_pids)
        scanned = unknown_gpu or now_mono_s - self._last_scan_mono >= self.rescan_interval_s
        if scanned:
            live = self._scan_all()
            self._last_scan_mono = now_mono_s
        else:
            live = self._reread(self._tracked | gpu_pids)

        # Forget processes that are gone (only a full scan proves absence of others).
        if scanned:
            keep = {(pid, p.stat.start_ticks) for pid, p in live.items()}
            for key in [k for k in self._procs if k not in keep]:
                del self._procs[key]

        jobs = self._group(live, gpu_pids)

        busy, _total = read_cpu_busy_ticks(self.proc_root)
        busy_s = 0.0 if self._last_busy is None else max(0, busy - self._last_busy) / CLK_TCK
        self._last_busy = busy

        usages: list[JobUsage] = []
        pid_to_job: dict[int, str] = {}
        new_last_cpu: dict[tuple[int, int], int] = {}
        tracked: set[int] = set()
        for identity, members in jobs:
            cpu_ticks = 0
            rss = 0
            for proc in members:
                key = (proc.stat.pid, proc.stat.start_ticks)
                prev = self._last_cpu.get(key)
                if prev is not None:
                    cpu_ticks += max(0, proc.stat.cpu_ticks - prev)
                # A process first seen now: its earlier CPU time predates this
                # interval and is not booked.
                new_last_cpu[key] = proc.stat.cpu_ticks
                rss += proc.stat.rss_bytes
                pid_to_job[proc.stat.pid] = identity.job_id
                tracked.add(proc.stat.pid)
            usages.append(JobUsage(identity=identity, pids=frozenset(p.stat.pid for p in members),
                                   cpu_s=cpu_ticks / CLK_TCK, rss_bytes=rss))
        self._last_cpu = new_last_cpu
        self._tracked = tracked
        return ProcessView(
            jobs=tuple(usages),
            pid_to_job=pid_to_job,
            cpu_busy_s=busy_s,
            mem_used_bytes=read_mem_used_bytes(self.proc_root),
            scanned=scanned,
        )

    def _identity(self, leader: _Proc, label: str, label_source: str) -> JobIdentity:
        started_at = self._boot_time + leader.stat.start_ticks / CLK_TCK
        return JobIdentity(
            job_id=make_job_id(leader.stat.pid, started_at),
            label=label,
            label_source=label_source,
            uid=leader.uid,
            user=user_name(leader.uid) if leader.uid >= 0 else "unknown",
            command=leader.stat.comm,
            root_pid=leader.stat.pid,
            started_at=started_at,
        )

    def _group(self, live: dict[int, _Proc], gpu_pids: set[int]) -> list[tuple[JobIdentity, list[_Proc]]]:
        """Assign processes to jobs. Once assigned, a process keeps its job for life,
        so a job's id does not change when its leader exits before its children."""
        # Labelled processes: the leader is the topmost ancestor carrying the same
        # label for the same user; children inherit their ancestor's job.
        for proc in live.values():
            if proc.job is not None or proc.label is None:
                continue
            chain = [proc]
            node = proc
            while True:
                parent = live.get(node.stat.ppid)
                if (parent is None or parent in chain or parent.label != proc.label
                        or parent.uid != proc.uid):
                    break
                chain.append(parent)
                if parent.job is not None:
                    break
                node = parent
            top = chain[-1]
            ident = top.job or self._identity(top, proc.label, proc.label_source or "label")
            for member in chain:
                member.job = ident

        # Unlabelled processes whose process group has a process on a GPU, or is
        # already a job: the process group is the job.
        pg_jobs: dict[int, JobIdentity] = {}
        for proc in live.values():
            if proc.job is not None and proc.job.label_source == "pgid":
                pg_jobs.setdefault(proc.stat.pgid, proc.job)
        wanted = {live[p].stat.pgid for p in gpu_pids if p in live and live[p].job is None}
        wanted |= set(pg_jobs)
        if wanted:
            members_by_pg: dict[int, list[_Proc]] = {}
            for proc in live.values():
                if proc.job is None and proc.label is None and proc.stat.pgid in wanted:
                    members_by_pg.setdefault(proc.stat.pgid, []).append(proc)
            for pgid, members in members_by_pg.items():
                ident = pg_jobs.get(pgid)
                if ident is None:
                    leader = live.get(pgid)
                    if leader is None or leader.stat.pgid != pgid or leader.label is not None:
                        leader = min(members, key=lambda p: (p.stat.start_ticks, p.stat.pid))
                    ident = self._identity(leader, "", "pgid")
                for member in members:
                    member.job = ident

        groups: dict[str, tuple[JobIdentity, list[_Proc]]] = {}
        for proc in live.values():
            if proc.job is not None:
                groups.setdefault(proc.job.job_id, (proc.job, []))[1].append(proc)
        return list(groups.values())


def make_job_id(root_pid: int, started_at: float) -> str:
    """``<pid>-<start time in centiseconds since epoch>``: stable and unique per host."""
    return f"{root_pid}-{int(round(started_at * 100))}"


def now_wall() -> float:
    return time.time()
