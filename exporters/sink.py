"""The sink contract: what the daemon asks of every output it feeds (InfluxDB today;
OpenTelemetry, remote-write or a file tomorrow), and how a sink declares its config
section. docs/sinks.md ("Writing a sink") walks through it.

A sink is built from its own config section by its ``SinkType`` entry in
``exporters/sinks.py`` (``SINK_TYPES``); the daemon (``daemon/app.py``) names no sink:
for each entry it parses the section (``daemon/config.py`` does that from the
entry's ``SinkSection``), calls the factory, registers the sink's health part, appends
its three feeds to the engine, merges its counters into the daemon's self-metrics,
registers its collectors on /metrics, and starts and stops it with the HTTP server.

Threads: the feeds run on the engine's tick thread (one at a time, in tick order);
``start``/``stop`` on the event loop; ``counters``/``collectors``' ``collect`` on a
/metrics scrape (another thread). A feed never blocks on the network: it queues (the
InfluxDB sink appends to its durable spool) and a task started by ``start`` delivers.
A feed that raises degrades the daemon's ``sinks`` health part; the tick goes on.

This module imports nothing heavy at run time: ``daemon/config.py`` imports the
section declarations through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterable, Mapping, Protocol, TypeVar

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from wattprint.daemon.grid.base import IntensityPoint
    from wattprint.daemon.health import HealthBoard
    from wattprint.daemon.model import SettledBucket, TickRecord


class Sink(Protocol):
    """One output of the daemon.

    - ``name``: its part in /healthz (``health.register(name)`` is done for it; the sink
      reports ``ok``/``degraded`` there through the ``HealthBoard`` it was given).
    - ``on_tick(record)``: every tick's measured and booked deltas (device readings,
      per-job and unattributed energy, the bucket's CO2e so far).
    - ``on_settled(buckets)``: per-job bucket CO2e rewritten by settlement (new grid data).
    - ``on_grid(points)``: grid intensity points as stored, after each fetch.
    - ``start()`` / ``stop()``: on the event loop, once each; ``stop`` flushes what it can
      and keeps the rest for the next start (or says in health and counters what is lost).
    - ``counters()``: figures exported as ``wattprint_<key>`` self-metrics (no labels);
      keys must not collide with the daemon's or another sink's.
    - ``collectors()``: extra prometheus_client collectors (labelled series), may be empty.
    """

    @property
    def name(self) -> str: ...

    def on_tick(self, record: TickRecord) -> None: ...

    def on_settled(self, settled: list[SettledBucket]) -> None: ...

    def on_grid(self, points: list[IntensityPoint]) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def counters(self) -> dict[str, float]: ...

    def collectors(self) -> Iterable[Collector]: ...


@dataclass(frozen=True)
class SinkContext:
    """What a sink factory gets besides its own section."""

    state_dir: str  # [daemon] state_dir (exists and is writable): put durable files under it
    host: str  # [daemon] host: the host name to stamp on what the sink writes
    health: HealthBoard  # the daemon's health board (report under the sink's ``name``)


class SinkStartupError(Exception):
    """A sink cannot be built (its spool is locked, a file cannot be opened): the daemon
    does not start. The message says what to fix, naming the config section;
    ``exit_code`` 1 (systemd restarts) or 2 (only the configuration can fix it)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


C = TypeVar("C")

# A section's cross checks: (the parsed section, origin) -> problems. ``origin(key)``
# names where that key's value was set (the file, or the environment variable), for the
# message: f"{origin('url')}: [influxdb] url: must start with http://".
SectionCheck = Callable[[C, Callable[[str], str]], list[str]]


@dataclass(frozen=True)
class SinkSection(Generic[C]):
    """A sink's config section ``[name]``: a frozen dataclass of typed keys with defaults
    (bool, int, float, str, tuple[str, ...]), parsed by ``daemon/config.py`` exactly as
    the daemon's own sections (file and ``WATTPRINT_<NAME>_<KEY>`` variables; unknown
    keys, wrong types, ``choices`` and ``ranges`` reported together), then ``check``.
    Keys named ``token`` or ``password`` are secrets (redacted), and so is the password
    in any ``*url`` key."""

    name: str
    config_type: type[C]
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # key -> allowed values
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)  # key -> (min, max) inclusive
    check: SectionCheck[C] | None = None


@dataclass(frozen=True)
class SinkType(Generic[C]):
    """One entry of ``SINK_TYPES``: the section and the factory. The factory returns
    None when the section leaves the sink off (``enabled = false``), else the sink,
    not yet started; it raises ``SinkStartupError`` when the sink cannot be built."""

    section: SinkSection[C]
    factory: Callable[[C, SinkContext], Sink | None]


def feed_all(feeds: Iterable[Callable[[Any], None]], value: Any, health: HealthBoard) -> None:
    """Hand ``value`` to every feed; one that raises degrades ``sinks``, never the caller
    (the engine does the same for its tick and settlement feeds)."""
    for feed in feeds:
        try:
            feed(value)
        except Exception as exc:
            health.fail("sinks", f"{type(exc).__name__}: {exc}")
