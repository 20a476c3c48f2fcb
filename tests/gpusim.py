"""Test helper: write the simulated-NVML sim file (see daemon/sources/nvml_sim.py).

``write_sim`` replaces the file atomically (temp file in the same directory, then
``os.replace``), so a reader never sees half a file. ``gpu`` and ``proc`` build the
entries with the defaults tests usually want.
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
    name: str = "NVIDIA H100 80GB HBM3",
    energy_counter: bool = True,
    memory_total_bytes: int = 80 * (1 << 30),
    processes: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One GPU entry; ``extra`` takes the extension keys (counter_epoch, lost, mig,
    util_supported, memory_used_bytes)."""
    entry: dict[str, Any] = {
        "name": name,
        "uuid": f"GPU-{index:08d}-sim",
        "power_w": power_w,
        "energy_counter": energy_counter,
        "memory_total_bytes": memory_total_bytes,
        "processes": list(processes or []),
    }
    entry.update(extra)
    return entry


def write_sim(path: str | os.PathLike[str], gpus: list[dict[str, Any]]) -> Path:
    """Write ``{"gpus": gpus}`` to ``path`` atomically; return the path."""
    return write_raw(path, json.dumps({"gpus": gpus}, indent=1))


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
