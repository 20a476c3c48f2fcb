"""Test helper: run the real ``wattprint run`` process against simulated hardware.

``DaemonProcess`` writes a config into a temp dir (simulated GPU sim_file, a powercap
tree, a state dir, a free loopback port), starts ``python -m wattprint.daemon run``,
waits for its first tick, and stops it with SIGTERM or kills it with SIGKILL.

Timing without fixed sleeps: ``wait_ticks(daemon, n)`` / ``wait_for_tick`` poll the
daemon's own tick counter (/healthz ``tick``); ``scrape(daemon)`` gives one /metrics
snapshot (``Scrape``: per-job and per-device joules and the wall time of the tick they
are as of), so a test compares energies with truth derived from the daemon's tick
times, not from how long the test slept.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from servers import free_port


class DaemonProcess:
    def __init__(self, workdir: Path, *, sim_file: Path | None, powercap_root: Path | None,
                 extra_toml: str = "", env: dict[str, str] | None = None, daemon_toml: str = "",
                 argv_prefix: tuple[str, ...] = (), launcher: Path | None = None):
        # argv_prefix: a command that runs the daemon, e.g. ("prlimit", "--nofile=1024:1024", "--")
        self.argv_prefix = tuple(argv_prefix)
        # launcher: a script run instead of ``-m wattprint.daemon`` (tests/sink_launcher.py)
        self.launcher = launcher
        self.workdir = workdir
        self.port = free_port()
        self.config_path = workdir / "wattprint.toml"
        self.log_path = workdir / "daemon.log"
        lines = [
            "[daemon]", f'state_dir = "{workdir / "state"}"', 'host = "testhost"', "interval_s = 1.0", daemon_toml,
            "[http]", f'listen = "127.0.0.1:{self.port}"',
            "[gpu]",
        ]
        if sim_file is not None:
            lines += ['backend = "sim"', f'sim_file = "{sim_file}"']
        else:
            lines += ['backend = "none"']
        lines += ["[cpu]"]
        if powercap_root is not None:
            lines += ['source = "rapl"', f'powercap_root = "{powercap_root}"', "[memory]", 'source = "auto"']
        else:
            lines += ['source = "estimate"']
        self.config_path.write_text("\n".join(lines) + "\n" + extra_toml)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("WATTPRINT_")}
        # Tests poll the API faster than a person would: no rate limit unless a test sets one.
        self.env["WATTPRINT_HTTP_RATE_LIMIT_PER_S"] = "0"
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.argv_prefix, sys.executable,
             *([str(self.launcher)] if self.launcher is not None else ["-m", "wattprint.daemon"]),
             "run", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                body = self.get("/healthz", allow_error=True)
                if body.get("tick", 0) >= 1:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"daemon not ready after {timeout_s}s:\n{self.log_tail()}")

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"daemon ignored SIGTERM:\n{self.log_tail()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def get(self, path: str, allow_error: bool = False, headers: dict[str, str] | None = None) -> Any:
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as exc:
            if allow_error:
                return json.load(exc)
            raise

    def get_status(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            return resp.read().decode()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Samples of one scrape, keyed by (name, sorted labels)."""
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def wait_for_job(self, label: str, timeout_s: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for job in self.get("/api/v1/jobs")["jobs"]:
                if job["label"] == label and job["state"] == "running" and job["energy_j"]["total"] > 0:
                    return job
            time.sleep(0.2)
        raise RuntimeError(f"job {label!r} not seen:\n{self.log_tail()}")


def sample(metrics: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    if key in metrics:
        return metrics[key]
    # Series may carry more labels than a test names (GPU series have uuid and
    # model_name too): the one series whose labels include the given ones.
    want = set(labels.items())
    found = [v for (n, ls), v in metrics.items() if n == name and want <= set(ls)]
    if len(found) != 1:
        raise KeyError((key, f"{len(found)} series match"))
    return found[0]


@dataclass(frozen=True)
class Scrape:
    """One /metrics scrape: one snapshot, so every figure in it is as of the same tick
    (``tick``, at wall time ``tick_at`` = ``wattprint_last_tick_timestamp_seconds``)."""

    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]

    @property
    def tick(self) -> int:
        return int(self.metrics[("wattprint_ticks_total", ())])

    @property
    def tick_at(self) -> float:
        return self.metrics[("wattprint_last_tick_timestamp_seconds", ())]

    def job_j(self, job_id: str) -> dict[str, float]:
        """The job's energy per component (gpu, cpu, dram; 0 where none was booked)."""
        out = {"gpu": 0.0, "cpu": 0.0, "dram": 0.0}
        for (name, labels), value in self.metrics.items():
            d = dict(labels)
            if name == "wattprint_job_energy_joules_total" and d.get("job_id") == job_id:
                out[d["kind"]] = value
        return out

    def job_co2e_g(self, job_id: str) -> float:
        for (name, labels), value in self.metrics.items():
            if name == "wattprint_job_co2e_grams" and dict(labels).get("job_id") == job_id:
                return value
        raise KeyError(job_id)

    def device_j(self, kind: str, device: str | None = None) -> float:
        """Energy of one device, or of all devices of ``kind``."""
        return sum(v for (name, labels), v in self.metrics.items()
                   if name == "wattprint_device_energy_joules_total" and dict(labels)["kind"] == kind
                   and (device is None or dict(labels)["device"] == device))

    def unattributed_j(self, kind: str) -> float:
        return self.metrics.get(("wattprint_unattributed_energy_joules_total", (("kind", kind),)), 0.0)

    def counter(self, name: str) -> float:
        return self.metrics.get((name, ()), 0.0)


def scrape(daemon: DaemonProcess) -> Scrape:
    """One /metrics scrape of ``daemon`` (see ``Scrape``)."""
    return Scrape(daemon.metrics())


def current_tick(daemon: DaemonProcess) -> tuple[int, float]:
    """(tick number, wall time of that tick) from /healthz."""
    body = daemon.get("/healthz", allow_error=True)
    return int(body.get("tick", 0)), float(body.get("last_tick_at") or 0.0)


def wait_ticks(daemon: DaemonProcess, n: int = 1, timeout_s: float | None = None, poll_s: float = 0.02) -> int:
    """Poll /healthz until the daemon's tick counter has advanced by ``n`` from now;
    return the tick number reached. The default timeout allows 10 s per tick (a
    loaded machine), never a fixed sleep standing in for ticks."""
    start, _ = current_tick(daemon)
    return wait_for_tick(daemon, start + n, timeout_s if timeout_s is not None else 10.0 * n + 10.0, poll_s)


def wait_for_tick(daemon: DaemonProcess, tick: int, timeout_s: float = 30.0, poll_s: float = 0.02) -> int:
    """Poll /healthz until the tick counter is at least ``tick``; return it."""
    deadline = time.monotonic() + timeout_s
    while True:
        now, _ = current_tick(daemon)
        if now >= tick:
            return now
        if daemon.proc is not None and daemon.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {daemon.proc.returncode}:\n{daemon.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"tick {tick} not reached in {timeout_s} s (at {now}):\n{daemon.log_tail()}")
        time.sleep(poll_s)
