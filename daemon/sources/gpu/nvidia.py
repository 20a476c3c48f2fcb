"""NVIDIA GPUs: the NVML boundary. Every NVML call the daemon's GPU source makes is
here (``NvidiaVendor``), and every ``NVMLError`` is mapped here, once, to a typed
``GpuError`` (as Zeus does); policy.py decides what each kind means.

nvidia-ml-py versions (floor in pyproject.toml: 12.550.52, the first release with the
right ``c_nvmlProcessInfo_t`` layout *and* the ``_v2`` process-list entry points for
drivers older than R510). Symbols are probed with ``getattr`` (as nvitop does): a
function or exception class this pynvml lacks turns that one feature off, never the
source. Process lists try the unversioned call, then ``_v2`` (on FUNCTION_NOT_FOUND or
``NVMLLibraryMismatchError``); the one that works is remembered. A pynvml whose
process struct carries the extra ``usedGpuCcProtectedMemory`` field (12.535.77, which
scrambles PIDs) is detected at start: process lists are then not used (problem named).

Energy: ``nvmlDeviceGetTotalEnergyConsumption`` (u64 millijoules, never wraps: going
back means a driver reload); boards without it (pre-Volta, some vGPU) integrate
``nvmlDeviceGetPowerUsage`` (mW). Processes: the compute, graphics and MPS-client lists
(``kind`` "compute", "graphics", "compute+graphics", "mps"). NVML returns host PIDs.

Utilisation (issue 12, items 3 and 9): ``nvmlDeviceGetProcessUtilization`` is called
only when two or more processes share a GPU (a sole process gets everything anyway).
A sample counts only when its PID is in the process lists, ``smUtil``, ``encUtil``
and ``decUtil`` are <= 100, and its timestamp is newer than the last one seen and not
beyond now + ``FUTURE_TOLERANCE_S`` (0.25 s). The window (``lastSeenTimeStamp``)
advances to the newest accepted sample, so never beyond that; a window found ahead of
the wall clock (the clock was stepped back) restarts at now. Everything else is
discarded and counted (``gpu_util_samples_discarded_total``). No sample for a listed
process: 0.

MIG (item 4): a MIG-enabled board is a partitioned board (vendor.py): its GPU instances
are the partitions, sized by compute slices out of ``nvmlDeviceGetMaxMigDeviceCount``
(7 on A100/H100). NVML has no per-instance activity without GPM (Hopper and newer,
extra calls per instance per tick, not used). Process lists on a MIG parent carry
``gpuInstanceId`` but need privileges: without them each MIG device handle's lists are
read instead. MIG processes have no utilisation (NVML does not support it on MIG).

Cost (item 9): per tick ``nvmlDeviceGetCount`` once, then per GPU the energy counter,
memory info, the compute, graphics and MPS lists (features NVML does not support drop
out), and utilisation only when two or more processes share it: at most 6 calls per GPU.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Mapping

import pynvml

from ...config import GpuConfig
from ..base import Source
from .policy import GpuSource, proc_pid_exists, source_options
from .vendor import (
    EnergyCount,
    GpuError,
    GpuErrorKind,
    MemoryInfo,
    Partition,
    PartitionLayout,
    ProcEntry,
    UtilResult,
    UtilWindow,
)

log = logging.getLogger("wattprint.gpu")

DRIVER_GPUS_DIR = "/proc/driver/nvidia/gpus"
NO_INSTANCE = 0xFFFFFFFF  # gpuInstanceId without MIG
FUTURE_TOLERANCE_S = 0.25  # utilisation samples stamped later than now + this are junk


def _const(name: str, default: int) -> int:
    return int(getattr(pynvml, name, default))


ERR_INVALID_ARGUMENT = _const("NVML_ERROR_INVALID_ARGUMENT", 2)
ERR_NOT_SUPPORTED = _const("NVML_ERROR_NOT_SUPPORTED", 3)
ERR_NO_PERMISSION = _const("NVML_ERROR_NO_PERMISSION", 4)
ERR_UNINITIALIZED = _const("NVML_ERROR_UNINITIALIZED", 1)
ERR_NOT_FOUND = _const("NVML_ERROR_NOT_FOUND", 6)
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
_PROCESS_FUNCTIONS = {
    "compute": "nvmlDeviceGetComputeRunningProcesses",
    "graphics": "nvmlDeviceGetGraphicsRunningProcesses",
    "mps": "nvmlDeviceGetMPSComputeRunningProcesses",
}
_STRUCT_PROBLEM = ("nvidia-ml-py's process struct does not match the driver (12.535.77): "
                   "GPU processes not read; install nvidia-ml-py >= 12.550.52")


def process_struct_ok(module: Any = pynvml) -> bool:
    """False when this pynvml's ``c_nvmlProcessInfo_t`` has fields the driver does not
    fill (nvidia-ml-py 12.535.77: ``usedGpuCcProtectedMemory``): its lists are scrambled."""
    struct = getattr(module, "c_nvmlProcessInfo_t", None)
    names = [f[0] for f in getattr(struct, "_fields_", [])]
    return names[:4] == ["pid", "usedGpuMemory", "gpuInstanceId", "computeInstanceId"] and len(names) == 4


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


def nvml_error(exc: BaseException) -> GpuError:
    """The one NVML error map: an exception from pynvml (or the simulator) as a
    vendor-neutral ``GpuError``."""
    text, why = nvml_error_text(exc), type(exc).__name__
    if _MISMATCH and isinstance(exc, _MISMATCH):
        return GpuError(GpuErrorKind.NOT_SUPPORTED, text, why)
    if isinstance(exc, NVMLError):
        code = _code(exc)
        kind = (GpuErrorKind.NOT_SUPPORTED if code in _UNSUPPORTED_CODES
                else GpuErrorKind.LOST if code == ERR_GPU_IS_LOST
                else GpuErrorKind.NO_DRIVER if code in _NO_DRIVER_CODES
                else GpuErrorKind.NO_PERMISSION if code == ERR_NO_PERMISSION
                else GpuErrorKind.UNINITIALIZED if code == ERR_UNINITIALIZED
                else GpuErrorKind.NOT_FOUND if code in (ERR_NOT_FOUND, ERR_INVALID_ARGUMENT)
                else GpuErrorKind.OTHER)
        return GpuError(kind, text, why)
    return GpuError(GpuErrorKind.OTHER, text, why)  # OSError: a broken libnvidia-ml.so


_MAPPED: tuple[type[BaseException], ...] = (NVMLError, *_MISMATCH)


class NvidiaVendor:
    """``GpuVendor`` over the ``pynvml`` module or a ``SimulatedNvml``; counts the
    ``nvml*`` calls made (init and shutdown excepted)."""

    vendor = "nvidia"
    health_name = "gpu"
    device_prefix = "gpu"
    partition_infix = "-mig"
    partition_word = "MIG"
    partition_key = "gi"
    library = "NVML"
    driver_name = "NVIDIA"
    counter_prefix = "gpu"
    library_key = "nvml"
    process_kinds = (("compute", "compute process list"), ("graphics", "graphics process list"),
                     ("mps", "MPS process list"))

    def __init__(self, nvml: Any, *, driver_gpus_dir: str | None = DRIVER_GPUS_DIR) -> None:
        self._nvml = nvml
        self._driver_gpus_dir = driver_gpus_dir
        self._lock = threading.Lock()
        self.calls = 0
        self._proc_fn: dict[str, str] = {}  # list function -> the pynvml function that works
        self._struct_ok = process_struct_ok()

    # -- calls ------------------------------------------------------------------------

    def _raw_call(self, name: str, *args: Any) -> Any:
        """``nvml.<name>(*args)``, counted; raises what pynvml raises."""
        fn = getattr(self._nvml, name, None)
        if fn is None:  # this pynvml does not have it: as if the driver did not
            raise NVMLError(ERR_FUNCTION_NOT_FOUND)
        with self._lock:
            self.calls += 1
        return fn(*args)

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return self._raw_call(name, *args)
        except _MAPPED as exc:
            raise nvml_error(exc) from None

    # -- GpuVendor --------------------------------------------------------------------

    def init(self) -> None:
        try:
            self._nvml.nvmlInit()
        except (*_MAPPED, OSError) as exc:
            raise nvml_error(exc) from None

    def shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except _MAPPED as exc:
            log.debug("nvmlShutdown: %s", nvml_error_text(exc))

    def count(self) -> int:
        return int(self._call("nvmlDeviceGetCount"))

    def board(self, index: int) -> tuple[Any, str]:
        handle = self._call("nvmlDeviceGetHandleByIndex", index)
        return handle, str(self._call("nvmlDeviceGetUUID", handle))

    def name(self, handle: Any) -> str:
        return str(self._call("nvmlDeviceGetName", handle))

    def energy(self, handle: Any) -> EnergyCount:
        return EnergyCount(int(self._call("nvmlDeviceGetTotalEnergyConsumption", handle)), 1000.0, None)

    def power_w(self, handle: Any) -> float:
        return float(self._call("nvmlDeviceGetPowerUsage", handle)) / 1000.0

    def memory(self, handle: Any) -> MemoryInfo:
        mem = self._call("nvmlDeviceGetMemoryInfo", handle)
        return MemoryInfo(used_bytes=int(mem.used), total_bytes=int(mem.total))

    def alive(self, index: int) -> tuple[Any, str]:
        handle, uuid = self.board(index)
        self._call("nvmlDeviceGetPowerUsage", handle)  # answers at all?
        return handle, uuid

    def processes_unusable(self) -> str:
        return "" if self._struct_ok else _STRUCT_PROBLEM

    def reports_host_pids(self) -> bool:
        # Real pynvml always reports host PIDs; the simulator says, once initialised.
        return bool(getattr(self._nvml, "reports_host_pids", True))

    def driver_gpu_count(self) -> int | None:
        if not self._driver_gpus_dir:
            return None
        try:
            return len(os.listdir(self._driver_gpus_dir))
        except OSError:
            return None

    def wall_clock(self) -> Callable[[], float]:
        """The wall clock utilisation timestamps are compared with: the simulator's own
        (it may run on a test's fake clock), else the system's."""
        fn = getattr(self._nvml, "wall_time_s", None)
        if callable(fn):
            return fn
        offset, sim_clock = getattr(self._nvml, "_epoch_offset_s", None), getattr(self._nvml, "_clock", None)
        if isinstance(offset, (int, float)) and callable(sim_clock):
            return lambda: offset + sim_clock()
        return time.time

    # -- processes and utilisation ----------------------------------------------------

    def processes(self, kind: str, handle: Any) -> list[ProcEntry]:
        out: list[ProcEntry] = []
        for p in self._process_list(_PROCESS_FUNCTIONS[kind], handle) or ():
            pid = int(getattr(p, "pid", 0))
            gi = getattr(p, "gpuInstanceId", NO_INSTANCE)
            gi = NO_INSTANCE if gi is None else int(gi)
            used = getattr(p, "usedGpuMemory", None)
            used = None if used is None or int(used) == _NOT_AVAILABLE_U64 else int(used)
            out.append(ProcEntry(pid=pid, used_bytes=used, partition=None if gi == NO_INSTANCE else gi))
        return out

    def _process_list(self, base: str, handle: Any) -> list[Any]:
        """``base(handle)``, falling back to ``base_v2`` on drivers older than the
        pynvml (FUNCTION_NOT_FOUND / NVMLLibraryMismatchError); remembers which works."""
        names = [self._proc_fn[base]] if base in self._proc_fn else [base, f"{base}_v2"]
        last: BaseException | None = None
        for name in names:
            try:
                result = list(self._raw_call(name, handle))  # a name pynvml lacks: FUNCTION_NOT_FOUND
            except _MISMATCH as exc:
                last = exc
                continue
            except NVMLError as exc:
                if _code(exc) == ERR_FUNCTION_NOT_FOUND:
                    last = exc
                    continue
                raise nvml_error(exc) from None
            self._proc_fn[base] = name
            return result
        raise nvml_error(last if last is not None else NVMLError(ERR_FUNCTION_NOT_FOUND))

    def util_wanted(self, window: UtilWindow, procs: Mapping[int, ProcEntry], wall_us: int) -> bool:
        tolerance_us = int(FUTURE_TOLERANCE_S * 1e6)
        if window.last_ts_us > wall_us + tolerance_us:
            window.last_ts_us = wall_us  # the wall clock went back: restart the window at now
        if len(procs) < 2:
            # Not needed (a sole process gets it all); the window starts at now, so a
            # later query does not read samples from before it.
            window.last_ts_us = max(window.last_ts_us, wall_us)
            return False
        return True

    def utilisation(self, handle: Any, procs: Mapping[int, ProcEntry], window: UtilWindow,
                    wall_us: int) -> UtilResult:
        tolerance_us = int(FUTURE_TOLERANCE_S * 1e6)
        last_seen = window.last_ts_us
        try:
            got = list(self._raw_call("nvmlDeviceGetProcessUtilization", handle, last_seen))
        except _MAPPED as exc:
            if _code(exc) == ERR_NOT_FOUND:
                got = []  # nothing newer: every process idle
            else:
                raise nvml_error(exc) from None
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
            if (pid not in procs or ts <= last_seen or ts > wall_us + tolerance_us
                    or not 0 <= sm <= 100 or not 0 <= enc <= 100 or not 0 <= dec <= 100):
                discarded += 1
                continue
            acc.setdefault(pid, []).append((sm, enc, dec))
            newest = max(newest, ts)
        window.last_ts_us = newest  # never beyond now + tolerance: later samples were discarded
        out: dict[int, tuple[float, float, float]] = {}
        for pid, values in acc.items():
            n = len(values)
            out[pid] = (sum(v[0] for v in values) / n, sum(v[1] for v in values) / n, sum(v[2] for v in values) / n)
        return UtilResult(per_pid=out, discarded=discarded)

    # -- MIG --------------------------------------------------------------------------

    def partitions(self, handle: Any, device: str, name: str) -> PartitionLayout | None:
        """The MIG layout of a board; None when MIG is off or not supported."""
        try:
            mode = self._raw_call("nvmlDeviceGetMigMode", handle)
        except _MAPPED as exc:
            if _code(exc) not in _UNSUPPORTED_CODES:
                log.debug("%s: MIG mode: %s", device, nvml_error_text(exc))
            return None
        try:
            enabled = int(mode[0]) == _MIG_ENABLE
        except (TypeError, ValueError, IndexError):
            enabled = False
        if not enabled:
            return None
        parts: dict[int, Partition] = {}
        try:
            total = int(self._call("nvmlDeviceGetMaxMigDeviceCount", handle))
            for slot in range(total):
                try:
                    mh = self._call("nvmlDeviceGetMigDeviceHandleByIndex", handle, slot)
                except GpuError as exc:
                    if exc.kind is GpuErrorKind.NOT_FOUND:
                        continue  # an empty slot (NOT_FOUND / INVALID_ARGUMENT)
                    raise
                gi = int(self._call("nvmlDeviceGetGpuInstanceId", mh))
                if gi in parts:
                    parts[gi].handles.append(mh)
                    continue
                attrs = self._attributes(mh)
                slices = int(getattr(attrs, "gpuInstanceSliceCount", 0) or 0) if attrs is not None else 0
                mem_mb = getattr(attrs, "memorySizeMB", None) if attrs is not None else None
                try:
                    part_name = self.name(mh)
                except GpuError:
                    part_name = f"{name} MIG GI {gi}"
                parts[gi] = Partition(part_id=gi, handles=[mh], slices=max(slices, 0), name=part_name,
                                      memory_total_bytes=None if mem_mb is None else int(mem_mb) << 20)
            total_slices = max(total, sum(p.slices for p in parts.values()))
        except GpuError as exc:
            return PartitionLayout(parts={}, total_slices=0, parent_lists=True, error=exc.text)
        error = "MIG instance sizes not reported" if any(p.slices <= 0 for p in parts.values()) else ""
        return PartitionLayout(
            parts=parts, total_slices=total_slices, parent_lists=True, error=error,
            note=(f"{device} ({name}): MIG enabled, {len(parts)} GPU instance(s): the board's energy is split "
                  "over them by size (compute slices); the rest is unattributed"))

    def _attributes(self, handle: Any) -> Any | None:
        for fn in ("nvmlDeviceGetAttributes_v2", "nvmlDeviceGetAttributes"):
            try:
                return self._call(fn, handle)
            except GpuError as exc:
                if exc.kind is GpuErrorKind.NOT_SUPPORTED:
                    continue  # not supported, not in this pynvml, or a library mismatch
                raise
        return None


class NvmlGpuSource(GpuSource):
    """The ``Source`` for NVIDIA GPUs (health name "gpu"). ``nvml`` is the ``pynvml``
    module or a ``SimulatedNvml``; keyword options as ``GpuSource``."""

    name = "gpu"

    def __init__(self, nvml: Any, pid_exists: Callable[[int], bool] = proc_pid_exists, *,
                 driver_gpus_dir: str | None = DRIVER_GPUS_DIR, **options: Any) -> None:
        super().__init__(NvidiaVendor(nvml, driver_gpus_dir=driver_gpus_dir), pid_exists, **options)


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


def open_nvidia_sim(cfg: GpuConfig) -> tuple[Source, str]:
    """The NVIDIA source over the simulated NVML (``[gpu] sim_file``)."""
    from ..nvml_sim import SimulatedNvml

    return (NvmlGpuSource(SimulatedNvml(cfg.sim_file), quiet_without_driver=True, **source_options(cfg)),
            f"GPU: simulated NVML driven by {cfg.sim_file}")


def open_nvidia(cfg: GpuConfig, *, quiet: bool) -> tuple[Source | None, str]:
    """The NVIDIA source over the real pynvml, and one line for the log. Never raises.

    ``quiet`` (backend ``auto``) keeps a quiet source when there is no driver or
    library yet: disabled, not degraded, retrying ``nvmlInit`` with backoff, so a
    driver loaded after the daemon started is found. Not quiet (``nvml``, asked for
    explicitly) without a driver is degraded."""
    try:
        count, driver, names = _probe(pynvml)
    except (NVMLError, OSError) as exc:
        reason = nvml_error_text(exc)
        if quiet and _code(exc) in _NO_DRIVER_CODES:
            return (NvmlGpuSource(pynvml, quiet_without_driver=True, no_driver=reason, **source_options(cfg)),
                    f"no NVML ({reason}): GPU energy not measured until a driver loads (checked with backoff)")
        if quiet:
            return None, f"no NVML ({reason}): GPU energy not measured"
        return (NvmlGpuSource(pynvml, **source_options(cfg)),
                f"GPU: NVML init failed ({reason}): GPU source degraded, retrying with backoff")
    if count == 0 and quiet:
        return (NvmlGpuSource(pynvml, quiet_without_driver=True, **source_options(cfg)),
                f"no GPUs found by NVML (driver {driver}): GPU energy not measured until one appears")
    return NvmlGpuSource(pynvml, **source_options(cfg)), f"GPU: NVML driver {driver}, {count} GPU(s): {names}"
