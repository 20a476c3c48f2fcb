"""Invariants of the REAL daemon under a randomised fault schedule (issue 11).

One daemon process (tests/daemon_harness.py) on two simulated GPUs (tests/gpusim.py),
a simulated powercap tree fed at known power (tests/rapl_glitches.py), the real
influxd behind a reverse proxy whose answers the test switches (tests/fault_proxy.py)
and three labelled jobs on the GPUs (labelled through a variable of this run's own,
``[jobs] label_env``, so that other tests' labelled processes on a busy machine are not
its jobs). A seeded random schedule applies faults tick by
tick (the seed is printed and in every failure message; set
``WATTPRINT_INVARIANT_SEED`` to replay one):

- the InfluxDB proxy answers 500, 400 to everything, 503 with Retry-After, 302/307
  to a 200 login page, 200 with an HTML body, or hangs, for a few ticks at a time;
- RAPL counters glitch: dram (fed at 0.5 W) steps back by 1 J, a zone jumps by
  50 kJ, a zone reads above ``max_energy_range_uj`` for a few ticks and then wraps;
- a GPU process whose PID does not exist in this PID namespace (as a container's
  process looks) runs at high SM utilisation next to a visible job;
- 200 half-sent HTTP connections from 127.0.0.1 are held for a few ticks (the test
  polls from 127.0.0.2, another loopback address), under ``prlimit --nofile=1024``.

The test follows the daemon's ticks (it polls /healthz for the tick counter, never
sleeps a fixed time) and, after every tick, reads /healthz, /metrics, /api/v1/host and
/api/v1/jobs. Invariants, at every poll:

1. ``monotonic``: no device total, job total, attributed or unattributed total ever
   decreases (metrics, /api/v1/host, /api/v1/jobs).
2. ``conservation``: per component, device = attributed + unattributed in
   /api/v1/host; Σ job totals of /api/v1/jobs = attributed (when no tick landed
   between the reads); Σ job totals + unattributed = device in /metrics (one
   snapshot) — or a part that produces that component's numbers (gpu / rapl,
   processes, store) is degraded.
3. ``truth``: each device's energy since an anchor tick = what the test fed (GPU:
   simulated power x the daemon's own tick timestamps; RAPL: the feeder's joules at
   those timestamps) within 1 % + 0.2 s of power — or its part (gpu / rapl) was
   degraded in the window (then the comparison re-anchors after it).
4. ``job_share``: a visible job's GPU energy stays between power x time x its lowest
   and its highest SM share of the GPU in each interval (share = its SM / the SM of
   every process on the GPU, the invisible one included), within 1 % + 0.2 s — or
   gpu / processes was degraded in the window. GPU energy that stays unattributed is
   exactly the invisible processes' (``wattprint_gpu_invisible_process_energy_joules_total``).
5. ``health``: each fault shows in its part at some poll of its episode (up to three
   ticks after it ends): the part degraded, or its error count grown (a failure and
   its recovery can both fall between two snapshots): ``influxdb`` for the proxy,
   ``rapl`` for a glitch, ``api`` for a burst; each RAPL glitch is also counted in
   ``wattprint_counter_glitches_total`` by reason.

At the end (faults off, clean ticks, the spool drained, SIGTERM): InfluxDB holds one
``device_power`` point per device and one ``unattributed_energy`` point per component
for every tick the daemon reports, and one ``job_energy`` gpu point per tick for each
job from its first one, each once, at the tick times seen while polling — or each
missing point is in the dead-letter file and counted in
``wattprint_influx_points_dropped_total`` (points with no copy anywhere only as far as
drops for such reasons, e.g. ``spool_full``, are counted). The log is bounded: no traceback, a few
lines per fault episode, no message repeated tick after tick.

Every violation found is collected (by invariant) and reported at the end, with the
seed and the schedule, so one run shows every invariant that does not hold. The test
prints the largest error / tolerance it saw per comparison (``-s``).

``test_host_totals_is_one_read_of_the_store`` pins down one thing this test found:
/api/v1/host's totals must come from one read of the store.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import random
import re
import resource
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon_harness import DaemonProcess
from fault_proxy import FaultProxy
from gpusim import gpu, proc, write_sim
from powercap import PowercapTree
from rapl_glitches import GlitchingFeeder
from servers import InfluxServer
from wattprint.daemon.ledger import Intensity, JobTick, Ledger, LedgerReader
from wattprint.daemon.procs import JobIdentity

SEED_ENV = "WATTPRINT_INVARIANT_SEED"
DB = "wattprint"
FAULT_TICKS = 40  # ticks with faults scheduled
CLEAN_TICKS = 5  # faults off, before the spool is drained and the daemon stopped
DRAIN_MAX_TICKS = 25
TICK_TIMEOUT_S = 10.0  # a tick later than this is a stalled daemon

GPU_W = {"gpu0": 300.0, "gpu1": 200.0}
PKG_ZONE, DRAM_ZONE = "intel-rapl:0", "intel-rapl:0:1"
ZONE_DEVICE = {PKG_ZONE: ("cpu", "package-0"), DRAM_ZONE: ("dram", "dram-0")}
RAPL_W = {PKG_ZONE: 40.0, DRAM_ZONE: 0.5}  # dram under 1 W/tick: a 1 J step back is really backwards
RAPL_START_UJ = 100_000_000_000
JOBS = {"a": ("gpu0", 30.0), "b": ("gpu0", 10.0), "c": ("gpu1", 40.0)}  # job: (gpu, SM %)

SINK_MODES = ("500", "400", "503", "302", "307", "html", "hang")
BURST_CONNECTIONS = 200
HALF_SENT = b"GET /api/v1/jobs HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n"  # the head never ends
POLL_FROM = "127.0.0.2"  # the bursts come from 127.0.0.1: its per-client cap is not ours
HEADER_TIMEOUT_S = 3.0
INFLUX_TIMEOUT_S = 1.5

REL_TOL = 0.01
JITTER_S = 0.1  # read-time jitter at each end of a comparison, in seconds of power
SHARE_WINDOW_S = (0.6, 0.3)  # a tick reads the shares in force somewhere in (t_prev - 0.6, t + 0.3)
CONSERVATION_ABS_J = 1e-3
CONSERVATION_REL = 1e-7

RESPONSIBLE = {"gpu": {"gpu", "processes", "store"}, "cpu": {"rapl", "processes", "store"},
               "dram": {"rapl", "processes", "store"}}
EPISODE_PART = {"sink": "influxdb", "rapl": "rapl", "burst": "api"}
HEALTH_LAG_POLLS = 3  # a sink's failure shows in the snapshot of a later tick (timeouts, backoff)

LOG_BASE_LINES = 12  # start, stop and the lines a clean run writes
LOG_LINES_PER_EPISODE = 6
LOG_MAX_LINES_PER_SECOND = 12


# ------------------------------------------------------------------------ schedule


@dataclass(frozen=True)
class Episode:
    kind: str  # "sink" | "rapl" | "ghost" | "burst"
    start: int  # poll index at which it starts
    ticks: int  # how many polls it lasts
    what: str  # sink mode, rapl glitch ("back" | "jump" | "above"), ghost gpu
    zone: str = ""
    sm: float = 0.0

    @property
    def end(self) -> int:
        return self.start + self.ticks

    def text(self) -> str:
        extra = {"rapl": f" {self.zone}", "ghost": f" sm={self.sm:g}"}.get(self.kind, "")
        return f"@{self.start}+{self.ticks} {self.kind} {self.what}{extra}"


def _place(rng: random.Random, busy: list[tuple[int, int]], ticks: int, lo: int, hi: int, gap: int) -> int | None:
    """A start in [lo, hi - ticks] whose [start - gap, start + ticks + gap) meets no busy span."""
    for _ in range(200):
        start = rng.randint(lo, hi - ticks)
        if all(start + ticks + gap <= b0 or start >= b1 + gap for b0, b1 in busy):
            busy.append((start, start + ticks))
            return start
    return None


def make_schedule(seed: int) -> list[Episode]:
    rng = random.Random(seed)
    episodes: list[Episode] = []
    # The sink: five episodes of 2-3 ticks, modes drawn without repetition, the last
    # one ending early enough for the backoff to run out before the faults stop.
    busy: list[tuple[int, int]] = []
    for mode in rng.sample(SINK_MODES, 5):
        ticks = rng.randint(2, 3)
        start = _place(rng, busy, ticks, 2, FAULT_TICKS - 8, gap=3)
        if start is not None:
            episodes.append(Episode("sink", start, ticks, mode))
    # RAPL: glitches per zone, at least 4 clean ticks apart (the last trusted power is
    # the fed power again before the next one). "back" only on dram (0.5 W): at 40 W a
    # 1 J step back is a normal-looking 39 J interval.
    busy_zone: dict[str, list[tuple[int, int]]] = {PKG_ZONE: [], DRAM_ZONE: []}
    glitches = ["back", "jump", "above", rng.choice(["back", "jump", "above"])]
    rng.shuffle(glitches)
    for what in glitches:
        zone = DRAM_ZONE if what == "back" else rng.choice([PKG_ZONE, DRAM_ZONE])
        ticks = rng.randint(2, 3) if what == "above" else 1
        start = _place(rng, busy_zone[zone], ticks, 3, FAULT_TICKS - 2, gap=4)
        if start is not None:
            episodes.append(Episode("rapl", start, ticks, what, zone=zone))
    # Invisible GPU processes: two or three episodes, one at a time.
    busy = []
    for _ in range(rng.randint(2, 3)):
        ticks = rng.randint(3, 8)
        start = _place(rng, busy, ticks, 2, FAULT_TICKS - 1, gap=1)
        if start is not None:
            episodes.append(Episode("ghost", start, ticks, rng.choice(sorted(GPU_W)), sm=float(rng.randint(60, 95))))
    # Half-sent connection bursts: one or two.
    busy = []
    for _ in range(rng.randint(1, 2)):
        ticks = rng.randint(2, 3)
        start = _place(rng, busy, ticks, 2, FAULT_TICKS - 1, gap=math.ceil(HEADER_TIMEOUT_S) + 2)
        if start is not None:
            episodes.append(Episode("burst", start, ticks, str(BURST_CONNECTIONS)))
    return sorted(episodes, key=lambda e: (e.start, e.kind))


# ------------------------------------------------------------------------ the HTTP side


def http_get(port: int, path: str) -> tuple[int, bytes]:
    """GET from POLL_FROM (a loopback address of our own)."""
    for _ in range(20):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(POLL_FROM, 0))
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (ConnectionError, http.client.RemoteDisconnected):
            time.sleep(0.05)
        finally:
            conn.close()
    raise AssertionError(f"GET {path}: no answer after 20 tries")


def get_json(port: int, path: str) -> Any:
    status, body = http_get(port, path)
    assert status in (200, 503), (path, status, body[:300])
    return json.loads(body)


def get_metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = http_get(port, "/metrics")
    assert status == 200, body[:300]
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def by_name(m: dict, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in m.items() if n == name}


def metric(m: dict, name: str, **labels: str) -> float:
    """The sample of ``name`` whose labels include ``labels`` (GPU series carry more, such
    as uuid and model_name); 0 when there is none."""
    found = [v for (n, lbs), v in m.items() if n == name and labels.items() <= dict(lbs).items()]
    assert len(found) <= 1, f"{name} {labels}: {len(found)} samples"
    return found[0] if found else 0.0


class Burst:
    """Half-sent HTTP connections from 127.0.0.1, held until ``close``."""

    def __init__(self, port: int, n: int) -> None:
        self.sockets: list[socket.socket] = []
        self.failed = 0
        deadline = time.monotonic() + 5.0  # bounded: a daemon slow to accept does not stall the test
        for _ in range(n):
            if time.monotonic() > deadline:
                break
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=2.0, source_address=("127.0.0.1", 0))
            except OSError:
                self.failed += 1
                continue
            try:
                s.sendall(HALF_SENT)
            except OSError:
                pass
            self.sockets.append(s)

    def close(self) -> None:
        for s in self.sockets:
            s.close()
        self.sockets.clear()


# ------------------------------------------------------------------------ the GPU side


@dataclass
class GpuWorld:
    """The sim file's processes over time: what the test wrote, and when."""

    path: Path
    job_pids: dict[str, int]
    ghost_pid: int
    ghosts: dict[str, float] = field(default_factory=dict)  # gpu -> sm of the invisible process
    timeline: list[tuple[float, dict[str, dict[int, float]]]] = field(default_factory=list)

    def state(self) -> dict[str, dict[int, float]]:
        procs: dict[str, dict[int, float]] = {g: {} for g in GPU_W}
        for job, (g, sm) in JOBS.items():
            procs[g][self.job_pids[job]] = sm
        for g, sm in self.ghosts.items():
            procs[g][self.ghost_pid] = sm
        return procs

    def write(self) -> None:
        state = self.state()
        gpus = [gpu(i, power_w=GPU_W[g], processes=[proc(pid, sm_util=sm) for pid, sm in sorted(state[g].items())])
                for i, g in enumerate(sorted(GPU_W))]
        self.timeline.append((time.time(), state))
        write_sim(self.path, gpus)

    def share_range(self, job: str, t0: float, t1: float) -> tuple[float, float]:
        """(lowest, highest) share of ``job`` on its GPU among the states in force in [t0, t1]."""
        g, _ = JOBS[job]
        pid = self.job_pids[job]
        shares = []
        for i, (at, state) in enumerate(self.timeline):
            until = self.timeline[i + 1][0] if i + 1 < len(self.timeline) else float("inf")
            if until >= t0 and at <= t1:
                shares.append(state[g][pid] / sum(state[g].values()))
        return min(shares), max(shares)


