"""The GPU energy source: reads NVML once per tick and turns it into DeviceReadings.

Its one job is the NVML boundary: every NVML call the daemon makes is here, and every
``NVMLError`` is mapped here, once (as Zeus does).

nvidia-ml-py versions (floor in pyproject.toml: 12.550.52, the first release with the
right ``c_nvmlProcessInfo_t`` layout *and* the ``_v2`` process-list entry points for
drivers older than R510). Symbols are probed with ``getattr`` (as nvitop does): a
function or exception class this pynvml lacks turns that one feature off, never the
source. Process lists try the unversioned call, then ``_v2`` (on FUNCTION_NOT_FOUND or
``NVMLLibraryMismatchError``); the one that works is remembered. A pynvml whose
process struct carries the extra ``usedGpuCcProtectedMemory`` field (12.535.77, which
scrambles PIDs) is detected at start: process lists are then not used (problem named).

Order of work per GPU per tick (issue 12, item 2): the energy first (the counter, or
sampled power), and it is booked whatever happens next. Every other query (memory,
process lists, utilisation) fails alone:

- ``NOT_SUPPORTED`` / ``FUNCTION_NOT_FOUND`` turns that feature off for that GPU (a
  fact, said once in the log and in ``notes()``, not a problem).
- Any other error (NO_PERMISSION, UNKNOWN, TIMEOUT, ...) is a per-feature problem: the
  feature is retried after ``retry_s`` (30 s), then with exponential backoff up to
  ``retry_max_s``; meanwhile ``problems()`` names the GPU and the feature (health
  degraded) and the GPU's energy is still booked. A GPU whose process list failed is
  booked ``attributable=False`` for that tick: its energy stays unattributed.
- ``GPU_IS_LOST`` on any call isolates the GPU: it is not read again until a probe,
  run on its own short-lived thread (so a hanging lost GPU never delays the others),
  finds it back. Probes back off from 2 s by x1.5 up to 300 s. Its counter baseline
  is kept (the gap is booked when it is back, if the counter survived). If the
  counter restarted meanwhile (a GPU reset), its new value (the energy since the
  restart) is booked unattributed, with a problem for that read: never the last power
  x the whole gap. A board without a counter is not interpolated across the gap (its
  power integrator restarts).
- When nothing can be read at all, ``read()`` raises ``SourceError``.

Energy: the delta of ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules, source
"counter"); the first read sets the baseline (0 J). When the counter goes backwards
(driver reload) that interval uses the previous interval's average power x dt (source
"power"). Boards without an energy counter (pre-Volta, some vGPU) have their power
sampled on a thread of its own at ``[gpu] power_sample_hz`` (10 Hz by default) and
integrated by trapezoid (source "power"): power read once per tick aliases (a board
alternating 100/300 W every 0.5 s read at 1 Hz is off by 50 %).

Processes: the union of the compute, graphics and MPS-client lists (``kind``
"compute", "graphics", "compute+graphics", "mps"). Every listed process is kept; one
whose PID has no ``/proc`` entry here (PID 0, 0xFFFFFFFF, scrambled, exited, another
PID namespace) is ``visible=False``: its share stays unattributed and it is counted
(``gpu_processes_not_visible``). NVML returns host PIDs: a daemon that is not in the
host PID namespace (``/proc/self/ns/pid`` inode is not 0xEFFFFFFC, the kernel's
PROC_PID_INIT_INO) cannot match them, so all of them are invisible and the source is
degraded ("run with --pid=host"). The simulator says whether its PIDs are host PIDs
(``reports_host_pids``); real pynvml always reports host PIDs.

Utilisation (issue 12, items 3 and 9): ``nvmlDeviceGetProcessUtilization`` is called
only when two or more processes share a GPU (a sole process gets everything anyway).
A sample counts only when its PID is in the process lists, ``smUtil``, ``encUtil``
and ``decUtil`` are <= 100, and its timestamp is newer than the last one seen and not
beyond now + ``FUTURE_TOLERANCE_S`` (0.25 s). The window (``lastSeenTimeStamp``)
advances to the newest accepted sample, so never beyond that; a window found ahead of
the wall clock (the clock was stepped back) restarts at now. Everything else is discarded and
counted (``gpu_util_samples_discarded_total``). No sample for a listed process: 0.

MIG (item 4): energy and power exist only for the whole board. The board's energy of
the interval is split over its GPU instances by instance size (compute slices out of
``nvmlDeviceGetMaxMigDeviceCount``, 7 on A100/H100): an instance is capacity reserved
by its user, and NVML has no per-instance activity without GPM (Hopper and newer,
extra calls per instance per tick, not used). Each instance is one reading
("gpu0-mig<gi_id>", ``parent`` "gpu0") with the processes whose ``gpuInstanceId`` is
that instance; the board's own reading ("gpu0", ``attributable=False``) carries the
slices in no instance. Process lists on a MIG parent need privileges: without them the
lists of each MIG device handle are read instead; when those fail too, the instances'
energy is booked unattributed and the problem named. MIG processes have no
utilisation (NVML does not support it on MIG): within an instance they share by
memory (see attribution.py).

Re-initialisation (item 6): the GPU set is fixed at ``nvmlInit``. NVML is shut down
and initialised again every ``reinit_interval_s`` (300 s), when the number of GPUs the
driver lists in ``/proc/driver/nvidia/gpus`` changes, and when ``nvmlDeviceGetCount``
changes; always at the end of a read, after the energy was read. State (counter
baselines, utilisation windows, feature backoffs) is kept per GPU UUID across
re-inits. With ``quiet_without_driver`` (backend ``auto`` and ``sim``) a missing
driver or library (DRIVER_NOT_LOADED, LIBRARY_NOT_FOUND) makes the source *disabled*,
not degraded, while ``nvmlInit`` is retried with backoff; the GPUs appear when the
driver loads.

Cost (item 9): handles, UUIDs, names and the MIG layout are read at (re-)init only.
Per tick: ``nvmlDeviceGetCount`` once, then per GPU the energy counter, memory info,
the compute, graphics and MPS lists (features NVML does not support drop out), and
utilisation only when two or more processes share it: at most 6 calls per GPU.

Threads: ``read()`` runs on the engine's thread for this source; the power sampler
and lost-GPU probes make their own NVML calls (NVML is thread-safe). A re-init holds
``_gate`` so the sampler never calls into a library being shut down.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pynvml

from ..config import GpuConfig
from ..model import DeviceReading, EnergySource, GpuProcessUse
from .base import CounterDiff, Source, SourceDisabled, SourceError

log = logging.getLogger("wattprint.gpu")

RETRY_S = 30.0  # first retry of a failed init or side query
RETRY_MAX_S = 600.0
INIT_RETRY_S = RETRY_S  # (older name)
LOST_RETRY_S = 2.0  # first probe of a lost GPU
LOST_RETRY_FACTOR = 1.5
LOST_RETRY_MAX_S = 300.0
REINIT_INTERVAL_S = 300.0
MIG_LAYOUT_REFRESH_S = 30.0  # a stale-looking MIG layout is re-read at most this often
POWER_SAMPLE_HZ = 10.0
FUTURE_TOLERANCE_S = 0.25  # utilisation samples stamped later than now + this are junk
PROC_PID_INIT_INO = 0xEFFFFFFC  # inode of the initial PID namespace (include/linux/proc_ns.h)
DRIVER_GPUS_DIR = "/proc/driver/nvidia/gpus"
NO_INSTANCE = 0xFFFFFFFF  # gpuInstanceId without MIG


def _const(name: str, default: int) -> int:
    return int(getattr(pynvml, name, default))


ERR_NOT_SUPPORTED = _const("NVML_ERROR_NOT_SUPPORTED", 3)
ERR_NOT_FOUND = _const("NVML_ERROR_NOT_FOUND", 6)
ERR_INVALID_ARGUMENT = _const("NVML_ERROR_INVALID_ARGUMENT", 2)
ERR_DRIVER_NOT_LOADED = _const("NVML_ERROR_DRIVER_NOT_LOADED", 9)
ERR_LIBRARY_NOT_FOUND = _const("NVML_ERROR_LIBRARY_NOT_FOUND", 12)
ERR_FUNCTION_NOT_FOUND = _const("NVML_ERROR_FUNCTION_NOT_FOUND", 13)
ERR_GPU_IS_LOST = _const("NVML_ERROR_GPU_IS_LOST", 15)
_UNSUPPORTED_CODES = {ERR_NOT_SUPPORTED, ERR_FUNCTION_NOT_FOUND}
_NO_DRIVER_CODES = {ERR_DRIVER_NOT_LOADED, ERR_LIBRARY_NOT_FOUND}
NVMLError = pynvml.NVMLError
# Older nvidia-ml-py has no NVMLLibraryMismatchError: an empty tuple catches nothing.
_MISMATCH: tuple[type[BaseException], ...] = tuple(
    c for c in (getattr(pynvml, "NVMLLibraryMismatchError", None),) if isinstance(c, type))
_NOT_AVAILABLE_U64 = 0xFFFFFFFFFFFFFFFF
_MIG_ENABLE = _const("NVML_DEVICE_MIG_ENABLE", 1)


def process_struct_ok(module: Any = pynvml) -> bool:
    """False when this pynvml's ``c_nvmlProcessInfo_t`` has fields the driver does not
    fill (nvidia-ml-py 12.535.77: ``usedGpuCcProtectedMemory``): its lists are scrambled."""
    struct = getattr(module, "c_nvmlProcessInfo_t", None)
    names = [f[0] for f in getattr(struct, "_fields_", [])]
    return names[:4] == ["pid", "usedGpuMemory", "gpuInstanceId", "computeInstanceId"] and len(names) == 4


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


def nvml_error_text(exc: BaseException) -> str:
    """``NVMLError_GpuIsLost: GPU is lost`` style text for logs and problems()."""
    if isinstance(exc, NVMLError):
        try:
            text = str(exc)
        except Exception:  # str() may call into the library
            text = f"NVML error {getattr(exc, 'value', '?')}"
        return f"{type(exc).__name__}: {text}"
    return f"{type(exc).__name__}: {exc}"


def _code(exc: BaseException) -> int | None:
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


class _Backoff:
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
class _Instance:
    """One MIG GPU instance (cached with the layout)."""

    gi_id: int
    handles: list[Any]  # MIG device handles (one per compute instance)
    slices: int
    name: str
    memory_total_bytes: int | None


@dataclass
class _Board:
    """One GPU as enumerated at (re-)init: what does not change until the next."""

    index: int
    handle: Any
    uuid: str
    name: str
    mig: bool = False
    mig_total_slices: int = 0
    instances: dict[int, _Instance] = field(default_factory=dict)
    layout_error: str = ""  # MIG enabled but the layout could not be read
    layout_read_s: float | None = None  # when the MIG layout was last read (monotonic)

    @property
    def device(self) -> str:
        return f"gpu{self.index}"


@dataclass
class _Feature:
    supported: bool = True
    backoff: _Backoff | None = None
    problem: str = ""  # the problem text while failing


@dataclass
class _GpuState:
    """What the collector remembers about one GPU (by UUID) across reads and re-inits."""

    uuid: str
    counter: CounterDiff = field(default_factory=lambda: CounterDiff(max_value=None))
    last_read_s: float | None = None
    last_avg_power_w: float | None = None
    last_util_ts_us: int = 0
    features: dict[str, _Feature] = field(default_factory=dict)
    integrator: PowerIntegrator = field(default_factory=PowerIntegrator)
    lost: _Backoff | None = None  # set while the GPU is lost
    lost_error: str = ""
    lost_since_read: bool = False  # lost after the last energy read: the next one spans the gap
    energy_unplaced: bool = False  # this read's energy has no known time span: book it unattributed


@dataclass
class _Proc:
    pid: int
    used: int | None
    kinds: set[str]
    gi: int = NO_INSTANCE


class _NoEnergy(Exception):
    """Neither an energy counter nor power readings on this GPU."""


class _Lost(Exception):
    def __init__(self, exc: BaseException):
        super().__init__(nvml_error_text(exc))
        self.text = nvml_error_text(exc)


_FAILED = object()  # a side query that failed (problem recorded)
_OFF = object()  # a feature NVML does not support here


class _CountingNvml:
    """Wraps the NVML module (or simulator) and counts the ``nvml*`` calls made."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self.calls = 0
        self._lock = threading.Lock()

    def call(self, name: str, *args: Any) -> Any:
        fn = getattr(self._nvml, name, None)
        if fn is None:  # this pynvml does not have it: as if the driver did not
            raise NVMLError(ERR_FUNCTION_NOT_FOUND)
        with self._lock:
            self.calls += 1
        return fn(*args)


