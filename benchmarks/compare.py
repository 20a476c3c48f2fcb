"""Before and after in one run (issue 18): every overhead scenario with two daemons
side by side, the working tree's (``after``) and the one of a git commit
(``before``, extracted with ``git archive``), beside the reads-only floor and
CodeCarbon's ``codecarbon monitor``, all measured over the same window. On a shared
machine the absolute figures move with other people's load; the ratios within one
window are what count.

    .venv/bin/python benchmarks/compare.py --baseline HEAD [--seconds 60] [--markdown FILE] [--json FILE]
        [--scenarios idle,gpus,procs,scrapes,shortjob-per-s,shortjobs-x10,threads] [--no-peer]
    .venv/bin/python benchmarks/compare.py --from-json FILE      (the table of an earlier run)

``--after-files a,b`` makes *after* the baseline plus exactly those working-tree files
(``path=FILE``: FILE's content at that path, e.g. one change's hunks of a file others are
editing too); ``--after-ref REF`` takes *after* from another commit (plus the files), to
measure several commits at once.

Each scenario runs in a PID namespace of its own (overhead.run_isolated; root).
Derived figures: the CPU of a job start (shortjob-per-s against procs is not the same
box, so it is taken from shortjob-per-s and shortjobs-x10: the difference of CPU over
the difference of job-start rates) and of a thread creation elsewhere on the box
(threads against procs: the difference of CPU over the thread rate).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead  # noqa: E402
import run_all  # noqa: E402
from harness import baseline_tree, ensure_codecarbon, loadavg, log  # noqa: E402

DEFAULT = "idle,gpus,procs,scrapes,shortjob-per-s,shortjobs-x10,threads"
JOB_RATES = {"shortjobs": 1 / 3.6, "shortjob-per-s": 1.0, "shortjobs-x10": 1 / 0.36}


def cpu(r: dict[str, Any], who: str) -> float | None:
    v = r.get(who, {})
    return v.get("cpu_pct_of_one_core") if isinstance(v, dict) else None


def table(results: list[dict[str, Any]]) -> str:
    lines = [("| scenario | before CPU | after CPU | after / before | floor CPU | codecarbon CPU "
              "| before / floor | after / floor | after / codecarbon | tick p99 before / after (ms) "
              "| tick max before / after (ms) | tick CPU mean before / after (ms) | RSS steady before / after (MiB) "
              "| codecarbon RSS | load 1m start / end |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        b, a, f, c = (cpu(r, k) for k in ("before", "wattprint", "floor", "codecarbon"))

        def pc(v: float | None) -> str:
            return f"{v:.3f} %" if v is not None else "-"

        def ratio(x: float | None, y: float | None) -> str:
            return f"{x / y:.2f}" if x is not None and y else "-"
        bb, aa = r.get("before", {}), r["wattprint"]
        cc = r.get("codecarbon", {})
        lines.append(
            f"| {r['scenario']} | {pc(b)} | {pc(a)} | {ratio(a, b)} | {pc(f)} | {pc(c)} | {ratio(b, f)} | "
            f"{ratio(a, f)} | {ratio(a, c)} | {bb.get('tick_ms_p99', '-')} / {aa['tick_ms_p99']} | "
            f"{bb.get('tick_ms_max', '-')} / {aa['tick_ms_max']} | "
            f"{bb.get('tick_cpu_ms_mean', '-')} / {aa.get('tick_cpu_ms_mean', '-')} | "
            f"{bb.get('rss_steady_mib', '-')} / {aa['rss_steady_mib']} | {cc.get('rss_steady_mib', '-')} | "
            f"{r['box']['loadavg_1m_start_end'][0]:.2f} / {r['box']['loadavg_1m_start_end'][1]:.2f} |")
    return "\n".join(lines)


def derived(results: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["scenario"]: r for r in results}
    out: dict[str, Any] = {}
    for who in ("before", "wattprint", "floor"):
        d: dict[str, Any] = {}
        if "shortjob-per-s" in by and "shortjobs-x10" in by:
            y1, y2 = cpu(by["shortjob-per-s"], who), cpu(by["shortjobs-x10"], who)
            if y1 is not None and y2 is not None:
                # % of a core = ms of CPU per second / 10
                d["cpu_ms_per_job_start"] = round(10 * (y2 - y1) / (JOB_RATES["shortjobs-x10"] - 1.0), 3)
        if "threads" in by and "procs" in by:
            y0, y1 = cpu(by["procs"], who), cpu(by["threads"], who)
            if y0 is not None and y1 is not None:
                d["cpu_ms_per_thread_creation"] = round(10 * (y1 - y0) / overhead.THREADS_PER_S, 3)
        out["after" if who == "wattprint" else who] = d
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", metavar="GIT_REF")
    ap.add_argument("--after-files", default="",
                    help="comma-separated files (daemon/..., exporters/...): 'after' is the baseline plus the working "
                         "tree's version of exactly these files (PATH=FILE: FILE's content at PATH), instead of the "
                         "whole working tree")
    ap.add_argument("--after-ref", metavar="GIT_REF",
                    help="'after' is this commit (plus --after-files) instead of the baseline's: the effect of "
                         "several commits at once")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--scenarios", default=DEFAULT)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--from-json", help="print the table of an earlier run's --json instead of running")
    ap.add_argument("--split", action="store_true", help="also run the in-process stage split (more load)")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    args = ap.parse_args()
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        print(table(res["overhead"]) + "\n\nDerived (ms of CPU): " + json.dumps(derived(res["overhead"])))
        return 0
    if not args.baseline:
        ap.error("--baseline is required (unless --from-json)")
    code = baseline_tree(args.baseline)
    overlay = tuple(f for f in args.after_files.split(",") if f)
    after = baseline_tree(args.after_ref or args.baseline, overlay) if overlay or args.after_ref else None
    out: dict[str, Any] = {"machine": run_all.machine(), "baseline": args.baseline, "after_files": list(overlay),
                           "after_ref": args.after_ref,
                           "seconds": args.seconds,
                           "loadavg_1m_at_start": loadavg()}
    try:
        if not args.no_peer:
            ensure_codecarbon()
        results = []
        for name in args.scenarios.split(","):
            results.append(overhead.run_isolated(name, args.seconds, peer=not args.no_peer, baseline=code,
                                                 split=args.split, after=after))
            results[-1]["scenario"] = name
            log(f"{name}: before {cpu(results[-1], 'before')} %, after {cpu(results[-1], 'wattprint')} %, "
                f"floor {cpu(results[-1], 'floor')} %, codecarbon {cpu(results[-1], 'codecarbon')} %")
    finally:
        shutil.rmtree(code, ignore_errors=True)
        if after is not None:
            shutil.rmtree(after, ignore_errors=True)
    out["overhead"] = results
    out["derived"] = derived(results)
    out["loadavg_1m_at_end"] = loadavg()
    m = out["machine"]
    text = (f"Machine: {m['cpus']} x {m['cpu']}, {m['mem_gib']} GiB, Linux {m['kernel']}, Python {m['python']}; "
            + (f"after = {args.after_ref or args.baseline} + the working tree's {', '.join(overlay)}; " if overlay else
               f"after = commit {args.after_ref}; " if args.after_ref else
               f"after = commit {m['commit']} + uncommitted {', '.join(m['uncommitted_daemon_files']) or 'nothing'}; ")
            + f"before = {args.baseline}; {m['date']}; {args.seconds:g} s windows.\n\n"
            + table(results) + "\n\nDerived (ms of CPU): " + json.dumps(out["derived"]) + "\n")
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    t0 = time.monotonic()
    rc = main()
    log(f"done in {time.monotonic() - t0:.0f} s")
    sys.exit(rc)
