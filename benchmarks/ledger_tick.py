"""In-process cost of the store's tick write (issue 18: ledger batching): ``Ledger.record_tick``
with 32 running jobs (gpu, cpu and dram energy each, sources as the daemon books them),
8 GPU + 2 package + 2 dram device rows and unattributed energy, on a real SQLite file
in a temp directory, ``[daemon] bucket_s`` 60 (so the bucket rows are upserts most ticks,
as in the daemon).

Before and after in one run: each ``--code`` is a tree laid out as the ``wattprint``
package (``harness.baseline_tree``; ``-`` = the working tree), measured in its own
subprocess, alternating, ``--rounds`` times; the figure is CPU time (``process_time``)
per tick, median over rounds.

    .venv/bin/python benchmarks/ledger_tick.py --baseline 8947193 [--after-files daemon/ledger/writer.py]
        [--jobs 32] [--ticks 600] [--rounds 5]
    .venv/bin/python benchmarks/ledger_tick.py --grow 1800 [--cache-kib 2000]

``--grow N``: instead, N ticks in this process (the working tree's code), printing the
process's RSS, the store's size and SQLite's page-cache limit as it goes: how much of a
long run's RSS growth the writer's page cache is (SQLite's default ``cache_size`` is
2,000 KiB per connection, filled as the store grows, then bounded).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        return [int(line.split()[1]) for line in fh if line.startswith("VmRSS:")][0] / 1024


def grow(jobs: int, ticks: int, cache_kib: int) -> None:
    """RSS of this process while the writer books ``ticks`` ticks of ``jobs`` jobs."""
    from wattprint.daemon.ledger import Intensity, JobTick, Ledger
    from wattprint.daemon.procs import JobIdentity

    work = tempfile.mkdtemp(prefix="wattprint-ledger-grow-")
    try:
        path = os.path.join(work, "s.sqlite3")
        led = Ledger(path, host="bench", bucket_s=60)
        if cache_kib:
            led.conn.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
        static = Intensity(400.0, "final", "static", "DK1", "static")
        idents = [JobIdentity(job_id=f"{1000 + j}-123456", label=f"bench-{j}", label_source="WATTPRINT_JOB",
                              uid=1000, user="alice", command="python", root_pid=1000 + j, started_at=1.7e9)
                  for j in range(jobs)]
        sources = {"gpu": "counter", "cpu": "counter", "dram": "counter"}
        devices = [("gpu", f"gpu{g}", 300.0, "counter") for g in range(8)]
        wall = 1.7e9
        print(json.dumps({"tick": 0, "rss_mib": round(rss_mib(), 2)}))
        for k in range(1, ticks + 1):
            led.record_tick(wall + k, [JobTick(i, {"gpu": 60.0, "cpu": 5.0, "dram": 0.5}, gpu_seconds=1.0,
                                               gpu_memory_bytes=1 << 30, sources=sources) for i in idents],
                            devices, {"gpu": 100.0}, static)
            if k % max(1, ticks // 10) == 0:
                print(json.dumps({"tick": k, "rss_mib": round(rss_mib(), 2),
                                  "store_mib": round(os.path.getsize(path) / 2**20, 2),
                                  "cache_size": led.conn.execute("PRAGMA cache_size").fetchone()[0]}))
        led.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def worker(jobs: int, ticks: int) -> dict[str, float]:
    from wattprint.daemon.ledger import Intensity, JobTick, Ledger
    from wattprint.daemon.procs import JobIdentity

    work = tempfile.mkdtemp(prefix="wattprint-ledger-tick-")
    try:
        led = Ledger(os.path.join(work, "s.sqlite3"), host="bench", bucket_s=60)
        static = Intensity(400.0, "final", "static", "DK1", "static")
        idents = [JobIdentity(job_id=f"{1000 + j}-123456", label=f"bench-{j}", label_source="WATTPRINT_JOB",
                              uid=1000, user="alice", command="python", root_pid=1000 + j, started_at=1.7e9)
                  for j in range(jobs)]
        sources = {"gpu": "counter", "cpu": "counter", "dram": "counter"}
        devices = ([("gpu", f"gpu{g}", 300.0, "counter") for g in range(8)]
                   + [("cpu", f"package-{p}", 120.0, "counter") for p in range(2)]
                   + [("dram", f"package-{p}-dram", 15.0, "counter") for p in range(2)])
        unatt = {"gpu": 100.0, "cpu": 50.0, "dram": 5.0}

        def one(wall: float) -> None:
            led.record_tick(wall, [JobTick(i, {"gpu": 60.0 + k, "cpu": 5.0, "dram": 0.5}, gpu_seconds=1.0,
                                           gpu_memory_bytes=1 << 30, sources=sources)
                                   for k, i in enumerate(idents)], devices, unatt, static)

        wall = 1.7e9 + 1.0
        for _ in range(30):
            one(wall)
            wall += 1.0
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(ticks):
            one(wall)
            wall += 1.0
        c1, t1 = time.process_time(), time.perf_counter()
        led.close()
        return {"cpu_us_per_tick": 1e6 * (c1 - c0) / ticks, "wall_us_per_tick": 1e6 * (t1 - t0) / ticks}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", help="git ref measured as 'before'")
    ap.add_argument("--after-files", default="", help="'after' = baseline + these working-tree files "
                                                      "(default: the working tree)")
    ap.add_argument("--jobs", type=int, default=32)
    ap.add_argument("--ticks", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--grow", type=int, default=0, metavar="N")
    ap.add_argument("--cache-kib", type=int, default=0, help="with --grow: PRAGMA cache_size=-KIB (0: default)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.grow:
        grow(args.jobs, args.grow, args.cache_kib)
        return 0
    if args.worker:
        print(json.dumps(worker(args.jobs, args.ticks)))
        return 0
    from harness import before_after_trees

    trees = before_after_trees(args.baseline, args.after_files)
    results: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
    try:
        for _ in range(args.rounds):
            for name, tree in trees.items():
                env = dict(os.environ)
                if tree is not None:
                    env["PYTHONPATH"] = str(tree)
                out = subprocess.run([sys.executable, __file__, "--worker", "--jobs", str(args.jobs),
                                      "--ticks", str(args.ticks)], env=env, capture_output=True, text=True,
                                     check=True, cwd=tempfile.gettempdir()).stdout
                results[name].append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for tree in trees.values():
            if tree is not None:
                shutil.rmtree(tree, ignore_errors=True)
    summary = {name: {k: round(statistics.median(r[k] for r in rs), 1) for k in rs[0]} | {
        "cpu_us_per_tick_all_rounds": [round(r["cpu_us_per_tick"], 1) for r in rs]}
        for name, rs in results.items()}
    summary["load1"] = os.getloadavg()[0]
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
