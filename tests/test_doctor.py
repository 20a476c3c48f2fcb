"""``wattprint doctor`` on the simulated box (issue 17 item 5): a simulated GPU (sim
file), a fake powercap tree, a real influxd, a stand-in grid API and the real daemon.
In a complete set-up it exits 0 and every part is ok, as the daemon's /healthz says;
in a broken one (process list refused, no RAPL zones where RAPL is asked for,
InfluxDB and the grid API not answering) it exits 1, names each problem with its
fix, and the daemon's /healthz degrades exactly the parts doctor fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon_harness import DaemonProcess, wait_ticks
from gpusim import gpu, proc, write_sim
from powercap import PowercapTree
from processes import Processes
from servers import BackgroundAppFactory, InfluxServer, free_port

TOKEN = "doctor-test-token"


def doctor(config: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("WATTPRINT_")}
    result = subprocess.run([sys.executable, "-m", "wattprint.daemon", "doctor", "--config", str(config), "--json",
                             *extra], capture_output=True, text=True, timeout=120, env={**base, **(env or {})})
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def by_area(report: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for c in report["checks"]:
        out.setdefault(c["area"], []).append(c)
    return out


def failing_parts(report: dict[str, Any]) -> set[str]:
    """Doctor's failing areas, named as /healthz names its parts (gpu0 -> gpu)."""
    names = set()
    for c in report["checks"]:
        if c["status"] == "fail" and c["area"] not in ("daemon", "api", "config"):
            names.add("gpu" if c["area"].startswith("gpu") else c["area"])
    return names


def uk_grid(background_app: BackgroundAppFactory) -> str:
    import time

    from test_deploy_grafana import fake_uk_grid_api

    return background_app(fake_uk_grid_api(time.time())).url


class TokenDaemon(DaemonProcess):
    """The real daemon with ``[http] token`` set: the harness's own requests carry it."""

    def get(self, path: str, allow_error: bool = False, headers: dict[str, str] | None = None) -> Any:
        return super().get(path, allow_error, {"Authorization": f"Bearer {TOKEN}", **(headers or {})})


def box(tmp_path: Path, worker: subprocess.Popen, *, sim_gpu: dict[str, Any], extra_toml: str,
        rapl: bool = True) -> DaemonProcess:
    """The daemon over one simulated GPU with ``worker`` (a labelled process) on it."""
    sim_gpu["processes"] = [proc(worker.pid, sm_util=50)]
    sim = write_sim(tmp_path / "sim.json", [sim_gpu])
    powercap = tmp_path / "powercap"
    tree = PowercapTree(powercap)
    if rapl:
        tree.add_package(0, dram=True)
    daemon = TokenDaemon(tmp_path, sim_file=sim, powercap_root=powercap, extra_toml="")
    # the harness writes [http] listen; the token goes into the same section
    text = daemon.config_path.read_text().replace("[http]\n", f'[http]\ntoken = "{TOKEN}"\n', 1)
    daemon.config_path.write_text(text + extra_toml)
    return daemon


def healthz(daemon: DaemonProcess) -> dict[str, Any]:
    return daemon.get("/healthz", allow_error=True)


def stop(daemon: DaemonProcess) -> None:
    daemon.stop()  # (the worker is labelled_process's: killed after the test)


@pytest.mark.slow
def test_complete_setup_exits_0_and_agrees_with_healthz(tmp_path: Path, influxdb_server: InfluxServer,
                                                        background_app: BackgroundAppFactory,
                                                        labelled_process: Processes) -> None:
    influxdb_server.create_database("wattprint")
    extra = (f'[influxdb]\nenabled = true\nurl = "{influxdb_server.url}"\ndatabase = "wattprint"\n'
             f'[grid]\nprovider = "carbonintensity_uk"\nzone = "GB"\nbase_url = "{uk_grid(background_app)}"\n')
    daemon = box(tmp_path, labelled_process("doctor-job"), sim_gpu=gpu(0, 250.0, name="NVIDIA H100 80GB HBM3"),
                 extra_toml=extra)
    try:
        daemon.start()
        wait_ticks(daemon, 3)
        health = healthz(daemon)
        code, report = doctor(daemon.config_path)
    finally:
        stop(daemon)
    areas = by_area(report)
    assert (code, report["complete"]) == (0, True), report
    assert not [c for c in report["checks"] if c["status"] in ("fail", "warn")], report
    found = {c["area"]: " | ".join(x["found"] for x in areas[c["area"]]) for c in report["checks"]}
    assert "1 GPU(s)" in found["gpu"] and "simulated" in found["gpu"]
    for fact in ("NVIDIA H100 80GB HBM3", "GPU-00000000-sim", "energy counter readable", "process list readable",
                 "per-process utilisation supported", "MIG capable, disabled"):
        assert fact in found["gpu0"], (fact, found["gpu0"])
    assert "package-0 (intel-rapl:0): energy_uj readable" in found["rapl"]
    assert "dram-0 (intel-rapl:0:1): energy_uj readable" in found["rapl"]
    assert "database 'wattprint' exists" in found["influxdb"]
    assert "carbonintensity_uk (GB) reachable" in found["grid"]
    assert "token set" in found["api"] and "ok" in found["daemon"]
    # /healthz agrees: every part ok (the node's BMC is not configured here: disabled, no fault).
    parts = {p["name"]: p for p in health["parts"]}
    assert parts.pop("node")["state"] == "disabled", health
    assert health["status"] == "ok" and all(p["state"] == "ok" for p in parts.values()), health


