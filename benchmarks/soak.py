"""Benchmark: a long soak in accelerated time (issue 7). Prints figures; not a test.

The engine runs in-process, built by the daemon's own ``build_engine`` from a config
(so retention and every other setting apply as in ``wattprint run``), over simulated
hardware on a simulated clock: one tick = ``--tick-s`` seconds (default 10) of
simulated time, for ``--days`` simulated days (default 7: 60,480 ticks).

- GPUs: two simulated NVML GPUs (300 W and 150 W, energy counters) whose simulated
  clock is the soak's clock; the live job processes are spread over them.
- CPU/DRAM: a powercap tree whose package and dram counters advance by rate x tick
  (60 W, 8 W) before every tick (they wrap now and then).
- Jobs: ``--jobs`` (default 5,000) short REAL processes (``sleep``), each with a
  random ``WATTPRINT_JOB`` label (a third reused from a pool, so labels repeat; many
  with hostile characters: quotes, backslashes, newlines, commas, ``=``, braces,
  control characters, RTL override, emoji, undecodable bytes, 300-character strings).
  They are started in batches once a simulated minute, so about ``--alive`` (default
  6) are alive at each tick, and each is killed after a random 1..2*mean ticks.

Every ``--sample-hours`` (default 6) of simulated time it records the process RSS,
the native heaps tracemalloc cannot see (glibc malloc in use and free, SQLite's own
heap), open files and threads, tracemalloc's live Python heap (on by default; it
makes ticks about 4x slower, so ``--no-tracemalloc`` for CPU figures), the samples
and job samples in a ``render()`` of the daemon's Prometheus registry, the store's
size on disk (database + WAL), its pages in use and rows, and tick CPU time (process
CPU per ``tick_blocking`` call). The soak's own bookkeeping is fixed-size (a PID
bitmap, a histogram of tick times), so nothing it holds grows with time.

Retention: the config sets ``[daemon] retention_days = --retention-days`` (default
1) and the engine prunes hourly, as in the daemon (where an engine without
``retention_days`` but a ``Ledger.prune`` is found, the soak calls that hourly
instead; with neither, the store just grows and the summary says so). What happened
is measured, not assumed: the summary shows the age of the oldest bucket left.

At the end it checks what it can: every spawned job found under its label (all of
them when nothing was pruned), device energy = power x simulated time, jobs +
unattributed = devices per component, the final exposition parses.

Run it in its own PID namespace so that other processes (and other labelled jobs)
on the machine stay out of its figures:
    unshare --pid --fork --mount-proc .venv/bin/python benchmarks/soak.py

Usage: python benchmarks/soak.py [--days 7] [--tick-s 10] [--jobs 5000] [--alive 6]
       [--retention-days 1] [--sample-hours 6] [--seed N] [--no-tracemalloc] [--json FILE] [--keep]
"""

from __future__ import annotations

import argparse
import array
import ctypes
import gc
import inspect
import json
import math
import logging
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from gpusim import gpu, proc, write_sim  # noqa: E402
from powercap import PowercapTree  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import wattprint.daemon.app as app_module  # noqa: E402
from wattprint.daemon.app import build_engine, store_path  # noqa: E402
from wattprint.daemon.config import load_config  # noqa: E402
from wattprint.daemon.engine import Engine  # noqa: E402
from wattprint.daemon.health import HealthBoard  # noqa: E402
from wattprint.daemon.sources.gpu import NvmlGpuSource  # noqa: E402
from wattprint.daemon.sources.gpu.registry import GpuOpening  # noqa: E402
from wattprint.daemon.sources.nvml_sim import SimulatedNvml  # noqa: E402
from wattprint.exporters.prometheus import build_registry, render  # noqa: E402

