"""A simulated amdsmi: the ``amdsmi`` Python functions the AMD GPU adapter calls, driven
by the same JSON sim file as the NVML simulator.

Its one job is to stand in for ROCm's ``amdsmi`` package at its Python boundary, so the
real adapter (``sources/gpu/amd.py``) runs unchanged on machines without an AMD GPU.
Nothing above this boundary is simulated: processes are real, the adapter is real.

``SimulatedAmdSmi(sim_file, clock=time.monotonic)`` exposes amdsmi's own function names
and signatures as methods, returns what amdsmi returns (the same dict keys, units and
"N/A" strings) and raises amdsmi's exception classes: the real ones when the ``amdsmi``
package can be imported, else the mirrors defined here (same names, same
constructor, ``get_error_code()``, ``get_error_info()`` and ``str()``). The instance also
carries those names as attributes (``sim.AmdSmiLibraryException``, ``sim.AmdSmiInitFlags``,
``sim.AMDSMI_STATUS_NOT_SUPPORTED`` ...), so a caller can use ``lib.X`` whether ``lib``
is the real module or this simulator. Every behaviour below is tested in
``tests/test_amdsmi_sim.py``.

The real package, read for this (facts and where they come from)
-----------------------------------------------------------------
ROCm/amdsmi, ``py-interface/amdsmi_interface.py``, ``amdsmi_exception.py``,
``amdsmi_wrapper.py``, ``include/amd_smi/amdsmi.h``, ``src/amd_smi/*.cc`` and
``rocm_smi/src/rocm_smi.cc`` at commit 0ceca28f4139dced5e9b5739a3f393780d7add48
(2024-10-23, the ROCm 6.3 development line; "HEAD" below), at tags rocm-6.1.0 and
rocm-6.2.0, and the PyPI wheel ``amdsmi-7.0.2-py3-none-any.whl`` (2025-10-11, "7.0.2").

- Exceptions (amdsmi_exception.py): ``AmdSmiException(Exception)``;
  ``AmdSmiLibraryException(err_code)`` stores ``abs(err_code)`` in ``err_code``, has
  ``get_error_code()``, ``get_error_info()`` ("AMDSMI_STATUS_NOT_SUPPORTED - Feature not
  supported", ...) and ``str()`` = "Error code:\\n\\t<code> | <info>";
  ``AmdSmiRetryException()`` / ``AmdSmiTimeoutException()`` are LibraryExceptions for
  RETRY / TIMEOUT; ``AmdSmiParameterException(receivedValue, expectedType, msg=None)``
  is raised by every wrapper when a handle is not an ``amdsmi_processor_handle``.
  ``_check_res`` (amdsmi_interface.py) raises Retry for 9, Timeout for 8, else
  LibraryException for any non-zero status.
- Status codes (amdsmi_wrapper.py): SUCCESS 0, INVAL 1, NOT_SUPPORTED 2, TIMEOUT 8,
  RETRY 9, NO_PERM 10, IO 12, FILE_ERROR 14, INIT_ERROR 18, BUSY 30, NOT_FOUND 31,
  NOT_INIT 32, DRIVER_NOT_LOADED 34, NO_DATA 40, UNEXPECTED_DATA 43,
  UNKNOWN_ERROR 0xFFFFFFFF.
- ``amdsmi_init(flag=AmdSmiInitFlags.INIT_AMD_GPUS)``: a flag that is not an
  ``AmdSmiInitFlags`` raises AmdSmiParameterException. Not reference counted
  (src/amd_smi/amd_smi.cc: ``if (initialized_lib) return SUCCESS``): a second init is a
  no-op and ONE ``amdsmi_shut_down()`` ends the session; shut_down without init
  succeeds. Every call outside a session raises NOT_INIT (``AMDSMI_CHECK_INIT``). A
  handle from an earlier session raises NOT_FOUND (``handle_to_processor``). The
  README: "driver must be loaded for amdsmi_init() to pass": here DRIVER_NOT_LOADED.
- ``amdsmi_get_processor_handles()`` -> list of handles, one per *logical* GPU: on
  MI300X in a non-SPX compute partition mode every partition is its own handle (CHANGELOG
  "Fixed CPX not showing total number of logical GPUs"; amdsmi.h: "On MI300X, SPX: 1,
  DPX: 2, QPX: 4, CPX: 8"). The partitions of one board share its UUID (the UUID is
  generated from the ASIC serial, device id and a fixed 0xff, src/amd_smi/amd_smi.cc
  ``amdsmi_get_gpu_device_uuid``), report the board's power and energy (CHANGELOG's
  ``amd-smi monitor`` capture: four logical GPUs, one board, 248/247/247/247 W), and
  their BDF function number is the partition id (CHANGELOG: "bits [2:0] = Function
  (partition id maybe in bits [2:0])"); ``amdsmi_get_gpu_kfd_info`` gives
  ``current_partition_id``.
- ``amdsmi_get_gpu_device_uuid(h)`` -> str (36 characters).
- ``amdsmi_get_gpu_asic_info(h)`` -> dict: market_name, vendor_id ("0x1002"),
  vendor_name, subvendor_id, device_id (hex strings), rev_id, asic_serial
  ("0x%016X"), oam_id (int or "N/A"), num_compute_units (int or "N/A"),
  target_graphics_version ("gfx942"); 7.0.2 adds subsystem_id.
- ``amdsmi_get_energy_count(h)`` -> dict: ``energy_accumulator`` (uint64 count of
  ``counter_resolution`` units), ``counter_resolution`` (float, µJ per unit; amdsmi.h:
  "resolution of the counter ... in micro Joules"; rocm_smi.cc hard-codes
  ``kEnergyCounterResolution = 15.3F`` for every ASIC, while the kernel's gpu_metrics
  documents the accumulator in 15.259 µJ (2^-16 J) units: real readings are ~0.27 % high,
  a bias of AMD's, not simulated), ``timestamp`` (ns, "Resolution: 1 ns"). The key
  changed with the API: rocm-6.1.0 and rocm-6.2.0 return only ``power`` (the
  accumulator, despite the name); HEAD returns both ``power`` ("deprecating in 6.4")
  and ``energy_accumulator``; 7.0.2 returns only ``energy_accumulator``. The value comes
  from gpu_metrics' ``energy_accumulator`` (rocm_smi.cc ``rsmi_dev_energy_count_get``),
  which restarts at 0 when the driver reloads. Not supported in a VM guest (amdsmi.h).
  The field is 64-bit from gpu_metrics v1.1 on and was 32-bit in v1.0
  (rocm_smi/include/rocm_smi/rocm_smi_gpu_metrics.h: "v1 mod. (32->64)"): such a board's
  accumulator wraps at 2^32 units (about 66 kJ at 15.3 µJ). Metrics tables v1.1-v1.3
  (MI100, MI200) carry ``average_socket_power`` only, v1.4-v1.6 (MI300)
  ``current_socket_power`` only (same header).
- ``amdsmi_get_power_info(h)`` -> dict of ints in watts: ``current_socket_power``,
  ``average_socket_power``, ``gfx_voltage``, ``soc_voltage``, ``mem_voltage`` (mV),
  ``power_limit``; 7.0.2 adds ``socket_power`` first. Fields the ASIC's gpu_metrics lack
  are 0xFFFF (amd_smi.cc presets every field to 0xFFFF); rocm-6.2.0 and later turn
  0xFFFF into the string "N/A", rocm-6.1.0 returns 65535 as is. MI300-class boards
  (gpu_metrics 1.4+) fill only the current socket power, older Instinct and Radeon the
  average one.
- Processes, rocm-6.1.0: ``amdsmi_get_gpu_process_list(h)`` -> list of
  ``amdsmi_process_handle_t`` (ctypes.c_uint32, the PID) of the processes whose
  ``/proc/<pid>/fdinfo`` the caller can read (fdinfo.cc skips the others: an
  unprivileged caller sees only its own processes); ``amdsmi_get_gpu_process_info(h,
  process)`` -> dict {name, pid, mem, engine_usage {gfx, enc}, memory_usage {gtt_mem,
  cpu_mem, vram_mem}}, NO_PERM when that fdinfo is unreadable, AmdSmiParameterException
  when ``process`` is not a c_uint32. rocm-6.2.0 and later: no
  ``amdsmi_get_gpu_process_info``; ``amdsmi_get_gpu_process_list(h)`` returns the same
  dicts directly, for every process KFD knows on that GPU; a process whose fdinfo is
  unreadable keeps only pid and ``memory_usage.vram_mem`` (from KFD): name "N/A", mem 0,
  engine usage 0 (amd_smi_gpu_device.cc ``get_process_info`` fallback). 7.0.2 adds
  ``cu_occupancy`` (int or "N/A"). Units (amdsmi.h ``amdsmi_proc_info_t``): memory in
  bytes; engine usage "How much time the process spend using these engines in ns",
  cumulative (fdinfo ``drm-engine-gfx`` / ``drm-engine-enc``), not a percentage.
- ``amdsmi_get_gpu_vram_usage(h)`` -> {"vram_total", "vram_used"} in MiB
  (``/ (1024 * 1024)``, amd_smi.cc).
- ``amdsmi_get_gpu_activity(h)`` -> {"gfx_activity", "umc_activity", "mm_activity"}
  in %, 0xFFFF -> "N/A".
- ``amdsmi_get_gpu_compute_partition(h)`` / ``amdsmi_get_gpu_memory_partition(h)`` ->
  str ("SPX", "DPX", "TPX", "QPX", "CPX" / "NPS1", "NPS2", "NPS4", "NPS8");
  NOT_SUPPORTED on boards without partitions.
- ``amdsmi_get_gpu_device_bdf(h)`` -> "0000:23:00.0"; ``amdsmi_get_gpu_kfd_info(h)`` ->
  {"kfd_id", "node_id", "current_partition_id"}.
- ``import amdsmi`` without ROCm's ``libamd_smi.so`` prints two lines to stdout and
  raises ``KeyError`` (amdsmi_wrapper.py ``_libraries['libamd_smi.so']``), not
  ImportError. The PyPI package is only this wrapper; the library comes with ROCm.

The sim file (AMD part)
-----------------------
The NVML simulator's file (see ``nvml_sim.py``); a GPU object with ``"vendor": "amd"``
(default: the top-level ``"vendor"``, else "nvidia") is an AMD board, shown here and
ignored by the NVML simulator; NVIDIA GPUs are ignored here (and not validated here).
AMD boards are numbered 0.. in file order among AMD boards. Example::

    {"gpus": [{"vendor": "amd", "name": "AMD Instinct MI300X", "power_w": 600,
               "processes": [{"pid": 123, "used_memory_bytes": 1073741824,
                              "gfx_util": 80}]}]}

Top-level keys used here: ``gpus``, ``vendor``, ``pid_namespace`` (as for NVML:
``reports_host_pids``), ``amdgpu_loaded`` (bool, default true: false makes
``amdsmi_init`` raise DRIVER_NOT_LOADED), ``amdsmi_api`` ("6.1" | "6.2" | "6.3" |
"7.0", default "7.0": which version's return shapes, see above). ``realistic`` and
``driver_loaded`` are NVIDIA's and ignored here. Unknown keys are errors.

AMD GPU keys (all optional but ``power_w``, which ``power_pattern`` may replace):

- ``vendor`` ("amd"), ``name`` (market name, default "AMD Instinct MI300X"), ``uuid``
  (default derived from the board index), ``bdf`` (default "0000:<bus>:00.0").
- ``power_w`` / ``power_pattern``: as for NVML (watts; ``[[watts, seconds], ...]``).
- ``energy_counter`` (bool, default true): false makes ``amdsmi_get_energy_count``
  raise NOT_SUPPORTED (a VM guest, some Radeon boards).
- ``counter_resolution_uj`` (number, default 15.3): the reported resolution; the
  accumulator counts in these units.
- ``counter_epoch`` (int): when it changes, the accumulator restarts at 0 (driver reload).
- ``accumulator_bits`` (32 | 64, default 64): 32 simulates a gpu_metrics v1.0 board,
  whose accumulator wraps at 2^32 units.
- ``power_sensor`` ("current" | "average" | "both" | "none"): which socket power fields
  exist (others "N/A"); default "current" for names with MI300 / MI325, else "average".
  "average" is the mean power over the last second.
- ``memory_total_bytes`` (int, default 192 GiB); ``memory_used_bytes`` (default: the
  processes' ``used_memory_bytes`` summed).
- ``compute_partition`` (null | "SPX" | "DPX" | "TPX" | "QPX" | "CPX"; default null: the
  board has no partitions and both partition queries raise NOT_SUPPORTED),
  ``memory_partition`` ("NPS1" | "NPS2" | "NPS4" | "NPS8", default "NPS1"),
  ``xcd_count`` (int, default 8: CPX has one partition per XCD).
- ``errors``: ``{"<amdsmi function>": "<STATUS>"}``: that function raises that status
  for every handle of this board. STATUS is one of the names in ``STATUS_CODES``.
- ``processes``: list of process objects:
  ``{"pid": int, "name": str, "used_memory_bytes": int, "gtt_memory_bytes": int,
  "gfx_util": 0..100, "enc_util": 0..100, "partition": int, "fdinfo_readable": bool}``.
  ``gfx_util`` / ``enc_util`` are the share of time this process keeps that engine busy;
  the simulator integrates them into cumulative nanoseconds from the moment the process
  first appears (a process that leaves and comes back starts at 0, as a new fd does).
  ``partition`` (default 0) is the logical GPU it runs on. ``fdinfo_readable`` (default
  true) false: the caller cannot read its fdinfo (another user's process, unprivileged
  daemon). NVIDIA's ``sm_util`` is rejected with a hint.

When the file is read: on ``amdsmi_init`` and on every ``amdsmi_get_processor_handles``
call (the adapter calls it once per tick). The set of boards and partitions is fixed at
``amdsmi_init`` (the library enumerates devices then): a board added to the file appears
after ``amdsmi_shut_down`` + ``amdsmi_init``; a handle whose board left the file raises
NOT_FOUND. At each read, counters and engine times are first advanced to ``clock()`` at
the previous file's values. A missing or malformed file raises ``SimFileError``, an
``AmdSmiLibraryException`` (FILE_ERROR) whose ``str()`` names the file and the problem;
the previous good state stays in force.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import io
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from . import sim_power
from .nvml_sim import (
    _boolean,
    _integer,
    _list,
    _number,
    _object,
    _parse_pattern,
    _string,
)

# Status codes, amdsmi_wrapper.py.
AMDSMI_STATUS_SUCCESS = 0
STATUS_CODES: dict[str, int] = {
    "INVAL": 1,
    "NOT_SUPPORTED": 2,
    "TIMEOUT": 8,
    "RETRY": 9,
    "NO_PERM": 10,
    "IO": 12,
    "FILE_ERROR": 14,
    "INIT_ERROR": 18,
    "BUSY": 30,
    "NOT_FOUND": 31,
    "NOT_INIT": 32,
    "DRIVER_NOT_LOADED": 34,
    "NO_DATA": 40,
    "UNEXPECTED_DATA": 43,
    "UNKNOWN_ERROR": 0xFFFFFFFF,
}
_ERR_INFO = {  # amdsmi_exception.py set_err_info(), for the codes simulated
    1: "AMDSMI_STATUS_INVAL - Invalid parameters",
    2: "AMDSMI_STATUS_NOT_SUPPORTED - Feature not supported",
    8: "AMDSMI_STATUS_TIMEOUT - Timeout in API call",
    9: "AMDSMI_STATUS_RETRY - Retry operation",
    10: "AMDSMI_STATUS_NO_PERM - Permission Denied",
    12: "AMDSMI_STATUS_IO - I/O Error",
    14: "AMDSMI_STATUS_FILE_ERROR - Error opening file",
    18: "AMDSMI_STATUS_INIT_ERROR - Initialization error",
    30: "AMDSMI_STATUS_BUSY - Device busy",
    31: "AMDSMI_STATUS_NOT_FOUND - Device Not found",
    32: "AMDSMI_STATUS_NOT_INIT - Device not initialized",
    34: "AMDSMI_STATUS_DRIVER_NOT_LOADED - Driver not loaded",
    40: "AMDSMI_STATUS_NO_DATA - No data was found for given input",
    43: "AMDSMI_STATUS_UNEXPECTED_DATA - The data read or provided was unexpected",
}
NA_U16 = 0xFFFF  # "not available" in power / activity fields
NA_U32 = 0xFFFFFFFF
DEFAULT_RESOLUTION_UJ = 15.3  # rocm_smi.cc kEnergyCounterResolution
AVERAGE_WINDOW_S = 1.0
MAX_NUM_PROCESSES = 1024  # amdsmi_interface.py
API_VERSIONS = ("6.1", "6.2", "6.3", "7.0")
COMPUTE_PARTITIONS = {"SPX": 1, "DPX": 2, "TPX": 3, "QPX": 4, "CPX": 0}  # CPX: xcd_count
MEMORY_PARTITIONS = {"NPS1": 1, "NPS2": 2, "NPS4": 4, "NPS8": 8}
_VENDOR_NAME = "Advanced Micro Devices Inc. [AMD/ATI]"
# market name fragment -> (device id, compute units, gfx target); public PCI ids.
_ASICS = (
    ("MI325X", 0x74A5, 304, "gfx942"),
    ("MI300X", 0x74A1, 304, "gfx942"),
    ("MI300A", 0x74A0, 228, "gfx942"),
    ("MI250X", 0x740C, 220, "gfx90a"),
    ("MI250", 0x740C, 208, "gfx90a"),
    ("MI210", 0x740F, 104, "gfx90a"),
    ("MI100", 0x738C, 120, "gfx908"),
)


# --- exceptions: amdsmi's own when importable, else mirrors ---------------------------------


class _MirrorAmdSmiException(Exception):
    """Base smi exception class (mirror of amdsmi.AmdSmiException)."""


class _MirrorAmdSmiLibraryException(_MirrorAmdSmiException):
    def __init__(self, err_code: int):
        err_code = abs(err_code)
        super().__init__(err_code)
        self.err_code = err_code
        self.err_info = _ERR_INFO.get(err_code, "AMDSMI_STATUS_UNKNOWN_ERROR - An unknown error occurred")

    def __str__(self) -> str:
        return f"Error code:\n\t{self.err_code} | {self.err_info}"

    def get_error_info(self) -> str:
        return self.err_info

    def get_error_code(self) -> int:
        return self.err_code


class _MirrorAmdSmiRetryException(_MirrorAmdSmiLibraryException):
    def __init__(self) -> None:
        super().__init__(STATUS_CODES["RETRY"])


class _MirrorAmdSmiTimeoutException(_MirrorAmdSmiLibraryException):
    def __init__(self) -> None:
        super().__init__(STATUS_CODES["TIMEOUT"])


class _MirrorAmdSmiParameterException(_MirrorAmdSmiException):
    def __init__(self, receivedValue: Any, expectedType: Any, msg: str | None = None):
        super().__init__(msg)
        self.err_code = None
        self.actualType = type(receivedValue)
        self.expectedType = expectedType
        self.err_msg = ("Invalid parameter:\n" + f"Actual type: {self.actualType}\n"
                        + f"Expected type: {self.expectedType}") if msg is None else msg

    def __str__(self) -> str:
        return self.err_msg


class _MirrorAmdSmiInitFlags(IntEnum):
    INIT_ALL_PROCESSORS = 0xFFFFFFFF
    INIT_AMD_CPUS = 1
    INIT_AMD_GPUS = 2
    INIT_AMD_APUS = 3
    INIT_NON_AMD_CPUS = 4
    INIT_NON_AMD_GPUS = 8


def import_real_amdsmi() -> Any | None:
    """The real ``amdsmi`` module, or None. Importing it without ROCm's library prints
    to stdout and raises KeyError (see above): both are contained here."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import amdsmi  # type: ignore[import-not-found]
        return amdsmi
    except Exception:  # ImportError, KeyError, OSError: no usable amdsmi
        return None


