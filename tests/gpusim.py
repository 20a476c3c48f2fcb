"""Test helper: write the sim file of the simulated NVML and amdsmi (see
daemon/sources/nvml_sim.py and daemon/sources/amdsmi_sim.py).

``write_sim`` replaces the file atomically (temp file in the same directory, then
``os.replace``), so a reader never sees half a file; its keyword arguments are the
top-level keys (``realistic``, ``driver_loaded``, ``pid_namespace``, ``vendor``,
``amdgpu_loaded``, ``amdsmi_api``). ``gpu`` (either vendor), ``proc`` (NVIDIA),
``amd_proc`` and ``mig_instance`` build the entries with the defaults tests usually
want. The keys are documented in the simulators' module docstrings;
tests/nvml_captures.py builds GPU entries from real captures. ``FakeClock`` is the
hand-moved clock the simulators run on (fixtures ``clock`` and ``sim_path`` in
tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def proc(pid: int, used_memory_bytes: int | None = 1 << 30, sm_util: float | None = None, **extra: Any) -> dict[str, Any]:
    """One process entry of a sim GPU."""
    entry: dict[str, Any] = {"pid": pid, "used_memory_bytes": used_memory_bytes}
    if sm_util is not None:
        entry["sm_util"] = sm_util
    entry.update(extra)
    return entry


def gpu(
    index: int = 0,
    power_w: float = 250.0,
    *,
    vendor: str = "nvidia",
    name: str | None = None,
    energy_counter: bool = True,
    memory_total_bytes: int | None = None,
    processes: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One GPU entry. ``vendor`` "nvidia" (the default; ``name`` defaults to an H100)
    or "amd" (an AMD Instinct MI300X with 192 GiB, shown only by the amdsmi simulator;
    ``index`` is then the AMD board's index and its UUID differs from an NVIDIA one of
    the same index). ``extra`` takes the other GPU keys: NVIDIA's (architecture,
    errors, mig_errors, field_errors, power_pattern, mig, mig_instances, counter_epoch,
    lost, util_supported, util_garbage, hang_s, memory_used_bytes) or AMD's (see
    daemon/sources/amdsmi_sim.py: power_sensor, compute_partition, memory_partition,
    counter_resolution_uj, errors, ...)."""
    if vendor not in ("nvidia", "amd"):
        raise ValueError(f"vendor: {vendor!r}")
    amd = vendor == "amd"
    entry: dict[str, Any] = {
        "name": name or ("AMD Instinct MI300X" if amd else "NVIDIA H100 80GB HBM3"),
        "uuid": f"{index:08x}-74a1-1000-80ff-0000000a{index:04x}" if amd else f"GPU-{index:08d}-sim",
        "power_w": power_w,
        "energy_counter": energy_counter,
        "memory_total_bytes": memory_total_bytes if memory_total_bytes is not None else (192 if amd else 80) * (1 << 30),
        "processes": list(processes or []),
    }
    if amd:
        entry = {"vendor": "amd", **entry}
    entry.update(extra)
    return entry


def amd_proc(pid: int, used_memory_bytes: int = 1 << 30, gfx_util: float | None = None, **extra: Any) -> dict[str, Any]:
    """One process entry of a simulated AMD GPU (``gfx_util``/``enc_util`` in %, turned
    into cumulative engine nanoseconds by the simulator; ``partition``;
    ``fdinfo_readable``)."""
    entry: dict[str, Any] = {"pid": pid, "used_memory_bytes": used_memory_bytes}
    if gfx_util is not None:
        entry["gfx_util"] = gfx_util
    entry.update(extra)
    return entry


def mig_instance(gi_id: int, profile: str = "1g.10gb", slices: int | None = None, **extra: Any) -> dict[str, Any]:
    """One ``mig_instances`` entry; ``slices`` defaults to the profile's "<n>g";
    ``extra``: memory_mb, compute_instances."""
    entry: dict[str, Any] = {"gi_id": gi_id, "profile": profile,
                             "slices": int(profile.split("g", 1)[0]) if slices is None else slices}
    entry.update(extra)
    return entry


def write_sim(path: str | os.PathLike[str], gpus: list[dict[str, Any]], **top: Any) -> Path:
    """Write ``{"gpus": gpus, **top}`` to ``path`` atomically; return the path."""
    return write_raw(path, json.dumps({"gpus": gpus, **top}, indent=1))


def write_raw(path: str | os.PathLike[str], text: str) -> Path:
    """Write arbitrary text (e.g. a malformed file) to ``path`` atomically."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target


class FakeClock:
    """A monotonic clock the test moves by hand (``clock.t = ...``); the simulators and
    the GPU collector take it as ``clock``. The ``clock`` fixture (tests/conftest.py)
    gives a fresh one at t = 1000 s."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t
