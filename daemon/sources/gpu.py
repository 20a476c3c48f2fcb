"""The GPU energy source: reads NVML once per tick and turns it into DeviceReadings.

Its one job is the NVML boundary: every NVML call the daemon makes is here, and every
``NVMLError`` is mapped here, once (as Zeus does):

- ``NOT_SUPPORTED`` (and ``FUNCTION_NOT_FOUND``, an older driver) turns that feature
  off for that GPU; it is remembered and not retried every tick.
- ``GPU_IS_LOST`` or any other error on one GPU skips that GPU for this tick and is
  listed in ``problems()``; the other GPUs are still returned. Its counter baseline is
  kept, so the next good read books the whole gap and nothing is lost.
- When nothing can be read at all, ``read()`` raises ``SourceError``.

Energy per GPU per read: the delta of ``nvmlDeviceGetTotalEnergyConsumption``
(millijoules, source "counter"); the first read sets the baseline (0 J). When the
counter goes backwards (driver reload) that interval uses sampled power (trapezoid of the
previous and current sample × dt, source "power"). Where there is no counter, sampled
power is integrated the same way (source "power").

Processes are the union of compute and graphics processes, without PID 0, 0xFFFFFFFF
and PIDs that have no ``/proc`` entry (scrambled PIDs, nvitop #75). SM utilisation is
the mean ``smUtil`` of each PID's samples since the last seen timestamp; no samples
(``NOT_FOUND``) means every process was idle (0); unsupported means ``None``. A process
with no sample while others have samples gets 0. Values are clamped to 0..100.
On a MIG-enabled GPU readings carry ``attributable=False`` (energy exists only for the
whole board; per-instance activity needs GPM or DCGM).

All NVML calls, ``nvmlInit`` included, happen on the thread that calls ``read()``;
``open_gpu_source`` probes NVML once at startup (init, count, shutdown) to decide.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pynvml

from ..config import GpuConfig
from ..model import DeviceReading, EnergySource, GpuProcessUse
from .base import CounterDiff, Source, SourceError

log = logging.getLogger("wattprint.gpu")

INIT_RETRY_S = 30.0
_BAD_PIDS = (0, 0xFFFFFFFF)
_NOT_AVAILABLE_U64 = pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value
# Errors that mean "this GPU or driver does not have that function": turn the feature off.
_UNSUPPORTED = (pynvml.NVMLError_NotSupported, pynvml.NVMLError_FunctionNotFound)


def proc_pid_exists(pid: int) -> bool:
    """True when ``/proc/<pid>`` exists (the daemon runs in the host PID namespace)."""
    return os.path.exists(f"/proc/{pid}")


def nvml_error_text(exc: BaseException) -> str:
    """``NVMLError_GpuIsLost: GPU is lost`` style text for logs and problems()."""
    if isinstance(exc, pynvml.NVMLError):
        try:
            text = str(exc)
        except Exception:  # str() may call into the library
            text = f"NVML error {getattr(exc, 'value', '?')}"
        return f"{type(exc).__name__}: {text}"
    return f"{type(exc).__name__}: {exc}"


@dataclass
class _GpuState:
    """What the collector remembers about one GPU between reads."""

    uuid: str
    name: str
    counter: CounterDiff = field(default_factory=lambda: CounterDiff(max_value=None))
    last_read_s: float | None = None  # now_mono_s of the last successful read
    last_power_w: float | None = None  # power sample of the last successful read
    last_util_ts_us: int = 0  # max timeStamp of utilisation samples seen so far
    # Features, on until NVML says NOT_SUPPORTED for this GPU.
    energy_counter: bool = True
    power: bool = True
    memory: bool = True
    compute_procs: bool = True
    graphics_procs: bool = True
    utilisation: bool = True
    mig_query: bool = True


@dataclass
class _Sample:
    """Raw values of one GPU from one read, before any state is touched."""

    energy_mj: int | None
    power_w: float | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    processes: dict[int, int | None]  # pid -> used memory bytes (None: not reported)
    mig: bool
    util: dict[int, list[int]] | None  # pid -> smUtil samples; {} = idle; None = unsupported
    util_max_ts_us: int | None


class NvmlGpuSource:
    """The ``Source`` for NVIDIA GPUs. ``nvml`` is the ``pynvml`` module or a
    ``SimulatedNvml``; ``nvmlInit`` is called on the first ``read()`` and retried at
    most every ``init_retry_s`` seconds while it fails."""

    name = "gpu"

    def __init__(
        self,
        nvml: Any,
        pid_exists: Callable[[int], bool] = proc_pid_exists,
        *,
        init_retry_s: float = INIT_RETRY_S,
    ):
        self._nvml = nvml
        self._pid_exists = pid_exists
        self._init_retry_s = init_retry_s
        self._initialized = False
        self._last_init_try_s: float | None = None
        self._init_error = ""
        self._gpus: dict[int, _GpuState] = {}
        self._problems: list[str] = []
        self._notes: dict[str, str] = {}  # key -> sentence, logged once

    # -- Source protocol --

    def read(self, now_mono_s: float) -> Sequence[DeviceReading]:
        self._problems = []
        self._ensure_init(now_mono_s)
        nvml = self._nvml
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as exc:
            raise SourceError(f"NVML: cannot count GPUs: {nvml_error_text(exc)}") from None
        for gone in [i for i in self._gpus if i >= count]:
            del self._gpus[gone]

        readings: list[DeviceReading] = []
        for index in range(count):
            device = f"gpu{index}"
            try:
                reading = self._read_gpu(index, device, now_mono_s)
            except pynvml.NVMLError as exc:
                self._problems.append(f"{device}: skipped: {nvml_error_text(exc)}")
                continue
            except pynvml.NVMLLibraryMismatchError as exc:
                self._problems.append(f"{device}: skipped: pynvml does not match the driver: {exc}")
                continue
            if reading is not None:
                readings.append(reading)
        if count > 0 and not readings:
            raise SourceError("no GPU could be read: " + "; ".join(self._problems))
        return readings

    def problems(self) -> list[str]:
        return list(self._problems)

    def notes(self) -> list[str]:
        """Informational facts about how GPUs are measured (not problems): features
        NVML does not support, MIG. Stable across ticks."""
        return list(self._notes.values())

    def close(self) -> None:
        if self._initialized:
            self._initialized = False
            try:
                self._nvml.nvmlShutdown()
            except pynvml.NVMLError as exc:
                log.debug("nvmlShutdown: %s", nvml_error_text(exc))

    # -- internals --

    def _ensure_init(self, now_mono_s: float) -> None:
        if self._initialized:
            return
        if self._last_init_try_s is not None and now_mono_s - self._last_init_try_s < self._init_retry_s:
            raise SourceError(f"NVML init failed: {self._init_error} (next retry within {self._init_retry_s:g} s)")
        self._last_init_try_s = now_mono_s
        try:
            self._nvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self._init_error = nvml_error_text(exc)
            raise SourceError(f"NVML init failed: {self._init_error}") from None
        self._initialized = True
        self._init_error = ""

    def _note(self, key: str, text: str) -> None:
        if key not in self._notes:
            self._notes[key] = text
            log.info("%s", text)

    def _read_gpu(self, index: int, device: str, now_mono_s: float) -> DeviceReading | None:
        nvml = self._nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        uuid = str(nvml.nvmlDeviceGetUUID(handle))
        st = self._gpus.get(index)
        if st is None or st.uuid != uuid:
            st = _GpuState(uuid=uuid, name=str(nvml.nvmlDeviceGetName(handle)))
            self._gpus[index] = st
            self._notes = {k: v for k, v in self._notes.items() if not k.startswith(f"{device}:")}

        sample = self._sample(st, device, handle)  # raises: nothing in st has changed
        if sample.energy_mj is None and sample.power_w is None:
            self._problems.append(f"{device}: neither an energy counter nor power readings are supported")
            return None
        return self._book(st, device, sample, now_mono_s)

    def _optional(self, st: _GpuState, device: str, feature: str, what: str, fn: Callable[[], Any]) -> Any | None:
        """``fn()``, or None when ``feature`` is off; NOT_SUPPORTED turns it off for
        good. Other NVML errors propagate (the GPU is skipped this tick)."""
        if not getattr(st, feature):
            return None
        try:
            return fn()
        except _UNSUPPORTED as exc:
            setattr(st, feature, False)
            self._note(f"{device}:{feature}",
                       f"{device} ({st.name}): {what} not supported ({type(exc).__name__}): {self._consequence(feature)}")
            return None

    @staticmethod
    def _consequence(feature: str) -> str:
        return {
            "energy_counter": "integrating sampled power",
            "power": "energy counter only",
            "memory": "no memory figures",
            "compute_procs": "compute processes not listed",
            "graphics_procs": "graphics processes not listed",
            "utilisation": "no per-process utilisation",
            "mig_query": "assuming MIG is off",
        }[feature]

    def _running_processes(self, handle: Any, kind: str) -> list[Any]:
        fn = getattr(self._nvml, f"nvmlDeviceGet{kind}RunningProcesses")
        try:
            return list(fn(handle))
        except pynvml.NVMLLibraryMismatchError:
            # pynvml newer than the driver: the _v3 entry point is missing; try _v2.
            v2 = getattr(self._nvml, f"nvmlDeviceGet{kind}RunningProcesses_v2", None)
            if v2 is None:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND) from None
            return list(v2(handle))

    def _sample(self, st: _GpuState, device: str, handle: Any) -> _Sample:
        nvml = self._nvml
        energy_mj = self._optional(st, device, "energy_counter", "energy counter",
                                   lambda: int(nvml.nvmlDeviceGetTotalEnergyConsumption(handle)))
        power_mw = self._optional(st, device, "power", "power usage",
                                  lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        mem = self._optional(st, device, "memory", "memory info", lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        mig_mode = self._optional(st, device, "mig_query", "MIG mode", lambda: nvml.nvmlDeviceGetMigMode(handle))
        mig = bool(mig_mode) and int(mig_mode[0]) == pynvml.NVML_DEVICE_MIG_ENABLE

        processes: dict[int, int | None] = {}
        for feature, kind in (("compute_procs", "Compute"), ("graphics_procs", "Graphics")):
            procs = self._optional(st, device, feature, f"{kind.lower()} process list",
                                   lambda kind=kind: self._running_processes(handle, kind))
            for p in procs or ():
                pid = int(p.pid)
                used = getattr(p, "usedGpuMemory", None)
                if used is not None:
                    used = int(used)
                    if used == _NOT_AVAILABLE_U64:
                        used = None
                if pid in processes:  # in both lists (C+G): keep the larger figure
                    prev = processes[pid]
                    used = prev if used is None else (used if prev is None else max(prev, used))
                processes[pid] = used
        processes = {pid: used for pid, used in processes.items()
                     if pid not in _BAD_PIDS and self._pid_exists(pid)}

        util: dict[int, list[int]] | None = None
        util_max_ts: int | None = None
        if mig:
            self._note(f"{device}:mig", f"{device} ({st.name}): MIG enabled: its energy is booked as unattributed "
                                        "(per-instance activity needs GPM or DCGM)")
        elif st.utilisation:
            try:
                samples = nvml.nvmlDeviceGetProcessUtilization(handle, st.last_util_ts_us)
            except pynvml.NVMLError_NotFound:
                util = {}  # no samples since last time: idle
            except _UNSUPPORTED as exc:  # util stays None
                st.utilisation = False
                self._note(f"{device}:utilisation", f"{device} ({st.name}): process utilisation not supported "
                                                    f"({type(exc).__name__}): {self._consequence('utilisation')}")
            else:
                util = {}
                for s in samples:
                    ts = int(s.timeStamp)
                    if ts <= st.last_util_ts_us:
                        continue
                    util.setdefault(int(s.pid), []).append(int(s.smUtil))
                    util_max_ts = ts if util_max_ts is None else max(util_max_ts, ts)

        return _Sample(
            energy_mj=energy_mj,
            power_w=None if power_mw is None else float(power_mw) / 1000.0,
            memory_used_bytes=None if mem is None else int(mem.used),
            memory_total_bytes=None if mem is None else int(mem.total),
            processes=processes,
            mig=mig,
            util=util,
            util_max_ts_us=util_max_ts,
        )

    def _book(self, st: _GpuState, device: str, s: _Sample, now_mono_s: float) -> DeviceReading:
        dt = 0.0 if st.last_read_s is None else max(now_mono_s - st.last_read_s, 0.0)
        source: EnergySource
        if s.energy_mj is not None:
            first = st.counter.last is None
            delta_mj = st.counter.update(s.energy_mj)
            if delta_mj is not None:
                energy_j, source = delta_mj / 1000.0, "counter"
            elif first:
                energy_j, source = 0.0, "counter"  # baseline
            else:
                energy_j, source = self._power_energy_j(st.last_power_w, s.power_w, dt), "power"
                self._problems.append(f"{device}: energy counter went backwards (driver reload?): "
                                      "this interval uses sampled power")
        else:
            st.counter = CounterDiff(max_value=None)  # re-baseline if the counter comes back
            energy_j, source = self._power_energy_j(st.last_power_w, s.power_w, dt), "power"

        if source == "counter" and dt > 0:
            power_w = energy_j / dt
        elif s.power_w is not None:
            power_w = s.power_w
        else:
            power_w = energy_j / dt if dt > 0 else 0.0

        st.last_read_s = now_mono_s
        st.last_power_w = s.power_w
        if s.util_max_ts_us is not None:
            st.last_util_ts_us = max(st.last_util_ts_us, s.util_max_ts_us)

        uses = []
        for pid in sorted(s.processes):
            if s.util is None:
                sm: float | None = None
            else:
                values = s.util.get(pid)
                sm = min(max(sum(values) / len(values), 0.0), 100.0) if values else 0.0
            uses.append(GpuProcessUse(pid=pid, used_memory_bytes=s.processes[pid], sm_util_pct=sm))

        return DeviceReading(
            kind="gpu",
            device=device,
            energy_j=energy_j,
            power_w=power_w,
            source=source,
            interval_s=dt,
            processes=tuple(uses),
            memory_used_bytes=s.memory_used_bytes,
            memory_total_bytes=s.memory_total_bytes,
            name=st.name,
            attributable=not s.mig,
        )

    @staticmethod
    def _power_energy_j(prev_w: float | None, cur_w: float | None, dt: float) -> float:
        """Trapezoid of the previous and current power samples over dt; one sample
        alone stands for the whole interval."""
        if dt <= 0:
            return 0.0
        if prev_w is not None and cur_w is not None:
            return (prev_w + cur_w) / 2.0 * dt
        one = cur_w if cur_w is not None else prev_w
        return 0.0 if one is None else one * dt


def _probe(nvml: Any) -> tuple[int, str, str]:
    """Init NVML, count GPUs, read the driver version, shut down. Raises NVMLError."""
    nvml.nvmlInit()
    try:
        count = int(nvml.nvmlDeviceGetCount())
        try:
            driver = str(nvml.nvmlSystemGetDriverVersion())
        except pynvml.NVMLError:
            driver = "unknown"
        names = []
        for i in range(count):
            try:
                names.append(str(nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(i))))
            except pynvml.NVMLError as exc:
                names.append(f"? ({type(exc).__name__})")
        return count, driver, ", ".join(names)
    finally:
        try:
            nvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def open_gpu_source(cfg: GpuConfig) -> tuple[Source | None, str]:
    """The GPU source the config asks for, and one line for the log. Never raises for
    a missing GPU or driver: ``auto`` without NVML gives ``(None, reason)``."""
    backend = cfg.backend
    if backend == "none":
        return None, "GPU disabled by config"
    if backend == "sim":
        from .nvml_sim import SimulatedNvml

        return (NvmlGpuSource(SimulatedNvml(cfg.sim_file), init_retry_s=0.0),
                f"GPU: simulated NVML driven by {cfg.sim_file}")
    if backend not in ("nvml", "auto"):
        return None, f"GPU disabled: unknown backend {backend!r}"
    try:
        count, driver, names = _probe(pynvml)
    except (pynvml.NVMLError, OSError) as exc:
        reason = nvml_error_text(exc)
        if backend == "auto":
            return None, f"no NVML ({reason}): GPU energy not measured"
        return (NvmlGpuSource(pynvml),
                f"GPU: NVML init failed ({reason}): GPU source degraded, retrying every {INIT_RETRY_S:g} s")
    if count == 0 and backend == "auto":
        return None, f"no GPUs found by NVML (driver {driver}): GPU energy not measured"
    return NvmlGpuSource(pynvml), f"GPU: NVML driver {driver}, {count} GPU(s): {names}"
