"""What bounding SQLite's page cache costs (issue 18: the daemon's slow RSS growth is the
page cache of its two connections filling as the store grows, SQLite's default being
2,000 KiB each).

Builds a store once (``--jobs`` running jobs booked for ``--ticks`` 1 s ticks, as
``ledger_tick.py`` books them, ``[daemon] bucket_s`` 60), then for each ``--cache-kib``
value (0 = SQLite's default), alternating, ``--rounds`` times, in a fresh subprocess on
a fresh copy of that store (the working tree's code):

- the writer: ``PRAGMA cache_size=-KIB`` on ``Ledger.conn``, 600 more ticks booked;
  CPU per tick (``process_time``);
- the API's reader (``LedgerReader`` = ``JobViews``): ``PRAGMA cache_size=-KIB``, then
  what the API serves: ``jobs()`` (100 newest, as ``/api/v1/jobs``), ``job_series`` of
  one job, ``host_totals()`` (``/api/v1/host``), each repeated; CPU per call;
- ``VmRSS`` after all of it (both connections' caches as full as this work fills them).

    .venv/bin/python benchmarks/sqlite_cache.py [--ticks 43200] [--jobs 32] [--cache-kib 0,512,256] [--rounds 3]
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

PY = sys.executable


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        return [int(line.split()[1]) for line in fh if line.startswith("VmRSS:")][0] / 1024


def _book(led, idents, wall: float, ticks: int) -> float:  # type: ignore[no-untyped-def]
    from wattprint.daemon.ledger import Intensity, JobTick

    static = Intensity(400.0, "final", "static", "DK1", "static")
    sources = {"gpu": "counter", "cpu": "counter", "dram": "counter"}
    devices = ([("gpu", f"gpu{g}", 300.0, "counter") for g in range(8)]
               + [("cpu", f"package-{p}", 120.0, "counter") for p in range(2)]
               + [("dram", f"package-{p}-dram", 15.0, "counter") for p in range(2)])
    unatt = {"gpu": 100.0, "cpu": 50.0, "dram": 5.0}
    for _ in range(ticks):
        wall += 1.0
        led.record_tick(wall, [JobTick(i, {"gpu": 60.0, "cpu": 5.0, "dram": 0.5}, gpu_seconds=1.0,
                                       gpu_memory_bytes=1 << 30, sources=sources) for i in idents],
                        devices, unatt, static)
    return wall


def _idents(jobs: int):  # type: ignore[no-untyped-def]
    from wattprint.daemon.procs import JobIdentity

    return [JobIdentity(job_id=f"{1000 + j}-123456", label=f"bench-{j}", label_source="WATTPRINT_JOB",
                        uid=1000, user="alice", command="python", root_pid=1000 + j, started_at=1.7e9)
            for j in range(jobs)]


def build(path: str, jobs: int, ticks: int) -> None:
    from wattprint.daemon.ledger import Ledger

    led = Ledger(path, host="bench", bucket_s=60)
    _book(led, _idents(jobs), 1.7e9, ticks)
    led.close()


def worker(path: str, jobs: int, ticks: int, cache_kib: int) -> dict[str, float]:
    from wattprint.daemon.ledger import Ledger, LedgerReader

    led = Ledger(path, host="bench", bucket_s=60)
    if cache_kib:
        led.conn.execute(f"PRAGMA cache_size=-{cache_kib}")
    idents = _idents(jobs)
    wall = 1.7e9 + ticks
    wall = _book(led, idents, wall, 30)
    c0 = time.process_time()
    wall = _book(led, idents, wall, 600)
    tick_us = 1e6 * (time.process_time() - c0) / 600
    reader = LedgerReader(path)
    if cache_kib:
        reader.conn.execute(f"PRAGMA cache_size=-{cache_kib}")
    out = {"tick_us": tick_us}
    for name, fn, n in (("jobs_ms", lambda: reader.jobs(now=wall, limit=100), 30),
                        ("series_ms", lambda: reader.job_series(idents[0].job_id), 10),
                        ("host_ms", reader.host_totals, 10)):
        fn()
        c0 = time.process_time()
        for _ in range(n):
            fn()
        out[name] = 1e3 * (time.process_time() - c0) / n
    out["rss_mib"] = _rss_mib()
    out["cache_writer"] = led.conn.execute("PRAGMA cache_size").fetchone()[0]
    reader.close()
    led.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ticks", type=int, default=43200)
    ap.add_argument("--jobs", type=int, default=32)
    ap.add_argument("--cache-kib", default="0,512,256")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.jobs, args.ticks, int(args.worker[1]))))
        return 0
    work = tempfile.mkdtemp(prefix="wattprint-sqlite-cache-")
    try:
        base = os.path.join(work, "base.sqlite3")
        t0 = time.perf_counter()
        build(base, args.jobs, args.ticks)
        print(f"store: {args.ticks} ticks x {args.jobs} jobs, {os.path.getsize(base) / 2**20:.1f} MiB, "
              f"built in {time.perf_counter() - t0:.0f} s", flush=True)
        kibs = [int(k) for k in args.cache_kib.split(",")]
        res: dict[int, list[dict[str, float]]] = {k: [] for k in kibs}
        for r in range(args.rounds):
            for k in (kibs if r % 2 == 0 else kibs[::-1]):
                path = os.path.join(work, f"r{r}-{k}.sqlite3")
                shutil.copyfile(base, path)
                out = subprocess.run([PY, __file__, "--worker", path, str(k), "--ticks", str(args.ticks),
                                      "--jobs", str(args.jobs)], capture_output=True, text=True, check=True)
                res[k].append(json.loads(out.stdout))
                os.unlink(path)
                for ext in ("-wal", "-shm", ".lock"):
                    if os.path.exists(path + ext):
                        os.unlink(path + ext)
        print(f"{'cache_kib':>9} {'tick_us':>8} {'jobs_ms':>8} {'series_ms':>9} {'host_ms':>8} {'rss_mib':>8}  (median; range)")
        for k in kibs:
            cols = []
            for key in ("tick_us", "jobs_ms", "series_ms", "host_ms", "rss_mib"):
                vals = [x[key] for x in res[k]]
                cols.append(f"{statistics.median(vals):.3f} [{min(vals):.3f}-{max(vals):.3f}]")
            print(f"{k or 'default':>9} " + "  ".join(cols))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
