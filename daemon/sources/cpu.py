"""Choose the CPU and DRAM energy sources from ``[cpu]`` and ``[memory]``: RAPL
counters when they can be read, estimates otherwise, and never the same DRAM twice.

``[cpu] source``:

- ``rapl``: a ``RaplSource`` even when the tree is absent or denied; it then raises
  ``SourceError`` on every read, so /healthz shows "rapl" degraded with the reason.
- ``estimate``: ``CpuEstimateSource`` (TDP × load curve).
- ``none``: no CPU source.
- ``auto``: ``RaplSource`` when ``probe_rapl`` says ok. When RAPL is present but
  ``energy_uj`` is denied (Linux ≥ 5.10 for non-root), the health part "rapl" is set
  degraded with the permission message (logged as an error; it stays degraded in
  /healthz) *and* CPU energy comes from the estimate, labelled ``estimate``: the box
  still gets numbers, and nobody can mistake them for measured ones. When there is
  no RAPL at all, "rapl" is marked disabled ("no powercap zones under ROOT: CPU
  energy estimated") and the estimate is used.

``[memory] source``:

- ``auto``: the RAPL dram zones when RAPL is the CPU source and has them; nothing
  when the RAPL CPU zone is ``psys`` (it already contains memory); else
  ``DramEstimateSource``.
- ``rapl``: only RAPL dram zones. When there are none, the health part "rapl-dram"
  is set degraded (logged) and no DRAM source is opened.
- ``estimate``: ``DramEstimateSource``; RAPL dram zones are not reported.
- ``none``: no DRAM source; RAPL dram zones are not reported.
"""

from __future__ import annotations

import logging
from typing import Callable

from ..config import CpuConfig, MemoryConfig
from ..health import HealthBoard
from .base import Source
from .estimate import CpuEstimateSource, DramEstimateSource
from .rapl import ProbeStatus, RaplSource, discover_zones, probe_rapl

log = logging.getLogger("wattprint.sources.cpu")


def open_cpu_sources(
    cpu: CpuConfig,
    mem: MemoryConfig,
    health: HealthBoard,
    *,
    probe: Callable[[str], tuple[ProbeStatus, str]] = probe_rapl,
) -> list[Source]:
    """The CPU and DRAM sources for this config (0 to 2 of them). Never raises for
    missing or unreadable hardware: that shows in ``health``. ``probe`` is
    injectable for tests."""
    root = cpu.powercap_root
    sources: list[Source] = []

    # CPU: RAPL or the estimate.
    use_rapl_cpu = False
    if cpu.source == "rapl":
        use_rapl_cpu = True
    elif cpu.source == "auto":
        status, detail = probe(root)
        if status == "ok":
            use_rapl_cpu = True
        elif status == "denied":
            health.fail("rapl", detail)
            log.error("RAPL is present but unreadable: %s. CPU energy is estimated "
                      "(source=estimate) until this is fixed.", detail)
        else:
            health.disable("rapl", f"{detail}: CPU energy estimated")
    use_cpu_estimate = cpu.source == "estimate" or (cpu.source == "auto" and not use_rapl_cpu)

    # DRAM: RAPL dram zones, the estimate, or nothing.
    zones = discover_zones(root) if mem.source in ("auto", "rapl") else []
    rapl_has_dram = any(z.kind == "dram" for z in zones)
    rapl_is_psys = any(z.device == "psys" for z in zones)
    use_rapl_dram = False
    use_dram_estimate = False
    if mem.source == "auto":
        if use_rapl_cpu and rapl_has_dram:
            use_rapl_dram = True
        elif use_rapl_cpu and rapl_is_psys:
            log.info("RAPL psys includes memory: no separate DRAM source")
        else:
            use_dram_estimate = True
    elif mem.source == "rapl":
        if rapl_has_dram:
            use_rapl_dram = True
        else:
            detail = (f"[memory] source = \"rapl\" but there is no RAPL dram zone under {root} "
                      "(AMD Zen has none): no DRAM energy; use source = \"estimate\"")
            health.fail("rapl-dram", detail)
    elif mem.source == "estimate":
        use_dram_estimate = True

    if use_rapl_cpu or use_rapl_dram:
        sources.append(RaplSource(root, include_cpu=use_rapl_cpu, include_dram=use_rapl_dram,
                                  glitch_hold_s=cpu.glitch_hold_s))
    if use_cpu_estimate:
        sources.append(CpuEstimateSource(cpu.tdp_w))
    if use_dram_estimate:
        sources.append(DramEstimateSource(mem.w_per_gb))
    return sources
