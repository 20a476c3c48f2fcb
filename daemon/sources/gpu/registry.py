"""Which GPU sources the daemon opens: one per vendor present (Kepler's
``internal/device`` shape). A vendor is one module (nvidia.py, amd.py) that knows how
to open its source; this registry only decides which of them to ask, from
``[gpu] backend``:

- ``none``: no GPU source (health ``gpu`` shown disabled).
- ``nvml``: NVIDIA only, asked for explicitly (no driver: degraded).
- ``amdsmi``: AMD only, asked for explicitly (no driver or no ``amdsmi`` package: degraded).
- ``auto``: NVIDIA as always (quiet without a driver), and AMD when the ``amdsmi``
  package imports (quiet without a driver; absent package: no AMD source at all).
- ``sim``: the simulators driven by ``[gpu] sim_file``: the NVIDIA one unless the file
  holds only AMD GPUs, the amdsmi one when it holds an AMD GPU.

Each opening carries the health name its source reports under (NVIDIA ``gpu``, AMD
``gpu_amd``), so a vendor that could not be opened is shown disabled under its own name.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from ...config import GpuConfig
from ..base import Source
from .nvidia import open_nvidia, open_nvidia_sim

AMD_HEALTH_NAME = "gpu_amd"


class GpuOpening(NamedTuple):
    name: str  # the health name: "gpu" (NVIDIA), "gpu_amd" (AMD)
    source: Source | None  # None: that vendor is not measured (message says why)
    message: str  # one line for the log


def sim_vendors(path: str) -> set[str]:
    """The vendors that have GPUs in a sim file (each GPU's ``vendor``, else the
    file's top-level ``vendor``, else "nvidia"); empty when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as fh:
            data: Any = json.load(fh)
    except (OSError, ValueError):
        return set()
    if not isinstance(data, dict):
        return set()
    default = data.get("vendor", "nvidia")
    gpus = data.get("gpus", [])
    if not isinstance(gpus, list):
        return set()
    return {str(g.get("vendor", default)) if isinstance(g, dict) else str(default) for g in gpus}


def _open_amd(cfg: GpuConfig, *, quiet: bool, sim: bool) -> tuple[Source | None, str]:
    """AMD's opener (amd.py, which imports ``amdsmi`` lazily itself)."""
    try:
        from . import amd
    except ImportError as exc:  # amd.py not there (or broken): AMD not supported by this build
        return None, f"AMD GPUs not supported by this build ({exc})"
    if sim:
        from ..amdsmi_sim import SimulatedAmdSmi

        return amd.open_amd(cfg, SimulatedAmdSmi(cfg.sim_file), quiet=True)
    return amd.open_amd(cfg, quiet=quiet)


def open_gpu_sources(cfg: GpuConfig) -> list[GpuOpening]:
    """The GPU sources the config asks for, one per vendor present. Never raises for
    a missing GPU, driver or package."""
    backend = cfg.backend
    if backend == "none":
        return [GpuOpening("gpu", None, "GPU disabled by config")]
    if backend == "sim":
        vendors = sim_vendors(cfg.sim_file)
        out: list[GpuOpening] = []
        if vendors != {"amd"}:  # NVIDIA GPUs, or none yet (GPUs may appear in the file later)
            src, message = open_nvidia_sim(cfg)
            out.append(GpuOpening("gpu", src, message))
        if "amd" in vendors:
            src, message = _open_amd(cfg, quiet=True, sim=True)
            out.append(GpuOpening(AMD_HEALTH_NAME, src, message))
        return out
    if backend == "nvml":
        return [GpuOpening("gpu", *open_nvidia(cfg, quiet=False))]
    if backend == "amdsmi":
        return [GpuOpening(AMD_HEALTH_NAME, *_open_amd(cfg, quiet=False, sim=False))]
    if backend != "auto":
        return [GpuOpening("gpu", None, f"GPU disabled: unknown backend {backend!r}")]
    out = [GpuOpening("gpu", *open_nvidia(cfg, quiet=True))]
    src, message = _open_amd(cfg, quiet=True, sim=False)
    if src is not None:  # no amdsmi package, no AMD driver: quietly nothing for AMD
        out.append(GpuOpening(AMD_HEALTH_NAME, src, message))
    return out


def open_gpu_source(cfg: GpuConfig) -> tuple[Source | None, str]:
    """The NVIDIA source alone, as before vendors (kept for old callers and tests):
    ``none``, ``sim`` (the simulated NVML), ``nvml`` and ``auto``."""
    backend = cfg.backend
    if backend == "none":
        return None, "GPU disabled by config"
    if backend == "sim":
        return open_nvidia_sim(cfg)
    if backend not in ("nvml", "auto"):
        return None, f"GPU disabled: unknown backend {backend!r}"
    return open_nvidia(cfg, quiet=backend == "auto")
