"""Assemble the daemon from its config and run it until SIGTERM/SIGINT.

Builds the sources, the process tracker, the ledger, the engine, the exporters and the
HTTP server; everything that opens files or devices happens here, before the event
loop starts, so a bad state directory or a corrupt store fails at start with a clear
message instead of on the first tick.

Parts it uses, each in a module of its own (their names are importable from here as
before): startup.py (``StartupError``, the state-directory check), unix_socket.py (the
API's Unix socket), logredact.py (the log filter that redacts secrets).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from aiohttp import web

from wattprint.exporters.prometheus import add_daemon_collectors, build_registry, render
from wattprint.exporters.sink import Sink, SinkContext, SinkStartupError, feed_all
from wattprint.exporters.sinks import SINK_TYPES

from . import sdnotify
from .api import Api, ConnectionLimiter, fitting_max_connections, raise_nofile_limit, start_runner
from .carbon import KEEP_S, IntensityBook
from .config import Config, ConfigError, parse_listen
from .engine import Engine
from .footprint.factors import build_footprint
from .grid import make_provider
from .grid.base import IntensityPoint, IntensityProvider
from .grid.static import StaticProvider
from .health import HealthBoard
from .ledger import Ledger, LedgerError, LedgerReader
from .ledger.schema import bound_page_cache
from .logredact import RedactingFilter
from .procs import ProcessTracker
from .sources.base import Source
from .sources.cpu import open_cpu_sources
from .sources.gpu import open_gpu_sources
from .sources.node import NO_BMC, open_node_source
from .startup import _STATE_DIR_CONFIG_ERRNOS, StartupError, prepare_state_dir
from .unix_socket import UnixSocket, _socket_in_use

if TYPE_CHECKING:
    from .grid.scheduler import GridFetcher

__all__ = ["Daemon", "RedactingFilter", "StartupError", "UnixSocket", "_STATE_DIR_CONFIG_ERRNOS", "_socket_in_use",
           "build_daemon", "build_engine", "build_sinks", "last_actual_end", "make_book", "on_points",
           "prepare_state_dir", "run", "serve", "stop_sinks", "store_path"]

log = logging.getLogger("wattprint")


def store_path(cfg: Config) -> str:
    return os.path.join(cfg.daemon.state_dir, "wattprint.sqlite3")


@dataclass
class Daemon:
    """Everything ``run`` assembles: the engine, the grid and the sinks that are on."""

    engine: Engine
    provider: IntensityProvider
    book: IntensityBook
    sinks: list[Sink] = field(default_factory=list)  # built from exporters/sinks.py, in its order


def make_book(cfg: Config, ledger: Ledger) -> tuple[IntensityProvider, IntensityBook]:
    """The grid provider and the intensity book, filled from the stored series."""
    try:
        provider = make_provider(cfg.grid)
    except ValueError as exc:
        raise ConfigError([f"{cfg.source_path or '<defaults>'}: {exc}"]) from None
    static = provider.g_per_kwh if isinstance(provider, StaticProvider) else None
    if isinstance(provider, StaticProvider):
        log.info("grid: %s", provider.note)  # which number, and a zone mapped to another table entry
    book = IntensityBook(cfg.grid, provider.name, provider.zone, static_g_per_kwh=static)
    now = time.time()
    stored = [
        IntensityPoint(start=datetime.fromtimestamp(a, timezone.utc), end=datetime.fromtimestamp(b, timezone.utc),
                       g_per_kwh=g, kind=kind, zone=provider.zone, provider=provider.name)  # type: ignore[arg-type]
        for a, b, g, kind in ledger.load_points(provider.name, provider.zone, now - KEEP_S)
    ]
    book.update(stored, now)
    return provider, book


def build_daemon(cfg: Config, health: HealthBoard) -> Daemon:
    engine = build_engine(cfg, health)
    provider, book = make_book(cfg, engine.ledger)
    engine.intensity = book
    daemon = Daemon(engine=engine, provider=provider, book=book, sinks=build_sinks(cfg, health))
    for sink in daemon.sinks:  # tick and settlement feeds; grid points in on_points
        engine.sinks.append(sink.on_tick)
        engine.settle_sinks.append(sink.on_settled)
        engine.counter_feeds.append(sink.counters)
    return daemon


def build_sinks(cfg: Config, health: HealthBoard) -> list[Sink]:
    """Every sink of ``SINK_TYPES`` that its config section turns on, in list order,
    each with its health part registered."""
    ctx = SinkContext(state_dir=cfg.daemon.state_dir, host=cfg.daemon.host, health=health)
    sinks: list[Sink] = []
    for entry in SINK_TYPES:
        section = cfg.sinks.get(entry.section.name)
        if section is None:  # a Config made before the entry was listed: its defaults
            section = entry.section.config_type()
        try:
            sink = entry.factory(section, ctx)
        except SinkStartupError as exc:
            raise StartupError(str(exc), exc.exit_code) from None
        if sink is not None:
            health.register(sink.name)
            sinks.append(sink)
    return sinks


def build_engine(cfg: Config, health: HealthBoard) -> Engine:
    prepare_state_dir(cfg.daemon.state_dir)
    sources: list[Source] = []
    gpus = open_gpu_sources(cfg.gpu)  # one per GPU vendor present
    for opened in gpus:
        log.info("%s", opened.message)
        if opened.source is not None:
            sources.append(opened.source)
            waiting = getattr(opened.source, "disabled_reason", "")  # no driver yet: disabled until one loads
            if waiting:
                health.disable(opened.name, waiting)
        else:
            health.disable(opened.name, opened.message)
    sources.extend(open_cpu_sources(cfg.cpu, cfg.memory, health))
    node = open_node_source(cfg.node)  # the BMC, on its own polling thread; None without [node]
    if node is not None:
        log.info("node power from the BMC through %s, every %g s", cfg.node.source, cfg.node.poll_interval_s)
        sources.append(node)
    else:
        health.register("node")
        health.disable("node", NO_BMC)
    try:
        ledger = Ledger(store_path(cfg), host=cfg.daemon.host, bucket_s=cfg.daemon.bucket_s)
    except LedgerError as exc:
        raise StartupError(str(exc)) from None
    footprint = build_footprint(cfg)  # lifecycle factors: shipped data + [footprint]/[market]
    log.info("footprint: %s", footprint.describe())  # which factors, from where; class defaults said
    engine = Engine(
        sources=sources,
        tracker=ProcessTracker(
            label_env=cfg.jobs.label_env,
            rescan_interval_s=cfg.jobs.rescan_interval_s,
            cgroup_kinds=cfg.jobs.cgroup_kinds,
            cgroup_root=cfg.jobs.cgroup_root,
            max_labels_per_user=cfg.jobs.max_labels_per_user,
            label_cap_hold_s=cfg.jobs.label_cap_hold_s,
        ),
        ledger=ledger,
        intensity=IntensityBook(cfg.grid, "static", cfg.grid.zone or "static", cfg.grid.static_g_per_kwh),
        health=health,
        interval_s=cfg.daemon.interval_s,
        pue=cfg.accounting.pue,
        finished_grace_s=cfg.jobs.finished_grace_s,
        max_finished_in_metrics=cfg.jobs.max_finished_in_metrics,
        idle_policy=cfg.jobs.idle_policy,
        remainder_policy=cfg.node.remainder,
        retention_days=cfg.daemon.retention_days,
        footprint=footprint,
    )
    running = ledger.running_jobs()
    if running:
        reader = LedgerReader(store_path(cfg), pue=cfg.accounting.pue)
        try:
            co2e = {j["id"]: j["co2e_g"] for j in reader.jobs(state="running", limit=1_000_000, now=0.0)}
        finally:
            reader.close()
        engine.restore(running, co2e)
        log.info("continuing %d job(s) that were running at the last stop", len(running))
    for opened in gpus:
        gpu_counters = getattr(opened.source, "counters", None)  # library calls, junk samples, invisible PIDs, ...
        if callable(gpu_counters):
            engine.counter_feeds.append(gpu_counters)
    if node is not None:
        engine.counter_feeds.append(node.counters)  # BMC reads, errors, stale readings, counter resets
    return engine


async def serve(cfg: Config, daemon: Daemon, stop: asyncio.Event) -> None:
    engine = daemon.engine
    registry = build_registry(lambda: engine.snapshot)
    add_daemon_collectors(registry)  # wattprint_build_info, process_*
    for sink in daemon.sinks:  # labelled series of the sinks (InfluxDB: dropped lines by reason, ...)
        for collector in sink.collectors():
            registry.register(collector)
    reader = LedgerReader(store_path(cfg), pue=cfg.accounting.pue,
                          price_per_kwh=cfg.accounting.price_per_kwh, currency=cfg.accounting.currency,
                          footprint=engine.book.footprint)
    bound_page_cache(reader.conn)  # the API's reader: 512 KiB of page cache, as the writer (issue 18: RSS)
    max_connections = fitting_max_connections(cfg.http.max_connections)
    if max_connections < cfg.http.max_connections:
        log.warning("[http] max_connections = %d does not fit the open-files limit (%d): at most %d connections "
                    "(raise LimitNOFILE=)", cfg.http.max_connections, resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                    max_connections)
    connections = ConnectionLimiter(max_connections, min(cfg.http.max_connections_per_client, max_connections),
                                    cfg.http.header_timeout_s, engine.health)
    api = Api(lambda: engine.snapshot, reader, lambda: render(registry), host=cfg.daemon.host,
              bucket_s=cfg.daemon.bucket_s, token=cfg.http.token, interval_s=cfg.daemon.interval_s,
              book=daemon.book, pue=cfg.accounting.pue, max_request_bytes=cfg.http.max_request_bytes,
              rate_limit_per_s=cfg.http.rate_limit_per_s, limiter=connections,
              max_labels_per_user=cfg.jobs.max_labels_per_user, secrets=tuple(cfg.secrets()))
    engine.counter_feeds.insert(0, connections.counters)  # first: the sources' and sinks' figures win a clash
    runner = await start_runner(api.app(), connections)
    host, port = parse_listen(cfg.http.listen)
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"[http] listen {cfg.http.listen}: {exc.strerror or exc}") from None
    log.info("HTTP API on http://%s/ (metrics at /metrics)", cfg.http.listen)
    unix_socket: UnixSocket | None = None
    if cfg.http.socket:
        try:
            unix_socket = await UnixSocket.start(runner, cfg.http.socket)
        except StartupError:
            await runner.cleanup()
            raise
        log.info("HTTP API also on the Unix socket %s (each user sees their own jobs)", cfg.http.socket)

    watchdog_s = sdnotify.watchdog_interval_s()
    if watchdog_s is not None and cfg.daemon.interval_s > watchdog_s:
        log.warning("[daemon] interval_s = %g is longer than the systemd watchdog ping period (%g s): "
                    "raise WatchdogSec= or lower interval_s", cfg.daemon.interval_s, watchdog_s)
    engine.sinks.append(lambda _record: sdnotify.watchdog_ping())  # WATCHDOG=1 on every tick

    started: list[Sink] = []
    fetcher: GridFetcher | None = None
    try:
        for sink in daemon.sinks:
            try:
                await sink.start()
            except Exception as exc:
                raise StartupError(f"sink {sink.name}: cannot start: {type(exc).__name__}: {exc}") from None
            started.append(sink)
        if not daemon.book.is_static:
            # imported here: apscheduler (about 2 MiB of RSS) only for a live grid provider (issue 18)
            from .grid.scheduler import GridFetcher

            fetcher = GridFetcher(daemon.provider, lambda points: on_points(daemon, points), engine.health,
                                  interval_s=cfg.grid.fetch_interval_s,
                                  last_actual_end=last_actual_end(daemon.book))
            fetcher.start()
        # READY=1 once the listener is up and the first tick has been published.
        await engine.run(stop, on_first_tick=lambda: sdnotify.ready(f"API on {cfg.http.listen}"))
    finally:
        if fetcher is not None:
            fetcher.shutdown()
        await stop_sinks(started)
        await runner.cleanup()
        if unix_socket is not None:
            unix_socket.remove()
        reader.close()


async def stop_sinks(sinks: list[Sink]) -> None:
    """Stop ``sinks`` in reverse start order; one that fails is logged and the rest still stop."""
    for sink in reversed(sinks):
        try:
            await sink.stop()
        except Exception as exc:
            log.error("sink %s: stop failed: %s: %s", sink.name, type(exc).__name__, exc)


def last_actual_end(book: IntensityBook) -> datetime | None:
    ends = [p.end for p in book.points() if p.kind == "actual"]
    return max(ends) if ends else None


async def on_points(daemon: Daemon, points: list[IntensityPoint]) -> None:
    """New grid data: keep it, then settle provisional buckets (on the tick thread)."""
    engine = daemon.engine

    def store_and_settle() -> None:
        now = time.time()
        engine.ledger.store_points(points, now)
        daemon.book.update(points, now)
        engine.settle_blocking()
        feed_all([sink.on_grid for sink in daemon.sinks], points, engine.health)

    await engine.run_blocking(store_and_settle)


def run(cfg: Config) -> int:
    """Run the daemon in the foreground; return the process exit code."""
    logging.basicConfig(
        level=getattr(logging, cfg.daemon.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    redacting = RedactingFilter(tuple(cfg.secrets()))
    for handler in logging.getLogger().handlers:
        handler.addFilter(redacting)
    before, soft, hard = raise_nofile_limit()
    if soft != before:
        log.info("open-files limit raised from %d to %d (the hard limit)", before, soft)
    warning = cfg.listen_warning()
    if warning:
        log.warning("%s", warning)
    health = HealthBoard()
    try:
        daemon = build_daemon(cfg, health)
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return exc.exit_code
    engine = daemon.engine

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        def request_stop() -> None:
            sdnotify.stopping()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, request_stop)
        try:
            await serve(cfg, daemon, stop)
        except StartupError as exc:
            log.error("cannot start: %s", exc)
            return exc.exit_code
        return 0

    log.info("wattprint starting on %s (config: %s)", cfg.daemon.host or socket.gethostname(),
             cfg.source_path or "embedded defaults")
    try:
        return asyncio.run(main())
    finally:
        engine.close()
        log.info("wattprint stopped")
