"""Feed the InfluxDB sink from the daemon: one call per tick, per settlement and per
grid fetch, each turning the daemon's values into contract lines (influx_points)
and queueing them on the sink's durable spool (never blocking on the network).
"""

from __future__ import annotations

from typing import Iterable

from wattprint.daemon.grid.base import IntensityPoint
from wattprint.daemon.model import SettledBucket, TickRecord

from .influx import InfluxSink
from .influx_points import grid_intensity_line, job_co2e_line, tick_to_lines


class InfluxPublisher:
    """Adapters the engine and the grid fetcher call; all lines go to one sink."""

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
                                     status=status, at_s=record.bucket_start)  # type: ignore[arg-type]
                if line is not None:
                    lines.append(line)
        self.sink.submit(lines)

    def on_settled(self, settled: list[SettledBucket]) -> None:
        lines = []
        for s in settled:
            line = job_co2e_line(host=self.host, job_id=s.job.job_id, label=s.job.label, user=s.job.user,
                                 grams=s.co2e_g, g_per_kwh=s.g_per_kwh,
                                 status="final" if s.status == "final" else "provisional",  # type: ignore[arg-type]
                                 at_s=s.bucket_start)
            if line is not None:
                lines.append(line)
        self.sink.submit(lines)

    def on_points(self, points: Iterable[IntensityPoint]) -> None:
        lines = []
        for p in points:
            line = grid_intensity_line(zone=p.zone, provider=p.provider, kind=p.kind, g_per_kwh=p.g_per_kwh,
                                       at_s=p.start.timestamp(), host=self.host)
            if line is not None:
                lines.append(line)
        self.sink.submit(lines)
