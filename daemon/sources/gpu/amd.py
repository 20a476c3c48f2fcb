"""AMD GPUs through ROCm's ``amdsmi`` Python package: the AMD vendor adapter of the GPU
collector (see vendor.py for the boundary and policy.py for what is done with it).

Every amdsmi call goes through ``AmdVendor._call``, which counts it and maps amdsmi's
exceptions, once, to ``GpuError`` (the facts about amdsmi below are sourced in
``sources/amdsmi_sim.py``, which simulates the package):

- ``AmdSmiLibraryException.get_error_code()``: NOT_SUPPORTED / NOT_YET_IMPLEMENTED ->
  NOT_SUPPORTED (feature off, a note); NO_PERM -> NO_PERMISSION; NOT_FOUND (the handle's
  device is gone) -> LOST; NOT_INIT -> UNINITIALIZED; DRIVER_NOT_LOADED,
  FAIL_LOAD_MODULE, FAIL_LOAD_SYMBOL -> NO_DRIVER; anything else (TIMEOUT, RETRY, BUSY,
  IO ...) -> OTHER. ``AmdSmiParameterException`` and other ``AmdSmiException`` -> OTHER.

Devices: AMD boards are ``amdgpu{N}`` in amdsmi's order (health name ``gpu_amd``,
vendor "amd"); a board in a compute partition mode other than SPX (MI300X: DPX, QPX,
CPX) is one reading per partition, ``amdgpu{N}-p{k}`` with parent ``amdgpu{N}``.
amdsmi lists every partition as its own processor handle; the partitions of one board
share its UUID (amdsmi derives it from the ASIC serial), so handles are grouped into
boards by UUID, partition ``k`` being ``amdsmi_get_gpu_kfd_info``'s
``current_partition_id`` (else the handle's order). Energy and power are the board's,
read on partition 0's handle (every partition reports the whole board's); the board's
energy is split equally over its partitions (each holds the same share of the XCDs).

Energy: ``amdsmi_get_energy_count``: the 64-bit accumulator (``energy_accumulator``;
``power`` in amdsmi before ROCm 6.3) x ``counter_resolution`` µJ; it restarts at 0 on a
driver reload, which the policy's ``CounterDiff`` sees as a reset. Boards with the
oldest metrics table (gpu_metrics v1.0) count in 32 bits and wrap every ~66 kJ: a step
back from below 2^32 whose wrap implies at most ``MAX_BOARD_W`` over the interval (from
amdsmi's own ns timestamps) is taken as a wrap and the count extended to 64 bits; any
other step back is a reset. Without a counter
(NOT_SUPPORTED: VM guests, some Radeon boards) the socket power is sampled and
integrated (source "power"): ``socket_power`` (amdsmi 7), else ``current_socket_power``,
else ``average_socket_power``, whichever is a number (amdsmi gives "N/A", or 65535 before
ROCm 6.2, for the ones the board lacks).

Processes: ``amdsmi_get_gpu_process_list`` (ROCm 6.2 and later: dicts; before: PIDs
whose details come from ``amdsmi_get_gpu_process_info``). Memory is
``memory_usage.vram_mem`` (bytes). The activity attribution needs (max(sm, enc, dec) %,
see attribution.py) comes from each process's cumulative engine time
(``engine_usage.gfx`` / ``.enc``, nanoseconds): gfx % = the increase in gfx ns over the
interval's wall time x 100, likewise enc (reported in the encoder slot), capped at
100. A process's first sighting has no increase yet (0 %). A process whose engine time
went backwards (a new fd under the same PID) counts 0 for that interval and is counted
as a discarded sample. Utilisation costs no extra call: the engine times come with the
list. When a process's engine time is unreadable (another user's process and an
unprivileged daemon: amdsmi gives name "N/A" and zero engine time), utilisation fails
for that GPU with NO_PERMISSION (problem named, retried with backoff) and the GPU's
energy is shared by memory for that interval. Before ROCm 6.2, amdsmi lists only the
processes whose ``/proc/<pid>/fdinfo`` this user can read: an unprivileged daemon would
hand other users' shares to the visible ones, so there the process lists are not used
at all (problem: "run as root"), and the GPU's energy stays unattributed.

``import amdsmi`` without ROCm's ``libamd_smi.so`` prints to stdout and raises
KeyError: ``open_amd`` contains both (the package is the binding only; the library
comes with ROCm: a system package, not a dependency of wattprint).
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ...config import GpuConfig
from ..base import Source
from .policy import GpuSource, source_options
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

MIB = 1024 * 1024
NA_U16 = 0xFFFF  # a socket power amdsmi before ROCm 6.2 does not turn into "N/A"
# amdsmi_wrapper.py status codes
_NOT_SUPPORTED = {2, 3}  # NOT_SUPPORTED, NOT_YET_IMPLEMENTED
_NO_PERM = 10
_NOT_FOUND = 31
_NOT_INIT = 32
_NO_DRIVER = {4, 5, 34}  # FAIL_LOAD_MODULE, FAIL_LOAD_SYMBOL, DRIVER_NOT_LOADED
_POWER_KEYS = ("socket_power", "current_socket_power", "average_socket_power")
WRAP_32 = 1 << 32  # gpu_metrics v1.0 boards: a 32-bit accumulator
MAX_BOARD_W = 5000.0  # no board draws more: a "wrap" implying more is a reset


@dataclass
class _Accumulator:
    """One board's accumulator as last read, and the 2^32 wraps added to it."""

    raw: int
    timestamp_ns: int
    offset: int = 0


