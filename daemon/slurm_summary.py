"""``wattprint slurm-summary``: one line about a Slurm job's energy, for Slurm's record.

The epilogs in deploy/slurm/ run it and write its line into the job's Comment
(TaskEpilog, job still running: ``scontrol update JobId=N Comment=...``) or
AdminComment (EpilogSlurmctld with accounting: ``sacctmgr -i modify job where
jobid=N set AdminComment=...``). The line is::

    <kWh> kWh, <CO2e> gCO2e (<provisional|final>), <GPU-hours> GPU-h

It finds the daemon as every CLI command does (``--config`` or ``WATTPRINT_CONFIG``,
``WATTPRINT_<SECTION>_<KEY>`` overrides, ``--url`` or ``WATTPRINT_URL``), finds the
wattprint job(s) labelled with the job's Slurm name (``--name``: ``<array job
id>_<task id>`` for an array task) whose ``slurm.job_id`` is the Slurm job (one per host and user; the
daemon makes one per Slurm job), and waits up to ``--wait`` seconds for them to be
``finished`` (the daemon sees the last process gone at its next tick). A job still
running then is reported with what is known so far and `` (running)`` appended.
Exit codes: 0 printed, 1 daemon not reachable or no such job (nothing printed),
2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

J_PER_KWH = 3.6e6
POLL_S = 0.5


def format_summary(jobs: list[dict[str, Any]]) -> str:
    """The summary line of the wattprint jobs of one Slurm job (summed)."""
    kwh = sum(float(j["energy_j"]["total"]) for j in jobs) / J_PER_KWH
    co2e = sum(float(j["co2e_g"]) for j in jobs)
    gpu_h = sum(float(j["gpu_seconds"]) for j in jobs) / 3600.0
    status = "final" if all(j.get("co2e_status") == "final" for j in jobs) else "provisional"
    line = f"{kwh:.6f} kWh, {co2e:.2f} gCO2e ({status}), {gpu_h:.4f} GPU-h"
    if any(j.get("state") == "running" for j in jobs):
        line += " (running)"
    return line


def slurm_jobs(all_jobs: list[dict[str, Any]], slurm_job_id: str, user: str | None) -> list[dict[str, Any]]:
    """The wattprint jobs of Slurm job ``slurm_job_id`` (of ``user`` when given)."""
    out = []
    for job in all_jobs:
        sj = job.get("slurm") or {}
        if sj.get("job_id") == slurm_job_id and (user is None or sj.get("user") == user or job.get("user") == user):
            out.append(job)
    return out


def cmd_slurm_summary(args: argparse.Namespace) -> int:
    from .cli import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, _load, api_base, fetch_json

    job_id = (args.job or "").strip()
    if not job_id.isdigit():
        print(f"wattprint slurm-summary: --job must be a Slurm job id (digits), not {job_id!r}", file=sys.stderr)
        return EXIT_CONFIG
    cfg = _load(args.config)
    base = api_base(cfg, args.url)
    deadline = time.monotonic() + max(0.0, args.wait)
    found: list[dict[str, Any]] = []
    while True:
        try:
            # The label is the job as Slurm names it (<array>_<task> for an array task).
            listed = fetch_json(base, "/api/v1/jobs", {"label": args.name or job_id, "limit": 1000},
                                token=cfg.http.token)["jobs"]
        except (OSError, RuntimeError) as exc:
            print(f"wattprint slurm-summary: daemon at {base}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
            return EXIT_FAIL
        found = slurm_jobs(listed, job_id, args.user)
        if found and all(j["state"] == "finished" for j in found):
            break
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    if not found:
        print(f"wattprint slurm-summary: no wattprint job for Slurm job {job_id} at {base}", file=sys.stderr)
        return EXIT_FAIL
    print(format_summary(found))
    return EXIT_OK


def add_slurm_command(sub: Any) -> None:
    p = sub.add_parser("slurm-summary", help="one line about a Slurm job's energy (for Slurm epilogs)")
    p.add_argument("--job", required=True, help="SLURM_JOB_ID")
    p.add_argument("--user", help="only the job's processes of this user (SLURM_JOB_USER)")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the job to finish (default 60)")
    p.add_argument("--name", help="the job as Slurm names it: <array job id>_<task id> for an array task "
                                  "(default: the job id)")
    p.add_argument("--config")
    p.add_argument("--url", help="daemon base URL (default from [http] listen, or WATTPRINT_URL)")
    p.set_defaults(func=cmd_slurm_summary)
