"""Process discovery: which live processes belong to which job, and what each used.

Reads /proc directly (cheaper than psutil's per-attribute calls). Each tick lists
/proc (one getdents walk) and reads only processes it has not seen before, plus the
stat of job processes; every process is re-read only every ``rescan_interval_s`` or
when a GPU shows a process without a job. Members of job cgroups come from their
``cgroup.procs`` (v2; for a Slurm job on a cgroup v1 or hybrid node, in the v1
hierarchy its processes' Slurm line names, ``read_cgroup``). Per-process state is checked against the process's start time, so
a reused PID is a new process.

A job is found, in order, by
1. its label: the first of ``label_env`` set in the process's environment (children
   inherit it); the job's leader is the topmost ancestor with the same label and user;
2. its cgroup, when ``cgroup_kinds`` names the kind (Slurm job, systemd unit,
   container) and one of the cgroup's processes is on a GPU;
3. its process group, for other processes seen on a GPU.
Once assigned, a process keeps its job for life, so a job's id (leader PID + leader
start time) survives its leader exiting first and daemon restarts.

Labels come from any local user: they are sanitised to ``LABEL_CHARS`` and
``MAX_LABEL_LEN`` (each other character becomes ``_``; the raw value is kept for the
API), and each user may hold at most ``max_labels_per_user`` distinct live labels —
further labels become ``OVERFLOW_LABEL`` (counted in ``labels_overflow_total``, logged
once per user per episode; the raw label is kept in ``label_raw``). Command lines and
environments are read only to find the label and are never kept: only the executable
name (``comm``) is. An environment the kernel refuses (another user's process, the
daemon without CAP_SYS_PTRACE / CAP_DAC_READ_SEARCH) is counted, and
``label_problem`` says which capability is missing (from CapEff).

CPU time of a process that exits between ticks is not lost: when a job process reaps
a child, the child's final CPU time appears in the parent's cutime/cstime; the job's
CPU time is the growth of self + reaped-children time of its live processes, minus
what was already counted for the children that disappeared.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pwd
import re
from dataclasses import dataclass, field
from typing import Iterable

from . import slurm as slurm_ids
from .model import JobIdentity

log = logging.getLogger("wattprint.procs")

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MAX_RAW_LABEL_CHARS = 256
MAX_LABEL_LEN = 64
LABEL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:/@+-")
OVERFLOW_LABEL = "_overflow"
CGROUP_KINDS = ("slurm", "systemd", "container")
MAX_HELD_FILES = 4096  # job processes whose stat file stays open between ticks
SLURM_KEEP_S = 600.0  # a Slurm job's identity is kept this long after its last process


def sanitize_label(raw: str) -> str:
    """The label as exported: disallowed characters replaced by ``_``, at most
    ``MAX_LABEL_LEN`` characters, never empty."""
    clean = "".join(ch if ch in LABEL_CHARS else "_" for ch in raw[:MAX_LABEL_LEN])
    return clean or "_"


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


def read_label(pid: int, names: tuple[str, ...], proc_root: str = "/proc") -> tuple[str, str] | None:
    """(variable, value) of the first of ``names`` set (non-empty) in the process's
    initial environment, or None.

    Only the wanted variables are kept; the rest of the environment is discarded
    at once (it may hold secrets). Unreadable environments (other users' processes
    without CAP_SYS_PTRACE, kernel threads) give None.
    """
    return read_label_checked(pid, names, proc_root)[0]


def read_label_checked(pid: int, names: tuple[str, ...],
                       proc_root: str = "/proc") -> tuple[tuple[str, str] | None, bool]:
    """``read_label`` and whether the environment was refused (EACCES/EPERM: another
    user's process and the daemon lacks CAP_SYS_PTRACE / CAP_DAC_READ_SEARCH)."""
    try:
        with open(f"{proc_root}/{pid}/environ", "rb") as fh:
            data = fh.read()
    except PermissionError:
        return None, True
    except OSError:
        return None, False
    found: dict[str, str] = {}
    wanted = {n.encode() + b"=": n for n in names}
    for entry in data.split(b"\x00"):
        for prefix, name in wanted.items():
            if entry.startswith(prefix) and name not in found:
                found[name] = entry[len(prefix):].decode("utf-8", errors="replace")
    for name in names:
        value = found.get(name)
        if value:
            return (name, value[:MAX_RAW_LABEL_CHARS]), False
    return None, False


# Capabilities that reading another user's /proc/<pid>/environ needs (bit numbers of
# linux/capability.h): ptrace access to the process, and reading its 0400 file.
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE = 1, 2, 19


def effective_capabilities(proc_root: str = "/proc") -> int | None:
    """The daemon's effective capability set (``CapEff`` of /proc/self/status), or None."""
    try:
        with open(f"{proc_root}/self/status") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        return None
    return None


def missing_label_capabilities(cap_eff: int | None) -> list[str]:
    """The capabilities (of those reading other users' environments needs) that
    ``cap_eff`` lacks; CAP_DAC_OVERRIDE stands in for CAP_DAC_READ_SEARCH."""
    if cap_eff is None:
        return ["CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"]
    missing = []
    if not cap_eff >> CAP_SYS_PTRACE & 1:
        missing.append("CAP_SYS_PTRACE")
    if not (cap_eff >> CAP_DAC_READ_SEARCH & 1 or cap_eff >> CAP_DAC_OVERRIDE & 1):
        missing.append("CAP_DAC_READ_SEARCH")
    return missing


def read_cgroup(pid: int, proc_root: str = "/proc", slurm_v1: bool = False) -> str | None:
    """The process's cgroup v2 path (the ``0::`` line), or None. With ``slurm_v1``, a
    process whose v2 path is no Slurm job but that is in a Slurm job in a v1 hierarchy
    (cgroup v1 and hybrid nodes: ``<n>:freezer:/slurm/uid_U/job_N/step_S``) gets that
    line as a key ``v1:<controllers>:<path>`` (``V1_KEY``) instead."""
    try:
        with open(f"{proc_root}/{pid}/cgroup", "r", errors="replace") as fh:
            text = fh.read(65536)
    except OSError:
        return None
    v2 = None
    for line in text.splitlines():
        if line.startswith("0::"):
            v2 = line[3:].strip()
            break
    if slurm_v1:
        found = slurm_ids.parse_proc_cgroup(text)
        if found is not None and found.version == 1:
            return f"{V1_KEY}{found.hierarchy}:{found.path}"
    return v2


V1_KEY = "v1:"  # a cgroup v1 Slurm path, as read_cgroup gives it: v1:<controllers>:<path>


def split_v1_key(key: str) -> tuple[str, str] | None:
    """(controllers, path) of a ``v1:<controllers>:<path>`` key, or None for a v2 path."""
    if not key.startswith(V1_KEY):
        return None
    controllers, _, path = key[len(V1_KEY):].partition(":")
    return controllers, path


_SLURM = re.compile(r"^(.*?/job_(\d+))(?:/|$)")
_CONTAINER = re.compile(
    r"^(.*?/(?:docker-|libpod-|cri-containerd-|crio-|containerd-)?([0-9a-f]{64})(?:\.scope)?)(?:/|$)"
)
_SYSTEMD_UNIT = re.compile(r"^[^/]+\.(?:service|scope)$")


def classify_cgroup(path: str, kinds: Iterable[str]) -> tuple[str, str, str] | None:
    """(kind, job cgroup path, label) for a cgroup v2 path, trying ``kinds`` in
    order, or None. Examples:
    ``/system.slice/slurmstepd.scope/job_42/step_0/user/task_0`` -> slurm, "42";
    ``/system.slice/docker-<64 hex>.scope`` -> container, "container-<12 hex>";
    ``/user.slice/user-1000.slice/user@1000.service/app.slice/run-u7.scope`` -> systemd, "run-u7.scope".
    """
    v1 = split_v1_key(path)
    if v1 is not None:  # a Slurm job in a v1 hierarchy (read_cgroup): only the slurm kind applies
        found = slurm_ids.parse_cgroup_path(v1[1], 1) if "slurm" in kinds else None
        return ("slurm", f"{V1_KEY}{v1[0]}:{found.job_path}", found.job_id) if found is not None else None
    for kind in kinds:
        if kind == "slurm":
            slurm_cg = slurm_ids.parse_cgroup_path(path, 2)  # slurmstepd.scope/job_N (daemon/slurm.py)
            if slurm_cg is not None:
                return "slurm", slurm_cg.job_path, slurm_cg.job_id
            m = _SLURM.match(path)
            if m and "slurm" in path:
                return "slurm", m.group(1), m.group(2)
        elif kind == "container":
            m = _CONTAINER.match(path)
            if m:
                return "container", m.group(1), f"container-{m.group(2)[:12]}"
        elif kind == "systemd":
            parts = [p for p in path.split("/") if p]
            # The innermost unit that is not a user manager (user@UID.service).
            for i in range(len(parts) - 1, -1, -1):
                part = parts[i]
                if _SYSTEMD_UNIT.match(part) and not part.startswith("user@"):
                    return "systemd", "/" + "/".join(parts[: i + 1]), part
    return None


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


@dataclass(frozen=True, slots=True)
class JobUsage:
    """What one job's processes used in one tick."""

    identity: JobIdentity
    pids: frozenset[int]
    cpu_s: float  # CPU seconds used in the interval by the job's processes
    rss_bytes: int
    steps: frozenset[str] = frozenset()  # Slurm steps of the job's processes this tick ("batch", "0", ...)


@dataclass(frozen=True, slots=True)
class ProcessView:
    """The process side of one tick: jobs, their usage, and machine-wide figures."""

    jobs: tuple[JobUsage, ...]
    pid_to_job: dict[int, str]
    cpu_busy_s: float  # all CPUs, non-idle seconds in the interval
    mem_used_bytes: int
    scanned: bool  # True when this tick did a full /proc scan
    cpu_total_s: float = 0.0  # all CPUs, busy + idle seconds in the interval (capacity)


@dataclass(eq=False)
class _Proc:
    stat: ProcStat
    uid: int
    label_raw: str | None
    label_source: str | None
    cgroup: str | None = None
    job: JobIdentity | None = None
    job_cgroup: str | None = None  # the cgroup path of its job, for cgroup jobs
    slurm: slurm_ids.SlurmProcess | None = None  # its Slurm job and step (label from SLURM_JOB_ID)
    no_job: bool = False  # a Slurm prolog/epilog: never part of any job


@dataclass
class ProcessTracker:
    """Keeps per-process state between ticks and groups processes into jobs."""

    label_env: tuple[str, ...] = ("WATTPRINT_JOB", "SLURM_JOB_ID")
    rescan_interval_s: float = 30.0
    proc_root: str = "/proc"
    cgroup_kinds: tuple[str, ...] = ()
    cgroup_root: str = ""  # cgroup v2 mount; "" = detect
    # cgroup v1 hierarchies: controllers ("freezer", "cpu,cpuacct") -> mount point;
    # None = detect from /proc/self/mounts (only used with the "slurm" kind)
    cgroup_v1_mounts: dict[str, str] | None = None
    max_labels_per_user: int = 32
    label_cap_hold_s: float = 0.0  # below the cap this long ends an overflow episode ([jobs] label_cap_hold_s)
    _by_pid: dict[int, _Proc] = field(default_factory=dict)  # every live process we know
    _tracked: set[int] = field(default_factory=set)  # job processes: re-read every tick
    _young: set[int] = field(default_factory=set)  # first seen under a second old
    _fresh: set[int] = field(default_factory=set)  # loaded since the last grouping
    _fds: dict[int, int] = field(default_factory=dict)  # pid -> open /proc/PID/stat of job processes
    _seen_last_pid: int | None = None
    _job_cgroups: set[str] = field(default_factory=set)
    _last_scan_mono: float = float("-inf")
    # (pid, start) -> (own CPU ticks, reaped-children CPU ticks, ppid, job id) at the last tick
    _last_cpu: dict[tuple[int, int], tuple[int, int, int, str]] = field(default_factory=dict)
    _last_ticks: tuple[int, int] | None = None
    _last_uptime_ticks: int | None = None  # clock ticks since boot at the last observe
    _boot_time: float = 0.0
    labels_overflow_total: int = 0  # jobs filed under OVERFLOW_LABEL because their user was at the cap
    _overflow_users: set[int] = field(default_factory=set)  # uids at the label cap (logged once per episode)
    # uid -> monotonic time it was first seen below the cap again; the episode ends (one
    # log line) only after label_cap_hold_s below it, so a user hovering at the cap is
    # one episode, not a warning/info pair every tick.
    _overflow_below_since: dict[int, float] = field(default_factory=dict)
    _denied: set[int] = field(default_factory=set)  # live pids whose environment the kernel refused
    _cap_eff: int | None = None  # the daemon's effective capabilities
    # (uid, Slurm job name) -> (identity, monotonic time a member was last seen): every
    # process of one Slurm job on this node joins one job, across steps and tasks.
    _slurm_jobs: dict[tuple[int, str], tuple[JobIdentity, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._boot_time = boot_time_s(self.proc_root)
        self._cap_eff = effective_capabilities()
        if self.cgroup_kinds and not self.cgroup_root:
            self.cgroup_root = detect_cgroup2_root()
        if "slurm" in self.cgroup_kinds and self.cgroup_v1_mounts is None:
            self.cgroup_v1_mounts = detect_cgroup1_mounts()

    # -- reading ---------------------------------------------------------------
    def _load(self, pid: int, st: ProcStat) -> _Proc:
        """Update or create the state of ``pid`` from a fresh stat reading."""
        known = self._by_pid.get(pid)
        if known is not None and known.stat.start_ticks == st.start_ticks:
            if known.stat.comm != st.comm:
                self._relabel(known)  # it exec'd since we looked
            known.stat = st
            return known
        try:
            uid = os.stat(f"{self.proc_root}/{pid}").st_uid
        except OSError:
            uid = -1
        proc = _Proc(stat=st, uid=uid, label_raw=None, label_source=None)
        self._read_identity(proc)
        self._by_pid[pid] = proc  # replaces a process that had this PID before
        self._fresh.add(pid)
        if self._now_ticks() - st.start_ticks < CLK_TCK:
            self._young.add(pid)  # maybe not exec'd yet: look again next tick
        return proc

    def _relabel(self, proc: _Proc) -> None:
        """Read the label again (the process may have exec'd with a new environment:
        one first seen between fork and exec carried its parent's). A label of its
        own wins over a process-group or cgroup job; a labelled job is kept for life."""
        if proc.job is not None and not (proc.job.label_source == "pgid" or proc.job.label_source.startswith("cgroup:")):
            return
        before = proc.label_raw
        self._read_identity(proc)
        if proc.job is not None and proc.label_raw is not None and proc.label_raw != before:
            proc.job, proc.job_cgroup = None, None
        self._fresh.add(proc.stat.pid)

    def _read_identity(self, proc: _Proc) -> None:
        found, denied = read_label_checked(proc.stat.pid, self.label_env, self.proc_root)
        if denied:
            self._denied.add(proc.stat.pid)
        else:
            self._denied.discard(proc.stat.pid)
        proc.label_source, proc.label_raw = found if found is not None else (None, None)
        proc.slurm, proc.no_job = None, False
        if proc.label_source == "SLURM_JOB_ID":
            self._read_slurm(proc)
        if self.cgroup_kinds and proc.label_raw is None:
            proc.cgroup = self._read_cgroup(proc.stat.pid)

    def _read_cgroup(self, pid: int) -> str | None:
        return read_cgroup(pid, self.proc_root, slurm_v1="slurm" in self.cgroup_kinds)

    def _read_slurm(self, proc: _Proc) -> None:
        """Slurm identity of a process labelled by SLURM_JOB_ID (daemon/slurm.py): its
        job's name becomes the label; a prolog/epilog script belongs to no job."""
        parent = self._by_pid.get(proc.stat.ppid)
        parent_stat = parent.stat if parent is not None else read_stat(proc.stat.ppid, self.proc_root)
        found = slurm_ids.read_process(proc.stat.pid, parent_stat.comm if parent_stat else "", self.proc_root)
        if found is None:
            return
        if found.script:
            proc.label_source, proc.label_raw, proc.no_job = None, None, True
            return
        proc.slurm = found
        proc.label_raw = found.job.name

    def _now_ticks(self) -> int:
        try:
            with open(f"{self.proc_root}/uptime") as fh:
                return int(float(fh.read().split()[0]) * CLK_TCK)
        except (OSError, ValueError):
            return 0

    def _read_stat(self, pid: int) -> ProcStat | None:
        """Stat of ``pid``; job processes keep their stat file open (pread is about
        3x cheaper than open+read+close, and a held file never follows a reused PID:
        it fails once its process is gone)."""
        fd = self._fds.get(pid)
        if fd is None:
            return read_stat(pid, self.proc_root)
        try:
            return parse_stat(pid, os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        except (OSError, ValueError, IndexError):
            os.close(self._fds.pop(pid))
            # Its process is gone; another may have the PID already.
            return read_stat(pid, self.proc_root)

    def _hold(self, pids: set[int]) -> None:
        """Keep stat files open for exactly ``pids`` (the job processes)."""
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
        self._hold(set())

    def _reread(self, pids: Iterable[int]) -> None:
        for pid in pids:
            st = self._read_stat(pid)
            if st is None:
                self._by_pid.pop(pid, None)
            else:
                self._load(pid, st)

    def _last_pid(self) -> int | None:
        """The last PID the kernel handed out (/proc/loadavg), or None."""
        try:
            with open(f"{self.proc_root}/loadavg") as fh:
                return int(fh.read().split()[4])
        except (OSError, ValueError, IndexError):
            return None

    def _discover(self) -> bool:
        """List /proc when a process (or thread) was created since the last look:
        load processes not seen before and forget those that are gone. Returns True
        when the PID counter wrapped, so reused PIDs must be checked (full re-read)."""
        last_pid = self._last_pid()
        if last_pid is not None and last_pid == self._seen_last_pid:
            return False
        wrapped = last_pid is not None and self._seen_last_pid is not None and last_pid < self._seen_last_pid
        self._seen_last_pid = last_pid
        pids = {int(e.name) for e in os.scandir(self.proc_root) if e.name.isdigit()}
        for pid in self._by_pid.keys() - pids:
            del self._by_pid[pid]
        self._reread(pids - self._by_pid.keys())
        return wrapped

    def _cgroup_dir(self, path: str) -> str | None:
        """The directory of a job cgroup: under the v2 mount, or for a v1 key under
        the mount of its hierarchy (None when that is not mounted)."""
        v1 = split_v1_key(path)
        if v1 is None:
            return os.path.join(self.cgroup_root, path.lstrip("/"))
        mount = v1_mount(self.cgroup_v1_mounts or {}, v1[0])
        return os.path.join(mount, v1[1].lstrip("/")) if mount else None

    def _cgroup_members(self) -> set[int]:
        pids: set[int] = set()
        for path in self._job_cgroups:
            top = self._cgroup_dir(path)
            if top is None:
                continue
            for dirpath, _dirs, _files in os.walk(top):
                try:
                    with open(os.path.join(dirpath, "cgroup.procs")) as fh:
                        pids.update(int(p) for p in fh.read().split())
                except (OSError, ValueError):
                    continue
        return pids

    # -- one tick ----------------------------------------------------------------
    def observe(self, now_mono_s: float, gpu_pids: Iterable[int]) -> ProcessView:
        """Read the processes that matter this tick and group them into jobs.

        Every tick: list /proc if any process was created since the last tick and
        read only processes not seen before, plus the stat of job processes, GPU
        processes and young processes. Every ``rescan_interval_s``, when a GPU shows
        a process without a job, or when the PID counter wrapped, re-read every
        process (process groups, cgroups and PIDs may have changed).
        """
        gpu_pids = set(gpu_pids)
        young, self._young = self._young, set()  # first seen on an earlier tick, under a second old
        wrapped = self._discover()
        unknown_gpu = any(p in self._by_pid and self._by_pid[p].job is None for p in gpu_pids)
        scanned = wrapped or unknown_gpu or now_mono_s - self._last_scan_mono >= self.rescan_interval_s
        if scanned:
            self._reread(list(self._by_pid))
            self._last_scan_mono = now_mono_s
        else:
            members = self._cgroup_members()
            cg_moved = [p for p in members if p in self._by_pid and self._by_pid[p].job is None]
            for pid in cg_moved:  # moved into a job cgroup after we first read it
                self._by_pid[pid].cgroup = self._read_cgroup(pid)
            self._reread((self._tracked | gpu_pids | young | members) & self._by_pid.keys())
        for pid in young:  # first seen under a second old: maybe not exec'd then
            if pid in self._by_pid:
                self._relabel(self._by_pid[pid])
        live = self._by_pid
        if scanned:
            candidates: Iterable[int] = live.keys()
        else:
            candidates = (self._fresh | gpu_pids | members | self._tracked) & live.keys()
        self._fresh = set()

        groups = self._group(live, gpu_pids, candidates)

        busy, total = read_cpu_ticks(self.proc_root)
        if self._last_ticks is None:
            busy_s = total_s = 0.0
        else:
            busy_s = max(0, busy - self._last_ticks[0]) / CLK_TCK
            total_s = max(0, total - self._last_ticks[1]) / CLK_TCK
        self._last_ticks = (busy, total)

        prev_uptime, self._last_uptime_ticks = self._last_uptime_ticks, self._now_ticks()
        usages: list[JobUsage] = []
        pid_to_job: dict[int, str] = {}
        new_last: dict[tuple[int, int], tuple[int, int, int, str]] = {}
        tracked: set[int] = set()
        gone_by_job: dict[str, list[tuple[int, int, int]]] = {}
        for key, (own, kids, ppid, job_id) in self._last_cpu.items():
            now_proc = live.get(key[0])
            if now_proc is None or now_proc.stat.start_ticks != key[1]:
                gone_by_job.setdefault(job_id, []).append((own, kids, ppid))
        for identity, members in groups:
            ticks = 0
            rss = 0
            member_pids = {p.stat.pid for p in members}
            for proc in members:
                key = (proc.stat.pid, proc.stat.start_ticks)
                prev = self._last_cpu.get(key)
                if prev is not None:
                    ticks += max(0, proc.stat.cpu_ticks - prev[0]) + max(0, proc.stat.child_cpu_ticks - prev[1])
                elif prev_uptime is not None and proc.stat.start_ticks >= prev_uptime:
                    # Born since the last tick: all of its CPU time is this interval's
                    # (and is subtracted again through its parent when it exits).
                    ticks += proc.stat.cpu_ticks + proc.stat.child_cpu_ticks
                # Otherwise a process first seen now ran before we looked: its earlier
                # CPU time predates this interval and is not booked.
                new_last[key] = (proc.stat.cpu_ticks, proc.stat.child_cpu_ticks, proc.stat.ppid, identity.job_id)
                rss += proc.stat.rss_bytes
                pid_to_job[proc.stat.pid] = identity.job_id
                tracked.add(proc.stat.pid)
            # Children that exited since the last tick and were reaped by a live
            # member: their final time is in the parent's reaped-children time, of
            # which the part counted before must not be counted again.
            for own, kids, ppid in gone_by_job.get(identity.job_id, ()):
                if ppid in member_pids:
                    ticks -= own + kids
            steps = frozenset(p.slurm.step for p in members if p.slurm is not None)
            usages.append(JobUsage(identity=identity, pids=frozenset(member_pids),
                                   cpu_s=max(0, ticks) / CLK_TCK, rss_bytes=rss, steps=steps))
        self._last_cpu = new_last
        self._tracked = tracked
        self._hold(tracked)
        self._job_cgroups = {p.job_cgroup for _i, ms in groups for p in ms if p.job_cgroup}
        self._denied &= live.keys()
        self._end_overflow_episodes(groups, now_mono_s)
        self._slurm_seen(groups, now_mono_s)
        return ProcessView(
            jobs=tuple(usages),
            pid_to_job=pid_to_job,
            cpu_busy_s=busy_s,
            mem_used_bytes=read_mem_used_bytes(self.proc_root),
            scanned=scanned,
            cpu_total_s=total_s,
        )

    # -- grouping ----------------------------------------------------------------
    def _identity(self, leader: _Proc, label_raw: str, label_source: str, live_labels: dict[int, set[str]]) -> JobIdentity:
        started_at = self._boot_time + leader.stat.start_ticks / CLK_TCK
        label = sanitize_label(label_raw) if label_raw else ""
        if label and label != OVERFLOW_LABEL:  # the overflow label itself does not count toward the cap
            labels = live_labels.setdefault(leader.uid, set())
            if label not in labels and len(labels) >= self.max_labels_per_user:
                label = OVERFLOW_LABEL
                self._note_overflow(leader.uid, label_raw)
            else:
                labels.add(label)
        return JobIdentity(
            job_id=make_job_id(leader.stat.pid, started_at),
            label=label,
            label_source=label_source,
            uid=leader.uid,
            user=user_name(leader.uid) if leader.uid >= 0 else "unknown",
            command=leader.stat.comm,
            root_pid=leader.stat.pid,
            started_at=started_at,
            label_raw=label_raw,
        )

    def _group(self, live: dict[int, _Proc], gpu_pids: set[int],
               candidate_pids: Iterable[int]) -> list[tuple[JobIdentity, list[_Proc]]]:
        """Assign processes to jobs (a process keeps its job for life).

        Only ``candidate_pids`` (new, re-read or job processes; all on a full scan)
        are looked at, so a tick's cost follows the number of job processes, not
        the number of processes on the box."""
        candidates = [live[p] for p in candidate_pids]
        live_labels: dict[int, set[str]] = {}
        for proc in candidates:
            if proc.job is not None and proc.job.label and proc.job.label != OVERFLOW_LABEL:
                live_labels.setdefault(proc.job.uid, set()).add(proc.job.label)

        # 1. Labelled processes; those of one Slurm job (batch step, srun steps,
        # tasks, their children) are one job, whatever their ancestry.
        self._group_slurm(candidates, live_labels)
        for proc in candidates:
            if proc.job is not None or proc.label_raw is None:
                continue
            chain = [proc]
            node = proc
            while True:
                parent = live.get(node.stat.ppid)
                if (parent is None or parent in chain or parent.label_raw != proc.label_raw
                        or parent.uid != proc.uid):
                    break
                chain.append(parent)
                if parent.job is not None:
                    break
                node = parent
            top = chain[-1]
            ident = top.job or self._identity(top, proc.label_raw, proc.label_source or "label", live_labels)
            for member in chain:
                member.job = ident

        # 2. Cgroups of configured kinds with a process on a GPU (or already a job).
        if self.cgroup_kinds:
            cg_jobs: dict[str, JobIdentity] = {}
            for proc in candidates:
                if proc.job is not None and proc.job_cgroup:
                    cg_jobs.setdefault(proc.job_cgroup, proc.job)
            wanted: dict[str, tuple[str, str]] = {}
            for pid in gpu_pids:
                proc = live.get(pid)
                if proc is None or proc.job is not None or proc.cgroup is None or proc.no_job:
                    continue
                found = classify_cgroup(proc.cgroup, self.cgroup_kinds)
                if found is not None:
                    wanted[found[1]] = (found[0], found[2])
            for path in cg_jobs:
                wanted.setdefault(path, ("", ""))
            if wanted:
                members_by_cg: dict[str, list[_Proc]] = {}
                for proc in candidates:
                    if proc.job is not None or proc.cgroup is None or proc.no_job:
                        continue
                    for path in wanted:
                        if proc.cgroup == path or proc.cgroup.startswith(path + "/"):
                            members_by_cg.setdefault(path, []).append(proc)
                            break
                for path, members in members_by_cg.items():
                    ident = cg_jobs.get(path)
                    if ident is None:
                        kind, label = wanted[path]
                        leader = min(members, key=lambda p: (p.stat.start_ticks, p.stat.pid))
                        ident = self._identity(leader, label, f"cgroup:{kind}", live_labels)
                    for member in members:
                        member.job = ident
                        member.job_cgroup = path

        # 3. Process groups with a process on a GPU (or already a job).
        pg_jobs: dict[int, JobIdentity] = {}
        for proc in candidates:
            if proc.job is not None and proc.job.label_source == "pgid":
                pg_jobs.setdefault(proc.stat.pgid, proc.job)
        wanted_pg = {live[p].stat.pgid for p in gpu_pids if p in live and live[p].job is None}
        wanted_pg |= set(pg_jobs)
        if wanted_pg:
            members_by_pg: dict[int, list[_Proc]] = {}
            for proc in candidates:
                if proc.job is None and proc.label_raw is None and proc.stat.pgid in wanted_pg and not proc.no_job:
                    members_by_pg.setdefault(proc.stat.pgid, []).append(proc)
            for pgid, members in members_by_pg.items():
                ident = pg_jobs.get(pgid)
                if ident is None:
                    leader = live.get(pgid)
                    if leader is None or leader.stat.pgid != pgid or leader.label_raw is not None:
                        leader = min(members, key=lambda p: (p.stat.start_ticks, p.stat.pid))
                    ident = self._identity(leader, "", "pgid", live_labels)
                for member in members:
                    member.job = ident

        groups: dict[str, tuple[JobIdentity, list[_Proc]]] = {}
        for proc in candidates:
            if proc.job is not None:
                groups.setdefault(proc.job.job_id, (proc.job, []))[1].append(proc)
        return list(groups.values())


    # -- Slurm ------------------------------------------------------------------------
    def _group_slurm(self, candidates: list[_Proc], live_labels: dict[int, set[str]]) -> None:
        """Every unassigned process with a Slurm identity joins the job of its (uid,
        Slurm job name), created on first sight with the earliest-started member as
        leader. Only the same uid joins: another user setting SLURM_JOB_ID gets a job
        of their own."""
        new: dict[tuple[int, str], list[_Proc]] = {}
        for proc in candidates:
            if proc.job is None and proc.slurm is not None and proc.label_raw is not None:
                new.setdefault((proc.uid, proc.slurm.job.name), []).append(proc)
        for key, members in new.items():
            known = self._slurm_jobs.get(key)
            ident = known[0] if known is not None else None
            if ident is None:
                leader = min(members, key=lambda p: (p.stat.start_ticks, p.stat.pid))
                ident = self._identity(leader, key[1], "SLURM_JOB_ID", live_labels)
                ident = dataclasses.replace(ident, slurm=leader.slurm.job if leader.slurm else None)
                self._slurm_jobs[key] = (ident, float("inf"))  # seen: set at the end of the tick
            for member in members:
                member.job = ident

    def _slurm_seen(self, groups: list[tuple[JobIdentity, list[_Proc]]], now_mono_s: float) -> None:
        """Keep a Slurm job's identity while it has live processes and for
        ``SLURM_KEEP_S`` after (a later step of the job, e.g. under salloc, joins the
        same job); forget older ones."""
        live = {(ident.uid, ident.slurm.name) for ident, _m in groups if ident.slurm is not None}
        for key in list(self._slurm_jobs):
            ident, seen = self._slurm_jobs[key]
            if key in live:
                self._slurm_jobs[key] = (ident, now_mono_s)
            elif seen == float("inf"):
                self._slurm_jobs[key] = (ident, now_mono_s)
            elif now_mono_s - seen > SLURM_KEEP_S:
                del self._slurm_jobs[key]

    # -- label cap and unreadable labels -------------------------------------------
    def _note_overflow(self, uid: int, label_raw: str) -> None:
        """A new job of ``uid`` was filed under OVERFLOW_LABEL: count it; log once
        per episode (until the user is below the cap again)."""
        self.labels_overflow_total += 1
        self._overflow_below_since.pop(uid, None)  # at the cap again: the episode goes on
        if uid in self._overflow_users:
            return
        self._overflow_users.add(uid)
        shown = repr(label_raw[:80]) + ("..." if len(label_raw) > 80 else "")
        log.warning("label cap reached for user %s (uid %d, [jobs] max_labels_per_user = %d): new labels, first %s, "
                    "are filed as %r and keep their own label in label_raw (counted in "
                    "wattprint_labels_overflow_total; logged again only after the user is below the cap)",
                    user_name(uid), uid, self.max_labels_per_user, shown, OVERFLOW_LABEL)

    def _end_overflow_episodes(self, groups: list[tuple[JobIdentity, list[_Proc]]], now_mono_s: float) -> None:
        if not self._overflow_users:
            return
        labels: dict[int, set[str]] = {}
        for ident, _members in groups:
            if ident.label and ident.label != OVERFLOW_LABEL:
                labels.setdefault(ident.uid, set()).add(ident.label)
        for uid in list(self._overflow_users):
            if len(labels.get(uid, ())) >= self.max_labels_per_user:
                self._overflow_below_since.pop(uid, None)
                continue
            since = self._overflow_below_since.setdefault(uid, now_mono_s)
            if now_mono_s - since >= self.label_cap_hold_s:
                self._end_overflow(uid, len(labels.get(uid, ())))

    def _end_overflow(self, uid: int, live_labels: int) -> None:
        self._overflow_users.discard(uid)
        self._overflow_below_since.pop(uid, None)
        log.info("user %s (uid %d) is below the label cap again (%d distinct live labels)",
                 user_name(uid), uid, live_labels)

    def label_problem(self) -> str | None:
        """Why job labels may be missed (the ``processes`` health detail), or None:
        the kernel refused the environment of another user's process. The text does
        not change with the count, so it is logged once."""
        euid = os.geteuid()
        # A process of the daemon's own uid that refuses (non-dumpable, another user
        # namespace: system daemons, the container's init) is counted, not degraded.
        if not any(p in self._by_pid and self._by_pid[p].uid != euid for p in self._denied):
            return None
        missing = missing_label_capabilities(self._cap_eff)
        why = (f"the daemon lacks {' and '.join(missing)} (CapEff {self._cap_eff or 0:#x})" if missing
               else "although the daemon has CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH (a security module refused)")
        return (f"cannot read other users' process environments (permission denied), so their job labels "
                f"({', '.join(self.label_env)}) are not seen and their energy goes to process-group jobs or "
                f"unattributed: {why}; run as root or grant the capabilities (systemd AmbientCapabilities=); "
                "processes affected: wattprint_processes_labels_unreadable")

    def counters(self) -> dict[str, float]:
        """Self-metrics (``wattprint_<key>``)."""
        return {"labels_overflow_total": float(self.labels_overflow_total),
                "processes_labels_unreadable": float(len(self._denied))}


def detect_cgroup2_root() -> str:
    """Where the unified (v2) cgroup hierarchy is mounted: /sys/fs/cgroup, or
    /sys/fs/cgroup/unified on hybrid systems."""
    try:
        with open("/proc/self/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) > 2 and parts[2] == "cgroup2":
                    return parts[1]
    except OSError:
        pass
    return "/sys/fs/cgroup"


def detect_cgroup1_mounts(proc_root: str = "/proc") -> dict[str, str]:
    """cgroup v1 hierarchies mounted here: their controllers as /proc/<pid>/cgroup
    names them ("freezer", "cpu,cpuacct", "name=systemd") -> mount point."""
    out: dict[str, str] = {}
    try:
        with open(f"{proc_root}/self/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) > 3 and parts[2] == "cgroup":
                    opts = [o for o in parts[3].split(",") if o not in _MOUNT_OPTS and not o.startswith("release_agent=")]
                    out.setdefault(",".join(opts), parts[1])
    except OSError:
        pass
    return out


_MOUNT_OPTS = frozenset({"rw", "ro", "nosuid", "nodev", "noexec", "relatime", "noatime", "xattr", "clone_children",
                         "noprefix", "cpuset_v2_mode", "favordynmods"})


def v1_mount(mounts: dict[str, str], controllers: str) -> str | None:
    """The mount point of the v1 hierarchy ``controllers`` (as in /proc/<pid>/cgroup)."""
    if controllers in mounts:
        return mounts[controllers]
    want = set(controllers.split(","))
    for key, mount in mounts.items():
        if want <= set(key.split(",")):
            return mount
    return None


def make_job_id(root_pid: int, started_at: float) -> str:
    """``<pid>-<start time in centiseconds since epoch>``: stable and unique per host."""
    return f"{root_pid}-{int(round(started_at * 100))}"
