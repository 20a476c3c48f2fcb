"""The ``wattprint report`` subcommand, and the job look-ups ``exec`` shares.

``report JOB`` prints one job's report (text, JSON or one CSV row), asking the
daemon's HTTP API for the job whose id, else whose label, is JOB (the most recent
of several with that label), or, when no daemon answers, reading the local store.
Exit codes: 0 printed, 1 no such job or the daemon answered with an error, 2 bad
arguments or configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .cli import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, api_base
from .config import Config, load_config
from .procs import sanitize_label
from .report import format_report, label_note, printable

LABEL_LOOKUP_LIMIT = 1000  # jobs fetched when a label is looked up


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


def error_text(status: int, body: Any) -> str:
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


def job_path(job_id: str) -> str:
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
    status, body = http_get(base, job_path(ref), token=token)
    if status == 200:
        return body, None
    if status not in (400, 404):  # 400: too long for an id; it may still be a label
        raise RuntimeError(error_text(status, body))
    jobs: list[dict[str, Any]] = []
    for label in _label_refs(ref):
        status, body = http_get(base, "/api/v1/jobs", {"label": label, "limit": LABEL_LOOKUP_LIMIT}, token=token)
        if status != 200:
            raise RuntimeError(error_text(status, body))
        jobs = body["jobs"]
        if jobs:
            break
    job, note = _most_recent(jobs, ref)
    if job is not None:  # the single-job view carries more (the carbon-aware hint)
        status, full = http_get(base, job_path(job["id"]), token=token)
        if status == 200:
            job = full
    return job, note


def job_series_api(base: str, job_id: str, token: str = "") -> list[dict[str, Any]] | None:
    status, body = http_get(base, job_path(job_id) + "/series", token=token)
    return body["buckets"] if status == 200 else None


# -- local store ---------------------------------------------------------------------

def open_reader(cfg: Config, state_dir: str | None = None) -> Any:
    from .app import store_path
    from .footprint.factors import build_footprint
    from .ledger import LedgerReader

    if state_dir is not None:
        cfg = dataclasses.replace(cfg, daemon=dataclasses.replace(cfg.daemon, state_dir=state_dir))
    return LedgerReader(store_path(cfg), pue=cfg.accounting.pue, price_per_kwh=cfg.accounting.price_per_kwh,
                        currency=cfg.accounting.currency, footprint=build_footprint(cfg))


def find_job_store(cfg: Config, ref: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]], str | None]:
    """Like ``find_job_api`` over the local store; also returns the job's series.
    Raises LedgerError when there is no readable store."""
    reader = open_reader(cfg)
    try:
        now = time.time()
        job = reader.job(ref, now=now)
        note = None
        if job is None:
            for label in _label_refs(ref):
                job, note = _most_recent(reader.jobs(label=label, limit=LABEL_LOOKUP_LIMIT, now=now), ref)
                if job is not None:  # the single-job view carries more (occupancy, factors)
                    job = reader.job(job["id"], now=now) or job
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
