"""Attribution: split each device's energy of one tick over the jobs that used it.

Pure functions, no I/O (``GpuIdleFloor`` keeps one number per GPU between ticks). The
rule that everything else relies on is conservation: for every component, the energy
given to jobs plus the unattributed remainder equals what the devices reported,
exactly (the remainder is computed as the difference; when shares computed in floats
add up to a hair more than the device, the excess is taken from the job with the most,
so no remainder is ever negative).

GPU, per device reading (a whole GPU, or a MIG GPU instance: a reading with ``parent``
set is attributed like any GPU, among its own processes):

- A process's *activity* is ``max(sm, enc, dec)`` of its utilisation samples in the
  interval (SM, video encoder, video decoder, each 0..100; a missing value counts 0).
  The busiest engine it kept busy: an ffmpeg at 5 % SM and 40 % NVENC weighs 40.
- A sole process gets all of the GPU's energy.
- When some process has activity > 0, the energy is split in two parts. The *idle*
  part is the GPU's idle floor x the interval (capped at the energy), the floor being
  the lowest power this GPU drew in an interval with no process on it
  (``GpuIdleFloor``; 0 until such an interval was seen). It goes to every process on
  the GPU by used-memory share: holding memory keeps the board powered, busy or not.
  The rest, the *active* part, goes by activity share; a process with no activity
  (memory-only, no sample) gets none of it.
- When no process has activity (all idle in the interval, or utilisation unsupported
  as on MIG), all of it goes by used-memory share.
- Used-memory share: when every process reports its memory and the sum is above 0;
  otherwise equal shares.
- Unattributed: the share of a process that belongs to no job; the share of a process
  that is not visible in /proc (``visible=False``: another PID namespace, pid 0,
  exited between reads), also counted in ``Attribution.gpu_invisible_j``; all of a GPU
  with no processes, or that reports ``attributable=False``.
- MPS clients (``kind="mps"``) are processes like any other, with their own samples
  where NVML gives them; the MPS server's own share belongs to the server's job, if
  it has one, else it stays unattributed.

CPU: each package's energy is split into active and idle parts by the machine's busy
share of CPU capacity in the interval (non-idle seconds / (CPUs x interval)). Active
energy goes to jobs by their share of busy CPU time (job CPU seconds / all non-idle
CPU seconds); the part used by other processes stays unattributed. Idle energy stays
unattributed (``idle_policy = "unattributed"``, the default) or is shared among the
jobs in proportion to their CPU time (``"share"``).

DRAM: by the job's share of used memory (resident set size / MemTotal-MemAvailable).

Node (the whole node's input power from its BMC, readings of kind "node"): a node
reading is not a component; it sets the remainder ``other`` = node energy - (gpu +
cpu + dram measured this tick), never negative. A node reading below the measured
components books ``other`` = 0 and says so (``Attribution.node_below_j``; the engine
counts it and degrades the node's health). Without a node reading in a tick ``other``
is 0 for that tick (the node source returns none for its baseline tick); a node
reading of 0 J is a figure like any other.

Counter corrections carried (``node_carry_j``): between BMC samples the node source
books the held power, and a counter value that shows it was too high is taken from the
following ticks' node figures, down to 0. A tick whose figure that correction takes
below its measured components, while the BMC's own held power for the tick
(``DeviceReading.held_j``) covered them, is not a node below its components: those
joules of measured energy were already covered by the remainder booked in the earlier,
too-high ticks. So ``other`` is 0 and the uncovered part is carried (returned in
``Attribution.node_carry_j``, handed back by the engine next tick) and taken from the
next ticks' remainder before it is booked: over a span that ends with no carry, all
jobs' and unattributed energy equals the node's energy exactly. A shortfall with no
such correction (the BMC's power itself below the components, or a gap's reading
below the gap's measured energy) is ``node_below_j``, and the carry waits.

The remainder policy books ``other``:

- ``proportional`` (the default): split over the jobs AND the unattributed measured
  energy in proportion to their measured (gpu + cpu + dram) energy of the tick, so a
  job's total is its share of the wall meter (node 1,000 W, measured 700 W, jobs at
  420 W and 140 W: jobs 600 W and 200 W, unattributed 200 W). A tick with no measured
  energy books all of it unattributed.
- ``unattributed``: all of it stays unattributed.

A node reading that covers more than this tick (the node source books the counter's
difference across a gap, a span with no node figure, in the first tick after it, with
``interval_s`` the whole span): the engine hands ``attribute`` the measured energy of
the earlier ticks of that span that had no node figure of their own (``SpanMeasured``,
from the job book's window), and the remainder is ``other`` = node energy - (those
ticks' measured energy + this tick's), never negative; under ``proportional`` it is
split by each job's and the unattributed measured energy over the whole span, so a job
that ran in the gap gets its share even if it has ended since (it appears in
``job_energy_j`` with only ``other``). Those earlier ticks were booked as without a
BMC: what they measured stays as booked.

Either way jobs + unattributed of ``other`` equals the remainder, so on a tick whose
node reading is at least the measured components, all jobs' and unattributed energy
(every component) equals the node's energy.

Provenance: ``Attribution.job_sources`` gives, per job and component, the weakest
source (estimate < power < counter) among the devices that gave that job energy > 0
in this tick; devices that gave it nothing do not count. A job that got a share of the
remainder also gets ``node``: the node reading's method (``redfish`` | ``ipmi``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .model import COMPONENTS, MEASURED_COMPONENTS, DeviceReading, GpuProcessUse
from .procs import ProcessView

# Higher is weaker: the weakest source of a set names it.
SOURCE_RANK = {"counter": 0, "power": 1, "estimate": 2}
# An idle-floor sample needs an interval this long: a counter that steps every ~100 ms
# says little about power over a few milliseconds (a late read merged into a tick).
IDLE_FLOOR_MIN_INTERVAL_S = 0.5


def weaker_source(a: str | None, b: str) -> str:
    """The weaker of two energy sources (``a`` None: ``b``)."""
    if a is None or SOURCE_RANK.get(b, 2) > SOURCE_RANK.get(a, 2):
        return b
    return a


@dataclass(frozen=True, slots=True)
class Attribution:
    """Result of one tick: joules per job and component, and what stayed unattributed."""

    job_energy_j: Mapping[str, Mapping[str, float]]  # job_id -> component -> J
    unattributed_j: Mapping[str, float]  # component -> J
    device_j: Mapping[str, float]  # component -> J reported by the devices
    gpu_seconds: Mapping[str, float]  # job_id -> GPU-seconds held in the interval
    gpu_memory_bytes: Mapping[str, int]  # job_id -> GPU memory in use now (all GPUs)
    # job_id -> component -> weakest source among the devices that gave it energy > 0
    job_sources: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # GPU energy left unattributed because its process was not visible in /proc
    # (part of unattributed_j["gpu"]).
    gpu_invisible_j: float = 0.0
    # The node's energy this tick (its "node" readings), None without a node reading;
    # device_j["other"] is the remainder booked from it.
    node_j: float | None = None
    node_method: str = ""  # the node readings' method ("redfish" | "ipmi"), "" without
    # How far the node reading fell below the measured components (J); 0 when it did not.
    node_below_j: float = 0.0
    # Measured energy a counter correction left without node cover, to take from the
    # next ticks' remainder (J; see the module docstring); the engine hands it back.
    node_carry_j: float = 0.0


@dataclass
class GpuIdleFloor:
    """Per GPU device: the lowest power (W) it drew in an interval (of at least
    ``IDLE_FLOOR_MIN_INTERVAL_S``) with no process on it. Learned while the daemon runs
    (not stored); a GPU never seen empty has none."""

    floor_w: dict[str, float] = field(default_factory=dict)

    def observe(self, readings: Sequence[DeviceReading]) -> None:
        for r in readings:
            if (r.kind != "gpu" or r.processes or not r.attributable or r.energy_j < 0
                    or r.interval_s < IDLE_FLOOR_MIN_INTERVAL_S):
                continue
            power_w = r.energy_j / r.interval_s
            prev = self.floor_w.get(r.device)
            if prev is None or power_w < prev:
                self.floor_w[r.device] = power_w


def _activity(p: GpuProcessUse) -> float:
    """max(sm, enc, dec) in percent; missing values count 0."""
    return max(float(p.sm_util_pct or 0.0), float(p.enc_util_pct or 0.0), float(p.dec_util_pct or 0.0))


def _memory_weights(procs: Sequence[GpuProcessUse]) -> list[float]:
    mem = [p.used_memory_bytes for p in procs]
    if all(m is not None and m >= 0 for m in mem) and sum(mem) > 0:  # type: ignore[arg-type]
        return [float(m) for m in mem]  # type: ignore[arg-type]
    return [1.0] * len(procs)


def gpu_process_energy_j(reading: DeviceReading, idle_floor_w: float = 0.0) -> list[float]:
    """Joules of this GPU reading per process (same order as ``reading.processes``);
    they sum to ``reading.energy_j``, or the list is empty (nothing attributable)."""
    procs = reading.processes
    energy = reading.energy_j
    if not procs or not reading.attributable:
        return []
    if len(procs) == 1:
        return [energy]
    activity = [_activity(p) for p in procs]
    memory = _memory_weights(procs)
    if not any(a > 0 for a in activity):
        total = sum(memory)
        return [energy * w / total for w in memory]
    idle_j = min(max(idle_floor_w, 0.0) * max(reading.interval_s, 0.0), max(energy, 0.0))
    active_j = energy - idle_j
    mem_total, act_total = sum(memory), sum(activity)
    return [idle_j * m / mem_total + active_j * a / act_total for m, a in zip(memory, activity)]


ROUNDING_REL = 1e-9  # shares that overshoot the device by less than this (x device) are rounding


def _remainder(device_j: float, jobs: dict[str, dict[str, float]], component: str) -> float:
    """``device_j`` minus the jobs' energy of ``component``. Shares computed in floats
    can add up to a hair more than the device (3 x 0.007/3 > 0.007): that excess is
    taken back from the job with the most, so the remainder is 0, never negative (a
    negative unattributed point, a total that decreases), and jobs + unattributed
    still equal the device."""
    rest = device_j - sum(e[component] for e in jobs.values())
    if rest >= 0.0 or -rest > ROUNDING_REL * abs(device_j):
        return rest
    biggest = max(jobs.values(), key=lambda e: e[component])
    biggest[component] = max(0.0, biggest[component] + rest)
    return max(0.0, device_j - sum(e[component] for e in jobs.values()))


@dataclass(frozen=True, slots=True)
class SpanMeasured:
    """The measured (gpu + cpu + dram) energy of the earlier ticks a node reading
    covers that had no node figure of their own: all of it, and per job (a job not
    listed, or the rest of ``measured_j``, was unattributed)."""

    measured_j: float
    job_measured_j: Mapping[str, float]


def attribute(
    readings: Sequence[DeviceReading],
    view: ProcessView,
    idle_policy: str = "unattributed",
    gpu_idle_floor_w: Mapping[str, float] | None = None,
    remainder_policy: str = "proportional",
    span: SpanMeasured | None = None,
    node_carry_j: float = 0.0,
) -> Attribution:
    """One tick's attribution (see the module docstring); ``span``: the earlier ticks
    a multi-tick node reading covers (None: it covers this tick only); ``node_carry_j``:
    the previous tick's ``Attribution.node_carry_j``."""
    jobs: dict[str, dict[str, float]] = {j.identity.job_id: {c: 0.0 for c in COMPONENTS} for j in view.jobs}
    sources: dict[str, dict[str, str]] = {}
    device_j = {c: 0.0 for c in COMPONENTS}
    gpu_seconds: dict[str, float] = {}
    gpu_mem: dict[str, int] = {}
    invisible_j = 0.0
    floors = gpu_idle_floor_w or {}

    def book(job_id: str, component: str, joules: float, source: str) -> None:
        jobs[job_id][component] += joules
        if joules > 0:
            per_job = sources.setdefault(job_id, {})
            per_job[component] = weaker_source(per_job.get(component), source)

    jobs_cpu_s = sum(j.cpu_s for j in view.jobs)
    cpu_busy_s = max(view.cpu_busy_s, jobs_cpu_s)
    cpu_capacity_s = max(view.cpu_total_s, cpu_busy_s)
    active_share = cpu_busy_s / cpu_capacity_s if cpu_capacity_s > 0 else 0.0
    mem_total = max(view.mem_used_bytes, sum(j.rss_bytes for j in view.jobs))

    node_j: float | None = None
    node_held_j = 0.0
    node_corrected = False  # a counter correction took some node figure below its held power
    node_source: str | None = None
    node_methods: list[str] = []
    for r in readings:
        if r.kind == "node":  # not a component: it sets the remainder below
            node_j = (node_j or 0.0) + r.energy_j
            node_held_j += r.held_j
            node_corrected = node_corrected or r.energy_j < r.held_j
            node_source = weaker_source(node_source, r.source)
            if r.name and r.name not in node_methods:
                node_methods.append(r.name)
            continue
        device_j[r.kind] += r.energy_j
        if r.kind == "gpu":
            held: set[str] = set()
            for proc, joules in zip(r.processes, gpu_process_energy_j(r, floors.get(r.device, 0.0))):
                if not proc.visible:  # its PID means nothing here: never a job's, even if the number matches
                    invisible_j += joules
                    continue
                job = view.pid_to_job.get(proc.pid)
                if job is not None and job in jobs:
                    book(job, "gpu", joules, r.source)
            for proc in r.processes:
                job = view.pid_to_job.get(proc.pid) if proc.visible else None
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
                    book(j.identity.job_id, "cpu", share, r.source)
        elif r.kind == "dram":
            if mem_total > 0:
                for j in view.jobs:
                    book(j.identity.job_id, "dram", r.energy_j * (j.rss_bytes / mem_total), r.source)

    node_below_j = 0.0
    method = ",".join(node_methods)
    if node_j is not None:
        measured_j = sum(device_j[c] for c in MEASURED_COMPONENTS)
        weights = {job_id: sum(energy[c] for c in MEASURED_COMPONENTS) for job_id, energy in jobs.items()}
        if span is not None:  # the node reading covers earlier ticks with no node figure too
            measured_j += span.measured_j
            for job_id, j in span.job_measured_j.items():
                weights[job_id] = weights.get(job_id, 0.0) + j
        remainder_j = node_j - measured_j
        if remainder_j >= node_carry_j:  # the carry (if any) is paid off
            other_j, node_carry_j = remainder_j - node_carry_j, 0.0
        elif remainder_j >= 0.0:  # part of the carry paid
            other_j, node_carry_j = 0.0, node_carry_j - remainder_j
        elif node_corrected and node_held_j >= measured_j:  # a correction, not a low meter: carried
            other_j, node_carry_j = 0.0, node_carry_j - remainder_j
        else:
            other_j, node_below_j = 0.0, -remainder_j
        device_j["other"] = other_j
        if remainder_policy == "proportional" and measured_j > 0.0 and other_j > 0.0:
            for job_id, weight in weights.items():
                if job_id not in jobs:  # ran in the span, not in this tick (ended since)
                    if weight <= 0.0:
                        continue
                    jobs[job_id] = {c: 0.0 for c in COMPONENTS}
                share = other_j * weight / measured_j
                book(job_id, "other", share, node_source or "power")
                if share > 0.0 and method:
                    sources[job_id]["node"] = method
    unattributed = {c: _remainder(device_j[c], jobs, c) for c in COMPONENTS}
    return Attribution(
        job_energy_j=jobs, unattributed_j=unattributed, device_j=device_j,
        gpu_seconds=gpu_seconds, gpu_memory_bytes=gpu_mem, job_sources=sources, gpu_invisible_j=invisible_j,
        node_j=node_j, node_method=method, node_below_j=node_below_j, node_carry_j=node_carry_j,
    )
