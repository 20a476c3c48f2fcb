"""The Slurm hook: every process of one Slurm job on this node is one job.

A process labelled by ``SLURM_JOB_ID`` gets its Slurm identity from
daemon/slurm.py (job name, step; a prolog/epilog script belongs to no job). Every
process of one (uid, Slurm job) (batch step, srun steps, tasks, their children) joins
one job whatever its ancestry; that job's identity is kept while it has live
processes and for ``SLURM_KEEP_S`` after, so a later step (e.g. under salloc) joins
the same job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterable

from .. import slurm as slurm_ids
from ..model import JobIdentity
from .grouping import MakeIdentity, TrackedProc

SLURM_KEEP_S = 600.0  # a Slurm job's identity is kept this long after its last process


def read_slurm(proc: TrackedProc, parent_comm: str, proc_root: str = "/proc") -> None:
    """Slurm identity of a process labelled by SLURM_JOB_ID (daemon/slurm.py): its
    job's name becomes the label; a prolog/epilog script belongs to no job."""
    found = slurm_ids.read_process(proc.stat.pid, parent_comm, proc_root)
    if found is None:
        return
    if found.script:
        proc.label_source, proc.label_raw, proc.no_job = None, None, True
        return
    proc.slurm = found
    proc.label_raw = found.job.name


@dataclass
class SlurmJobs:
    """The Slurm jobs seen on this node: (uid, Slurm job name) -> (identity,
    monotonic time a member was last seen)."""

    _jobs: dict[tuple[int, str], tuple[JobIdentity, float]] = field(default_factory=dict)

    def group(self, candidates: list[TrackedProc], live_labels: dict[int, set[str]],
              make_identity: MakeIdentity) -> None:
        """Every unassigned process with a Slurm identity joins the job of its (uid,
        Slurm job name), created on first sight with the earliest-started member as
        leader. Only the same uid joins: another user setting SLURM_JOB_ID gets a job
        of their own."""
        new: dict[tuple[int, str], list[TrackedProc]] = {}
        for proc in candidates:
            if proc.job is None and proc.slurm is not None and proc.label_raw is not None:
                new.setdefault((proc.uid, proc.slurm.job.name), []).append(proc)
        for key, members in new.items():
            known = self._jobs.get(key)
            ident = known[0] if known is not None else None
            if ident is None:
                leader = min(members, key=lambda p: (p.stat.start_ticks, p.stat.pid))
                ident = make_identity(leader, key[1], "SLURM_JOB_ID", live_labels)
                ident = dataclasses.replace(ident, slurm=leader.slurm.job if leader.slurm else None)
                self._jobs[key] = (ident, float("inf"))  # seen: set at the end of the tick
            for member in members:
                member.job = ident

    def seen(self, jobs: Iterable[JobIdentity], now_mono_s: float) -> None:
        """Keep a Slurm job's identity while it has live processes (``jobs``: this
        tick's) and for ``SLURM_KEEP_S`` after; forget older ones."""
        live = {(ident.uid, ident.slurm.name) for ident in jobs if ident.slurm is not None}
        for key in list(self._jobs):
            ident, seen = self._jobs[key]
            if key in live:
                self._jobs[key] = (ident, now_mono_s)
            elif seen == float("inf"):
                self._jobs[key] = (ident, now_mono_s)
            elif now_mono_s - seen > SLURM_KEEP_S:
                del self._jobs[key]
