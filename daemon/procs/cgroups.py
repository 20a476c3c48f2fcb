"""Cgroup identity: a process's cgroup, the job cgroup it names, and its members.

A job is found by its cgroup when ``[jobs] cgroup_kinds`` names the kind (Slurm job,
systemd unit, container; ``classify_cgroup``) and one of the cgroup's processes is
on a GPU. Members of job cgroups come from their ``cgroup.procs`` (v2; for a Slurm
job on a cgroup v1 or hybrid node, in the v1 hierarchy its processes' Slurm line
names: ``read_cgroup`` gives such a process the key ``v1:<controllers>:<path>``).
"""

from __future__ import annotations

import os
import re
from typing import Iterable

from .. import slurm as slurm_ids

CGROUP_KINDS = ("slurm", "systemd", "container")
V1_KEY = "v1:"  # a cgroup v1 Slurm path, as read_cgroup gives it: v1:<controllers>:<path>


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


def cgroup_dir(path: str, v2_root: str, v1_mounts: dict[str, str] | None) -> str | None:
    """The directory of a job cgroup: under the v2 mount, or for a v1 key under
    the mount of its hierarchy (None when that is not mounted)."""
    v1 = split_v1_key(path)
    if v1 is None:
        return os.path.join(v2_root, path.lstrip("/"))
    mount = v1_mount(v1_mounts or {}, v1[0])
    return os.path.join(mount, v1[1].lstrip("/")) if mount else None


def cgroup_members(paths: Iterable[str], v2_root: str, v1_mounts: dict[str, str] | None) -> set[int]:
    """Every PID in the ``cgroup.procs`` of the job cgroups ``paths`` and their
    descendants."""
    pids: set[int] = set()
    for path in paths:
        top = cgroup_dir(path, v2_root, v1_mounts)
        if top is None:
            continue
        for dirpath, _dirs, _files in os.walk(top):
            try:
                with open(os.path.join(dirpath, "cgroup.procs")) as fh:
                    pids.update(int(p) for p in fh.read().split())
            except (OSError, ValueError):
                continue
    return pids
