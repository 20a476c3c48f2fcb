"""The ``wattprint report`` and ``wattprint exec`` subcommands.

``report JOB`` prints one job's report, asking the daemon's HTTP API (or, when no
daemon answers, reading the local store). ``exec -- CMD...`` runs CMD as a labelled
job and, when it exits, prints its report on stderr and returns CMD's exit code:
measured by the running daemon when one answers at the configured address, else by
an engine sampling in-process into a throw-away store.
"""

from __future__ import annotations

import argparse
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
import urllib.error
import urllib.parse
import urllib.request
from types import FrameType
from typing import Any, Callable

from .cli import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, api_base
from .config import Config, load_config
from .procs import MAX_RAW_LABEL_CHARS, OVERFLOW_LABEL, sanitize_label
from .report import format_report, label_note, printable

log = logging.getLogger("wattprint.cli")

LABEL_ENV = "WATTPRINT_JOB"
LABEL_LOOKUP_LIMIT = 1000  # jobs fetched when a label is looked up
PROBE_TIMEOUT_S = 2.0
POLL_INTERVAL_S = 0.2
IN_PROCESS_MAX_LABELS = 100_000  # the config maximum
START_SLACK_S = 2.0  # a job's started_at comes from whole-second btime + clock ticks
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# -- HTTP ----------------------------------------------------------------------------

def http_get(base: str, path: str, params: dict[str, Any] | None = None, token: str = "",
             timeout_s: float = 10.0) -> tuple[int, Any]:
    """GET ``path`` from the daemon: (HTTP status, JSON body or None).

    Raises OSError when nothing answers and ValueError when the answer is not JSON."""
    query = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v is not None})
    req = urllib.request.Request(f"{base}{path}" + (f"?{query}" if query else ""))
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        try:
            body = json.load(exc)
        except ValueError:
            body = None
        return exc.code, body


def _error_text(status: int, body: Any) -> str:
    try:
        return f"daemon answered {status}: {body['error']['message']}"
    except (TypeError, KeyError):
        return f"daemon answered {status}"


def _label_refs(ref: str) -> list[str]:
    """What to ask for when ``ref`` is a label: as given (the daemon matches the
    exported label and the label as set, so a job the label cap filed under
    ``_overflow`` is found by its own label), then sanitised as the daemon does."""
    clean = sanitize_label(ref)
    return [ref] if clean == ref else [ref, clean]


def _job_path(job_id: str) -> str:
    return "/api/v1/jobs/" + urllib.parse.quote(job_id, safe="")


def _most_recent(jobs: list[dict[str, Any]], label: str) -> tuple[dict[str, Any] | None, str | None]:
    """The newest of ``jobs`` (sorted newest first, as the API and store return them)
    and a note when there were several."""
    if not jobs:
        return None, None
    note = None
    if len(jobs) > 1:
        more = "+" if len(jobs) >= LABEL_LOOKUP_LIMIT else ""
        note = (f"label {printable(label, 80)!s} matches {len(jobs)}{more} jobs; showing the most recent "
                f"(id {printable(jobs[0]['id'], 40)})")
    return jobs[0], note


def find_job_api(base: str, ref: str, token: str = "") -> tuple[dict[str, Any] | None, str | None]:
    """The job whose id, else whose label, is ``ref`` (the newest of several; labels
    are compared as the daemon stores them, sanitised), and a note for the user, from
    the daemon. Raises OSError when no daemon answers and
    RuntimeError when it answers with an error."""
    status, body = http_get(base, _job_path(ref), token=token)
    if status == 200:
        return body, None
    if status not in (400, 404):  # 400: too long for an id; it may still be a label
        raise RuntimeError(_error_text(status, body))
    jobs: list[dict[str, Any]] = []
    for label in _label_refs(ref):
        status, body = http_get(base, "/api/v1/jobs", {"label": label, "limit": LABEL_LOOKUP_LIMIT}, token=token)
        if status != 200:
            raise RuntimeError(_error_text(status, body))
        jobs = body["jobs"]
        if jobs:
            break
    job, note = _most_recent(jobs, ref)
    if job is not None:  # the single-job view carries more (the carbon-aware hint)
        status, full = http_get(base, _job_path(job["id"]), token=token)
        if status == 200:
            job = full
    return job, note


def job_series_api(base: str, job_id: str, token: str = "") -> list[dict[str, Any]] | None:
    status, body = http_get(base, _job_path(job_id) + "/series", token=token)
    return body["buckets"] if status == 200 else None


# -- local store ---------------------------------------------------------------------

def _open_reader(cfg: Config, state_dir: str | None = None) -> Any:
    from .app import store_path
    from .ledger import LedgerReader

    if state_dir is not None:
        cfg = dataclasses.replace(cfg, daemon=dataclasses.replace(cfg.daemon, state_dir=state_dir))
    return LedgerReader(store_path(cfg), pue=cfg.accounting.pue, price_per_kwh=cfg.accounting.price_per_kwh,
                        currency=cfg.accounting.currency)


