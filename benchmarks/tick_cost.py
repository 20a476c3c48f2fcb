"""Benchmark: the daemon's CPU cost per tick on a busy box (issue 3), now a thin
front to the shared harness (benchmarks/harness.py); ``overhead.py procs`` is the
same scenario with the defaults below.

Scenario: ``--idle`` idle processes plus ``--jobs`` labelled jobs of 3 processes,
8 simulated GPUs with 4 job leaders each, 2 RAPL packages with dram zones. The real
``wattprint run`` process runs at 1 Hz for ``--seconds``; prints its CPU per second
of wall time, RSS, tick-duration percentiles (every tick), the floor in the same
window (benchmarks/floor.py) and the ratio, and the per-stage split of a tick.

Note: since the harness, the floor also performs the GPU reads (through the same
simulated NVML), which the first version of this script's floor did not.

As root it runs in a PID namespace of its own (see overhead.run_isolated), so that
other processes on the machine stay out of the scenario; --no-isolate runs it in
the host's. For the comparison with CodeCarbon use ``overhead.py procs``.

Usage: python benchmarks/tick_cost.py [--idle 2000] [--jobs 32] [--seconds 60] [--no-isolate]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Box, measure  # noqa: E402
from overhead import can_isolate, setup_procs  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--idle", type=int, default=2000)
    ap.add_argument("--jobs", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--no-isolate", action="store_true", help="run in the host PID namespace")
    args = ap.parse_args()
    if not args.no_isolate and can_isolate():
        os.execvp("unshare", ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable,
                              str(Path(__file__).resolve()), *sys.argv[1:], "--no-isolate"])
    box = Box("tick-cost")
    try:
        setup_procs(box, args.idle, args.jobs)
        res = measure(box, args.seconds, peer=False)
    finally:
        box.close()
    res["scenario"] = (f"{args.idle} idle processes + {args.jobs} jobs x 3 processes, "
                       "8 sim GPUs x 4 processes, 2 RAPL packages")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
