"""Test helper: run the real ``wattprint run`` process against simulated hardware.

``DaemonProcess`` writes a config into a temp dir (simulated GPU sim_file, a powercap
tree, a state dir, a free loopback port), starts ``python -m wattprint.daemon run``,
waits for its first tick, and stops it with SIGTERM or kills it with SIGKILL.
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
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from servers import free_port


class DaemonProcess:
    def __init__(self, workdir: Path, *, sim_file: Path | None, powercap_root: Path | None,
                 extra_toml: str = "", env: dict[str, str] | None = None, daemon_toml: str = ""):
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
            [sys.executable, "-m", "wattprint.daemon", "run", "--config", str(self.config_path)],
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
    return metrics[key]
