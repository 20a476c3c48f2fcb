"""Attribution: split each device's energy of one tick over the jobs that used it.

Pure functions, no I/O. The rule that everything else relies on is conservation: for
every component, the energy given to jobs plus the unattributed remainder equals what
the devices reported, exactly (the remainder is computed as the difference).

- GPU: by SM-utilisation share of the job's processes on that GPU; by used-memory
  share when no process has a utilisation sample above zero; equal shares when
  neither is known; a sole process gets all of it. Processes that belong to no job
  (filtered PIDs) keep their share unattributed, as does a GPU that reports
  ``attributable=False`` (MIG) or has no processes.
- CPU: each package's energy is split into active and idle parts by the machine's
  busy share of CPU capacity in the interval (non-idle seconds / (CPUs x interval)).
  Active energy goes to jobs by their share of busy CPU time (job CPU seconds /
  all non-idle CPU seconds); the part used by other processes stays unattributed.
  Idle energy stays unattributed (``idle_policy = "unattributed"``, the default) or
  is shared among the jobs in proportion to their CPU time (``"share"``).
- DRAM: by the job's share of used memory (resident set size / MemTotal-MemAvailable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from .model import COMPONENTS, DeviceReading
from .procs import ProcessView


@dataclass(frozen=True, slots=True)
class Attribution:
    """Result of one tick: joules per job and component, and what stayed unattributed."""

    job_energy_j: Mapping[str, Mapping[str, float]]  # job_id -> component -> J
    unattributed_j: Mapping[str, float]  # component -> J
    device_j: Mapping[str, float]  # component -> J reported by the devices
    gpu_seconds: Mapping[str, float]  # job_id -> GPU-seconds held in the interval
    gpu_memory_bytes: Mapping[str, int]  # job_id -> GPU memory in use now (all GPUs)


def _gpu_shares(reading: DeviceReading, pid_to_job: Mapping[int, str]) -> dict[str | None, float]:
    """Share of this GPU's energy per job (None: no job), summing to 1, or {} if none."""
    procs = reading.processes
    if not procs or not reading.attributable:
        return {}
    weights: list[float]
    sm = [p.sm_util_pct for p in procs]
    mem = [p.used_memory_bytes for p in procs]
    if len(procs) == 1:
        weights = [1.0]
    elif any(v is not None and v > 0 for v in sm):
        weights = [float(v or 0.0) for v in sm]
    elif any(v is not None and v > 0 for v in mem):
        weights = [float(v or 0) for v in mem]
    else:
        weights = [1.0] * len(procs)
    total = sum(weights)
    shares: dict[str | None, float] = {}
    for proc, weight in zip(procs, weights):
        job = pid_to_job.get(proc.pid)
        shares[job] = shares.get(job, 0.0) + weight / total
    return shares


def attribute(readings: Sequence[DeviceReading], view: ProcessView, idle_policy: str = "unattributed") -> Attribution:
    jobs: dict[str, dict[str, float]] = {j.identity.job_id: {c: 0.0 for c in COMPONENTS} for j in view.jobs}
    device_j = {c: 0.0 for c in COMPONENTS}
    gpu_seconds: dict[str, float] = {}
    gpu_mem: dict[str, int] = {}

    jobs_cpu_s = sum(j.cpu_s for j in view.jobs)
    cpu_busy_s = max(view.cpu_busy_s, jobs_cpu_s)
    cpu_capacity_s = max(view.cpu_total_s, cpu_busy_s)
    active_share = cpu_busy_s / cpu_capacity_s if cpu_capacity_s > 0 else 0.0
    mem_total = max(view.mem_used_bytes, sum(j.rss_bytes for j in view.jobs))

    for r in readings:
        device_j[r.kind] += r.energy_j
        if r.kind == "gpu":
            shares = _gpu_shares(r, view.pid_to_job)
            for job, share in shares.items():
                if job is not None and job in jobs:
                    jobs[job]["gpu"] += r.energy_j * share
            held: set[str] = set()
            for proc in r.processes:
                job = view.pid_to_job.get(proc.pid)
                if job is None:
                    continue
                held.add(job)
                if proc.used_memory_bytes:
                    gpu_mem[job] = gpu_mem.get(job, 0) + proc.used_memory_bytes
            for job in held:
                gpu_seconds[job] = gpu_seconds.get(job, 0.0) + r.interval_s
        elif r.kind == "cpu":
            if cpu_busy_s > 0:
                active_j = r.energy_j * active_share
                idle_j = r.energy_j - active_j
                for j in view.jobs:
                    share = active_j * (j.cpu_s / cpu_busy_s)
                    if idle_policy == "share" and jobs_cpu_s > 0:
                        share += idle_j * (j.cpu_s / jobs_cpu_s)
                    jobs[j.identity.job_id]["cpu"] += share
        elif r.kind == "dram":
            if mem_total > 0:
                for j in view.jobs:
                    jobs[j.identity.job_id]["dram"] += r.energy_j * (j.rss_bytes / mem_total)

    unattributed = {c: device_j[c] - sum(e[c] for e in jobs.values()) for c in COMPONENTS}
    return Attribution(
        job_energy_j=jobs, unattributed_j=unattributed, device_j=device_j,
        gpu_seconds=gpu_seconds, gpu_memory_bytes=gpu_mem,
    )
