"""The ``wattprint`` command: run the daemon, list jobs, check the config.

``WATTPRINT_CONFIG`` (a config path) and ``WATTPRINT_URL`` (the daemon's base URL)
stand for ``--config`` / ``--url`` when a command has the option and it is not given.

Exit codes: 0 ok, 1 runtime failure, 2 bad config or bad arguments (for ``run`` also a
state_dir that cannot be created or written: restarting cannot fix either).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Sequence

from .api import BadRequest, parse_time
from .config import Config, ConfigError, load_config, parse_listen
from .report import label_note, printable as _printable
from .timefmt import human

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def _load(path: str | None) -> Config:
    return load_config(path)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table ([footprint] gpu_kgco2e)
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v))


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    source = (cfg.source_path or "embedded defaults").encode("utf-8", "backslashreplace").decode("utf-8")
    warning = cfg.listen_warning()
    if warning:
        print(f"wattprint check-config: WARNING: {warning}", file=sys.stderr)
    print(f"# effective wattprint config (from {source} and WATTPRINT_* variables; secrets redacted)")
    if warning:
        print(f"# WARNING: {warning}")
    for section, values in cfg.to_dict().items():
        print(f"\n[{section}]")
        for key, value in values.items():
            print(f"{key} = {_toml_value(value)}")
    note = _static_grid_note(cfg)
    if note:
        print(f"\n# grid: {_printable(note, 1000)}")
    from .footprint import build_footprint

    print(f"{'' if note else chr(10)}# footprint: {_printable(build_footprint(cfg).describe(), 1000)}")
    return EXIT_OK


def _static_grid_note(cfg: Config) -> str:
    """For provider "static": which intensity the daemon will use, and why (an explicit
    static_g_per_kwh, or the table entry a zone maps to, e.g. DK1 -> DK)."""
    if cfg.grid.provider != "static":
        return ""
    from .grid.factory import make_provider
    from .grid.static import StaticProvider

    try:
        provider = make_provider(cfg.grid)
    except ValueError as exc:
        raise ConfigError([f"{cfg.source_path or '<defaults>'}: {exc}"]) from None
    return provider.note if isinstance(provider, StaticProvider) else ""


def cmd_run(args: argparse.Namespace) -> int:
    from .app import run

    return run(_load(args.config))


def api_base(cfg: Config, url: str | None) -> str:
    if url:
        return url.rstrip("/")
    host, port = parse_listen(cfg.http.listen)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def fetch_json(base: str, path: str, params: dict[str, Any], token: str = "") -> Any:
    """GET a JSON document from the daemon; raise OSError when it is not reachable."""
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    req = urllib.request.Request(f"{base}{path}" + (f"?{query}" if query else ""))
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc)["error"]["message"]
        except Exception:
            message = exc.reason
        raise RuntimeError(f"daemon answered {exc.code}: {message}") from None


STATE_UNKNOWN = "unknown"


def stale_running(job: dict[str, Any]) -> dict[str, Any]:
    """A job read from the store while the daemon is not answering: one the store says
    is running is shown as ``unknown`` (nobody is watching it any more), its duration
    up to the last tick that booked it (``last_seen``), not up to now."""
    if job["state"] != "running":
        return job
    until = max(job.get("last_seen") or job["started_at"], job["started_at"])
    return {**job, "state": STATE_UNKNOWN, "duration_s": until - job["started_at"],
            "state_note": "the daemon is not answering; the job was running at its last tick"}


def _fmt_time(t: float | None) -> str:
    if t is None:
        return "-"
    return human(t)


def _fmt_duration(s: float) -> str:
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}"


def print_jobs_table(jobs: list[dict[str, Any]], out: Any = sys.stdout) -> None:
    header = f"{'ID':<22} {'LABEL':<24} {'USER':<10} {'STATE':<9} {'STARTED (UTC)':<19} {'DURATION':>9} {'kWh':>10} {'CO2e g':>10} {'GPU-h':>7}"
    print(header, file=out)
    for j in jobs:
        print(
            f"{_printable(j['id'], 22):<22} {_printable(j['label'] or '-', 24):<24} {_printable(j['user'], 10):<10} "
            f"{j['state']:<9} {_fmt_time(j['started_at']):<19} {_fmt_duration(j['duration_s']):>9} "
            f"{j['energy_kwh']:>10.4f} {j['co2e_g']:>10.2f} {j['gpu_seconds'] / 3600:>7.2f}",
            file=out,
        )


def cmd_fleet(args: argparse.Namespace, cfg: Config) -> int:
    from .fleet import FleetError, fleet_totals

    if args.state is not None or args.user is not None:
        print("wattprint jobs --fleet: --state and --user do not apply (totals are per label)", file=sys.stderr)
        return EXIT_CONFIG
    if args.format == "csv":
        print("wattprint jobs --fleet: --format csv is for per-job listings; use --json", file=sys.stderr)
        return EXIT_CONFIG
    args.json = args.json or args.format == "json"
    try:
        now = time.time()
        since = parse_time("--since", args.since) if args.since is not None else now - 30 * 86400
        until = parse_time("--until", args.until) if args.until is not None else now + 60
    except BadRequest as exc:
        print(f"wattprint jobs: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        rows = fleet_totals(cfg.influxdb, since, until, args.label)
    except FleetError as exc:
        print(f"wattprint jobs --fleet: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if args.json:
        json.dump({"labels": rows, "since": since, "until": until}, sys.stdout, indent=2)
        print()
        return EXIT_OK
    print(f"{'LABEL':<32} {'kWh':>12} {'CO2e g':>12} {'EMBODIED g':>12} {'WATER L':>10}  HOSTS")
    for r in rows:
        print(f"{_printable(r['label'] or '-', 32):<32} {r['energy_kwh']:>12.4f} {r['co2e_g']:>12.2f} "
              f"{r['embodied_co2e_g']:>12.2f} {r['water_l']:>10.3f}  {_printable(','.join(r['hosts']), 60)}")
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if args.fleet:
        return cmd_fleet(args, cfg)
    params: dict[str, Any] = {"state": args.state, "label": args.label, "user": args.user, "limit": args.limit}
    try:
        if args.since is not None:
            params["since"] = parse_time("--since", args.since)
        if args.until is not None:
            params["until"] = parse_time("--until", args.until)
    except BadRequest as exc:
        print(f"wattprint jobs: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    base = api_base(cfg, args.url)
    try:
        jobs = fetch_json(base, "/api/v1/jobs", params, token=cfg.http.token)["jobs"]
    except RuntimeError as exc:
        print(f"wattprint jobs: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except OSError as exc:
        # No daemon answering: read the local store directly.
        from .app import store_path
        from .footprint.factors import build_footprint
        from .ledger import LedgerError, LedgerReader

        print(f"wattprint jobs: daemon at {base} not reachable ({getattr(exc, 'reason', exc)}); "
              "reading the local store", file=sys.stderr)
        try:
            reader = LedgerReader(store_path(cfg), pue=cfg.accounting.pue,
                                  price_per_kwh=cfg.accounting.price_per_kwh, currency=cfg.accounting.currency,
                                  footprint=build_footprint(cfg))
        except LedgerError as exc2:
            print(f"wattprint jobs: {exc2}", file=sys.stderr)
            return EXIT_FAIL
        try:
            jobs = reader.jobs(now=time.time(), **{k: v for k, v in params.items() if v is not None})
        finally:
            reader.close()
        stale = [j["last_seen"] for j in jobs if j["state"] == "running"]
        jobs = [stale_running({**j, "label_note": label_note(j, cfg.jobs.max_labels_per_user)}) for j in jobs]
        if stale:
            print(f"wattprint jobs: the daemon is not answering: {len(stale)} job(s) it last saw running are "
                  f"shown as {STATE_UNKNOWN!r}, with durations up to the last tick that booked them "
                  f"(latest {_fmt_time(max(stale))} UTC)", file=sys.stderr)
    if args.json or args.format == "json":
        json.dump({"jobs": jobs, "count": len(jobs)}, sys.stdout, indent=2)
        print()
    elif args.format == "csv":
        from .csvout import write_jobs_csv

        sys.stdout.reconfigure(newline="")  # type: ignore[union-attr]  # the csv module writes \r\n itself
        write_jobs_csv(jobs, sys.stdout)
    else:
        print_jobs_table(jobs)
    return EXIT_OK


def cmd_estimate(args: argparse.Namespace) -> int:
    from .plan import estimate, estimate_json
    from .grid.static import lookup_static

    if args.zone is not None and args.g_per_kwh is not None:
        print("wattprint estimate: give --zone or --g-per-kwh, not both", file=sys.stderr)
        return EXIT_CONFIG
    g_per_kwh: float | None
    if args.g_per_kwh is not None:
        g_per_kwh, source = args.g_per_kwh, "--g-per-kwh"
    else:
        zone = args.zone if args.zone is not None else "WORLD"
        entry = lookup_static(zone)
        if entry is None:
            print(f"wattprint estimate: zone {zone!r} is not in the shipped table of average intensities; "
                  "give --g-per-kwh instead", file=sys.stderr)
            return EXIT_CONFIG
        g_per_kwh, source = entry.g_per_kwh, f"{entry.code} average: {entry.source}"
    try:
        result = estimate(args.device, args.hours, g_per_kwh, args.pue, intensity_source=source)
    except ValueError as exc:
        print(f"wattprint estimate: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    doc = estimate_json(result)
    life = None
    if args.embodied or args.water:
        life = _estimate_lifecycle(args, result, args.zone if args.zone is not None else "WORLD")
        if life is None:
            return EXIT_CONFIG
        doc.update(_lifecycle_json(life))
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        print()
        return EXIT_OK
    for d in doc["inputs"]["devices"]:
        what = d["model"] or "given"
        print(f"  {d['spec']:<20} {what:<16} {d['rated_w']:>7g} W x {d['count']} x {d['utilisation']:g} "
              f"= {d['power_w']:>9g} W   ({d['rated_w_source']})")
    print(f"power:     {doc['power_kw']:g} kW")
    print(f"energy:    {doc['energy_kwh']:g} kWh over {args.hours:g} h")
    print(f"CO2e:      {doc['co2e_g']:g} g at {g_per_kwh:g} gCO2e/kWh x PUE {args.pue:g} ({source})")
    if life is not None:
        _print_lifecycle(doc, life, args)
    return EXIT_OK


def _estimate_lifecycle(args: argparse.Namespace, result: Any, zone: str) -> Any:
    """The ``--embodied`` / ``--water`` parts with the config's ``[footprint]`` factors
    (``--config``, else /etc/wattprint/wattprint.toml when present, else the shipped data)
    and the plan's zone for EWIF. None after printing a config error."""
    import dataclasses

    from .footprint import build_footprint
    from .plan import lifecycle

    try:
        cfg = _load(args.config)
    except ConfigError as exc:
        print(f"wattprint estimate: {exc}", file=sys.stderr)
        return None
    cfg = dataclasses.replace(cfg, grid=dataclasses.replace(cfg.grid, zone=zone))
    return lifecycle(result, build_footprint(cfg), embodied=args.embodied, water=args.water)


