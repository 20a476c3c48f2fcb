#!/usr/bin/env python3
"""Record exactly what NVML returns on a real GPU box, as a JSON test fixture.

Its one job: poll the real ``pynvml`` (nvidia-ml-py) for N seconds and write every call
the wattprint GPU collector makes, with its arguments, result (or error name and code),
the monotonic and wall time it was made and how long it took. Nothing is interpreted:
the fixture is raw material for tests and for checking the simulator against reality.

Usage (on the GPU box; needs only nvidia-ml-py)::

    python3 scripts/nvml_record.py                      # 10 s at 1 Hz -> nvml-<host>-<time>.json
    python3 scripts/nvml_record.py --seconds 60 --interval 0.5 --out h100.json

Fixture layout (``format: "wattprint-nvml-record/1"``)::

    {"format": ..., "recorded_at": ISO-8601, "host": ..., "pynvml_version": ...,
     "args": {"seconds": 10, "interval_s": 1.0}, "pid_namespace_inode": 4026531836,
     "system": {"<call name>": CALL, ...},          # driver / NVML / CUDA versions
     "device_count": CALL,
     "devices": [{"index": 0, "static": {"<call name>": CALL, ...,      # once
                                          "mig_devices": [{"index": 0, "<call name>": CALL}]}}],
     "ticks": [{"t_mono_s": ..., "t_wall_s": ...,
                "gpus": [{"index": 0, "calls": {"<call name>": CALL, ...},
                          "proc_exists": {"<pid>": true|false}}]}]}

    CALL = {"args": [...], "t_mono_s": ..., "t_wall_s": ..., "duration_us": ...,
            "result": <value>}                      # on success
         | {..., "error": "NVMLError_NotSupported", "code": 3, "message": "Not Supported"}

Results are converted faithfully: ctypes structs and pynvml's "friendly" objects become
objects of their fields, arrays become lists, ``None`` stays ``null`` (pynvml's "not
available" memory). ``nvmlDeviceGetProcessUtilization`` is called with the largest
``timeStamp`` seen so far on that GPU (0 at first), as the collector does, and the
argument is recorded. ``proc_exists`` says whether ``/proc/<pid>`` existed for each PID
NVML listed (scrambled PIDs, nvitop #75). Command lines and process names are never
recorded. Memory sizes and PIDs of the recording box are in the file: review it
before publishing.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import os
import socket
import sys
import time
from typing import Any, Callable

try:
    import pynvml
except ImportError:  # pragma: no cover - depends on the box
    sys.exit("nvml_record: the pynvml module is missing: pip install nvidia-ml-py")

FORMAT = "wattprint-nvml-record/1"
# Probed, not assumed (nvidia-ml-py before 12.550 has no NVMLLibraryMismatchError): works
# on the floor version pyproject.toml names and on the newest.
_MISMATCH = tuple(c for c in (getattr(pynvml, "NVMLLibraryMismatchError", None),) if isinstance(c, type))

# nvmlDeviceGetFieldValues ids worth having next to the dedicated calls (R535+).
FIELD_IDS = {
    "NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION": getattr(pynvml, "NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 83),
    "NVML_FI_DEV_POWER_AVERAGE": getattr(pynvml, "NVML_FI_DEV_POWER_AVERAGE", 185),
    "NVML_FI_DEV_POWER_INSTANT": getattr(pynvml, "NVML_FI_DEV_POWER_INSTANT", 186),
}
_VALUE_MEMBER = {  # c_nvmlValue_t member per NVML_VALUE_TYPE_*
    0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal",
}


def to_jsonable(value: Any) -> Any:
    """What NVML returned, as JSON data, without interpretation."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, ctypes.Structure):
        out = {name: to_jsonable(getattr(value, name)) for name, *_ in value._fields_}
        if isinstance(value, pynvml.c_nvmlFieldValue_t):  # resolve the union by valueType
            member = _VALUE_MEMBER.get(int(value.valueType))
            out["value"] = getattr(value.value, member) if member else None
        return out
    if isinstance(value, ctypes.Union):
        return {name: to_jsonable(getattr(value, name)) for name, *_ in value._fields_}
    if isinstance(value, ctypes.Array):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if hasattr(value, "__dict__"):  # pynvml.nvmlFriendlyObject (process lists)
        return {k: to_jsonable(v) for k, v in vars(value).items()}
    if isinstance(value, ctypes._SimpleCData):
        return to_jsonable(value.value)
    return repr(value)


