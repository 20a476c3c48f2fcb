"""Steady RSS and growth of the real daemon over a long run (issue 18: "steady RSS
<= 48 MiB with no growth over a 30-minute run").

The ``procs`` scenario of overhead.py (2,000 idle processes, 32 labelled jobs of 3
processes, 8 simulated GPUs, 2 RAPL packages), the real daemon at 1 Hz with
``/metrics`` scraped every 5 s, in a PID namespace of its own; ``VmRSS``,
``RssAnon``, ``RssFile`` and ``VmHWM`` of the daemon sampled every ``--every``
seconds. The daemon's code is the working tree's, or ``--baseline REF`` (plus
``--after-files``, as in compare.py).

    .venv/bin/python benchmarks/rss_soak.py --seconds 1800 [--aged] [--baseline 8947193 [--after-files a,b]] --json OUT

The daemon runs as the plain CLI (not through daemon_timed.py, whose per-tick records
grow by about 150 bytes a tick, 0.5 MiB an hour, in the daemon's own process: runs
before this change counted them as the daemon's growth). ``--aged`` runs the
wall-clock work 10x as often (NVML re-init every 30 s, the full /proc re-read every 3 s);
``--seed-store FILE`` starts the daemon on a copy of an existing store (one already
larger than SQLite's page cache bound, 512 KiB per connection).

Growth is reported as the least-squares slope of VmRSS over the run's second half
(MiB per hour) and as last-minus-first of the minute medians after the first 5 min.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead  # noqa: E402
from harness import Box, Daemon, baseline_tree, loadavg, log  # noqa: E402


def status_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(line.split()[1])
    return out


def slope_mib_per_h(samples: list[tuple[float, int]]) -> float | None:
    if len(samples) < 3:
        return None
    xs = [t for t, _ in samples]
    ys = [v / 1024 for _, v in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return round(3600 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den, 3) if den else None


# --aged: the wall-clock work 10x as often (NVML re-init every 30 s, the full /proc re-read every 3 s)
AGED_GPU = "[gpu]\nreinit_interval_s = 30\n"
AGED_JOBS = "[jobs]\nrescan_interval_s = 3.0\n"


def seed_store(box: Box, source: Path) -> None:
    """Start from a copy of an existing store (SQLite's backup API: consistent while the
    source's daemon is still writing it)."""
    import sqlite3

    state = box.work / "state"
    state.mkdir(parents=True, exist_ok=True)
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    dst = sqlite3.connect(state / "wattprint.sqlite3")
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def inner(seconds: float, every: float, code: Path | None, out: Path, aged: bool = False,
          seed: Path | None = None) -> None:
    box = Box("soak")
    daemon: Daemon | None = None
    try:
        overhead.setup_procs(box, life_s=seconds + 900)  # (alive to the end of the run)
        if seed is not None:
            seed_store(box, seed)
        if aged:
            box.config.write_text(box.config.read_text().replace("[gpu]\n", AGED_GPU) + AGED_JOBS)
        daemon = Daemon(box, code=code, timed=False)  # (daemon_timed.py's records would grow)
        daemon.wait_ticks(2)
        t0 = time.monotonic()
        samples: list[dict[str, Any]] = []
        next_scrape = next_sample = t0
        while time.monotonic() - t0 < seconds:
            now = time.monotonic()
            if now >= next_scrape:
                next_scrape += 5.0
                try:
                    daemon.get("/metrics")
                except OSError:
                    pass
            if now >= next_sample:
                next_sample += every
                samples.append({"t_s": round(now - t0, 1), **status_kib(daemon.p.pid), "load1": loadavg()})
                if len(samples) % 30 == 0:
                    Path(str(out) + ".partial").write_text(json.dumps(samples))
            time.sleep(0.2)
        tick = json.loads(daemon.get("/healthz")).get("tick")
        rss = [(s["t_s"], s["VmRSS"]) for s in samples]
        half = [x for x in rss if x[0] >= seconds / 2]
        after5 = [x for x in rss if x[0] >= 300]
        first_min = [v for t, v in after5 if t < 360]
        last_min = [v for t, v in after5 if t >= seconds - 60]
        res = {
            "seconds": seconds, "ticks": tick, "aged": aged, "seeded_from": str(seed) if seed else None,
            "code": str(code) if code else "working tree",
            "rss_start_mib": round(rss[0][1] / 1024, 2),
            "rss_steady_median_second_half_mib": round(statistics.median(v for _, v in half) / 1024, 2),
            "rss_min_max_after_5min_mib": [round(min(v for _, v in after5) / 1024, 2),
                                           round(max(v for _, v in after5) / 1024, 2)] if after5 else None,
            "rss_growth_minute5_to_last_minute_mib": (round((statistics.median(last_min) - statistics.median(first_min))
                                                            / 1024, 2) if first_min and last_min else None),
            "rss_slope_second_half_mib_per_h": slope_mib_per_h(half),
            "hwm_end_mib": round(samples[-1]["VmHWM"] / 1024, 2),
            "anon_file_end_mib": [round(samples[-1]["RssAnon"] / 1024, 2), round(samples[-1]["RssFile"] / 1024, 2)],
            "samples": samples,
        }
        out.write_text(json.dumps(res, indent=1))
    finally:
        if daemon is not None:
            daemon.stop()
        box.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=1800.0)
    ap.add_argument("--every", type=float, default=10.0)
    ap.add_argument("--baseline", metavar="GIT_REF")
    ap.add_argument("--after-files", default="")
    ap.add_argument("--json", required=True)
    ap.add_argument("--aged", action="store_true",
                    help="wall-clock work 10x as often: NVML re-init every 30 s, the full /proc re-read every 3 s")
    ap.add_argument("--seed-store", metavar="SQLITE",
                    help="start from a copy of this store (e.g. another soak's, past the page cache bound)")
    ap.add_argument("--code", help=argparse.SUPPRESS)  # inside the namespace
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.json).resolve()
    if args.inner:
        inner(args.seconds, args.every, Path(args.code) if args.code else None, out, args.aged,
              Path(args.seed_store) if args.seed_store else None)
        return 0
    code = None
    if args.baseline:
        overlay = tuple(f for f in args.after_files.split(",") if f)
        code = baseline_tree(args.baseline, overlay)
    try:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--inner", "--seconds", str(args.seconds),
               "--every", str(args.every), "--json", str(out)] + (["--code", str(code)] if code else []) \
            + (["--aged"] if args.aged else []) \
            + (["--seed-store", str(Path(args.seed_store).resolve())] if args.seed_store else [])
        if os.geteuid() == 0 and shutil.which("unshare"):
            cmd = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"] + cmd
        log(f"soak: {args.seconds:g} s of procs, RSS every {args.every:g} s -> {out}")
        rc = subprocess.call(cmd)
    finally:
        if code is not None:
            shutil.rmtree(code, ignore_errors=True)
    if rc == 0:
        res = json.loads(out.read_text())
        log(json.dumps({k: v for k, v in res.items() if k != "samples"}))
    return rc


if __name__ == "__main__":
    sys.exit(main())