def _lifecycle_json(life: Any) -> dict[str, Any]:
    from .plan import lifecycle_json

    return lifecycle_json(life)


def _print_lifecycle(doc: dict[str, Any], life: Any, args: argparse.Namespace) -> None:
    life_factor = next((f for f in life.factors if f.name == "service_life"), None)
    if life.embodied_co2e_g is not None and life_factor is not None:
        for d in doc["lifecycle"]["devices"]:
            note = " (class default)" if d["default"] else ""
            print(f"  {d['spec']:<20} {d['count']} x {d['kgco2e_per_board']:g} kgCO2e{note} x {args.hours:g} h / "
                  f"{life_factor.value:g} y = {d['embodied_co2e_g']:g} g")
        print(f"embodied:  {doc['embodied_co2e_g']:g} g CO2e (GPU boards' manufacturing over {args.hours:g} h of "
              f"a {life_factor.value:g}-year service life; the host's CPU, DRAM and platform are not in a plan)")
    if life.water_l is not None:
        wue = next(f for f in life.factors if f.name == "wue")
        ewif = next(f for f in life.factors if f.name == "ewif")
        print(f"water:     {doc['water_l']:g} L = {doc['energy_kwh']:g} kWh x (WUE {wue.value:g} + PUE "
              f"{args.pue:g} x EWIF {ewif.value:g} L/kWh)")
    for f in life.factors:
        print(f"  factor {_printable(f.name, 60)} = {f.value:g} {f.unit} [{f.version}{', default' if f.default else ''}]"
              f": {_printable(f.source, 160)}")


