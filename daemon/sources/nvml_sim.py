"""A simulated NVML: the ``pynvml`` functions the GPU collector calls, driven by a JSON file.

Its one job is to stand in for the ``pynvml`` module at the NVML boundary, so the real
collector (``gpu.py``) runs unchanged on machines without a GPU. Nothing above this
boundary is simulated: processes are real, the collector is real.

``SimulatedNvml(sim_file, clock=time.monotonic)`` exposes pynvml's own names and
signatures as methods, returns what pynvml returns (real ``pynvml`` ctypes structs,
converted exactly as pynvml converts them) and raises pynvml's real ``NVMLError``
subclasses. This docstring is the reference for the sim file; every behaviour below is
tested in ``tests/test_nvml_sim.py``, against the real captures in
``tests/fixtures/nvml/`` where they show it.

The sim file
------------
JSON, for example::

    {"realistic": true,
     "gpus": [{"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-0", "power_w": 250.0,
               "memory_total_bytes": 85899345920,
               "processes": [{"pid": 123, "used_memory_bytes": 1073741824, "sm_util": 90}]}]}

Top-level keys (all but ``gpus`` optional):

- ``gpus``: list of GPU objects (below), in NVML index order.
- ``vendor`` ("nvidia" | "amd", default "nvidia"): the vendor of GPU objects without a
  ``vendor`` key of their own. This simulator shows only NVIDIA GPUs: a GPU object with
  ``"vendor": "amd"`` is the amdsmi simulator's (``amdsmi_sim.py``, which documents its
  keys and the top-level ``amdgpu_loaded`` and ``amdsmi_api``); it is skipped here, not
  validated, and takes no NVML index (NVML indices count NVIDIA GPUs only).
- ``realistic`` (bool, default false): behave as the captures and NVML's documentation
  say real drivers do (see "Realistic mode"). Off, the simulator is the idealised one
  the older tests were written against.
- ``driver_loaded`` (bool, default true): false makes ``nvmlInit`` raise
  ``NVMLError_DriverNotLoaded`` (and every later call ``NVMLError_Uninitialized``, as
  nothing was initialised). Flipping it to true lets a later ``nvmlInit`` succeed (the
  driver was loaded after the daemon started); counters then start at 0 from that load.
  It is read by ``nvmlInit`` only: the kernel module cannot be unloaded while NVML holds
  it open, so a running session is unaffected.
- ``pid_namespace`` ("daemon" | "host", default "daemon"): "daemon": the PIDs in the
  file are as the daemon sees them (tests); "host": the simulator stands for real NVML
  in a container, whose PIDs are host PIDs. Exposed as the attribute
  ``reports_host_pids`` (bool; real pynvml has no such attribute, and the collector
  treats a missing one as True).

GPU keys (all optional but ``power_w``, which ``power_pattern`` may replace):

- ``vendor`` ("nvidia" | "amd"): see the top-level key.
- ``name`` (str, default "Simulated GPU"), ``uuid`` (str, default "GPU-sim-<index>").
- ``power_w`` (number >= 0): constant power draw, watts.
- ``power_pattern``: ``[[watts, seconds], ...]``: power cycles through these steps,
  starting when the pattern was first read for this GPU (a re-read of the same pattern
  does not restart it); overrides ``power_w`` for the counter, the 1-s average and the
  instant power. E.g. ``[[100, 0.5], [300, 0.5]]``.
- ``architecture``: "pascal" | "volta" | "ampere" | "ada" | "hopper" | "blackwell"
  (default "hopper"), what ``nvmlDeviceGetArchitecture`` reports. "pascal" has no energy
  counter (``NOT_SUPPORTED``, whatever ``energy_counter`` says). Pascal, Volta and GA100
  (Ampere boards named A100 / A30) report instant power from ``nvmlDeviceGetPowerUsage``
  and ``NOT_SUPPORTED`` for field 185 (nvml.h: "supported on Ampere (except GA100) or
  newer"). In realistic mode, boards that cannot do MIG (Pascal, Volta, Ada, non-GA100
  Ampere) answer ``nvmlDeviceGetMigMode`` with ``NOT_SUPPORTED``, as the L40S and
  RTX 4080 captures show ``mig.mode.current [N/A]``.
- ``energy_counter`` (bool, default true): with it, ``nvmlDeviceGetTotalEnergyConsumption``
  returns a millijoule counter the simulator integrates from the power using ``clock``;
  without it that call raises ``NVMLError_NotSupported`` (pre-Volta parts).
- ``memory_total_bytes`` (int, default 0); ``memory_used_bytes`` (int, default: the sum
  of the processes' ``used_memory_bytes``).
- ``processes``: list of process objects (below).
- ``errors``: ``{"<pynvml function name>": "<ERROR>"}``: that function raises that
  pynvml error for this GPU's (board) handle. ERROR is one of NO_PERMISSION, UNKNOWN,
  TIMEOUT, NOT_SUPPORTED, GPU_IS_LOST, NOT_FOUND, FUNCTION_NOT_FOUND,
  INSUFFICIENT_SIZE. The name is any ``nvmlDevice*`` function this simulator has.
  An error on an unversioned process-list function (``nvmlDeviceGetComputeRunningProcesses``)
  also applies to its ``_v3`` (the same C entry point) and, except
  FUNCTION_NOT_FOUND, to its ``_v2``; FUNCTION_NOT_FOUND there raises what pynvml's
  ``throwOnVersionMismatch`` raises: ``NVMLLibraryMismatchError`` from the unversioned
  function, ``NVMLError_FunctionNotFound`` from ``_v3``, while ``_v2`` still answers
  (a driver older than pynvml, nvitop #181). A ``_v2`` / ``_v3`` name applies to that
  version only.
- ``mig_errors``: the same, for this GPU's MIG device handles (``errors`` apply to the
  board handle only: on real MIG boards the parent's process lists need privileges while
  MIG device handles answer unprivileged).
- ``field_errors``: ``{"<field id>": "<ERROR>"}``: ``nvmlDeviceGetFieldValues`` returns
  that per-field ``nvmlReturn`` for that field (the call itself succeeds).
- ``mig`` (bool): MIG enabled: ``nvmlDeviceGetMigMode`` returns ``[1, 1]``, process
  utilisation raises ``NVMLError_NotSupported`` (the MIG captures: pmon "-" for every
  process, utilization.gpu "[N/A]").
- ``mig_instances`` (needs ``mig``): ``[{"gi_id": int, "profile": "3g.40gb",
  "slices": int}]`` (slices: compute slices of the board's 7), optional per instance
  ``memory_mb`` (default: the profile's "<n>gb" x 1024) and ``compute_instances``:
  ``[{"ci_id": int, "slices": int}]`` (default one CI 0 spanning the instance; the H200
  capture has two CIs in GI 2). Each compute instance is one MIG device, indexed in
  (gi_id, ci_id) order as nvidia-smi numbers them: ``nvmlDeviceGetMaxMigDeviceCount``
  is 7; ``nvmlDeviceGetMigDeviceHandleByIndex(board, i)`` returns a handle for
  ``i < number of MIG devices`` and raises ``NOT_FOUND`` for the unused slots up to 7;
  ``nvmlDeviceGetGpuInstanceId`` / ``nvmlDeviceGetComputeInstanceId`` /
  ``nvmlDeviceGetDeviceHandleFromMigDeviceHandle`` / ``nvmlDeviceIsMigDeviceHandle`` /
  ``nvmlDeviceGetAttributes(_v2)`` (``gpuInstanceSliceCount``,
  ``computeInstanceSliceCount``, ``multiprocessorCount``, ``memorySizeMB``, shared
  engine counts as in the H100 MIG capture) answer on MIG handles. Process lists on a
  MIG handle hold only that instance's processes (its gi_id and ci_id); memory info on a
  MIG handle is its GPU instance's memory. Power, energy and field values exist only on
  the board: on a MIG handle they raise / return ``NOT_SUPPORTED``.
- ``util_supported`` (bool, default true): false makes
  ``nvmlDeviceGetProcessUtilization`` raise ``NVMLError_NotSupported``.
- ``util_garbage`` (bool, default true): in realistic mode, add the driver's garbage
  entries to utilisation results (see below); false leaves only padding.
- ``counter_epoch`` (int, default 0): when it changes, the energy counter restarts at 0,
  as after a driver reload.
- ``lost`` (bool): every call for that GPU, ``nvmlDeviceGetHandleByIndex`` included,
  raises ``NVMLError_GpuIsLost``.
- ``hang_s`` (number >= 0, default 0): a hung driver. Every call that takes this GPU's
  handle (board or MIG), and ``nvmlDeviceGetHandleByIndex`` for it, blocks ``hang_s``
  seconds before it answers. The value in force when the call starts applies; the lock
  is not held while it blocks. The energy counter keeps integrating meanwhile.

Process keys: ``{"pid": int, "used_memory_bytes": int | null, "sm_util": number | null,
"mem_util": number, "enc_util": number | null, "dec_util": number | null,
"type": "compute" | "graphics" | "compute+graphics" | "mps", "gi_id": int, "ci_id": int,
"garbage_util": bool}``.

- ``used_memory_bytes`` null (the default) is reported the way NVML reports "not
  available" (pynvml turns it into ``None``).
- ``type`` picks the list: ``nvmlDeviceGetComputeRunningProcesses`` lists "compute" and
  "compute+graphics" (the RTX 4080 capture's ``--query-compute-apps`` lists kwin_wayland,
  a C+G process), ``...GraphicsRunningProcesses`` "graphics" and "compute+graphics",
  ``...MPSComputeRunningProcesses`` only "mps" (MPS clients). Default "compute".
- ``sm_util`` / ``mem_util`` / ``enc_util`` / ``dec_util`` (0..100) are the
  utilisation sample's ``smUtil`` / ``memUtil`` / ``encUtil`` / ``decUtil``. Outside
  realistic mode a process gets samples when any of sm/enc/dec util is not null (missing
  ones read 0); in realistic mode only when one of them (or mem_util) is above 0.
- ``gi_id`` / ``ci_id``: the MIG GPU / compute instance (needed on a board with
  ``mig_instances``; ``ci_id`` defaults to 0). Without MIG both are reported as
  0xFFFFFFFF ("N/A" in the captures).
- ``garbage_util`` (realistic mode): this process's samples carry the garbage nvtop #110
  shows for a zombie process (smUtil 37100, encUtil 50583, decUtil 50624).

Unknown keys anywhere are errors (a typo must not silently do nothing).

When the file is read
---------------------
On ``nvmlInit`` and on **every** ``nvmlDeviceGetCount`` call (the collector calls it
once per tick), in realistic mode too. Nothing else reads it, so each tick sees one
consistent file. Write the file atomically (temp file + ``os.replace``, see
``tests/gpusim.py``); a half-written file is reported as malformed for that tick.

At each read, every counter is first advanced to ``clock()`` at the power of the
previous file, then the new power applies from that moment. A GPU whose ``uuid``
changes at an index, or that newly appears, starts with a counter of 0.

Outside realistic mode each read also records one utilisation sample per sampled
process (timestamp: wall-clock µs derived from ``clock``) in a ring buffer of the last
``UTIL_BUFFER`` samples per GPU; ``nvmlDeviceGetProcessUtilization(handle,
lastSeenTimeStamp)`` returns the buffered samples newer than ``lastSeenTimeStamp`` and
raises ``NVMLError_NotFound`` when there are none. Read the file several times between
two collector reads (call ``nvmlDeviceGetCount``) to give it several samples per
interval.

Realistic mode
--------------
What real drivers do, with its source:

- Utilisation (``nvmlDeviceGetProcessUtilization``): the driver keeps one entry per
  process, refreshed every ``UTIL_PERIOD_US`` (1/6 s: "the sample period may be between
  1 second and 1/6 second", nvidia-smi --help-query-gpu); a call returns the **latest**
  entry of each process newer than ``lastSeenTimeStamp`` (go-nvml #51: one sample per
  PID). ``NOT_FOUND`` when no process entry is newer. Processes without SM / encoder /
  decoder activity (memory-only processes: the H100 capture's pmon shows "-" for the two
  memhog processes) have no entry. A non-empty result also carries, as nvtop #110 shows
  (``Count=100``; go-nvml #11: the size query always says 100):

  * one garbage entry for a PID in no process list (``STRAY_PID``, or the next free
    PID below it) with smUtil 37100, encUtil 50583, decUtil 50624 and the current
    sample timestamp; on every ``FUTURE_EVERY``-th non-empty call its timestamp is
    ``FUTURE_US`` in the future (unless ``util_garbage`` is false);
  * padding entries (pid 0, timeStamp 0, all zero) up to ``UTIL_REPORTED_COUNT``
    entries in all, which the driver does not filter by ``lastSeenTimeStamp``.

- Power: ``nvmlDeviceGetPowerUsage`` is the 1-second moving average of power on
  Ampere (not GA100) and newer (nvml.h; every capture's ``power.draw`` equals
  ``power.draw.average``, not ``power.draw.instant``, e.g. the H100 capture: 631.95 W
  average vs 625.68 W instant); Pascal, Volta and GA100 report instant power.
  ``nvmlDeviceGetFieldValues`` gives field 186 (instant), 185 (1-s average) and 83
  (energy) with a ``nvmlReturn`` per field, in every mode.
- The energy counter advances in ``COUNTER_STEP_S`` (100 ms) steps: it reports the
  energy up to the last step boundary, not up to this instant (notes/hardware.md:
  "advances in ~10-100 ms steps").
- The GPU count is fixed at ``nvmlInit`` (the first one, while no session is open):
  GPUs added to the file appear only after ``nvmlShutdown`` + ``nvmlInit``; an index
  below that count whose GPU is gone from the file raises ``GPU_IS_LOST``.
- Boards that cannot do MIG raise ``NOT_SUPPORTED`` for ``nvmlDeviceGetMigMode`` and
  ``nvmlDeviceGetMaxMigDeviceCount``.

Errors
------
A missing, unreadable or malformed file raises ``SimFileError``, a subclass of
pynvml's ``NVMLError_Unknown`` whose message names the file, the key and the problem;
the collector turns it into a ``SourceError`` like any other NVML failure. The previous
good state stays in force (the counters keep integrating the last good power).

Fidelity notes: process lists are built as real ``pynvml.c_nvmlProcessInfo_t``
(``_v2_t`` for the ``_v2`` functions) structs and converted exactly as pynvml does
(``nvmlStructToFriendlyObject``, with "not available" memory turned into ``None``).
Memory info is a real ``c_nvmlMemory_t``; utilisation samples are real
``c_nvmlProcessUtilizationSample_t``; field values a real ``c_nvmlFieldValue_t`` array;
attributes a real ``c_nvmlDeviceAttributes``; ``nvmlDeviceIsMigDeviceHandle`` returns a
``c_uint`` as pynvml does. Calls before ``nvmlInit`` or after the matching
``nvmlShutdown`` raise ``NVMLError_Uninitialized``. Handles are opaque
``SimHandle`` / ``SimMigHandle`` objects, not ctypes pointers.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import pynvml

from . import sim_power

UTIL_BUFFER = 512  # utilisation samples kept per GPU (idealised mode)
NOT_AVAILABLE_U64 = pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value
NO_INSTANCE_ID = 0xFFFFFFFF  # gpuInstanceId / computeInstanceId without MIG

# Realistic mode.
UTIL_PERIOD_US = 166_667  # driver refreshes a process's utilisation entry every 1/6 s
UTIL_REPORTED_COUNT = 100  # entries a call returns, padding included (nvtop #110, go-nvml #11)
STRAY_PID = 4_194_303  # garbage entry's PID (highest PID Linux can give, pid_max 2^22)
GARBAGE_UTIL = (37100, 0, 50583, 50624)  # smUtil, memUtil, encUtil, decUtil (nvtop #110)
FUTURE_EVERY = 5  # every 5th non-empty result's garbage entry has a future timestamp
FUTURE_US = 3_600_000_000  # ... one hour ahead
COUNTER_STEP_S = 0.1  # the energy counter advances in 100 ms steps
AVERAGE_WINDOW_S = 1.0  # nvmlDeviceGetPowerUsage: 1-s moving average (Ampere+, not GA100)
MAX_MIG_DEVICES = 7
_POWER_HISTORY_S = 2.0  # power segments kept for the moving average / counter steps

FI_TOTAL_ENERGY = pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION  # 83, mJ
FI_POWER_AVERAGE = pynvml.NVML_FI_DEV_POWER_AVERAGE  # 185, mW
FI_POWER_INSTANT = pynvml.NVML_FI_DEV_POWER_INSTANT  # 186, mW

ARCHITECTURES = {
    "pascal": pynvml.NVML_DEVICE_ARCH_PASCAL,
    "volta": pynvml.NVML_DEVICE_ARCH_VOLTA,
    "ampere": pynvml.NVML_DEVICE_ARCH_AMPERE,
    "ada": pynvml.NVML_DEVICE_ARCH_ADA,
    "hopper": pynvml.NVML_DEVICE_ARCH_HOPPER,
    # Not in nvidia-ml-py before 12.560.30 (the floor is 12.550.52): nvml.h's value.
    "blackwell": getattr(pynvml, "NVML_DEVICE_ARCH_BLACKWELL", 10),
}
ERROR_CODES = {
    "NO_PERMISSION": pynvml.NVML_ERROR_NO_PERMISSION,
    "UNKNOWN": pynvml.NVML_ERROR_UNKNOWN,
    "TIMEOUT": pynvml.NVML_ERROR_TIMEOUT,
    "NOT_SUPPORTED": pynvml.NVML_ERROR_NOT_SUPPORTED,
    "GPU_IS_LOST": pynvml.NVML_ERROR_GPU_IS_LOST,
    "NOT_FOUND": pynvml.NVML_ERROR_NOT_FOUND,
    "FUNCTION_NOT_FOUND": pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    "INSUFFICIENT_SIZE": pynvml.NVML_ERROR_INSUFFICIENT_SIZE,
}
# SMs per MIG slice count (H100 capture: 1g 16, 2g 32, 3g 60; A100: 14 per slice).
_MIG_SMS = {
    "hopper": {1: 16, 2: 32, 3: 60, 4: 64, 7: 132},
    "blackwell": {1: 16, 2: 32, 3: 60, 4: 64, 7: 132},
    "ampere": {1: 14, 2: 28, 3: 42, 4: 56, 7: 98},
}
_BOARD_SMS = {"pascal": 56, "volta": 80, "ampere": 108, "ada": 142, "hopper": 132, "blackwell": 148}
_GA100_NAME = re.compile(r"\bA(100|30)\b")
_PROFILE = re.compile(r"^(\d+)g\.(\d+)gb")

# "vendor" picks the GPUs shown here; "amdgpu_loaded" and "amdsmi_api" belong to the
# amdsmi simulator (amdsmi_sim.py), which reads the same file.
_TOP_KEYS = {"gpus", "realistic", "driver_loaded", "pid_namespace", "vendor", "amdgpu_loaded", "amdsmi_api"}
VENDORS = ("nvidia", "amd")
_GPU_KEYS = {
    "vendor", "name", "uuid", "power_w", "power_pattern", "architecture", "energy_counter",
    "memory_total_bytes", "memory_used_bytes", "processes", "errors", "mig_errors",
    "field_errors", "counter_epoch", "lost", "mig", "mig_instances", "util_supported",
    "util_garbage", "hang_s",
}
_PROCESS_KEYS = {"pid", "used_memory_bytes", "sm_util", "mem_util", "enc_util", "dec_util",
                 "type", "gi_id", "ci_id", "garbage_util"}
_PROCESS_TYPES = ("compute", "graphics", "compute+graphics", "mps")
_MIG_KEYS = {"gi_id", "profile", "slices", "memory_mb", "compute_instances"}
_CI_KEYS = {"ci_id", "slices"}
_VERSIONED_LISTS = ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses",
                    "nvmlDeviceGetMPSComputeRunningProcesses")


class SimFileError(pynvml.NVMLError_Unknown):
    """The sim file is missing, unreadable or malformed. ``str()`` says which and why."""

    def __new__(cls, message: str) -> "SimFileError":
        # pynvml's generated error classes take (typ) in 12.550.52 and (typ, *args) later:
        # build the instance the way both accept.
        return pynvml.NVMLError.__new__(cls, pynvml.NVML_ERROR_UNKNOWN)

    def __init__(self, message: str):
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class SimHandle:
    """Board handle returned by ``nvmlDeviceGetHandleByIndex`` (opaque to callers)."""

    index: int


@dataclass(frozen=True)
class SimMigHandle:
    """MIG device handle from ``nvmlDeviceGetMigDeviceHandleByIndex`` (opaque)."""

    index: int  # the board's index
    gi_id: int
    ci_id: int


@dataclass(frozen=True)
class _SimProcess:
    pid: int
    used_memory_bytes: int | None
    sm_util: float | None
    mem_util: float
    type: str
    enc_util: float | None = None
    dec_util: float | None = None
    gi_id: int | None = None
    ci_id: int | None = None
    garbage_util: bool = False

    def sampled(self, realistic: bool) -> bool:
        """Does the driver keep utilisation samples for this process?"""
        if realistic:
            return any((v or 0) > 0 for v in (self.sm_util, self.enc_util, self.dec_util, self.mem_util))
        return any(v is not None for v in (self.sm_util, self.enc_util, self.dec_util))


@dataclass(frozen=True)
class _SimCi:
    ci_id: int
    slices: int


@dataclass(frozen=True)
class _SimGi:
    gi_id: int
    profile: str
    slices: int
    memory_mb: int
    cis: tuple[_SimCi, ...]


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
    power_pattern: tuple[tuple[float, float], ...] = ()
    architecture: str = "hopper"
    errors: tuple[tuple[str, str], ...] = ()
    mig_errors: tuple[tuple[str, str], ...] = ()
    field_errors: tuple[tuple[int, str], ...] = ()
    mig_instances: tuple[_SimGi, ...] = ()
    util_garbage: bool = True

    @property
    def has_counter(self) -> bool:
        return self.energy_counter and self.architecture != "pascal"

    @property
    def averages_power(self) -> bool:
        """nvmlDeviceGetPowerUsage is a 1-s average (Ampere except GA100, and newer)."""
        if self.architecture in ("pascal", "volta"):
            return False
        return not (self.architecture == "ampere" and _GA100_NAME.search(self.name))

    @property
    def mig_capable(self) -> bool:
        if self.architecture in ("hopper", "blackwell"):
            return True
        return self.architecture == "ampere" and bool(_GA100_NAME.search(self.name))

    def mig_devices(self) -> list[tuple[_SimGi, _SimCi]]:
        """MIG devices (one per compute instance) in nvidia-smi's (gi_id, ci_id) order."""
        return sorted(((gi, ci) for gi in self.mig_instances for ci in gi.cis),
                      key=lambda d: (d[0].gi_id, d[1].ci_id))


