"""A daemon that cannot read other users' environments says so (issue 11), on the REAL
daemon process run as an unprivileged uid.

The daemon runs as uid 65534 (``setpriv``) with only CAP_DAC_READ_SEARCH (ambient, so
it can reach the interpreter and read the config), not CAP_SYS_PTRACE; a labelled
process of root runs on the simulated GPU. The kernel refuses that process's
``/proc/<pid>/environ`` (EACCES), so its label cannot be seen:

- the ``processes`` health part is degraded (never ok), its detail names the missing
  capability (CAP_SYS_PTRACE, read from CapEff) and not the one the daemon has;
- ``wattprint_processes_labels_unreadable`` counts the processes whose labels could
  not be read (at least the labelled one, at most every process of another uid);
- the log says it once; the job still gets its GPU energy, as a process-group job.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from daemon_harness import DaemonProcess, sample
from gpusim import gpu, proc, write_sim

NOBODY = 65534


def other_uid_processes() -> int:
    n = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                n += os.stat(entry.path).st_uid != NOBODY
            except OSError:
                pass
    return n


@pytest.mark.slow
def test_unreadable_environments_degrade_processes_and_name_the_capability(tmp_path: Path, labelled_process) -> None:
    assert os.geteuid() == 0, "the test suite runs as root (it starts the daemon as another uid)"
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is required"
    worker = labelled_process("cap-hidden")
    workdir = tmp_path / "d"
    workdir.mkdir()
    (workdir / "state").mkdir()
    os.chown(workdir / "state", NOBODY, NOBODY)
    sim = write_sim(workdir / "sim.json", [gpu(0, power_w=200.0, processes=[proc(worker.pid, sm_util=80)])])
    daemon = DaemonProcess(workdir, sim_file=sim, powercap_root=None, argv_prefix=(
        setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
        "--inh-caps=-all,+dac_read_search", "--ambient-caps=+dac_read_search", "--"))
    daemon.start()
    try:
        deadline = time.monotonic() + 20
        part: dict = {}
        while time.monotonic() < deadline:
            part = {p["name"]: p for p in daemon.get("/healthz")["parts"]}["processes"]
            if part["state"] == "degraded":
                break
            time.sleep(0.3)
        assert part["state"] == "degraded", part
        assert "permission denied" in part["detail"]
        assert "lacks CAP_SYS_PTRACE (" in part["detail"], part["detail"]  # the one it has is not named
        assert daemon.get("/healthz")["status"] == "degraded"

        unreadable = sample(daemon.metrics(), "wattprint_processes_labels_unreadable")
        assert 1 <= unreadable <= other_uid_processes(), unreadable

        # The label is not seen; the GPU energy still goes to the process's (process-group) job.
        deadline = time.monotonic() + 20
        jobs: list = []
        while time.monotonic() < deadline:
            jobs = [j for j in daemon.get("/api/v1/jobs")["jobs"] if j["root_pid"] == worker.pid]
            if jobs and jobs[0]["energy_j"]["gpu"] > 0:
                break
            time.sleep(0.3)
        assert jobs and jobs[0]["label"] == "" and jobs[0]["label_source"] == "pgid", jobs
        assert not [j for j in daemon.get("/api/v1/jobs")["jobs"] if j["label"] == "cap-hidden"]
        time.sleep(2.0)  # more ticks: still one log line
        text = daemon.log_path.read_text(errors="replace")
        assert text.count("processes degraded") == 1, text[-3000:]
    finally:
        assert daemon.stop() == 0
    assert "Traceback" not in daemon.log_path.read_text(errors="replace")
