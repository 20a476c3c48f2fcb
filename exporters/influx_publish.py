"""The InfluxDB sink as the daemon sees it (the ``Sink`` contract, exporters/sink.py):
one call per tick, per settlement and per grid fetch, each turning the daemon's values
into contract lines (influx_points: per tick also each job's ``job_footprint``, embodied
CO2e and water; per bucket ``job_co2e`` with its market-based ``market_grams``, rewritten
at settlement) and queueing them on the ``InfluxSink``'s durable
spool (never blocking on the network); start/stop run its delivery task; its figures
become the ``wattprint_influx_*`` / ``wattprint_spool_*`` self-metrics.

``INFLUX_SINK_TYPE`` (the first entry of exporters/sinks.py) builds it from the
``[influxdb]`` section (exporters/influx_config.py) when ``enabled = true``.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from prometheus_client.registry import Collector

from wattprint.daemon.grid.base import IntensityPoint
from wattprint.daemon.model import SettledBucket, TickRecord

from .influx import HEALTH_PART, InfluxSink, InfluxSinkCollector
from .influx_config import INFLUX_SECTION, InfluxConfig
from .influx_points import grid_intensity_line, job_co2e_line, tick_to_lines
from .sink import SinkContext, SinkStartupError, SinkType
from .spool import SpoolLockedError


class InfluxPublisher:
    """The InfluxDB sink: adapters the engine and the grid fetcher call; all lines go
    to one ``InfluxSink`` (its spool and delivery task)."""

    name = HEALTH_PART

    def __init__(self, sink: InfluxSink, host: str):
        self.sink = sink
        self.host = host

    def on_tick(self, record: TickRecord) -> None:
        lines = tick_to_lines(record, self.host)
        if record.g_per_kwh is not None:
            for job_id, grams in record.bucket_co2e_g.items():
                ref = record.jobs.get(job_id)
                # The job's bucket so far: its energy-weighted mean over the provider
                # intervals it used, as settlement rewrites it (the tick's own value
                # only for a bucket without any value yet).
                g = record.bucket_g_per_kwh.get(job_id, record.g_per_kwh)
                known = record.bucket_intensity_status.get(job_id, record.intensity_status)
                status = "final" if known == "final" else "provisional"
                line = job_co2e_line(host=self.host, job_id=job_id, label=ref.label if ref else "",
                                     user=ref.user if ref else "", grams=grams, g_per_kwh=g,
                                     status=status, at_s=record.bucket_start,  # type: ignore[arg-type]
                                     market_grams=record.bucket_co2e_market_g.get(job_id))
                if line is not None:
                    lines.append(line)
        self.sink.submit(lines)

    def on_settled(self, settled: list[SettledBucket]) -> None:
        lines = []
        for s in settled:
            line = job_co2e_line(host=self.host, job_id=s.job.job_id, label=s.job.label, user=s.job.user,
                                 grams=s.co2e_g, g_per_kwh=s.g_per_kwh,
                                 status="final" if s.status == "final" else "provisional",  # type: ignore[arg-type]
                                 at_s=s.bucket_start, market_grams=s.co2e_market_g)
            if line is not None:
                lines.append(line)
        self.sink.submit(lines)

    def on_grid(self, points: Iterable[IntensityPoint]) -> None:
        lines = []
        for p in points:
            line = grid_intensity_line(zone=p.zone, provider=p.provider, kind=p.kind, g_per_kwh=p.g_per_kwh,
                                       at_s=p.start.timestamp(), host=self.host)
            if line is not None:
                lines.append(line)
        self.sink.submit(lines)

    on_points = on_grid  # the name before the Sink contract

    async def start(self) -> None:
        self.sink.start()

    async def stop(self) -> None:
        await self.sink.stop()

    def counters(self) -> dict[str, float]:
        return influx_counters(self.sink.stats())

    def collectors(self) -> list[Collector]:
        # dropped lines, failed writes, cursor repairs: by reason (labels)
        return [InfluxSinkCollector(self.sink)]


def influx_counters(stats: dict[str, Any]) -> dict[str, float]:
    """The sink's figures as daemon self-metrics (``wattprint_<key>``)."""
    out = {
        "influx_points_written_total": float(stats["points_written_total"]),
        "influx_points_retried_total": float(stats["points_retried_total"]),
        "spool_bytes": float(stats["spool_bytes"]),
        "spool_pending_points": float(stats["spool_pending_points"]),
        "spool_oldest_age_seconds": float(stats["spool_oldest_age_s"] or 0.0),
        "spool_unreadable_bytes_total": float(stats["spool_unreadable_bytes_total"]),
    }
    for reason, n in stats["points_dropped_total"].items():
        out[f"influx_points_dropped_{reason}_total"] = float(n)
    return out


def make_influx_sink(cfg: InfluxConfig, ctx: SinkContext) -> InfluxPublisher | None:
    """The InfluxDB sink over its spool ``<state_dir>/influx-spool``; None unless enabled."""
    if not cfg.enabled:
        return None
    spool_dir = os.path.join(ctx.state_dir, "influx-spool")
    try:
        sink = InfluxSink(cfg, spool_dir, ctx.health)
    except (SpoolLockedError, OSError) as exc:
        raise SinkStartupError(f"[influxdb] spool {spool_dir}: {exc}") from None
    return InfluxPublisher(sink, ctx.host)


INFLUX_SINK_TYPE: SinkType[InfluxConfig] = SinkType(INFLUX_SECTION, make_influx_sink)
