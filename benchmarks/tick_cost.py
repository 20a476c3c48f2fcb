"""Benchmark: the daemon's CPU cost per tick on a busy box.

Scenario (issue 3): 2,000 idle processes plus 32 labelled jobs (3 processes each),
8 simulated GPUs with 4 job processes each, a RAPL powercap tree advancing at known
rates. Runs the real ``wattprint run`` process for ``--seconds`` and reports

- its CPU time per second of wall time (% of one core), from /proc/<pid>/stat;
- tick-duration percentiles, from /metrics (``wattprint_tick_duration_seconds``);
- the same figures for a floor run in the same process tree at the same time: a
  minimal loop doing only the raw reads the daemon needs each second (list /proc,
  stat of the job processes, the powercap counters, /proc/stat, /proc/meminfo) —
  reported as the ratio wattprint / floor;
- an in-process split of one tick by stage (sources, processes, attribution, store).

Usage: python benchmarks/tick_cost.py [--idle 2000] [--jobs 32] [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from gpusim import gpu, proc, write_sim  # noqa: E402
from powercap import PowercapTree  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")

FLOOR = r'''
import os, sys, time
pids = [int(p) for p in sys.argv[1].split(",")]
files = sys.argv[2].split(",")
deadline = time.monotonic() + float(sys.argv[3])
t0 = time.monotonic(); k = 0
while time.monotonic() < deadline:
    names = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh: fh.read()
        except OSError: pass
    for f in files:
        with open(f) as fh: fh.read()
    with open("/proc/stat") as fh: fh.readline()
    with open("/proc/meminfo") as fh: fh.read()
    k += 1
    time.sleep(max(0.0, t0 + k - time.monotonic()))
'''


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        rest = fh.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise KeyError(name)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def stage_split(cfg_path: str, ticks: int = 20) -> dict[str, float]:
    """Run the engine's stages in-process and time each (ms per tick, CPU time)."""
    from wattprint.daemon.app import build_engine
    from wattprint.daemon.attribution import attribute
    from wattprint.daemon.config import load_config
    from wattprint.daemon.health import HealthBoard

    cfg = load_config(cfg_path, env={})
    engine = build_engine(cfg, HealthBoard())
    totals = {"sources": 0.0, "processes": 0.0, "attribution": 0.0, "whole tick": 0.0}
    engine.tick_blocking(time.monotonic(), time.time())
    for _ in range(ticks):
        time.sleep(0.2)
        now = time.monotonic()
        t = time.process_time()
        readings = engine._read_sources(now)
        totals["sources"] += time.process_time() - t
        t = time.process_time()
        view = engine.tracker.observe(now, {p.pid for r in readings for p in r.processes})
        totals["processes"] += time.process_time() - t
        t = time.process_time()
        attribute(readings, view)
        totals["attribution"] += time.process_time() - t
        time.sleep(0.2)
        t = time.process_time()
        engine.tick_blocking(time.monotonic(), time.time())
        totals["whole tick"] += time.process_time() - t
    engine.close()
    out = {k: v / ticks * 1e3 for k, v in totals.items()}
    out["store + snapshot (whole tick - the rest)"] = out["whole tick"] - out["sources"] - out["processes"] - out["attribution"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--idle", type=int, default=2000)
    ap.add_argument("--jobs", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="wattprint-bench-"))
    started: list[subprocess.Popen] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATTPRINT_") and k != "SLURM_JOB_ID"}
    try:
        for _ in range(args.idle):
            started.append(subprocess.Popen(["sleep", "3600"], env=env, start_new_session=True))
        roots = []
        for j in range(args.jobs):
            p = subprocess.Popen(["sh", "-c", "sleep 3600 & sleep 3600 & wait"], env={**env, "WATTPRINT_JOB": f"bench-{j}"},
                                 start_new_session=True)
            started.append(p)
            roots.append(p.pid)
        time.sleep(1.0)
        job_pids = list(roots)
        for r in roots:
            with open(f"/proc/{r}/task/{r}/children") as fh:
                job_pids += [int(x) for x in fh.read().split()]
        sim = work / "sim.json"
        gpus = [gpu(g, power_w=300.0, processes=[proc(roots[(g * 4 + i) % len(roots)], sm_util=50 + i)
                                                 for i in range(4)]) for g in range(8)]
        write_sim(sim, gpus)
        tree = PowercapTree(work / "powercap")
        zones = tree.add_package(0) | {f"{k}1": v for k, v in tree.add_package(1).items()}
        feeder = tree.start_feeding({zones["package"]: 120.0, zones["dram"]: 15.0,
                                     zones["package1"]: 120.0, zones["dram1"]: 15.0}, period_s=0.1)
        port = 19000 + os.getpid() % 1000
        cfg = work / "wattprint.toml"
        cfg.write_text(f'[daemon]\nstate_dir = "{work / "state"}"\n[gpu]\nbackend = "sim"\nsim_file = "{sim}"\n'
                       f'[cpu]\nsource = "rapl"\npowercap_root = "{work / "powercap"}"\n[http]\nlisten = "127.0.0.1:{port}"\n')
        log = open(work / "daemon.log", "wb")
        daemon = subprocess.Popen([sys.executable, "-m", "wattprint.daemon", "run", "--config", str(cfg)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if metric(url, "wattprint_ticks_total") >= 3:
                    break
            except Exception:
                pass
            time.sleep(0.2)
        time.sleep(3)  # warm-up past the first full scan
        energy_files = [str(work / "powercap" / z / "energy_uj") for z in ("intel-rapl:0", "intel-rapl:0:1", "intel-rapl:1", "intel-rapl:1:1")]
        floor = subprocess.Popen([sys.executable, "-c", FLOOR, ",".join(map(str, job_pids)), ",".join(energy_files),
                                  str(args.seconds)], env=env)
        c0, f0, w0 = cpu_s(daemon.pid), cpu_s(floor.pid), time.monotonic()
        durations = []
        end = w0 + args.seconds
        while time.monotonic() < end:
            durations.append(metric(url, "wattprint_tick_duration_seconds"))
            time.sleep(5.0)  # a scrape costs the daemon too; Prometheus scrapes every 15 s by default
        c1, f1, w1 = cpu_s(daemon.pid), cpu_s(floor.pid), time.monotonic()
        floor.wait()
        rss_kib = int(next(l for l in open(f"/proc/{daemon.pid}/status") if l.startswith("VmRSS")).split()[1])
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=20)
        feeder.stop()
        split = stage_split(str(cfg))
        wall = w1 - w0
        result = {
            "scenario": f"{args.idle} idle processes + {args.jobs} jobs x 3 processes, 8 sim GPUs x 4 processes, 2 RAPL packages",
            "seconds": round(wall, 1),
            "daemon_cpu_pct_of_one_core": round(100 * (c1 - c0) / wall, 3),
            "floor_cpu_pct_of_one_core": round(100 * (f1 - f0) / wall, 3),
            "ratio_wattprint_over_floor": round((c1 - c0) / max(1e-9, f1 - f0), 2),
            "tick_duration_ms_p50": round(1e3 * pct(durations, 0.5), 2),
            "tick_duration_ms_p99": round(1e3 * pct(durations, 0.99), 2),
            "daemon_rss_mib": round(rss_kib / 1024, 1),
            "stage_split_cpu_ms_per_tick": {k: round(v, 3) for k, v in split.items()},
            "note": "CPU time has 10 ms resolution per process (CLK_TCK=%d)" % CLK_TCK,
        }
        print(json.dumps(result, indent=2))
    finally:
        for p in started:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in started:
            p.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
