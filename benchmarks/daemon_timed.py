"""Run the real ``wattprint`` CLI (``wattprint run --config ...``) and record every
tick: its duration (the engine's own ``tick_duration_s``, the figure behind
``wattprint_tick_duration_seconds``) and its CPU time (the tick thread's, plus the
source threads' for the reads it asked for).

The daemon has no per-tick log, and sampling the gauge misses most ticks, so the
benchmarks start the daemon through this wrapper. It changes nothing in the daemon:
it wraps ``Engine.tick_blocking`` (and the engine's per-source read function, when
sources are read on threads of their own) with clock reads and a list append
(microseconds per tick) and writes the records as JSON to ``--ticks-out`` when the
daemon exits (SIGTERM, as systemd stops it).

Usage: python benchmarks/daemon_timed.py --ticks-out FILE run --config CONFIG
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time


def main() -> int:
    argv = sys.argv[1:]
    if len(argv) < 2 or argv[0] != "--ticks-out":
        print(__doc__, file=sys.stderr)
        return 2
    out_path, rest = argv[1], argv[2:]

    from wattprint.daemon import engine as engine_mod
    from wattprint.daemon.cli import main as cli_main
    from wattprint.daemon.engine import reader as reader_mod

    records: list[tuple[float, float, float]] = []  # (wall, duration s, tick CPU s)
    original = engine_mod.Engine.tick_blocking
    # Sources may be read on threads of their own (engine/reader.py's _read_source runs there):
    # their CPU is added to the tick that asked for the read.
    source_cpu = [0.0]
    lock = threading.Lock()
    read_source = getattr(reader_mod, "_read_source", None)
    if read_source is not None:
        def timed_read_source(*args, **kwargs):  # type: ignore[no-untyped-def]
            c0 = time.thread_time()
            try:
                return read_source(*args, **kwargs)
            finally:
                with lock:
                    source_cpu[0] += time.thread_time() - c0

        reader_mod._read_source = timed_read_source

    def tick_blocking(self, now_mono, wall, duration_hint_s=0.0):  # type: ignore[no-untyped-def]
        s0 = source_cpu[0]
        c0 = time.thread_time()
        snap = original(self, now_mono, wall, duration_hint_s)
        cpu = time.thread_time() - c0 + source_cpu[0] - s0
        records.append((wall, snap.tick_duration_s, cpu))
        return snap

    engine_mod.Engine.tick_blocking = tick_blocking  # type: ignore[method-assign]
    try:
        return cli_main(rest)
    finally:
        tmp = out_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"pid": os.getpid(), "ticks": records}, fh)
        os.replace(tmp, out_path)


if __name__ == "__main__":
    sys.exit(main())
