"""The ledger: per-job energy by component in time buckets, job metadata, device and
unattributed totals, and the grid intensity used for each bucket, in SQLite.

- ``schema``: the tables, opening a connection, checking and migrating a store;
- ``writer``: ``Ledger``, the one writer (the tick thread), and what it books
  (``TickRow``, ``JobTick``), settlement and retention;
- ``reader``: ``StoreReader``, typed reads for the API and the CLI;
- ``co2e_sql``: the CO2e of jobs as SQL (Σ slot energy x slot intensity), shared by both.

CO2e is never stored as a number that could go stale (see ``co2e_sql``). The API's
JSON objects are built in daemon/api_views.py; ``LedgerReader`` (the old name of the
reader that returned them) is ``api_views.JobViews``, importable from here as before.
"""

from __future__ import annotations

from typing import Any

from ..carbon import BASIS_RANK, J_PER_KWH
from ..model import COMPONENTS, Intensity, JobIdentity
from .reader import (
    DeviceTotal,
    HostRows,
    IntensityRow,
    JobCarbon,
    JobRecord,
    SeriesBucket,
    SlotValue,
    SlurmRecord,
    StoreReader,
)
from .schema import (
    OPEN_BUSY_TIMEOUT_S,
    SCHEMA_VERSION,
    TICK_BUSY_TIMEOUT_MS,
    LedgerError,
)
from .writer import PRUNE_TABLES, JobTick, Ledger, TickRow

__all__ = [
    "BASIS_RANK", "COMPONENTS", "J_PER_KWH", "OPEN_BUSY_TIMEOUT_S", "PRUNE_TABLES", "SCHEMA_VERSION",
    "TICK_BUSY_TIMEOUT_MS", "DeviceTotal", "HostRows", "Intensity", "IntensityRow", "JobCarbon", "JobIdentity",
    "JobRecord", "JobTick", "Ledger", "LedgerError", "LedgerReader", "SeriesBucket", "SlotValue", "SlurmRecord",
    "StoreReader", "TickRow",
]


def __getattr__(name: str) -> Any:
    # The API layer imports this package, so its reader is imported on first use only.
    if name == "LedgerReader":
        from ..api_views import JobViews

        return JobViews
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
