"""Overhead scenarios: what the real daemon costs at 1 Hz, beside the floor and
CodeCarbon's ``codecarbon monitor`` in the same window (see harness.py).

Scenarios (all on 8 simulated GPUs and 2 simulated RAPL packages with dram zones,
120 W and 15 W each; processes are real):

- ``idle``       the idle box: no jobs, no GPU processes.
- ``gpus``       8 labelled jobs of 4 workers each; every GPU holds 4 workers of 4
                 different jobs (32 GPU processes, SM utilisation 20-50 %).
- ``procs``      2,000 idle processes plus 32 labelled jobs of 3 processes; 4 job
                 leaders on each GPU (the tick_cost.py scenario).
- ``shortjobs``  1,000 short jobs per hour: a labelled job (sh + 2 workers) started
                 every 3.6 s, each living 20 s and put on a GPU while it lives.
- ``shortjobs-x10`` the same at 10x the rate (every 0.36 s, each living 2 s, so as
                 many are alive at a time): gives the daemon's CPU per job start;
                 the real-rate figure is then checked against base + rate x that.

Each scenario runs in a PID namespace of its own (when root; see ``run_isolated``).

Usage: python benchmarks/overhead.py SCENARIO [--seconds S] [--no-peer] [--no-isolate] [--json OUT]
       python benchmarks/overhead.py SCENARIO --profile N [--seconds S]   (cProfile, top N)
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
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Box, CpuClock, Peer, baseline_tree, ensure_codecarbon, log, measure, proc, rss_kib  # noqa: E402

SCENARIOS: dict[str, str] = {
    "idle": "idle box: 8 sim GPUs without processes, 2 RAPL packages, no jobs",
    "gpus": "8 sim GPUs x 4 processes (8 jobs x 4 workers, each GPU shared by 4 jobs)",
    "procs": "2,000 idle processes + 32 jobs x 3 processes, 8 sim GPUs x 4 job processes",
    "shortjobs": "1,000 short jobs per hour: one labelled job (3 processes, 20 s, on a GPU) every 3.6 s",
    "shortjobs-x10": "10,000 short jobs per hour (every 0.36 s, 2 s each; same concurrency)",
    "scrapes": "procs, with /metrics and /api/v1/jobs each read once a second",
    "shortjob-per-s": "one short job per second (3 processes, 5 s each, on a GPU; about 5 alive)",
    "threads": "procs, with 10 threads a second created by an unrelated process (the cost of a thread creation)",
}
# Scenarios that read /metrics and /api/v1/jobs of each daemon every this many seconds.
API_READS_S = {"scrapes": 1.0}
THREADS_PER_S = 10.0


def spawn_thread_maker(box: Box, per_s: float) -> None:
    """A process, no job, that starts (and ends) a thread ``per_s`` times a second: any
    threaded agent on a real box does this, and each new thread is a new PID."""
    code = ("import threading, time\n"
            f"p = {1.0 / per_s!r}\n"
            "t0 = time.monotonic(); k = 0\n"
            "while True:\n"
            "    th = threading.Thread(target=lambda: None); th.start(); th.join(); k += 1\n"
            "    time.sleep(max(0.0, t0 + k * p - time.monotonic()))\n")
    box.procs.append(subprocess.Popen([sys.executable, "-c", code], env=box.env, start_new_session=True))


def setup_idle(box: Box) -> Callable[[float], None] | None:
    return None


def setup_gpus(box: Box) -> Callable[[float], None] | None:
    workers: list[list[int]] = []
    for j in range(8):
        leader = box.spawn_job(f"bench-gpus-{j}", workers=4)
        workers.append(box.children(leader.pid, 4))
    for j, ws in enumerate(workers):
        for i, pid in enumerate(ws):
            box.gpus[(j + 2 * i) % 8]["processes"].append(proc(pid, sm_util=20 + 10 * i))
    box.write_gpus()
    return None


def setup_procs(box: Box, idle: int = 2000, jobs: int = 32, life_s: float = 3600) -> Callable[[float], None] | None:
    box.spawn_idle(idle, seconds=life_s)
    roots = [box.spawn_job(f"bench-procs-{j}", workers=2, seconds=life_s).pid for j in range(jobs)]
    for g in range(len(box.gpus)):
        box.gpus[g]["processes"] = [proc(roots[(g * 4 + i) % len(roots)], sm_util=50 + i) for i in range(4)]
    box.write_gpus()
    return None


class ShortJobs:
    """Starts a labelled job every ``period_s`` that lives ``life_s``; keeps the sim
    file's process lists in step (a job's leader is on GPU n mod 8 while it lives)."""

    def __init__(self, box: Box, period_s: float, life_s: float):
        self.box, self.period_s, self.life_s = box, period_s, life_s
        self.next_at: float | None = None
        self.live: dict[int, tuple[subprocess.Popen, int]] = {}
        self.started = 0

    def __call__(self, now: float) -> None:
        changed = False
        for pid, (p, g) in list(self.live.items()):
            if p.poll() is not None:
                del self.live[pid]
                self.box.gpus[g]["processes"] = [e for e in self.box.gpus[g]["processes"] if e["pid"] != pid]
                changed = True
        if self.next_at is None:
            self.next_at = now
        while now >= self.next_at:
            self.next_at += self.period_s
            p = self.box.spawn_job(f"bench-short-{self.started}", workers=2, seconds=self.life_s)
            g = self.started % len(self.box.gpus)
            self.box.gpus[g]["processes"].append(proc(p.pid, sm_util=80))
            self.live[p.pid] = (p, g)
            self.started += 1
            changed = True
        if changed:
            self.box.write_gpus()
        # Reaped jobs leave box.procs so that it does not grow without bound.
        if len(self.box.procs) > 64:
            self.box.procs = [p for p in self.box.procs if p.returncode is None]


def run(name: str, seconds: float, peer: bool = True, profile: int = 0,
        marks: Path | None = None, baseline: Path | None = None, split: bool = True,
        after: Path | None = None) -> dict[str, Any]:
    log(f"scenario {name}: {SCENARIOS[name]} ({seconds:g} s window{', cProfile' if profile else ''})")
    box = Box(name)
    driver: Callable[[float], None] | None = None
    short: ShortJobs | None = None
    try:
        if name == "idle":
            driver = setup_idle(box)
        elif name == "gpus":
            driver = setup_gpus(box)
        elif name == "procs":
            driver = setup_procs(box)
        elif name == "shortjobs":
            driver = short = ShortJobs(box, 3.6, 20.0)
        elif name == "shortjobs-x10":
            driver = short = ShortJobs(box, 0.36, 2.0)
        elif name == "scrapes":
            driver = setup_procs(box)
        elif name == "shortjob-per-s":
            driver = short = ShortJobs(box, 1.0, 5.0)
        elif name == "threads":
            driver = setup_procs(box)
            spawn_thread_maker(box, THREADS_PER_S)
        else:
            raise SystemExit(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
        t0 = time.monotonic()
        if profile:
            return profile_ticks(box, seconds, driver, profile)
        res = measure(box, seconds, driver=driver, peer=peer, marks=marks, baseline=baseline, split=split,
                      api_reads_s=API_READS_S.get(name, 0.0), after=after)
        res["scenario"] = name
        res["description"] = SCENARIOS[name]
        if short is not None:
            res["jobs_started"] = short.started
        res["elapsed_s"] = round(time.monotonic() - t0, 1)
        return res
    finally:
        box.close()


def can_isolate() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None


def run_isolated(name: str, seconds: float, peer: bool = True, baseline: Path | None = None,
                 split: bool = True, after: Path | None = None) -> dict[str, Any]:
    """``run`` in a new PID namespace with its own /proc (``unshare --pid --fork
    --mount-proc``): the daemon and the floor see only the scenario's processes, not
    those of whoever else uses the machine, and the daemon's new-PID gate
    (``/proc/loadavg``'s last PID is per namespace) opens only for the scenario's own
    process and thread creations.

    The peer, ``codecarbon monitor``, runs outside that namespace, in the host's, and
    is measured over the same window (the scenario marks its start and end in files):
    it monitors the whole machine anyway (its CPU load comes from /proc/stat), and
    it starts a thread for every measurement, which inside the namespace would open
    the daemon's gate every second. Falls back to the host namespace when not root."""
    if not can_isolate():
        log("not root or no unshare: running in the host PID namespace (other processes on the box count)")
        res = run(name, seconds, peer, baseline=baseline, split=split, after=after)
        res["isolation"] = "none: host PID namespace"
        return res
    work = Path(tempfile.mkdtemp(prefix="wattprint-bench-outer-"))
    out, marks = work / "result.json", work / "marks"
    marks.mkdir()
    peer_run: Peer | None = None
    note = ""
    try:
        if peer:
            exe = ensure_codecarbon()
            if exe is None:
                note = "codecarbon could not be installed"
            else:
                peer_run = Peer(work, exe)
                if not peer_run.wait_ready():
                    note = "codecarbon monitor did not start: " + peer_run.out.read_text(errors="replace")[-500:]
                    peer_run.stop()
                    peer_run = None
        cmd = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
               sys.executable, str(Path(__file__).resolve()), name, "--seconds", str(seconds),
               "--json", str(out), "--no-isolate", "--quiet", "--no-peer", "--marks", str(marks)]
        if baseline is not None:
            cmd += ["--baseline-code", str(baseline)]
        if after is not None:
            cmd += ["--after-code", str(after)]
        if not split:
            cmd += ["--no-split"]
        inner = subprocess.Popen(cmd)
        clock: CpuClock | None = None
        rss: list[int] = []
        cpu_s = 0.0
        method = ""
        w0 = w1 = 0.0
        next_rss = 0.0
        while inner.poll() is None:
            now = time.monotonic()
            if peer_run is not None:
                if clock is None and (marks / "start").exists():
                    clock, w0 = CpuClock(peer_run.p.pid), now
                    next_rss = now + seconds / 2
                elif clock is not None and not w1:
                    if (marks / "end").exists():
                        cpu_s, method = clock.read()
                        w1 = now
                    elif now >= next_rss:
                        rss.append(rss_kib(peer_run.p.pid)[0])
                        next_rss += 5.0
            time.sleep(0.02)
        if inner.returncode != 0:
            raise RuntimeError(f"scenario {name} failed in its namespace (exit {inner.returncode})")
        res = json.loads(out.read_text())
        if peer_run is not None and w1 > w0:
            if not rss:
                rss.append(rss_kib(peer_run.p.pid)[0])
            res["codecarbon"] = {
                "cpu_pct_of_one_core": round(100 * cpu_s / (w1 - w0), 3),
                "cpu_source": method,
                "rss_steady_mib": round(statistics.median(rss) / 1024, 1),
                "rss_peak_mib": round(rss_kib(peer_run.p.pid)[1] / 1024, 1),
                "namespace": "host",
            }
            res["ratio_wattprint_over_codecarbon"] = round(res["cpu_seconds_in_window"]["wattprint"] * (w1 - w0)
                                                           / res["seconds"] / max(1e-9, cpu_s), 2)
        elif peer:
            res["codecarbon"] = {"skipped": note or "no measurement window"}
    finally:
        if peer_run is not None:
            peer_run.stop()
        shutil.rmtree(work, ignore_errors=True)
    res["isolation"] = "PID namespace (unshare --pid --mount-proc); codecarbon in the host namespace"
    return res


