"""The cost of one tick, split by stage, measured in-process on the real Engine.

Builds the engine exactly as ``wattprint run`` does (``build_engine`` from the same
config; only ``state_dir`` is moved so it does not share the daemon's store), ticks
it at ``--interval`` on the real clocks for ``--seconds``, and times each stage of
every tick in CPU time (``time.thread_time`` of the thread each stage runs on; the
whole tick in process CPU time, which covers the source threads it waits for):

- sources:      each source's ``read`` (NVML or the simulated NVML, RAPL, estimates)
- processes:    ``ProcessTracker.observe`` (/proc discovery, job processes, grouping)
- attribution:  ``attribute`` (splitting device joules over jobs)
- store:        ``Ledger.record_ticks`` (one SQLite transaction per tick)
- engine:       the rest of ``tick_blocking`` (handing reads to the source threads
                and waiting for them, job lifecycle, totals, the snapshot, retention)

It also renders ``/metrics`` from the snapshot every ``--scrape-every`` ticks (the
work one Prometheus scrape costs the daemon, without the HTTP part) and reports
its CPU per render.

The wrappers are installed on the instance / module from outside; the daemon code
is not changed. Run it alone on a scenario's config, or let the harness run it
beside the daemon during the measurement window (it uses the same sim file, RAPL
tree and processes).

Usage: python benchmarks/stage_split.py --config CONFIG --seconds S --out FILE.json
       [--state-dir DIR] [--cprofile N]   (N: print the top N functions by own time)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from typing import Any, Callable

STAGES = ("sources", "processes", "attribution", "store", "engine")


class _Timed:
    """Wraps callables so that their CPU time (``time.thread_time`` of whichever
    thread calls them: the tick thread, or a source's own thread) adds up per key."""

    def __init__(self) -> None:
        self.totals = {k: 0.0 for k in STAGES}
        self._lock = threading.Lock()

    def wrap(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            c0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.thread_time() - c0
                with self._lock:
                    self.totals[key] += dt
        return wrapper

    def reset(self) -> None:
        with self._lock:
            for k in self.totals:
                self.totals[k] = 0.0


def instrument(engine: Any, timed: _Timed) -> None:
    """Install the stage timers on a built engine (and the engine module's
    ``attribute``). Works whether sources are read on the tick thread or on
    threads of their own: each source's ``read`` is timed where it runs."""
    from wattprint.daemon.engine import tick as engine_mod  # the tick calls attribute()

    for src in engine.sources:
        src.read = timed.wrap("sources", src.read)
    engine.tracker.observe = timed.wrap("processes", engine.tracker.observe)
    store = "record_ticks" if hasattr(engine.ledger, "record_ticks") else "record_tick"
    setattr(engine.ledger, store, timed.wrap("store", getattr(engine.ledger, store)))
    engine_mod.attribute = timed.wrap("attribution", engine_mod.attribute)


def run(config: str, seconds: float, interval: float = 1.0, state_dir: str | None = None,
        scrape_every: int = 5, cprofile: int = 0) -> dict[str, Any]:
    from wattprint.daemon.app import build_engine
    from wattprint.daemon.config import load_config
    from wattprint.daemon.health import HealthBoard
    from wattprint.exporters.prometheus import build_registry, render

    state_dir = state_dir or tempfile.mkdtemp(prefix="wattprint-split-")
    env = {k: v for k, v in os.environ.items() if k.startswith("WATTPRINT_")}
    env["WATTPRINT_DAEMON_STATE_DIR"] = state_dir
    cfg = load_config(config, env=env)
    engine = build_engine(cfg, HealthBoard())
    registry = build_registry(lambda: engine.snapshot)
    timed = _Timed()
    instrument(engine, timed)

    profiler = None
    if cprofile:
        import cProfile

        profiler = cProfile.Profile()

    engine.tick_blocking(time.monotonic(), time.time())  # baselines and the first full scan
    timed.reset()
    whole = 0.0
    scrape_s = 0.0
    scrapes = 0
    ticks = 0
    per_tick: list[float] = []
    t0 = time.monotonic()
    deadline = t0 + seconds
    while True:
        due = t0 + (ticks + 1) * interval
        if due > deadline:
            break
        time.sleep(max(0.0, due - time.monotonic()))
        if profiler is not None:
            profiler.enable()
        # Process CPU: the tick thread and the source threads it waits for (nothing
        # else runs in this process during a tick).
        c0 = time.process_time()
        engine.tick_blocking(time.monotonic(), time.time())
        dt = time.process_time() - c0
        if profiler is not None:
            profiler.disable()
        whole += dt
        per_tick.append(dt)
        ticks += 1
        if scrape_every and ticks % scrape_every == 0:
            c0 = time.process_time()
            render(registry)
            scrape_s += time.process_time() - c0
            scrapes += 1
    engine.close()

    if ticks == 0:
        raise RuntimeError("no ticks measured: --seconds shorter than --interval")
    out: dict[str, float] = {k: 1e3 * timed.totals[k] / ticks for k in STAGES if k != "engine"}
    out["engine"] = max(0.0, 1e3 * whole / ticks - sum(out.values()))
    out["whole tick"] = 1e3 * whole / ticks
    result: dict[str, Any] = {
        "ticks": ticks,
        "cpu_ms_per_tick": {k: round(v, 3) for k, v in out.items()},
        "cpu_ms_per_tick_p50": round(1e3 * sorted(per_tick)[len(per_tick) // 2], 3),
        "cpu_ms_per_tick_max": round(1e3 * max(per_tick), 3),
        "metrics_render_cpu_ms": round(1e3 * scrape_s / scrapes, 3) if scrapes else None,
    }
    if profiler is not None:
        import io
        import pstats

        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(cprofile)
        result["cprofile_tottime"] = buf.getvalue()
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--state-dir")
    ap.add_argument("--scrape-every", type=int, default=5)
    ap.add_argument("--cprofile", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    result = run(args.config, args.seconds, args.interval, args.state_dir, args.scrape_every, args.cprofile)
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    else:
        print(text if not args.cprofile else result.pop("cprofile_tottime") + "\n" + json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