for _cls in (_MirrorAmdSmiException, _MirrorAmdSmiLibraryException, _MirrorAmdSmiRetryException,
             _MirrorAmdSmiTimeoutException, _MirrorAmdSmiParameterException, _MirrorAmdSmiInitFlags):
    _cls.__name__ = _cls.__qualname__ = _cls.__name__.replace("_Mirror", "")  # amdsmi's names

_REAL = import_real_amdsmi()
AmdSmiException: Any = getattr(_REAL, "AmdSmiException", _MirrorAmdSmiException)
AmdSmiLibraryException: Any = getattr(_REAL, "AmdSmiLibraryException", _MirrorAmdSmiLibraryException)
AmdSmiRetryException: Any = getattr(_REAL, "AmdSmiRetryException", _MirrorAmdSmiRetryException)
AmdSmiTimeoutException: Any = getattr(_REAL, "AmdSmiTimeoutException", _MirrorAmdSmiTimeoutException)
AmdSmiParameterException: Any = getattr(_REAL, "AmdSmiParameterException", _MirrorAmdSmiParameterException)
AmdSmiInitFlags: Any = getattr(_REAL, "AmdSmiInitFlags", _MirrorAmdSmiInitFlags)


def _raise_status(code: int) -> None:
    """amdsmi_interface._check_res: Retry for RETRY, Timeout for TIMEOUT, else Library."""
    if code == STATUS_CODES["RETRY"]:
        raise AmdSmiRetryException()
    if code == STATUS_CODES["TIMEOUT"]:
        raise AmdSmiTimeoutException()
    raise AmdSmiLibraryException(code)