class NvmlGpuSource:
    """The ``Source`` for NVIDIA GPUs. ``nvml`` is the ``pynvml`` module or a
    ``SimulatedNvml``; ``nvmlInit`` is called on the first ``read()`` and retried
    with backoff while it fails. See the module docstring for the rules."""

    name = "gpu"

    def __init__(
        self,
        nvml: Any,
        pid_exists: Callable[[int], bool] = proc_pid_exists,
        *,
        init_retry_s: float = RETRY_S,
        retry_s: float | None = None,
        retry_max_s: float = RETRY_MAX_S,
        lost_retry_s: float = LOST_RETRY_S,
        reinit_interval_s: float = REINIT_INTERVAL_S,
        power_sample_hz: float = 0.0,
        quiet_without_driver: bool = False,
        wall_clock: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        pid_namespace_initial: bool | None = None,
        driver_gpus_dir: str | None = DRIVER_GPUS_DIR,
        run_probe: Callable[[Callable[[], None]], None] | None = None,
        no_driver: str = "",
    ):
        self._raw = nvml
        self._nvml = _CountingNvml(nvml)
        self._pid_exists = pid_exists
        self._retry_s = init_retry_s if retry_s is None else retry_s
        self._retry_max_s = max(retry_max_s, self._retry_s)
        self._lost_retry_s = lost_retry_s
        self._reinit_interval_s = reinit_interval_s
        self._power_sample_hz = power_sample_hz
        self._quiet = quiet_without_driver
        self._wall = wall_clock or self._default_wall_clock(nvml)
        self._clock = clock
        self._driver_gpus_dir = driver_gpus_dir
        self._run_probe = run_probe or self._thread_probe
        if pid_namespace_initial is None:
            pid_namespace_initial = pid_namespace_is_initial()
        self._pid_namespace_initial = pid_namespace_initial
        self._pids_foreign = False  # set at each (re-)init: see _enumerate
        self._struct_ok = process_struct_ok()

        self._initialized = False
        self._init_backoff = _Backoff(self._retry_s, self._retry_max_s)
        self._init_error = no_driver  # what open_gpu_source's probe found, if no driver
        self._no_driver = bool(no_driver)
        self._boards: list[_Board] = []
        self._states: dict[str, _GpuState] = {}
        self._proc_fn: dict[str, str] = {}  # list kind -> the pynvml function that works
        self._last_reinit_s: float | None = None
        self._reinit_wanted = ""
        self._driver_gpus_seen: int | None = None
        self._gate = threading.RLock()
        self._generation = 0
        self._probes: dict[str, threading.Thread | bool] = {}
        self._probe_results: dict[str, tuple[int, Any, str] | None] = {}
        self._probe_lock = threading.Lock()
        self._sampler: threading.Thread | None = None
        self._sampler_stop = threading.Event()
        self._power_targets: dict[str, tuple[Any, PowerIntegrator]] = {}
        self._problems: list[str] = []
        self._notes: dict[str, str] = {}
        self._counters: dict[str, float] = {
            "gpu_util_samples_discarded_total": 0.0,
            "gpu_processes_not_visible": 0.0,
            "gpu_pids_not_visible_total": 0.0,
            "gpu_feature_failures_total": 0.0,
            "gpu_nvml_reinits_total": 0.0,
        }
        self._invisible_seen: dict[int, None] = {}  # recent invisible PIDs (bounded)

    # -- Source protocol ------------------------------------------------------------

    def read(self, now_mono_s: float) -> Sequence[DeviceReading]:
        self._problems = []
        self._ensure_init(now_mono_s)
        self._collect_probes()
        try:
            count = int(self._nvml.call("nvmlDeviceGetCount"))
        except NVMLError as exc:
            raise SourceError(f"NVML: cannot count GPUs: {nvml_error_text(exc)}") from None
        if count != len(self._boards):
            self._reinit(now_mono_s, f"NVML now counts {count} GPU(s), not {len(self._boards)}", shutdown=False)
        if not self._initialized:
            raise SourceError(f"NVML re-init failed: {self._init_error}")
        if not self._boards and self._quiet:
            raise SourceDisabled("no GPUs found by NVML: GPU energy not measured (re-checked every "
                                 f"{self._reinit_interval_s:g} s)")

        wall_us = int(round(self._wall() * 1e6))
        readings: list[DeviceReading] = []
        not_visible = 0
        usable = 0
        for board in self._boards:
            st = self._state(board)
            if st.lost is not None:
                self._problems.append(f"{board.device}: skipped: {st.lost_error} (retrying with backoff)")
                self._maybe_probe(board, st, now_mono_s)
                continue
            try:
                got = self._read_board(board, st, now_mono_s, wall_us)
            except _Lost as lost:
                self._mark_lost(board, st, lost.text, now_mono_s)
                self._problems.append(f"{board.device}: skipped: {lost.text} (retrying with backoff)")
                continue
            except NVMLError as exc:
                self._problems.append(f"{board.device}: skipped: {nvml_error_text(exc)}")
                continue
            except _NoEnergy:
                self._problems.append(f"{board.device}: neither an energy counter nor power readings are supported")
                continue
            if got:
                usable += 1
                readings.extend(got)
                not_visible += sum(1 for r in got for p in r.processes if not p.visible)
        self._counters["gpu_processes_not_visible"] = float(not_visible)
        if self._pids_foreign:
            self._problems.append("daemon is not in the host PID namespace: GPU processes cannot be matched; "
                                  "run with --pid=host")
        # Before giving up on the tick: a probe may have asked for a re-init (a GPU lost
        # at enumeration is back under its real UUID), which must run with no GPU usable.
        self._maybe_reinit_after(now_mono_s)
        if self._boards and not usable:
            raise SourceError("no GPU could be read: " + "; ".join(self._problems))
        return readings

    def problems(self) -> list[str]:
        return list(self._problems)

    def notes(self) -> list[str]:
        """Informational facts about how GPUs are measured (not problems): features
        NVML does not support, MIG. Stable across ticks."""
        return list(self._notes.values())

    def counters(self) -> dict[str, float]:
        """Self-metrics (``wattprint_<key>``): NVML calls made, samples discarded,
        processes not visible here, side-query failures, re-inits, power samples."""
        out = dict(self._counters)
        out["gpu_nvml_calls_total"] = float(self._nvml.calls)
        out["gpu_power_samples_total"] = float(sum(s.integrator.samples_total for s in list(self._states.values())))
        return out

    @property
    def disabled_reason(self) -> str:
        """Non-empty while the source is quiet (no driver yet): the health detail."""
        if self._no_driver and self._quiet:
            return f"no NVIDIA driver ({self._init_error}): GPU energy not measured; checking again with backoff"
        return ""

    def close(self) -> None:
        self._sampler_stop.set()
        if self._sampler is not None:
            self._sampler.join(timeout=2.0)
        with self._gate:
            self._shutdown_locked()

    def _shutdown_locked(self) -> None:
        """nvmlShutdown if initialised (caller holds ``_gate``); handles of the old
        generation are dead from here on."""
        if not self._initialized:
            return
        self._initialized = False
        self._generation += 1
        try:
            self._raw.nvmlShutdown()
        except NVMLError as exc:
            log.debug("nvmlShutdown: %s", nvml_error_text(exc))

    # -- init, re-init, enumeration -------------------------------------------------

    @staticmethod
    def _default_wall_clock(nvml: Any) -> Callable[[], float]:
        """The wall clock utilisation timestamps are compared with: the simulator's own
        (it may run on a test's fake clock), else the system's."""
        fn = getattr(nvml, "wall_time_s", None)
        if callable(fn):
            return fn
        offset, sim_clock = getattr(nvml, "_epoch_offset_s", None), getattr(nvml, "_clock", None)
        if isinstance(offset, (int, float)) and callable(sim_clock):
            return lambda: offset + sim_clock()
        return time.time

    def _ensure_init(self, now: float) -> None:
        if self._initialized:
            return
        if not self._init_backoff.due(now):
            self._raise_init_failure()
        try:
            with self._gate:
                self._raw.nvmlInit()
                self._initialized = True
                self._generation += 1
        except NVMLError as exc:
            self._init_failed(now, exc)
            self._raise_init_failure()
        except OSError as exc:  # e.g. a broken libnvidia-ml.so
            self._init_failed(now, exc)
            self._raise_init_failure()
        if self._no_driver:
            log.info("NVML: the driver is there now: measuring GPUs")
        self._no_driver = False
        self._init_backoff.succeeded()
        self._init_error = ""
        try:
            self._enumerate(now)
        except NVMLError as exc:
            raise SourceError(f"NVML: cannot count GPUs: {nvml_error_text(exc)}") from None

    def _init_failed(self, now: float, exc: BaseException) -> None:
        self._init_backoff.failed(now, nvml_error_text(exc))
        self._init_error = nvml_error_text(exc)
        self._no_driver = _code(exc) in _NO_DRIVER_CODES

    def _raise_init_failure(self) -> None:
        if self._no_driver and self._quiet:
            raise SourceDisabled(self.disabled_reason)
        raise SourceError(f"NVML init failed: {self._init_error} (retrying with backoff)")

    def _enumerate(self, now: float) -> None:
        """Read the GPU set: handles, UUIDs, names, MIG layouts (cached until the next
        re-init). Raises NVMLError only when the GPUs cannot be counted."""
        self._boards = []
        self._last_reinit_s = now
        # NVML's PIDs cannot be matched here: host PIDs seen from another PID namespace.
        # (Real pynvml always reports host PIDs; the simulator says, once initialised.)
        host_pids = bool(getattr(self._raw, "reports_host_pids", True))
        self._pids_foreign = host_pids and self._pid_namespace_initial is False
        self._driver_gpus_seen = self._driver_gpu_count()
        count = int(self._nvml.call("nvmlDeviceGetCount"))
        for index in range(count):
            try:
                handle = self._nvml.call("nvmlDeviceGetHandleByIndex", index)
                uuid = str(self._nvml.call("nvmlDeviceGetUUID", handle))
            except NVMLError as exc:
                board = _Board(index=index, handle=None, uuid=f"index-{index}", name="?")
                self._boards.append(board)
                st = self._state(board)
                self._mark_lost(board, st, nvml_error_text(exc), now)
                continue
            try:
                name = str(self._nvml.call("nvmlDeviceGetName", handle))
            except NVMLError:
                name = "NVIDIA GPU"
            board = _Board(index=index, handle=handle, uuid=uuid, name=name, layout_read_s=now)
            self._read_mig_layout(board)
            self._boards.append(board)
            st = self._states.get(uuid)
            if st is not None and st.lost is not None:
                st.lost = None  # found again by this enumeration
        current = {f"{b.device}:{b.uuid}:" for b in self._boards}
        self._notes = {k: v for k, v in self._notes.items() if any(k.startswith(c) for c in current)}
        with self._gate:
            self._power_targets = {}

    def _read_mig_layout(self, board: _Board) -> None:
        board.mig, board.instances, board.layout_error = False, {}, ""
        try:
            mode = self._nvml.call("nvmlDeviceGetMigMode", board.handle)
        except NVMLError as exc:
            if _code(exc) not in _UNSUPPORTED_CODES:
                log.debug("%s: MIG mode: %s", board.device, nvml_error_text(exc))
            return
        try:
            enabled = int(mode[0]) == _MIG_ENABLE
        except (TypeError, ValueError, IndexError):
            enabled = False
        if not enabled:
            return
        board.mig = True
        try:
            total = int(self._nvml.call("nvmlDeviceGetMaxMigDeviceCount", board.handle))
            for slot in range(total):
                try:
                    mh = self._nvml.call("nvmlDeviceGetMigDeviceHandleByIndex", board.handle, slot)
                except NVMLError as exc:
                    if _code(exc) in (ERR_NOT_FOUND, ERR_INVALID_ARGUMENT):
                        continue  # an empty slot
                    raise
                gi = int(self._nvml.call("nvmlDeviceGetGpuInstanceId", mh))
                if gi in board.instances:
                    board.instances[gi].handles.append(mh)
                    continue
                attrs = self._attributes(mh)
                slices = int(getattr(attrs, "gpuInstanceSliceCount", 0) or 0) if attrs is not None else 0
                mem_mb = getattr(attrs, "memorySizeMB", None) if attrs is not None else None
                try:
                    name = str(self._nvml.call("nvmlDeviceGetName", mh))
                except NVMLError:
                    name = f"{board.name} MIG GI {gi}"
                board.instances[gi] = _Instance(gi_id=gi, handles=[mh], slices=max(slices, 0), name=name,
                                                memory_total_bytes=None if mem_mb is None else int(mem_mb) << 20)
            board.mig_total_slices = max(total, sum(i.slices for i in board.instances.values()))
        except NVMLError as exc:
            board.instances = {}
            board.layout_error = nvml_error_text(exc)
        if board.layout_error:
            return
        if any(i.slices <= 0 for i in board.instances.values()):
            board.layout_error = "MIG instance sizes not reported"
        self._note(f"{board.device}:{board.uuid}:mig",
                   f"{board.device} ({board.name}): MIG enabled, {len(board.instances)} GPU instance(s): the board's "
                   "energy is split over them by size (compute slices); the rest is unattributed")

    def _refresh_layout(self, board: _Board, now: float, why: str) -> None:
        """Re-read the MIG layout (instances come and go without a re-init), at most
        every ``MIG_LAYOUT_REFRESH_S``; takes effect from the next read."""
        if board.layout_read_s is not None and now - board.layout_read_s < MIG_LAYOUT_REFRESH_S:
            return
        log.debug("%s: re-reading the MIG layout: %s", board.device, why)
        try:
            self._read_mig_layout(board)
        finally:
            board.layout_read_s = now

    def _attributes(self, handle: Any) -> Any | None:
        for fn in ("nvmlDeviceGetAttributes_v2", "nvmlDeviceGetAttributes"):
            try:
                return self._nvml.call(fn, handle)
            except NVMLError as exc:
                if _code(exc) in _UNSUPPORTED_CODES:
                    continue
                raise
            except _MISMATCH:
                continue
        return None

    def _driver_gpu_count(self) -> int | None:
        if not self._driver_gpus_dir:
            return None
        try:
            return len(os.listdir(self._driver_gpus_dir))
        except OSError:
            return None

    def _maybe_reinit_after(self, now: float) -> None:
        """At the end of a read: re-initialise NVML when it is due or asked for."""
        reason = self._reinit_wanted
        seen = self._driver_gpu_count()
        if not reason and seen is not None and seen != self._driver_gpus_seen:
            reason = f"the driver lists {seen} GPU(s) now"
        if not reason and self._reinit_interval_s > 0 and self._last_reinit_s is not None \
                and now - self._last_reinit_s >= self._reinit_interval_s:
            reason = "periodic"
        if reason:
            self._reinit(now, reason, shutdown=True)

    def _reinit(self, now: float, reason: str, *, shutdown: bool) -> None:
        """Shut NVML down, initialise it again and re-enumerate (state stays by UUID)."""
        self._reinit_wanted = ""
        before = [(b.index, b.uuid) for b in self._boards]
        with self._gate:
            self._counters["gpu_nvml_reinits_total"] += 1
            if shutdown and self._initialized:
                self._shutdown_locked()
                try:
                    self._raw.nvmlInit()
                except (NVMLError, OSError) as exc:
                    self._init_failed(now, exc)
                    self._problems.append(f"NVML re-init failed: {self._init_error} (retrying with backoff)")
                    return
                self._initialized = True
                self._generation += 1
            try:
                self._enumerate(now)
            except NVMLError as exc:
                self._problems.append(f"NVML: cannot count GPUs after re-init: {nvml_error_text(exc)}")
                return
        after = [(b.index, b.uuid) for b in self._boards]
        if after != before:
            log.info("NVML re-initialised (%s): %d GPU(s) now: %s", reason, len(after),
                     ", ".join(f"{b.device} {b.name}" for b in self._boards) or "none")

    # -- lost GPUs ------------------------------------------------------------------

    def _mark_lost(self, board: _Board, st: _GpuState, text: str, now: float) -> None:
        if st.lost is None:
            st.lost = _Backoff(self._lost_retry_s, LOST_RETRY_MAX_S, LOST_RETRY_FACTOR)
            log.warning("%s (%s) lost: %s: not read until a probe finds it back", board.device, board.name, text)
        st.lost.failed(now, text)
        st.lost_error = text
        st.lost_since_read = True
        with self._gate:
            self._power_targets.pop(st.uuid, None)
            st.integrator.restart()  # no trapezoid over the lost gap

    def _maybe_probe(self, board: _Board, st: _GpuState, now: float) -> None:
        assert st.lost is not None
        if not st.lost.due(now):
            return
        with self._probe_lock:
            if self._probes.get(st.uuid):
                return  # one probe at a time per GPU (it may hang)
            self._probes[st.uuid] = True
        gen, index = self._generation, board.index
        st.lost.failed(now, st.lost_error)  # the next probe is due after the next delay

        def probe() -> None:
            result: tuple[int, Any, str] | None
            try:
                handle = self._nvml.call("nvmlDeviceGetHandleByIndex", index)
                uuid = str(self._nvml.call("nvmlDeviceGetUUID", handle))
                self._nvml.call("nvmlDeviceGetPowerUsage", handle)  # answers at all?
                result = (gen, handle, uuid)
            except Exception as exc:  # still lost (any error), or worse
                log.debug("%s: probe: %s", board.device, nvml_error_text(exc))
                result = None
            with self._probe_lock:
                self._probes[st.uuid] = False
                if result is not None:
                    self._probe_results[st.uuid] = result

        self._run_probe(probe)

    @staticmethod
    def _thread_probe(fn: Callable[[], None]) -> None:
        threading.Thread(target=fn, name="wattprint-gpu-probe", daemon=True).start()

    def _collect_probes(self) -> None:
        with self._probe_lock:
            results, self._probe_results = self._probe_results, {}
        for uuid, found in results.items():
            if found is None:
                continue
            gen, handle, new_uuid = found
            for board in self._boards:
                st = self._states.get(board.uuid)
                if board.uuid != uuid or st is None or st.lost is None:
                    continue
                if gen != self._generation:
                    continue  # NVML was re-initialised meanwhile: the handle is stale
                if new_uuid != board.uuid:
                    self._reinit_wanted = f"{board.device} came back as another GPU"
                    continue
                board.handle = handle
                st.lost = None
                log.info("%s (%s) is back", board.device, board.name)
                self._read_mig_layout(board)

    # -- per GPU --------------------------------------------------------------------

    def _state(self, board: _Board) -> _GpuState:
        st = self._states.get(board.uuid)
        if st is None:
            st = self._states[board.uuid] = _GpuState(uuid=board.uuid)
        return st

    def _note(self, key: str, text: str) -> None:
        if key not in self._notes:
            self._notes[key] = text
            log.info("%s", text)

    def _feature(self, st: _GpuState, key: str) -> _Feature:
        feat = st.features.get(key)
        if feat is None:
            feat = st.features[key] = _Feature()
        return feat

    def _side(self, board: _Board, st: _GpuState, key: str, what: str, fn: Callable[[], Any],
              now: float, *, report: bool = True) -> Any:
        """A query other than the energy: its value, ``_OFF`` (not supported here,
        for good) or ``_FAILED`` (failed or waiting to be retried; the problem is
        listed unless ``report`` is False). GPU_IS_LOST raises ``_Lost``."""
        feat = self._feature(st, key)
        if not feat.supported:
            return _OFF
        if feat.backoff is not None and not feat.backoff.due(now):
            if report:
                self._problems.append(feat.problem)
            return _FAILED
        try:
            value = fn()
        except _MISMATCH as exc:
            return self._unsupported(board, feat, key, what, type(exc).__name__)
        except NVMLError as exc:
            code = _code(exc)
            if code in _UNSUPPORTED_CODES:
                return self._unsupported(board, feat, key, what, type(exc).__name__)
            if code == ERR_GPU_IS_LOST:
                raise _Lost(exc) from None
            if feat.backoff is None:
                feat.backoff = _Backoff(self._retry_s, self._retry_max_s)
            feat.backoff.failed(now, nvml_error_text(exc))
            feat.problem = (f"{board.device}: {what} failed: {nvml_error_text(exc)} "
                            f"(retrying with backoff; energy still measured)")
            self._counters["gpu_feature_failures_total"] += 1
            if report:
                self._problems.append(feat.problem)
            return _FAILED
        if feat.backoff is not None and feat.backoff.failing:
            log.info("%s: %s works again", board.device, what)
            feat.backoff.succeeded()
            feat.problem = ""
        return value

    def _unsupported(self, board: _Board, feat: _Feature, key: str, what: str, why: str) -> Any:
        feat.supported = False
        self._note(f"{board.device}:{board.uuid}:{key}",
                   f"{board.device} ({board.name}): {what} not supported ({why}): {_consequence(key)}")
        return _OFF

    def _read_board(self, board: _Board, st: _GpuState, now: float, wall_us: int) -> list[DeviceReading]:
        dt = 0.0 if st.last_read_s is None else max(now - st.last_read_s, 0.0)
        energy_j, source, power_w = self._energy(board, st, now, dt)  # raises: nothing booked
        st.last_read_s = now
        st.lost_since_read = False
        unplaced, st.energy_unplaced = st.energy_unplaced, False
        if source == "counter" and dt > 0 and not unplaced:
            st.last_avg_power_w = energy_j / dt
        elif power_w is not None:
            st.last_avg_power_w = power_w
        if power_w is None:
            power_w = energy_j / dt if dt > 0 else (st.last_avg_power_w or 0.0)

        mem: Any = _FAILED
        if unplaced:  # the whole board (MIG instances too): nobody's, and no idle-floor sample
            return [_reading(board, energy_j, power_w, source, dt, (), mem, attributable=False)]
        try:
            mem = self._side(board, st, "memory", "memory info",
                             lambda: self._nvml.call("nvmlDeviceGetMemoryInfo", board.handle), now)
            if board.mig:
                return self._mig_readings(board, st, now, energy_j, source, power_w, dt, mem)
            procs, complete = self._processes(board, st, board.handle, "", now)
            uses = self._uses(board, st, procs, now, wall_us)
        except _Lost as lost:
            # Lost after its energy was read: book the energy, skip the GPU from now on.
            self._mark_lost(board, st, lost.text, now)
            self._problems.append(f"{board.device}: skipped from now on: {lost.text} (retrying with backoff)")
            return [_reading(board, energy_j, power_w, source, dt, (), mem, attributable=False)]
        except Exception as exc:  # not NVML's (a malformed entry, a pynvml bug): the energy is read, book it
            log.debug("%s: reading processes failed", board.device, exc_info=True)
            self._problems.append(f"{board.device}: processes not read ({nvml_error_text(exc)[:200]}): "
                                  "its energy is booked unattributed")
            return [_reading(board, energy_j, power_w, source, dt, (), mem, attributable=False)]
        return [_reading(board, energy_j, power_w, source, dt, uses, mem, attributable=complete)]

    def _energy(self, board: _Board, st: _GpuState, now: float,
                dt: float) -> tuple[float, EnergySource, float | None]:
        """(joules since the last read, source, average or sampled power or None).
        Raises NVMLError (GPU skipped, baseline kept) or _Lost."""
        counter = self._feature(st, "energy_counter")
        if counter.supported:
            try:
                mj = int(self._nvml.call("nvmlDeviceGetTotalEnergyConsumption", board.handle))
            except NVMLError as exc:
                code = _code(exc)
                if code == ERR_GPU_IS_LOST:
                    raise _Lost(exc) from None
                if code not in _UNSUPPORTED_CODES:
                    raise
                self._unsupported(board, counter, "energy_counter", "energy counter", type(exc).__name__)
                st.counter = CounterDiff(max_value=None)
            else:
                first = st.counter.last is None
                delta = st.counter.update(mj)
                if delta is not None:
                    return delta / 1000.0, "counter", None
                if first:  # the baseline; one power sample so the first reading shows a power
                    return 0.0, "counter", self._power_w_quiet(board, st)
                if st.lost_since_read:
                    # Back from a loss with the counter restarted (a GPU reset): the
                    # value is the energy since the restart; before it, nothing was
                    # measured. Never the last power x the whole gap (phantom energy
                    # charged to whoever runs on the GPU now).
                    self._problems.append(f"{board.device}: energy counter restarted while the GPU was lost: "
                                          "the energy of the gap before the restart is unknown (not booked); "
                                          "the energy since the restart is booked unattributed")
                    st.energy_unplaced = True  # when in the gap it was used, and by whom, is unknown
                    return mj / 1000.0, "counter", None
                self._problems.append(f"{board.device}: energy counter went backwards (driver reload?): "
                                      "this interval uses the previous average power")
                fallback_w = st.last_avg_power_w
                if fallback_w is None:
                    fallback_w = self._power_w_quiet(board, st)
                return (fallback_w or 0.0) * dt, "power", fallback_w
        # No energy counter: sampled power (here and on the sampler thread), integrated.
        watts = self._power_w(board, st)
        if watts is None and not self._feature(st, "power").supported:
            raise _NoEnergy()
        if watts is not None:
            st.integrator.add(now, watts)
        self._want_sampler(board, st)
        energy_j, span, last_w = st.integrator.take()
        avg_w = energy_j / span if span > 0 else last_w
        return energy_j, "power", avg_w

    def _power_w_quiet(self, board: _Board, st: _GpuState) -> float | None:
        try:
            return self._power_w(board, st)
        except (NVMLError, _Lost):
            return None

    def _power_w(self, board: _Board, st: _GpuState) -> float | None:
        feat = self._feature(st, "power")
        if not feat.supported:
            return None
        try:
            return float(self._nvml.call("nvmlDeviceGetPowerUsage", board.handle)) / 1000.0
        except NVMLError as exc:
            code = _code(exc)
            if code == ERR_GPU_IS_LOST:
                raise _Lost(exc) from None
            if code in _UNSUPPORTED_CODES:
                self._unsupported(board, feat, "power", "power usage", type(exc).__name__)
                return None
            raise

    # -- power sampler ------------------------------------------------------------

    def _want_sampler(self, board: _Board, st: _GpuState) -> None:
        if not self._feature(st, "power").supported:
            return
        with self._gate:
            self._power_targets[st.uuid] = (board.handle, st.integrator)
        if self._sampler is None and self._power_sample_hz > 0:
            self._sampler = threading.Thread(target=self._sample_loop, name="wattprint-gpu-power", daemon=True)
            self._sampler.start()
            log.info("sampling GPU power at %g Hz for boards without an energy counter", self._power_sample_hz)

    def sample_power(self) -> int:
        """One round of the power sampler: sample each board without an energy counter
        and feed its integrator. Returns the number of samples taken."""
        taken = 0
        with self._gate:
            if not self._initialized:
                return 0
            for handle, integ in list(self._power_targets.values()):
                try:
                    watts = float(self._nvml.call("nvmlDeviceGetPowerUsage", handle)) / 1000.0
                except NVMLError:
                    continue  # the tick's own read reports it
                integ.add(self._clock(), watts)
                taken += 1
        return taken

    def _sample_loop(self) -> None:
        period = 1.0 / self._power_sample_hz
        next_at = self._clock()
        while not self._sampler_stop.is_set():
            next_at += period
            delay = next_at - self._clock()
            if delay < 0:
                next_at = self._clock()  # fell behind: do not burst
                delay = 0.0
            if self._sampler_stop.wait(delay):
                return
            try:
                self.sample_power()
            except Exception:  # never let the sampler die; the tick's read reports errors
                log.debug("power sampler", exc_info=True)

    # -- processes and utilisation -------------------------------------------------

    def _processes(self, board: _Board, st: _GpuState, handle: Any, prefix: str, now: float,
                   *, report: bool = True) -> tuple[dict[tuple[int, int], _Proc], bool]:
        """The processes NVML lists for ``handle`` (keyed by (gi, pid)) and whether
        the lists are complete (False: a list failed, or this pynvml scrambles them)."""
        procs: dict[tuple[int, int], _Proc] = {}
        if not self._struct_ok:
            self._problems.append("nvidia-ml-py's process struct does not match the driver (12.535.77): "
                                  "GPU processes not read; install nvidia-ml-py >= 12.550.52")
            return procs, False
        complete = True
        for kind, base, what in (("compute", "nvmlDeviceGetComputeRunningProcesses", "compute process list"),
                                 ("graphics", "nvmlDeviceGetGraphicsRunningProcesses", "graphics process list"),
                                 ("mps", "nvmlDeviceGetMPSComputeRunningProcesses", "MPS process list")):
            got = self._side(board, st, f"{prefix}{kind}_procs", f"{prefix}{what}",
                             lambda base=base: self._process_list(base, handle), now, report=report)
            if got is _FAILED:
                complete = False
                continue
            if got is _OFF:
                continue
            for p in got or ():
                pid = int(getattr(p, "pid", 0))
                gi = getattr(p, "gpuInstanceId", NO_INSTANCE)
                gi = NO_INSTANCE if gi is None else int(gi)
                used = getattr(p, "usedGpuMemory", None)
                used = None if used is None or int(used) == _NOT_AVAILABLE_U64 else int(used)
                entry = procs.get((gi, pid))
                if entry is None:
                    procs[(gi, pid)] = _Proc(pid=pid, used=used, kinds={kind}, gi=gi)
                else:
                    entry.kinds.add(kind)
                    if used is not None:
                        entry.used = used if entry.used is None else max(entry.used, used)
        return procs, complete

    def _process_list(self, base: str, handle: Any) -> list[Any]:
        """``base(handle)``, falling back to ``base_v2`` on drivers older than the
        pynvml (FUNCTION_NOT_FOUND / NVMLLibraryMismatchError); remembers which works."""
        names = [self._proc_fn[base]] if base in self._proc_fn else [base, f"{base}_v2"]
        last: BaseException | None = None
        for name in names:
            try:
                result = list(self._nvml.call(name, handle))  # a name pynvml lacks: FUNCTION_NOT_FOUND
            except _MISMATCH as exc:
                last = exc
                continue
            except NVMLError as exc:
                if _code(exc) == ERR_FUNCTION_NOT_FOUND:
                    last = exc
                    continue
                raise
            self._proc_fn[base] = name
            return result
        if last is not None and not isinstance(last, NVMLError):
            raise last
        raise NVMLError(ERR_FUNCTION_NOT_FOUND)

    def _visible(self, pid: int) -> bool:
        if self._pids_foreign or pid in (0, 0xFFFFFFFF):
            return False
        return self._pid_exists(pid)

    def _count_invisible(self, pid: int) -> None:
        if pid in self._invisible_seen:
            return
        self._invisible_seen[pid] = None
        self._counters["gpu_pids_not_visible_total"] += 1
        if len(self._invisible_seen) > 4096:
            self._invisible_seen.pop(next(iter(self._invisible_seen)))

    def _uses(self, board: _Board, st: _GpuState, procs: dict[tuple[int, int], _Proc], now: float,
              wall_us: int, *, util: bool = True) -> list[GpuProcessUse]:
        by_pid: dict[int, _Proc] = {}
        for p in procs.values():  # without MIG, gi is the same for all
            e = by_pid.get(p.pid)
            if e is None:
                by_pid[p.pid] = _Proc(pid=p.pid, used=p.used, kinds=set(p.kinds), gi=p.gi)
            else:
                e.kinds |= p.kinds
                if p.used is not None:
                    e.used = p.used if e.used is None else max(e.used, p.used)
        samples = self._utilisation(board, st, set(by_pid), now, wall_us) if util else None
        uses: list[GpuProcessUse] = []
        for pid in sorted(by_pid):
            p = by_pid[pid]
            visible = self._visible(pid)
            if not visible:
                self._count_invisible(pid)
            sm = enc = dec = None
            if samples is not None:
                sm, enc, dec = samples.get(pid, (0.0, 0.0, 0.0))
            uses.append(GpuProcessUse(pid=pid, used_memory_bytes=p.used, sm_util_pct=sm, enc_util_pct=enc,
                                      dec_util_pct=dec, visible=visible, kind=_kind(p.kinds)))
        return uses

    def _utilisation(self, board: _Board, st: _GpuState, pids: set[int], now: float,
                     wall_us: int) -> dict[int, tuple[float, float, float]] | None:
        """pid -> (sm, enc, dec) mean of the valid samples in the window; None when not
        asked (fewer than two processes), unsupported or failing."""
        tolerance_us = int(FUTURE_TOLERANCE_S * 1e6)
        if st.last_util_ts_us > wall_us + tolerance_us:
            st.last_util_ts_us = wall_us  # the wall clock went back: restart the window at now
        if len(pids) < 2:
            # Not needed (a sole process gets it all); the window starts at now, so a
            # later query does not read samples from before it.
            st.last_util_ts_us = max(st.last_util_ts_us, wall_us)
            return None
        last_seen = st.last_util_ts_us

        def query() -> list[Any]:
            try:
                return list(self._nvml.call("nvmlDeviceGetProcessUtilization", board.handle, last_seen))
            except NVMLError as exc:
                if _code(exc) == ERR_NOT_FOUND:
                    return []  # nothing newer: every process idle
                raise

        got = self._side(board, st, "utilisation", "process utilisation", query, now)
        if got is _OFF or got is _FAILED:
            return None
        acc: dict[int, list[tuple[int, int, int]]] = {}
        newest = last_seen
        discarded = 0
        for s in got:
            try:
                pid, ts = int(s.pid), int(s.timeStamp)
                sm, enc, dec = int(s.smUtil), int(getattr(s, "encUtil", 0)), int(getattr(s, "decUtil", 0))
            except (AttributeError, TypeError, ValueError):
                discarded += 1
                continue
            if pid == 0 and ts == 0:
                continue  # padding: the driver fills the buffer up to its size
            if (pid not in pids or ts <= last_seen or ts > wall_us + tolerance_us
                    or not 0 <= sm <= 100 or not 0 <= enc <= 100 or not 0 <= dec <= 100):
                discarded += 1
                continue
            acc.setdefault(pid, []).append((sm, enc, dec))
            newest = max(newest, ts)
        st.last_util_ts_us = newest  # never beyond now + tolerance: later samples were discarded
        self._counters["gpu_util_samples_discarded_total"] += discarded
        out: dict[int, tuple[float, float, float]] = {}
        for pid, values in acc.items():
            n = len(values)
            out[pid] = (sum(v[0] for v in values) / n, sum(v[1] for v in values) / n, sum(v[2] for v in values) / n)
        return out

    # -- MIG ------------------------------------------------------------------------

    def _mig_readings(self, board: _Board, st: _GpuState, now: float, energy_j: float, source: EnergySource,
                      power_w: float, dt: float, mem: Any) -> list[DeviceReading]:
        """One reading per GPU instance (energy by size) plus the board's remainder.
        Works on the layout as it was at the start (a refresh applies from the next read)."""
        instances, total_slices = dict(board.instances), board.mig_total_slices
        if board.layout_error or not instances:
            why = board.layout_error or "no GPU instances"
            if board.layout_error:
                self._problems.append(f"{board.device}: MIG layout unknown ({why}): its energy is booked unattributed")
            procs, _ = self._processes(board, st, board.handle, "", now)
            uses = self._uses(board, st, procs, now, 0, util=False)
            return [_reading(board, energy_j, power_w, source, dt, uses, mem, attributable=False)]

        # Processes: the parent's lists carry gpuInstanceId; without privileges for
        # them, read each MIG device's own lists.
        procs, complete = self._processes(board, st, board.handle, "", now, report=False)
        per_gi: dict[int, dict[tuple[int, int], _Proc]] = {gi: {} for gi in instances}
        gi_complete: dict[int, bool] = {gi: complete for gi in instances}
        stray: dict[tuple[int, int], _Proc] = {}
        if complete:
            for key, p in procs.items():
                if p.gi in per_gi:
                    per_gi[p.gi][key] = p
                else:
                    stray[key] = p
            if stray:
                self._refresh_layout(board, now, "a process in an unknown MIG instance")
        else:
            self._note(f"{board.device}:{board.uuid}:mig-parent-procs",
                       f"{board.device} ({board.name}): the MIG parent's process lists failed "
                       f"(NVML needs privileges for them): reading each MIG device's lists instead")
            for gi, inst in instances.items():
                ok_all = True
                for mh in inst.handles:
                    got, ok = self._processes(board, st, mh, f"gi{gi}:", now, report=False)
                    ok_all = ok_all and ok
                    for (_, pid), p in got.items():
                        p.gi = gi
                        per_gi[gi][(gi, pid)] = p
                gi_complete[gi] = ok_all
            failed = [gi for gi, ok in gi_complete.items() if not ok]
            if failed:
                self._refresh_layout(board, now, "a MIG device's process list failed")
                parent_problem = self._feature(st, "compute_procs").problem or "MIG process lists failed"
                self._problems.append(f"{parent_problem}; MIG device lists failed too for GPU instance(s) "
                                      f"{', '.join(str(g) for g in sorted(failed))}: their energy is booked "
                                      "unattributed")

        total = float(total_slices)
        readings: list[DeviceReading] = []
        shares = {gi: instances[gi].slices / total if total > 0 else 0.0 for gi in instances}
        parts = {gi: energy_j * share for gi, share in shares.items()}
        rest = energy_j - sum(parts.values())
        if rest < 0.0 and parts:  # float rounding (all slices assigned): never a negative remainder
            biggest = max(parts, key=lambda g: parts[g])
            parts[biggest] = max(0.0, parts[biggest] + rest)
            rest = max(0.0, energy_j - sum(parts.values()))
        for gi in sorted(instances):
            inst = instances[gi]
            share = shares[gi]
            e = parts[gi]
            uses = self._uses(board, st, per_gi[gi], now, 0, util=False)
            used = [u.used_memory_bytes for u in uses]
            readings.append(DeviceReading(
                kind="gpu", device=f"{board.device}-mig{gi}", energy_j=e, power_w=power_w * share, source=source,
                interval_s=dt, processes=tuple(uses),
                memory_used_bytes=sum(used) if all(u is not None for u in used) else None,  # type: ignore[misc]
                memory_total_bytes=inst.memory_total_bytes, name=inst.name,
                attributable=gi_complete[gi], parent=board.device, uuid=_known_uuid(board), vendor="nvidia",
            ))
        stray_uses = self._uses(board, st, stray, now, 0, util=False)
        rest_w = power_w * (rest / energy_j) if energy_j > 0 else 0.0
        readings.append(_reading(board, rest, rest_w, source, dt, stray_uses, mem, attributable=False))
        return readings


