"""``wattprint doctor``: what wattprint can read on this machine, what it cannot, and why.

Each check reads what the daemon would read, with this process's privileges (run it as
the daemon's user, or as root like the shipped unit): NVML and its versions, and for
each GPU its energy counter, process list, per-process utilisation and MIG mode; the
RAPL zones and whether their counters are readable; whether other users' processes and
environments are readable (capabilities); the grid provider and InfluxDB (one real
request each); the API address and token, and, when a daemon answers there, its
``/healthz`` (a part the daemon reports not ok is a problem here too, so the two agree).

Verdicts: ``ok``; ``info`` (a fact, nothing to fix: no energy counter on a Pascal
board, MIG disabled); ``warn`` (works, but worth a look); ``fail`` (something the
configuration asks for cannot be read: the set-up is incomplete). Exit status 0 when
nothing fails, 1 when something does, 2 for a bad config (as every command).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from datetime import timedelta
from importlib import metadata
from typing import Any, Callable

from .config import Config, InfluxConfig

OK, INFO, WARN, FAIL = "ok", "info", "warn", "fail"
HTTP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Check:
    """One verdict: ``area`` (gpu, gpu0, rapl, processes, grid, influxdb, api, daemon,
    config), ``status`` (ok | info | warn | fail), what was found, and what to do."""

    area: str
    status: str
    found: str
    fix: str = ""


# -- GPU -------------------------------------------------------------------------------

def _nvml_module(cfg: Config) -> Any:
    if cfg.gpu.backend == "sim":
        from .sources.nvml_sim import SimulatedNvml

        return SimulatedNvml(cfg.gpu.sim_file)
    import pynvml

    return pynvml


def _err(exc: BaseException) -> str:
    from .sources.gpu import nvml_error_text

    return nvml_error_text(exc)


def _code(exc: BaseException) -> Any:
    return getattr(exc, "value", None)


def check_gpu(cfg: Config) -> list[Check]:
    from pynvml import (NVML_ERROR_DRIVER_NOT_LOADED, NVML_ERROR_LIBRARY_NOT_FOUND, NVML_ERROR_NO_PERMISSION,
                        NVML_ERROR_NOT_FOUND, NVML_ERROR_NOT_SUPPORTED, NVMLError)

    if cfg.gpu.backend == "none":
        return [Check("gpu", INFO, "GPU measurement disabled ([gpu] backend = \"none\")")]
    try:
        nvml = _nvml_module(cfg)
        nvml.nvmlInit()
    except (NVMLError, OSError) as exc:
        no_driver = _code(exc) in (NVML_ERROR_DRIVER_NOT_LOADED, NVML_ERROR_LIBRARY_NOT_FOUND)
        if cfg.gpu.backend == "auto" and no_driver:
            return [Check("gpu", INFO, f"no NVIDIA driver ({_err(exc)}): GPU energy not measured",
                          "nothing to do on a machine without NVIDIA GPUs; else install / load the driver")]
        return [Check("gpu", FAIL, f"NVML cannot start ({_err(exc)})",
                      "install / load the NVIDIA driver, or set [gpu] backend = \"none\"")]
    out: list[Check] = []
    try:
        def version(call: str) -> str:
            try:
                return str(getattr(nvml, call)())
            except (NVMLError, AttributeError):
                return "unknown"

        try:
            nvml_py = metadata.version("nvidia-ml-py")
        except metadata.PackageNotFoundError:
            nvml_py = "not installed"
        count = int(nvml.nvmlDeviceGetCount())
        out.append(Check("gpu", OK if count else WARN,
                         f"NVML {version('nvmlSystemGetNVMLVersion')}, driver {version('nvmlSystemGetDriverVersion')}, "
                         f"nvidia-ml-py {nvml_py}; {count} GPU(s)"
                         + (f" (simulated from {cfg.gpu.sim_file})" if cfg.gpu.backend == "sim" else ""),
                         "" if count else "no GPU found: check nvidia-smi"))
        for i in range(count):
            out.extend(_check_one_gpu(nvml, i, NVMLError, NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_NOT_FOUND,
                                      NVML_ERROR_NO_PERMISSION))
    except NVMLError as exc:
        out.append(Check("gpu", FAIL, f"NVML failed while listing GPUs ({_err(exc)})"))
    finally:
        try:
            nvml.nvmlShutdown()
        except NVMLError:
            pass
    return out


def _check_one_gpu(nvml: Any, i: int, NVMLError: type, NOT_SUPPORTED: int, NOT_FOUND: int,
                   NO_PERMISSION: int) -> list[Check]:
    area = f"gpu{i}"
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        name, uuid = str(nvml.nvmlDeviceGetName(handle)), str(nvml.nvmlDeviceGetUUID(handle))
    except NVMLError as exc:
        return [Check(area, FAIL, f"cannot open GPU {i} ({_err(exc)})", "check nvidia-smi; the GPU may be lost")]
    out = [Check(area, INFO, f"{name}, {uuid}")]
    try:
        nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        out.append(Check(area, OK, "energy counter readable (source=counter)"))
    except NVMLError as exc:
        if _code(exc) == NOT_SUPPORTED:
            out.append(Check(area, INFO, "no energy counter (before Volta): power is sampled and integrated "
                                         "(source=power, [gpu] power_sample_hz)"))
        else:
            out.append(Check(area, FAIL, f"energy counter unreadable ({_err(exc)})", "run as root"))
    try:
        procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        out.append(Check(area, OK, f"process list readable ({len(procs)} compute process(es) now)"))
    except NVMLError as exc:
        fix = "run the daemon as root (the shipped unit does)" if _code(exc) == NO_PERMISSION else ""
        out.append(Check(area, FAIL, f"process list unreadable ({_err(exc)}): its energy cannot be attributed "
                                     "to jobs (stays unattributed)", fix))
    try:
        nvml.nvmlDeviceGetProcessUtilization(handle, 0)
        out.append(Check(area, OK, "per-process utilisation supported"))
    except NVMLError as exc:
        if _code(exc) == NOT_FOUND:
            out.append(Check(area, OK, "per-process utilisation supported (no samples yet)"))
        elif _code(exc) == NOT_SUPPORTED:
            out.append(Check(area, INFO, "no per-process utilisation (MIG or an older board): the GPU's energy is "
                                         "split by memory held (docs/jobs.md)"))
        else:
            out.append(Check(area, WARN, f"per-process utilisation failed ({_err(exc)}): split by memory held"))
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        out.append(Check(area, INFO, "MIG enabled: each GPU instance is attributed as a device of its own"
                         if current else "MIG capable, disabled"))
    except NVMLError as exc:
        if _code(exc) == NOT_SUPPORTED:
            out.append(Check(area, INFO, "not MIG capable"))
        else:
            out.append(Check(area, WARN, f"MIG mode unreadable ({_err(exc)})"))
    return out


# -- RAPL ------------------------------------------------------------------------------

def check_rapl(cfg: Config) -> list[Check]:
    from .sources.base import SourceError
    from .sources.rapl import _read_energy_uj, discover_zones

    source, root = cfg.cpu.source, cfg.cpu.powercap_root
    if source == "none":
        return [Check("rapl", INFO, "CPU measurement disabled ([cpu] source = \"none\")")]
    if source == "estimate":
        return [Check("rapl", INFO, f"CPU energy estimated from load x [cpu] tdp_w = {cfg.cpu.tdp_w:g} W "
                                    "(source=estimate), by config")]
    zones = discover_zones(root)
    if not zones:
        status = FAIL if source == "rapl" else INFO
        return [Check("rapl", status, f"no RAPL zones under {root}: CPU energy "
                                      + ("cannot be read" if source == "rapl" else "estimated (source=estimate)"),
                      "a VM or a CPU without powercap: use [cpu] source = \"estimate\"" if source == "rapl" else "")]
    out: list[Check] = []
    for zone in zones:
        where = f"{zone.device} ({zone.zone_id})"
        try:
            _read_energy_uj(zone)
        except SourceError as exc:
            out.append(Check("rapl", FAIL, f"{where}: {exc.detail}",
                             "run the daemon as root or with CAP_DAC_READ_SEARCH (the shipped unit does)"))
            continue
        except (OSError, ValueError) as exc:
            out.append(Check("rapl", FAIL, f"{where}: energy_uj unreadable: {exc}"))
            continue
        rng = (f"wraps at {zone.max_energy_range_uj} uJ" if zone.max_energy_range_uj is not None
               else f"range unknown ({zone.max_problem}): wraps cannot be corrected")
        out.append(Check("rapl", OK if zone.max_energy_range_uj is not None else WARN,
                         f"{where}: energy_uj readable, {rng}"))
    return out


# -- processes -------------------------------------------------------------------------

def check_processes(cfg: Config, proc_root: str = "/proc") -> list[Check]:
    from .procs import effective_capabilities, missing_label_capabilities

    me = os.getuid()
    missing = missing_label_capabilities(effective_capabilities(proc_root))
    others = refused = 0
    try:
        pids = [int(p) for p in os.listdir(proc_root) if p.isdigit()]
    except OSError as exc:
        return [Check("processes", FAIL, f"{proc_root} unreadable: {exc}")]
    for pid in pids:
        try:
            if os.stat(f"{proc_root}/{pid}").st_uid == me:
                continue
            with open(f"{proc_root}/{pid}/environ", "rb") as fh:
                fh.read(1)
            others += 1
        except PermissionError:
            others += 1
            refused += 1
        except OSError:
            continue  # exited, or a kernel thread
    caps = "all needed capabilities" if not missing else "missing " + ", ".join(missing)
    seen = (f"{others - refused} of {others} other users' process environments readable (job labels)"
            if others else "no other users' processes running to check")
    found = f"{seen}; uid {me}, {caps}"
    if refused:
        return [Check("processes", FAIL, found,
                      "run the daemon as root with CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH (the shipped unit)")]
    if missing and others == 0:
        return [Check("processes", WARN, found + ": other users' labels will not be readable",
                      "grant " + ", ".join(missing))]
    return [Check("processes", OK, found)]


# -- grid ------------------------------------------------------------------------------

def check_grid(cfg: Config) -> list[Check]:
    from .grid.base import ProviderError, utcnow
    from .grid.factory import make_provider
    from .grid.static import StaticProvider

    try:
        provider = make_provider(cfg.grid)
    except ValueError as exc:
        return [Check("grid", FAIL, str(exc))]
    if isinstance(provider, StaticProvider):
        return [Check("grid", OK, provider.note)]

    async def fetch() -> int:
        import aiohttp

        now = utcnow()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            points = await provider.fetch(session, now - timedelta(hours=3), now + timedelta(hours=3))
        return len(points)

    try:
        n = asyncio.run(asyncio.wait_for(fetch(), 30))
    except ProviderError as exc:
        return [Check("grid", FAIL, f"{provider.name} ({provider.zone}) not usable: {exc}",
                      "check [grid] zone, token and base_url, and outbound HTTPS")]
    except Exception as exc:  # timeouts, DNS, TLS: one line, never a traceback
        return [Check("grid", FAIL, f"{provider.name} ({provider.zone}) not reachable: {type(exc).__name__}: {exc}")]
    if n == 0:
        return [Check("grid", WARN, f"{provider.name} ({provider.zone}) answered with no points for the last 3 h")]
    return [Check("grid", OK, f"{provider.name} ({provider.zone}) reachable: {n} point(s) around now")]


# -- InfluxDB --------------------------------------------------------------------------

def _get(url: str, headers: dict[str, str], timeout_s: float) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, resp.read(1 << 20)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(1 << 16)


def check_influx(ix: InfluxConfig) -> list[Check]:
    from .config import redact_text

    if not ix.enabled:
        return [Check("influxdb", INFO, "disabled ([influxdb] enabled = false)")]
    base = ix.url.rstrip("/")
    shown = redact_text(base, ())
    timeout = min(ix.timeout_s, HTTP_TIMEOUT_S)
    try:
        status, _ = _get(f"{base}/ping", {}, timeout)
        if status != 204:
            return [Check("influxdb", FAIL, f"{shown}/ping answered {status}, not 204: not an InfluxDB")]
        if ix.api == "v2":
            q = urllib.parse.urlencode({"name": ix.bucket, "org": ix.org})
            status, body = _get(f"{base}/api/v2/buckets?{q}", {"Authorization": f"Token {ix.token}"}, timeout)
            names = [b.get("name") for b in json.loads(body or b"{}").get("buckets", [])] if status == 200 else []
            target = f"bucket {ix.bucket!r}"
        else:
            headers = {}
            if ix.username:
                cred = base64.b64encode(f"{ix.username}:{ix.password}".encode()).decode()
                headers["Authorization"] = f"Basic {cred}"
            status, body = _get(f"{base}/query?q=SHOW+DATABASES", headers, timeout)
            values = json.loads(body or b"{}").get("results", [{}])[0].get("series", [{}])[0].get("values", []) \
                if status == 200 else []
            names = [v[0] for v in values]
            target = f"database {ix.database!r}"
    except (OSError, ValueError) as exc:
        return [Check("influxdb", FAIL, f"{shown} not reachable: {getattr(exc, 'reason', exc)}",
                      "start InfluxDB or fix [influxdb] url; until then lines wait in the spool")]
    if status in (401, 403):
        return [Check("influxdb", FAIL, f"{shown}: credentials refused ({status})",
                      "fix [influxdb] username / password / token")]
    if status != 200:
        return [Check("influxdb", FAIL, f"{shown}: listing databases answered {status}")]
    if (ix.bucket if ix.api == "v2" else ix.database) not in names:
        return [Check("influxdb", FAIL, f"{shown}: {target} does not exist", "create it (docs/influxdb.md)")]
    return [Check("influxdb", OK, f"{shown} reachable, {target} exists")]


# -- API and the running daemon ---------------------------------------------------------

def check_api(cfg: Config, base: str, local: list[Check]) -> list[Check]:
    token = "set" if cfg.http.token else "not set"
    out = [Check("api", INFO, f"listen {cfg.http.listen}, token {token}"
                              + (f", socket {cfg.http.socket}" if cfg.http.socket else ""))]
    warning = cfg.listen_warning()
    if warning:
        out.append(Check("api", WARN, warning))
    headers = {"Authorization": f"Bearer {cfg.http.token}"} if cfg.http.token else {}
    try:
        status, body = _get(f"{base}/healthz", headers, HTTP_TIMEOUT_S)
    except (OSError, ValueError) as exc:
        out.append(Check("daemon", INFO, f"no daemon answering at {base} ({getattr(exc, 'reason', exc)})",
                         "start it (systemctl start wattprint) to compare with its own view"))
        return out
    if status == 401:
        out.append(Check("daemon", FAIL, f"{base} refused the token ({status})",
                         "[http] token here differs from the daemon's"))
        return out
    try:
        health = json.loads(body)
        parts = {p["name"]: p for p in health.get("parts", [])}
    except (ValueError, KeyError, TypeError, AttributeError):
        out.append(Check("daemon", FAIL, f"{base}/healthz answered {status} with no health document"))
        return out
    out.append(Check("daemon", OK if health.get("status") == "ok" else FAIL,
                     f"daemon at {base}: {health.get('status')}, tick {health.get('tick', 0)}"))
    for name, part in sorted(parts.items()):
        if part.get("state") == "degraded":
            out.append(Check("daemon", FAIL, f"the daemon reports {name} degraded: {part.get('detail', '')}"))
    return out


# -- running all checks -------------------------------------------------------------------

CheckFn = Callable[[Config], list[Check]]


def run_checks(cfg: Config, base: str) -> list[Check]:
    """Every check, in the order they are shown. Never raises for what it finds."""
    out = [Check("config", OK, f"loaded from {cfg.source_path or 'embedded defaults'} and WATTPRINT_* variables")]
    steps: list[tuple[str, Callable[[], list[Check]]]] = [
        ("gpu", lambda: check_gpu(cfg)),
        ("rapl", lambda: check_rapl(cfg)),
        ("processes", lambda: check_processes(cfg)),
        ("grid", lambda: check_grid(cfg)),
        ("influxdb", lambda: check_influx(cfg.influxdb)),
    ]
    for area, step in steps:
        try:
            out.extend(step())
        except Exception as exc:  # a check that breaks is a finding, not a traceback
            out.append(Check(area, FAIL, f"check failed: {type(exc).__name__}: {exc}"))
    out.extend(check_api(cfg, base, out))
    return out


_MARK = {OK: " ok ", INFO: "info", WARN: "warn", FAIL: "FAIL"}


def report(checks: list[Check], as_json: bool, out: Any = sys.stdout) -> int:
    """Print the checks; return the exit status (1 when any failed)."""
    from .report import printable

    failed = [c for c in checks if c.status == FAIL]
    if as_json:
        json.dump({"complete": not failed, "checks": [asdict(c) for c in checks]}, out, indent=2)
        print(file=out)
    else:
        for c in checks:
            print(f"[{_MARK[c.status]}] {c.area:<10} {printable(c.found, 400)}", file=out)
            if c.fix and c.status in (WARN, FAIL):
                print(f"{'':18}-> {printable(c.fix, 400)}", file=out)
        print(f"\nset-up {'complete' if not failed else f'incomplete: {len(failed)} problem(s)'}", file=out)
    return 1 if failed else 0


__all__ = ["Check", "run_checks", "report"]