class SimFileError(AmdSmiLibraryException):  # type: ignore[misc, valid-type]
    """The sim file is missing, unreadable or malformed (status FILE_ERROR); ``str()``
    names the file and the problem."""

    def __init__(self, message: str):
        super().__init__(STATUS_CODES["FILE_ERROR"])
        self.message = message

    def __str__(self) -> str:
        return self.message


# --- the sim file -------------------------------------------------------------------------


@dataclass(frozen=True)
class _SimProcess:
    pid: int
    name: str
    used_memory_bytes: int
    gtt_memory_bytes: int
    gfx_util: float
    enc_util: float
    partition: int
    fdinfo_readable: bool


@dataclass(frozen=True)
class _SimBoard:
    name: str
    uuid: str
    bdf: str
    power_w: float
    power_pattern: tuple[tuple[float, float], ...]
    energy_counter: bool
    resolution_uj: float
    counter_epoch: int
    power_sensor: str
    memory_total_bytes: int
    memory_used_bytes: int | None
    compute_partition: str | None
    memory_partition: str
    xcd_count: int
    errors: tuple[tuple[str, str], ...]
    processes: tuple[_SimProcess, ...]
    accumulator_bits: int = 64

    @property
    def partitions(self) -> int:
        if self.compute_partition is None:
            return 1
        n = COMPUTE_PARTITIONS[self.compute_partition]
        return self.xcd_count if n == 0 else n


