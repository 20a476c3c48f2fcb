"""Slurm job identity: which Slurm job (and step) a process belongs to.

One Slurm job is one wattprint job on each node: the batch script, ``srun`` and every
step's tasks (each under a slurmstepd of its own) and all their children share the
job's identity, found from the environment Slurm gives them:

- ``SLURM_JOB_ID``; for an array task ``SLURM_ARRAY_JOB_ID`` and
  ``SLURM_ARRAY_TASK_ID``, named ``<array_job_id>_<task_id>`` as Slurm names it
  (``scontrol show job``, ``squeue``, ``sacct``);
- heterogeneous jobs: one job named by the HetJobId, as Slurm names the het job as a
  whole (its components are ``<id>+0``, ``<id>+1``, ... in ``squeue`` / ``sacct``). Measured
  on Slurm 22.05 (tests/test_slurm_het.py): the batch script and the tasks of every
  component's steps carry ``SLURM_JOB_ID=<het job id>`` (plus ``SLURM_HET_SIZE`` and
  ``SLURM_JOB_ID_HET_GROUP_<k>``), while prologs/epilogs of component k carry the
  component's own ``SLURM_JOB_ID`` with ``SLURM_HET_JOB_ID``; a process that has
  ``SLURM_HET_JOB_ID`` is therefore filed under it, whatever its ``SLURM_JOB_ID``;
- ``SLURM_JOB_PARTITION`` and ``SLURM_JOB_USER``;
- the step: ``SLURM_STEP_ID`` for the tasks of an ``srun`` step, ``batch`` for the
  batch script and what it runs outside ``srun`` (it has no step id).

Prolog and epilog processes are never part of a job. Measured on Slurm 22.05
(tests/test_slurm_jobs.py): slurmd runs ``Prolog`` / ``Epilog`` as root, as its own
children, with ``SLURM_SCRIPT_CONTEXT=prolog_slurmd`` / ``epilog_slurmd`` and the
job's ``SLURM_JOB_ID``; slurmstepd runs ``TaskEpilog`` as the job's user with
``SLURM_SCRIPT_CONTEXT=epilog_task``. ``TaskProlog`` runs with ``prolog_task`` — and
slurmstepd leaves that value in the environment of every task it then starts, so
``prolog_task`` marks the job's own tasks too and is **not** excluded (nor is
``prolog_srun``, for the same reason). A process is a script (never a job) when its
``SLURM_SCRIPT_CONTEXT`` is one of ``SCRIPT_CONTEXTS`` or its parent is ``slurmd``
(slurmstepd detaches from slurmd, so no job process has slurmd as its parent).

cgroups (``parse_proc_cgroup``), for nodes with ``proctrack/cgroup``:
- v2 (Slurm's docs, "Control Group v2 plugin"): ``/system.slice/[<node>_]slurmstepd.scope/
  job_<id>/step_<step>/user/task_<n>`` for tasks, ``.../step_<step>/slurm`` for the
  step's slurmstepd; steps are ``batch``, ``extern``, ``interactive`` or a number;
- v1 (Slurm's cgroup/v1 plugin: ``<root>/uid_<uid>/job_<id>/step_<step>[/task_<n>]``
  under each controller, root ``slurm`` or ``slurm_<nodename>``): the freezer line is
  preferred (``V1_PREFERRED``); daemon/procs/cgroups.py walks the job's members in that
  hierarchy.
Recorded lines of both are in tests/fixtures/slurm/ with their provenance.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

SCRIPT_CONTEXTS = frozenset({
    "prolog_slurmd", "epilog_slurmd", "prolog_slurmctld", "epilog_slurmctld", "epilog_task", "epilog_srun",
})
SLURM_VARS = (
    "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_PARTITION", "SLURM_JOB_USER",
    "SLURM_STEP_ID", "SLURM_SCRIPT_CONTEXT", "SLURM_HET_JOB_ID",
)
MAX_FIELD = 64  # characters kept of any Slurm value (they come from the environment: untrusted)
_ID = re.compile(r"^[0-9]{1,12}$")
_FIELD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-+@")


def _clean(value: str) -> str:
    return "".join(ch if ch in _FIELD_CHARS else "_" for ch in value[:MAX_FIELD])


@dataclass(frozen=True, slots=True)
class SlurmJob:
    """What Slurm says about a job (the same for all its processes on a node)."""

    job_id: str  # SLURM_JOB_ID (SLURM_HET_JOB_ID for a component of a heterogeneous job)
    name: str  # the job as Slurm names it: job_id, or <array_job_id>_<task_id>
    array_job_id: str = ""
    array_task_id: str = ""
    partition: str = ""
    user: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"job_id": self.job_id, "name": self.name, "array_job_id": self.array_job_id,
                "array_task_id": self.array_task_id, "partition": self.partition, "user": self.user}


@dataclass(frozen=True, slots=True)
class SlurmProcess:
    """One process's Slurm identity: its job, its step, and whether it is a
    prolog/epilog script (then it belongs to no job)."""

    job: SlurmJob
    step: str  # "batch", "extern", "interactive" or the step number
    script: str = ""  # SLURM_SCRIPT_CONTEXT of a prolog/epilog; "" for job processes


def from_environ(env: dict[str, str], parent_comm: str = "") -> SlurmProcess | None:
    """The Slurm identity in ``env`` (the variables of ``SLURM_VARS`` found in a
    process's initial environment), or None when it has no valid ``SLURM_JOB_ID``.
    ``parent_comm``: the executable name of the process's parent (``slurmd`` marks a
    slurmd prolog/epilog)."""
    job_id = env.get("SLURM_JOB_ID", "").strip()
    if not _ID.match(job_id):
        return None
    het_job_id = env.get("SLURM_HET_JOB_ID", "").strip()
    if _ID.match(het_job_id):
        job_id = het_job_id  # a component of a heterogeneous job: the het job as a whole
    array_job = env.get("SLURM_ARRAY_JOB_ID", "").strip()
    array_task = env.get("SLURM_ARRAY_TASK_ID", "").strip()
    if _ID.match(array_job) and _ID.match(array_task):
        name = f"{array_job}_{array_task}"
    else:
        array_job = array_task = ""
        name = job_id
    step = env.get("SLURM_STEP_ID", "").strip()
    step = _clean(step) if step else "batch"
    context = env.get("SLURM_SCRIPT_CONTEXT", "").strip()
    script = context if context in SCRIPT_CONTEXTS else ("slurmd_child" if parent_comm == "slurmd" else "")
    job = SlurmJob(job_id=job_id, name=name, array_job_id=array_job, array_task_id=array_task,
                   partition=_clean(env.get("SLURM_JOB_PARTITION", "")), user=_clean(env.get("SLURM_JOB_USER", "")))
    return SlurmProcess(job=job, step=step, script=script)


def read_environ(pid: int, names: tuple[str, ...] = SLURM_VARS, proc_root: str = "/proc") -> dict[str, str] | None:
    """The variables ``names`` from ``/proc/<pid>/environ`` (everything else is
    discarded at once), or None when it cannot be read."""
    try:
        with open(f"{proc_root}/{pid}/environ", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    wanted = {n.encode() + b"=": n for n in names}
    found: dict[str, str] = {}
    for entry in data.split(b"\x00"):
        for prefix, name in wanted.items():
            if entry.startswith(prefix) and name not in found:
                found[name] = entry[len(prefix):][:256].decode("utf-8", errors="replace")
    return found


def read_process(pid: int, parent_comm: str = "", proc_root: str = "/proc") -> SlurmProcess | None:
    """``from_environ`` for a live process."""
    env = read_environ(pid, SLURM_VARS, proc_root)
    return from_environ(env, parent_comm) if env is not None else None


@dataclass(frozen=True, slots=True)
class SlurmCgroup:
    """The Slurm part of a process's cgroup path."""

    job_id: str
    step: str  # "" when the path stops at the job (e.g. v2 job_<id>/ itself)
    task: str  # "" for the step's slurmstepd or a step-level cgroup
    job_path: str  # the job's cgroup directory (ends with /job_<id>)
    version: int  # 1 or 2
    uid: int | None = None  # v1 only (uid_<uid> in the path)
    hierarchy: str = ""  # v1 only: the line's controllers ("freezer", "cpu,cpuacct", "name=...")
    path: str = ""  # the whole cgroup path of the line


