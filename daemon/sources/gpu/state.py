"""What the GPU collector (policy.py) keeps per board and per feature: retry
schedules, the power integrator, the per-UUID state that survives re-inits, and small
helpers shared by the collector's parts. Vendor-neutral."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

from ...config import GpuConfig
from ..base import CounterDiff
from .vendor import GpuError, PartitionLayout, UtilWindow

PROC_PID_INIT_INO = 0xEFFFFFFC  # inode of the initial PID namespace (include/linux/proc_ns.h)


def proc_pid_exists(pid: int) -> bool:
    """True when ``/proc/<pid>`` exists in the daemon's PID namespace."""
    return os.path.exists(f"/proc/{pid}")


def pid_namespace_is_initial(path: str = "/proc/self/ns/pid") -> bool | None:
    """True in the host's (initial) PID namespace, False in another one (a container
    without --pid=host, ``unshare --pid``), None when it cannot be told."""
    try:
        return os.stat(path).st_ino == PROC_PID_INIT_INO
    except OSError:
        return None


def source_options(cfg: GpuConfig) -> dict[str, Any]:
    """The ``GpuSource`` keyword options the ``[gpu]`` section sets."""
    return {
        "retry_s": cfg.retry_s,
        "retry_max_s": cfg.retry_max_s,
        "reinit_interval_s": cfg.reinit_interval_s,
        "power_sample_hz": cfg.power_sample_hz,
    }


def error_text(exc: BaseException) -> str:
    """``ExceptionClass: message`` for logs and problems (a GpuError's own text)."""
    if isinstance(exc, GpuError):
        return exc.text
    return f"{type(exc).__name__}: {exc}"


class Backoff:
    """Retry schedule: first retry ``initial`` s after a failure, then x ``factor``
    up to ``maximum``."""

    def __init__(self, initial: float, maximum: float, factor: float = 2.0) -> None:
        self.initial, self.maximum, self.factor = initial, maximum, factor
        self.failures = 0
        self.next_at: float | None = None
        self.error = ""

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def due(self, now: float) -> bool:
        return self.next_at is None or now >= self.next_at

    def failed(self, now: float, error: str) -> None:
        delay = min(self.initial * self.factor ** self.failures, self.maximum)
        self.failures += 1
        self.next_at = now + delay
        self.error = error

    def succeeded(self) -> None:
        self.failures, self.next_at, self.error = 0, None, ""


class PowerIntegrator:
    """Trapezoid integral of power samples (thread-safe); ``take`` hands out what was
    integrated since the last ``take``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.last_t: float | None = None
        self.last_w: float | None = None
        self._energy_j = 0.0
        self._from_t: float | None = None
        self.samples_total = 0

    def add(self, t: float, watts: float) -> None:
        with self._lock:
            if self.last_t is not None and t <= self.last_t:
                return  # out of order (the sampler got there first)
            if self.last_t is not None and self.last_w is not None:
                self._energy_j += (self.last_w + watts) / 2.0 * (t - self.last_t)
            if self._from_t is None:
                self._from_t = t
            self.last_t, self.last_w = t, watts
            self.samples_total += 1

    def restart(self) -> None:
        """Forget the last sample (the board was lost): the next sample starts afresh,
        so power is never interpolated over a gap nobody measured. What was integrated
        before is kept for the next ``take``."""
        with self._lock:
            self.last_t = self.last_w = None
            self._from_t = None

    def take(self) -> tuple[float, float, float | None]:
        """(joules, seconds covered, last sample in W) since the previous take."""
        with self._lock:
            energy, self._energy_j = self._energy_j, 0.0
            span = 0.0 if self._from_t is None or self.last_t is None else self.last_t - self._from_t
            self._from_t = self.last_t
            return energy, span, self.last_w


@dataclass
class Board:
    """One GPU as enumerated at (re-)init: what does not change until the next."""

    index: int
    handle: Any
    uuid: str
    name: str
    device: str  # f"{vendor.device_prefix}{index}"
    layout: PartitionLayout | None = None  # None: not partitioned
    layout_read_s: float | None = None  # when the partition layout was last read (monotonic)

    @property
    def partitioned(self) -> bool:
        return self.layout is not None


@dataclass
class Feature:
    supported: bool = True
    backoff: Backoff | None = None
    problem: str = ""  # the problem text while failing


@dataclass
class GpuState:
    """What the collector remembers about one GPU (by UUID) across reads and re-inits."""

    uuid: str
    counter: CounterDiff = field(default_factory=lambda: CounterDiff(max_value=None))
    last_read_s: float | None = None
    last_avg_power_w: float | None = None
    util: UtilWindow = field(default_factory=UtilWindow)
    features: dict[str, Feature] = field(default_factory=dict)
    integrator: PowerIntegrator = field(default_factory=PowerIntegrator)
    lost: Backoff | None = None  # set while the GPU is lost
    lost_error: str = ""
    lost_since_read: bool = False  # lost after the last energy read: the next one spans the gap
    energy_unplaced: bool = False  # this read's energy has no known time span: book it unattributed


@dataclass
class Proc:
    pid: int
    used: int | None
    kinds: set[str]
    part: int | None = None  # the partition it runs in; None: none
    usage: Any = None


class NoEnergy(Exception):
    """Neither an energy counter nor power readings on this GPU."""


class Lost(Exception):
    """A board answered LOST: isolate it (``text`` names the error)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


FAILED = object()  # a side query that failed (problem recorded)
OFF = object()  # a feature the library does not support here