@dataclass(frozen=True)
class _SimDoc:
    boards: list[_SimBoard]
    api: str = "7.0"
    amdgpu_loaded: bool = True
    pid_namespace: str = "daemon"


_TOP_KEYS = {"gpus", "vendor", "realistic", "driver_loaded", "pid_namespace", "amdgpu_loaded", "amdsmi_api"}
_GPU_KEYS = {
    "vendor", "name", "uuid", "bdf", "power_w", "power_pattern", "energy_counter",
    "counter_resolution_uj", "counter_epoch", "power_sensor", "memory_total_bytes",
    "memory_used_bytes", "compute_partition", "memory_partition", "xcd_count", "errors",
    "processes", "accumulator_bits",
}
_PROCESS_KEYS = {"pid", "name", "used_memory_bytes", "gtt_memory_bytes", "gfx_util", "enc_util",
                 "partition", "fdinfo_readable"}
_POWER_SENSORS = ("current", "average", "both", "none")
VENDORS = ("nvidia", "amd")


def gpu_vendor(raw_gpu: Any, top_vendor: str) -> str:
    """The vendor of one GPU object of a sim file (shared by both simulators)."""
    if isinstance(raw_gpu, dict) and "vendor" in raw_gpu:
        return raw_gpu["vendor"]
    return top_vendor