@pytest.mark.slow
def test_broken_setup_exits_1_names_each_problem_and_agrees_with_healthz(tmp_path: Path,
                                                                          labelled_process: Processes) -> None:
    dead = free_port()
    extra = (f'[influxdb]\nenabled = true\nurl = "http://127.0.0.1:{dead}"\ndatabase = "wattprint"\n'
             f'[grid]\nprovider = "carbonintensity_uk"\nzone = "GB"\nbase_url = "http://127.0.0.1:{dead}"\n')
    broken_gpu = gpu(0, 250.0, errors={"nvmlDeviceGetComputeRunningProcesses": "NO_PERMISSION"})
    # [cpu] source = "rapl" (the harness's) over a powercap tree with no zones
    daemon = box(tmp_path, labelled_process("doctor-job"), sim_gpu=broken_gpu, extra_toml=extra, rapl=False)
    try:
        daemon.start()
        wait_ticks(daemon, 3)
        code, report = doctor(daemon.config_path)
        health = healthz(daemon)
        # a wrong token is a problem of its own
        code_token, report_token = doctor(daemon.config_path, env={"WATTPRINT_HTTP_TOKEN": "wrong"})
    finally:
        stop(daemon)
    assert (code, report["complete"]) == (1, False)
    fails = {c["area"]: c for c in report["checks"] if c["status"] == "fail"}
    assert "process list unreadable" in fails["gpu0"]["found"] and "NoPermission" in fails["gpu0"]["found"]
    assert "root" in fails["gpu0"]["fix"]
    assert "no RAPL zones" in fails["rapl"]["found"]
    assert "not reachable" in fails["influxdb"]["found"]
    assert "not usable" in fails["grid"]["found"] or "not reachable" in fails["grid"]["found"]
    # /healthz and doctor agree part by part.
    not_ok = {p["name"] for p in health["parts"] if p["state"] != "ok"}
    assert failing_parts(report) == not_ok & {"gpu", "rapl", "influxdb", "grid", "processes"}, (health, report)
    assert health["status"] != "ok"
    assert code_token == 1 and any("refused the token" in c["found"] for c in report_token["checks"])


def test_other_users_environments_unreadable_without_capabilities(tmp_path: Path) -> None:
    """Run as an unprivileged user (setpriv, no capabilities) next to this test's own
    root processes: their environments (job labels) are refused, doctor says which
    capabilities are missing and exits 1."""
    if os.geteuid() != 0:
        from servers import running_in_ci

        if running_in_ci():
            pytest.fail("needs root to switch to another user", pytrace=False)
        pytest.skip("needs root to switch to another user")
    import shutil
    import tempfile

    where = Path(tempfile.mkdtemp(prefix="wattprint-doctor-"))  # pytest's tmp_path is root-only
    try:
        where.chmod(0o755)
        config = where / "wattprint.toml"
        config.write_text('[gpu]\nbackend = "none"\n[cpu]\nsource = "estimate"\n'
                          f'[http]\nlisten = "127.0.0.1:{free_port()}"\n')
        config.chmod(0o644)
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATTPRINT_")}
        result = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                                 "--inh-caps=-all", sys.executable, "-m", "wattprint.daemon", "doctor", "--json",
                                 "--config", str(config)], capture_output=True, text=True, timeout=120, env=env)
    finally:
        shutil.rmtree(where, ignore_errors=True)
    assert result.returncode == 1, result.stdout + result.stderr
    [check] = [c for c in json.loads(result.stdout)["checks"] if c["area"] == "processes"]
    assert check["status"] == "fail"
    assert "missing CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH" in check["found"] and "uid 65534" in check["found"]
    assert "0 of " in check["found"]  # every root process (this test's own, at least) refused