def absent_pid() -> int:
    """A PID with no /proc entry here: what a process of another PID namespace looks like."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for pid in range(pid_max - 1, 1000, -1):
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    raise RuntimeError("no free PID")


# ------------------------------------------------------------------------ invariants


def parts_of(h: dict) -> dict[str, dict]:
    return {p["name"]: p for p in h.get("parts", [])}


class Anchored:
    """A cumulative comparison since an anchor poll, restarted after an excused window."""

    def __init__(self) -> None:
        self.anchor: tuple[float, ...] | None = None

    def reset(self) -> None:
        self.anchor = None


@dataclass
class Violations:
    seed: int
    found: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, invariant: str, k: int, text: str) -> None:
        self.found[invariant].append(f"poll {k}: {text}")

    def report(self) -> str:
        lines = []
        for inv, items in sorted(self.found.items()):
            lines.append(f"[{inv}] {len(items)} violation(s):")
            lines += [f"    {t}" for t in items[:6]]
            if len(items) > 6:
                lines.append(f"    ... and {len(items) - 6} more")
        return "\n".join(lines)


class Checker:
    """Keeps what earlier polls saw and checks each new one against invariants 1-4."""

    def __init__(self, v: Violations, world: GpuWorld, feeder: GlitchingFeeder, job_ids: dict[str, str]) -> None:
        self.v = v
        self.world = world
        self.feeder = feeder
        self.job_ids = job_ids
        self.prev_values: dict[str, float] = {}
        self.prev_errors: dict[str, int] = {}
        self.prev_tick_t: float | None = None
        self.truth = {dev: Anchored() for dev in [*GPU_W, *(d for _, d in ZONE_DEVICE.values())]}
        self.share = {job: Anchored() for job in JOBS}
        self.share_acc = {job: [0.0, 0.0] for job in JOBS}  # lowest, highest bound since the anchor
        self.seen_parts: dict[str, list[tuple[int, str, int]]] = defaultdict(list)  # part -> (k, state, errors)
        self.tick_times: list[float] = []
        self.invisible_ok = True
        self.margins: dict[str, float] = defaultdict(float)  # invariant -> largest |error| / tolerance seen

    # ---- helpers

    def _window_degraded(self, h1: dict, h2: dict, names: set[str]) -> bool:
        for name in names:
            for h in (h1, h2):
                part = parts_of(h).get(name)
                if part is not None and part["state"] == "degraded":
                    return True
            errors = parts_of(h2).get(name, {}).get("errors_total", 0)
            if errors > self.prev_errors.get(name, 0):
                return True
        return False

    def _monotonic(self, k: int, key: str, value: float) -> None:
        prev = self.prev_values.get(key)
        if prev is not None and value < prev - 1e-9 * max(1.0, abs(prev)):
            self.v.add("monotonic", k, f"{key} went from {prev!r} to {value!r}")
        self.prev_values[key] = max(value, prev) if prev is not None else value

    # ---- one poll

    def check(self, k: int, h1: dict, m: dict, host1: dict, jobs: dict, host2: dict, h2: dict) -> None:
        for h in (h1, h2):
            for name, part in parts_of(h).items():
                self.seen_parts[name].append((k, part["state"], part["errors_total"]))

        # 1. monotonic
        for labels, value in by_name(m, "wattprint_device_energy_joules_total").items():
            self._monotonic(k, f"metrics device {dict(labels)}", value)
        for labels, value in by_name(m, "wattprint_unattributed_energy_joules_total").items():
            self._monotonic(k, f"metrics unattributed {dict(labels)}", value)
        for labels, value in by_name(m, "wattprint_job_energy_joules_total").items():
            d = dict(labels)
            self._monotonic(k, f"metrics job {d['job_id']} {d['kind']}", value)
        for host in (host1, host2):
            for d in host["devices"]:
                self._monotonic(k, f"host device {d['kind']}/{d['device']}", d["energy_j"])
            for what in ("device_energy_j", "attributed_energy_j", "unattributed_energy_j"):
                for c, value in host[what].items():
                    self._monotonic(k, f"host {what} {c}", value)
        for job in jobs["jobs"]:
            for c, value in job["energy_j"].items():
                self._monotonic(k, f"api job {job['id']} {c}", value)

        # 2. conservation
        for host in (host1, host2):
            for c in host["device_energy_j"]:
                dev = host["device_energy_j"][c]
                att, un = host["attributed_energy_j"][c], host["unattributed_energy_j"][c]
                if abs(dev - att - un) > CONSERVATION_ABS_J + CONSERVATION_REL * abs(dev) \
                        and not self._window_degraded(h1, h2, RESPONSIBLE.get(c, set())):
                    self.v.add("conservation", k, f"/api/v1/host {c}: device {dev!r} != attributed {att!r} "
                                                  f"+ unattributed {un!r} (diff {dev - att - un:+.6f} J)")
        if host1["device_energy_j"] == host2["device_energy_j"] and jobs["count"] < 10_000:
            for c, att in host1["attributed_energy_j"].items():
                jobs_j = sum(j["energy_j"].get(c, 0.0) for j in jobs["jobs"])
                if abs(jobs_j - att) > CONSERVATION_ABS_J + CONSERVATION_REL * abs(att) \
                        and not self._window_degraded(h1, h2, RESPONSIBLE.get(c, set())):
                    self.v.add("conservation", k, f"{c}: Σ /api/v1/jobs {jobs_j!r} != attributed {att!r}")
        dev_m: dict[str, float] = defaultdict(float)
        for labels, value in by_name(m, "wattprint_device_energy_joules_total").items():
            dev_m[dict(labels)["kind"]] += value
        job_m: dict[str, float] = defaultdict(float)
        in_metrics: set[str] = set()
        for labels, value in by_name(m, "wattprint_job_energy_joules_total").items():
            job_m[dict(labels)["kind"]] += value
            in_metrics.add(dict(labels)["job_id"])
        # Finished jobs leave /metrics (finished_grace_s, max_finished_in_metrics): while
        # every job the store lists is still there, the sum is exact; after, it is a bound.
        every_job = {j["id"] for j in jobs["jobs"]} <= in_metrics and jobs["count"] < 10_000
        for labels, un in by_name(m, "wattprint_unattributed_energy_joules_total").items():
            c = dict(labels)["kind"]
            dev = dev_m.get(c, 0.0)
            gap = dev - job_m.get(c, 0.0) - un
            slack = CONSERVATION_ABS_J + CONSERVATION_REL * abs(dev)
            if (abs(gap) > slack if every_job else gap < -slack) \
                    and not self._window_degraded(h1, h2, RESPONSIBLE.get(c, set())):
                self.v.add("conservation", k, f"/metrics {c}: device {dev!r} != Σ jobs {job_m.get(c, 0.0)!r} "
                                              f"+ unattributed {un!r}")

        # 3. truth, from the snapshot's own tick time
        t = metric(m, "wattprint_last_tick_timestamp_seconds")
        self.tick_times.append(t)
        for g, power in GPU_W.items():
            got = metric(m, "wattprint_device_energy_joules_total", kind="gpu", device=g)
            self._truth(k, g, t, got, power * t, power, self._window_degraded(h1, h2, {"gpu"}))
        for zone, (kind, device) in ZONE_DEVICE.items():
            got = metric(m, "wattprint_device_energy_joules_total", kind=kind, device=device)
            self._truth(k, device, t, got, self.feeder.truth_j(zone, t), RAPL_W[zone],
                        self._window_degraded(h1, h2, {"rapl"}))

        # 4. each job's GPU energy within its share of the truth
        excused = self._window_degraded(h1, h2, {"gpu", "processes"})
        for job, (g, _) in JOBS.items():
            got = metric(m, "wattprint_job_energy_joules_total", job_id=self.job_ids[job], kind="gpu")
            self._share(k, job, g, t, got, excused)
        invisible = metric(m, "wattprint_gpu_invisible_process_energy_joules_total")
        un_gpu = metric(m, "wattprint_unattributed_energy_joules_total", kind="gpu")
        if excused:
            self.invisible_ok = False  # GPU energy may stay unattributed for another reason then
        if self.invisible_ok and abs(un_gpu - invisible) > CONSERVATION_ABS_J + 1e-6 * un_gpu:
            self.v.add("job_share", k, f"unattributed GPU energy {un_gpu!r} J is not the invisible "
                                       f"processes' {invisible!r} J")

        for name, part in parts_of(h2).items():
            self.prev_errors[name] = part["errors_total"]
        self.prev_tick_t = t

    def _truth(self, k: int, device: str, t: float, got: float, truth: float, power: float, excused: bool) -> None:
        a = self.truth[device]
        if excused:
            a.reset()
            return
        if a.anchor is None:
            a.anchor = (t, got, truth)
            return
        t0, got0, truth0 = a.anchor
        d_got, d_truth = got - got0, truth - truth0
        tol = REL_TOL * d_truth + 2 * JITTER_S * power
        self.margins[f"truth {device}"] = max(self.margins[f"truth {device}"], abs(d_got - d_truth) / tol)
        if abs(d_got - d_truth) > tol:
            self.v.add("truth", k, f"{device}: {d_got:.3f} J booked over {t - t0:.2f} s since poll anchor, "
                                   f"truth {d_truth:.3f} J (tolerance {tol:.3f} J)")

    def _share(self, k: int, job: str, g: str, t: float, got: float, excused: bool) -> None:
        a = self.share[job]
        acc = self.share_acc[job]
        if excused:
            a.reset()
            return
        if a.anchor is None or self.prev_tick_t is None:
            a.anchor = (t, got)
            acc[0] = acc[1] = 0.0
            return
        t_prev = self.prev_tick_t
        lo, hi = self.world.share_range(job, t_prev - SHARE_WINDOW_S[0], t + SHARE_WINDOW_S[1])
        acc[0] += GPU_W[g] * (t - t_prev) * lo
        acc[1] += GPU_W[g] * (t - t_prev) * hi
        d_got = got - a.anchor[1]
        slack = 2 * JITTER_S * GPU_W[g] * hi
        over = max(d_got - acc[1], acc[0] - d_got, 0.0)
        self.margins[f"share {job}"] = max(self.margins[f"share {job}"], over / (REL_TOL * acc[1] + slack))
        if d_got > acc[1] * (1 + REL_TOL) + slack:
            self.v.add("job_share", k, f"job {job} on {g}: {d_got:.3f} J since poll anchor, more than its "
                                       f"highest share of the truth {acc[1]:.3f} J")
        if d_got < acc[0] * (1 - REL_TOL) - slack:
            self.v.add("job_share", k, f"job {job} on {g}: {d_got:.3f} J since poll anchor, less than its "
                                       f"lowest share of the truth {acc[0]:.3f} J")


# ------------------------------------------------------------------------ InfluxDB


Key = tuple[str, str, str, str]  # measurement, kind, device, job_id
_TAG = re.compile(r"(?:^|,)(kind|device|job_id)=([^,\s]+)")


def dead_letter_points(path: Path) -> dict[Key, set[int]]:
    """Timestamps of the dead-lettered lines, per series key."""
    out: dict[Key, set[int]] = defaultdict(set)
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        if not line or line.startswith("#"):
            continue
        head, ts = line.split(" ", 1)[0], line.rsplit(" ", 1)[-1]
        tags = dict(_TAG.findall(head))
        try:
            out[(head.split(",", 1)[0], tags.get("kind", ""), tags.get("device", ""), tags.get("job_id", ""))].add(int(ts))
        except ValueError:
            continue
    return out


def influx_series(influx: InfluxServer, measurement: str, field_name: str) -> dict[Key, list[int]]:
    """Timestamps (ns) of every point of ``measurement``, per series key."""
    res = influx.query(f'SELECT "{field_name}" FROM "{measurement}" GROUP BY *', db=DB, epoch="ns")["results"][0]
    out: dict[Key, list[int]] = defaultdict(list)
    for s in res.get("series", []):
        tags = s.get("tags", {})
        out[(measurement, tags.get("kind", ""), tags.get("device", ""), tags.get("job_id", ""))] += \
            [int(r[0]) for r in s["values"]]
    return out


def _near(ts: int, stamps: set[int]) -> bool:
    return any(abs(ts - s) <= 1000 for s in stamps)


def influx_problems(influx: InfluxServer, dead_letter: Path, final_h: dict, final_m: dict,
                    polled_tick_times: list[float], job_ids: dict[str, str]) -> list[str]:
    """Every tick's points in InfluxDB once, or dead-lettered and counted as dropped.

    Ticks: the daemon's tick counter and last tick time just before SIGTERM. Each
    device has one ``device_power`` point and each component one ``unattributed_energy``
    point per tick (stamped with the tick's time, which the polls saw); each of our jobs
    one ``job_energy`` gpu point per tick from its first one on."""
    problems = []
    ticks = int(final_h["tick"])
    cut_ns = int(round(float(final_h["last_tick_at"]) * 1e9)) + 1000
    polled = {int(round(t * 1e9)) for t in polled_tick_times}
    dead = dead_letter_points(dead_letter)
    dropped = {dict(lb).get("reason", ""): v for lb, v in
               by_name(final_m, "wattprint_influx_points_dropped_total").items()}
    stored = {**influx_series(influx, "device_power", "watts"),
              **influx_series(influx, "unattributed_energy", "joules"),
              **influx_series(influx, "job_energy", "joules")}
    wanted: list[Key] = [("device_power", "gpu", g, "") for g in GPU_W]
    wanted += [("device_power", kind, device, "") for kind, device in ZONE_DEVICE.values()]
    wanted += [("unattributed_energy", c, "", "") for c in ("gpu", "cpu", "dram")]
    wanted += [("job_energy", "gpu", "", job_id) for job_id in job_ids.values()]
    # Every tick's own time: from gpu0's points, stored or dead-lettered.
    reference = ("device_power", "gpu", "gpu0", "")
    tick_stamps = {ts for ts in stored.get(reference, []) if ts <= cut_ns} | {
        ts for ts in dead.get(reference, set()) if ts <= cut_ns}
    missing_total = lost_total = 0
    lost_problems: list[str] = []
    for key in wanted:
        name = "/".join(x for x in key if x)
        stamps = [ts for ts in stored.get(key, []) if ts <= cut_ns]
        if len(stamps) != len(set(stamps)):
            problems.append(f"{name}: duplicate points by timestamp and tags")
        have = set(stamps) | {ts for ts in dead.get(key, set()) if ts <= cut_ns}
        first = min(have, default=cut_ns + 1)
        due = polled | tick_stamps if key[0] != "job_energy" else {ts for ts in tick_stamps if ts >= first}
        lost = sorted(ts for ts in due if ts <= cut_ns and not _near(ts, have))
        if lost:
            lost_total += len(lost)
            lost_problems.append(f"{name}: {len(lost)} tick(s) neither in InfluxDB nor dead-lettered, "
                                 f"e.g. {lost[:3]}")
        stray = sorted(ts for ts in stamps if not _near(ts, tick_stamps))
        if stray:
            problems.append(f"{name}: {len(stray)} point(s) at no tick's time, e.g. {stray[:3]}")
        if key[0] != "job_energy":
            if len(stamps) > ticks:
                problems.append(f"{name}: {len(stamps)} points for {ticks} ticks (extra points)")
            missing_total += max(0, ticks - len(stamps))
    # Points neither stored nor dead-lettered are acceptable only as drops counted for a
    # reason that keeps no copy (spool full, corrupt, ...).
    uncopied = sum(v for reason, v in dropped.items() if reason not in ("rejected", "too_large"))
    if lost_total > uncopied:
        problems += lost_problems
    dead_total = sum(len(v) for v in dead.values())
    if dead_total > dropped.get("rejected", 0) + dropped.get("too_large", 0):
        problems.append(f"{dead_total} lines dead-lettered, the sink counted {dropped}")
    if len(tick_stamps) != ticks and uncopied == 0:
        problems.append(f"gpu0: {len(tick_stamps)} ticks stored or dead-lettered, the daemon reported {ticks}")
    if missing_total > sum(dropped.values()):
        problems.append(f"{missing_total} points short of one per tick, the sink counted "
                        f"{sum(dropped.values()):g} dropped ({dropped})")
    return problems


# ------------------------------------------------------------------------ log


_TEMPLATE_NOISE = re.compile(r"^\S+ \S+ |\d+(?:\.\d+)?|0x[0-9a-f]+|'[^']*'|\"[^\"]*\"")


def log_problems(text: str, episodes: int) -> list[str]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    problems = []
    if "Traceback" in text:
        problems.append("a traceback in the log")
    budget = LOG_BASE_LINES + LOG_LINES_PER_EPISODE * episodes
    if len(lines) > budget:
        problems.append(f"{len(lines)} log lines for {episodes} fault episodes (budget {budget})")
    per_second = Counter(ln[:19] for ln in lines)
    second, most = per_second.most_common(1)[0] if per_second else ("", 0)
    if most > LOG_MAX_LINES_PER_SECOND:
        problems.append(f"{most} log lines in the second {second} (a flood)")
    templates = Counter(_TEMPLATE_NOISE.sub("#", ln) for ln in lines)
    for template, n in templates.most_common(3):
        if n > episodes + 3:
            problems.append(f"{n} times: {template}")
    return problems


# ------------------------------------------------------------------------ the test


@pytest.fixture
def job_process(labelled_process: Callable[..., subprocess.Popen]) -> Callable[[str, str], subprocess.Popen]:
    """Call with (variable, label) to start a sleeping process whose environment sets
    ``variable=label`` (conftest's labelled_process with a label variable of its own)."""
    return lambda variable, label: labelled_process(label, variable=variable)


def wait_next_tick(port: int, after: int) -> dict:
    deadline = time.monotonic() + TICK_TIMEOUT_S
    while True:
        h = get_json(port, "/healthz")
        if h.get("tick", 0) > after:
            return h
        if time.monotonic() > deadline:
            raise AssertionError(f"no tick after {after} within {TICK_TIMEOUT_S} s: {h}")
        time.sleep(0.05)


@pytest.mark.slow
def test_invariants_hold_under_a_random_fault_schedule(tmp_path: Path, influxdb_server: InfluxServer,
                                                       background_app, job_process) -> None:
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(1, 2**31))
    # A label variable of this run's own: labelled processes of other tests on a busy
    # machine are not our daemon's jobs (no label cap reached by them, no finished jobs
    # of theirs pushed out of /metrics), whether or not the suite has a PID namespace.
    label_var = f"WATTPRINT_INVARIANT_JOB_{os.getpid()}"
    schedule = make_schedule(seed)
    header = f"seed {seed} ({SEED_ENV}={seed} to replay); schedule: " + "; ".join(e.text() for e in schedule)
    print(header)
    violations = Violations(seed)

    # Descriptors for the bursts (the test holds them).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < BURST_CONNECTIONS + 300 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (BURST_CONNECTIONS + 300, hard))

    influxdb_server.create_database(DB)
    proxy = FaultProxy(influxdb_server.url, retry_after_s=1)
    proxy.url = background_app(proxy.app()).url

    tree = PowercapTree(tmp_path / "powercap")
    tree.add_package(0, core=False, dram=True, start_uj=RAPL_START_UJ)
    feeder = GlitchingFeeder(tree, RAPL_W)

    procs = {job: job_process(label_var, f"inv-{job}") for job in JOBS}
    world = GpuWorld(tmp_path / "sim.json", {job: p.pid for job, p in procs.items()}, absent_pid())
    world.write()

    prlimit = shutil.which("prlimit")
    daemon = DaemonProcess(
        tmp_path, sim_file=world.path, powercap_root=tree.root,
        extra_toml=(f'[influxdb]\nenabled = true\nurl = "{proxy.url}"\ndatabase = "{DB}"\n'
                    f"flush_interval_s = 0.2\ntimeout_s = {INFLUX_TIMEOUT_S}\n"
                    f'[jobs]\nlabel_env = ["{label_var}"]\n'),
        env={"WATTPRINT_HTTP_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S)},
        argv_prefix=(prlimit, "--nofile=1024:1024", "--") if prlimit else (),
    )
    bursts: list[Burst] = []
    stopped_rc: int | None = None
    try:
        daemon.start()
        port = daemon.port
        # Our three jobs, by their leader's PID (labels may be capped on a busy machine).
        deadline = time.monotonic() + 20
        job_ids: dict[str, str] = {}
        while len(job_ids) < len(JOBS):
            assert time.monotonic() < deadline, f"jobs not seen: {daemon.log_tail()}"
            listed = get_json(port, "/api/v1/jobs?limit=10000")["jobs"]
            job_ids = {job: j["id"] for job, p in procs.items() for j in listed if j["root_pid"] == p.pid}
            time.sleep(0.2)

        checker = Checker(violations, world, feeder, job_ids)
        by_start: dict[int, list[Episode]] = defaultdict(list)
        by_end: dict[int, list[Episode]] = defaultdict(list)
        for e in schedule:
            by_start[e.start].append(e)
            by_end[e.end].append(e)
        episode_polls: dict[Episode, list[int]] = {e: [] for e in schedule}
        active_bursts: dict[Episode, Burst] = {}
        glitch_reasons: Counter[str] = Counter()

        tick = get_json(port, "/healthz")["tick"]
        drained_at: int | None = None
        k = 0
        while True:
            h1 = wait_next_tick(port, tick)
            m = get_metrics(port)
            host1 = get_json(port, "/api/v1/host")
            jobs = get_json(port, "/api/v1/jobs?limit=10000")
            host2 = get_json(port, "/api/v1/host")
            h2 = get_json(port, "/healthz")
            tick = h2["tick"]
            checker.check(k, h1, m, host1, jobs, host2, h2)
            for e in schedule:
                if e.start <= k <= e.end + HEALTH_LAG_POLLS:  # (health shows a fault a tick or two late)
                    episode_polls[e].append(k)

            # Faults that end, then faults that begin, at this poll.
            for e in by_end.get(k, []):
                if e.kind == "sink":
                    proxy.set("forward")
                elif e.kind == "rapl" and e.what == "above":
                    feeder.wrap_to(e.zone, 1_000_000)
                elif e.kind == "ghost":
                    world.ghosts.pop(e.what, None)
                    world.write()
                elif e.kind == "burst":
                    active_bursts.pop(e).close()
            for e in by_start.get(k, []):
                if e.kind == "sink":
                    proxy.set(e.what)
                elif e.kind == "rapl":
                    if e.what == "back":
                        feeder.step_back(e.zone, 1_000_000)
                        glitch_reasons["backwards"] += 1
                    elif e.what == "jump":
                        feeder.jump(e.zone, 50_000_000_000)
                        glitch_reasons["jump"] += 1
                    else:
                        feeder.above_range(e.zone, 5_000_000_000)
                        glitch_reasons["above_range"] += 1
                elif e.kind == "ghost":
                    world.ghosts[e.what] = e.sm
                    world.write()
                elif e.kind == "burst":
                    burst = Burst(port, BURST_CONNECTIONS)
                    bursts.append(burst)
                    active_bursts[e] = burst
            k += 1
            if k < FAULT_TICKS + CLEAN_TICKS:
                continue
            # Faults are off: drain the spool (bounded), then stop.
            assert proxy.mode == "forward" and not world.ghosts and not active_bursts
            # (polled right after a tick, the spool holds that tick's lines: drained = nothing older)
            if metric(m, "wattprint_spool_oldest_age_seconds") < 1.5:
                drained_at = k
                break
            if k >= FAULT_TICKS + CLEAN_TICKS + DRAIN_MAX_TICKS:
                break
        final_h = get_json(port, "/healthz")
        final_m = get_metrics(port)
        stopped_rc = daemon.stop()
    except Exception as exc:  # (a stalled daemon, an API error): say which seed, what was seen
        rc = daemon.proc.poll() if daemon.proc is not None else None
        raise AssertionError(f"{header}\n{exc}\n{violations.report()}\n(daemon exit status: {rc})\n"
                             f"--- daemon log tail ---\n{daemon.log_tail(40)}") from exc
    finally:
        for b in bursts:
            b.close()
        feeder.stop()
        daemon.kill()
    log_text = daemon.log_path.read_text(errors="replace")

    # 5. health during each episode: its part degraded at a poll, or its error count grew
    #    (a failure and its recovery can both fall between two ticks' snapshots).
    for e, polls in episode_polls.items():
        part = EPISODE_PART.get(e.kind)
        if part is None:
            continue
        history = checker.seen_parts.get(part, [])
        seen = [(kk, st, err) for kk, st, err in history if kk in polls]
        before = [err for kk, _, err in history if kk < e.start]
        grew = bool(seen) and max(err for _, _, err in seen) > (max(before) if before else 0)
        if not (grew or any(st == "degraded" for _, st, _ in seen)):
            violations.add("health", e.start, f"{e.text()}: {part} neither degraded nor counted an error "
                                              f"while it lasted: {seen}")
    for reason, n in glitch_reasons.items():
        counted = sum(v for labels, v in by_name(final_m, "wattprint_counter_glitches_total").items()
                      if dict(labels).get("reason") == reason and dict(labels).get("source") == "rapl")
        if counted < n:
            violations.add("health", k, f"{n} RAPL glitch(es) {reason!r} made, "
                                        f"wattprint_counter_glitches_total counts {counted:g}")

    # 5. InfluxDB: every tick's points once, or each missing one dead-lettered and counted.
    if drained_at is None:
        violations.add("influx", k, f"the spool did not drain within {DRAIN_MAX_TICKS} clean ticks "
                                    f"(pending {metric(m, 'wattprint_spool_pending_points'):g})")
    if stopped_rc != 0:
        violations.add("influx", k, f"SIGTERM stop exited {stopped_rc}")
    job_ids = {job: checker.job_ids[job] for job in JOBS}
    for problem in influx_problems(influxdb_server, tmp_path / "state" / "influx-spool" / "dead-letter.lp",
                                   final_h, final_m, checker.tick_times, job_ids):
        violations.add("influx", k, problem)

    # The log: bounded.
    for problem in log_problems(log_text, len(schedule)):
        violations.add("log", k, problem)

    twice = proxy.delivered_twice()
    print("largest error / tolerance: " + ", ".join(f"{n} {v:.2f}" for n, v in sorted(checker.margins.items())))
    assert not violations.found, (
        f"{header}\n{violations.report()}\n"
        f"(lines influxd acknowledged more than once: {len(twice)}; proxy answers: "
        f"{dict(proxy.answer_counts())})\n--- daemon log tail ---\n{daemon.log_tail(40)}")


def test_host_totals_is_one_read_of_the_store(tmp_path: Path) -> None:
    """/api/v1/host's figures come from one read transaction: with ticks committed
    while it reads, device = attributed + unattributed in every answer. (It was three
    separate queries, so a commit could land between them: 27 of 37,184 answers of a
    real daemon ticking 5 times a second were off by a whole tick, which made the
    invariant test above fail now and then.)"""
    path = str(tmp_path / "store.sqlite3")
    ledger = Ledger(path, host="h", bucket_s=60)
    job = JobIdentity(job_id="10-1", label="a", label_source="WATTPRINT_JOB", uid=0, user="root",
                      command="python", root_pid=10, started_at=1000.0)
    static = Intensity(400.0, "final", "static", "DK1", "static")

    def record(i: int) -> None:
        ledger.record_tick(2000.0 + i, [JobTick(job, {"gpu": 30.0, "cpu": 4.0, "dram": 0.0}, gpu_seconds=1.0,
                                                gpu_memory_bytes=0, sources={"gpu": "counter"})],
                           [("gpu", "gpu0", 100.0, "counter"), ("cpu", "package-0", 10.0, "counter")],
                           {"gpu": 70.0, "cpu": 6.0, "dram": 0.0}, static, ())

    record(0)
    reader = LedgerReader(path)
    stop = threading.Event()

    def writer() -> None:
        i = 1
        while not stop.is_set():
            record(i)
            i += 1

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    off: list[tuple[str, float]] = []
    try:
        deadline = time.monotonic() + 3.0
        reads = 0
        while time.monotonic() < deadline and len(off) < 5:
            host = reader.host_totals()
            reads += 1
            for c, dev in host["device_energy_j"].items():
                diff = dev - host["attributed_energy_j"][c] - host["unattributed_energy_j"][c]
                if abs(diff) > 1e-6:
                    off.append((c, diff))
    finally:
        stop.set()
        thread.join()
    assert reads > 50
    assert not off, f"{len(off)} inconsistent answers in {reads} reads: {off}"
