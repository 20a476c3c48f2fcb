"""Crash safety: a loop of SIGKILLs at random moments of the real daemon.

A real labelled job runs on a simulated GPU at a known power, and a powercap tree
advances at known package and DRAM rates. The real ``wattprint run`` process is
started and killed with SIGKILL again and again, at random moments (seeded; the seed
and every delay are printed, and ``WATTPRINT_CRASH_SEED=N`` replays a run). Most kills
come 0.2-2.5 s after the daemon published its first tick; about one in five comes
0.2-2.5 s after the process was spawned, so it can land in the middle of start-up
(imports, opening the store, restoring running jobs, the first tick).

After every kill, reading the store directly (read-only):
- ``PRAGMA integrity_check`` is ``ok``;
- the job is still one row with the same id, still ``running``;
- its totals never went backwards (against the previous kill and against everything
  the API and /metrics showed before this kill);
- what was lost is at most the last seconds: for the job's GPU energy and for each
  device (GPU, RAPL package, RAPL dram), the energy booked since the previous kill is
  at least power x (time covered) minus power x (downtime + 1.5 s), where downtime runs
  from the kill of the run that wrote the previous state to the next run's first tick,
  and the 1.5 s is the tick in flight (one interval plus the tick's own duration);
  and it is at most power x (time covered): nothing is counted twice.

- every run that published its second tick (``/healthz`` tick >= 2, read just before
  the kill) booked job energy and stored that tick: a run may book nothing only when
  it was killed before its second tick (the first tick is the counters' baseline);
- the unattributed GPU energy is exactly the invisible process's 20 % share (the job's
  process at 80 % SM, memory "not available", shares gpu0 with it).

After every restart, through the HTTP API and /metrics: the same job id (one job with
this label), ``running``, totals never below what the store held at the kill and
never going backwards while the daemon runs.

At the end, over 6 ticks of a final run (polled, no fixed sleep): the job's GPU, CPU
and DRAM energy in absolute joules against truth from what the test controls
(tests/e2e_truth.py), unattributed CPU against its own expected value; then, as extra
checks, jobs + unattributed = devices for each component, per ledger bucket in the
store and in total through ``/api/v1/host``; and a clean SIGTERM stop exits 0.
"""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from daemon_harness import DaemonProcess, current_tick, sample
from e2e_truth import CPU_ABS_S, CPU_REL, INVISIBLE_PID, descendants, follow
from gpusim import gpu, proc, write_sim
from powercap import PowercapTree

GPU_W, PKG_W, DRAM_W = 200.0, 40.0, 6.0
RATES = {"gpu": GPU_W, "cpu": PKG_W, "dram": DRAM_W}
# The job's GPU process at 80 % SM (memory not available) shares gpu0 with an invisible
# process at 20 %: the job gets 80 % of the GPU, the other 20 % stays unattributed.
JOB_GPU_W = 0.8 * GPU_W
LABEL_VAR = f"WATTPRINT_E2E_{os.getpid()}"  # only this test's job carries it
CRASHES = int(os.environ.get("WATTPRINT_CRASHES", "20"))
TICK_IN_FLIGHT_S = 1.5  # what a crash may lose besides the downtime: the tick in flight
SLACK_S = 0.2  # timing jitter between the wall clock of a tick and its counter reads
POLL_S = 0.25
# The job: a light duty cycle (about 10% of a core), so it has CPU and DRAM shares too.
JOB_CODE = (
    "import time\n"
    "buf = bytearray(32 << 20)\n"
    "while True:\n"
    "    t = time.monotonic()\n"
    "    while time.monotonic() - t < 0.005: pass\n"
    "    time.sleep(0.045)\n"
)


@dataclass
class StoreState:
    """What the store holds right after a kill."""

    job_rows: list[tuple]
    job_j: dict[str, float]
    last_seen: float
    device_j: dict[str, float]
    unattributed_j: dict[str, float]


