"""A sink used only by tests: proof that a sink is one file, one config section and
one line in the sink list (exporters/sink.py, docs/sinks.md).

``[sink_jsonl]`` (``enabled``, ``path``, ``flush_every_ticks``) turns it on. It writes
one JSON line per tick to ``path`` (``{"tick": n, "sampled_at", "interval_s",
"devices": [{"kind", "device", "energy_j"}], "jobs", "unattributed_j"}``), one per
settlement (``{"settled": n}``) and per grid fetch (``{"grid": n}``); ``start`` writes
``<path>.started``, ``stop`` closes the file and writes ``<path>.stopped`` (JSON: the
ticks and lines it wrote). Its counters are ``sink_jsonl_ticks_total`` and
``sink_jsonl_lines_total``; its collector exports
``wattprint_sink_jsonl_energy_joules_total{kind}`` (the device energy it was fed).

tests/sink_launcher.py adds it to ``SINK_TYPES`` and runs the daemon's CLI.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterable

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from wattprint.daemon.grid.base import IntensityPoint
from wattprint.daemon.model import SettledBucket, TickRecord
from wattprint.exporters.sink import SinkContext, SinkSection, SinkStartupError, SinkType

NAME = "sink_jsonl"


@dataclass(frozen=True)
class JsonlConfig:
    enabled: bool = False
    path: str = ""
    flush_every_ticks: int = 1


def check_jsonl(cfg: JsonlConfig, origin: Callable[[str], str]) -> list[str]:
    if cfg.enabled and not cfg.path:
        return [f"{origin('enabled')}: [{NAME}] path: required when enabled = true"]
    return []


JSONL_SECTION: SinkSection[JsonlConfig] = SinkSection(
    name=NAME, config_type=JsonlConfig, ranges={"flush_every_ticks": (1, 1000)}, check=check_jsonl)


class JsonlSink:
    """Appends JSON lines to a local file on the tick thread (no network)."""

    name = NAME

    def __init__(self, cfg: JsonlConfig, ctx: SinkContext):
        self.cfg = cfg
        self.health = ctx.health
        self._fh: IO[str] | None = None
        self._lock = threading.Lock()  # counters are read by /metrics on another thread
        self._ticks = 0
        self._lines = 0
        self._energy_j: dict[str, float] = {}
        self._since_flush = 0

    def _write(self, obj: dict[str, Any]) -> None:
        if self._fh is None:
            self.health.fail(self.name, "fed before start or after stop")
            return
        self._fh.write(json.dumps(obj) + "\n")
        self._since_flush += 1
        if self._since_flush >= self.cfg.flush_every_ticks:
            self._fh.flush()
            self._since_flush = 0
        with self._lock:
            self._lines += 1

    def on_tick(self, record: TickRecord) -> None:
        with self._lock:
            self._ticks += 1
            tick = self._ticks
            for r in record.readings:
                self._energy_j[r.kind] = self._energy_j.get(r.kind, 0.0) + r.energy_j
        self._write({"tick": tick, "sampled_at": record.sampled_at, "interval_s": record.interval_s,
                     "devices": [{"kind": r.kind, "device": r.device, "parent": r.parent, "energy_j": r.energy_j}
                                 for r in record.readings],
                     "jobs": {j: dict(e) for j, e in record.job_energy_j.items()},
                     "unattributed_j": dict(record.unattributed_j)})

    def on_settled(self, settled: list[SettledBucket]) -> None:
        self._write({"settled": len(settled)})

    def on_grid(self, points: list[IntensityPoint]) -> None:
        self._write({"grid": len(points)})

    async def start(self) -> None:
        await asyncio.to_thread(self._open)  # file work off the event loop
        self.health.ok(self.name, f"writing {os.path.basename(self.cfg.path)}")

    def _open(self) -> None:
        self._fh = open(self.cfg.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        with open(self.cfg.path + ".started", "w", encoding="utf-8") as fh:
            fh.write("started\n")

    async def stop(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()
        with self._lock:
            summary = {"ticks": self._ticks, "lines": self._lines}
        with open(self.cfg.path + ".stopped", "w", encoding="utf-8") as out:
            json.dump(summary, out)

    def counters(self) -> dict[str, float]:
        with self._lock:
            return {"sink_jsonl_ticks_total": float(self._ticks), "sink_jsonl_lines_total": float(self._lines)}

    def collectors(self) -> Iterable[Collector]:
        return [_EnergyCollector(self)]


class _EnergyCollector(Collector):
    def __init__(self, sink: JsonlSink):
        self._sink = sink

    def collect(self) -> Any:
        family = CounterMetricFamily("wattprint_sink_jsonl_energy_joules",
                                     "Device energy the test sink was fed, by kind.", labels=["kind"])
        with self._sink._lock:
            for kind, joules in sorted(self._sink._energy_j.items()):
                family.add_metric([kind], joules)
        return [family]


def make_jsonl_sink(cfg: JsonlConfig, ctx: SinkContext) -> JsonlSink | None:
    if not cfg.enabled:
        return None
    if not os.path.isdir(os.path.dirname(os.path.abspath(cfg.path))):
        raise SinkStartupError(f"[{NAME}] path {cfg.path}: its directory does not exist", exit_code=2)
    return JsonlSink(cfg, ctx)


JSONL_SINK_TYPE: SinkType[JsonlConfig] = SinkType(JSONL_SECTION, make_jsonl_sink)
