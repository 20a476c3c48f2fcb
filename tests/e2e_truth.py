"""Test helper: independent truth for end-to-end energy tests of the real daemon.

What a test controls: the simulated GPU power and each process's utilisation (the sim
file), the RAPL feed rates (``PowercapTree.start_feeding``), and its own processes.
What it reads itself: each job's CPU time and RSS from ``/proc/<pid>/stat``, and the
machine's CPU time (``/proc/stat``) and used memory (``/proc/meminfo``). What it takes
from the daemon is only *when* it ticked: the wall time of each tick
(``wattprint_last_tick_timestamp_seconds``), scraped in the same /metrics snapshot
as the energies compared with it.

``follow(daemon, ticks, jobs)`` polls /metrics (no fixed sleep) and, right after it
sees a new tick, reads /proc for each job; each pair of consecutive samples is one
interval. From those, per interval of length dt (tick time difference), following
docs/jobs.md:

- GPU: power x share x dt, share = the process's sm_util / the sum over all processes
  on that GPU (a GPU never seen empty has no idle floor, so all of its energy goes by
  activity share; with no activity anywhere on a GPU, equal shares when memory is
  "not available"); invisible processes' shares are the expected unattributed GPU
  energy.
- CPU: package rate x dt x (job CPU-s / machine capacity CPU-s), which is the
  documented busy share x the job's share of busy time (busy / capacity x job / busy):
  the machine-wide busy time cancels, so other processes on the machine (the suite's
  PID namespace does not hide /proc/stat) change nothing but the clamp ``busy >= jobs``.
  The expected unattributed CPU energy (``idle_policy = "unattributed"``) is the rest:
  rate x dt x (capacity - the test's jobs' CPU-s) / capacity.
- DRAM: dram rate x dt x job RSS / (MemTotal - MemAvailable), both as of the end of the
  interval.

How close the test's /proc reads are to the daemon's: the test reads within one poll
(20 ms) plus a scrape after the daemon's tick; on a loaded 2-core machine that lag was
measured at up to ~0.1 s. It shifts both ends of the measured window by the same lag,
so for a whole window of many ticks the error is bounded by (lag / window) of the job's
CPU, independent of the window's length otherwise. Tests use ``CPU_REL`` below,
argued from that bound, and assert it holds over windows of at least 8 ticks.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from daemon_harness import DaemonProcess, Scrape, scrape

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
INVISIBLE_PID = 4_194_313  # above the kernel's PID limit (2**22): never a /proc entry
# Relative tolerance of CPU energy per job over a window of >= 8 ticks (see above), plus
# CPU_ABS_S CPU-seconds' worth of package energy for the tick-granularity (1/CLK_TCK per
# read) of the job's and the machine's counters.
CPU_REL = 0.06
CPU_ABS_S = 0.05


def proc_ticks(pid: int) -> tuple[int, int]:
    """(utime + stime + cutime + cstime in clock ticks, RSS bytes) of one process; (0, 0)
    once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            rest = fh.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0, 0
    return int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14]), int(rest[21]) * PAGE_SIZE


