"""``wattprint exec`` without a daemon is ticked by the engine's own schedule.

exec's in-process measurement has no tick loop of its own (issue 14): one tick
before the command starts, the engine's schedule (``Engine.run``, on the engine's
tick thread) while it runs, one tick after it ends. A tick that fails on the schedule
is reported as one note with the count, never a traceback (the engine logs its
failures with one; exec keeps that off the terminal).

The CLI runs in a subprocess (as a user runs it); a small driver there wraps
``Engine.tick_blocking`` to record which thread ran each tick and, when told, to
fail the first N ticks of the schedule.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from servers import free_port

INTERVAL_S = 0.25
CHILD_S = 1.5
CHILD_CODE = 4

DRIVER = r"""
import json, sys, threading, time
from wattprint.daemon.cli import main
from wattprint.daemon.engine import Engine

record_path, fail_first = sys.argv[1], int(sys.argv[2])
ticks = []
original = Engine.tick_blocking

def recording(self, now_mono, wall, *args, **kwargs):
    thread = threading.current_thread().name
    ticks.append({"thread": thread, "mono": time.monotonic()})
    if thread.startswith("wattprint-tick") and sum(t["thread"] == thread for t in ticks) <= fail_first:
        raise RuntimeError("simulated tick failure")
    return original(self, now_mono, wall, *args, **kwargs)

Engine.tick_blocking = recording
code = main(sys.argv[3:])
with open(record_path, "w") as fh:
    json.dump(ticks, fh)
sys.exit(code)
"""


def run_exec(tmp_path: Path, fail_first: int) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    config = tmp_path / "wattprint.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\ninterval_s = {INTERVAL_S}\n'
                      '[gpu]\nbackend = "none"\n[cpu]\nsource = "estimate"\n')
    record = tmp_path / "ticks.json"
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(record), str(fail_first),
         "exec", "--label", "in-process", "--config", str(config), "--url", f"http://127.0.0.1:{free_port()}",
         "--json-report", "--", sys.executable, "-c", f"import sys, time; time.sleep({CHILD_S}); sys.exit({CHILD_CODE})"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    return done, json.loads(record.read_text())


def json_report(stderr: str) -> dict[str, Any]:
    lines = stderr.splitlines()
    start = lines.index("{")
    end = len(lines) - lines[::-1].index("}")
    return json.loads("\n".join(lines[start:end]))


def test_in_process_exec_is_ticked_by_the_engine_schedule(tmp_path):
    done, ticks = run_exec(tmp_path, fail_first=0)
    assert done.returncode == CHILD_CODE, done.stderr
    job = json_report(done.stderr)
    assert job["label"] == "in-process" and job["state"] == "finished"
    # One tick before the command (baselines) and one after it (the last interval), on
    # exec's own thread; every tick in between on the engine's tick thread.
    assert ticks[0]["thread"] == "MainThread" and ticks[-1]["thread"] == "MainThread", ticks
    scheduled = ticks[1:-1]
    assert all(t["thread"].startswith("wattprint-tick") for t in scheduled), ticks
    # The command ran 1.5 s at 0.25 s a tick: the schedule's first tick at its start,
    # then one per interval (fewer only if a loaded machine made ticks overrun).
    assert 2 <= len(scheduled) <= CHILD_S / INTERVAL_S + 2, ticks
    assert "in-process tick(s) failed" not in done.stderr


def test_failed_scheduled_ticks_are_one_note_without_a_traceback(tmp_path):
    done, ticks = run_exec(tmp_path, fail_first=2)
    assert done.returncode == CHILD_CODE, done.stderr
    assert "wattprint exec: 2 in-process tick(s) failed" in done.stderr.splitlines()
    assert "Traceback" not in done.stderr and "simulated tick failure" not in done.stderr, done.stderr
    job = json_report(done.stderr)  # the later ticks still measured the job
    assert job["label"] == "in-process" and job["state"] == "finished"
    assert sum(t["thread"].startswith("wattprint-tick") for t in ticks) >= 3, ticks