@dataclass
class Seen:
    """The highest job totals the API and /metrics have shown so far."""

    api: dict[str, float] = field(default_factory=lambda: {"gpu": 0.0, "cpu": 0.0, "dram": 0.0})
    metrics: dict[str, float] = field(default_factory=lambda: {"gpu": 0.0, "cpu": 0.0, "dram": 0.0})


def read_store(path: Path, label: str) -> StoreState:
    """Open the store read-only (no checkpoint, no repair: what the next daemon finds)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        check = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        assert check == ["ok"], f"store corrupt after SIGKILL: {check}"
        rows = conn.execute(
            "SELECT id, state, last_seen, gpu_j, cpu_j, dram_j FROM jobs WHERE label = ?", (label,)).fetchall()
        devices = dict(conn.execute("SELECT kind, SUM(energy_j) FROM device_buckets GROUP BY kind").fetchall())
        unattributed = dict(conn.execute("SELECT component, SUM(energy_j) FROM unattributed_buckets "
                                         "GROUP BY component").fetchall())
    finally:
        conn.close()
    job_j = {"gpu": rows[0][3], "cpu": rows[0][4], "dram": rows[0][5]} if rows else {c: 0.0 for c in RATES}
    last_seen = rows[0][2] if rows else 0.0
    return StoreState(rows, job_j, last_seen, {k: float(devices.get(k, 0.0)) for k in RATES},
                      {k: float(unattributed.get(k, 0.0)) for k in RATES})


def conservation_per_bucket(path: Path) -> int:
    """Assert jobs + unattributed = devices for every (bucket, component); return buckets checked."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        dev = {(b, k): e for b, k, e in conn.execute(
            "SELECT bucket_start, kind, SUM(energy_j) FROM device_buckets GROUP BY bucket_start, kind")}
        att = {(b, c): e for b, c, e in conn.execute(
            "SELECT bucket_start, component, SUM(energy_j) FROM job_buckets GROUP BY bucket_start, component")}
        un = {(b, c): e for b, c, e in conn.execute(
            "SELECT bucket_start, component, energy_j FROM unattributed_buckets")}
    finally:
        conn.close()
    assert set(att) <= set(dev) and set(un) <= set(dev), "energy booked in a bucket with no device energy"
    for key, device_j in dev.items():
        booked = att.get(key, 0.0) + un.get(key, 0.0)
        assert booked == pytest.approx(device_j, rel=1e-9, abs=1e-6), f"bucket {key}: {booked} != {device_j}"
    return len({b for b, _ in dev})