@dataclass
class _AmdBoard:
    uuid: str
    handles: dict[int, Any] = field(default_factory=dict)  # partition id -> processor handle

    @property
    def handle(self) -> Any:
        return self.handles[min(self.handles)]


def _same_handle(a: Any, b: Any) -> bool:
    """Real handles are ctypes pointers (``==`` compares the objects): compare addresses."""
    if a is b:
        return True
    va, vb = getattr(a, "value", None), getattr(b, "value", None)
    if va is not None and vb is not None:
        return bool(va == vb)
    return bool(a == b)


def import_amdsmi() -> tuple[Any | None, str]:
    """(the amdsmi module, "") or (None, why not). Never raises, prints nothing."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import amdsmi  # type: ignore[import-not-found]
    except ImportError as exc:
        return None, f"amdsmi not installed ({exc})"
    except Exception as exc:  # KeyError / OSError: the package is there, ROCm's libamd_smi.so is not
        return None, f"amdsmi cannot load ROCm's libamd_smi.so ({type(exc).__name__}: {exc})"
    return amdsmi, ""


class AmdVendor:
    """The ``GpuVendor`` for amdsmi (the real module or ``SimulatedAmdSmi``)."""

    vendor = "amd"
    health_name = "gpu_amd"
    device_prefix = "amdgpu"
    partition_infix = "-p"
    partition_word = "partition"
    partition_key = "p"
    library = "amdsmi"
    driver_name = "AMD"
    counter_prefix = "gpu_amd"
    library_key = "amdsmi"
    process_kinds = (("compute", "process list"),)

    def __init__(self, lib: Any, *, euid: Callable[[], int] = os.geteuid):
        self._lib = lib
        self._euid = euid
        self.calls = 0
        self._boards: list[_AmdBoard] = []
        self._n_handles = -1
        self._accumulators: dict[Any, _Accumulator] = {}  # board handle's UUID -> last reading
        self._lib_error = getattr(lib, "AmdSmiLibraryException", None)
        self._base_error = getattr(lib, "AmdSmiException", None)

    # -- the one error map --

    def _call(self, fn: str, *args: Any) -> Any:
        self.calls += 1
        try:
            return getattr(self._lib, fn)(*args)
        except Exception as exc:
            if self._base_error is None or not isinstance(exc, self._base_error):
                raise  # not amdsmi's: the policy treats it as a malformed entry
            raise self._map(exc) from None

    def _map(self, exc: Exception) -> GpuError:
        name = type(exc).__name__
        code = None
        if self._lib_error is not None and isinstance(exc, self._lib_error):
            try:
                code = int(exc.get_error_code())
            except Exception:
                code = None
        text = f"{name}: {' '.join(str(exc).split())}"
        if code in _NOT_SUPPORTED:
            return GpuError(GpuErrorKind.NOT_SUPPORTED, text, "AMDSMI_STATUS_NOT_SUPPORTED")
        if code == _NO_PERM:
            return GpuError(GpuErrorKind.NO_PERMISSION, text, "AMDSMI_STATUS_NO_PERM")
        if code == _NOT_FOUND:
            return GpuError(GpuErrorKind.LOST, text, "AMDSMI_STATUS_NOT_FOUND")
        if code == _NOT_INIT:
            return GpuError(GpuErrorKind.UNINITIALIZED, text, "AMDSMI_STATUS_NOT_INIT")
        if code in _NO_DRIVER:
            return GpuError(GpuErrorKind.NO_DRIVER, text, "AMDSMI_STATUS_DRIVER_NOT_LOADED")
        return GpuError(GpuErrorKind.OTHER, text, name)

    # -- lifecycle and enumeration --

    def init(self) -> None:
        flags = getattr(self._lib, "AmdSmiInitFlags", None)
        if flags is None:
            self._call("amdsmi_init")
        else:
            self._call("amdsmi_init", flags.INIT_AMD_GPUS)
        self._group(self._call("amdsmi_get_processor_handles"))

    def shutdown(self) -> None:
        try:
            self._call("amdsmi_shut_down")
        except Exception:
            pass
        self._boards = []
        self._n_handles = -1

    def _group(self, handles: list[Any]) -> None:
        """Group the processor handles (one per logical GPU) into boards by UUID."""
        boards: dict[str, _AmdBoard] = {}
        for h in handles:
            uuid = str(self._call("amdsmi_get_gpu_device_uuid", h))
            board = boards.setdefault(uuid, _AmdBoard(uuid=uuid))
            part = self._partition_id(h)
            if part is None or part in board.handles:
                part = len(board.handles)
            board.handles[part] = h
        self._boards = list(boards.values())
        self._n_handles = len(handles)

    def _partition_id(self, handle: Any) -> int | None:
        try:
            info = self._call("amdsmi_get_gpu_kfd_info", handle)
        except (GpuError, AttributeError):
            return None
        part = info.get("current_partition_id") if isinstance(info, dict) else None
        return part if isinstance(part, int) and not isinstance(part, bool) else None

    def count(self) -> int:
        handles = self._call("amdsmi_get_processor_handles")
        if len(handles) != self._n_handles:
            self._group(handles)
        return len(self._boards)

    def board(self, index: int) -> tuple[Any, str]:
        if not 0 <= index < len(self._boards):
            raise GpuError(GpuErrorKind.LOST, f"amdsmi: no AMD GPU {index} (now {len(self._boards)})", "NOT_FOUND")
        b = self._boards[index]
        return b.handle, b.uuid

    def alive(self, index: int) -> tuple[Any, str]:
        handle, _ = self.board(index)
        uuid = str(self._call("amdsmi_get_gpu_device_uuid", handle))
        return handle, uuid

    def name(self, handle: Any) -> str:
        info = self._call("amdsmi_get_gpu_asic_info", handle)
        name = info.get("market_name") if isinstance(info, dict) else None
        return str(name) if name and name != "N/A" else "AMD GPU"

    def _board_of(self, handle: Any) -> _AmdBoard | None:
        for b in self._boards:
            if any(_same_handle(h, handle) for h in b.handles.values()):
                return b
        return None

    def partitions(self, handle: Any, device: str, name: str) -> PartitionLayout | None:
        board = self._board_of(handle)
        if board is None or len(board.handles) < 2:
            return None  # SPX (or no partitions): the whole board is one device
        modes = []
        for fn in ("amdsmi_get_gpu_compute_partition", "amdsmi_get_gpu_memory_partition"):
            try:
                modes.append(str(self._call(fn, handle)))
            except GpuError as exc:
                modes.append(f"? ({exc.why})")
        parts: dict[int, Partition] = {}
        for part_id, h in sorted(board.handles.items()):
            try:
                vram = self._call("amdsmi_get_gpu_vram_usage", h)
                total: int | None = int(vram["vram_total"]) * MIB
            except (GpuError, KeyError, TypeError, ValueError):
                total = None
            parts[part_id] = Partition(part_id=part_id, handles=[h], slices=1, name=f"{name} partition {part_id}",
                                       memory_total_bytes=total)
        note = (f"{device} ({name}): compute partition {modes[0]}, memory partition {modes[1]}: "
                f"{len(parts)} partitions, each booked an equal share of the board's energy")
        return PartitionLayout(parts=parts, total_slices=len(parts), parent_lists=False, note=note)

    # -- energy, power, memory --

    def energy(self, handle: Any) -> EnergyCount:
        d = self._call("amdsmi_get_energy_count", handle)
        value = d.get("energy_accumulator", d.get("power")) if isinstance(d, dict) else None
        resolution = d.get("counter_resolution") if isinstance(d, dict) else None
        if (not isinstance(value, int) or isinstance(value, bool) or value < 0
                or not isinstance(resolution, (int, float)) or not resolution > 0):
            raise GpuError(GpuErrorKind.OTHER, f"amdsmi_get_energy_count: unexpected answer {d!r:.120}", "malformed")
        ts = d.get("timestamp")
        return EnergyCount(value=self._extend(handle, value, ts if isinstance(ts, int) else 0, float(resolution)),
                           ticks_per_joule=1e6 / float(resolution), max_value=None)

    def _extend(self, handle: Any, raw: int, ts_ns: int, resolution_uj: float) -> int:
        """The accumulator made 64-bit: a board with gpu_metrics v1.0 counts in 32 bits.
        A step back from below 2^32 whose wrap implies a plausible power over the
        interval amdsmi's own timestamps give (at most ``MAX_BOARD_W``) is a wrap: 2^32
        is added from then on. Any other step back is a reset (driver reload): the raw
        value goes to the policy, which sees it go back."""
        board = self._board_of(handle)
        key = board.uuid if board is not None else id(handle)
        last = self._accumulators.get(key)
        offset = 0 if last is None else last.offset
        if last is not None and raw < last.raw:
            offset = 0
            dt_s = (ts_ns - last.timestamp_ns) / 1e9
            if last.raw < WRAP_32 and raw < WRAP_32 and dt_s > 0:
                wrapped_j = (WRAP_32 - last.raw + raw) * resolution_uj / 1e6
                if wrapped_j / dt_s <= MAX_BOARD_W:
                    offset = last.offset + WRAP_32
        self._accumulators[key] = _Accumulator(raw=raw, timestamp_ns=ts_ns, offset=offset)
        return raw + offset

    def power_w(self, handle: Any) -> float:
        info = self._call("amdsmi_get_power_info", handle)
        if isinstance(info, dict):
            for key in _POWER_KEYS:
                v = info.get(key)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v != NA_U16 and v >= 0:
                    return float(v)
        raise GpuError(GpuErrorKind.NOT_SUPPORTED, "amdsmi_get_power_info: no socket power (N/A)", "socket power N/A")

    def memory(self, handle: Any) -> MemoryInfo:
        v = self._call("amdsmi_get_gpu_vram_usage", handle)
        return MemoryInfo(used_bytes=int(v["vram_used"]) * MIB, total_bytes=int(v["vram_total"]) * MIB)

    # -- processes and utilisation --

    def processes_unusable(self) -> str:
        if hasattr(self._lib, "amdsmi_get_gpu_process_info") and self._euid() != 0:
            return ("amdsmi older than ROCm 6.2 lists only the processes this user may read: "
                    "AMD GPU energy is booked unattributed (run wattprint as root, or upgrade ROCm)")
        return ""

    def processes(self, kind: str, handle: Any) -> list[ProcEntry]:
        listed = self._call("amdsmi_get_gpu_process_list", handle)
        if hasattr(self._lib, "amdsmi_get_gpu_process_info"):  # ROCm <= 6.1: PIDs, details apart
            out = []
            for ph in listed:
                try:
                    out.append(self._entry(self._call("amdsmi_get_gpu_process_info", handle, ph)))
                except GpuError as exc:
                    if exc.kind is not GpuErrorKind.NO_PERMISSION:
                        raise
                    out.append(ProcEntry(pid=int(ph.value), used_bytes=None, usage=None))
            return out
        return [self._entry(p) for p in listed]

    @staticmethod
    def _entry(p: Mapping[str, Any]) -> ProcEntry:
        """One process dict; malformed ones raise (the policy books the GPU unattributed)."""
        pid = int(p["pid"])
        vram = p.get("memory_usage", {}).get("vram_mem")
        used = int(vram) if isinstance(vram, int) and not isinstance(vram, bool) else None
        eng = p.get("engine_usage", {})
        gfx, enc = eng.get("gfx"), eng.get("enc")
        readable = p.get("name") != "N/A" or bool(gfx) or bool(enc)
        usage = (int(gfx), int(enc or 0)) if readable and isinstance(gfx, int) else None
        return ProcEntry(pid=pid, used_bytes=used, usage=usage)

    def util_wanted(self, window: UtilWindow, procs: Mapping[int, ProcEntry], wall_us: int) -> bool:
        if len(procs) >= 2:
            return True
        self._remember(window, procs, wall_us)  # a sole process gets everything: only keep its baseline
        return False

    def utilisation(self, handle: Any, procs: Mapping[int, ProcEntry], window: UtilWindow,
                    wall_us: int) -> UtilResult:
        unreadable = sorted(pid for pid, p in procs.items() if p.usage is None)
        if unreadable:
            self._remember(window, procs, wall_us)
            shown = ", ".join(str(p) for p in unreadable[:5])
            raise GpuError(GpuErrorKind.NO_PERMISSION,
                           f"amdsmi: engine usage of pid(s) {shown} unreadable (another user's process; run "
                           "wattprint as root): this GPU's energy is shared by memory", "AMDSMI_STATUS_NO_PERM")
        per_pid: dict[int, tuple[float, float, float]] = {}
        discarded = 0
        for pid, p in procs.items():
            gfx_ns, enc_ns = p.usage
            prev = window.extra.get(pid)
            gfx_pct = enc_pct = 0.0
            if prev is not None:
                prev_gfx, prev_enc, prev_us = prev
                span_ns = (wall_us - prev_us) * 1000.0
                if gfx_ns < prev_gfx or enc_ns < prev_enc or span_ns <= 0:
                    discarded += 1  # a new fd under this PID, or the clock went back: no figure
                else:
                    gfx_pct = min(100.0, (gfx_ns - prev_gfx) / span_ns * 100.0)
                    enc_pct = min(100.0, (enc_ns - prev_enc) / span_ns * 100.0)
            per_pid[pid] = (gfx_pct, enc_pct, 0.0)
        self._remember(window, procs, wall_us)
        return UtilResult(per_pid=per_pid, discarded=discarded)

    @staticmethod
    def _remember(window: UtilWindow, procs: Mapping[int, ProcEntry], wall_us: int) -> None:
        window.extra = {pid: (p.usage[0], p.usage[1], wall_us) for pid, p in procs.items() if p.usage is not None}
        window.last_ts_us = wall_us

    # -- environment --

    def reports_host_pids(self) -> bool:
        return bool(getattr(self._lib, "reports_host_pids", True))

    def driver_gpu_count(self) -> int | None:
        return None  # amdsmi's own count (checked every read) is the trigger

    def wall_clock(self) -> Callable[[], float]:
        return time.time


def AmdSmiGpuSource(amdsmi_module: Any, **kwargs: Any) -> GpuSource:
    """The GPU source for AMD boards over ``amdsmi_module`` (the real amdsmi or a
    ``SimulatedAmdSmi``); ``kwargs`` as ``GpuSource``'s."""
    return GpuSource(AmdVendor(amdsmi_module), **kwargs)