def top_vendor(doc: dict[str, Any]) -> str:
    v = doc.get("vendor", "nvidia")
    if v not in VENDORS:
        raise ValueError(f"vendor: {v!r} is not one of {', '.join(VENDORS)}")
    return v


def _parse_process(where: str, raw: Any, partitions: int) -> _SimProcess:
    if isinstance(raw, dict) and "sm_util" in raw:
        raise ValueError(f"{where}: 'sm_util' is an NVIDIA key; an AMD process has 'gfx_util' (and 'enc_util')")
    raw = _object(where, raw, _PROCESS_KEYS)
    if "pid" not in raw:
        raise ValueError(f"{where}: missing key 'pid'")
    part = _integer(f"{where}.partition", raw.get("partition", 0), 0)
    if part >= partitions:
        raise ValueError(f"{where}.partition: {part} but the board has {partitions} partition(s)")
    return _SimProcess(
        pid=_integer(f"{where}.pid", raw["pid"], 0, 0xFFFFFFFF),
        name=_string(f"{where}.name", raw.get("name", "python3")),
        used_memory_bytes=_integer(f"{where}.used_memory_bytes", raw.get("used_memory_bytes", 0) or 0),
        gtt_memory_bytes=_integer(f"{where}.gtt_memory_bytes", raw.get("gtt_memory_bytes", 0)),
        gfx_util=_number(f"{where}.gfx_util", raw.get("gfx_util", 0), 0, 100),
        enc_util=_number(f"{where}.enc_util", raw.get("enc_util", 0), 0, 100),
        partition=part,
        fdinfo_readable=_boolean(f"{where}.fdinfo_readable", raw.get("fdinfo_readable", True)),
    )


def _device_functions() -> set[str]:
    return {n for n in dir(SimulatedAmdSmi) if n.startswith("amdsmi_get_gpu") or n in (
        "amdsmi_get_energy_count", "amdsmi_get_power_info")} | {"amdsmi_get_gpu_process_info"}


def _parse_board(where: str, index: int, raw: Any) -> _SimBoard:
    raw = _object(where, raw, _GPU_KEYS)
    pattern = () if raw.get("power_pattern") is None else _parse_pattern(f"{where}.power_pattern", raw["power_pattern"])
    if "power_w" not in raw and not pattern:
        raise ValueError(f"{where}: missing key 'power_w' (or 'power_pattern')")
    power_w = pattern[0][0] if "power_w" not in raw else _number(f"{where}.power_w", raw["power_w"], 0, 100_000)
    name = _string(f"{where}.name", raw.get("name", "AMD Instinct MI300X"))
    sensor = raw.get("power_sensor", "current" if ("MI300" in name or "MI325" in name) else "average")
    if sensor not in _POWER_SENSORS:
        raise ValueError(f"{where}.power_sensor: {sensor!r} is not one of {', '.join(_POWER_SENSORS)}")
    cp = raw.get("compute_partition")
    if cp is not None and cp not in COMPUTE_PARTITIONS:
        raise ValueError(f"{where}.compute_partition: {cp!r} is not one of {', '.join(COMPUTE_PARTITIONS)}")
    mp = raw.get("memory_partition", "NPS1")
    if mp not in MEMORY_PARTITIONS:
        raise ValueError(f"{where}.memory_partition: {mp!r} is not one of {', '.join(MEMORY_PARTITIONS)}")
    errors_raw = raw.get("errors", {})
    if not isinstance(errors_raw, dict):
        raise ValueError(f"{where}.errors: expected an object")
    known = _device_functions()
    errors = []
    for fn, err in errors_raw.items():
        if fn not in known:
            raise ValueError(f"{where}.errors: {fn!r} is not a simulated amdsmi function taking a handle")
        if err not in STATUS_CODES:
            raise ValueError(f"{where}.errors.{fn}: {err!r} is not one of {', '.join(STATUS_CODES)}")
        errors.append((fn, err))
    xcd = _integer(f"{where}.xcd_count", raw.get("xcd_count", 8), 1, 64)
    bits = raw.get("accumulator_bits", 64)
    if bits not in (32, 64) or isinstance(bits, bool):
        raise ValueError(f"{where}.accumulator_bits: {bits!r} is not 32 or 64")
    board = _SimBoard(
        name=name,
        uuid=_string(f"{where}.uuid", raw.get("uuid", f"{index:08x}-74a1-1000-80ff-{0x5a1d0000 + index:012x}")),
        bdf=_string(f"{where}.bdf", raw.get("bdf", f"0000:{0x11 + 0x10 * index:02x}:00.0")),
        power_w=power_w,
        power_pattern=pattern,
        energy_counter=_boolean(f"{where}.energy_counter", raw.get("energy_counter", True)),
        resolution_uj=_number(f"{where}.counter_resolution_uj", raw.get("counter_resolution_uj", DEFAULT_RESOLUTION_UJ), 1e-3, 1e6),
        counter_epoch=_integer(f"{where}.counter_epoch", raw.get("counter_epoch", 0), minimum=-(2**63)),
        power_sensor=sensor,
        memory_total_bytes=_integer(f"{where}.memory_total_bytes", raw.get("memory_total_bytes", 192 << 30)),
        memory_used_bytes=None if raw.get("memory_used_bytes") is None else _integer(
            f"{where}.memory_used_bytes", raw["memory_used_bytes"]),
        compute_partition=cp,
        memory_partition=mp,
        xcd_count=xcd,
        errors=tuple(sorted(errors)),
        processes=(),
        accumulator_bits=bits,
    )
    procs = _list(f"{where}.processes", raw.get("processes", []))
    parsed = tuple(_parse_process(f"{where}.processes[{i}]", p, board.partitions) for i, p in enumerate(procs))
    return dataclasses.replace(board, processes=parsed)