def find_job_store(cfg: Config, ref: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]], str | None]:
    """Like ``find_job_api`` over the local store; also returns the job's series.
    Raises LedgerError when there is no readable store."""
    reader = _open_reader(cfg)
    try:
        now = time.time()
        job = reader.job(ref, now=now)
        note = None
        if job is None:
            for label in _label_refs(ref):
                job, note = _most_recent(reader.jobs(label=label, limit=LABEL_LOOKUP_LIMIT, now=now), ref)
                if job is not None:
                    break
        series = reader.job_series(job["id"]) if job is not None else []
        if job is not None:
            job["carbon_hint"] = None  # needs the daemon's intensity series
            job.setdefault("label_note", label_note(job, cfg.jobs.max_labels_per_user))
    finally:
        reader.close()
    return job, series, note


# -- wattprint report ----------------------------------------------------------------

def cmd_report(args: argparse.Namespace) -> int:
    from .ledger import LedgerError

    ref: str = args.job
    if not ref:
        print("wattprint report: JOB must be a job id or a label, not empty", file=sys.stderr)
        return EXIT_CONFIG
    cfg = load_config(args.config)
    base = api_base(cfg, args.url)
    series: list[dict[str, Any]] | None
    try:
        job, note = find_job_api(base, ref, cfg.http.token)
        series = job_series_api(base, job["id"], cfg.http.token) if job is not None else None
    except RuntimeError as exc:
        print(f"wattprint report: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except (OSError, ValueError) as exc:
        print(f"wattprint report: daemon at {base} not reachable ({getattr(exc, 'reason', exc)}); "
              "reading the local store", file=sys.stderr)
        try:
            job, series, note = find_job_store(cfg, ref)
        except LedgerError as exc2:
            print(f"wattprint report: {exc2}", file=sys.stderr)
            return EXIT_FAIL
    if note:
        print(f"wattprint report: {note}", file=sys.stderr)
    if job is None:
        print(f"wattprint report: no job with id or label {printable(ref, 200)}", file=sys.stderr)
        return EXIT_FAIL
    if args.json or args.format == "json":
        json.dump(job, sys.stdout, indent=2)
        print()
    elif args.format == "csv":
        from .csvout import write_jobs_csv

        sys.stdout.reconfigure(newline="")  # type: ignore[union-attr]  # the csv module writes \r\n itself
        write_jobs_csv([job], sys.stdout)
    else:
        sys.stdout.write(format_report(job, series, job.get("carbon_hint")))
    return EXIT_OK


def add_report_command(sub: Any) -> None:
    """Register ``wattprint report JOB`` on the CLI's subparsers object."""
    p = sub.add_parser("report", help="one job's report: kWh by component, CO2e, cost, equivalents")
    p.add_argument("job", metavar="JOB", help="job id, or label (the most recent job with that label)")
    p.add_argument("--config")
    p.add_argument("--url", help="daemon base URL (default from [http] listen)")
    p.add_argument("--json", action="store_true", help="print the job object as JSON (same as --format json)")
    p.add_argument("--format", choices=["text", "json", "csv"], default="text",
                   help="text (default), json, or csv: the job as one CSV row (columns in docs/api.md)")
    p.set_defaults(func=cmd_report)


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
            raise RuntimeError(_error_text(status, body))
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
        status, body = http_get(base, _job_path(job["id"]), token=cfg.http.token)
        if status == 200:
            job = body
        series = job_series_api(base, job["id"], cfg.http.token)
        return code, job, series, notes
    except (OSError, ValueError, RuntimeError) as exc:
        notes.append(f"cannot get the report from the daemon at {base}: {getattr(exc, 'reason', exc)}")
        return code, None, None, notes


# -- wattprint exec: measured in-process ---------------------------------------------

class _Sampler:
    """Drives ``engine.tick_blocking`` once per interval on a background thread.
    The engine is only ever ticked by one thread at a time."""

    def __init__(self, engine: Any, interval_s: float):
        self.engine = engine
        self.interval_s = interval_s
        self.tick_errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wattprint-exec-sampler", daemon=True)

    def tick(self) -> None:
        try:
            self.engine.tick_blocking(time.monotonic(), time.time())
        except Exception:
            self.tick_errors += 1
            log.debug("in-process tick failed", exc_info=True)

    def _run(self) -> None:
        due = time.monotonic()
        while True:
            due += self.interval_s
            now = time.monotonic()
            if now > due:  # overran: skip missed slots, keep the phase
                due += ((now - due) // self.interval_s + 1) * self.interval_s
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            self.tick()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def _exec_in_process(cfg: Config, cmd: list[str], env: dict[str, str], label: str,
                     ) -> tuple[int, dict[str, Any] | None, list[dict[str, Any]] | None, list[str]]:
    """Run the child while an engine of our own samples it into a temp store; returns
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
        sampler = _Sampler(engine, local.daemon.interval_s)
        launched_at = time.time()
        try:
            sampler.tick()  # baselines for counters and CPU load

            def started(_child: subprocess.Popen[bytes]) -> None:
                sampler.tick()  # see the child at once
                sampler.start()

            code, pid = run_child(cmd, env, started)
            sampler.stop()
            if pid is not None:
                sampler.tick()  # books the last interval and marks the job finished
        finally:
            sampler.stop()
            engine.close()
        if pid is None:
            return code, None, None, notes
        if sampler.tick_errors:
            notes.append(f"{sampler.tick_errors} in-process tick(s) failed")
        reader = _open_reader(local)
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