GPU_W = (300.0, 150.0)
PKG_W, DRAM_W = 60.0, 8.0
DAY_S = 86_400.0
# Simulated wall time starts at the last full hour (job start times come from /proc: real time).
START_WALL = float(int(time.time()) // 3600 * 3600)
HOSTILE = [
    '"', "\\", "\n", "\r", "\t", ",", "=", " ", "{", "}", "#", "'", "$", "${HOME}", ";", "\x01", "\x1b[31m",
    "\x7f", "é", "中文", "🔥", "\u202e", "\u200b", "\udcff", "\\n", '"}', 'x="y"', "a,b=c d",
    "job_energy,host=evil joules=1 0", "') OR 1=1 --", "</script>", "%s%n", "../../etc/passwd",
]
OWN_FILTERS = [tracemalloc.Filter(False, __file__), tracemalloc.Filter(False, tracemalloc.__file__)]
ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"


def hostile_label(rng: random.Random) -> str:
    """A random non-empty label: plain, hostile, or very long."""
    kind = rng.random()
    if kind < 0.3:
        return "".join(rng.choice(ALNUM) for _ in range(rng.randint(1, 40)))
    if kind < 0.9:
        parts = [rng.choice(HOSTILE) if rng.random() < 0.5 else rng.choice(ALNUM) * rng.randint(1, 5)
                 for _ in range(rng.randint(1, 12))]
        return "".join(parts) or "x"
    return "".join(rng.choice(ALNUM + "".join(HOSTILE[:12])) for _ in range(rng.randint(65, 300)))


@dataclass
class Sample:
    sim_h: float
    jobs_started: int
    alive: int
    rss_mib: float
    traced_mib: float
    sqlite_mib: float
    malloc_used_mib: float
    malloc_free_mib: float
    fds: int
    threads: int
    series: int
    job_series: int
    render_ms: float
    store_mib: float
    store_used_mib: float
    job_rows: int
    bucket_rows: int
    oldest_bucket_h: float
    tick_cpu_ms_mean: float
    tick_cpu_ms_p50: float
    tick_cpu_ms_p99: float
    tick_cpu_ms_max: float


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def native_heap() -> tuple[float, float, float]:
    """(SQLite's own heap, glibc malloc in use, glibc malloc free but held) in MiB:
    what RSS holds that tracemalloc does not see. NaN where unavailable."""
    nan = float("nan")
    try:
        lib = ctypes.CDLL("libsqlite3.so.0")
        lib.sqlite3_memory_used.restype = ctypes.c_int64
        sqlite_mib = lib.sqlite3_memory_used() / 2**20
    except (OSError, AttributeError):
        sqlite_mib = nan
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        m = libc.mallinfo2()
        return sqlite_mib, (m.uordblks + m.hblkhd) / 2**20, m.fordblks / 2**20
    except (OSError, AttributeError):
        return sqlite_mib, nan, nan


def file_mib(path: str) -> float:
    return sum(os.path.getsize(p) for p in (path, path + "-wal", path + "-shm") if os.path.exists(p)) / 2**20


def traced_mib() -> float:
    """Python memory allocated and still alive, by everything but this script's own
    bookkeeping (its arrays of figures and PIDs, its sample list)."""
    if not tracemalloc.is_tracing():
        return float("nan")
    snap = tracemalloc.take_snapshot().filter_traces(OWN_FILTERS)
    return sum(stat.size for stat in snap.statistics("filename")) / 2**20


class TickStats:
    """Tick CPU times in a fixed-size histogram (log bins, 0.5% wide, 1 us .. 100 s),
    so keeping them costs the same on day 28 as on day 1: the soak's own memory must
    not grow, or it would show as the daemon's."""

    LO_MS, RATIO, BINS = 1e-3, 1.005, 3700

    def __init__(self) -> None:
        self.counts = array.array("q", bytes(8 * self.BINS))
        self.n = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, ms: float) -> None:
        i = 0 if ms <= self.LO_MS else min(self.BINS - 1, int(math.log(ms / self.LO_MS, self.RATIO)) + 1)
        self.counts[i] += 1
        self.n += 1
        self.total += ms
        self.max = max(self.max, ms)

    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")

    def quantile(self, q: float) -> float:
        want, seen = q * self.n, 0
        for i, c in enumerate(self.counts):
            seen += c
            if c and seen >= want:
                return self.LO_MS * self.RATIO ** i
        return float("nan")


