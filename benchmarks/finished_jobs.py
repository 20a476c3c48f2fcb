"""In-process cost of the finished jobs that stay in the snapshot and /metrics (issue 18:
with one short job a second, ``[jobs] max_finished_in_metrics`` (200) finished jobs are
in every tick's snapshot once the daemon has run 200 s, and in every /metrics render).

A ``JobBook`` on a real store (temp dir) holding ``--running`` running and
``--finished`` finished jobs (each with energy, CO2e and occupancy on a GPU, the CPU,
DRAM and the platform), ticked ``--ticks`` times: per tick ``JobBook.snapshot`` (as the
engine calls it) and one /metrics render of that snapshot (``exporters.prometheus``,
the daemon's registry); CPU time (``process_time``) per tick of each, median over
``--rounds``. Before and after: run it with ``--code TREE`` (a ``harness.baseline_tree``)
and without (the working tree), alternating.

    .venv/bin/python benchmarks/finished_jobs.py --baseline HEAD [--after-files a,b] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(running: int, finished: int, ticks: int) -> dict[str, float]:
    import logging

    logging.disable(logging.WARNING)  # the footprint's "no entry for this GPU model" line
    from wattprint.daemon.engine.book import JobBook, _JobState
    from wattprint.daemon.ledger import Ledger
    from wattprint.daemon.model import COMPONENTS, Intensity, JobIdentity
    from wattprint.exporters.prometheus import build_registry, render

    work = tempfile.mkdtemp(prefix="wattprint-finished-jobs-")
    try:
        led = Ledger(os.path.join(work, "s.sqlite3"), host="bench", bucket_s=60)
        book = JobBook(led, 1.0, 300.0, 200)
        t0 = 1.7e9
        for j in range(running + finished):
            ident = JobIdentity(job_id=f"{1000 + j}-170000000000", label=f"bench-{j % 8}", label_source="WATTPRINT_JOB",
                                uid=1000, user="alice", command="sh", root_pid=1000 + j, started_at=t0)
            st = book.jobs[ident.job_id] = _JobState(ident, {c: 100.0 + j for c in COMPONENTS}, 0.5 + j / 100)
            st.occupancy = {"gpu:NVIDIA H100 80GB HBM3": 5.0, "cpu": 5.0, "dram": 80.0, "platform": 5.0}
            if j >= running:
                st.running, st.ended_at = False, t0 + j
        intensity = Intensity(400.0, "final", "static", "DK1", "static")
        current = {}
        registry = build_registry(lambda: current["snap"])
        snap_s = render_s = 0.0
        for k in range(ticks):
            for st in book.jobs.values():  # the running jobs' figures move every tick
                if st.running:
                    st.energy_j["gpu"] += 1.0
                    st.co2e_g += 0.01
            c0 = time.process_time()
            current["snap"] = book.snapshot(t0 + 250 + k * 0.001, intensity, time.perf_counter(), 0.0,
                                            health=(), counters={}, counter_glitches={})
            c1 = time.process_time()
            render(registry)
            c2 = time.process_time()
            if k >= 5:
                snap_s += c1 - c0
                render_s += c2 - c1
        led.close()
        n = ticks - 5
        return {"snapshot_ms": 1e3 * snap_s / n, "render_ms": 1e3 * render_s / n,
                "jobs": len(current["snap"].jobs)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", help="git ref measured as 'before'")
    ap.add_argument("--after-files", default="", help="'after' = baseline + these working-tree files "
                                                      "(default: the working tree)")
    ap.add_argument("--running", type=int, default=5)
    ap.add_argument("--finished", type=int, default=200)
    ap.add_argument("--ticks", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.running, args.finished, args.ticks)))
        return 0
    sys.path.insert(0, str(HERE))
    from harness import before_after_trees

    trees = before_after_trees(args.baseline, args.after_files)
    res: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
    try:
        for r in range(args.rounds):
            for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
                env = dict(os.environ)
                if trees[name] is not None:
                    env["PYTHONPATH"] = str(trees[name])
                out = subprocess.run([sys.executable, __file__, "--worker", "--running", str(args.running),
                                      "--finished", str(args.finished), "--ticks", str(args.ticks)],
                                     env=env, capture_output=True, text=True, check=True)
                res[name].append(json.loads(out.stdout))
    finally:
        for tree in trees.values():
            if tree is not None:
                shutil.rmtree(tree, ignore_errors=True)
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[0]
    print(f"{args.running} running + {args.finished} finished jobs, {args.ticks} ticks, {args.rounds} rounds, "
          f"load {load}; CPU ms per tick, median [min-max]")
    for name, rows in res.items():
        cols = []
        for key in ("snapshot_ms", "render_ms"):
            vals = [row[key] for row in rows]
            cols.append(f"{key} {statistics.median(vals):.3f} [{min(vals):.3f}-{max(vals):.3f}]")
        print(f"{name:7s} " + "  ".join(cols) + f"  (jobs in the snapshot: {rows[0]['jobs']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
