"""The ``wattprint exec`` subcommand: run a command as a labelled job, report it.

``exec -- CMD...`` runs CMD with ``WATTPRINT_JOB`` set to its label and, when it
exits, prints its report on stderr and returns CMD's exit code (128 + N when killed
by signal N; 127 not found, 126 not executable; SIGINT and SIGTERM are forwarded).
It is measured by the running daemon when one answers at the configured address,
else by an engine of its own, in-process, into a throw-away store. The in-process
engine is ticked by the engine's own schedule (``Engine.run``, on a thread of its
own), so exec has no tick loop of its own: only one tick before the command starts
(baselines) and one after it ends (books the last interval, marks the job finished).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from types import FrameType
from typing import Any, Callable

from .cli import EXIT_CONFIG, api_base
from .cli_report import LABEL_LOOKUP_LIMIT, error_text, http_get, job_path, job_series_api, open_reader
from .config import Config, load_config
from .procs import MAX_RAW_LABEL_CHARS, OVERFLOW_LABEL, sanitize_label
from .report import format_report, printable

log = logging.getLogger("wattprint.cli")

LABEL_ENV = "WATTPRINT_JOB"
PROBE_TIMEOUT_S = 2.0
POLL_INTERVAL_S = 0.2
IN_PROCESS_MAX_LABELS = 100_000  # the config maximum
START_SLACK_S = 2.0  # a job's started_at comes from whole-second btime + clock ticks
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# -- wattprint exec: the child -------------------------------------------------------

def default_label(command: str) -> str:
    """``exec-<basename of the command>-<6 random hex digits>``, sanitised as the
    daemon would."""
    return sanitize_label(f"exec-{os.path.basename(command) or 'cmd'}-{secrets.token_hex(3)}")


def _sigint_from_terminal() -> bool:
    """True when this process is in the foreground process group of its terminal: a
    Ctrl-C there is delivered to the whole group, the child included, so forwarding
    it again would give the child a second SIGINT."""
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
                return True
        except OSError:
            continue
    return False


def exit_code_of(returncode: int) -> int:
    """The shell's convention: 128 + signal number when killed by a signal."""
    return 128 - returncode if returncode < 0 else returncode


def run_child(cmd: list[str], env: dict[str, str],
              on_started: Callable[[subprocess.Popen[bytes]], None]) -> tuple[int, int | None]:
    """Run ``cmd`` with inherited stdin/stdout/stderr, forwarding SIGINT and SIGTERM to
    it; call ``on_started`` once it runs. Returns (exit code, pid or None when it could
    not be started: 127 not found, 126 not executable)."""
    holder: dict[str, subprocess.Popen[bytes]] = {}
    pending: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGINT and _sigint_from_terminal():
            return
        child = holder.get("child")
        if child is None:
            pending.append(signum)
            return
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        try:
            child = subprocess.Popen(cmd, env=env)
        except FileNotFoundError:
            print(f"wattprint exec: {printable(cmd[0], 200)}: command not found", file=sys.stderr)
            return 127, None
        except PermissionError:
            print(f"wattprint exec: {printable(cmd[0], 200)}: permission denied", file=sys.stderr)
            return 126, None
        except OSError as exc:
            print(f"wattprint exec: {printable(cmd[0], 200)}: cannot run: {exc.strerror or exc}", file=sys.stderr)
            return 126, None
        holder["child"] = child
        for signum in pending:
            child.send_signal(signum)
        on_started(child)
        return exit_code_of(child.wait()), child.pid
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _match_job(jobs: list[dict[str, Any]], pid: int, launched_at: float,
               pid_only: bool = False) -> dict[str, Any] | None:
    """The job whose leader is ``pid`` (started since the launch, against PID reuse);
    else, unless ``pid_only``, the newest one started since the launch (the leader may
    have been a descendant when the label was first seen)."""
    recent = [j for j in jobs if j["started_at"] >= launched_at - START_SLACK_S]
    for job in recent:
        if job["root_pid"] == pid:
            return job
    return recent[0] if recent and not pid_only else None


def find_exec_job(list_jobs: Callable[[str], list[dict[str, Any]]], label: str, pid: int,
                  launched_at: float) -> dict[str, Any] | None:
    """Our child's job among ``list_jobs(label)``: under its label as the daemon
    sanitises it, else under the per-user overflow label (by PID only)."""
    job = _match_job(list_jobs(sanitize_label(label)), pid, launched_at)
    if job is None:
        job = _match_job(list_jobs(OVERFLOW_LABEL), pid, launched_at, pid_only=True)
    return job


# -- wattprint exec: measured by the daemon ------------------------------------------