def call(fn_name: str, *args: Any, record_args: list[Any] | None = None) -> tuple[dict[str, Any], Any]:
    """Call ``pynvml.<fn_name>(*args)``; return (the record, the raw result or None)."""
    fn: Callable[..., Any] | None = getattr(pynvml, fn_name, None)
    rec: dict[str, Any] = {"args": record_args if record_args is not None else []}
    rec["t_wall_s"] = time.time()
    start = time.perf_counter()
    rec["t_mono_s"] = time.monotonic()
    if fn is None:
        rec.update(duration_us=0.0, error="MissingInPynvml", code=None,
                   message=f"this pynvml has no {fn_name}")
        return rec, None
    try:
        result = fn(*args)
    except pynvml.NVMLError as exc:
        rec["duration_us"] = (time.perf_counter() - start) * 1e6
        try:
            message = str(exc)
        except Exception:  # str() may call into the library
            message = ""
        rec.update(error=type(exc).__name__, code=getattr(exc, "value", None), message=message)
        return rec, None
    except _MISMATCH as exc:  # unversioned call, older driver
        rec["duration_us"] = (time.perf_counter() - start) * 1e6
        rec.update(error="NVMLLibraryMismatchError", code=None, message=str(exc))
        return rec, None
    rec["duration_us"] = (time.perf_counter() - start) * 1e6
    rec["result"] = to_jsonable(result)
    return rec, result


def record_system() -> dict[str, Any]:
    out = {}
    for name in ("nvmlSystemGetDriverVersion", "nvmlSystemGetNVMLVersion",
                 "nvmlSystemGetCudaDriverVersion", "nvmlSystemGetCudaDriverVersion_v2"):
        out[name], _ = call(name)
    return out


def record_static(handle: Any) -> dict[str, Any]:
    """Per-device facts read once (they do not change while recording), the MIG layout
    included: each MIG device's GPU instance id, attributes and process list."""
    out: dict[str, Any] = {}
    mig_on = False
    for name in ("nvmlDeviceGetName", "nvmlDeviceGetUUID", "nvmlDeviceGetArchitecture",
                 "nvmlDeviceGetPowerManagementLimit", "nvmlDeviceGetEnforcedPowerLimit",
                 "nvmlDeviceGetMigMode", "nvmlDeviceGetMaxMigDeviceCount"):
        out[name], result = call(name, handle)
        if name == "nvmlDeviceGetMigMode":
            mig_on = bool(result) and result[0] == getattr(pynvml, "NVML_DEVICE_MIG_ENABLE", 1)
    if not mig_on:
        return out
    count = out["nvmlDeviceGetMaxMigDeviceCount"].get("result") or 0
    devices = []
    for i in range(count):
        rec, mig = call("nvmlDeviceGetMigDeviceHandleByIndex", handle, i, record_args=[i])
        entry: dict[str, Any] = {"index": i, "nvmlDeviceGetMigDeviceHandleByIndex":
                                 {k: v for k, v in rec.items() if k != "result"}}
        if mig is not None:
            for name in ("nvmlDeviceGetGpuInstanceId", "nvmlDeviceGetComputeInstanceId", "nvmlDeviceGetName",
                         "nvmlDeviceGetAttributes", "nvmlDeviceGetMemoryInfo",
                         "nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetMPSComputeRunningProcesses"):
                entry[name], _ = call(name, mig)
        devices.append(entry)
    out["mig_devices"] = devices
    return out