def profile_ticks(box: Box, seconds: float, driver: Callable[[float], None] | None, top: int) -> dict[str, Any]:
    """cProfile of the in-process engine's ticks on this scenario (no daemon, no peer)."""
    import threading

    import stage_split

    stop = threading.Event()

    def drive() -> None:
        while not stop.is_set():
            if driver:
                driver(time.monotonic())
            time.sleep(0.05)

    t = threading.Thread(target=drive, daemon=True)
    t.start()
    try:
        return stage_split.run(str(box.config), seconds, state_dir=str(box.work / "profile-state"), cprofile=top)
    finally:
        stop.set()
        t.join()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=list(SCENARIOS))
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--no-peer", action="store_true", help="do not run codecarbon beside it")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--no-isolate", action="store_true",
                    help="run in the host PID namespace (default: a new one, when root)")
    ap.add_argument("--quiet", action="store_true", help="do not print the result (with --json)")
    ap.add_argument("--baseline", metavar="GIT_REF",
                    help="also run the daemon of this commit beside the working tree's (measured as 'before')")
    ap.add_argument("--baseline-code", help=argparse.SUPPRESS)  # an extracted baseline tree (run_isolated)
    ap.add_argument("--after-code", help=argparse.SUPPRESS)  # an extracted tree with an overlay (run_isolated)
    ap.add_argument("--no-split", action="store_true", help="leave the in-process stage split out")
    ap.add_argument("--marks", help=argparse.SUPPRESS)  # run_isolated: window start/end files here
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="instead: cProfile the engine's ticks in-process, print the top N functions")
    args = ap.parse_args()
    baseline = Path(args.baseline_code) if args.baseline_code else (baseline_tree(args.baseline) if args.baseline else None)
    after = Path(args.after_code) if args.after_code else None
    if args.profile:
        res = run(args.scenario, args.seconds, peer=False, profile=args.profile)
        print(res.pop("cprofile_tottime"))
    elif args.no_isolate:
        res = run(args.scenario, args.seconds, peer=not args.no_peer,
                  marks=Path(args.marks) if args.marks else None, baseline=baseline, split=not args.no_split,
                  after=after)
    else:
        res = run_isolated(args.scenario, args.seconds, peer=not args.no_peer, baseline=baseline,
                           split=not args.no_split, after=after)
    text = json.dumps(res, indent=2)
    if not args.quiet:
        print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
