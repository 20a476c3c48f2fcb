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

Heterogeneous jobs are one wattprint job named by the HetJobId (daemon/slurm.py):
``--job`` takes the HetJobId (``SLURM_HET_JOB_ID`` in the epilogs), and a wattprint
job whose ``slurm.job_id`` is it matches.

``--fleet``: the whole job across its nodes, from InfluxDB (every node's daemon writes
there; ``[influxdb]`` of the config, v1 query API), for the EpilogSlurmctld (the job
has ended on every node when it runs). The job's hosts are its Slurm nodes
(``--nodelist``, default ``SLURM_HET_JOB_NODELIST`` or ``SLURM_JOB_NODELIST``,
expanded with ``scontrol show hostnames``, or by ``expand_hostlist`` where scontrol
is missing); each node's daemon must write under its Slurm node name (``[daemon]
host``). It waits until every host has a ``device_power`` point stamped at least
``--margin`` seconds after the job's end (``--ended-at``, default: when the command
started): each daemon writes one every tick and delivers its spool in order, so the
host's job energy, all stamped before the end, is then in InfluxDB. Then it prints::

    <kWh> kWh, <CO2e> gCO2e (<provisional|final>), <n> hosts

summed over the job's hosts only (rows of the label from other hosts are ignored).
InfluxDB holds no GPU time, so there are no GPU-hours in this line. A host still
without a point after the end when ``--wait`` runs out is named:
`` (incomplete: no data after the job's end from <hosts>)``. Exit 1 when InfluxDB
cannot be queried or no host has energy for the job.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any

from .carbon import J_PER_KWH

POLL_S = 0.5
FLEET_WINDOW_S = 31 * 86400.0  # how far before its end the fleet figure looks for a job's points
FLEET_MARGIN_S = 2.0  # a host's point must be this much after the job's end (clock skew, tick)
MAX_HOSTS = 100_000
_HOSTLIST_PART = re.compile(r"\[([^\[\]]*)\]")


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


def format_fleet_summary(per_host: dict[str, dict[str, float]], hosts: list[str], missing: list[str]) -> str:
    """The summary line of one Slurm job summed over ``hosts`` (``per_host`` from
    fleet.label_host_totals; rows of other hosts are left out); ``missing``: hosts
    with no point after the job's end."""
    rows = [per_host[h] for h in hosts if h in per_host]
    kwh = sum(r["energy_j"] for r in rows) / J_PER_KWH
    co2e = sum(r["co2e_g"] for r in rows)
    status = "provisional" if any(r["provisional"] > 0 for r in rows) else "final"
    line = f"{kwh:.6f} kWh, {co2e:.2f} gCO2e ({status}), {len(hosts)} host{'s' if len(hosts) != 1 else ''}"
    if missing:
        line += f" (incomplete: no data after the job's end from {','.join(missing)})"
    return line


def expand_hostlist(text: str) -> list[str]:
    """Slurm's hostlist syntax (``wpn[1-3,7],gpu[01-02]x``) as a list of names: the
    fallback where ``scontrol show hostnames`` cannot run. Raises ValueError."""
    out: list[str] = []
    depth, start, parts = 0, 0, []
    for i, ch in enumerate(text):  # split on commas outside brackets
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    for part in (p.strip() for p in parts):
        if not part:
            continue
        names = [""]
        pos = 0
        for m in _HOSTLIST_PART.finditer(part):
            options: list[str] = []
            for rng in m.group(1).split(","):
                lo, dash, hi = rng.partition("-")
                if not lo.isdigit() or (dash and not hi.isdigit()):
                    raise ValueError(f"bad range {rng!r} in {text!r}")
                for n in range(int(lo), int(hi if dash else lo) + 1):
                    options.append(str(n).zfill(len(lo)))
            names = [n + part[pos:m.start()] + o for n in names for o in options]
            if len(names) > MAX_HOSTS:
                raise ValueError(f"more than {MAX_HOSTS} hosts in {text!r}")
            pos = m.end()
        if "[" in part[pos:] or "]" in part[pos:]:
            raise ValueError(f"unbalanced brackets in {text!r}")
        out.extend(n + part[pos:] for n in names)
    return out


def job_hosts(nodelist: str) -> list[str]:
    """The node names of a Slurm hostlist: ``scontrol show hostnames`` (Slurm's own
    expansion), else ``expand_hostlist``. Raises ValueError."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            done = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
            if done.returncode == 0 and done.stdout.split():
                return sorted(set(done.stdout.split()))
        except (OSError, subprocess.SubprocessError):
            pass
    return sorted(set(expand_hostlist(nodelist)))


def cmd_fleet_summary(args: argparse.Namespace, job_id: str) -> int:
    from .cli import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, _load
    from .fleet import FleetError, hosts_with_points_since, label_host_totals

    nodelist = (args.nodelist or os.environ.get("SLURM_HET_JOB_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
                or "").strip()
    if not nodelist:
        print("wattprint slurm-summary --fleet: the job's nodes are unknown: give --nodelist (default "
              "SLURM_HET_JOB_NODELIST or SLURM_JOB_NODELIST)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        hosts = job_hosts(nodelist)
    except ValueError as exc:
        print(f"wattprint slurm-summary --fleet: --nodelist: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    cfg = _load(args.config)
    ended = args.ended_at if args.ended_at is not None else time.time()
    label = args.name or job_id
    deadline = time.monotonic() + max(0.0, args.wait)
    try:
        while True:
            seen = hosts_with_points_since(cfg.influxdb, ended + args.margin)
            missing = [h for h in hosts if h not in seen]
            if not missing or time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
        per_host = label_host_totals(cfg.influxdb, label, ended - FLEET_WINDOW_S, time.time() + 60.0, args.user)
    except FleetError as exc:
        print(f"wattprint slurm-summary --fleet: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if not any(h in per_host for h in hosts):
        print(f"wattprint slurm-summary --fleet: no energy for Slurm job {label} from its hosts "
              f"{','.join(hosts)} in InfluxDB", file=sys.stderr)
        return EXIT_FAIL
    print(format_fleet_summary(per_host, hosts, missing))
    return EXIT_OK


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
    if args.fleet:
        return cmd_fleet_summary(args, job_id)
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
    p.add_argument("--fleet", action="store_true",
                   help="the whole job on all its nodes, from InfluxDB (for EpilogSlurmctld; see docs/deploy.md)")
    p.add_argument("--nodelist", help="with --fleet: the job's nodes as a Slurm hostlist "
                                      "(default SLURM_HET_JOB_NODELIST, else SLURM_JOB_NODELIST)")
    p.add_argument("--ended-at", type=float, help="with --fleet: when the job ended, seconds since the epoch "
                                                  "(default: now)")
    p.add_argument("--margin", type=float, default=FLEET_MARGIN_S,
                   help=f"with --fleet: seconds after the end each host must have written (default {FLEET_MARGIN_S:g})")
    p.add_argument("--config")
    p.add_argument("--url", help="daemon base URL (default from [http] listen, or WATTPRINT_URL)")
    p.set_defaults(func=cmd_slurm_summary)
