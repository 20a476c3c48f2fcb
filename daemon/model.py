"""Immutable data that flows between the stages: source readings, process facts, snapshots.

Every stage hands the next one frozen values, so exporters and the HTTP API read a
snapshot that no later tick can change under them (Kepler's model). Units are in the
names: ``energy_j`` joules, ``power_w`` watts, ``*_bytes`` bytes, ``*_s`` seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

from .slurm import SlurmJob

# Job components: what a job's energy is made of. "other" is the node remainder (the
# node's input energy from its BMC minus gpu + cpu + dram in the same tick, never
# negative; 0 without a node reading): fans, power supply losses, NICs, the board.
Component = Literal["gpu", "cpu", "dram", "other"]
COMPONENTS: tuple[Component, ...] = ("gpu", "cpu", "dram", "other")
# The components a device measures directly (every reading of these kinds is one).
MEASURED_COMPONENTS: tuple[Component, ...] = ("gpu", "cpu", "dram")
# Device kinds: the measured components and "node", the whole node's input power from
# its BMC (one device named "node"). A node reading is not a component: it sets "other".
DeviceKind = Literal["gpu", "cpu", "dram", "node"]
DEVICE_KINDS: tuple[DeviceKind, ...] = ("gpu", "cpu", "dram", "node")
# How the node remainder ("other") is booked: "proportional" splits it over the jobs and
# the unattributed energy in proportion to their measured energy of the tick;
# "unattributed" books all of it unattributed.
REMAINDER_POLICIES: tuple[str, ...] = ("proportional", "unattributed")
# Where a job's node figure comes from (energy_sources.node): the BMC method, or none.
NODE_METHODS: tuple[str, ...] = ("redfish", "ipmi", "none")

# Where an energy figure comes from: a hardware energy counter, integrated sampled
# power, or a model (rated power x load). Every figure carries one of these.
EnergySource = Literal["counter", "power", "estimate"]


@dataclass(frozen=True, slots=True)
class GpuProcessUse:
    """One process seen on a GPU during the interval."""

    pid: int
    used_memory_bytes: int | None = None  # None: NVML did not report it
    sm_util_pct: float | None = None  # None: no utilisation sample in the interval
    enc_util_pct: float | None = None  # video encoder %, None: no sample / not reported
    dec_util_pct: float | None = None  # video decoder %, None: no sample / not reported
    # False: the PID has no /proc entry the daemon can see (another PID namespace, pid 0,
    # exited between reads). Such a process keeps its share of the GPU; that share is
    # booked as unattributed, never spread over the visible processes.
    visible: bool = True
    kind: str = "compute"  # compute | graphics | compute+graphics | mps


@dataclass(frozen=True, slots=True)
class DeviceReading:
    """Energy one device used during one interval, as its source reported it.

    ``energy_j`` is the energy between the previous read and this one;
    ``power_w`` is the average (or last sampled) power over that interval.
    """

    kind: DeviceKind
    device: str  # stable name: "gpu0", "package-0", "dram-0", "cpu" (estimate), "node"
    energy_j: float
    power_w: float
    source: EnergySource
    interval_s: float
    processes: tuple[GpuProcessUse, ...] = ()  # GPU only
    memory_used_bytes: int | None = None  # GPU only
    memory_total_bytes: int | None = None  # GPU only
    name: str = ""  # human model name ("NVIDIA H100 80GB HBM3"), uuid or zone name
    attributable: bool = True  # False: energy must stay unattributed
    # A part of a physical device (a MIG GPU instance): the board's device name
    # ("gpu0"); "" for a whole device. The board's energy is the sum of its parts'
    # readings and its own (the remainder not assigned to any part).
    parent: str = ""
    uuid: str = ""  # GPU only: the board's NVML UUID (also on its MIG instances); "" when unknown
    vendor: str = ""  # GPU only: "nvidia" | "amd"; "" for CPU and DRAM
    # GPU only: the fraction of the physical board this reading stands for (embodied
    # carbon is booked by board-time): 1.0 for a whole board; a partition (MIG GPU
    # instance, AMD partition) its slices / the board's; a partitioned board's own
    # reading (the remainder) the rest.
    board_share: float = 1.0
    # Node only: the tick's energy from the BMC's held power before any counter
    # correction (0 for a reading that books a gap). A figure below it took a
    # correction (an earlier tick's held power was too high): attribution carries what
    # that leaves uncovered against later ticks' remainder instead of calling the
    # node below its components.
    held_j: float = 0.0


@dataclass(frozen=True, slots=True)
class SourceHealth:
    """State of one source or sink, as shown by /healthz and the health metrics."""

    name: str
    state: Literal["ok", "degraded", "disabled"]
    detail: str = ""
    errors_total: int = 0
    since: float | None = None  # wall time the current state began


@dataclass(frozen=True, slots=True)
class JobTotals:
    """Cumulative figures for one job, as kept by the ledger."""

    job_id: str
    label: str
    user: str
    uid: int
    energy_j: Mapping[str, float]  # component -> joules
    co2e_g: float
    state: Literal["running", "finished"]
    # Lifecycle figures (issue 16; daemon/footprint/): manufacturing carbon amortised
    # over the devices' service life and booked by the device-time the job occupied;
    # market-based CO2e (contractual instruments, GHG Protocol Scope 2); water (on-site
    # WUE + off-site EWIF x PUE). co2e_g above stays the location-based figure.
    embodied_co2e_g: float = 0.0
    co2e_market_g: float = 0.0
    water_l: float = 0.0


@dataclass(frozen=True, slots=True)
class DeviceState:
    """Latest power and cumulative energy of one device (since this daemon started)."""

    kind: DeviceKind
    device: str
    name: str
    power_w: float
    energy_j_total: float
    source: EnergySource
    uuid: str = ""  # GPU only: NVML UUID (dcgm-exporter's UUID label); "" when unknown
    vendor: str = ""  # GPU only: "nvidia" | "amd"; "" for CPU and DRAM


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything exporters need about the latest tick. Never mutated once built."""

    taken_at: float  # wall clock, seconds since epoch
    tick: int
    tick_duration_s: float
    devices: tuple[DeviceState, ...] = ()
    jobs: tuple[JobTotals, ...] = ()
    unattributed_j_total: Mapping[str, float] = field(default_factory=dict)
    health: tuple[SourceHealth, ...] = ()
    grid_zone: str = ""
    grid_provider: str = ""
    grid_g_per_kwh: float | None = None
    counters: Mapping[str, float] = field(default_factory=dict)  # daemon self-metrics
    # (source, device, reason) -> untrusted counter steps since start (e.g. a RAPL
    # counter that stepped back): wattprint_counter_glitches_total.
    counter_glitches: Mapping[tuple[str, str, str], float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class JobRef:
    """Who a job is, as exporters may show it. Never carries a command line."""

    job_id: str
    label: str  # sanitised label; "" when the job has none (process-group job)
    user: str
    uid: int


@dataclass(frozen=True, slots=True)
class TickRecord:
    """What one tick measured and booked: the per-interval deltas that sinks such as
    InfluxDB write as points, timestamped at sampling time (``sampled_at``, wall clock).

    For every component: sum(job_energy_j[*][component]) + unattributed_j[component]
    == sum of device readings of that component (conservation); for ``other``, the
    node remainder (the "node" readings minus gpu + cpu + dram, never negative), so
    on a tick whose node reading is at least the measured components, all jobs' and
    unattributed energy together equal the node's energy.
    """

    sampled_at: float  # wall clock, seconds since epoch
    interval_s: float
    readings: tuple[DeviceReading, ...]
    jobs: Mapping[str, JobRef]  # job_id -> who
    job_energy_j: Mapping[str, Mapping[str, float]]  # job_id -> component -> joules this tick
    unattributed_j: Mapping[str, float]  # component -> joules this tick
    # CO2e of the ledger bucket this tick fell in, per job (all components, so far):
    bucket_start: int = 0
    bucket_co2e_g: Mapping[str, float] = field(default_factory=dict)  # job_id -> grams in the bucket so far
    g_per_kwh: float | None = None  # the value of this tick's provider interval (slot)
    intensity_status: str = ""  # provisional | final
    # Per job, what bucket_co2e_g was computed with: the energy-weighted mean intensity of
    # the job's slots in the bucket so far, and "final" only when all of them are final.
    bucket_g_per_kwh: Mapping[str, float] = field(default_factory=dict)
    bucket_intensity_status: Mapping[str, str] = field(default_factory=dict)
    # Lifecycle (issue 16): per job, market-based CO2e of the bucket so far (beside
    # bucket_co2e_g, settled with it), and this tick's embodied CO2e and water.
    bucket_co2e_market_g: Mapping[str, float] = field(default_factory=dict)
    job_embodied_co2e_g: Mapping[str, float] = field(default_factory=dict)  # job_id -> grams this tick
    job_water_l: Mapping[str, float] = field(default_factory=dict)  # job_id -> litres this tick


@dataclass(frozen=True, slots=True)
class SettledBucket:
    """One job's CO2e in one bucket after its intensity was revised (settlement)."""

    job: JobRef
    bucket_start: int
    co2e_g: float
    g_per_kwh: float
    status: str  # provisional | final
    co2e_market_g: float = 0.0  # market-based CO2e of the bucket with the revised values (issue 16)


@dataclass(frozen=True, slots=True)
class Intensity:
    g_per_kwh: float
    status: str  # provisional | final
    provider: str
    zone: str
    basis: str  # actual | forecast | latest | fallback | static
    # The provider interval ("slot") the value is for, seconds since the epoch;
    # None: not tied to one (static values): it holds for the whole bucket.
    start: float | None = None
    end: float | None = None


@dataclass(frozen=True, slots=True)
class JobIdentity:
    """Who a job is. ``job_id`` = leader PID + leader start time: stable across daemon
    restarts and unique per host even when PIDs are reused."""

    job_id: str
    label: str  # sanitised label; "" for process-group jobs
    label_source: str  # env variable, "cgroup:<kind>", or "pgid"
    uid: int
    user: str
    command: str  # executable name of the leader, never the command line
    root_pid: int
    started_at: float  # wall time the leader started
    label_raw: str = ""  # the label exactly as the user set it (API only)
    slurm: SlurmJob | None = None  # the Slurm job (daemon/slurm.py), for Slurm jobs