@dataclass(frozen=True)
class _SimDoc:
    gpus: list[_SimGpu]
    realistic: bool = False
    driver_loaded: bool = True
    pid_namespace: str = "daemon"


@dataclass
class _GpuState:
    """What the simulated driver keeps per GPU between file reads."""

    spec: _SimGpu
    energy_mj: float  # integrated counter, millijoules
    integrated_to_s: float  # clock time the counter is integrated up to
    samples: deque = field(default_factory=lambda: deque(maxlen=UTIL_BUFFER))
    # [(from clock s, profile)], ascending; the first one also stands for all time before.
    power: sim_power.Timeline = field(default_factory=list)
    reset_at_s: float = -math.inf  # when the counter last restarted at 0
    latest: dict[int, Any] = field(default_factory=dict)  # realistic: pid -> latest sample
    util_calls: int = 0  # realistic: non-empty utilisation results so far

    def energy_between_j(self, a: float, b: float) -> float:
        return sim_power.energy_between_j(self.power, a, b)

    def instant_w(self, t: float) -> float:
        return sim_power.instant_w(self.power, t)


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


def _object(where: str, raw: Any, known: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return raw


def _list(where: str, raw: Any) -> list[Any]:
    if not isinstance(raw, list):
        raise ValueError(f"{where}: expected a list, got {type(raw).__name__}")
    return raw


def _optional_number(where: str, value: Any) -> float | None:
    return None if value is None else _number(where, value, 0, 100)


def _parse_process(where: str, raw: Any) -> _SimProcess:
    raw = _object(where, raw, _PROCESS_KEYS)
    if "pid" not in raw:
        raise ValueError(f"{where}: missing key 'pid'")
    pid = _integer(f"{where}.pid", raw["pid"], 0, 0xFFFFFFFF)
    mem = raw.get("used_memory_bytes")
    used = None if mem is None else _integer(f"{where}.used_memory_bytes", mem, 0, NOT_AVAILABLE_U64 - 1)
    ptype = raw.get("type", "compute")
    if ptype not in _PROCESS_TYPES:
        raise ValueError(f"{where}.type: {ptype!r} is not one of {', '.join(_PROCESS_TYPES)}")
    gi = raw.get("gi_id")
    ci = raw.get("ci_id")
    return _SimProcess(
        pid=pid,
        used_memory_bytes=used,
        sm_util=_optional_number(f"{where}.sm_util", raw.get("sm_util")),
        mem_util=_number(f"{where}.mem_util", raw.get("mem_util", 0), 0, 100),
        type=ptype,
        enc_util=_optional_number(f"{where}.enc_util", raw.get("enc_util")),
        dec_util=_optional_number(f"{where}.dec_util", raw.get("dec_util")),
        gi_id=None if gi is None else _integer(f"{where}.gi_id", gi, 0, NO_INSTANCE_ID - 1),
        ci_id=None if ci is None else _integer(f"{where}.ci_id", ci, 0, NO_INSTANCE_ID - 1),
        garbage_util=_boolean(f"{where}.garbage_util", raw.get("garbage_util", False)),
    )


def _parse_errors(where: str, raw: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object, got {type(raw).__name__}")
    known = _device_functions()
    out = []
    for fn, err in raw.items():
        if fn not in known:
            raise ValueError(f"{where}: {fn!r} is not a simulated nvmlDevice* function")
        if err not in ERROR_CODES:
            raise ValueError(f"{where}.{fn}: {err!r} is not one of {', '.join(ERROR_CODES)}")
        out.append((fn, err))
    return tuple(sorted(out))


def _parse_field_errors(where: str, raw: Any) -> tuple[tuple[int, str], ...]:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object, got {type(raw).__name__}")
    out = []
    for fid, err in raw.items():
        if not (isinstance(fid, str) and fid.isdigit()):
            raise ValueError(f"{where}: field id {fid!r} is not a number")
        if err not in ERROR_CODES:
            raise ValueError(f"{where}.{fid}: {err!r} is not one of {', '.join(ERROR_CODES)}")
        out.append((int(fid), err))
    return tuple(sorted(out))


def _parse_pattern(where: str, raw: Any) -> tuple[tuple[float, float], ...]:
    steps = _list(where, raw)
    if not steps:
        raise ValueError(f"{where}: expected at least one [watts, seconds] step")
    out = []
    for i, step in enumerate(steps):
        if not isinstance(step, list) or len(step) != 2:
            raise ValueError(f"{where}[{i}]: expected [watts, seconds], got {step!r}")
        w = _number(f"{where}[{i}][0]", step[0], 0, 100_000)
        s = _number(f"{where}[{i}][1]", step[1], 0, 86_400)
        if s <= 0:
            raise ValueError(f"{where}[{i}][1]: a step must last more than 0 s")
        out.append((w, s))
    return tuple(out)


def _parse_mig(where: str, raw: Any) -> tuple[_SimGi, ...]:
    gis = []
    for i, g in enumerate(_list(where, raw)):
        w = f"{where}[{i}]"
        g = _object(w, g, _MIG_KEYS)
        for key in ("gi_id", "profile", "slices"):
            if key not in g:
                raise ValueError(f"{w}: missing key {key!r}")
        profile = _string(f"{w}.profile", g["profile"])
        m = _PROFILE.match(profile)
        if not m:
            raise ValueError(f"{w}.profile: {profile!r} is not like '3g.40gb'")
        slices = _integer(f"{w}.slices", g["slices"], 1, MAX_MIG_DEVICES)
        mem_mb = _integer(f"{w}.memory_mb", g.get("memory_mb", int(m.group(2)) * 1024), 1)
        cis_raw = g.get("compute_instances", [{"ci_id": 0, "slices": slices}])
        cis = []
        for j, c in enumerate(_list(f"{w}.compute_instances", cis_raw)):
            c = _object(f"{w}.compute_instances[{j}]", c, _CI_KEYS)
            if "ci_id" not in c:
                raise ValueError(f"{w}.compute_instances[{j}]: missing key 'ci_id'")
            cis.append(_SimCi(ci_id=_integer(f"{w}.compute_instances[{j}].ci_id", c["ci_id"], 0, 255),
                              slices=_integer(f"{w}.compute_instances[{j}].slices", c.get("slices", 1), 1, slices)))
        if not cis or len({c.ci_id for c in cis}) != len(cis) or sum(c.slices for c in cis) > slices:
            raise ValueError(f"{w}.compute_instances: need 1+ unique ci_ids whose slices fit the instance's {slices}")
        gis.append(_SimGi(gi_id=_integer(f"{w}.gi_id", g["gi_id"], 0, 255), profile=profile,
                          slices=slices, memory_mb=mem_mb, cis=tuple(cis)))
    if len({g.gi_id for g in gis}) != len(gis):
        raise ValueError(f"{where}: gi_ids must be unique")
    if sum(g.slices for g in gis) > MAX_MIG_DEVICES:
        raise ValueError(f"{where}: more than {MAX_MIG_DEVICES} slices in all")
    return tuple(gis)


def _parse_gpu(where: str, index: int, raw: Any) -> _SimGpu:
    raw = _object(where, raw, _GPU_KEYS)
    pattern = () if raw.get("power_pattern") is None else _parse_pattern(f"{where}.power_pattern", raw["power_pattern"])
    if "power_w" not in raw and not pattern:
        raise ValueError(f"{where}: missing key 'power_w' (or 'power_pattern')")
    power_w = pattern[0][0] if "power_w" not in raw else _number(f"{where}.power_w", raw["power_w"], 0, 100_000)
    procs_raw = _list(f"{where}.processes", raw.get("processes", []))
    processes = tuple(_parse_process(f"{where}.processes[{i}]", p) for i, p in enumerate(procs_raw))
    arch = raw.get("architecture", "hopper")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{where}.architecture: {arch!r} is not one of {', '.join(ARCHITECTURES)}")
    mig = _boolean(f"{where}.mig", raw.get("mig", False))
    gis = _parse_mig(f"{where}.mig_instances", raw.get("mig_instances", []))
    if gis and not mig:
        raise ValueError(f"{where}.mig_instances: needs \"mig\": true")
    cis = {(g.gi_id, c.ci_id) for g in gis for c in g.cis}
    for i, p in enumerate(processes):
        w = f"{where}.processes[{i}]"
        if gis:
            if p.gi_id is None:
                raise ValueError(f"{w}: missing key 'gi_id' (the GPU has mig_instances)")
            if (p.gi_id, p.ci_id or 0) not in cis:
                raise ValueError(f"{w}: no MIG instance gi_id={p.gi_id} ci_id={p.ci_id or 0}")
        elif p.gi_id is not None or p.ci_id is not None:
            raise ValueError(f"{w}: gi_id / ci_id need mig_instances on the GPU")
    mem_used = raw.get("memory_used_bytes")
    return _SimGpu(
        name=_string(f"{where}.name", raw.get("name", "Simulated GPU")),
        uuid=_string(f"{where}.uuid", raw.get("uuid", f"GPU-sim-{index}")),
        power_w=power_w,
        energy_counter=_boolean(f"{where}.energy_counter", raw.get("energy_counter", True)),
        memory_total_bytes=_integer(f"{where}.memory_total_bytes", raw.get("memory_total_bytes", 0)),
        memory_used_bytes=None if mem_used is None else _integer(f"{where}.memory_used_bytes", mem_used),
        processes=processes,
        counter_epoch=_integer(f"{where}.counter_epoch", raw.get("counter_epoch", 0), minimum=-(2**63)),
        lost=_boolean(f"{where}.lost", raw.get("lost", False)),
        mig=mig,
        util_supported=_boolean(f"{where}.util_supported", raw.get("util_supported", True)),
        hang_s=_number(f"{where}.hang_s", raw.get("hang_s", 0), 0, 3600),
        power_pattern=pattern,
        architecture=arch,
        errors=_parse_errors(f"{where}.errors", raw.get("errors", {})),
        mig_errors=_parse_errors(f"{where}.mig_errors", raw.get("mig_errors", {})),
        field_errors=_parse_field_errors(f"{where}.field_errors", raw.get("field_errors", {})),
        mig_instances=gis,
        util_garbage=_boolean(f"{where}.util_garbage", raw.get("util_garbage", True)),
    )


def read_sim_bytes(path: str) -> bytes:
    """The sim file's bytes; raise SimFileError naming the file and the problem."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise SimFileError(f"sim file {path}: not found") from None
    except OSError as exc:
        raise SimFileError(f"sim file {path}: cannot read: {exc.strerror or exc}") from None


# The NVIDIA GPUs parsed from the last file, in order: (file index, raw object, parsed
# GPU). A GPU whose object is equal to the one parsed before at its place is not parsed
# again (_SimGpu is immutable): a job starting changes one GPU's processes, not eight.
_GpuCache = list[tuple[int, Any, "_SimGpu"]]


def parse_sim_doc(path: str, data: bytes | None = None, gpu_cache: _GpuCache | None = None) -> _SimDoc:
    """Read (or take ``data``, the file's bytes) and validate a sim file; raise
    SimFileError naming the file and the problem. ``gpu_cache``: the GPUs of the last
    parse (updated in place when this one succeeds)."""
    if data is None:
        data = read_sim_bytes(path)
    try:
        doc = json.loads(data)
    except UnicodeDecodeError:
        raise SimFileError(f"sim file {path}: not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise SimFileError(f"sim file {path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    try:
        if not isinstance(doc, dict):
            raise ValueError(f"top level: expected an object with key 'gpus', got {type(doc).__name__}")
        unknown = sorted(set(doc) - _TOP_KEYS)
        if unknown:
            raise ValueError(f"top level: unknown key {unknown[0]!r} (known: {', '.join(sorted(_TOP_KEYS))})")
        gpus = doc.get("gpus")
        if not isinstance(gpus, list):
            raise ValueError(f"gpus: expected a list, got {type(gpus).__name__ if 'gpus' in doc else 'nothing'}")
        default_vendor = doc.get("vendor", "nvidia")
        if default_vendor not in VENDORS:
            raise ValueError(f"vendor: {default_vendor!r} is not one of {', '.join(VENDORS)}")
        nvidia = []  # (file index, object): AMD GPUs are the amdsmi simulator's, not validated here
        for i, g in enumerate(gpus):
            vendor = g.get("vendor", default_vendor) if isinstance(g, dict) else default_vendor
            if vendor not in VENDORS:
                raise ValueError(f"gpus[{i}].vendor: {vendor!r} is not one of {', '.join(VENDORS)}")
            if vendor == "nvidia":
                nvidia.append((i, g))
        before = gpu_cache or []
        parsed = []
        for index, (i, g) in enumerate(nvidia):
            if index < len(before) and before[index][0] == i and before[index][1] == g:
                parsed.append(before[index][2])
            else:
                parsed.append(_parse_gpu(f"gpus[{i}]", index, g))
        ns = doc.get("pid_namespace", "daemon")
        if ns not in ("daemon", "host"):
            raise ValueError(f"pid_namespace: {ns!r} is not one of daemon, host")
        result = _SimDoc(
            gpus=parsed,
            realistic=_boolean("realistic", doc.get("realistic", False)),
            driver_loaded=_boolean("driver_loaded", doc.get("driver_loaded", True)),
            pid_namespace=ns,
        )
    except ValueError as exc:
        raise SimFileError(f"sim file {path}: {exc}") from None
    uuids = [g.uuid for g in parsed]
    if len(set(uuids)) != len(uuids):
        raise SimFileError(f"sim file {path}: gpus: uuids must be unique, got {uuids}")
    if gpu_cache is not None:
        gpu_cache[:] = [(i, g, gpu) for (i, g), gpu in zip(nvidia, parsed)]
    return result


def parse_sim_file(path: str) -> list[_SimGpu]:
    """The GPUs of a sim file (``parse_sim_doc`` has the top-level keys too)."""
    return parse_sim_doc(path).gpus


@functools.cache
def _device_functions() -> frozenset[str]:
    """Functions that take a GPU (``nvmlDeviceGetCount`` does not); computed once."""
    return frozenset(n for n in dir(SimulatedNvml) if n.startswith("nvmlDevice")) - {"nvmlDeviceGetCount"}


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
        self._realistic = False
        self._init_gpu_count = 0  # realistic: the GPU count fixed at nvmlInit
        self.reports_host_pids = False  # "pid_namespace": "host" makes it True
        self.reloads = 0  # successful file reads, for tests
        # The last file's bytes and what they parsed to: the file is read on every
        # reload (each nvmlDeviceGetCount), parsed again only when its bytes changed.
        self._parsed: tuple[bytes, _SimDoc] | None = None
        self._gpu_cache: _GpuCache = []  # and each GPU's object, parsed again only when it changed

    # -- init / shutdown --

    def nvmlInit(self) -> None:
        with self._lock:
            doc = self._reload()
            if not doc.driver_loaded and self._init_count == 0:  # an open session holds the driver
                self._gpus = []  # counters start at 0 when the driver loads
                raise _nvml_error(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
            if self._init_count == 0:
                self._init_gpu_count = len(self._gpus)
            self._init_count += 1

    def nvmlInitWithFlags(self, flags: int) -> None:
        SimulatedNvml.nvmlInit(self)

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
            return self._init_gpu_count if self._realistic else len(self._gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> SimHandle:
        with self._lock:
            self._check_init()
            count = self._init_gpu_count if self._realistic else len(self._gpus)
            if not isinstance(index, int) or not 0 <= index < count:
                raise _nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        handle = SimHandle(index)
        self._enter(handle, "nvmlDeviceGetHandleByIndex")  # hang_s, lost, errors
        return handle

    def nvmlDeviceGetName(self, handle: SimHandle) -> str:
        self._enter(handle, "nvmlDeviceGetName")
        with self._lock:
            st = self._state(handle)
            if isinstance(handle, SimMigHandle):
                gi, _ = self._mig_device(st, handle)
                return f"{st.spec.name} MIG {gi.profile}"
            return st.spec.name

    def nvmlDeviceGetUUID(self, handle: SimHandle) -> str:
        self._enter(handle, "nvmlDeviceGetUUID")
        with self._lock:
            st = self._state(handle)
            if isinstance(handle, SimMigHandle):
                return f"MIG-{st.spec.uuid}-{handle.gi_id}-{handle.ci_id}"
            return st.spec.uuid

    def nvmlDeviceGetArchitecture(self, device: SimHandle) -> int:
        self._enter(device, "nvmlDeviceGetArchitecture")
        with self._lock:
            return ARCHITECTURES[self._state(device).spec.architecture]

    def nvmlDeviceGetPowerUsage(self, handle: SimHandle) -> int:
        """Milliwatts: the 1-s average in realistic mode on boards that average, else instant."""
        self._enter(handle, "nvmlDeviceGetPowerUsage")
        with self._lock:
            st = self._board_only(handle)
            now = self._clock()
            if self._realistic and st.spec.averages_power:
                return self._mw(self._average_w(st, now))
            return self._mw(st.instant_w(now))

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: SimHandle) -> int:
        """Millijoules since the (simulated) driver load."""
        self._enter(handle, "nvmlDeviceGetTotalEnergyConsumption")
        with self._lock:
            st = self._board_only(handle)
            if not st.spec.has_counter:
                raise _nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return self._counter_mj(st, self._clock())

    def nvmlDeviceGetFieldValues(self, handle: SimHandle, fieldIds: list) -> Any:
        """A ``c_nvmlFieldValue_t`` array with one ``nvmlReturn`` per field, as pynvml returns."""
        self._enter(handle, "nvmlDeviceGetFieldValues")
        with self._lock:
            st = self._state(handle)
            now = self._clock()
            values = (pynvml.c_nvmlFieldValue_t * len(fieldIds))()
            field_errors = dict(st.spec.field_errors)
            for i, fid in enumerate(fieldIds):
                try:
                    (values[i].fieldId, values[i].scopeId) = fid
                except TypeError:
                    values[i].fieldId = fid
                v = values[i]
                v.timestamp = self._wall_us(now)
                v.latencyUsec = 0
                ret = pynvml.NVML_SUCCESS
                if isinstance(handle, SimMigHandle):
                    ret = pynvml.NVML_ERROR_NOT_SUPPORTED  # power and energy: board only
                elif v.fieldId in field_errors:
                    ret = ERROR_CODES[field_errors[v.fieldId]]
                elif v.fieldId == FI_TOTAL_ENERGY and st.spec.has_counter:
                    v.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
                    v.value.ullVal = self._counter_mj(st, now)
                elif v.fieldId == FI_POWER_INSTANT:
                    v.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
                    v.value.uiVal = self._mw(st.instant_w(now))
                elif v.fieldId == FI_POWER_AVERAGE and st.spec.averages_power:
                    v.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
                    v.value.uiVal = self._mw(self._average_w(st, now))
                else:
                    ret = pynvml.NVML_ERROR_NOT_SUPPORTED
                v.nvmlReturn = ret
            return values

    def nvmlDeviceGetMemoryInfo(self, handle: SimHandle, version: int | None = None) -> pynvml.c_nvmlMemory_t:
        self._enter(handle, "nvmlDeviceGetMemoryInfo")
        with self._lock:
            st = self._state(handle)
            spec = st.spec
            if isinstance(handle, SimMigHandle):
                gi, _ = self._mig_device(st, handle)
                total = gi.memory_mb << 20
                used = sum(p.used_memory_bytes or 0 for p in spec.processes if p.gi_id == gi.gi_id)
            else:
                total = spec.memory_total_bytes
                used = spec.memory_used_bytes
                if used is None:
                    used = sum(p.used_memory_bytes or 0 for p in spec.processes)
            mem = pynvml.c_nvmlMemory_t()
            mem.total = total
            mem.used = min(used, total) if total else used
            mem.free = max(total - used, 0)
            return mem

    # Process lists: pynvml's unversioned names call _v3; _v2 uses the _v2 struct.

    def nvmlDeviceGetComputeRunningProcesses(self, handle: SimHandle) -> list:
        return self._process_list(handle, "nvmlDeviceGetComputeRunningProcesses", "", "compute")

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle: SimHandle) -> list:
        return self._process_list(handle, "nvmlDeviceGetComputeRunningProcesses", "_v3", "compute")

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: SimHandle) -> list:
        return self._process_list(handle, "nvmlDeviceGetComputeRunningProcesses", "_v2", "compute")

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: SimHandle) -> list:
        return self._process_list(handle, "nvmlDeviceGetGraphicsRunningProcesses", "", "graphics")

    def nvmlDeviceGetGraphicsRunningProcesses_v3(self, handle: SimHandle) -> list:
        return self._process_list(handle, "nvmlDeviceGetGraphicsRunningProcesses", "_v3", "graphics")

    def nvmlDeviceGetGraphicsRunningProcesses_v2(self, handle: SimHandle) -> list:
        return self._process_list(handle, "nvmlDeviceGetGraphicsRunningProcesses", "_v2", "graphics")

    def nvmlDeviceGetMPSComputeRunningProcesses(self, handle: SimHandle) -> list:
        return self._process_list(handle, "nvmlDeviceGetMPSComputeRunningProcesses", "", "mps")

    def nvmlDeviceGetMPSComputeRunningProcesses_v3(self, handle: SimHandle) -> list:
        return self._process_list(handle, "nvmlDeviceGetMPSComputeRunningProcesses", "_v3", "mps")

    def nvmlDeviceGetMPSComputeRunningProcesses_v2(self, handle: SimHandle) -> list:
        return self._process_list(handle, "nvmlDeviceGetMPSComputeRunningProcesses", "_v2", "mps")

    def nvmlDeviceGetProcessUtilization(self, handle: SimHandle, timeStamp: int) -> list:
        """Samples with ``timeStamp`` (µs since epoch) newer than the argument: every
        buffered one (idealised), or what a real driver returns (realistic mode)."""
        self._enter(handle, "nvmlDeviceGetProcessUtilization")
        with self._lock:
            st = self._state(handle)
            if isinstance(handle, SimMigHandle) or st.spec.mig or not st.spec.util_supported:
                raise _nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            if not self._realistic:
                newer = [s for s in st.samples if s.timeStamp > timeStamp]
                if not newer:
                    raise _nvml_error(pynvml.NVML_ERROR_NOT_FOUND)
                return newer
            now = self._clock()
            self._advance_util(st, now)
            newer = [s for s in st.latest.values() if s.timeStamp > timeStamp]
            if not newer:
                raise _nvml_error(pynvml.NVML_ERROR_NOT_FOUND)
            st.util_calls += 1
            out = list(newer)
            if st.spec.util_garbage:
                listed = {p.pid for p in st.spec.processes}
                pid = STRAY_PID
                while pid in listed:
                    pid -= 1
                ts = max(s.timeStamp for s in newer)
                if st.util_calls % FUTURE_EVERY == 0:
                    ts = self._wall_us(now) + FUTURE_US
                out.append(self._sample(pid, ts, *GARBAGE_UTIL))
            out.extend(pynvml.c_nvmlProcessUtilizationSample_t() for _ in range(UTIL_REPORTED_COUNT - len(out)))
            return out

    # -- MIG --

    def nvmlDeviceGetMigMode(self, device: SimHandle) -> list[int]:
        self._enter(device, "nvmlDeviceGetMigMode")
        with self._lock:
            st = self._board_only(device)
            if self._realistic and not st.spec.mig_capable:
                raise _nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            mode = pynvml.NVML_DEVICE_MIG_ENABLE if st.spec.mig else pynvml.NVML_DEVICE_MIG_DISABLE
            return [mode, mode]

    def nvmlDeviceIsMigDeviceHandle(self, device: SimHandle) -> ctypes.c_uint:
        """A ``c_uint`` (not an int), exactly as pynvml returns it."""
        self._enter(device, "nvmlDeviceIsMigDeviceHandle")
        with self._lock:
            self._state(device)
            return ctypes.c_uint(1 if isinstance(device, SimMigHandle) else 0)

    def nvmlDeviceGetMaxMigDeviceCount(self, device: SimHandle) -> int:
        self._enter(device, "nvmlDeviceGetMaxMigDeviceCount")
        with self._lock:
            st = self._board_only(device)
            if self._realistic and not st.spec.mig_capable:
                raise _nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return MAX_MIG_DEVICES if st.spec.mig_capable or st.spec.mig else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device: SimHandle, index: int) -> SimMigHandle:
        self._enter(device, "nvmlDeviceGetMigDeviceHandleByIndex")
        with self._lock:
            st = self._board_only(device)
            if not isinstance(index, int) or not 0 <= index < MAX_MIG_DEVICES:
                raise _nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            devices = st.spec.mig_devices() if st.spec.mig else []
            if index >= len(devices):
                raise _nvml_error(pynvml.NVML_ERROR_NOT_FOUND)
            gi, ci = devices[index]
            return SimMigHandle(index=device.index, gi_id=gi.gi_id, ci_id=ci.ci_id)

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, migDevice: SimMigHandle) -> SimHandle:
        self._enter(migDevice, "nvmlDeviceGetDeviceHandleFromMigDeviceHandle")
        with self._lock:
            self._state(migDevice)
            if not isinstance(migDevice, SimMigHandle):
                raise _nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            return SimHandle(migDevice.index)

    def nvmlDeviceGetGpuInstanceId(self, device: SimMigHandle) -> int:
        self._enter(device, "nvmlDeviceGetGpuInstanceId")
        with self._lock:
            self._state(device)
            if not isinstance(device, SimMigHandle):
                raise _nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            return device.gi_id

    def nvmlDeviceGetComputeInstanceId(self, device: SimMigHandle) -> int:
        self._enter(device, "nvmlDeviceGetComputeInstanceId")
        with self._lock:
            self._state(device)
            if not isinstance(device, SimMigHandle):
                raise _nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            return device.ci_id

    def nvmlDeviceGetAttributes_v2(self, device: SimHandle) -> pynvml.c_nvmlDeviceAttributes:
        self._enter(device, "nvmlDeviceGetAttributes_v2")
        return self._attributes(device)

    def nvmlDeviceGetAttributes(self, device: SimHandle) -> pynvml.c_nvmlDeviceAttributes:
        self._enter(device, "nvmlDeviceGetAttributes")
        return self._attributes(device)

    # -- internals --

    def _check_init(self) -> None:
        if self._init_count <= 0:
            raise _nvml_error(pynvml.NVML_ERROR_UNINITIALIZED)

    def _state(self, handle: Any) -> _GpuState:
        """The board state of a board or MIG handle; raises as NVML would."""
        self._check_init()
        if not isinstance(handle, (SimHandle, SimMigHandle)):
            raise _nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if handle.index >= len(self._gpus):
            raise _nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)  # vanished from the file
        st = self._gpus[handle.index]
        if st.spec.lost:
            raise _nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
        if isinstance(handle, SimMigHandle):
            self._mig_device(st, handle)
        return st

    def _board_only(self, handle: Any) -> _GpuState:
        st = self._state(handle)
        if isinstance(handle, SimMigHandle):
            raise _nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return st

    @staticmethod
    def _mig_device(st: _GpuState, handle: SimMigHandle) -> tuple[_SimGi, _SimCi]:
        if st.spec.mig:
            for gi, ci in st.spec.mig_devices():
                if (gi.gi_id, ci.ci_id) == (handle.gi_id, handle.ci_id):
                    return gi, ci
        raise _nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)  # instance destroyed

    def _enter(self, handle: Any, fn: str, version: str = "") -> None:
        """Common prologue of a call on a GPU: the hang (outside the lock), then the
        state checks and the configured ``errors`` / ``mig_errors`` for ``fn``."""
        with self._lock:
            hang_s = self._state(handle).spec.hang_s
        if hang_s > 0:
            time.sleep(hang_s)  # a hung driver call (outside the lock)
        with self._lock:
            spec = self._state(handle).spec
            errors = dict(spec.mig_errors if isinstance(handle, SimMigHandle) else spec.errors)
            err = errors.get(fn + version)
            if err is None and version and fn in _VERSIONED_LISTS:
                base = errors.get(fn)  # the unversioned name's error: its _v3, and _v2 unless missing symbol
                if base is not None and (version == "_v3" or base != "FUNCTION_NOT_FOUND"):
                    err = base
            if err is None:
                return
            if err == "FUNCTION_NOT_FOUND" and not version and fn in _VERSIONED_LISTS:
                # pynvml's throwOnVersionMismatch turns the missing _v3 symbol into this.
                raise pynvml.NVMLLibraryMismatchError(
                    "Unversioned function called and the pyNVML version does not match the NVML lib version. "
                    "Either use matching pyNVML and NVML lib versions or use a versioned function such as "
                    + fn + "_v2")
            raise _nvml_error(ERROR_CODES[err])

    def _process_list(self, handle: Any, fn: str, version: str, kind: str) -> list:
        self._enter(handle, fn, version)
        with self._lock:
            st = self._state(handle)
            struct = pynvml.c_nvmlProcessInfo_v2_t if version == "_v2" else pynvml.c_nvmlProcessInfo_t
            mig = handle if isinstance(handle, SimMigHandle) else None
            out = []
            for p in st.spec.processes:
                if kind not in p.type:
                    continue
                if mig is not None and (p.gi_id, p.ci_id or 0) != (mig.gi_id, mig.ci_id):
                    continue
                info = struct()
                info.pid = p.pid
                info.usedGpuMemory = NOT_AVAILABLE_U64 if p.used_memory_bytes is None else p.used_memory_bytes
                info.gpuInstanceId = NO_INSTANCE_ID if p.gi_id is None else p.gi_id
                info.computeInstanceId = NO_INSTANCE_ID if p.gi_id is None else (p.ci_id or 0)
                # Exactly what pynvml does with the driver's array.
                obj = pynvml.nvmlStructToFriendlyObject(info)
                if obj.usedGpuMemory == NOT_AVAILABLE_U64:
                    obj.usedGpuMemory = None
                out.append(obj)
            return out

    def _attributes(self, handle: Any) -> pynvml.c_nvmlDeviceAttributes:
        with self._lock:
            st = self._state(handle)
            spec = st.spec
            attrs = pynvml.c_nvmlDeviceAttributes()
            if isinstance(handle, SimMigHandle):
                gi, ci = self._mig_device(st, handle)
                per_slices = _MIG_SMS.get(spec.architecture, {})
                attrs.multiprocessorCount = per_slices.get(ci.slices, 16 * ci.slices)
                # Shared engines as the H100 MIG capture shows them: CE, DEC, JPG = slices.
                attrs.sharedCopyEngineCount = gi.slices
                attrs.sharedDecoderCount = gi.slices
                attrs.sharedEncoderCount = 0
                attrs.sharedJpegCount = gi.slices
                attrs.sharedOfaCount = 0
                attrs.gpuInstanceSliceCount = gi.slices
                attrs.computeInstanceSliceCount = ci.slices
                attrs.memorySizeMB = gi.memory_mb
            else:
                attrs.multiprocessorCount = _BOARD_SMS[spec.architecture]
                attrs.memorySizeMB = spec.memory_total_bytes >> 20
            return attrs

    def _wall_us(self, clock_s: float) -> int:
        return int(round((self._epoch_offset_s + clock_s) * 1e6))

    @staticmethod
    def _mw(watts: float) -> int:
        return int(round(watts * 1000.0))

    @staticmethod
    def _average_w(st: _GpuState, now: float) -> float:
        return st.energy_between_j(now - AVERAGE_WINDOW_S, now) / AVERAGE_WINDOW_S

    def _counter_mj(self, st: _GpuState, now: float) -> int:
        self._integrate(st, now)
        if not self._realistic:
            return math.floor(st.energy_mj + 1e-6)  # 1e-6: float noise
        # The counter last advanced at the latest 100 ms step boundary.
        step = math.floor(now / COUNTER_STEP_S + 1e-9) * COUNTER_STEP_S  # 1e-9: float noise
        pending_mj = st.energy_between_j(max(step, st.reset_at_s), now) * 1000.0
        return max(math.floor(st.energy_mj - pending_mj + 1e-6), 0)  # 1e-6: float noise

    @staticmethod
    def _integrate(st: _GpuState, now_s: float) -> None:
        if now_s > st.integrated_to_s:
            st.energy_mj += st.energy_between_j(st.integrated_to_s, now_s) * 1000.0
            st.integrated_to_s = now_s

    @staticmethod
    def _sample(pid: int, ts: int, sm: float, mem: float, enc: float, dec: float) -> Any:
        s = pynvml.c_nvmlProcessUtilizationSample_t()
        s.pid = pid
        s.timeStamp = ts
        s.smUtil = int(round(sm))
        s.memUtil = int(round(mem))
        s.encUtil = int(round(enc))
        s.decUtil = int(round(dec))
        return s

    def _process_sample(self, p: _SimProcess, ts: int) -> Any:
        if p.garbage_util and self._realistic:
            return self._sample(p.pid, ts, *GARBAGE_UTIL)
        return self._sample(p.pid, ts, p.sm_util or 0, p.mem_util, p.enc_util or 0, p.dec_util or 0)

    def _advance_util(self, st: _GpuState, now: float) -> None:
        """Realistic: refresh each active process's latest entry to the last sampling instant."""
        wall = self._wall_us(now)
        ts = wall - wall % UTIL_PERIOD_US
        for p in st.spec.processes:
            if p.sampled(True):
                st.latest[p.pid] = self._process_sample(p, ts)

    def _reload(self) -> _SimDoc:
        data = read_sim_bytes(self.sim_file)  # raises SimFileError; old state stays
        if self._parsed is not None and self._parsed[0] == data:
            doc = self._parsed[1]  # the same bytes: the same (immutable) document
        else:
            doc = parse_sim_doc(self.sim_file, data, self._gpu_cache)  # raises SimFileError; old state stays
            self._parsed = (data, doc)
        now = self._clock()
        ts_us = self._wall_us(now)
        states: list[_GpuState] = []
        for i, spec in enumerate(doc.gpus):
            old = self._gpus[i] if i < len(self._gpus) else None
            if old is not None and old.spec.uuid == spec.uuid:
                self._integrate(old, now)  # old power up to now
                if self._realistic:
                    self._advance_util(old, now)  # old activity up to now
                if spec.counter_epoch != old.spec.counter_epoch:
                    old.energy_mj = 0.0  # driver reload
                    old.reset_at_s = now
                old.integrated_to_s = max(old.integrated_to_s, now)
                sim_power.update_timeline(old.power, spec.power_w, spec.power_pattern, now, _POWER_HISTORY_S)
                listed = {p.pid for p in spec.processes}
                old.latest = {pid: s for pid, s in old.latest.items() if pid in listed}
                old.spec = spec  # new power from now on
                st = old
            else:
                st = _GpuState(spec=spec, energy_mj=0.0, integrated_to_s=now)
                st.power = sim_power.new_timeline(spec.power_w, spec.power_pattern, now)
            if not doc.realistic:
                for p in spec.processes:
                    if p.sampled(False):
                        st.samples.append(self._process_sample(p, ts_us))
            states.append(st)
        self._gpus = states
        self._realistic = doc.realistic
        self.reports_host_pids = doc.pid_namespace == "host"
        self.reloads += 1
        return doc