def pct(values, q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else float("nan")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores, {cpu}, Linux {platform.release()}, Python {platform.python_version()}"


class Retention:
    """How the store is pruned in this run: by the engine itself (``Engine.retention_days``,
    set from ``[daemon] retention_days``), by calling ``Ledger.prune`` hourly as the
    engine would, or not at all (retention pending)."""

    def __init__(self, engine: Engine, days: float):
        self.engine = engine
        self.keep_s = days * DAY_S
        self.prune = getattr(engine.ledger, "prune", None)
        self.by_engine = any(f.name == "retention_days" for f in fields(Engine))
        # Does the daemon's build_engine hand [daemon] retention_days to the engine?
        self.wired = self.by_engine and "retention_days" in inspect.getsource(build_engine)
        if self.by_engine and getattr(engine, "retention_days") != days:
            setattr(engine, "retention_days", days)  # as build_engine would from the config
        self.mode = ("engine (Engine.retention_days" + ("" if self.wired else ", set by the soak: build_engine "
                                                           "does not pass [daemon] retention_days yet") + ")"
                     if self.by_engine else "Ledger.prune, called hourly by the soak" if self.prune
                     else "pending (no Ledger.prune yet)")
        self.calls = 0

    def hourly(self, wall: float) -> None:
        if self.by_engine or self.prune is None:
            return
        params = list(inspect.signature(self.prune).parameters)
        cutoff = wall - self.keep_s
        kwargs: dict[str, float] = {}
        for name in params:
            low = name.lower()
            if "day" in low:
                kwargs[name] = self.keep_s / DAY_S
            elif any(k in low for k in ("before", "cutoff", "older", "until")):
                kwargs[name] = cutoff
            elif "now" in low or "wall" in low:
                kwargs[name] = wall
            elif "retention" in low or "keep" in low or low.endswith("_s"):
                kwargs[name] = self.keep_s
        if len(kwargs) != len(params):
            raise SystemExit(f"soak: do not know how to call Ledger.prune{inspect.signature(self.prune)}")
        self.prune(**kwargs)
        self.calls += 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--days", type=float, default=7.0)
    ap.add_argument("--tick-s", type=float, default=10.0)
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--alive", type=float, default=6.0, help="mean number of live jobs at a tick")
    ap.add_argument("--retention-days", type=float, default=1.0)
    ap.add_argument("--sample-hours", type=float, default=6.0)
    ap.add_argument("--batch-s", type=float, default=60.0, help="jobs are started in batches this often")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--no-tracemalloc", action="store_true")
    ap.add_argument("--json", help="write the samples and the summary here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (store, sim file)")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    ticks = int(round(args.days * DAY_S / args.tick_s))
    batch_ticks = max(1, int(round(args.batch_s / args.tick_s)))
    mean_life = max(1.0, args.alive * ticks / args.jobs)
    sample_every = max(1, int(round(args.sample_hours * 3600 / args.tick_s)))
    hour_ticks = max(1, int(round(3600 / args.tick_s)))
    day_ticks = int(round(DAY_S / args.tick_s))
    day1_snapshot = None
    # Job j starts in the batch at or after a uniformly random tick; lives 1..2*mean-1 ticks.
    starts = sorted(rng.randrange(ticks) for _ in range(args.jobs))
    print(f"soak: seed {seed}; {args.days:g} simulated days = {ticks} ticks of {args.tick_s:g} s; "
          f"{args.jobs} jobs (mean life {mean_life:.0f} ticks, ~{args.alive:g} alive), batches every "
          f"{batch_ticks} ticks; retention_days {args.retention_days:g}; tracemalloc "
          f"{'off' if args.no_tracemalloc else 'on'}", flush=True)
    print(f"soak: machine: {machine()}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="wattprint-soak-"))
    tree = PowercapTree(tmp / "powercap")
    zones = tree.add_package(0, max_energy_range_uj=65_532_610_987, dram=True)
    sim = tmp / "sim.json"
    write_sim(sim, [gpu(i, power_w=w) for i, w in enumerate(GPU_W)])
    cfg_path = tmp / "wattprint.toml"
    cfg_path.write_text("\n".join([
        "[daemon]", f'state_dir = "{tmp / "state"}"', 'host = "soak"', f"interval_s = {args.tick_s}",
        f"retention_days = {args.retention_days}", 'log_level = "warning"',
        "[gpu]", 'backend = "sim"', f'sim_file = "{sim}"',
        "[cpu]", 'source = "rapl"', f'powercap_root = "{tmp / "powercap"}"', "[memory]", 'source = "rapl"',
    ]) + "\n")
    cfg = load_config(str(cfg_path), env={})
    clock = {"mono": 1_000.0, "wall": START_WALL}
    if not args.no_tracemalloc:
        tracemalloc.start()
    # The daemon's own assembly, with the GPU collector's simulated NVML on the soak's clock.
    app_module.open_gpu_sources = lambda gpu_cfg: [GpuOpening(
        "gpu", NvmlGpuSource(SimulatedNvml(gpu_cfg.sim_file, clock=lambda: clock["mono"]), init_retry_s=0.0),
        "GPU: simulated NVML on the soak's clock")]
    engine = build_engine(cfg, HealthBoard())
    registry = build_registry(lambda: engine.snapshot)
    retention = Retention(engine, args.retention_days)
    print(f"soak: retention: {retention.mode}", flush=True)
    db = store_path(cfg)

    env_base = {k: v for k, v in os.environ.items() if not k.startswith("WATTPRINT_") and k != "SLURM_JOB_ID"}
    pool = [hostile_label(rng) for _ in range(50)]
    alive: dict[int, tuple[subprocess.Popen, int]] = {}  # pid -> (process, last tick)
    # A fixed bitmap of the PIDs spawned: the soak's own bookkeeping must not grow.
    with open("/proc/sys/kernel/pid_max") as fh:
        spawned_pids = bytearray(int(fh.read()) // 8 + 1)
    next_job = 0
    samples: list[Sample] = []
    window: list[float] = []
    all_ticks = TickStats()
    day_means: list[float] = []  # mean tick CPU of each simulated day
    day_total, day_n = 0.0, 0
    peak_alive = 0
    hostile_labels = 0
    t_begin = time.monotonic()
    real_begin = time.time()
    cpu_begin = time.process_time()

    def take_sample(k: int) -> None:
        gc.collect()
        t = time.perf_counter()
        body = render(registry)[0].decode()
        render_ms = (time.perf_counter() - t) * 1000
        lines = [ln for ln in body.splitlines() if ln and not ln.startswith("#")]
        conn = engine.ledger.conn
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        used = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
        job_rows = conn.execute("SELECT count(*) FROM jobs").fetchone()[0]
        bucket_rows = sum(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                          for t in ("job_buckets", "device_buckets", "unattributed_buckets", "bucket_intensity"))
        oldest = conn.execute("SELECT min(bucket_start) FROM device_buckets").fetchone()[0]
        native = native_heap()
        samples.append(Sample(
            sim_h=(clock["wall"] - START_WALL) / 3600, jobs_started=next_job, alive=len(alive),
            rss_mib=rss_mib(), traced_mib=traced_mib(), sqlite_mib=native[0], malloc_used_mib=native[1],
            malloc_free_mib=native[2], fds=len(os.listdir("/proc/self/fd")), threads=len(os.listdir("/proc/self/task")),
            series=len(lines), job_series=sum(ln.startswith("wattprint_job_") for ln in lines), render_ms=render_ms,
            store_mib=file_mib(db), store_used_mib=used * page / 2**20, job_rows=job_rows, bucket_rows=bucket_rows,
            oldest_bucket_h=((clock["wall"] - oldest) / 3600) if oldest is not None else 0.0,
            tick_cpu_ms_mean=statistics.fmean(window) if window else float("nan"), tick_cpu_ms_p50=pct(window, 0.5),
            tick_cpu_ms_p99=pct(window, 0.99), tick_cpu_ms_max=max(window) if window else float("nan"),
        ))
        s = samples[-1]
        print(f"  {s.sim_h:6.1f} h  jobs {s.jobs_started:5d} alive {s.alive:2d}  RSS {s.rss_mib:6.1f} MiB  "
              f"traced {s.traced_mib:5.2f} sqlite {s.sqlite_mib:4.2f} malloc {s.malloc_used_mib:5.2f}+{s.malloc_free_mib:4.2f} MiB  "
              f"fds {s.fds} threads {s.threads}  series {s.series:4d} (jobs {s.job_series:3d})  "
              f"store {s.store_mib:6.2f} MiB (used {s.store_used_mib:6.2f}) rows {s.job_rows:5d}+{s.bucket_rows:7d}  "
              f"oldest {s.oldest_bucket_h:5.1f} h  tick CPU ms mean {s.tick_cpu_ms_mean:5.2f} p99 {s.tick_cpu_ms_p99:5.2f}",
              flush=True)
        window.clear()

    try:
        for k in range(ticks):
            # Jobs: kill those whose time is up, start the batch that is due.
            for pid in [pid for pid, (_, last) in alive.items() if last < k]:
                p, _ = alive.pop(pid)
                p.kill()
                p.wait()
            if k % batch_ticks == 0:
                while next_job < len(starts) and starts[next_job] < k + batch_ticks:
                    label = rng.choice(pool) if rng.random() < 0.33 else hostile_label(rng)
                    hostile_labels += any(ch not in ALNUM for ch in label)
                    env = dict(env_base, WATTPRINT_JOB=label)
                    p = subprocess.Popen(["sleep", "1000000"], env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    life = rng.randint(1, max(1, int(2 * mean_life) - 1))
                    alive[p.pid] = (p, k + life - 1)
                    spawned_pids[p.pid >> 3] |= 1 << (p.pid & 7)
                    next_job += 1
            peak_alive = max(peak_alive, len(alive))
            # Hardware: the GPUs list the live job processes; the powercap counters advance.
            pids = sorted(alive)
            write_sim(sim, [gpu(i, power_w=w, processes=[proc(pid, used_memory_bytes=(1 + pid % 8) << 28,
                                                              sm_util=10 + pid % 90)
                                                         for j, pid in enumerate(pids) if j % len(GPU_W) == i])
                            for i, w in enumerate(GPU_W)])
            tree.advance(zones["package"], int(PKG_W * args.tick_s * 1e6))
            tree.advance(zones["dram"], int(DRAM_W * args.tick_s * 1e6))
            clock["mono"] += args.tick_s
            clock["wall"] += args.tick_s
            c0 = time.process_time()
            engine.tick_blocking(clock["mono"], clock["wall"])
            dt_ms = (time.process_time() - c0) * 1000
            window.append(dt_ms)
            all_ticks.add(dt_ms)
            day_total, day_n = day_total + dt_ms, day_n + 1
            if (k + 1) % day_ticks == 0:
                day_means.append(day_total / day_n)
                day_total, day_n = 0.0, 0
            if (k + 1) % hour_ticks == 0:
                retention.hourly(clock["wall"])
            if (k + 1) % sample_every == 0 or k == ticks - 1:
                take_sample(k)
            if k + 1 == day_ticks and tracemalloc.is_tracing():
                day1_snapshot = tracemalloc.take_snapshot()
    finally:
        for p, _ in alive.values():
            p.kill()
            p.wait()

    elapsed = time.monotonic() - t_begin
    growth_sites: list[str] = []
    if day1_snapshot is not None:
        gc.collect()
        end = tracemalloc.take_snapshot().filter_traces(OWN_FILTERS)
        diff = end.compare_to(day1_snapshot.filter_traces(OWN_FILTERS), "lineno")
        growth_sites = [f"{d.size_diff / 1024:+.1f} KiB ({d.count_diff:+d} blocks) {d.traceback[0].filename.split('/')[-1]}:"
                        f"{d.traceback[0].lineno}" for d in diff[:8] if d.size_diff > 0]
    cpu_total = time.process_time() - cpu_begin
    snap = engine.snapshot
    assert snap is not None
    conn = engine.ledger.conn
    # Checks.
    text = render(registry)[0].decode()
    families = list(text_string_to_metric_families(text))  # raises if the exposition is broken
    sim_s = (ticks - 1) * args.tick_s  # the first tick is the counters' baseline
    gpu_expected = sum(GPU_W) * sim_s
    gpu_measured = sum(d.energy_j_total for d in snap.devices if d.kind == "gpu")
    cpu_measured = sum(d.energy_j_total for d in snap.devices if d.kind == "cpu")
    att = dict(conn.execute("SELECT component, SUM(energy_j) FROM job_buckets GROUP BY component").fetchall())
    una = dict(conn.execute("SELECT component, SUM(energy_j) FROM unattributed_buckets GROUP BY component").fetchall())
    dev = dict(conn.execute("SELECT kind, SUM(energy_j) FROM device_buckets GROUP BY kind").fetchall())
    conservation = {c: (att.get(c, 0.0) + una.get(c, 0.0)) / dev[c] - 1 for c in dev}
    # Jobs found: rows for the spawned processes (root_pid; started after the soak began, real time).
    conn.execute("CREATE TEMP TABLE spawned (pid INTEGER PRIMARY KEY)")
    pid_list = [i * 8 + b for i, byte in enumerate(spawned_pids) if byte for b in range(8) if byte >> b & 1]
    conn.executemany("INSERT INTO temp.spawned VALUES (?)", [(p,) for p in pid_list])
    jobs_in_store = conn.execute("SELECT count(*) FROM jobs WHERE root_pid IN (SELECT pid FROM temp.spawned) "
                                 "AND started_at >= ?", (real_begin - 1,)).fetchone()[0]
    distinct_pids = len(pid_list)
    # Every spawned job carries a label: a job found any other way (process group) means
    # a labelled process was not recognised as such.
    other_jobs = [tuple(r) for r in conn.execute(
        "SELECT id, command, label_source FROM jobs WHERE label_source != 'WATTPRINT_JOB' AND started_at >= ? - 60",
        (real_begin,))]
    sizes = dict(conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetchall())
    oldest = conn.execute("SELECT min(bucket_start) FROM device_buckets").fetchone()[0]
    pruned = oldest is not None and oldest > START_WALL + 3600
    engine.close()

    # Figures.
    first_day = [s for s in samples if s.sim_h <= 24.0 + 1e-9]
    later = [s for s in samples if s.sim_h > 24.0 + 1e-9] or samples
    per_day_mib = ((samples[-1].store_used_mib - first_day[-1].store_used_mib) / ((samples[-1].sim_h - first_day[-1].sim_h) / 24)
                   if samples[-1].sim_h > first_day[-1].sim_h else float("nan"))
    job_bytes = sum(v for k, v in sizes.items() if k.startswith(("jobs", "job_buckets", "sqlite_autoindex_jobs")))
    summary = {
        "seed": seed, "machine": machine(), "simulated_days": args.days, "tick_s": args.tick_s, "ticks": ticks,
        "jobs_started": next_job, "hostile_labels": hostile_labels, "peak_alive": peak_alive,
        "wall_s": round(elapsed, 1), "cpu_s": round(cpu_total, 1), "tracemalloc": not args.no_tracemalloc,
        "retention": retention.mode, "retention_days": args.retention_days, "pruned": pruned,
        "oldest_bucket_age_h": samples[-1].oldest_bucket_h,
        "rss_mib_day1_max": max(s.rss_mib for s in first_day), "rss_mib_after_day1_max": max(s.rss_mib for s in later),
        "rss_mib_end": samples[-1].rss_mib,
        "traced_mib_day1_max": max(s.traced_mib for s in first_day),
        "traced_mib_after_day1_max": max(s.traced_mib for s in later), "traced_mib_end": samples[-1].traced_mib,
        "sqlite_mib_day1_end": first_day[-1].sqlite_mib, "sqlite_mib_end": samples[-1].sqlite_mib,
        "malloc_used_mib_day1_end": first_day[-1].malloc_used_mib, "malloc_used_mib_end": samples[-1].malloc_used_mib,
        "malloc_free_mib_day1_end": first_day[-1].malloc_free_mib, "malloc_free_mib_end": samples[-1].malloc_free_mib,
        "fds_max": max(s.fds for s in samples), "threads_max": max(s.threads for s in samples),
        "series_max": max(s.series for s in samples), "series_min": min(s.series for s in samples),
        "job_series_max": max(s.job_series for s in samples), "render_ms_max": max(s.render_ms for s in samples),
        "store_mib_end": samples[-1].store_mib, "store_used_mib_end": samples[-1].store_used_mib,
        "store_used_mib_day1": first_day[-1].store_used_mib, "store_used_growth_mib_per_day_after_day1": per_day_mib,
        "job_rows_end": samples[-1].job_rows, "jobs_in_store": jobs_in_store, "distinct_pids": distinct_pids,
        "jobs_not_found_by_label": [" ".join(map(str, r)) for r in other_jobs],
        "store_bytes_by_table": sizes,
        "store_bytes_per_job": (job_bytes / samples[-1].job_rows) if samples[-1].job_rows else None,
        "tick_cpu_ms_mean": all_ticks.mean(), "tick_cpu_ms_p50": all_ticks.quantile(0.5),
        "tick_cpu_ms_p99": all_ticks.quantile(0.99), "tick_cpu_ms_max": all_ticks.max,
        "tick_cpu_ms_mean_first_day": day_means[0] if day_means else all_ticks.mean(),
        "tick_cpu_ms_mean_last_day": day_means[-1] if day_means else all_ticks.mean(),
        "gpu_energy_rel_error": gpu_measured / gpu_expected - 1,
        "cpu_energy_rel_error": cpu_measured / (PKG_W * sim_s) - 1,
        "conservation_rel_error": conservation,
        "metric_families": len(families),
        "traced_growth_sites_after_day1": growth_sites,
    }
    print("\nsoak summary")
    for key, value in summary.items():
        if key == "store_bytes_by_table":
            value = ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sorted(value.items(), key=lambda kv: -kv[1]) if v >= 2**16)
        elif isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, list):
            value = "".join(f"\n      {v}" for v in value) or "none"
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {v:.2e}" for k, v in value.items())
        print(f"  {key}: {value}")
    if args.keep:
        print(f"soak: kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "samples": [s.__dict__ for s in samples]}, indent=1))
    ok = abs(summary["gpu_energy_rel_error"]) < 1e-6 and all(abs(v) < 1e-9 for v in conservation.values())
    if not ok:
        print("soak: energy or conservation check FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
