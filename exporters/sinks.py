"""The list of sinks the daemon knows: one ``SinkType`` per output (exporters/sink.py).

Adding a sink is one new module (the sink, its config dataclass, its ``SinkSection``
and its factory), one line here, and its section in docs/configuration.md. Order
matters only for /metrics and /healthz listing order and for start (in list order) and
stop (reverse order). ``daemon/config.py`` parses each entry's section; ``daemon/app.py``
builds, feeds, starts and stops the sinks, naming none of them.
"""

from __future__ import annotations

from typing import Any

from .influx_publish import INFLUX_SINK_TYPE
from .sink import SinkType

SINK_TYPES: list[SinkType[Any]] = [
    INFLUX_SINK_TYPE,  # [influxdb]
]
