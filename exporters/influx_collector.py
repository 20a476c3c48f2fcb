"""The InfluxDB sink's labelled Prometheus series: its counters by reason (dropped
lines, failed write requests, spool cursor repairs), read from ``InfluxSink.stats()`` at
each scrape."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .influx import InfluxSink


class InfluxSinkCollector(Collector):
    """The sink's counters by reason, as labelled Prometheus metrics (register it on the
    daemon's registry): ``wattprint_influx_points_dropped_total{reason}``,
    ``wattprint_influx_write_failures_total{reason}`` and
    ``wattprint_spool_cursor_repairs_total{reason}``."""

    def __init__(self, sink: InfluxSink) -> None:
        self._sink = sink

    def collect(self) -> Any:
        stats = self._sink.stats()
        dropped = CounterMetricFamily(
            "wattprint_influx_points_dropped", "InfluxDB lines lost or set aside (dead-lettered), by reason.",
            labels=["reason"])
        for reason, n in sorted(stats["points_dropped_total"].items()):
            dropped.add_metric([reason], float(n))
        failures = CounterMetricFamily(
            "wattprint_influx_write_failures",
            "InfluxDB write requests that stored nothing (the lines were kept and retried), by reason.",
            labels=["reason"])
        for reason in ("redirect", "not_204", "unreachable", "timeout", "auth", "missing_db",
                       "http_4xx", "http_5xx"):
            failures.add_metric([reason], float(stats["write_failures_total"].get(reason, 0)))
        for reason, n in sorted(stats["write_failures_total"].items()):
            if reason not in ("redirect", "not_204", "unreachable", "timeout", "auth", "missing_db",
                              "http_4xx", "http_5xx"):
                failures.add_metric([reason], float(n))
        repairs = CounterMetricFamily(
            "wattprint_spool_cursor_repairs", "Spool cursors found damaged and repaired by replaying, by reason.",
            labels=["reason"])
        for reason, n in sorted(stats["spool_cursor_repairs_total"].items()):
            repairs.add_metric([reason], float(n))
        return [dropped, failures, repairs]