def machine_cpu_ticks() -> int:
    """All CPUs, all states (busy + idle + iowait ...), in clock ticks, as the daemon counts."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    return sum(values[:8])


def mem_used_bytes() -> int:
    info: dict[str, int] = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                info[key] = int(rest.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


@dataclass
class Sample:
    scrape: Scrape
    job_cpu_ticks: dict[str, int]
    job_rss: dict[str, int]
    machine_ticks: int
    mem_used: int


def take(daemon: DaemonProcess, jobs: Mapping[str, Callable[[], Iterable[int]]]) -> Sample:
    """Poll /metrics until a tick newer than the last seen, then read /proc at once."""
    s = scrape(daemon)
    cpu: dict[str, int] = {}
    rss: dict[str, int] = {}
    for name, pids in jobs.items():
        got = [proc_ticks(p) for p in pids()]
        cpu[name] = sum(t for t, _ in got)
        rss[name] = sum(r for _, r in got)
    return Sample(s, cpu, rss, machine_cpu_ticks(), mem_used_bytes())


def next_sample(daemon: DaemonProcess, after_tick: int, jobs: Mapping[str, Callable[[], Iterable[int]]],
                timeout_s: float = 30.0) -> Sample:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if int(daemon.get("/healthz", allow_error=True).get("tick", 0)) > after_tick:
            s = take(daemon, jobs)
            if s.scrape.tick > after_tick:
                return s
        if daemon.proc is not None and daemon.proc.poll() is not None:
            raise RuntimeError(f"daemon exited:\n{daemon.log_tail()}")
        time.sleep(0.02)
    raise RuntimeError(f"no tick after {after_tick} in {timeout_s} s:\n{daemon.log_tail()}")


@dataclass
class Window:
    """Samples at consecutive ticks seen by the test, first to last."""

    samples: list[Sample] = field(default_factory=list)

    @property
    def first(self) -> Scrape:
        return self.samples[0].scrape

    @property
    def last(self) -> Scrape:
        return self.samples[-1].scrape

    @property
    def ticks(self) -> int:
        return self.last.tick - self.first.tick

    @property
    def seconds(self) -> float:
        """Tick time elapsed over the window (the daemon's own tick timestamps)."""
        return self.last.tick_at - self.first.tick_at

    def booked(self, job_id: str) -> dict[str, float]:
        """What the daemon booked to the job over the window, per component."""
        a, b = self.first.job_j(job_id), self.last.job_j(job_id)
        return {c: b[c] - a[c] for c in b}

    def device(self, kind: str, device: str | None = None) -> float:
        return self.last.device_j(kind, device) - self.first.device_j(kind, device)

    def unattributed(self, kind: str) -> float:
        return self.last.unattributed_j(kind) - self.first.unattributed_j(kind)

    def cpu_j(self, name: str, rate_w: float) -> float:
        """Expected CPU joules of job ``name`` at package rate ``rate_w`` (see module docstring)."""
        total = 0.0
        for a, b in zip(self.samples, self.samples[1:]):
            dt = b.scrape.tick_at - a.scrape.tick_at
            capacity = b.machine_ticks - a.machine_ticks
            job = max(0, b.job_cpu_ticks[name] - a.job_cpu_ticks[name])
            if capacity > 0:
                total += rate_w * dt * min(1.0, job / capacity)
        return total

    def cpu_unattributed_j(self, rate_w: float) -> float:
        """Expected unattributed CPU joules: idle time and other processes' busy time."""
        total = 0.0
        for a, b in zip(self.samples, self.samples[1:]):
            dt = b.scrape.tick_at - a.scrape.tick_at
            capacity = b.machine_ticks - a.machine_ticks
            jobs = sum(max(0, b.job_cpu_ticks[n] - a.job_cpu_ticks[n]) for n in b.job_cpu_ticks)
            if capacity > 0:
                total += rate_w * dt * max(0.0, capacity - jobs) / capacity
        return total

    def job_cpu_s(self, name: str) -> float:
        return (self.samples[-1].job_cpu_ticks[name] - self.samples[0].job_cpu_ticks[name]) / CLK_TCK

    def dram_j(self, name: str, rate_w: float) -> float:
        return sum(rate_w * (b.scrape.tick_at - a.scrape.tick_at) * b.job_rss[name] / b.mem_used
                   for a, b in zip(self.samples, self.samples[1:]))

    def dram_unattributed_j(self, rate_w: float) -> float:
        return sum(rate_w * (b.scrape.tick_at - a.scrape.tick_at) * max(0, b.mem_used - sum(b.job_rss.values()))
                   / b.mem_used for a, b in zip(self.samples, self.samples[1:]))


def follow(daemon: DaemonProcess, ticks: int, jobs: Mapping[str, Callable[[], Iterable[int]]]) -> Window:
    """Samples at every tick the test sees (at least ``ticks`` ticks apart first to last).
    ``jobs``: name -> a function giving the job's live PIDs (re-evaluated each sample)."""
    w = Window()
    start_tick = int(daemon.get("/healthz", allow_error=True).get("tick", 0))
    w.samples.append(next_sample(daemon, start_tick, jobs))
    while w.ticks < ticks:
        w.samples.append(next_sample(daemon, w.last.tick, jobs))
    return w


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend(int(x) for x in fh.read().split())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out
