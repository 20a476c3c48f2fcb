"""Test helper: hand-built inputs for attribution and the job book (no processes, no
simulator): a job identity per number, a process view with one job per PID, and a GPU
reading whose energy the test states; and ``SimNvmlEngine``, an engine over the
simulated NVML ticked by hand.

Job ``n`` is ``j<n>`` (label ``l<n>``) and holds PID ``10 x n``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from wattprint.daemon.model import DeviceReading, GpuProcessUse
from wattprint.daemon.procs import JobIdentity, JobUsage, ProcessView
from wattprint.daemon.sources.gpu import NvmlGpuSource
from wattprint.daemon.sources.nvml_sim import SimulatedNvml


def ident(n: int) -> JobIdentity:
    """Job ``j<n>``'s identity (label ``l<n>``, root PID ``n``)."""
    return JobIdentity(job_id=f"j{n}", label=f"l{n}", label_source="WATTPRINT_JOB", uid=0, user="root",
                       command="python", root_pid=n, started_at=0.0)


def view(*job_pids: int) -> ProcessView:
    """One job per PID (job n holds PID 10 x n)."""
    usages = tuple(JobUsage(identity=ident(n), pids=frozenset({10 * n}), cpu_s=0.0, rss_bytes=0) for n in job_pids)
    return ProcessView(jobs=usages, pid_to_job={10 * n: f"j{n}" for n in job_pids}, cpu_busy_s=0.0,
                       mem_used_bytes=0, scanned=True)


def gpu(device: str, energy_j: float, pids: tuple[int, ...] = ()) -> DeviceReading:
    """A 1-s GPU counter reading of ``energy_j`` used by ``pids`` (100 % SM each)."""
    return DeviceReading("gpu", device, energy_j, energy_j, "counter", 1.0,
                         processes=tuple(GpuProcessUse(p, 1 << 30, 100.0) for p in pids))


class SimNvmlEngine:
    """An engine (the ``make_engine`` fixture, ``engine_kw`` passed on) reading the
    simulated NVML of the sim file ``sim`` plus ``sources``, on a hand-moved clock
    (monotonic from 100 s, wall from 1,795,000,000 s): ``tick()`` moves both 1 s and
    runs one tick."""

    def __init__(self, make_engine: Callable[..., Any], sim: Path, *sources: Any, **engine_kw: Any):
        self.mono = 100.0
        self.wall = 1_795_000_000.0
        self.engine = make_engine(sources=[NvmlGpuSource(SimulatedNvml(str(sim), clock=lambda: self.mono)), *sources],
                                  **engine_kw)

    def tick(self) -> Any:
        self.mono += 1.0
        self.wall += 1.0
        return self.engine.tick_blocking(self.mono, self.wall)