def _probe(base: str, token: str) -> str | None:
    """None when a wattprint daemon answers at ``base``, else why not."""
    try:
        _status, body = http_get(base, "/healthz", token=token, timeout_s=PROBE_TIMEOUT_S)
    except ValueError:
        return "something answered, but not as wattprint does"
    except OSError as exc:
        return str(getattr(exc, "reason", exc))
    if body is not None and not isinstance(body, dict):
        return "something answered, but not as wattprint does"
    return None


def _await_daemon_job(base: str, token: str, label: str, pid: int, launched_at: float,
                      wait_s: float) -> tuple[dict[str, Any] | None, bool]:
    """Poll the daemon until it has the job finished or ``wait_s`` passed: (the job as
    last seen or None, finished?)."""
    def list_jobs(stored_label: str) -> list[dict[str, Any]]:
        status, body = http_get(base, "/api/v1/jobs", {"label": stored_label, "limit": LABEL_LOOKUP_LIMIT},
                                token=token)
        if status != 200:
            raise RuntimeError(error_text(status, body))
        return list(body["jobs"])

    deadline = time.monotonic() + wait_s
    seen: dict[str, Any] | None = None
    while True:
        job = find_exec_job(list_jobs, label, pid, launched_at)
        if job is not None:
            seen = job
            if job["state"] == "finished":
                return job, True
        if time.monotonic() >= deadline:
            return seen, False
        time.sleep(POLL_INTERVAL_S)


def _exec_with_daemon(cfg: Config, base: str, cmd: list[str], env: dict[str, str], label: str,
                      ) -> tuple[int, dict[str, Any] | None, list[dict[str, Any]] | None, list[str]]:
    """Run the child while the daemon measures; returns (exit code, job, series, notes)."""
    launched_at = time.time()
    code, pid = run_child(cmd, env, lambda _child: None)
    if pid is None:
        return code, None, None, []
    wait_s = 3 * cfg.daemon.interval_s + 1.0
    notes: list[str] = []
    try:
        job, finished = _await_daemon_job(base, cfg.http.token, label, pid, launched_at, wait_s)
        if job is None:
            notes.append(f"the daemon at {base} has no job labelled {printable(label, 80)} for pid {pid}: "
                         "a command shorter than the daemon's process rescan ([jobs] rescan_interval_s) "
                         "can end before it is seen")
            return code, None, None, notes
        if not finished:
            notes.append(f"the daemon has not marked the job finished after {wait_s:g} s; figures may still grow")
        status, body = http_get(base, job_path(job["id"]), token=cfg.http.token)
        if status == 200:
            job = body
        series = job_series_api(base, job["id"], cfg.http.token)
        return code, job, series, notes
    except (OSError, ValueError, RuntimeError) as exc:
        notes.append(f"cannot get the report from the daemon at {base}: {getattr(exc, 'reason', exc)}")
        return code, None, None, notes


# -- wattprint exec: measured in-process ---------------------------------------------

class _QuietTracebacks(logging.Filter):
    """Keeps the engine's "tick failed" traceback off the user's terminal while exec
    runs it: exec reports failed ticks as one note (a count) instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None


class _EngineRunner:
    """Runs the engine's own schedule (``Engine.run``: drift-free, failed ticks
    counted in ``tick_errors_total``) on an event loop on a thread of its own while
    the command runs. ``tick`` is one tick outside the schedule, before it starts and
    after it stopped: the engine is only ever ticked by one thread at a time."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.tick_errors = 0  # failed ticks outside the schedule
        self._loop: asyncio.AbstractEventLoop | None = None  # the schedule's, made on its thread
        self._stop = asyncio.Event()
        self._first_tick = threading.Event()
        self._quiet = _QuietTracebacks()
        self._thread = threading.Thread(target=self._run, name="wattprint-exec-engine", daemon=True)

    def tick(self) -> None:
        try:
            self.engine.tick_blocking(time.monotonic(), time.time())
        except Exception:
            self.tick_errors += 1
            log.debug("in-process tick failed", exc_info=True)

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self.engine.run(self._stop, on_first_tick=self._first_tick.set))
        except Exception:
            log.debug("in-process engine schedule failed", exc_info=True)
        finally:
            self._first_tick.set()
            loop.close()

    def start(self) -> None:
        """Start the schedule; returns once its first tick (at once) is done."""
        logging.getLogger("wattprint.engine").addFilter(self._quiet)
        self._thread.start()
        self._first_tick.wait()

    def stop(self) -> None:
        """Stop the schedule after the tick in progress, if any (idempotent)."""
        if self._thread.is_alive() and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # the schedule ended by itself and closed its loop
                pass
            self._thread.join()
        logging.getLogger("wattprint.engine").removeFilter(self._quiet)

    def failed_ticks(self) -> int:
        """Ticks that failed: outside the schedule, and on it (as the engine counted
        them by its last successful tick)."""
        snap = self.engine.snapshot
        scheduled = int(snap.counters.get("tick_errors_total", 0.0)) if snap is not None else 0
        return self.tick_errors + scheduled


