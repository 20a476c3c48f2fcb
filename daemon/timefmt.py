"""Seconds since the epoch written as UTC text: the one place for these formats.

- ``iso_z(t)``: ISO 8601 in UTC with a ``Z``, whole seconds (``2024-01-12T09:00:00Z``);
  ``iso_z(t, fraction=True)`` with microseconds (``2024-01-12T09:00:00.250000Z``),
  as InfluxDB's query API takes it.
- ``iso_offset(t)``: Python's ``isoformat`` in UTC (``2024-01-12T09:00:00+00:00``,
  microseconds only when not zero), the CSV export's format.
- ``human(t)``: ``2024-01-12 09:00:00`` for tables and reports (UTC; callers add
  "UTC" where the text does not say so elsewhere).

Provider-specific request formats (minutes only, local Danish time) stay with their
providers in daemon/grid/.
"""

from __future__ import annotations

from datetime import datetime, timezone


def utc(t_s: float) -> datetime:
    """Seconds since the epoch as an aware UTC datetime."""
    return datetime.fromtimestamp(t_s, tz=timezone.utc)


def iso_z(t: float | datetime, *, fraction: bool = False) -> str:
    """``t``: seconds since the epoch, or an aware datetime (shown in UTC)."""
    when = t.astimezone(timezone.utc) if isinstance(t, datetime) else utc(t)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if fraction else "%Y-%m-%dT%H:%M:%SZ")


def iso_offset(t_s: float) -> str:
    return utc(t_s).isoformat()


def human(t_s: float) -> str:
    return utc(t_s).strftime("%Y-%m-%d %H:%M:%S")
