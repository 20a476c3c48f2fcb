"""Lifecycle footprint of jobs (issue 16): the sourced factors (``factors.py``: embodied
carbon of GPUs, CPUs, DRAM and the server platform, service life, water intensities,
market-based instruments) and the per-job arithmetic (``lifecycle.py``).
docs/carbon.md ("Lifecycle footprint") states the method and the boundaries."""

from .factors import Factor, Footprint, Market, build_footprint, default_footprint

__all__ = ["Factor", "Footprint", "Market", "build_footprint", "default_footprint"]
