"""A simulated NVML: the ``pynvml`` functions the GPU collector calls, driven by a JSON file.

Its one job is to stand in for the ``pynvml`` module at the NVML boundary, so the real
collector (``gpu.py``) runs unchanged on machines without a GPU. Nothing above this
boundary is simulated: processes are real, the collector is real.

``SimulatedNvml(sim_file, clock=time.monotonic)`` exposes pynvml's own names and
signatures as methods and raises pynvml's real ``NVMLError`` subclasses.

The sim file
------------
JSON, for example::

    {"gpus": [{"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-0", "power_w": 250.0,
               "energy_counter": true, "memory_total_bytes": 85899345920,
               "processes": [{"pid": 123, "used_memory_bytes": 1073741824, "sm_util": 90}]}]}

GPU keys (all but ``power_w`` optional):

- ``name`` (str, default "Simulated GPU"), ``uuid`` (str, default "GPU-sim-<index>").
- ``power_w`` (number >= 0): what ``nvmlDeviceGetPowerUsage`` reports (as integer mW).
- ``energy_counter`` (bool, default true): with it, ``nvmlDeviceGetTotalEnergyConsumption``
  returns a millijoule counter the simulator integrates from ``power_w`` using ``clock``;
  without it that call raises ``NVMLError_NotSupported`` (pre-Volta parts).
- ``memory_total_bytes`` (int, default 0); ``memory_used_bytes`` (int, default: the sum
  of the processes' ``used_memory_bytes``).
- ``processes``: list of ``{"pid": int, "used_memory_bytes": int | null,
  "sm_util": number | null, "mem_util": number, "type": "compute" | "graphics" |
  "compute+graphics"}``. ``used_memory_bytes`` null (the default) is reported the way
  NVML reports "not available" (pynvml turns it into ``None``). ``type`` picks the list
  (``nvmlDeviceGetComputeRunningProcesses`` / ``...GraphicsRunningProcesses``) the
  process appears in; default "compute". ``sm_util`` null (the default) means the
  process gets no utilisation samples.

Extensions (for failure tests):

- ``counter_epoch`` (int, default 0): when it changes, the energy counter restarts at 0,
  as after a driver reload.
- ``lost`` (bool): every call for that GPU, ``nvmlDeviceGetHandleByIndex`` included,
  raises ``NVMLError_GpuIsLost``.
- ``mig`` (bool): ``nvmlDeviceGetMigMode`` returns ``[1, 1]`` (enabled) and process
  utilisation raises ``NVMLError_NotSupported``, as on a real MIG-enabled board.
- ``util_supported`` (bool, default true): false makes
  ``nvmlDeviceGetProcessUtilization`` raise ``NVMLError_NotSupported``.
- ``hang_s`` (number >= 0, default 0): a hung driver. ``nvmlDeviceGetHandleByIndex``
  for that GPU (the first call of every per-GPU read) blocks ``hang_s`` seconds before
  it answers. The value in force when the call starts applies; the lock is not held
  while it blocks. The energy counter keeps integrating meanwhile.

When the file is read
---------------------
On ``nvmlInit`` and on **every** ``nvmlDeviceGetCount`` call (the collector calls it
once per tick). Nothing else reads it, so each tick sees one consistent file. Write the
file atomically (temp file + ``os.replace``, see ``tests/gpusim.py``); a half-written
file is reported as malformed for that tick.

At each read, every counter is first advanced to ``clock()`` at the power of the
previous file, then the new power applies from that moment. A GPU whose ``uuid``
changes at an index, or that newly appears, starts with a counter of 0. Each read also
records one utilisation sample per process with a non-null ``sm_util`` (timestamp:
wall-clock µs derived from ``clock``), kept in a ring buffer of the last
``UTIL_BUFFER`` samples per GPU, as the driver keeps a buffer;
``nvmlDeviceGetProcessUtilization(handle, lastSeenTimeStamp)`` returns the buffered
samples newer than ``lastSeenTimeStamp`` and raises ``NVMLError_NotFound`` when there
are none. Read the file several times between two collector reads (call
``nvmlDeviceGetCount``) to give it several samples per interval.

Errors
------
A missing, unreadable or malformed file raises ``SimFileError``, a subclass of
pynvml's ``NVMLError_Unknown`` whose message names the file, the key and the problem;
the collector turns it into a ``SourceError`` like any other NVML failure. The previous
good state stays in force (the counters keep integrating the last good power).

Fidelity notes: process lists are built as real ``pynvml.c_nvmlProcessInfo_t``
structs and converted exactly as pynvml does (``nvmlStructToFriendlyObject``, with
"not available" memory turned into ``None``), so callers see what pynvml returns.
Memory info is a real ``c_nvmlMemory_t``; utilisation samples are real
``c_nvmlProcessUtilizationSample_t``. Calls before ``nvmlInit`` or after the matching
``nvmlShutdown`` raise ``NVMLError_Uninitialized``.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import pynvml

UTIL_BUFFER = 512  # utilisation samples kept per GPU
NOT_AVAILABLE_U64 = pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value
NO_INSTANCE_ID = 0xFFFFFFFF  # gpuInstanceId / computeInstanceId without MIG

_GPU_KEYS = {
    "name", "uuid", "power_w", "energy_counter", "memory_total_bytes", "memory_used_bytes",
    "processes", "counter_epoch", "lost", "mig", "util_supported", "hang_s",
}
_PROCESS_KEYS = {"pid", "used_memory_bytes", "sm_util", "mem_util", "type"}
_PROCESS_TYPES = ("compute", "graphics", "compute+graphics")


class SimFileError(pynvml.NVMLError_Unknown):
    """The sim file is missing, unreadable or malformed. ``str()`` says which and why."""

    def __init__(self, message: str):
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class SimHandle:
    """Device handle returned by ``nvmlDeviceGetHandleByIndex`` (opaque to callers)."""

    index: int


@dataclass(frozen=True)
class _SimProcess:
    pid: int
    used_memory_bytes: int | None
    sm_util: float | None
    mem_util: float
    type: str


@dataclass(frozen=True)
class _SimGpu:
    name: str
    uuid: str
    power_w: float
    energy_counter: bool
    memory_total_bytes: int
    memory_used_bytes: int | None
    processes: tuple[_SimProcess, ...]
    counter_epoch: int
    lost: bool
    mig: bool
    util_supported: bool
    hang_s: float = 0.0


@dataclass
class _GpuState:
    """What the simulated driver keeps per GPU between file reads."""

    spec: _SimGpu
    energy_mj: float  # integrated counter, millijoules
    integrated_to_s: float  # clock time the counter is integrated up to
    samples: deque = field(default_factory=lambda: deque(maxlen=UTIL_BUFFER))


def _nvml_error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)  # pynvml maps the code to its subclass


# --- sim file parsing -------------------------------------------------------------------


def _number(where: str, value: Any, minimum: float = 0.0, maximum: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{where}: {value!r} is outside {minimum}..{maximum}")
    return float(value)


def _integer(where: str, value: Any, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{where}: {value!r} is outside {minimum}..{maximum if maximum is not None else 'inf'}")
    return value


def _boolean(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    return value


def _string(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _parse_process(where: str, raw: Any) -> _SimProcess:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _PROCESS_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_PROCESS_KEYS))})")
    if "pid" not in raw:
        raise ValueError(f"{where}: missing key 'pid'")
    pid = _integer(f"{where}.pid", raw["pid"], 0, 0xFFFFFFFF)
    mem = raw.get("used_memory_bytes")
    used = None if mem is None else _integer(f"{where}.used_memory_bytes", mem, 0, NOT_AVAILABLE_U64 - 1)
    sm = raw.get("sm_util")
    sm_util = None if sm is None else _number(f"{where}.sm_util", sm, 0, 100)
    mem_util = _number(f"{where}.mem_util", raw.get("mem_util", 0), 0, 100)
    ptype = raw.get("type", "compute")
    if ptype not in _PROCESS_TYPES:
        raise ValueError(f"{where}.type: {ptype!r} is not one of {', '.join(_PROCESS_TYPES)}")
    return _SimProcess(pid=pid, used_memory_bytes=used, sm_util=sm_util, mem_util=mem_util, type=ptype)


def _parse_gpu(where: str, index: int, raw: Any) -> _SimGpu:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _GPU_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_GPU_KEYS))})")
    if "power_w" not in raw:
        raise ValueError(f"{where}: missing key 'power_w'")
    procs_raw = raw.get("processes", [])
    if not isinstance(procs_raw, list):
        raise ValueError(f"{where}.processes: expected a list, got {type(procs_raw).__name__}")
    processes = tuple(_parse_process(f"{where}.processes[{i}]", p) for i, p in enumerate(procs_raw))
    mem_used = raw.get("memory_used_bytes")
    return _SimGpu(
        name=_string(f"{where}.name", raw.get("name", "Simulated GPU")),
        uuid=_string(f"{where}.uuid", raw.get("uuid", f"GPU-sim-{index}")),
        power_w=_number(f"{where}.power_w", raw["power_w"], 0, 100_000),
        energy_counter=_boolean(f"{where}.energy_counter", raw.get("energy_counter", True)),
        memory_total_bytes=_integer(f"{where}.memory_total_bytes", raw.get("memory_total_bytes", 0)),
        memory_used_bytes=None if mem_used is None else _integer(f"{where}.memory_used_bytes", mem_used),
        processes=processes,
        counter_epoch=_integer(f"{where}.counter_epoch", raw.get("counter_epoch", 0), minimum=-(2**63)),
        lost=_boolean(f"{where}.lost", raw.get("lost", False)),
        mig=_boolean(f"{where}.mig", raw.get("mig", False)),
        util_supported=_boolean(f"{where}.util_supported", raw.get("util_supported", True)),
        hang_s=_number(f"{where}.hang_s", raw.get("hang_s", 0), 0, 3600),
    )


def parse_sim_file(path: str) -> list[_SimGpu]:
    """Read and validate a sim file; raise SimFileError naming the file and the problem."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise SimFileError(f"sim file {path}: not found") from None
    except OSError as exc:
        raise SimFileError(f"sim file {path}: cannot read: {exc.strerror or exc}") from None
    try:
        doc = json.loads(data)
    except UnicodeDecodeError:
        raise SimFileError(f"sim file {path}: not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise SimFileError(f"sim file {path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    try:
        if not isinstance(doc, dict):
            raise ValueError(f"top level: expected an object with key 'gpus', got {type(doc).__name__}")
        unknown = sorted(set(doc) - {"gpus"})
        if unknown:
            raise ValueError(f"top level: unknown key {unknown[0]!r} (known: gpus)")
        gpus = doc.get("gpus")
        if not isinstance(gpus, list):
            raise ValueError(f"gpus: expected a list, got {type(gpus).__name__ if 'gpus' in doc else 'nothing'}")
        parsed = [_parse_gpu(f"gpus[{i}]", i, g) for i, g in enumerate(gpus)]
    except ValueError as exc:
        raise SimFileError(f"sim file {path}: {exc}") from None
    uuids = [g.uuid for g in parsed]
    if len(set(uuids)) != len(uuids):
        raise SimFileError(f"sim file {path}: gpus: uuids must be unique, got {uuids}")
    return parsed


# --- the simulated library --------------------------------------------------------------


class SimulatedNvml:
    """Drop-in for the ``pynvml`` module, driven by ``sim_file`` and ``clock`` (seconds,
    monotonic). Thread-safe (one lock), like NVML itself."""

    def __init__(self, sim_file: str, clock: Callable[[], float] = time.monotonic):
        self.sim_file = str(sim_file)
        self._clock = clock
        # Wall time corresponding to clock() == 0, for µs-since-epoch sample timestamps.
        self._epoch_offset_s = time.time() - clock()
        self._lock = threading.RLock()
        self._init_count = 0
        self._gpus: list[_GpuState] = []
        self.reloads = 0  # successful file reads, for tests

    # -- init / shutdown --

    def nvmlInit(self) -> None:
        with self._lock:
            self._reload()
            self._init_count += 1

    def nvmlInitWithFlags(self, flags: int) -> None:
        self.nvmlInit()

    def nvmlShutdown(self) -> None:
        with self._lock:
            if self._init_count <= 0:
                raise _nvml_error(pynvml.NVML_ERROR_UNINITIALIZED)
            self._init_count -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check_init()
        return "simulated"

    # -- devices --

    def nvmlDeviceGetCount(self) -> int:
        with self._lock:
            self._check_init()
            self._reload()
            return len(self._gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> SimHandle:
        with self._lock:
            self._check_init()
            if not isinstance(index, int) or not 0 <= index < len(self._gpus):
                raise _nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            hang_s = self._state(SimHandle(index)).spec.hang_s  # raises GpuIsLost for a lost GPU
        if hang_s > 0:
            time.sleep(hang_s)  # a hung driver call (outside the lock)
        return SimHandle(index)

    def nvmlDeviceGetName(self, handle: SimHandle) -> str:
        with self._lock:
            return self._state(handle).spec.name

    def nvmlDeviceGetUUID(self, handle: SimHandle) -> str:
        with self._lock:
            return self._state(handle).spec.uuid

    def nvmlDeviceGetPowerUsage(self, handle: SimHandle) -> int:
        """Milliwatts."""
        with self._lock:
            return int(round(self._state(handle).spec.power_w * 1000.0))

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: SimHandle) -> int:
        """Millijoules since the (simulated) driver load."""
        with self._lock:
            st = self._state(handle)
            if not st.spec.energy_counter:
                raise _nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            self._integrate(st, self._clock())
            return int(st.energy_mj)

    def nvmlDeviceGetMemoryInfo(self, handle: SimHandle, version: int | None = None) -> pynvml.c_nvmlMemory_t:
        with self._lock:
            spec = self._state(handle).spec
            used = spec.memory_used_bytes
            if used is None:
                used = sum(p.used_memory_bytes or 0 for p in spec.processes)
            total = spec.memory_total_bytes
            mem = pynvml.c_nvmlMemory_t()
            mem.total = total
            mem.used = min(used, total) if total else used
            mem.free = max(total - used, 0)
            return mem

    def nvmlDeviceGetComputeRunningProcesses(self, handle: SimHandle) -> list:
        with self._lock:
            return self._processes(handle, "compute")

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: SimHandle) -> list:
        with self._lock:
            return self._processes(handle, "graphics")

    def nvmlDeviceGetProcessUtilization(self, handle: SimHandle, timeStamp: int) -> list:
        """Buffered samples with ``timeStamp`` (µs since epoch) newer than the argument."""
        with self._lock:
            st = self._state(handle)
            if st.spec.mig or not st.spec.util_supported:
                raise _nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            newer = [s for s in st.samples if s.timeStamp > timeStamp]
            if not newer:
                raise _nvml_error(pynvml.NVML_ERROR_NOT_FOUND)
            return newer

    def nvmlDeviceGetMigMode(self, handle: SimHandle) -> list[int]:
        with self._lock:
            mode = pynvml.NVML_DEVICE_MIG_ENABLE if self._state(handle).spec.mig else pynvml.NVML_DEVICE_MIG_DISABLE
            return [mode, mode]

    # -- internals --

    def _check_init(self) -> None:
        if self._init_count <= 0:
            raise _nvml_error(pynvml.NVML_ERROR_UNINITIALIZED)

    def _state(self, handle: SimHandle) -> _GpuState:
        self._check_init()
        if not isinstance(handle, SimHandle):
            raise _nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if handle.index >= len(self._gpus):
            raise _nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)  # vanished from the file
        st = self._gpus[handle.index]
        if st.spec.lost:
            raise _nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
        return st

    @staticmethod
    def _integrate(st: _GpuState, now_s: float) -> None:
        dt = now_s - st.integrated_to_s
        if dt > 0:
            st.energy_mj += st.spec.power_w * dt * 1000.0
            st.integrated_to_s = now_s

    def _reload(self) -> None:
        specs = parse_sim_file(self.sim_file)  # raises SimFileError; old state stays
        now = self._clock()
        ts_us = int(round((self._epoch_offset_s + now) * 1e6))
        states: list[_GpuState] = []
        for i, spec in enumerate(specs):
            old = self._gpus[i] if i < len(self._gpus) else None
            if old is not None and old.spec.uuid == spec.uuid:
                self._integrate(old, now)  # old power up to now
                if spec.counter_epoch != old.spec.counter_epoch:
                    old.energy_mj = 0.0  # driver reload
                old.integrated_to_s = max(old.integrated_to_s, now)
                old.spec = spec  # new power from now on
                st = old
            else:
                st = _GpuState(spec=spec, energy_mj=0.0, integrated_to_s=now)
            for p in spec.processes:
                if p.sm_util is not None:
                    sample = pynvml.c_nvmlProcessUtilizationSample_t()
                    sample.pid = p.pid
                    sample.timeStamp = ts_us
                    sample.smUtil = int(round(p.sm_util))
                    sample.memUtil = int(round(p.mem_util))
                    st.samples.append(sample)
            states.append(st)
        self._gpus = states
        self.reloads += 1

    def _processes(self, handle: SimHandle, kind: str) -> list:
        spec = self._state(handle).spec
        out = []
        for p in spec.processes:
            if kind not in p.type:
                continue
            info = pynvml.c_nvmlProcessInfo_t()
            info.pid = p.pid
            info.usedGpuMemory = NOT_AVAILABLE_U64 if p.used_memory_bytes is None else p.used_memory_bytes
            info.gpuInstanceId = NO_INSTANCE_ID
            info.computeInstanceId = NO_INSTANCE_ID
            # Exactly what pynvml does with the driver's array.
            obj = pynvml.nvmlStructToFriendlyObject(info)
            if obj.usedGpuMemory == NOT_AVAILABLE_U64:
                obj.usedGpuMemory = None
            out.append(obj)
        return out