def _known_uuid(board: _Board) -> str:
    """The board's NVML UUID for exporters; "" when it could not be read (``index-N``)."""
    return "" if board.uuid.startswith("index-") else board.uuid


def _reading(board: _Board, energy_j: float, power_w: float, source: EnergySource, dt: float,
             uses: Sequence[GpuProcessUse], mem: Any, *, attributable: bool) -> DeviceReading:
    """The reading of a whole board (or a MIG board's remainder)."""
    has_mem = mem is not _FAILED and mem is not _OFF and mem is not None
    return DeviceReading(
        kind="gpu", device=board.device, energy_j=energy_j, power_w=power_w, source=source, interval_s=dt,
        processes=tuple(uses),
        memory_used_bytes=int(mem.used) if has_mem else None,
        memory_total_bytes=int(mem.total) if has_mem else None,
        name=board.name, attributable=attributable, uuid=_known_uuid(board), vendor="nvidia",
    )


def _kind(kinds: set[str]) -> str:
    if "mps" in kinds:
        return "mps"
    if "compute" in kinds and "graphics" in kinds:
        return "compute+graphics"
    return "graphics" if "graphics" in kinds else "compute"


def _consequence(feature: str) -> str:
    base = feature.split(":")[-1]
    return {
        "energy_counter": "integrating sampled power",
        "power": "energy counter only",
        "memory": "no memory figures",
        "compute_procs": "compute processes not listed",
        "graphics_procs": "graphics processes not listed",
        "mps_procs": "MPS clients not listed",
        "utilisation": "no per-process utilisation",
    }.get(base, "not used")


