"""Build the configured grid-intensity provider from ``[grid]`` (GridConfig)."""

from __future__ import annotations

from datetime import datetime
from typing import Callable

from ..config import GridConfig, is_set
from .base import IntensityProvider, utcnow
from .static import StaticProvider

# The live providers' modules are imported only for the provider named (issue 18: the
# default, "static", needs none of them).


def make_provider(cfg: GridConfig, *, now: Callable[[], datetime] = utcnow) -> IntensityProvider:
    """The provider named by ``cfg.provider``. Raises ValueError for a zone or token
    the provider cannot use (the message names the key)."""
    try:
        if cfg.provider == "energidataservice":
            from .energidataservice import EnergiDataServiceProvider

            return EnergiDataServiceProvider(cfg.zone, base_url=cfg.base_url, now=now)
        if cfg.provider == "carbonintensity_uk":
            from .carbonintensity_uk import CarbonIntensityUKProvider

            return CarbonIntensityUKProvider(cfg.zone, base_url=cfg.base_url, now=now)
        if cfg.provider == "electricitymaps":
            from .electricitymaps import ElectricityMapsProvider

            return ElectricityMapsProvider(cfg.zone, cfg.token, base_url=cfg.base_url, now=now)
        if cfg.provider == "static":
            # A static_g_per_kwh that was set (not the default) wins over the shipped table.
            explicit = cfg.static_g_per_kwh if is_set(cfg.static_g_per_kwh) else None
            return StaticProvider(cfg.zone, cfg.static_g_per_kwh, explicit_g_per_kwh=explicit, now=now)
    except ValueError as exc:
        raise ValueError(f"[grid] {exc}") from None
    raise ValueError(f"[grid] provider: unknown provider {cfg.provider!r}")