def open_amd(cfg: GpuConfig, module: Any | None = None, *, quiet: bool) -> tuple[Source | None, str]:
    """The AMD source and one line for the log. Never raises. ``module`` None: the real
    ``amdsmi`` (absent or unloadable: no source). ``quiet`` (backends ``auto`` and
    ``sim``): a missing driver leaves a *disabled* source that retries init with backoff;
    not quiet (``amdsmi``, asked for explicitly) a degraded one."""
    sim = module is not None
    if module is None:
        module, why = import_amdsmi()
        if module is None:
            if quiet:
                return None, f"{why}: AMD GPU energy not measured"
            return None, f"GPU: backend amdsmi asked for, but {why}: AMD GPU energy not measured"
    opts = source_options(cfg)
    vendor = AmdVendor(module)
    try:
        vendor.init()
        count = vendor.count()
        names = ", ".join(vendor.name(vendor.board(i)[0]) for i in range(count))
    except GpuError as exc:
        vendor.shutdown()
        if exc.kind is GpuErrorKind.NO_DRIVER and quiet:
            return (GpuSource(AmdVendor(module), quiet_without_driver=True, no_driver=exc.text, **opts),
                    f"no AMD driver ({exc.text}): AMD GPU energy not measured until it loads (checked with backoff)")
        return (GpuSource(AmdVendor(module), quiet_without_driver=quiet, **opts),
                f"GPU: amdsmi init failed ({exc.text}): AMD GPU source degraded, retrying with backoff")
    vendor.shutdown()
    what = f"simulated amdsmi driven by {cfg.sim_file}" if sim else "amdsmi"
    return (GpuSource(AmdVendor(module), quiet_without_driver=quiet, **opts),
            f"GPU: {what}, {count} AMD GPU(s): {names or 'none'}")
