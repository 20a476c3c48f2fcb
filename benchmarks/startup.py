"""Start time and RSS of the daemon, before and after (issue 18: lazy imports of parts
that are off, and where the daemon's memory goes).

For each code tree (``--baseline REF`` = before; after = REF plus ``--after-files``,
as in compare.py; or the working tree), alternating, ``--rounds`` times:

- **imports alone**: a fresh interpreter that imports what ``wattprint run`` imports
  (``wattprint.daemon.cli`` and ``wattprint.daemon.app``) and nothing else: wall time
  of the imports, ``VmRSS`` after them, and which InfluxDB modules got loaded; and the
  bare interpreter's ``VmRSS`` (``python -c pass`` plus reading its status) for scale.
- **the daemon**: the real ``wattprint run`` (the ``idle`` box of harness.py: 8
  simulated GPUs, 2 RAPL packages, InfluxDB off), the time from spawning it to its
  first tick (``/healthz`` polled every 20 ms) and its ``VmRSS`` after 10 ticks; and
  the InfluxDB modules it imported (``-X importtime`` in its log).

    .venv/bin/python benchmarks/startup.py --baseline 8947193 --after-files exporters/sinks.py [--rounds 5]
    .venv/bin/python benchmarks/startup.py --breakdown [--baseline REF [--after-files ...]]

``--breakdown``: instead, where the imports' RSS goes: ``VmRSS`` of a fresh interpreter
after each group of what the daemon imports (cumulative), for each tree.
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

from harness import PY, Box, Daemon, before_after_trees, log, rss_kib  # noqa: E402

IMPORTS = """
import time
t0 = time.perf_counter()
import wattprint.daemon.cli, wattprint.daemon.app
t1 = time.perf_counter()
import json, sys
rss = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')][0]
print(json.dumps({"import_ms": 1e3 * (t1 - t0), "rss_mib": rss / 1024, "modules": len(sys.modules),
                  "influx_modules": sorted(m for m in sys.modules if m.startswith('wattprint.exporters.')
                                           and m.split('.')[-1] in ('influx', 'influx_publish', 'influx_http',
                                           'influx_points', 'spool', 'dead_letter', 'lineprotocol',
                                           'influx_collector', 'influx_health'))}))
"""
BREAKDOWN = """
import importlib
def rss():
    return [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')][0] / 1024
out, prev = [], 0.0
for group in ([], ["asyncio", "json", "logging", "dataclasses", "typing"], ["ssl"], ["aiohttp", "aiohttp.web"],
              ["prometheus_client"], ["sqlite3"], ["tomllib"], ["wattprint.daemon.app", "wattprint.daemon.cli"]):
    for m in group:
        importlib.import_module(m)
    v = rss()
    out.append(f"{'+' + ','.join(group) if group else 'python'} {v:.1f} ({v - prev:+.1f})")
    prev = v
print(" | ".join(out))
"""
BARE = ("rss = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')][0]\n"
        "print(rss / 1024)")


def env_for(tree: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    return env


def imports_once(tree: Path | None) -> dict[str, Any]:
    out = subprocess.run([PY, "-c", IMPORTS], env=env_for(tree), capture_output=True, text=True, check=True,
                         cwd="/tmp").stdout
    return json.loads(out)


def daemon_once(tree: Path | None) -> dict[str, Any]:
    box = Box("startup")
    box.env["PYTHONPROFILEIMPORTTIME"] = "1"
    try:
        t0 = time.monotonic()
        d = Daemon(box, code=tree)
        first = None
        while time.monotonic() - t0 < 60:
            if d.p.poll() is not None:
                raise RuntimeError(d.log_path.read_text()[-2000:])
            try:
                if json.loads(d.get("/healthz")).get("tick", 0) >= 1:
                    first = time.monotonic() - t0
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        d.wait_ticks(10)
        rss = rss_kib(d.p.pid)[0] / 1024
        d.stop()
        text = d.log_path.read_text(errors="replace")
        influx = sorted({line.rsplit("|", 1)[-1].strip() for line in text.splitlines()
                         if line.startswith("import time:") and ("influx" in line or "spool" in line)})
        return {"first_tick_s": first, "rss_after_10_ticks_mib": rss, "influx_imports": influx}
    finally:
        box.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline")
    ap.add_argument("--after-files", default="")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("--breakdown", action="store_true", help="where the imports' RSS goes (MiB, cumulative)")
    args = ap.parse_args()
    trees = before_after_trees(args.baseline, args.after_files)
    if args.breakdown:
        try:
            for name, tree in trees.items():
                for _ in range(3):
                    print(name, subprocess.run([PY, "-c", BREAKDOWN], env=env_for(tree), capture_output=True,
                                               text=True, check=True, cwd="/tmp").stdout.strip())
        finally:
            for tree in trees.values():
                if tree is not None:
                    shutil.rmtree(tree, ignore_errors=True)
        return 0
    raw: dict[str, dict[str, list[Any]]] = {k: {"imports": [], "daemon": []} for k in trees}
    bare: list[float] = []
    try:
        for r in range(args.rounds):
            bare.append(float(subprocess.run([PY, "-c", BARE], capture_output=True, text=True, check=True).stdout))
            for name, tree in trees.items():
                raw[name]["imports"].append(imports_once(tree))
            for name, tree in trees.items():
                raw[name]["daemon"].append(daemon_once(tree))
            log(f"round {r + 1}/{args.rounds} done")
    finally:
        for tree in trees.values():
            if tree is not None:
                shutil.rmtree(tree, ignore_errors=True)

    def med(rows: list[dict[str, Any]], key: str) -> float:
        return round(statistics.median(x[key] for x in rows), 2)

    summary: dict[str, Any] = {"bare_python_rss_mib": round(statistics.median(bare), 2),
                               "loadavg_1m": os.getloadavg()[0]}
    for name, r in raw.items():
        summary[name] = {
            "import_ms": med(r["imports"], "import_ms"),
            "import_ms_all": [round(x["import_ms"], 1) for x in r["imports"]],
            "imports_rss_mib": med(r["imports"], "rss_mib"),
            "modules": r["imports"][0]["modules"],
            "influx_modules_imported": r["imports"][0]["influx_modules"],
            "daemon_first_tick_s": med(r["daemon"], "first_tick_s"),
            "daemon_first_tick_s_all": [round(x["first_tick_s"], 3) for x in r["daemon"]],
            "daemon_rss_after_10_ticks_mib": med(r["daemon"], "rss_after_10_ticks_mib"),
            "daemon_influx_imports": r["daemon"][0]["influx_imports"],
        }
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