def cmd_deploy(args: argparse.Namespace) -> int:
    from .deploy import DeployError, write

    try:
        written = write(args.kind, args.dir, executable=args.executable, force=args.force)
    except DeployError as exc:
        print(f"wattprint deploy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"wattprint deploy: {exc.filename or args.dir}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAIL
    for path in written:
        print(path)
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import report, run_checks

    cfg = _load(args.config)
    return report(run_checks(cfg, api_base(cfg, args.url)), args.json)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="wattprint", description="Per-job GPU, CPU and DRAM energy and CO2e.")
    p.add_argument("--version", action="version", version=f"wattprint {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", help="TOML config file (default /etc/wattprint/wattprint.toml if present)")
    run.set_defaults(func=cmd_run)

    chk = sub.add_parser("check-config", help="validate and print the effective config")
    chk.add_argument("--config")
    chk.set_defaults(func=cmd_check_config)

    jobs = sub.add_parser("jobs", help="per-job totals")
    jobs.add_argument("--config")
    jobs.add_argument("--state", choices=["running", "finished"])
    jobs.add_argument("--since", help="seconds since epoch or ISO 8601")
    jobs.add_argument("--until", help="seconds since epoch or ISO 8601")
    jobs.add_argument("--label")
    jobs.add_argument("--user")
    jobs.add_argument("--limit", type=int, default=100)
    jobs.add_argument("--json", action="store_true", help="print JSON (same as --format json)")
    jobs.add_argument("--format", choices=["table", "json", "csv"], default="table",
                      help="table (default), json, or csv: one row per job, ISO 8601 times, kWh, kg CO2e "
                           "(columns in docs/api.md)")
    jobs.add_argument("--url", help="daemon base URL (default from [http] listen)")
    jobs.add_argument("--fleet", action="store_true",
                      help="per-label totals across all hosts, from InfluxDB ([influxdb] in the config)")
    jobs.set_defaults(func=cmd_jobs)

    est = sub.add_parser("estimate", help="plan before running: energy and CO2e of devices x hours")
    est.add_argument("--device", action="append", required=True, metavar="SPEC",
                     help="MODEL_OR_WATTS[:COUNT[:UTILISATION]], e.g. V100:10:0.8 or 200:2:0.6 (repeatable)")
    est.add_argument("--hours", type=float, required=True)
    est.add_argument("--zone", help="grid zone for the shipped average intensity (default WORLD)")
    est.add_argument("--g-per-kwh", type=float, dest="g_per_kwh", help="grid intensity in gCO2e/kWh")
    est.add_argument("--pue", type=float, default=1.0)
    est.add_argument("--json", action="store_true")
    est.add_argument("--embodied", action="store_true",
                     help="add the GPU boards' manufacturing CO2e over the run (docs/carbon.md, Lifecycle footprint)")
    est.add_argument("--water", action="store_true", help="add the run's water: kWh x (WUE + PUE x EWIF of the zone)")
    est.add_argument("--config", help="config whose [footprint] factors --embodied/--water use "
                                      "(default /etc/wattprint/wattprint.toml if present, else the shipped data)")
    est.set_defaults(func=cmd_estimate)

    dep = sub.add_parser("deploy", help="write the shipped systemd unit and example config, Prometheus config "
                                        "and rules, or Grafana provisioning and dashboards into DIR")
    dep.add_argument("kind", choices=["systemd", "prometheus", "grafana"])
    dep.add_argument("dir", metavar="DIR")
    dep.add_argument("--exec", dest="executable", metavar="PATH",
                     help="systemd: the wattprint executable for ExecStart= (default: the one running)")
    dep.add_argument("--force", action="store_true", help="overwrite files that exist")
    dep.set_defaults(func=cmd_deploy)

    doc = sub.add_parser("doctor", help="what wattprint can read here and what not, and why "
                                        "(exit 0: set-up complete, 1: something fails)")
    doc.add_argument("--config")
    doc.add_argument("--url", help="daemon base URL to compare with (default from [http] listen)")
    doc.add_argument("--json", action="store_true")
    doc.set_defaults(func=cmd_doctor)

    from .cli_exec import add_exec_command
    from .cli_report import add_report_command

    add_report_command(sub)
    add_exec_command(sub)
    from .slurm_summary import add_slurm_command

    add_slurm_command(sub)
    return p


CONFIG_ENV = "WATTPRINT_CONFIG"  # a config file path, for every command without --config
URL_ENV = "WATTPRINT_URL"  # the daemon's base URL, for every command without --url


def apply_env_defaults(args: argparse.Namespace, env: Any = None) -> None:
    """``--config`` from WATTPRINT_CONFIG and ``--url`` from WATTPRINT_URL where the
    command has the option and it was not given (a site sets them once, e.g. in
    slurm.conf's environment for the epilogs). Empty values are ignored."""
    env = os.environ if env is None else env
    if getattr(args, "config", "unset") is None and env.get(CONFIG_ENV, "").strip():
        args.config = env[CONFIG_ENV].strip()
    if getattr(args, "url", "unset") is None and env.get(URL_ENV, "").strip():
        args.url = env[URL_ENV].strip()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_env_defaults(args)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"wattprint: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
