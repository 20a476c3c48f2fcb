"""The list of sinks the daemon knows: one ``SinkType`` per output (exporters/sink.py).

Adding a sink is one new module (the sink, its config dataclass, its ``SinkSection``
and its factory), one line here, and its section in docs/configuration.md. Order
matters only for /metrics and /healthz listing order and for start (in list order) and
stop (reverse order). ``daemon/config.py`` parses each entry's section; ``daemon/app.py``
builds, feeds, starts and stops the sinks, naming none of them. A factory may import
its sink's modules on use (as ``[influxdb]``'s does), so a sink that is off costs no
memory or start time.
"""

from __future__ import annotations

from typing import Any

from .influx_config import INFLUX_SECTION, InfluxConfig
from .sink import Sink, SinkContext, SinkType


def _influx_sink(cfg: InfluxConfig, ctx: SinkContext) -> Sink | None:
    """The ``[influxdb]`` factory (exporters/influx_publish.py ``make_influx_sink``),
    imported on use: the InfluxDB modules (the sink, its spool, line protocol, HTTP
    client) are loaded only when ``enabled = true`` (issue 18: a daemon with InfluxDB
    off does not carry them; see docs/benchmarks.md)."""
    if not cfg.enabled:
        return None
    from .influx_publish import make_influx_sink

    return make_influx_sink(cfg, ctx)


SINK_TYPES: list[SinkType[Any]] = [
    SinkType(INFLUX_SECTION, _influx_sink),  # [influxdb]
]
