"""In-process cost of a job start, stage by stage (issue 18: "one short job per second"
costs 0.50-0.80 ms of daemon CPU per job start in the whole-process runs, too coarse to
see where it goes).

The daemon's own engine (``app.build_engine`` on the ``idle`` box of harness.py: 8
simulated GPUs, 2 RAPL packages, the store in a temp dir), ticked from this thread every
``--period`` seconds of real time, in a PID namespace of its own (as root). Every tick
is one of four, in turn: a job starts (``sh`` + 2 ``sleep`` workers with
``WATTPRINT_JOB`` set, the same as compare.py's ``shortjob-per-s``; the tick waits until
both workers exist), a quiet tick, the oldest job is killed (its process group), a quiet
tick. About ``--live`` jobs are alive at any time. The thread CPU time of each stage of
``Engine.tick_blocking`` that runs on the tick thread is recorded per tick (the
tracker's ``observe``, attribution, the book, the store's write, the snapshot; the
source reads run on their own threads and do not change with jobs). A job start costs
its own tick and the next (its processes, under a second old, are read again there,
and the store writes its first row): ``job_start_ms`` = median start tick + median
next tick - 2 x median quiet tick, per stage; ``job_end_ms`` = end tick - quiet tick.

    .venv/bin/python benchmarks/job_start.py [--ticks 400] [--period 0.2] [--live 4]
        [--code TREE] [--profile OUT.pstats]

``--code TREE``: import wattprint from TREE (a ``harness.baseline_tree``); run it twice
(before / after) for an A/B. ``--profile``: also cProfile the start ticks only.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


STAGES = ("observe", "attribute", "book", "store", "snapshot")


def reap_orphans(expect: int) -> None:
    """Reap the ``expect`` killed workers: in the namespace this process is PID 1, their
    reaper (outside one, init reaps them)."""
    if os.getpid() != 1:
        return
    deadline = time.monotonic() + 1.0
    while expect > 0 and time.monotonic() < deadline:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid:
            expect -= 1
        else:
            time.sleep(0.002)


def run(ticks: int, period: float, live: int, profile: str | None) -> dict[str, object]:
    from harness import Box
    from wattprint.daemon.app import build_engine
    from wattprint.daemon.config import load_config
    from wattprint.daemon.health import HealthBoard

    box = Box("job-start")
    engine = None
    try:
        cfg = load_config(str(box.config), env={})
        engine = build_engine(cfg, HealthBoard())
        spent = dict.fromkeys(STAGES, 0.0)

        def timed(name: str, fn):  # type: ignore[no-untyped-def]
            def wrapper(*a, **k):  # type: ignore[no-untyped-def]
                t0 = time.thread_time()
                try:
                    return fn(*a, **k)
                finally:
                    spent[name] += time.thread_time() - t0
            return wrapper

        engine.tracker.observe = timed("observe", engine.tracker.observe)  # type: ignore[method-assign]
        engine._attribute = timed("attribute", engine._attribute)  # type: ignore[method-assign]
        engine.book.book_tick = timed("book", engine.book.book_tick)  # type: ignore[method-assign]
        engine.store.write = timed("store", engine.store.write)  # type: ignore[method-assign]
        engine.book.snapshot = timed("snapshot", engine.book.snapshot)  # type: ignore[method-assign]
        prof = cProfile.Profile() if profile else None
        rows: dict[str, list[dict[str, float]]] = {"start": [], "next": [], "quiet": [], "end": []}
        jobs: list = []
        n_jobs = 0
        for k in range(ticks):
            phase = k % 4
            if phase == 0:
                n_jobs += 1
                p = box.spawn_job(f"bench-{n_jobs % 8}", workers=2, seconds=3600)  # under the label cap
                box.children(p.pid, 2)
                jobs.append(p)
            elif phase == 2 and len(jobs) > live:
                p = jobs.pop(0)
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                reap_orphans(2)
            for s in STAGES:
                spent[s] = 0.0
            t0 = time.thread_time()
            if prof is not None and phase == 0:
                prof.enable()
            engine.tick_blocking(time.monotonic(), time.time())
            if prof is not None and phase == 0:
                prof.disable()
            total = time.thread_time() - t0
            if k >= 8:  # warm-up: the first full read, the first jobs
                kind = ("start", "next", "end", "quiet")[phase]
                rows[kind].append({**spent, "total": total})
            time.sleep(period)
        if prof is not None and profile:
            prof.dump_stats(profile)

        def med(kind: str, key: str) -> float:
            return statistics.median(r[key] for r in rows[kind]) * 1e3

        out: dict[str, object] = {"ticks": {k: len(v) for k, v in rows.items()}}
        for key in (*STAGES, "total"):
            q = med("quiet", key)
            out[key] = {"quiet_ms": round(q, 4), "start_ms": round(med("start", key), 4),
                        "next_ms": round(med("next", key), 4), "end_ms": round(med("end", key), 4),
                        "job_start_ms": round(med("start", key) + med("next", key) - 2 * q, 4),
                        "job_end_ms": round(med("end", key) - q, 4)}
        return out
    finally:
        if engine is not None:
            engine.close()
        box.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ticks", type=int, default=400)
    ap.add_argument("--period", type=float, default=0.2)
    ap.add_argument("--live", type=int, default=4)
    ap.add_argument("--code", help="import wattprint from this tree (harness.baseline_tree)")
    ap.add_argument("--profile", help="cProfile the start ticks into this file")
    ap.add_argument("--no-isolate", action="store_true", help="run in the host PID namespace")
    args = ap.parse_args()
    if not args.no_isolate and os.geteuid() == 0:
        os.execvp("unshare", ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable,
                              str(Path(__file__).resolve()), *sys.argv[1:], "--no-isolate"])
    if args.code:
        sys.path.insert(0, args.code)
    print(json.dumps(run(args.ticks, args.period, args.live, args.profile), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
