"""The ``[influxdb]`` config section, declared next to the InfluxDB sink: its keys and
defaults (``InfluxConfig``), allowed values, ranges and cross checks. ``daemon/config.py``
parses it like every section (it is the first entry of ``exporters/sinks.py``); the
sink (``influx_publish.py``), ``wattprint doctor`` and the fleet queries read it as
``cfg.influxdb``.

Import-light on purpose: ``daemon/config.py`` imports it at start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .sink import SinkSection


@dataclass(frozen=True)
class InfluxConfig:
    enabled: bool = False
    url: str = "http://127.0.0.1:8086"
    api: str = "v1"  # v1 | v2
    database: str = "wattprint"
    retention_policy: str = ""
    username: str = ""
    password: str = ""
    token: str = ""
    org: str = ""
    bucket: str = "wattprint"
    batch_size: int = 5000
    flush_interval_s: float = 1.0
    timeout_s: float = 10.0
    spool_max_bytes: int = 256 * 1024 * 1024
    gzip: bool = True


def check_influx(influx: InfluxConfig, origin: Callable[[str], str]) -> list[str]:
    """Combinations that cannot work, each blamed on where the deciding key was set."""
    problems: list[str] = []
    if influx.enabled and not influx.url.startswith(("http://", "https://")):
        problems.append(f"{origin('url')}: [influxdb] url: must start with http:// or https://")
    if influx.enabled and influx.api == "v2" and not (influx.org and influx.bucket and influx.token):
        missing = [k for k in ("org", "bucket", "token") if not getattr(influx, k)]
        problems.append(f"{origin('api')}: [influxdb] {', '.join(missing)}: "
                        f"api = \"v2\" needs org, bucket and token")
    return problems


INFLUX_SECTION: SinkSection[InfluxConfig] = SinkSection(
    name="influxdb",
    config_type=InfluxConfig,
    choices={"api": ("v1", "v2")},
    ranges={
        "batch_size": (1, 1_000_000),
        "flush_interval_s": (0.05, 3600.0),
        "timeout_s": (0.1, 10.0),
        "spool_max_bytes": (4096, 1 << 40),
    },
    check=check_influx,
)