def _probe(nvml: Any) -> tuple[int, str, str]:
    """Init NVML, count GPUs, read the driver version, shut down. Raises NVMLError."""
    nvml.nvmlInit()
    try:
        count = int(nvml.nvmlDeviceGetCount())
        try:
            driver = str(nvml.nvmlSystemGetDriverVersion())
        except NVMLError:
            driver = "unknown"
        names = []
        for i in range(count):
            try:
                names.append(str(nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(i))))
            except NVMLError as exc:
                names.append(f"? ({type(exc).__name__})")
        return count, driver, ", ".join(names)
    finally:
        try:
            nvml.nvmlShutdown()
        except NVMLError:
            pass


def _source_options(cfg: GpuConfig) -> dict[str, Any]:
    return {
        "retry_s": cfg.retry_s,
        "retry_max_s": cfg.retry_max_s,
        "reinit_interval_s": cfg.reinit_interval_s,
        "power_sample_hz": cfg.power_sample_hz,
    }


def open_gpu_source(cfg: GpuConfig) -> tuple[Source | None, str]:
    """The GPU source the config asks for, and one line for the log. Never raises for
    a missing GPU or driver.

    ``auto`` (and ``sim``, which stands for a machine's driver) keeps a quiet source
    when there is no driver or library yet: disabled, not degraded, retrying
    ``nvmlInit`` with backoff, so a driver loaded after the daemon started is found.
    ``nvml`` (asked for explicitly) without a driver is degraded."""
    backend = cfg.backend
    if backend == "none":
        return None, "GPU disabled by config"
    if backend == "sim":
        from .nvml_sim import SimulatedNvml

        return (NvmlGpuSource(SimulatedNvml(cfg.sim_file), quiet_without_driver=True, **_source_options(cfg)),
                f"GPU: simulated NVML driven by {cfg.sim_file}")
    if backend not in ("nvml", "auto"):
        return None, f"GPU disabled: unknown backend {backend!r}"
    quiet = backend == "auto"
    try:
        count, driver, names = _probe(pynvml)
    except (NVMLError, OSError) as exc:
        reason = nvml_error_text(exc)
        if quiet and _code(exc) in _NO_DRIVER_CODES:
            return (NvmlGpuSource(pynvml, quiet_without_driver=True, no_driver=reason, **_source_options(cfg)),
                    f"no NVML ({reason}): GPU energy not measured until a driver loads (checked with backoff)")
        if quiet:
            return None, f"no NVML ({reason}): GPU energy not measured"
        return (NvmlGpuSource(pynvml, **_source_options(cfg)),
                f"GPU: NVML init failed ({reason}): GPU source degraded, retrying with backoff")
    if count == 0 and quiet:
        return (NvmlGpuSource(pynvml, quiet_without_driver=True, **_source_options(cfg)),
                f"no GPUs found by NVML (driver {driver}): GPU energy not measured until one appears")
    return NvmlGpuSource(pynvml, **_source_options(cfg)), f"GPU: NVML driver {driver}, {count} GPU(s): {names}"