_V2 = re.compile(r"^(?P<job>/(?:.*/)?(?:[^/]+_)?slurmstepd\.scope/job_(?P<id>\d+))(?:/step_(?P<step>[A-Za-z0-9_]+)"
                 r"(?:/user/task_(?P<task>\d+|special))?)?(?:/|$)")
_V1 = re.compile(r"^(?P<job>/(?:.*/)?slurm(?:_[^/]+)?/uid_(?P<uid>\d+)/job_(?P<id>\d+))"
                 r"(?:/step_(?P<step>[A-Za-z0-9_]+)(?:/task_(?P<task>\d+|special))?)?(?:/|$)")


def parse_cgroup_path(path: str, version: int = 2) -> SlurmCgroup | None:
    """The Slurm job, step and task of a cgroup path (v2 or v1 layout), or None."""
    m = (_V2 if version == 2 else _V1).match(path)
    if m is None:
        return None
    uid = m.groupdict().get("uid")
    return SlurmCgroup(job_id=m["id"], step=m["step"] or "", task=m["task"] or "", job_path=m["job"],
                       version=version, uid=int(uid) if uid else None, path=path)


# v1 hierarchies to walk a job's members in, best first: proctrack/cgroup puts every
# process of a job in the freezer hierarchy; the others only with task/cgroup limits.
V1_PREFERRED = ("freezer", "cpuset", "memory", "devices")


def parse_proc_cgroup(text: str) -> SlurmCgroup | None:
    """The Slurm cgroup of a ``/proc/<pid>/cgroup`` text: the v2 line (``0::``) when
    it is a Slurm path, else a v1 controller line that is (``freezer`` first, then
    ``V1_PREFERRED`` order, then the first), with its ``hierarchy``."""
    v1: list[SlurmCgroup] = []
    for line in text.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and controllers == "":
            found = parse_cgroup_path(path.strip(), 2)
            if found is not None:
                return found
        elif controllers:
            found = parse_cgroup_path(path.strip(), 1)
            if found is not None:
                v1.append(replace(found, hierarchy=controllers))
    if not v1:
        return None

    def rank(cg: SlurmCgroup) -> int:
        names = cg.hierarchy.split(",")
        return min((V1_PREFERRED.index(n) for n in names if n in V1_PREFERRED), default=len(V1_PREFERRED))

    return min(v1, key=rank)  # min() keeps the first of equals
