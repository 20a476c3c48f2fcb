"""The per-user label cap (``[jobs] max_labels_per_user``) on the REAL daemon and the
real CLI (issue 11).

With the cap at 2, a user's third distinct live label is filed under ``_overflow``:

- it is counted (``wattprint_labels_overflow_total``) and logged once per user per
  episode (a fourth label adds to the count, not to the log);
- ``?label=<its own label>`` and ``wattprint report <its own label>`` find it (the
  label as set, ``label_raw``, is matched too);
- the job says why its label differs: ``label_note`` and the report give "label cap
  reached for user U (max_labels_per_user = 2)", not "sanitised for export";
- once the user is below the cap again (a job ended) the episode ends (logged once)
  and a new label is kept.

The labelled processes run as a uid of their own, so labelled processes of anything
else on the machine do not count toward the cap.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from daemon_harness import DaemonProcess, sample

CAP = 2


@pytest.fixture
def as_uid(labelled_process: Any) -> tuple[int, Any]:
    assert os.geteuid() == 0, "the test suite runs as root (it starts processes as another uid)"
    uid = 43000 + os.getpid() % 1000
    return uid, (lambda label: labelled_process(label, uid=uid))


def job_of(daemon: DaemonProcess, pid: int, timeout_s: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for job in daemon.get("/api/v1/jobs?limit=1000")["jobs"]:
            if job["root_pid"] == pid and job["state"] == "running":
                return job
        time.sleep(0.2)
    raise AssertionError(f"no job for pid {pid}:\n{daemon.log_tail()}")


def report(daemon: DaemonProcess, ref: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wattprint.daemon", "report", ref, "--config",
                           str(daemon.config_path), "--url", daemon.url],
                          capture_output=True, text=True, timeout=30, env=daemon.env)


@pytest.mark.slow
def test_label_cap_counts_logs_once_and_lookups_find_the_job(tmp_path: Path, as_uid, labelled_process) -> None:
    uid, start = as_uid
    daemon = DaemonProcess(tmp_path, sim_file=None, powercap_root=None,
                           env={"WATTPRINT_JOBS_MAX_LABELS_PER_USER": str(CAP),
                                "WATTPRINT_JOBS_LABEL_CAP_HOLD_S": "3"})
    daemon.start()
    try:
        a, b = start("cap-a"), start("cap-b")
        assert job_of(daemon, a.pid)["label"] == "cap-a" and job_of(daemon, b.pid)["label"] == "cap-b"
        assert sample(daemon.metrics(), "wattprint_labels_overflow_total") == 0

        c = start("cap-c")
        job_c = job_of(daemon, c.pid)
        assert job_c["label"] == "_overflow" and job_c["label_raw"] == "cap-c"
        reason = f"label cap reached for user {job_c['user']} (max_labels_per_user = {CAP})"
        assert job_c["label_note"] == reason
        assert daemon.get(f"/api/v1/jobs/{job_c['id']}")["label_note"] == reason
        # found by the label that was set
        found = daemon.get("/api/v1/jobs?label=cap-c")["jobs"]
        assert [j["id"] for j in found] == [job_c["id"]]
        out = report(daemon, "cap-c")
        assert out.returncode == 0, out.stderr
        assert job_c["id"] in out.stdout and reason in out.stdout and "sanitised for export" not in out.stdout

        d = start("cap-d")
        assert job_of(daemon, d.pid)["label"] == "_overflow"
        deadline = time.monotonic() + 10
        while sample(daemon.metrics(), "wattprint_labels_overflow_total") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sample(daemon.metrics(), "wattprint_labels_overflow_total") == 2
        text = daemon.log_path.read_text(errors="replace")
        assert text.count("label cap reached for user") == 1, text[-3000:]

        # Below the cap for a moment: a new label is its own, and the user is at the
        # cap again at once: still one episode (hovering at the cap logs nothing more).
        labelled_process.end(a)
        e = start("cap-e")
        assert job_of(daemon, e.pid)["label"] == "cap-e"
        text = daemon.log_path.read_text(errors="replace")
        assert text.count("below the label cap again") == 0, text[-3000:]
        assert sample(daemon.metrics(), "wattprint_labels_overflow_total") == 2

        # Below the cap for longer than [jobs] label_cap_hold_s (3 s): the episode ends, once.
        labelled_process.end(e)
        deadline = time.monotonic() + 15
        while "below the label cap again" not in daemon.log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline, daemon.log_tail()
            time.sleep(0.2)
        text = daemon.log_path.read_text(errors="replace")
        assert text.count("below the label cap again") == 1, text[-3000:]
        assert text.count("label cap reached for user") == 1, text[-3000:]
    finally:
        assert daemon.stop() == 0
    assert "Traceback" not in daemon.log_path.read_text(errors="replace")