def _exec_in_process(cfg: Config, cmd: list[str], env: dict[str, str], label: str,
                     ) -> tuple[int, dict[str, Any] | None, list[dict[str, Any]] | None, list[str]]:
    """Run the child while an engine of our own measures it into a temp store; returns
    (exit code, job, series, notes). The temp store is removed afterwards."""
    from .app import StartupError, build_engine
    from .health import HealthBoard
    from .ledger import LedgerError

    state_dir = tempfile.mkdtemp(prefix="wattprint-exec-")
    notes: list[str] = []
    try:
        local = dataclasses.replace(
            cfg,
            daemon=dataclasses.replace(cfg.daemon, state_dir=state_dir),
            # Only our label identifies the job, and other labelled processes on the box
            # never push it into the overflow label; scan /proc every tick so a new child
            # (and its children) are seen at once, not after the daemon's rescan interval.
            jobs=dataclasses.replace(cfg.jobs, label_env=(LABEL_ENV,), rescan_interval_s=0.0,
                                     max_labels_per_user=IN_PROCESS_MAX_LABELS),
        )
        try:
            engine = build_engine(local, HealthBoard())
        except (StartupError, LedgerError) as exc:
            notes.append(f"cannot sample in-process ({exc}); the command ran unmeasured")
            code, _pid = run_child(cmd, env, lambda _child: None)
            return code, None, None, notes
        runner = _EngineRunner(engine)
        launched_at = time.time()
        try:
            runner.tick()  # baselines for counters and CPU load
            # The schedule's first tick, at once, sees the child.
            code, pid = run_child(cmd, env, lambda _child: runner.start())
            runner.stop()
            if pid is not None:
                runner.tick()  # books the last interval and marks the job finished
        finally:
            runner.stop()
            engine.close()
        if pid is None:
            return code, None, None, notes
        failed = runner.failed_ticks()
        if failed:
            notes.append(f"{failed} in-process tick(s) failed")
        reader = open_reader(local)
        try:
            now = time.time()
            job = find_exec_job(lambda stored: reader.jobs(label=stored, limit=LABEL_LOOKUP_LIMIT, now=now),
                                label, pid, launched_at)
            series = reader.job_series(job["id"]) if job is not None else None
        finally:
            reader.close()
        if job is None:
            notes.append("the command ended before it could be sampled")
        return code, job, series, notes
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


# -- wattprint exec ------------------------------------------------------------------

def cmd_exec(args: argparse.Namespace) -> int:
    cmd: list[str] = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("wattprint exec: no command given (wattprint exec [--label L] -- CMD...)", file=sys.stderr)
        return EXIT_CONFIG
    label: str = args.label if args.label is not None else default_label(cmd[0])
    if not label or "\x00" in label or len(label) > MAX_RAW_LABEL_CHARS:
        print(f"wattprint exec: --label must be 1..{MAX_RAW_LABEL_CHARS} characters without NUL", file=sys.stderr)
        return EXIT_CONFIG
    cfg = load_config(args.config)
    base = api_base(cfg, args.url)
    env = dict(os.environ)
    env[LABEL_ENV] = label

    why_not = _probe(base, cfg.http.token)
    if why_not is None:
        mode = f"measured by the daemon at {base}"
    else:
        mode = f"no daemon at {base}: measured in-process (estimates where no counters; {why_not})"
    print(f"wattprint exec: job label {printable(label, 200)}; {mode}", file=sys.stderr)
    if why_not is None:
        code, job, series, notes = _exec_with_daemon(cfg, base, cmd, env, label)
    else:
        code, job, series, notes = _exec_in_process(cfg, cmd, env, label)

    out = sys.stderr
    print(f"\nwattprint exec: exit code {code}; {mode}", file=out)
    for note in notes:
        print(f"wattprint exec: {note}", file=out)
    if job is not None:
        if args.json_report:
            print(json.dumps(job, indent=2), file=out)
        else:
            out.write(format_report(job, series))
    out.flush()
    return code


def add_exec_command(sub: Any) -> None:
    """Register ``wattprint exec [--label L] -- CMD...`` on the CLI's subparsers object."""
    p = sub.add_parser("exec", help="run a command as a labelled job; print its report (stderr) when it ends",
                       description="Runs CMD with WATTPRINT_JOB=LABEL; when it exits, prints its report on "
                                   "stderr and exits with CMD's exit code (128+N when killed by signal N).")
    p.add_argument("--label", help="job label (default exec-<command>-<random>)")
    p.add_argument("--config")
    p.add_argument("--url", help="daemon base URL (default from [http] listen)")
    p.add_argument("--json-report", action="store_true",
                   help="print the job object as JSON (on stderr) instead of the text report")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...", help="the command and its arguments")
    p.set_defaults(func=cmd_exec)