def spawn(daemon: DaemonProcess) -> subprocess.Popen:
    """Start the daemon process without waiting for it (DaemonProcess.start waits)."""
    with open(daemon.log_path, "ab") as log:
        daemon.proc = subprocess.Popen(
            [sys.executable, "-m", "wattprint.daemon", "run", "--config", str(daemon.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=daemon.env,
        )
    return daemon.proc


def first_tick_seen(daemon: DaemonProcess, deadline: float) -> float | None:
    """Poll /healthz until the first tick is published (return that moment) or ``deadline``."""
    while time.monotonic() < deadline:
        assert daemon.proc is not None
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited by itself ({daemon.proc.returncode}):\n{daemon.log_tail()}")
        try:
            if daemon.get("/healthz", allow_error=True).get("tick", 0) >= 1:
                return time.time()
        except OSError:
            pass
        time.sleep(0.02)
    return None


def jobs_labelled(daemon: DaemonProcess, label: str) -> list[dict]:
    return daemon.get(f"/api/v1/jobs?label={urllib.parse.quote(label, safe='')}&limit=10000")["jobs"]


def wait_for_job(daemon: DaemonProcess, label: str, timeout_s: float = 20.0) -> dict:
    """The running job with this label once it has energy (found by label, not among
    the newest 100 jobs: other labelled processes on the machine may be newer)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for job in jobs_labelled(daemon, label):
            if job["state"] == "running" and job["energy_j"]["total"] > 0:
                return job
        time.sleep(0.2)
    raise AssertionError(f"job {label!r} not seen in {timeout_s} s:\n{daemon.log_tail()}")


def job_metrics(daemon: DaemonProcess, job: dict) -> dict[str, float]:
    m = daemon.metrics()
    labels = {"job_id": job["id"], "label": job["label"], "user": job["user"]}
    return {c: sample(m, "wattprint_job_energy_joules_total", kind=c, **labels) for c in RATES}


def check_api(daemon: DaemonProcess, label: str, job_id: str, floor: dict[str, float], seen: Seen, why: str) -> dict:
    """The job through the API and /metrics: same id, running, never below ``floor``
    (the store at the last kill) nor below what was shown before."""
    jobs = jobs_labelled(daemon, label)
    assert [j["id"] for j in jobs] == [job_id], f"{why}: job identity changed: {jobs}"
    job = jobs[0]
    assert job["state"] == "running", f"{why}: {job}"
    mets = job_metrics(daemon, job)
    for c in RATES:
        api_j, met_j = job["energy_j"][c], mets[c]
        assert api_j >= floor[c] - 1e-6, f"{why}: API {c} {api_j} below the store at the kill {floor[c]}"
        assert api_j >= seen.api[c] - 1e-6, f"{why}: API {c} went backwards {seen.api[c]} -> {api_j}"
        assert met_j >= floor[c] - 1e-6, f"{why}: /metrics {c} {met_j} below the store at the kill {floor[c]}"
        assert met_j >= seen.metrics[c] - 1e-6, f"{why}: /metrics {c} went backwards {seen.metrics[c]} -> {met_j}"
        seen.api[c], seen.metrics[c] = api_j, met_j
    return job


@pytest.fixture
def job_process(labelled_process):
    label = f"crash-loop-{os.getpid()}"
    return labelled_process(label, variable=LABEL_VAR, code=JOB_CODE), label


@pytest.mark.slow
def test_sigkill_loop_totals_never_go_backwards_and_lose_at_most_the_last_seconds(tmp_path, job_process):
    seed = int(os.environ.get("WATTPRINT_CRASH_SEED") or random.SystemRandom().randrange(1 << 32))
    rng = random.Random(seed)
    print(f"\ncrash loop: seed {seed} ({CRASHES} SIGKILLs; replay with WATTPRINT_CRASH_SEED={seed})", flush=True)
    job_p, label = job_process

    tree = PowercapTree(tmp_path / "powercap")
    zones = tree.add_package(0, max_energy_range_uj=50_000_000, dram=True)  # the package wraps every 1.25 s
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=GPU_W, processes=[proc(job_p.pid, used_memory_bytes=None, sm_util=80),
                                                     proc(INVISIBLE_PID, used_memory_bytes=None, sm_util=20)])])
    # Small buckets: crashes land in many of them, some mid-bucket. Other tests and
    # benchmarks may run many labelled processes on this machine meanwhile: lift the
    # per-user label bound so this job keeps its label, and look it up by label.
    daemon = DaemonProcess(tmp_path, sim_file=sim, powercap_root=tmp_path / "powercap",
                           daemon_toml="bucket_s = 5", env={"WATTPRINT_JOBS_MAX_LABELS_PER_USER": "100000"},
                           extra_toml=f'[jobs]\nlabel_env = ["{LABEL_VAR}"]\n')
    store = tmp_path / "state" / "wattprint.sqlite3"
    feeder = tree.start_feeding({zones["package"]: PKG_W, zones["dram"]: DRAM_W}, period_s=0.01)
    t_start = time.monotonic()
    try:
        daemon.start()
        job = wait_for_job(daemon, label)
        job_id = job["id"]
        assert job["root_pid"] == job_p.pid
        seen = Seen()
        prev = StoreState(  # before the first kill: nothing
            [], {c: 0.0 for c in RATES}, 0.0, {c: 0.0 for c in RATES}, {c: 0.0 for c in RATES})
        writer_killed_at: float | None = None  # kill of the run that wrote `prev`
        ready_at: float | None = time.time()
        lost_j = allowed_j = 0.0
        productive = must_book = 0
        for i in range(CRASHES):
            delay = rng.uniform(0.2, 2.5)
            from_spawn = i > 0 and rng.random() < 0.2
            if i > 0:
                spawned = time.monotonic()
                spawn(daemon)
                if from_spawn:
                    ready_at = first_tick_seen(daemon, spawned + delay)
                    kill_due = spawned + delay
                else:
                    ready_at = first_tick_seen(daemon, spawned + 20.0)
                    assert ready_at is not None, f"no first tick within 20 s:\n{daemon.log_tail()}"
                    kill_due = time.monotonic() + delay
            else:
                kill_due = time.monotonic() + delay
            if ready_at is not None:  # after every restart: same job, never below the store at the kill
                check_api(daemon, label, job_id, prev.job_j, seen, f"crash {i} (seed {seed}), after restart")
                while time.monotonic() + POLL_S < kill_due:
                    time.sleep(POLL_S)
                    check_api(daemon, label, job_id, prev.job_j, seen, f"crash {i} (seed {seed}), running")
            time.sleep(max(0.0, kill_due - time.monotonic()))
            # The last tick this run published before the kill (0: none seen). A published
            # tick was committed to the store first (the engine stores, then publishes).
            try:
                tick_seen, tick_seen_at = current_tick(daemon)
            except OSError:
                tick_seen, tick_seen_at = 0, 0.0
            killed_at = time.time()
            daemon.kill()

            now = read_store(store, label)  # integrity_check inside
            why = f"crash {i} (seed {seed}, delay {delay:.2f} s {'after spawn' if from_spawn else 'after first tick'})"
            assert len(now.job_rows) == 1 and now.job_rows[0][0] == job_id, f"{why}: {now.job_rows}"
            assert now.job_rows[0][1] == "running", f"{why}: {now.job_rows}"
            # The invisible process's 20 % of the GPU is all the unattributed GPU energy.
            assert now.unattributed_j["gpu"] == pytest.approx(0.2 * now.device_j["gpu"], rel=1e-6, abs=1e-6), why
            # Every run that published its second tick booked energy (its first tick is
            # the counters' baseline, 0 J): no run that the daemon counted as booking is lost.
            productive += now.job_j["gpu"] > prev.job_j["gpu"]
            if tick_seen >= 2:
                must_book += 1
                assert now.last_seen >= tick_seen_at - 1e-6, f"{why}: tick {tick_seen} published but not stored"
                assert now.job_j["gpu"] > prev.job_j["gpu"], f"{why}: run reached tick {tick_seen} but booked nothing"
            for c in RATES:
                assert now.job_j[c] >= prev.job_j[c] - 1e-6, f"{why}: store job {c} went backwards"
                assert now.job_j[c] >= seen.api[c] - 1e-6, f"{why}: store job {c} below what the API showed"
                assert now.job_j[c] >= seen.metrics[c] - 1e-6, f"{why}: store job {c} below what /metrics showed"
                assert now.device_j[c] >= prev.device_j[c] - 1e-6, f"{why}: store device {c} went backwards"
            wrote = now.last_seen > prev.last_seen
            if wrote and writer_killed_at is not None:
                # This run's first tick came at most at `first_tick` (seen by the poll, or
                # before the kill); everything between the previous state's last tick and
                # it is the allowed loss.
                first_tick = ready_at if ready_at is not None else killed_at
                downtime = first_tick - writer_killed_at
                span = now.last_seen - prev.last_seen
                allowance_s = downtime + TICK_IN_FLIGHT_S
                gained = now.job_j["gpu"] - prev.job_j["gpu"]
                lost = JOB_GPU_W * span - gained
                print(f"  crash {i:2d}: delay {delay:.2f} s {'after spawn ' if from_spawn else 'after tick 1'}"
                      f"  downtime {downtime:.2f} s  covered {span:5.2f} s  job GPU lost {lost:7.1f} J"
                      f"  (bound {JOB_GPU_W * allowance_s:6.1f} J)", flush=True)
                assert gained <= JOB_GPU_W * (span + SLACK_S), f"{why}: job GPU counted twice: {gained} J in {span} s"
                assert lost <= JOB_GPU_W * allowance_s, (
                    f"{why}: job lost {lost:.1f} J > {JOB_GPU_W} W x ({downtime:.2f} s downtime + {TICK_IN_FLIGHT_S} s)")
                for kind, rate in RATES.items():
                    dev_gained = now.device_j[kind] - prev.device_j[kind]
                    assert dev_gained <= rate * (span + SLACK_S), f"{why}: device {kind} counted twice"
                    assert dev_gained >= rate * (span - allowance_s - SLACK_S), (
                        f"{why}: device {kind} lost {rate * span - dev_gained:.1f} J (> {rate} W x {allowance_s:.2f} s)")
                lost_j += max(0.0, lost)
                allowed_j += JOB_GPU_W * allowance_s
            elif not wrote:
                print(f"  crash {i:2d}: delay {delay:.2f} s {'after spawn ' if from_spawn else 'after tick 1'}"
                      f"  killed before its first tick: store unchanged", flush=True)
                assert now.job_j == prev.job_j and now.device_j == prev.device_j, f"{why}: store changed without a tick"
            if wrote:
                writer_killed_at = killed_at
                prev = now

        # A run may legitimately book nothing only when it was killed before publishing
        # its second tick (before its first tick: nothing read; between the first and
        # the second: the first is the counters' baseline). Every other run was checked
        # above to have booked energy; here, that the loop had such runs at all.
        assert productive >= must_book > 0, f"{productive} productive runs, {must_book} reached tick 2"

        # Final run: same job, totals from the store; per component the job's energy
        # against truth from what the test controls over 6 ticks; conservation; a clean stop.
        daemon.start()
        check_api(daemon, label, job_id, prev.job_j, seen, f"final restart (seed {seed})")
        w = follow(daemon, 6, {"job": lambda: descendants(job_p.pid)})
        booked = w.booked(job_id)
        assert abs(booked["gpu"] - JOB_GPU_W * w.seconds) <= JOB_GPU_W * 0.2 + 0.01 * JOB_GPU_W * w.seconds, booked
        assert booked["gpu"] == pytest.approx(0.8 * w.device("gpu"), rel=1e-6)
        want_cpu = w.cpu_j("job", PKG_W)
        assert abs(booked["cpu"] - want_cpu) <= CPU_REL * want_cpu + PKG_W * CPU_ABS_S, (booked, want_cpu)
        assert booked["dram"] == pytest.approx(w.dram_j("job", DRAM_W), rel=0.05), booked
        un_cpu = w.unattributed("cpu")
        assert un_cpu >= 0
        assert abs(un_cpu - w.cpu_unattributed_j(PKG_W)) <= CPU_REL * want_cpu + PKG_W * CPU_ABS_S
        job = check_api(daemon, label, job_id, prev.job_j, seen, f"final run (seed {seed})")
        host = daemon.get("/api/v1/host")
        assert host["unattributed_energy_j"]["gpu"] == pytest.approx(0.2 * host["device_energy_j"]["gpu"], rel=1e-6)
        for kind in RATES:  # conservation, an extra check
            dev = host["device_energy_j"][kind]
            assert dev > 0 and host["unattributed_energy_j"][kind] >= 0
            assert host["attributed_energy_j"][kind] + host["unattributed_energy_j"][kind] == pytest.approx(dev, rel=1e-9)
        assert daemon.stop() == 0
        final = read_store(store, label)
        buckets = conservation_per_bucket(store)
        for c in RATES:
            assert final.job_j[c] >= prev.job_j[c]
        print(f"crash loop: seed {seed}, {CRASHES} SIGKILLs ({productive} after booked energy) in "
              f"{time.monotonic() - t_start:.1f} s; job GPU lost {lost_j:.0f} J in all, bound {allowed_j:.0f} J; "
              f"job total {final.job_j['gpu']:.0f} J GPU, {final.job_j['cpu']:.1f} J CPU, {final.job_j['dram']:.2f} J DRAM; "
              f"conservation held in {buckets} buckets", flush=True)
    finally:
        feeder.stop()
        daemon.kill()
