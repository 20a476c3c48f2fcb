"""Assemble the daemon from its config and run it until SIGTERM/SIGINT.

Builds the sources, the process tracker, the ledger, the engine, the exporters and the
HTTP server; everything that opens files or devices happens here, before the event
loop starts, so a bad state directory or a corrupt store fails at start with a clear
message instead of on the first tick.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

from aiohttp import web

from wattprint.exporters.prometheus import build_registry, render
from .api import Api
from .carbon import IntensityBook
from .config import Config, parse_listen
from .engine import Engine
from .health import HealthBoard
from .ledger import Ledger, LedgerError, LedgerReader
from .procs import ProcessTracker
from .sources.base import Source
from .sources.cpu import open_cpu_sources
from .sources.gpu import open_gpu_source

log = logging.getLogger("wattprint")


class StartupError(Exception):
    """The daemon cannot start; the message says what to fix."""


def store_path(cfg: Config) -> str:
    return os.path.join(cfg.daemon.state_dir, "wattprint.sqlite3")


def build_engine(cfg: Config, health: HealthBoard) -> Engine:
    try:
        os.makedirs(cfg.daemon.state_dir, mode=0o750, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"state_dir {cfg.daemon.state_dir}: cannot create: {exc.strerror}") from None
    sources: list[Source] = []
    gpu, message = open_gpu_source(cfg.gpu)
    log.info("%s", message)
    if gpu is not None:
        sources.append(gpu)
    else:
        health.disable("gpu", message)
    sources.extend(open_cpu_sources(cfg.cpu, cfg.memory, health))
    try:
        ledger = Ledger(store_path(cfg), host=cfg.daemon.host, bucket_s=cfg.daemon.bucket_s)
    except LedgerError as exc:
        raise StartupError(str(exc)) from None
    engine = Engine(
        sources=sources,
        tracker=ProcessTracker(
            label_env=cfg.jobs.label_env,
            rescan_interval_s=cfg.jobs.rescan_interval_s,
            cgroup_kinds=cfg.jobs.cgroup_kinds,
            cgroup_root=cfg.jobs.cgroup_root,
            max_labels_per_user=cfg.jobs.max_labels_per_user,
        ),
        ledger=ledger,
        intensity=IntensityBook(cfg.grid),
        health=health,
        interval_s=cfg.daemon.interval_s,
        pue=cfg.accounting.pue,
        finished_grace_s=cfg.jobs.finished_grace_s,
        idle_policy=cfg.jobs.idle_policy,
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
    return engine


async def serve(cfg: Config, engine: Engine, stop: asyncio.Event) -> None:
    registry = build_registry(lambda: engine.snapshot)
    reader = LedgerReader(store_path(cfg), pue=cfg.accounting.pue,
                          price_per_kwh=cfg.accounting.price_per_kwh, currency=cfg.accounting.currency)
    api = Api(lambda: engine.snapshot, reader, lambda: render(registry), host=cfg.daemon.host,
              bucket_s=cfg.daemon.bucket_s, token=cfg.http.token, interval_s=cfg.daemon.interval_s)
    runner = web.AppRunner(api.app(), access_log=None, handle_signals=False)
    await runner.setup()
    host, port = parse_listen(cfg.http.listen)
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"[http] listen {cfg.http.listen}: {exc.strerror or exc}") from None
    log.info("HTTP API on http://%s/ (metrics at /metrics)", cfg.http.listen)
    try:
        await engine.run(stop)
    finally:
        await runner.cleanup()
        reader.close()


def run(cfg: Config) -> int:
    """Run the daemon in the foreground; return the process exit code."""
    logging.basicConfig(
        level=getattr(logging, cfg.daemon.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    health = HealthBoard()
    try:
        engine = build_engine(cfg, health)
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 1

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await serve(cfg, engine, stop)
        except StartupError as exc:
            log.error("cannot start: %s", exc)
            return 1
        return 0

    log.info("wattprint starting on %s (config: %s)", cfg.daemon.host or socket.gethostname(),
             cfg.source_path or "embedded defaults")
    try:
        return asyncio.run(main())
    finally:
        engine.close()
        log.info("wattprint stopped")
