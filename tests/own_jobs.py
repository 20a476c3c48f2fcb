"""Test helper: find a test's own job in a daemon that also sees everybody else's.

Other tests and benchmarks may run labelled processes on the same machine at the same
time: hundreds of jobs, and more live labels per user than ``[jobs]
max_labels_per_user`` (so a label may become ``_overflow``). A test therefore looks its
job up by the leader's PID among all jobs (``limit=10000``), and starts its daemon with
``ENV`` (no label bound worth speaking of).
"""

from __future__ import annotations

import time
from typing import Any, Callable

ENV = {"WATTPRINT_JOBS_MAX_LABELS_PER_USER": "100000"}


def wait_for_pid_job(get: Callable[[str], Any], pid: int, timeout_s: float = 30.0,
                     log_tail: Callable[[], str] = lambda: "") -> dict[str, Any]:
    """The running job led by ``pid`` once it has energy; ``get`` is the daemon's JSON GET."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for job in get("/api/v1/jobs?state=running&limit=10000")["jobs"]:
            if job["root_pid"] == pid and job["energy_j"]["total"] > 0:
                return job
        time.sleep(0.2)
    raise RuntimeError(f"no job led by pid {pid} seen in {timeout_s} s:\n{log_tail()}")
