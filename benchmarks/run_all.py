"""Every benchmark in one run: the overhead scenarios (each beside the floor and
CodeCarbon's ``codecarbon monitor``, same window, same machine) and the accuracy
cases; prints the tables and, with --json, writes every figure.

    .venv/bin/python benchmarks/run_all.py            # about 13 minutes
    .venv/bin/python benchmarks/run_all.py --quick    # under 3 minutes, rougher figures

Each part runs alone too:

    .venv/bin/python benchmarks/overhead.py idle|gpus|procs|shortjobs|shortjobs-x10 [--seconds S]
    .venv/bin/python benchmarks/accuracy.py [CASE ...] [--quick]

The first run installs CodeCarbon into its own venv (/tmp/wattprint-bench-codecarbon,
override with WATTPRINT_BENCH_CODECARBON_VENV); --no-peer leaves it out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # noqa: E402
import overhead  # noqa: E402
from harness import ROOT, ensure_codecarbon, loadavg, log  # noqa: E402

FULL = {"idle": 120, "gpus": 120, "procs": 120, "shortjobs": 180, "shortjobs-x10": 60}
QUICK = {"idle": 20, "gpus": 20, "procs": 30, "shortjobs": 30}  # procs: 30 s holds one full re-read


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), "")
    except OSError:
        pass
    with open("/proc/meminfo") as fh:
        mem_kib = int(fh.readline().split()[1])

    def git(*args: str) -> str:  # read-only git commands
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    dirty = [l[3:] for l in git("status", "--porcelain", "--", "daemon", "exporters").splitlines()]
    return {"cpu": model, "cpus": os.cpu_count(), "mem_gib": round(mem_kib / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted_daemon_files": dirty, "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def overhead_table(results: list[dict[str, Any]]) -> str:
    head = (f"{'scenario':<14} {'wattprint':>9} {'floor':>7} {'codecarb':>8} {'w/floor':>7} {'w/cc':>6} "
            f"{'RSS steady/peak':>15} {'tick p50/p95/p99 ms':>20}  {'CPU ms/tick: src proc attr store engine':<40} "
            f"{'PIDs/s':>7}")
    lines = [head, "(CPU: % of one core at 1 Hz; RSS MiB)"]
    for r in results:
        w, f, c = r["wattprint"], r["floor"], r.get("codecarbon", {})
        cc = f"{c['cpu_pct_of_one_core']:.3f}" if "cpu_pct_of_one_core" in c else "-"
        wc = f"{r['ratio_wattprint_over_codecarbon']:.2f}" if "ratio_wattprint_over_codecarbon" in r else "-"
        sp = (r.get("stage_split") or {}).get("cpu_ms_per_tick")
        split = (" ".join(f"{sp[k]:.2f}" for k in ("sources", "processes", "attribution", "store", "engine"))
                 if sp else "-")
        lines.append(
            f"{r['scenario']:<14} {w['cpu_pct_of_one_core']:>9.3f} {f['cpu_pct_of_one_core']:>7.3f} {cc:>8} "
            f"{r['ratio_wattprint_over_floor']:>7.2f} {wc:>6} "
            f"{w['rss_steady_mib']:>7.1f}/{w['rss_peak_mib']:<7.1f} "
            f"{w['tick_ms_p50']:>6.1f}/{w['tick_ms_p95']:.1f}/{w['tick_ms_p99']:<6.1f}  {split:<40} "
            f"{r['box'].get('new_pids_per_s') or 0:>7.2f}")
    return "\n".join(lines)


def markdown(out: dict[str, Any]) -> str:
    """The figures as the Markdown tables of docs/benchmarks.md."""
    m = out["machine"]
    lines = [f"Machine: {m['cpus']} x {m['cpu']}, {m['mem_gib']} GiB, Linux {m['kernel']}, Python {m['python']}; "
             f"commit {m['commit']}" + (" plus uncommitted changes in " + ", ".join(m["uncommitted_daemon_files"])
                                        if m["uncommitted_daemon_files"] else "") + f"; {m['date']}.",
             f"Load average (1 min) at start / end: {out['loadavg_1m_at_start']:.2f} / {out['loadavg_1m_at_end']:.2f}.",
             ""]
    if "overhead" in out:
        lines += ["| scenario | wattprint CPU | floor CPU | codecarbon CPU | wattprint / floor | wattprint / codecarbon "
                  "| RSS steady / peak (MiB) | codecarbon RSS | tick p50 / p95 / p99 / max (ms) | new PIDs/s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in out["overhead"]:
            w, f, c = r["wattprint"], r["floor"], r.get("codecarbon", {})
            cc = f"{c['cpu_pct_of_one_core']:.3f} %" if "cpu_pct_of_one_core" in c else "-"
            ccr = f"{c['rss_steady_mib']:.0f}" if "rss_steady_mib" in c else "-"
            wc = f"{r['ratio_wattprint_over_codecarbon']:.2f}" if "ratio_wattprint_over_codecarbon" in r else "-"
            lines.append(
                f"| {r['scenario']} | {w['cpu_pct_of_one_core']:.3f} % | {f['cpu_pct_of_one_core']:.3f} % | {cc} | "
                f"{r['ratio_wattprint_over_floor']:.2f} | {wc} | {w['rss_steady_mib']:.1f} / {w['rss_peak_mib']:.1f} | "
                f"{ccr} | {w['tick_ms_p50']:.1f} / {w['tick_ms_p95']:.1f} / {w['tick_ms_p99']:.1f} / "
                f"{w['tick_ms_max']:.1f} | {r['box'].get('new_pids_per_s') or 0:.1f} |")
        lines += ["", "| scenario | sources | processes | attribution | store | engine | whole tick (ms CPU) "
                      "| daemon tick CPU (ms, mean) | /metrics render (ms CPU) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in out["overhead"]:
            sp = (r.get("stage_split") or {}).get("cpu_ms_per_tick")
            if not sp:
                continue
            lines.append(f"| {r['scenario']} | " + " | ".join(f"{sp[k]:.2f}" for k in
                         ("sources", "processes", "attribution", "store", "engine", "whole tick"))
                         + f" | {r['wattprint']['tick_cpu_ms_mean']:.2f} | "
                         f"{r['stage_split'].get('metrics_render_cpu_ms') or 0:.2f} |")
    def num(v: float) -> str:
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"

    if "accuracy" in out:
        lines += ["", "| case | quantity | truth | measured | error |", "|---|---|---|---|---|"]
        for r in out["accuracy"]:
            lines.append(f"| {r['case']} | {r['quantity']} | {num(r['truth'])} {r['unit']} | "
                         f"{num(r['measured'])} {r['unit']} | {r['error_pct']:+.3f} % |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short windows, fewer cases (< 3 min)")
    ap.add_argument("--no-peer", action="store_true", help="leave CodeCarbon out")
    ap.add_argument("--only", choices=["overhead", "accuracy"], help="run one half")
    ap.add_argument("--no-isolate", action="store_true",
                    help="run the overhead scenarios in the host PID namespace (default: one each, when root)")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--markdown", help="write the tables as Markdown here")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="first wait up to S seconds for the 1-minute load average to fall below 0.5")
    args = ap.parse_args()

    if args.wait_quiet > 0:
        deadline = time.monotonic() + args.wait_quiet
        while loadavg() >= 0.5 and time.monotonic() < deadline:
            log(f"load average {loadavg():.2f}: waiting for a quieter machine")
            time.sleep(15)
    t0 = time.monotonic()
    out: dict[str, Any] = {"machine": machine(), "quick": args.quick, "loadavg_1m_at_start": loadavg()}
    log(f"machine: {out['machine']}")
    if out["loadavg_1m_at_start"] > 0.3:
        log(f"load average {out['loadavg_1m_at_start']:.2f}: the box is busy; figures will be noisier")
    if args.only != "accuracy":
        if not args.no_peer:
            ensure_codecarbon()  # install (once) before any clock starts
        plan = QUICK if args.quick else FULL
        run = overhead.run if args.no_isolate else overhead.run_isolated
        out["overhead"] = [run(name, secs, peer=not args.no_peer) for name, secs in plan.items()]
        xs = {r["scenario"]: r for r in out["overhead"]}
        if "shortjobs" in xs and "shortjobs-x10" in xs:
            real, fast = xs["shortjobs"], xs["shortjobs-x10"]
            rate_real = real["jobs_started"] / real["seconds"]
            rate_fast = fast["jobs_started"] / fast["seconds"]
            cpu_real = real["wattprint"]["cpu_pct_of_one_core"] / 100
            cpu_fast = fast["wattprint"]["cpu_pct_of_one_core"] / 100
            per_start = (cpu_fast - cpu_real) / (rate_fast - rate_real) if rate_fast > rate_real else None
            out["short_job_cost"] = {
                "cpu_ms_per_job_start": round(1e3 * per_start, 2) if per_start is not None else None,
                "base_pct": round(100 * (cpu_real - per_start * rate_real), 3) if per_start is not None else None,
                "method": "cpu(rate) = base + c x rate through the real-rate (3.6 s) and the 10x (0.36 s) runs, "
                          "same number of jobs alive at a time",
            }
    if args.only != "overhead":
        out["accuracy"] = accuracy.run(quick=args.quick)
    out["loadavg_1m_at_end"] = loadavg()
    out["elapsed_s"] = round(time.monotonic() - t0, 1)

    print()
    print(f"machine: {out['machine']['cpus']} x {out['machine']['cpu']}, {out['machine']['mem_gib']} GiB, "
          f"Linux {out['machine']['kernel']}, Python {out['machine']['python']}, commit {out['machine']['commit']}"
          + (" + uncommitted daemon changes" if out["machine"]["uncommitted_daemon_files"] else ""))
    print(f"load average (1 min) at start / end: {out['loadavg_1m_at_start']:.2f} / {out['loadavg_1m_at_end']:.2f}; "
          f"elapsed {out['elapsed_s']:.0f} s")
    if "overhead" in out:
        print()
        print(overhead_table(out["overhead"]))
        if out.get("short_job_cost"):
            s = out["short_job_cost"]
            print(f"\nshort jobs: {s['cpu_ms_per_job_start']} ms of daemon CPU per job start on top of a base of "
                  f"{s['base_pct']} % of one core ({s['method']})")
    if "accuracy" in out:
        print()
        print(accuracy.table(out["accuracy"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
        log(f"figures written to {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(markdown(out))
        log(f"tables written to {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
