"""``wattprint jobs`` when the daemon is not answering (issue 11): the REAL daemon runs a
labelled job, is killed (SIGKILL: the store still says the job is running), and the
real CLI falls back to the local store:

- the job is shown as ``unknown``, not ``running``: nobody is watching it;
- its duration ends at the last tick that booked it (``last_seen``), so it does not
  grow while the daemon is down;
- the CLI says the daemon is not answering.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon_harness import DaemonProcess


def jobs_cli(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wattprint.daemon", "jobs", "--config", str(daemon.config_path),
                           *args], capture_output=True, text=True, timeout=30, env=daemon.env)


@pytest.mark.slow
def test_jobs_fallback_shows_unknown_with_durations_up_to_the_last_tick(tmp_path: Path, labelled_process) -> None:
    worker = labelled_process("fallback-job")
    daemon = DaemonProcess(tmp_path, sim_file=None, powercap_root=None)
    daemon.start()
    try:
        daemon.wait_for_job("fallback-job")
        time.sleep(2.0)
    finally:
        daemon.kill()  # as in a crash: the store still says "running"
    assert worker.poll() is None

    out = jobs_cli(daemon, "--json", "--label", "fallback-job")
    assert out.returncode == 0, out.stderr
    assert "not answering" in out.stderr and "unknown" in out.stderr, out.stderr
    [job] = json.loads(out.stdout)["jobs"]
    assert job["state"] == "unknown"
    assert job["duration_s"] == pytest.approx(job["last_seen"] - job["started_at"], abs=1e-6)
    first = job["duration_s"]

    time.sleep(2.0)  # the daemon is still down: the duration must not grow
    [again] = json.loads(jobs_cli(daemon, "--json", "--label", "fallback-job").stdout)["jobs"]
    assert again["state"] == "unknown" and again["duration_s"] == first
    assert time.time() - again["started_at"] > first + 1.5  # what a growing duration would have shown

    table = jobs_cli(daemon, "--label", "fallback-job")
    assert table.returncode == 0
    [row] = [line for line in table.stdout.splitlines() if "fallback-job" in line]
    assert " unknown " in row and " running " not in row
