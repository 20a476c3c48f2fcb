"""Accuracy against known truth: the real Engine in-process, a simulated clock.

Everything below the NVML / powercap boundary is simulated and therefore known
exactly: the power of every 0.1 s step, the energy written into every RAPL counter,
the grid intensity of every 5-minute interval. Above it everything is the daemon's
own code (``NvmlGpuSource`` over the simulated NVML, ``RaplSource``, the real
``ProcessTracker`` over real labelled processes, ``attribute``, the SQLite ledger,
the grid provider client and settlement). The clock is simulated at the boundaries,
as in tests/test_e2e_grid.py: the sim's clock, the ticks' monotonic and wall times,
and the provider's "now"; so an hour runs in seconds.

Truth is the integral over the daemon's observation window (first tick, which sets
the counter baselines, to last tick): energy before the first tick is not the
daemon's to count.

Cases (``python benchmarks/accuracy.py [CASE ...] [--quick]``):

- ``gpu-constant``, ``gpu-stepped``, ``gpu-fluctuating``: one job alone on a GPU;
  constant 250 W, a new level (80-350 W) every 2-15 s, a new level every 0.1 s;
  each with the NVML energy counter and without it (``energy_counter: false``: the
  collector integrates 1 Hz power samples, trapezoid). Per-job energy and CO2e
  (static intensity, so CO2e error = energy error).
- ``gpu-counter-reset``: stepped power with counter; the driver reloads mid-run
  (``counter_epoch`` changes), one interval falls back to power samples.
- ``rapl-wrap``: two packages and dram zones with ``max_energy_range_uj`` = 250 J,
  stepped 60-200 W, so the package counters wrap every 1-4 ticks; device energy.
  Plus ``rapl-wrap-stall``: one tick 3 s late at 150 W, i.e. more than one range
  between two reads (outside the documented limit, to show what that costs).
- ``gpu-come-and-go``: one GPU shared by a long job A (SM 60 %) and short jobs B
  (SM 40 %) that start and end between ticks (2.5 s each, every 5 s, at .35 s
  offsets); power 100 W with A alone, 250 W with A and B. Truth splits every 0.1 s
  step by the SM shares of the processes present; per-job energy error of A and of
  all B together.
- ``cpu-children``: a labelled job that forks 20 children, each burning about
  0.12 s of CPU and exiting (reaped) between ticks; the job's CPU seconds as the
  process tracker counts them vs the job's own rusage. Real time (about 5 s).
- ``intensity``: one hour (20 min with --quick) of stepped GPU power under an
  Energi Data Service stand-in whose 5-minute intensity changes every interval
  (tests/eds_sim.py); per-job CO2e provisional (forecast) and final (after the
  realised values arrive and the ledger settles) vs the truth, with and without
  the energy counter. ``intensity-bucket900``: the same with ``bucket_s = 900``
  (15-minute ledger buckets over 5-minute intensity), to show the cost of buckets
  coarser than the provider's resolution.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from gpusim import gpu, proc, write_sim  # noqa: E402
from powercap import PowercapTree  # noqa: E402

from wattprint.daemon.carbon import IntensityBook  # noqa: E402
from wattprint.daemon.config import GridConfig  # noqa: E402
from wattprint.daemon.engine import Engine  # noqa: E402
from wattprint.daemon.health import HealthBoard  # noqa: E402
from wattprint.daemon.ledger import Ledger, LedgerReader  # noqa: E402
from wattprint.daemon.procs import ProcessTracker  # noqa: E402
from wattprint.daemon.sources.gpu import NvmlGpuSource  # noqa: E402
from wattprint.daemon.sources.nvml_sim import SimulatedNvml  # noqa: E402
from wattprint.daemon.sources.rapl import RaplSource  # noqa: E402

J_PER_KWH = 3.6e6
STEP = 0.1  # s, the resolution of the simulated power
PER_TICK = 10  # steps per 1 s tick
START_WALL = 1_795_000_200.0  # a November day, 5-minute aligned
STATIC_G = 400.0


def env_clean() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("WATTPRINT_") and k != "SLURM_JOB_ID"}


def labelled(label: str) -> subprocess.Popen:
    p = subprocess.Popen(["sleep", "3600"], env={**env_clean(), "WATTPRINT_JOB": label}, start_new_session=True)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # exec'd, so its environment has the label
        try:
            with open(f"/proc/{p.pid}/comm") as fh:
                if fh.read().strip() == "sleep":
                    break
        except OSError:
            pass
        time.sleep(0.005)
    return p


def kill(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


@dataclass
class Clock:
    mono: float = 1000.0
    wall: float = START_WALL


def err_pct(measured: float, truth: float) -> float:
    return 100.0 * (measured - truth) / truth if truth else float("nan")


def row(case: str, what: str, truth: float, measured: float, unit: str, note: str = "") -> dict[str, Any]:
    return {"case": case, "quantity": what, "truth": round(truth, 4), "measured": round(measured, 4),
            "unit": unit, "error_pct": round(err_pct(measured, truth), 4), "note": note}


def make_engine(work: Path, sources: list, book: IntensityBook | None = None, bucket_s: int = 60) -> Engine:
    return Engine(
        sources=sources, tracker=ProcessTracker(), ledger=Ledger(str(work / "store.sqlite3"), "acc", bucket_s),
        intensity=book or IntensityBook(GridConfig(), "static", "static", STATIC_G), health=HealthBoard(),
        finished_grace_s=1e9,
    )


# Jobs are picked by their leader's PID (the job id is "<pid>-<start>"), not by label:
# labels are per-user bounded ([jobs] max_labels_per_user), and on a shared box other
# users' (or tests') labelled processes can push ours to "_overflow".
def jobs_of(engine: Engine, pids: set[int]) -> list[Any]:
    return [j for j in engine.snapshot.jobs if int(j.job_id.split("-", 1)[0]) in pids]


def job_energy(engine: Engine, pids: set[int]) -> float:
    return sum(sum(j.energy_j.values()) for j in jobs_of(engine, pids))


def job_gpu_j(engine: Engine, pids: set[int]) -> float:
    return sum(j.energy_j["gpu"] for j in jobs_of(engine, pids))


# --------------------------------------------------------------------------- power profiles

def profile_constant(n_steps: int, rng: random.Random) -> list[float]:
    return [250.0] * n_steps


def profile_stepped(n_steps: int, rng: random.Random, lo: float = 80.0, hi: float = 350.0) -> list[float]:
    out: list[float] = []
    while len(out) < n_steps:
        level = round(rng.uniform(lo, hi), 1)
        out += [level] * rng.randint(20, 150)  # 2-15 s
    return out[:n_steps]


def profile_fluctuating(n_steps: int, rng: random.Random) -> list[float]:
    return [round(rng.uniform(100.0, 350.0), 1) for _ in range(n_steps)]


# --------------------------------------------------------------------------- GPU, one job

def gpu_single(case: str, profile: list[float], counter: bool, reset_at_step: int | None = None) -> dict[str, Any]:
    """One job alone on one GPU; power profile[k] during step k (0.1 s)."""
    work = Path(tempfile.mkdtemp(prefix="wattprint-acc-"))
    job = labelled(f"acc-{case}")
    try:
        clock = Clock()
        sim = work / "sim.json"
        epoch = 0

        def write(power: float) -> None:
            write_sim(sim, [gpu(0, power_w=power, energy_counter=counter, counter_epoch=epoch,
                                processes=[proc(job.pid, sm_util=90)])])

        write(profile[0])
        nvml = SimulatedNvml(str(sim), clock=lambda: clock.mono)
        engine = make_engine(work, [NvmlGpuSource(nvml, init_retry_s=0.0)])
        engine.tick_blocking(clock.mono, clock.wall)  # baseline
        n = len(profile)
        for k in range(1, n + 1):
            clock.mono = 1000.0 + k * STEP
            clock.wall = START_WALL + k * STEP
            changed = k < n and profile[k] != profile[k - 1]
            if reset_at_step is not None and k == reset_at_step:
                epoch += 1
                changed = True
            if changed:
                write(profile[k])
                nvml.nvmlDeviceGetCount()  # the driver sees the new state now
            if k % PER_TICK == 0:
                engine.tick_blocking(clock.mono, clock.wall)
        # the truth stops at the last tick
        last_tick_step = (n // PER_TICK) * PER_TICK
        truth = sum(profile[:last_tick_step]) * STEP
        measured = job_energy(engine, {job.pid})
        src = "counter" if counter else "power (1 Hz samples, trapezoid)"
        engine.close()
        return {"energy": (truth, measured, src)}
    finally:
        kill(job)


def run_gpu_profiles(quick: bool) -> list[dict[str, Any]]:
    seconds = 300 if quick else 600
    n = int(seconds / STEP)
    rows = []
    for name, fn in (("gpu-constant", profile_constant), ("gpu-stepped", profile_stepped),
                     ("gpu-fluctuating", profile_fluctuating)):
        profile = fn(n, random.Random(42))
        for counter in (True, False):
            out = gpu_single(name, profile, counter)
            truth, measured, src = out["energy"]
            note = f"{seconds} s, source {src}"
            rows.append(row(name, f"job energy ({'counter' if counter else 'no counter'})",
                            truth, measured, "J", note))
            rows.append(row(name, f"job CO2e ({'counter' if counter else 'no counter'}, static {STATIC_G:g} g/kWh)",
                            truth / J_PER_KWH * STATIC_G, measured / J_PER_KWH * STATIC_G, "g", note))
    return rows


def run_counter_reset(quick: bool) -> list[dict[str, Any]]:
    seconds = 300 if quick else 600
    n = int(seconds / STEP)
    profile = profile_stepped(n, random.Random(7))
    # the reload one step after a power change in the middle of a tick interval, so
    # that the interval's power samples (trapezoid) miss part of the change
    change = next(k for k in range(n // 2, n) if profile[k] != profile[k - 1] and 1 <= k % PER_TICK <= 7)
    truth, measured, _ = gpu_single("gpu-counter-reset", profile, True, reset_at_step=change + 1)["energy"]
    return [row("gpu-counter-reset", "job energy (counter; one driver reload)", truth, measured, "J",
                f"{seconds} s; the interval with the reload uses power samples")]


# --------------------------------------------------------------------------- RAPL wraps

def run_rapl_wrap(quick: bool) -> list[dict[str, Any]]:
    rows = []
    seconds = 300 if quick else 600
    n = int(seconds / STEP)
    range_uj = 250_000_000  # 250 J
    for case, stall in (("rapl-wrap", False), ("rapl-wrap-stall", True)):
        work = Path(tempfile.mkdtemp(prefix="wattprint-acc-"))
        tree = PowercapTree(work / "powercap")
        zones = [tree.add_package(p, max_energy_range_uj=range_uj, start_uj=range_uj - 1000 * (p + 1))
                 for p in (0, 1)]
        rng = random.Random(11)
        pkg = [profile_stepped(n, rng, 60.0, 200.0) if not stall else [150.0] * n for _ in zones]
        dram = [profile_stepped(n, rng, 10.0, 30.0) for _ in zones]
        clock = Clock()
        engine = make_engine(work, [RaplSource(str(work / "powercap"))])
        engine.tick_blocking(clock.mono, clock.wall)
        fed = {"cpu": 0.0, "dram": 0.0}
        pending = {z[r]: 0 for z in zones for r in ("package", "dram")}  # µJ not yet written
        # the stalled variant skips the ticks at 101 s and 102 s (one 3 s interval)
        skip = {1010, 1020} if stall else set()
        wraps_before = 0
        last_tick = (n // PER_TICK) * PER_TICK
        for k in range(1, n + 1):
            for i, z in enumerate(zones):
                e_pkg = round(pkg[i][k - 1] * STEP * 1e6)
                e_dram = round(dram[i][k - 1] * STEP * 1e6)
                pending[z["package"]] += e_pkg
                pending[z["dram"]] += e_dram
                if k <= last_tick:
                    fed["cpu"] += e_pkg / 1e6
                    fed["dram"] += e_dram / 1e6
            clock.mono = 1000.0 + k * STEP
            clock.wall = START_WALL + k * STEP
            if k % PER_TICK == 0 and k not in skip:
                # the counters only matter when read: write what accumulated, in
                # advances below one range each (the counter itself wraps as often
                # as it must, the truth is what was fed)
                for zone, uj in pending.items():
                    while uj > 0:
                        step = min(uj, range_uj - 1)
                        tree.advance(zone, step)
                        uj -= step
                    pending[zone] = 0
                engine.tick_blocking(clock.mono, clock.wall)
        for st in engine.sources[0]._states:
            wraps_before += st.diff.wraps
        measured = {"cpu": 0.0, "dram": 0.0}
        for d in engine.snapshot.devices:
            measured[d.kind] += d.energy_j_total
        engine.close()
        note = (f"{seconds} s, range 250 J, {wraps_before} wraps corrected over the 4 zones" if not stall else
                "150 W, one read 3 s after the previous (450 J > 250 J range): a whole range is lost")
        rows.append(row(case, "package energy (2 packages)", fed["cpu"], measured["cpu"], "J", note))
        if not stall:
            rows.append(row(case, "dram energy (2 zones)", fed["dram"], measured["dram"], "J", note))
    return rows


# --------------------------------------------------------------------------- processes that come and go

def run_come_and_go(quick: bool) -> list[dict[str, Any]]:
    seconds = 150 if quick else 300
    n = int(seconds / STEP)
    work = Path(tempfile.mkdtemp(prefix="wattprint-acc-"))
    a = labelled("acc-a")
    bs: list[subprocess.Popen] = []
    try:
        clock = Clock()
        sim = work / "sim.json"
        live_b: dict[int, subprocess.Popen] = {}

        def write() -> None:
            procs = [proc(a.pid, sm_util=60)] + [proc(p.pid, sm_util=40) for p in live_b.values()]
            write_sim(sim, [gpu(0, power_w=250.0 if live_b else 100.0, processes=procs)])

        write()
        nvml = SimulatedNvml(str(sim), clock=lambda: clock.mono)
        engine = make_engine(work, [NvmlGpuSource(nvml, init_retry_s=0.0)])
        engine.tick_blocking(clock.mono, clock.wall)
        truth_a = truth_b = 0.0
        last_tick = (n // PER_TICK) * PER_TICK
        b_index = 0
        for k in range(1, n + 1):
            # the step just ended (k-1 .. k): its energy by the shares of who was present
            if k <= last_tick:
                if live_b:
                    truth_a += 250.0 * STEP * 0.6
                    truth_b += 250.0 * STEP * 0.4
                else:
                    truth_a += 100.0 * STEP
            clock.mono = 1000.0 + k * STEP
            clock.wall = START_WALL + k * STEP
            # B_j lives from 5j + 0.4 s to 5j + 2.9 s (steps 50j + 4 .. 50j + 29)
            phase = k % 50
            if phase == 4:
                p = labelled(f"acc-b-{b_index}")
                b_index += 1
                bs.append(p)
                live_b[p.pid] = p
            elif phase == 29 and live_b:
                for pid, p in list(live_b.items()):
                    kill(p)
                    del live_b[pid]
            if phase in (4, 29):
                write()
            nvml.nvmlDeviceGetCount()  # a utilisation sample every 0.1 s, as the driver keeps them
            if k % PER_TICK == 0:
                engine.tick_blocking(clock.mono, clock.wall)
        m_a = job_gpu_j(engine, {a.pid})
        m_b = job_gpu_j(engine, {p.pid for p in bs})
        engine.close()
        note = f"{seconds} s, {b_index} short jobs of 2.5 s"
        return [row("gpu-come-and-go", "long job A energy", truth_a, m_a, "J", note),
                row("gpu-come-and-go", "short jobs B energy (all)", truth_b, m_b, "J", note),
                row("gpu-come-and-go", "A + B energy", truth_a + truth_b, m_a + m_b, "J", note)]
    finally:
        kill(a)
        for p in bs:
            kill(p)


# --------------------------------------------------------------------------- CPU of children that exit between ticks

LEADER = r'''
import os, resource, sys, time
go, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
while not os.path.exists(go):
    time.sleep(0.01)
def cpu():
    s = resource.getrusage(resource.RUSAGE_SELF); c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime
c0 = cpu()
for i in range(n):
    pid = os.fork()
    if pid == 0:
        t = time.process_time()
        while time.process_time() - t < 0.12:
            pass
        os._exit(0)
    os.waitpid(pid, 0)
    time.sleep(0.05)
c1 = cpu()
with open(out, "w") as fh:
    fh.write(repr(c1 - c0))
time.sleep(3600)
'''


def run_cpu_children(quick: bool) -> list[dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="wattprint-acc-"))
    go, out = work / "go", work / "out"
    n = 20
    p = subprocess.Popen([sys.executable, "-c", LEADER, str(go), str(out), str(n)],
                         env={**env_clean(), "WATTPRINT_JOB": "acc-cpu"}, start_new_session=True)
    try:
        tracker = ProcessTracker()
        time.sleep(0.5)
        counted = 0.0
        started = False
        done_at: float | None = None
        t0 = time.monotonic()
        k = 0
        while True:
            k += 1
            time.sleep(max(0.0, t0 + 0.5 * k - time.monotonic()))
            view = tracker.observe(time.monotonic(), ())
            cpu = sum(j.cpu_s for j in view.jobs if j.identity.root_pid == p.pid)
            if started:
                counted += cpu
            elif k >= 2:  # the job is known: start the work after this tick
                go.touch()
                started = True
            if out.exists() and done_at is None:
                done_at = time.monotonic()
            if done_at is not None and time.monotonic() - done_at > 1.0:
                break
            if time.monotonic() - t0 > 60:
                raise RuntimeError("cpu-children: the job did not finish")
        truth = float(out.read_text())
        tracker.close()
        return [row("cpu-children", "job CPU seconds (20 children exit between ticks)", truth, counted, "s",
                    "ticks every 0.5 s; CPU time has 10 ms resolution per process")]
    finally:
        kill(p)


# --------------------------------------------------------------------------- time-varying intensity

def run_intensity(quick: bool, bucket_s: int = 60, counters: tuple[bool, ...] = (True, False)) -> list[dict[str, Any]]:
    from aiohttp import web  # noqa: F401  (the stand-in needs it)
    from eds_sim import STEP_S, EdsSim, default_actual, default_forecast
    from servers import BackgroundApp

    from wattprint.daemon.grid import make_provider
    from wattprint.daemon.grid.scheduler import GridFetcher

    seconds = 1200 if quick else 3600
    n = int(seconds / STEP)
    rows = []
    case = "intensity" if bucket_s == 60 else f"intensity-bucket{bucket_s}"
    for counter in counters:
        work = Path(tempfile.mkdtemp(prefix="wattprint-acc-"))
        clock = Clock()
        eds = EdsSim(now=lambda: clock.wall)
        server = BackgroundApp(eds.app())
        server.start()
        job = labelled("acc-carbon")
        try:
            profile = profile_stepped(n, random.Random(5), 60.0, 300.0)
            sim = work / "sim.json"

            def write(power: float) -> None:
                write_sim(sim, [gpu(0, power_w=power, energy_counter=counter, processes=[proc(job.pid, sm_util=90)])])

            write(profile[0])
            grid = GridConfig(provider="energidataservice", zone="DK1", base_url=server.url)
            now_dt = lambda: datetime.fromtimestamp(clock.wall, timezone.utc)  # noqa: E731
            provider = make_provider(grid, now=now_dt)
            book = IntensityBook(grid, provider.name, provider.zone)
            health = HealthBoard()
            nvml = SimulatedNvml(str(sim), clock=lambda: clock.mono)
            engine = make_engine(work, [NvmlGpuSource(nvml, init_retry_s=0.0)], book=book, bucket_s=bucket_s)

            def fetch() -> None:
                fetcher = GridFetcher(provider, lambda pts: book.update(pts, clock.wall), health, now=now_dt)
                asyncio.run(fetcher.run_once())
                if health.get("grid").state != "ok":
                    raise RuntimeError(f"grid fetch failed: {health.get('grid')}")

            eds.publish_until = START_WALL  # forecasts only, at first
            fetch()
            engine.tick_blocking(clock.mono, clock.wall)
            last_tick = (n // PER_TICK) * PER_TICK
            e_true = co2_actual = co2_forecast = 0.0
            for k in range(1, n + 1):
                if k <= last_tick:
                    e = profile[k - 1] * STEP
                    t_mid = START_WALL + (k - 0.5) * STEP
                    interval = t_mid - t_mid % STEP_S
                    e_true += e
                    co2_actual += e / J_PER_KWH * default_actual(interval)
                    co2_forecast += e / J_PER_KWH * default_forecast(interval)
                clock.mono = 1000.0 + k * STEP
                clock.wall = START_WALL + k * STEP
                if k < n and profile[k] != profile[k - 1]:
                    write(profile[k])
                    nvml.nvmlDeviceGetCount()
                if k % PER_TICK == 0:
                    engine.tick_blocking(clock.mono, clock.wall)
            [job_id] = [j.job_id for j in jobs_of(engine, {job.pid})]
            reader = LedgerReader(str(work / "store.sqlite3"))
            prov = reader.job(job_id, now=clock.wall)
            # The realised values arrive; the provider is asked one interval later (it only
            # asks for realised intervals that have begun), as the hourly fetch would be.
            clock.wall += STEP_S
            eds.publish_until = clock.wall
            fetch()
            engine.settle_blocking()
            final = reader.job(job_id, now=clock.wall)
            reader.close()
            engine.close()
            tag = "counter" if counter else "no counter"
            note = f"{seconds // 60} min, 5-min intensity 100-220 g/kWh, bucket_s {bucket_s}"
            rows.append(row(case, f"job energy ({tag})", e_true, final["energy_j"]["total"], "J", note))
            rows.append(row(case, f"job CO2e provisional ({tag}, status {prov['co2e_status']})",
                            co2_forecast, prov["co2e_g"], "g", note + "; truth with the forecast"))
            rows.append(row(case, f"job CO2e final ({tag}, status {final['co2e_status']})",
                            co2_actual, final["co2e_g"], "g", note + "; truth with the realised values"))
        finally:
            kill(job)
            server.stop()
    return rows


CASES: dict[str, Callable[[bool], list[dict[str, Any]]]] = {
    "gpu-profiles": run_gpu_profiles,
    "gpu-counter-reset": run_counter_reset,
    "rapl-wrap": run_rapl_wrap,
    "gpu-come-and-go": run_come_and_go,
    "cpu-children": run_cpu_children,
    "intensity": run_intensity,
    "intensity-bucket900": lambda quick: run_intensity(quick, bucket_s=900, counters=(True,)),
}
QUICK_SKIP = {"intensity-bucket900"}


def run(names: list[str] | None = None, quick: bool = False) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in names or [n for n in CASES if not (quick and n in QUICK_SKIP)]:
        t0 = time.monotonic()
        before = set(Path(tempfile.gettempdir()).glob("wattprint-acc-*"))
        try:
            rows += CASES[name](quick)
        finally:
            for d in set(Path(tempfile.gettempdir()).glob("wattprint-acc-*")) - before:
                shutil.rmtree(d, ignore_errors=True)
        print(f"[{time.strftime('%H:%M:%S')}] accuracy {name}: {time.monotonic() - t0:.1f} s",
              file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'case':<22} {'quantity':<58} {'truth':>14} {'measured':>14} {'error %':>9}"]
    for r in rows:
        lines.append(f"{r['case']:<22} {r['quantity'][:58]:<58} {r['truth']:>14.4f} {r['measured']:>14.4f} "
                     f"{r['error_pct']:>+9.4f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*", metavar="CASE", help=f"any of {', '.join(CASES)} (default: all)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case {unknown[0]!r}; known: {', '.join(CASES)}")
    rows = run(args.cases or None, args.quick)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
