"""Job identity: assigning processes to jobs.

A job is found, in order, by
1. its label: the first of ``label_env`` set in the process's environment (children
   inherit it); the job's leader is the topmost ancestor with the same label and user
   (processes of one Slurm job are one job whatever their ancestry:
   daemon/procs/slurm_jobs.py);
2. its cgroup, when ``cgroup_kinds`` names the kind (Slurm job, systemd unit,
   container: daemon/procs/cgroups.py) and one of the cgroup's processes is on a GPU;
3. its process group, for other processes seen on a GPU.
Once assigned, a process keeps its job for life (``TrackedProc.job``), so a job's id
(leader PID + leader start time) survives its leader exiting first and daemon
restarts. The identity itself (id, user, the label as capped) is made by the
tracker's ``make_identity``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from .. import slurm as slurm_ids
from ..model import JobIdentity
from .cgroups import classify_cgroup
from .labels import OVERFLOW_LABEL
from .scan import ProcStat

if TYPE_CHECKING:
    from .slurm_jobs import SlurmJobs


@dataclass(eq=False)
class TrackedProc:
    """What the tracker keeps about one live process between ticks."""

    stat: ProcStat
    uid: int
    label_raw: str | None
    label_source: str | None
    cgroup: str | None = None
    job: JobIdentity | None = None
    job_cgroup: str | None = None  # the cgroup path of its job, for cgroup jobs
    slurm: slurm_ids.SlurmProcess | None = None  # its Slurm job and step (label from SLURM_JOB_ID)
    no_job: bool = False  # a Slurm prolog/epilog: never part of any job


# (leader, raw label or "", label source, distinct live labels per uid) -> the job's identity
MakeIdentity = Callable[[TrackedProc, str, str, dict[int, set[str]]], JobIdentity]


def group_jobs(live: dict[int, TrackedProc], gpu_pids: set[int], candidate_pids: Iterable[int],
               cgroup_kinds: tuple[str, ...], slurm: SlurmJobs,
               make_identity: MakeIdentity) -> list[tuple[JobIdentity, list[TrackedProc]]]:
    """Assign processes to jobs (a process keeps its job for life); returns each
    job with its members among the candidates.

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
    slurm.group(candidates, live_labels, make_identity)
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
        ident = top.job or make_identity(top, proc.label_raw, proc.label_source or "label", live_labels)
        for member in chain:
            member.job = ident

    # 2. Cgroups of configured kinds with a process on a GPU (or already a job).
    if cgroup_kinds:
        cg_jobs: dict[str, JobIdentity] = {}
        for proc in candidates:
            if proc.job is not None and proc.job_cgroup:
                cg_jobs.setdefault(proc.job_cgroup, proc.job)
        wanted: dict[str, tuple[str, str]] = {}
        for pid in gpu_pids:
            gproc = live.get(pid)
            if gproc is None or gproc.job is not None or gproc.cgroup is None or gproc.no_job:
                continue
            found = classify_cgroup(gproc.cgroup, cgroup_kinds)
            if found is not None:
                wanted[found[1]] = (found[0], found[2])
        for path in cg_jobs:
            wanted.setdefault(path, ("", ""))
        if wanted:
            members_by_cg: dict[str, list[TrackedProc]] = {}
            for proc in candidates:
                if proc.job is not None or proc.cgroup is None or proc.no_job:
                    continue
                for path in wanted:
                    if proc.cgroup == path or proc.cgroup.startswith(path + "/"):
                        members_by_cg.setdefault(path, []).append(proc)
                        break
            for path, members in members_by_cg.items():
                cg_ident = cg_jobs.get(path)
                if cg_ident is None:
                    kind, label = wanted[path]
                    leader = min(members, key=lambda p: (p.stat.start_ticks, p.stat.pid))
                    cg_ident = make_identity(leader, label, f"cgroup:{kind}", live_labels)
                for member in members:
                    member.job = cg_ident
                    member.job_cgroup = path

    # 3. Process groups with a process on a GPU (or already a job).
    pg_jobs: dict[int, JobIdentity] = {}
    for proc in candidates:
        if proc.job is not None and proc.job.label_source == "pgid":
            pg_jobs.setdefault(proc.stat.pgid, proc.job)
    wanted_pg = {live[p].stat.pgid for p in gpu_pids if p in live and live[p].job is None}
    wanted_pg |= set(pg_jobs)
    if wanted_pg:
        members_by_pg: dict[int, list[TrackedProc]] = {}
        for proc in candidates:
            if proc.job is None and proc.label_raw is None and proc.stat.pgid in wanted_pg and not proc.no_job:
                members_by_pg.setdefault(proc.stat.pgid, []).append(proc)
        for pgid, members in members_by_pg.items():
            pg_ident = pg_jobs.get(pgid)
            if pg_ident is None:
                pg_leader = live.get(pgid)
                if pg_leader is None or pg_leader.stat.pgid != pgid or pg_leader.label_raw is not None:
                    pg_leader = min(members, key=lambda p: (p.stat.start_ticks, p.stat.pid))
                pg_ident = make_identity(pg_leader, "", "pgid", live_labels)
            for member in members:
                member.job = pg_ident

    groups: dict[str, tuple[JobIdentity, list[TrackedProc]]] = {}
    for proc in candidates:
        if proc.job is not None:
            groups.setdefault(proc.job.job_id, (proc.job, []))[1].append(proc)
    return list(groups.values())