def parse_sim_doc(path: str) -> _SimDoc:
    """Read and validate the AMD part of a sim file; raise SimFileError naming the file
    and the problem."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise SimFileError(f"sim file {path}: not found") from None
    except OSError as exc:
        raise SimFileError(f"sim file {path}: cannot read: {exc.strerror or exc}") from None
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SimFileError(f"sim file {path}: not valid JSON: {exc}") from None
    try:
        if not isinstance(doc, dict):
            raise ValueError(f"top level: expected an object with key 'gpus', got {type(doc).__name__}")
        unknown = sorted(set(doc) - _TOP_KEYS)
        if unknown:
            raise ValueError(f"top level: unknown key {unknown[0]!r} (known: {', '.join(sorted(_TOP_KEYS))})")
        gpus = doc.get("gpus")
        if not isinstance(gpus, list):
            raise ValueError("gpus: expected a list")
        default_vendor = top_vendor(doc)
        boards = []
        for i, g in enumerate(gpus):
            v = gpu_vendor(g, default_vendor)
            if v not in VENDORS:
                raise ValueError(f"gpus[{i}].vendor: {v!r} is not one of {', '.join(VENDORS)}")
            if v == "amd":
                boards.append(_parse_board(f"gpus[{i}]", len(boards), g))
        api = doc.get("amdsmi_api", "7.0")
        if api not in API_VERSIONS:
            raise ValueError(f"amdsmi_api: {api!r} is not one of {', '.join(API_VERSIONS)}")
        ns = doc.get("pid_namespace", "daemon")
        if ns not in ("daemon", "host"):
            raise ValueError(f"pid_namespace: {ns!r} is not one of daemon, host")
        result = _SimDoc(boards=boards, api=api,
                         amdgpu_loaded=_boolean("amdgpu_loaded", doc.get("amdgpu_loaded", True)),
                         pid_namespace=ns)
    except ValueError as exc:
        raise SimFileError(f"sim file {path}: {exc}") from None
    uuids = [b.uuid for b in boards]
    if len(set(uuids)) != len(uuids):
        raise SimFileError(f"sim file {path}: AMD gpus: uuids must be unique, got {uuids}")
    return result


# --- the simulated library ----------------------------------------------------------------


@dataclass(frozen=True)
class SimProcessorHandle:
    """Opaque processor handle (the real one is an ``amdsmi_processor_handle`` pointer)."""

    session: int
    board: int
    partition: int


@dataclass
class _ProcTime:
    gfx_ns: float = 0.0
    enc_ns: float = 0.0


@dataclass
class _BoardState:
    spec: _SimBoard
    energy_j: float = 0.0
    integrated_to_s: float = 0.0
    power: sim_power.Timeline = field(default_factory=list)
    engine: dict[int, _ProcTime] = field(default_factory=dict)  # pid -> cumulative ns

    def energy_between_j(self, a: float, b: float) -> float:
        return sim_power.energy_between_j(self.power, a, b)

    def instant_w(self, t: float) -> float:
        return sim_power.instant_w(self.power, t)

    def advance(self, now: float) -> None:
        """Integrate energy and per-process engine time up to ``now`` at the current spec."""
        dt = now - self.integrated_to_s
        if dt <= 0:
            return
        self.energy_j += self.energy_between_j(self.integrated_to_s, now)
        for p in self.spec.processes:
            t = self.engine.setdefault(p.pid, _ProcTime())
            t.gfx_ns += p.gfx_util / 100.0 * dt * 1e9
            t.enc_ns += p.enc_util / 100.0 * dt * 1e9
        self.integrated_to_s = now


class SimulatedAmdSmi:
    """Drop-in for the ``amdsmi`` module, driven by ``sim_file`` and ``clock`` (seconds,
    monotonic). Thread-safe (one lock)."""

    AmdSmiException = AmdSmiException
    AmdSmiLibraryException = AmdSmiLibraryException
    AmdSmiRetryException = AmdSmiRetryException
    AmdSmiTimeoutException = AmdSmiTimeoutException
    AmdSmiParameterException = AmdSmiParameterException
    AmdSmiInitFlags = AmdSmiInitFlags

    def __init__(self, sim_file: str, clock: Callable[[], float] = time.monotonic):
        self.sim_file = str(sim_file)
        self._clock = clock
        self._lock = threading.RLock()
        self._initialized = False
        self._session = 0
        self._boards: list[_BoardState] = []
        self._init_uuids: list[str] = []  # boards fixed at init
        self._init_partitions: list[int] = []
        self._api = "7.0"
        self.reports_host_pids = False
        self.reloads = 0
        for name, code in STATUS_CODES.items():
            setattr(self, f"AMDSMI_STATUS_{name}", code)
        self.AMDSMI_STATUS_SUCCESS = AMDSMI_STATUS_SUCCESS

    def __getattr__(self, name: str) -> Any:
        # Only rocm-6.1.0 and older have amdsmi_get_gpu_process_info.
        if name == "amdsmi_get_gpu_process_info" and self._api == "6.1":
            return self._gpu_process_info
        raise AttributeError(f"module 'amdsmi' has no attribute {name!r}")

    # -- init / shutdown --

    def amdsmi_init(self, flag: Any = AmdSmiInitFlags.INIT_AMD_GPUS) -> None:
        if not isinstance(flag, AmdSmiInitFlags):
            raise AmdSmiParameterException(flag, AmdSmiInitFlags)
        with self._lock:
            if self._initialized:
                return  # not reference counted
            doc = self._reload()
            if not doc.amdgpu_loaded:
                self._boards = []  # counters start at 0 when the driver loads
                _raise_status(STATUS_CODES["DRIVER_NOT_LOADED"])
            self._session += 1
            self._initialized = True
            self._init_uuids = [b.spec.uuid for b in self._boards]
            self._init_partitions = [b.spec.partitions for b in self._boards]

    def amdsmi_shut_down(self) -> None:
        with self._lock:
            self._initialized = False

    # -- discovery --

    def amdsmi_get_processor_handles(self) -> list[SimProcessorHandle]:
        with self._lock:
            self._check_init()
            self._reload()
            return [SimProcessorHandle(self._session, b, p)
                    for b, parts in enumerate(self._init_partitions) for p in range(parts)]

    def amdsmi_get_gpu_device_uuid(self, processor_handle: SimProcessorHandle) -> str:
        return self._board(processor_handle, "amdsmi_get_gpu_device_uuid").spec.uuid

    def amdsmi_get_gpu_device_bdf(self, processor_handle: SimProcessorHandle) -> str:
        st = self._board(processor_handle, "amdsmi_get_gpu_device_bdf")
        return st.spec.bdf[:-1] + str(processor_handle.partition)

    def amdsmi_get_gpu_kfd_info(self, processor_handle: SimProcessorHandle) -> dict[str, Any]:
        self._board(processor_handle, "amdsmi_get_gpu_kfd_info")
        h = processor_handle
        return {"kfd_id": 40000 + 1000 * h.board + h.partition, "node_id": 1 + 8 * h.board + h.partition,
                "current_partition_id": h.partition}

    def amdsmi_get_gpu_asic_info(self, processor_handle: SimProcessorHandle) -> dict[str, Any]:
        st = self._board(processor_handle, "amdsmi_get_gpu_asic_info")
        name = st.spec.name
        dev_id, cus, gfx = next(((d, c, g) for frag, d, c, g in _ASICS if frag in name), (0x744C, 96, "gfx1100"))
        serial = int.from_bytes(st.spec.uuid.encode()[:8].ljust(8, b"\0"), "big")
        info = {
            "market_name": name,
            "vendor_id": hex(0x1002),
            "vendor_name": _VENDOR_NAME.replace(",", ""),
            "subvendor_id": hex(0x1002),
            "device_id": hex(dev_id),
            "rev_id": "0x00",
            "asic_serial": f"0x{serial:016X}",
            "oam_id": processor_handle.board if "MI" in name else "N/A",
            "num_compute_units": cus // st.spec.partitions,
            "target_graphics_version": gfx,
        }
        if self._api == "7.0":  # 7.0.2 adds it
            info["subsystem_id"] = hex(dev_id)
        return info

    # -- energy and power --

    def amdsmi_get_energy_count(self, processor_handle: SimProcessorHandle) -> dict[str, Any]:
        st = self._board(processor_handle, "amdsmi_get_energy_count")
        with self._lock:
            if not st.spec.energy_counter:
                _raise_status(STATUS_CODES["NOT_SUPPORTED"])
            now = self._clock()
            st.advance(now)
            resolution = ctypes.c_float(st.spec.resolution_uj).value  # a C float, as amdsmi returns
            units = math.floor(st.energy_j * 1e6 / resolution + 1e-9) % (1 << st.spec.accumulator_bits)  # 1e-9: noise
            ts = int(now * 1e9)
            if self._api in ("6.1", "6.2"):
                return {"power": units, "counter_resolution": resolution, "timestamp": ts}
            if self._api == "6.3":
                return {"power": units, "energy_accumulator": units, "counter_resolution": resolution,
                        "timestamp": ts}
            return {"energy_accumulator": units, "counter_resolution": resolution, "timestamp": ts}

    def amdsmi_get_power_info(self, processor_handle: SimProcessorHandle) -> dict[str, Any]:
        st = self._board(processor_handle, "amdsmi_get_power_info")
        with self._lock:
            now = self._clock()
            sensor = st.spec.power_sensor
            current = round(st.instant_w(now)) if sensor in ("current", "both") else NA_U16
            average = (round(st.energy_between_j(now - AVERAGE_WINDOW_S, now) / AVERAGE_WINDOW_S)
                       if sensor in ("average", "both") else NA_U16)
            info: dict[str, Any] = {}
            if self._api == "7.0":
                info["socket_power"] = current if current != NA_U16 else average
            info.update({"current_socket_power": current, "average_socket_power": average,
                         "gfx_voltage": NA_U16, "soc_voltage": NA_U16, "mem_voltage": NA_U16,
                         "power_limit": 750})
            if self._api != "6.1":
                info = {k: ("N/A" if v == NA_U16 else v) for k, v in info.items()}
            return info

    # -- memory and activity --

    def amdsmi_get_gpu_vram_usage(self, processor_handle: SimProcessorHandle) -> dict[str, int]:
        st = self._board(processor_handle, "amdsmi_get_gpu_vram_usage")
        spec = st.spec
        share = min(MEMORY_PARTITIONS[spec.memory_partition], spec.partitions)
        if share > 1:
            total = spec.memory_total_bytes // share
            used = sum(p.used_memory_bytes for p in spec.processes if p.partition == processor_handle.partition)
        else:
            total = spec.memory_total_bytes
            used = spec.memory_used_bytes if spec.memory_used_bytes is not None else sum(
                p.used_memory_bytes for p in spec.processes)
        return {"vram_total": total // (1024 * 1024), "vram_used": min(used, total) // (1024 * 1024)}

    def amdsmi_get_gpu_activity(self, processor_handle: SimProcessorHandle) -> dict[str, Any]:
        st = self._board(processor_handle, "amdsmi_get_gpu_activity")
        procs = [p for p in st.spec.processes if p.partition == processor_handle.partition]
        return {"gfx_activity": int(min(100.0, sum(p.gfx_util for p in procs))),
                "umc_activity": 0,
                "mm_activity": int(min(100.0, sum(p.enc_util for p in procs)))}

    # -- partitions --

    def amdsmi_get_gpu_compute_partition(self, processor_handle: SimProcessorHandle) -> str:
        st = self._board(processor_handle, "amdsmi_get_gpu_compute_partition")
        if st.spec.compute_partition is None:
            _raise_status(STATUS_CODES["NOT_SUPPORTED"])
        return str(st.spec.compute_partition)

    def amdsmi_get_gpu_memory_partition(self, processor_handle: SimProcessorHandle) -> str:
        st = self._board(processor_handle, "amdsmi_get_gpu_memory_partition")
        if st.spec.compute_partition is None:
            _raise_status(STATUS_CODES["NOT_SUPPORTED"])
        return st.spec.memory_partition

    # -- processes --

    def amdsmi_get_gpu_process_list(self, processor_handle: SimProcessorHandle) -> list[Any]:
        st = self._board(processor_handle, "amdsmi_get_gpu_process_list")
        with self._lock:
            st.advance(self._clock())
            procs = [p for p in st.spec.processes if p.partition == processor_handle.partition]
            if self._api == "6.1":  # handles of the processes whose fdinfo is readable
                return [ctypes.c_uint32(p.pid) for p in procs if p.fdinfo_readable][:MAX_NUM_PROCESSES]
            if len(procs) > MAX_NUM_PROCESSES:
                _raise_status(15)  # OUT_OF_RESOURCES
            out = []
            for p in procs:
                entry = self._proc_dict(st, p)
                if self._api == "7.0":
                    entry["cu_occupancy"] = "N/A"
                out.append(entry)
            return out

    def _gpu_process_info(self, processor_handle: SimProcessorHandle, process: Any) -> dict[str, Any]:
        """rocm-6.1.0 ``amdsmi_get_gpu_process_info(processor_handle, process)``."""
        if not isinstance(process, ctypes.c_uint32):
            raise AmdSmiParameterException(process, ctypes.c_uint32)
        st = self._board(processor_handle, "amdsmi_get_gpu_process_info")
        with self._lock:
            st.advance(self._clock())
            for p in st.spec.processes:
                if p.pid == process.value and p.partition == processor_handle.partition:
                    if not p.fdinfo_readable:
                        _raise_status(STATUS_CODES["NO_PERM"])
                    d = self._proc_dict(st, p)
                    d["name"] = p.name  # 6.1 does not turn "" into "N/A"
                    return d
            _raise_status(STATUS_CODES["INVAL"])  # fdinfo.cc: no such process on this GPU
            raise AssertionError  # unreachable

    @staticmethod
    def _proc_dict(st: _BoardState, p: _SimProcess) -> dict[str, Any]:
        if not p.fdinfo_readable:  # KFD's minimum: pid and VRAM
            return {"name": "N/A", "pid": p.pid, "mem": 0, "engine_usage": {"gfx": 0, "enc": 0},
                    "memory_usage": {"gtt_mem": 0, "cpu_mem": 0, "vram_mem": p.used_memory_bytes}}
        t = st.engine.get(p.pid, _ProcTime())
        return {
            "name": p.name,
            "pid": p.pid,
            "mem": p.used_memory_bytes + p.gtt_memory_bytes,
            "engine_usage": {"gfx": int(t.gfx_ns), "enc": int(t.enc_ns)},
            "memory_usage": {"gtt_mem": p.gtt_memory_bytes, "cpu_mem": 0, "vram_mem": p.used_memory_bytes},
        }

    # -- internals --

    def _check_init(self) -> None:
        if not self._initialized:
            _raise_status(STATUS_CODES["NOT_INIT"])

    def _board(self, handle: Any, fn: str) -> _BoardState:
        """The board of a handle; raises as amdsmi would, then the configured error."""
        if not isinstance(handle, SimProcessorHandle):
            raise AmdSmiParameterException(handle, SimProcessorHandle)
        with self._lock:
            self._check_init()
            if handle.session != self._session or handle.board >= len(self._boards):
                _raise_status(STATUS_CODES["NOT_FOUND"])
            st = self._boards[handle.board]
            if st.spec.uuid != self._init_uuids[handle.board] or handle.partition >= st.spec.partitions:
                _raise_status(STATUS_CODES["NOT_FOUND"])  # the board left or was re-partitioned
            err = dict(st.spec.errors).get(fn)
            if err is not None:
                _raise_status(STATUS_CODES[err])
            return st

    def _reload(self) -> _SimDoc:
        doc = parse_sim_doc(self.sim_file)  # raises SimFileError; old state stays
        now = self._clock()
        states: list[_BoardState] = []
        for i, spec in enumerate(doc.boards):
            old = self._boards[i] if i < len(self._boards) else None
            if old is not None and old.spec.uuid == spec.uuid:
                old.advance(now)
                if spec.counter_epoch != old.spec.counter_epoch:
                    old.energy_j = 0.0  # driver reload
                sim_power.update_timeline(old.power, spec.power_w, spec.power_pattern, now, 2 * AVERAGE_WINDOW_S)
                listed = {p.pid for p in spec.processes}
                old.engine = {pid: t for pid, t in old.engine.items() if pid in listed}
                old.spec = spec
                st = old
            else:
                st = _BoardState(spec=spec, integrated_to_s=now)
                st.power = sim_power.new_timeline(spec.power_w, spec.power_pattern, now)
            states.append(st)
        self._boards = states
        self._api = doc.api
        self.reports_host_pids = doc.pid_namespace == "host"
        self.reloads += 1
        return doc
