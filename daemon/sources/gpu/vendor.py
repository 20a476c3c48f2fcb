"""The GPU vendor boundary: what a vendor module (nvidia.py, amd.py) provides to the
vendor-neutral collector (policy.py), and the typed errors it raises.

A vendor adapter wraps one management library (NVML, amdsmi) and nothing else: every
library call goes through it, and every library exception is mapped there, once, to a
``GpuError`` with a vendor-neutral ``GpuErrorKind`` (as Zeus maps NVML errors). The
policy decides what each kind means: a feature switched off, a problem retried with
backoff, a board isolated until a probe finds it back, a source shown disabled.

Boards are physical GPUs. A board split into partitions (NVIDIA MIG GPU instances,
AMD compute partitions) is described by a ``PartitionLayout``: the board's energy is
split over its partitions by size (slices), since energy exists only per board.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Mapping, Protocol


class GpuErrorKind(Enum):
    """What a library failure means, whatever the vendor."""

    NOT_SUPPORTED = "not_supported"  # the feature is off on this board for good (a note)
    NO_PERMISSION = "no_permission"  # a problem, retried with backoff
    LOST = "lost"  # the board is gone: isolated, probed until it is back
    NOT_FOUND = "not_found"  # nothing there (an empty MIG slot, no newer sample)
    UNINITIALIZED = "uninitialized"  # the library is not initialised
    NO_DRIVER = "no_driver"  # driver or library absent: a quiet source is disabled
    OTHER = "other"  # a problem, retried with backoff


class GpuError(Exception):
    """A vendor library call failed. ``text`` (``ExceptionClass: message``) goes into
    problems and logs; ``why`` (the library's error name) into notes."""

    def __init__(self, kind: GpuErrorKind, text: str, why: str = "") -> None:
        super().__init__(text)
        self.kind = kind
        self.text = text
        self.why = why or kind.value


@dataclass(frozen=True, slots=True)
class EnergyCount:
    """One reading of a board's energy counter."""

    value: int  # raw counter ticks
    ticks_per_joule: float  # NVML: 1000.0 (mJ); amdsmi: 1e6 / counter_resolution (uJ per tick)
    max_value: int | None = None  # where it wraps to 0; None: never wraps (going back = reset)


@dataclass(frozen=True, slots=True)
class MemoryInfo:
    used_bytes: int
    total_bytes: int


@dataclass(slots=True)
class ProcEntry:
    """One entry of a board's (or partition's) process list."""

    pid: int
    used_bytes: int | None  # None: not available
    partition: int | None = None  # the partition it runs in (NVML gpuInstanceId); None: none
    usage: Any = None  # vendor-private (e.g. engine busy time) for its ``utilisation``


@dataclass
class Partition:
    """One partition of a board (cached with the layout until the next re-read)."""

    part_id: int
    handles: list[Any]  # the handles whose process lists belong to this partition
    slices: int  # its size: its energy share is slices / PartitionLayout.total_slices
    name: str
    memory_total_bytes: int | None


@dataclass
class PartitionLayout:
    """How a partitioned board is split."""

    parts: dict[int, Partition]
    total_slices: int
    parent_lists: bool  # True: the board handle's lists carry ``partition`` (fallback: each part's)
    error: str = ""  # partitioned, but the layout could not be read: energy unattributed
    note: str = ""  # one line for notes() and the log


@dataclass
class UtilWindow:
    """Per-board utilisation state, kept by UUID across reads and re-inits; its
    meaning is the vendor's (NVML: the newest sample timestamp seen, in us)."""

    last_ts_us: int = 0
    extra: dict[Any, Any] = field(default_factory=dict)


@dataclass
class UtilResult:
    per_pid: dict[int, tuple[float, float, float]]  # pid -> (sm %, enc %, dec %)
    discarded: int = 0  # samples thrown away as junk


class GpuVendor(Protocol):
    """What the policy needs from a vendor library. Every method raises ``GpuError``
    (and nothing else) when the library fails."""

    vendor: str  # "nvidia" | "amd": DeviceReading.vendor
    health_name: str  # "gpu" | "gpu_amd": the Source's name
    device_prefix: str  # "gpu" | "amdgpu": device f"{prefix}{index}"
    partition_infix: str  # "-mig" | "-p": partition device f"{prefix}{index}{infix}{id}"
    partition_word: str  # "MIG" | "partition" (messages)
    partition_key: str  # "gi" | "p": feature keys of a partition's own lists, f"{key}{id}:compute_procs"
    library: str  # "NVML" | "amdsmi" (messages)
    driver_name: str  # "NVIDIA" | "AMD" (messages)
    counter_prefix: str  # "gpu" | "gpu_amd": self-metric keys
    library_key: str  # "nvml" | "amdsmi": f"{counter_prefix}_{library_key}_calls_total"
    process_kinds: tuple[tuple[str, str], ...]  # (kind, what) of each process list
    calls: int  # library calls made so far

    def init(self) -> None: ...

    def shutdown(self) -> None: ...

    def count(self) -> int: ...

    def board(self, index: int) -> tuple[Any, str]: ...

    def name(self, handle: Any) -> str: ...

    def partitions(self, handle: Any, device: str, name: str) -> PartitionLayout | None: ...

    def energy(self, handle: Any) -> EnergyCount: ...

    def power_w(self, handle: Any) -> float: ...

    def memory(self, handle: Any) -> MemoryInfo: ...

    def processes(self, kind: str, handle: Any) -> list[ProcEntry]: ...

    def util_wanted(self, window: UtilWindow, procs: Mapping[int, ProcEntry], wall_us: int) -> bool: ...

    def utilisation(self, handle: Any, procs: Mapping[int, ProcEntry], window: UtilWindow,
                    wall_us: int) -> UtilResult: ...

    def alive(self, index: int) -> tuple[Any, str]: ...

    def processes_unusable(self) -> str: ...

    def reports_host_pids(self) -> bool: ...

    def driver_gpu_count(self) -> int | None: ...

    def wall_clock(self) -> Callable[[], float]: ...
