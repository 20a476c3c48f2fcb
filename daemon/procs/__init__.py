"""Process discovery: which live processes belong to which job, and what each used.

One module per job:
- ``scan``: reading /proc (stat parsing, held stat files, the PID list, machine-wide
  CPU and memory, boot time, user names);
- ``labels``: job labels from the environment, sanitising, the per-user label cap
  with its hold, the capabilities reading other users' environments needs;
- ``cgroups``: cgroup paths (v2, and Slurm's v1 hierarchy), their kinds, members;
- ``slurm_jobs``: the Slurm hook (one job per Slurm job across steps and tasks);
- ``grouping``: assigning processes to jobs (label tree, Slurm, cgroup, process group);
- ``tracker``: ``ProcessTracker``, the per-tick policy (what to read when, the
  periodic full re-read), CPU accounting, and its output ``ProcessView``.

Command lines and environments are read only to find the label and are never
kept: only the executable name (``comm``) is. Every name importable from
``wattprint.daemon.procs`` before the split still is (re-exported here);
``JobIdentity`` lives in daemon/model.py.
"""

from __future__ import annotations

from ..model import JobIdentity
from .cgroups import (
    CGROUP_KINDS,
    V1_KEY,
    cgroup_dir,
    cgroup_members,
    classify_cgroup,
    detect_cgroup1_mounts,
    detect_cgroup2_root,
    read_cgroup,
    split_v1_key,
    v1_mount,
)
from .grouping import TrackedProc, group_jobs
from .labels import (
    CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH,
    CAP_SYS_PTRACE,
    LABEL_CHARS,
    MAX_LABEL_LEN,
    MAX_RAW_LABEL_CHARS,
    OVERFLOW_LABEL,
    LabelCap,
    effective_capabilities,
    label_problem_text,
    missing_label_capabilities,
    read_label,
    read_label_checked,
    sanitize_label,
)
from .scan import (
    CLK_TCK,
    MAX_HELD_FILES,
    PAGE_SIZE,
    ProcStat,
    StatFiles,
    boot_time_s,
    parse_stat,
    read_cpu_ticks,
    read_mem_used_bytes,
    read_stat,
    user_name,
)
from .slurm_jobs import SLURM_KEEP_S, SlurmJobs
from .tracker import JobUsage, ProcessTracker, ProcessView, make_job_id

__all__ = [
    "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE", "CGROUP_KINDS", "CLK_TCK", "JobIdentity",
    "JobUsage", "LABEL_CHARS", "LabelCap", "MAX_HELD_FILES", "MAX_LABEL_LEN", "MAX_RAW_LABEL_CHARS",
    "OVERFLOW_LABEL", "PAGE_SIZE", "ProcStat", "ProcessTracker", "ProcessView", "SLURM_KEEP_S", "SlurmJobs",
    "StatFiles", "TrackedProc", "V1_KEY", "boot_time_s", "cgroup_dir", "cgroup_members", "classify_cgroup",
    "detect_cgroup1_mounts", "detect_cgroup2_root", "effective_capabilities", "group_jobs", "label_problem_text",
    "make_job_id", "missing_label_capabilities", "parse_stat", "read_cgroup", "read_cpu_ticks", "read_label",
    "read_label_checked", "read_mem_used_bytes", "read_stat", "sanitize_label", "split_v1_key", "user_name",
    "v1_mount",
]