def record_tick(index: int, handle: Any, last_util_ts_us: dict[int, int]) -> dict[str, Any]:
    """One poll of one GPU: the calls the collector makes, in its order."""
    calls: dict[str, Any] = {}
    calls["nvmlDeviceGetUUID"], _ = call("nvmlDeviceGetUUID", handle)
    calls["nvmlDeviceGetTotalEnergyConsumption"], _ = call("nvmlDeviceGetTotalEnergyConsumption", handle)
    calls["nvmlDeviceGetPowerUsage"], _ = call("nvmlDeviceGetPowerUsage", handle)
    field_ids = list(FIELD_IDS.values())
    calls["nvmlDeviceGetFieldValues"], _ = call(
        "nvmlDeviceGetFieldValues", handle, field_ids,
        record_args=[{"field_ids": field_ids, "names": list(FIELD_IDS)}])
    calls["nvmlDeviceGetMemoryInfo"], _ = call("nvmlDeviceGetMemoryInfo", handle)
    calls["nvmlDeviceGetMigMode"], _ = call("nvmlDeviceGetMigMode", handle)
    calls["nvmlDeviceGetComputeRunningProcesses"], compute = call("nvmlDeviceGetComputeRunningProcesses", handle)
    calls["nvmlDeviceGetGraphicsRunningProcesses"], graphics = call("nvmlDeviceGetGraphicsRunningProcesses", handle)
    calls["nvmlDeviceGetMPSComputeRunningProcesses"], mps = call("nvmlDeviceGetMPSComputeRunningProcesses", handle)
    calls["nvmlDeviceGetUtilizationRates"], _ = call("nvmlDeviceGetUtilizationRates", handle)
    last = last_util_ts_us.get(index, 0)
    calls["nvmlDeviceGetProcessUtilization"], samples = call(
        "nvmlDeviceGetProcessUtilization", handle, last, record_args=[{"lastSeenTimeStamp": last}])
    if samples:
        last_util_ts_us[index] = max([last] + [int(s.timeStamp) for s in samples])

    pids = {int(p.pid) for p in (compute or []) + (graphics or []) + (mps or [])}
    pids |= {int(s.pid) for s in (samples or [])}
    proc_exists = {str(pid): os.path.exists(f"/proc/{pid}") for pid in sorted(pids)}
    return {"index": index, "calls": calls, "proc_exists": proc_exists}


def _pid_namespace_inode() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to record (default 10)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between polls (default 1)")
    parser.add_argument("--out", default="", help="output file (default nvml-<host>-<UTC time>.json)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.interval <= 0:
        parser.error("--seconds and --interval must be positive")

    host = socket.gethostname()
    started = _dt.datetime.now(_dt.timezone.utc)
    out_path = args.out or f"nvml-{host}-{started.strftime('%Y%m%dT%H%M%SZ')}.json"

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        print(f"nvml_record: nvmlInit failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    try:
        try:
            from importlib.metadata import version
            pynvml_version = version("nvidia-ml-py")
        except Exception:
            pynvml_version = "unknown"
        doc: dict[str, Any] = {
            "format": FORMAT,
            "recorded_at": started.isoformat(),
            "host": host,
            "pynvml_version": pynvml_version,
            "args": {"seconds": args.seconds, "interval_s": args.interval},
            # 0xEFFFFFFC (4026531836): the host's PID namespace; else NVML's PIDs are not ours.
            "pid_namespace_inode": _pid_namespace_inode(),
            "system": record_system(),
        }
        doc["device_count"], count = call("nvmlDeviceGetCount")
        handles: list[tuple[int, Any]] = []
        doc["devices"] = []
        for index in range(count or 0):
            rec, handle = call("nvmlDeviceGetHandleByIndex", index, record_args=[index])
            entry: dict[str, Any] = {"index": index, "nvmlDeviceGetHandleByIndex": {k: v for k, v in rec.items() if k != "result"}}
            if handle is not None:
                entry["static"] = record_static(handle)
                handles.append((index, handle))
            doc["devices"].append(entry)
        print(f"nvml_record: {len(handles)} GPU(s), recording {args.seconds:g} s every {args.interval:g} s",
              file=sys.stderr)

        ticks: list[dict[str, Any]] = []
        last_util_ts_us: dict[int, int] = {}
        start = time.monotonic()
        deadline = start + args.seconds
        next_at = start
        while True:
            tick = {"t_mono_s": time.monotonic(), "t_wall_s": time.time(),
                    "gpus": [record_tick(i, h, last_util_ts_us) for i, h in handles]}
            ticks.append(tick)
            next_at += args.interval
            if next_at > deadline + 1e-9:
                break
            time.sleep(max(0.0, next_at - time.monotonic()))
        doc["ticks"] = ticks
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass

    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1, sort_keys=False)
        fh.write("\n")
    os.replace(tmp, out_path)
    print(f"nvml_record: wrote {len(ticks)} ticks to {out_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
