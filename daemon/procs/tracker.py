"""The process tracker: per tick, which processes to read, their jobs, what each used.

Each tick lists /proc (one getdents walk, only when a process was created since the
last tick) and reads only processes it has not seen before, plus the stat of job
processes; every process is re-read once every ``rescan_interval_s``, spread over the
ticks of that interval (a slice per tick, so no tick pays for all of them: issue 18),
and all of them at once when a GPU shows a process without a job, when the PID
counter wrapped, or when ``rescan_interval_s`` is not longer than a tick. Members of job
cgroups come from their ``cgroup.procs`` (daemon/procs/cgroups.py). Per-process
state is checked against the process's start time, so a reused PID is a new process.
Grouping into jobs is daemon/procs/grouping.py; labels and their cap
daemon/procs/labels.py; the Slurm hook daemon/procs/slurm_jobs.py.

CPU time of a process that exits between ticks is not lost: when a job process reaps
a child, the child's final CPU time appears in the parent's cutime/cstime; the job's
CPU time is the growth of self + reaped-children time of its live processes, minus
what was already counted for the children that disappeared.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Iterable

from ..model import JobIdentity
from .cgroups import cgroup_members, detect_cgroup1_mounts, detect_cgroup2_root, read_cgroup
from .grouping import TrackedProc, group_jobs
from .labels import LabelCap, effective_capabilities, label_problem_text, read_label_checked
from .scan import (
    CLK_TCK,
    PROBE_MAX_PIDS,
    PidLister,
    ProcStat,
    StatFiles,
    boot_time_s,
    is_process,
    last_pid,
    process_uid,
    read_cpu_ticks,
    read_mem_used_bytes,
    read_stat,
    uptime_ticks,
    user_name,
)
from .slurm_jobs import SlurmJobs, read_slurm


def make_job_id(root_pid: int, started_at: float) -> str:
    """``<pid>-<start time in centiseconds since epoch>``: stable and unique per host."""
    return f"{root_pid}-{int(round(started_at * 100))}"


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
    _by_pid: dict[int, TrackedProc] = field(default_factory=dict)  # every live process we know
    _tracked: set[int] = field(default_factory=set)  # job processes: re-read every tick
    _young: set[int] = field(default_factory=set)  # first seen under a second old
    _fresh: set[int] = field(default_factory=set)  # loaded since the last grouping
    _seen_last_pid: int | None = None
    _job_cgroups: set[str] = field(default_factory=set)
    _last_scan_mono: float = float("-inf")
    _last_observe_mono: float | None = None
    _rescan_queue: list[int] = field(default_factory=list)  # PIDs still to re-read in this rescan interval
    _probed: bool = False  # new PIDs were probed since the last /proc listing
    _retry: set[int] = field(default_factory=set)  # listed PIDs whose stat could not be read: read again at the next listing
    # (pid, start) -> (own CPU ticks, reaped-children CPU ticks, ppid, job id) at the last tick
    _last_cpu: dict[tuple[int, int], tuple[int, int, int, str]] = field(default_factory=dict)
    _last_ticks: tuple[int, int] | None = None
    _last_uptime_ticks: int | None = None  # clock ticks since boot at the last observe
    _boot_time: float = 0.0
    _denied: set[int] = field(default_factory=set)  # live pids whose environment the kernel refused
    _cap_eff: int | None = None  # the daemon's effective capabilities

    def __post_init__(self) -> None:
        self._boot_time = boot_time_s(self.proc_root)
        self._cap_eff = effective_capabilities()
        self._stats = StatFiles(self.proc_root)  # job processes' stat files, held open
        self._lister = PidLister(self.proc_root)
        # Probing new PIDs (instead of listing) needs /proc/loadavg's PIDs to be those of
        # proc_root: the same PID namespace (checked through proc_root's "self").
        try:
            self._probe = os.readlink(f"{self.proc_root}/self") == str(os.getpid())
        except OSError:
            self._probe = False
        self._cap = LabelCap(self.max_labels_per_user, self.label_cap_hold_s)
        self._slurm = SlurmJobs()
        if self.cgroup_kinds and not self.cgroup_root:
            self.cgroup_root = detect_cgroup2_root()
        if "slurm" in self.cgroup_kinds and self.cgroup_v1_mounts is None:
            self.cgroup_v1_mounts = detect_cgroup1_mounts()

    @property
    def labels_overflow_total(self) -> int:
        """Jobs filed under OVERFLOW_LABEL because their user was at the label cap."""
        return self._cap.overflow_total

    # -- reading ---------------------------------------------------------------
    def _load(self, pid: int, st: ProcStat) -> TrackedProc:
        """Update or create the state of ``pid`` from a fresh stat reading."""
        known = self._by_pid.get(pid)
        if known is not None and known.stat.start_ticks == st.start_ticks:
            if known.stat.comm != st.comm:
                self._relabel(known)  # it exec'd since we looked
            known.stat = st
            return known
        proc = TrackedProc(stat=st, uid=process_uid(pid, self.proc_root), label_raw=None, label_source=None)
        self._read_identity(proc)
        self._by_pid[pid] = proc  # replaces a process that had this PID before
        self._fresh.add(pid)
        if uptime_ticks(self.proc_root) - st.start_ticks < CLK_TCK:
            self._young.add(pid)  # maybe not exec'd yet: look again next tick
        return proc

    def _relabel(self, proc: TrackedProc) -> None:
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

    def _read_identity(self, proc: TrackedProc) -> None:
        found, denied = read_label_checked(proc.stat.pid, self.label_env, self.proc_root)
        if denied:
            self._denied.add(proc.stat.pid)
        else:
            self._denied.discard(proc.stat.pid)
        proc.label_source, proc.label_raw = found if found is not None else (None, None)
        proc.slurm, proc.no_job = None, False
        if proc.label_source == "SLURM_JOB_ID":
            parent = self._by_pid.get(proc.stat.ppid)
            parent_stat = parent.stat if parent is not None else read_stat(proc.stat.ppid, self.proc_root)
            read_slurm(proc, parent_stat.comm if parent_stat else "", self.proc_root)
        if self.cgroup_kinds and proc.label_raw is None:
            proc.cgroup = self._read_cgroup(proc.stat.pid)

    def _read_cgroup(self, pid: int) -> str | None:
        return read_cgroup(pid, self.proc_root, slurm_v1="slurm" in self.cgroup_kinds)

    def close(self) -> None:
        self._stats.close()

    def _reread(self, pids: Iterable[int]) -> None:
        for pid in pids:
            st = self._stats.read(pid)
            if st is None:
                self._by_pid.pop(pid, None)
                self._retry.add(pid)  # gone, or its PID already reused: look again at the next listing
            else:
                self._load(pid, st)

    def _discover(self, full: bool = False) -> bool:
        """Find processes created since the last look (the PID counter moved): probe
        the few new PIDs one by one, or list /proc when there are many, when ``full``
        (once per rescan interval), or the counter wrapped; load processes not seen
        before and, on a listing, forget those that are gone. Returns True when the
        PID counter wrapped, so reused PIDs must be checked (full re-read)."""
        last = last_pid(self.proc_root)
        if last is not None and last == self._seen_last_pid and not full:
            return False
        seen, self._seen_last_pid = self._seen_last_pid, last
        wrapped = last is not None and seen is not None and last < seen
        if (self._probe and not full and last is not None and seen is not None
                and 0 < last - seen <= PROBE_MAX_PIDS):
            # PIDs are handed out in order: everything created since the last look has a
            # PID in (seen, last]. A thread's ID there is no process (threads are most
            # of them on a busy box: any threaded program starting a worker).
            new = {pid for pid in range(seen + 1, last + 1) if is_process(pid, self.proc_root)}
            self._lister.add(new)
            self._probed = True
            self._reread(new - self._by_pid.keys())
            return False
        # Every PID in _by_pid was listed or probed (and added to the lister), so the
        # PIDs gone since the last listing are all that can leave it; the PIDs to read
        # are the new ones and those listed before whose read failed (gone, or reused).
        new, gone, names = self._lister.changes()
        self._probed = False
        for pid in gone:
            self._by_pid.pop(pid, None)
        retry = {pid for pid in self._retry if str(pid) in names}
        self._retry = set()
        self._reread((new | retry) - self._by_pid.keys())
        return wrapped

    def _rescan_slice(self, now_mono_s: float) -> list[int]:
        """The processes to re-read this tick so that every process known at the start
        of a rescan interval is re-read within it, about evenly over its ticks."""
        if now_mono_s - self._last_scan_mono >= self.rescan_interval_s:
            self._last_scan_mono = now_mono_s
            self._rescan_queue = list(self._by_pid)
        if not self._rescan_queue:
            return []
        since = now_mono_s - self._last_observe_mono if self._last_observe_mono is not None else 0.0
        # The ticks left in this interval, this one included (at the current tick rate):
        # an even share of what is still queued for each of them.
        left = (self._last_scan_mono + self.rescan_interval_s - now_mono_s) / max(since, 1e-9)
        n = len(self._rescan_queue) if left <= 1 else math.ceil(len(self._rescan_queue) / left)
        chunk, self._rescan_queue = self._rescan_queue[:n], self._rescan_queue[n:]
        return [pid for pid in chunk if pid in self._by_pid]

    # -- one tick ----------------------------------------------------------------
    def observe(self, now_mono_s: float, gpu_pids: Iterable[int]) -> ProcessView:
        """Read the processes that matter this tick and group them into jobs.

        Every tick: find processes created since the last tick (probe the few new
        PIDs, or list /proc) and read only processes not seen before, plus the stat
        of job processes, GPU processes and young processes. Every process is re-read once per
        ``rescan_interval_s`` (process groups and programs may have changed), a
        slice of them each tick; every process at once when a GPU shows a process
        without a job, when the PID counter wrapped, or when the interval is not
        longer than the time since the last tick.
        """
        gpu_pids = set(gpu_pids)
        young, self._young = self._young, set()  # first seen on an earlier tick, under a second old
        due = now_mono_s - self._last_scan_mono >= self.rescan_interval_s
        # A listing once per rescan interval when PIDs were probed since the last one
        # (it forgets probed processes that are gone).
        wrapped = self._discover(full=due and self._probed)
        unknown_gpu = any(p in self._by_pid and self._by_pid[p].job is None for p in gpu_pids)
        since = now_mono_s - self._last_observe_mono if self._last_observe_mono is not None else float("inf")
        scanned = wrapped or unknown_gpu or (due and self.rescan_interval_s <= since) \
            or self._last_observe_mono is None
        rescan: list[int] = []
        if scanned:
            self._reread(list(self._by_pid))
            self._last_scan_mono = now_mono_s
            self._rescan_queue = []
        else:
            rescan = self._rescan_slice(now_mono_s)
            members = cgroup_members(self._job_cgroups, self.cgroup_root, self.cgroup_v1_mounts)
            cg_moved = [p for p in members if p in self._by_pid and self._by_pid[p].job is None]
            for pid in cg_moved:  # moved into a job cgroup after we first read it
                self._by_pid[pid].cgroup = self._read_cgroup(pid)
            self._reread((self._tracked | gpu_pids | young | members | set(rescan)) & self._by_pid.keys())
        self._last_observe_mono = now_mono_s
        for pid in young:  # first seen under a second old: maybe not exec'd then
            if pid in self._by_pid:
                self._relabel(self._by_pid[pid])
        live = self._by_pid
        if scanned:
            candidates: Iterable[int] = live.keys()
        else:
            candidates = (self._fresh | gpu_pids | members | self._tracked | set(rescan)) & live.keys()
        self._fresh = set()

        groups = group_jobs(live, gpu_pids, candidates, self.cgroup_kinds, self._slurm, self._identity)

        busy, total = read_cpu_ticks(self.proc_root)
        if self._last_ticks is None:
            busy_s = total_s = 0.0
        else:
            busy_s = max(0, busy - self._last_ticks[0]) / CLK_TCK
            total_s = max(0, total - self._last_ticks[1]) / CLK_TCK
        self._last_ticks = (busy, total)

        prev_uptime, self._last_uptime_ticks = self._last_uptime_ticks, uptime_ticks(self.proc_root)
        usages: list[JobUsage] = []
        pid_to_job: dict[int, str] = {}
        new_last: dict[tuple[int, int], tuple[int, int, int, str]] = {}
        tracked: set[int] = set()
        gone_by_job: dict[str, list[tuple[int, int, int]]] = {}
        for key, (own, kids, ppid, job_id) in self._last_cpu.items():
            now_proc = live.get(key[0])
            if now_proc is None or now_proc.stat.start_ticks != key[1]:
                gone_by_job.setdefault(job_id, []).append((own, kids, ppid))
        for identity, group_members in groups:
            ticks = 0
            rss = 0
            member_pids = {p.stat.pid for p in group_members}
            for proc in group_members:
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
            steps = frozenset(p.slurm.step for p in group_members if p.slurm is not None)
            usages.append(JobUsage(identity=identity, pids=frozenset(member_pids),
                                   cpu_s=max(0, ticks) / CLK_TCK, rss_bytes=rss, steps=steps))
        self._last_cpu = new_last
        self._tracked = tracked
        self._stats.hold(tracked)
        self._job_cgroups = {p.job_cgroup for _i, ms in groups for p in ms if p.job_cgroup}
        self._denied &= live.keys()
        identities = [ident for ident, _m in groups]
        self._cap.end_episodes(identities, now_mono_s)
        self._slurm.seen(identities, now_mono_s)
        return ProcessView(
            jobs=tuple(usages),
            pid_to_job=pid_to_job,
            cpu_busy_s=busy_s,
            mem_used_bytes=read_mem_used_bytes(self.proc_root),
            scanned=scanned,
            cpu_total_s=total_s,
        )

    def _identity(self, leader: TrackedProc, label_raw: str, label_source: str,
                  live_labels: dict[int, set[str]]) -> JobIdentity:
        """A new job led by ``leader``; its label as the per-user cap files it."""
        started_at = self._boot_time + leader.stat.start_ticks / CLK_TCK
        return JobIdentity(
            job_id=make_job_id(leader.stat.pid, started_at),
            label=self._cap.file(leader.uid, label_raw, live_labels),
            label_source=label_source,
            uid=leader.uid,
            user=user_name(leader.uid) if leader.uid >= 0 else "unknown",
            command=leader.stat.comm,
            root_pid=leader.stat.pid,
            started_at=started_at,
            label_raw=label_raw,
        )

    # -- health and self-metrics ----------------------------------------------------
    def label_problem(self) -> str | None:
        """Why job labels may be missed (the ``processes`` health detail), or None:
        the kernel refused the environment of another user's process. The text does
        not change with the count, so it is logged once."""
        euid = os.geteuid()
        # A process of the daemon's own uid that refuses (non-dumpable, another user
        # namespace: system daemons, the container's init) is counted, not degraded.
        if not any(p in self._by_pid and self._by_pid[p].uid != euid for p in self._denied):
            return None
        return label_problem_text(self.label_env, self._cap_eff)

    def counters(self) -> dict[str, float]:
        """Self-metrics (``wattprint_<key>``)."""
        return {"labels_overflow_total": float(self.labels_overflow_total),
                "processes_labels_unreadable": float(len(self._denied))}
