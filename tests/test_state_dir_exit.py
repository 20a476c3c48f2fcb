"""An unusable ``[daemon] state_dir`` stops the REAL daemon at start with exit code 2
and one clear line (no traceback), like a config error, so that systemd's
``RestartPreventExitStatus=2`` (deploy/systemd/wattprint.service) does not restart it
in a loop. Both ways it can be unusable: it cannot be created (a path under a regular
file) and it exists but cannot be written (a read-only bind mount as root, which
ignores mode bits; mode 0555 otherwise)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from daemon_harness import DaemonProcess

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "systemd" / "wattprint.service"


def start_expecting_exit(workdir: Path, state_dir: Path) -> tuple[int, str]:
    daemon = DaemonProcess(workdir, sim_file=None, powercap_root=None,
                           env={"WATTPRINT_DAEMON_STATE_DIR": str(state_dir)})
    try:
        with pytest.raises(RuntimeError, match="daemon exited with"):
            daemon.start(timeout_s=30.0)
        assert daemon.proc is not None
        return daemon.proc.returncode, daemon.log_path.read_text(errors="replace")
    finally:
        daemon.kill()


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line]


def test_unit_does_not_restart_on_exit_2() -> None:
    text = UNIT.read_text()
    assert re.search(r"^RestartPreventExitStatus=2$", text, re.M), "the unit must not restart on exit 2"
    assert re.search(r"^Restart=on-failure$", text, re.M)


def test_state_dir_that_cannot_be_created_exits_2(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    state_dir = a_file / "state"
    code, log = start_expecting_exit(tmp_path, state_dir)
    assert code == 2, log
    (line,) = error_lines(log)
    assert line.endswith(f"cannot start: [daemon] state_dir {state_dir}: cannot create it: Not a directory"), line
    assert "Traceback" not in log


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """An existing directory the daemon cannot write: a read-only bind mount when
    running as root (root ignores mode bits), else mode 0555. Yields (dir, errno text)."""
    target = tmp_path / "ro-state"
    target.mkdir()
    if os.geteuid() != 0:
        os.chmod(target, 0o555)
        try:
            yield target, "Permission denied"
        finally:
            os.chmod(target, 0o755)
        return
    source = tmp_path / "ro-source"
    source.mkdir()
    r = subprocess.run(["mount", "--bind", "-o", "ro", str(source), str(target)], capture_output=True, text=True)
    assert r.returncode == 0, f"read-only bind mount failed (root): {r.stderr}"
    try:
        yield target, "Read-only file system"
    finally:
        if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_state_dir_that_cannot_be_written_exits_2(tmp_path: Path, read_only_dir: tuple[Path, str]) -> None:
    state_dir, why = read_only_dir
    code, log = start_expecting_exit(tmp_path, state_dir)
    assert code == 2, log
    (line,) = error_lines(log)
    assert line.endswith(f"cannot start: [daemon] state_dir {state_dir}: not writable: {why}"), line
    assert "Traceback" not in log
    assert os.listdir(state_dir) == []  # nothing left behind
