"""Issue 17, items 1-2: the habits of the tools admins already run.

Versions (``wattprint --version``, ``__version__``, ``wattprint_build_info``,
``/api/v1/host``) all show pyproject.toml's version; the real daemon's exposition has a
real HELP for every metric, passes ``promtool check metrics``, carries ``process_*``
metrics and dcgm-exporter's ``UUID``/``modelName`` labels on GPU series, keeps the
deprecated reason-in-name counters beside the labelled one; and per-job series stay
under the documented bound with 3,000 short-lived labelled processes of one user.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon_harness import DaemonProcess, wait_ticks
from gpusim import gpu, write_sim
from powercap import PowercapTree
from servers import free_port, promtool_check_metrics

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
PLACEHOLDERS = ("Daemon counter", "Daemon gauge", "no description", "Multiprocess metric")
# Series of one job in /metrics: energy per kind (gpu, cpu, dram), co2e, running (docs/api.md).
SERIES_PER_JOB = 8  # energy gpu/cpu/dram, co2e, embodied, market, water, running (docs/api.md)


def test_version_flag_prints_the_pyproject_version_and_exits_0() -> None:
    result = subprocess.run([sys.executable, "-m", "wattprint.daemon", "--version"], capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stdout.strip()) == (0, f"wattprint {PYPROJECT_VERSION}")


def test_dunder_version_is_the_pyproject_version() -> None:
    import wattprint.daemon

    assert wattprint.daemon.__version__ == PYPROJECT_VERSION


def _families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


# device -> (UUID, model name), as the sim file says (gpusim.gpu: uuid GPU-<index:08d>-sim)
SIM_GPUS = {"gpu0": ("GPU-00000000-sim", "NVIDIA A100-SXM4-80GB"), "gpu1": ("GPU-00000001-sim", "NVIDIA H100 80GB HBM3")}


@pytest.fixture
def daemon(tmp_path: Path):
    sim = write_sim(tmp_path / "sim.json", [gpu(0, 200.0, name=SIM_GPUS["gpu0"][1]),
                                            gpu(1, 300.0, name=SIM_GPUS["gpu1"][1])])
    tree = PowercapTree(tmp_path / "powercap")
    tree.add_package(0)
    # An InfluxDB nobody listens on (loopback): the sink's counters are exported.
    influx = f'[influxdb]\nenabled = true\nurl = "http://127.0.0.1:{free_port()}"\ndatabase = "wattprint"\n'
    d = DaemonProcess(tmp_path, sim_file=sim, powercap_root=tree.root, extra_toml=influx)
    d.start()
    try:
        yield d
    finally:
        d.stop()


@pytest.mark.slow
def test_real_daemon_exposition_follows_exporter_conventions(daemon: DaemonProcess, promtool: str) -> None:
    wait_ticks(daemon, 2)
    text = daemon.metrics_text()

    # promtool's lint (HELP present, counter names, units) passes on the real exposition.
    result = promtool_check_metrics(text.encode(), promtool)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), text

    # Every family has a real HELP text.
    helps = {line.split(" ", 3)[2]: line.split(" ", 3)[3] for line in text.splitlines() if line.startswith("# HELP ")}
    types = {line.split(" ")[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    assert types <= set(helps), types - set(helps)
    bad = {name: h for name, h in helps.items() if any(p in h for p in PLACEHOLDERS) or len(h) < 15}
    assert not bad, bad

    families = _families(text)
    # Build info: one series, value 1, the pyproject version.
    build = [s for s in families["wattprint_build_info"].samples]
    assert len(build) == 1 and build[0].value == 1.0
    assert build[0].labels["version"] == PYPROJECT_VERSION
    assert build[0].labels["python"] == ".".join(map(str, sys.version_info[:3]))
    from importlib.metadata import version

    assert build[0].labels["nvml_py"] == version("nvidia-ml-py")

    # The daemon's own process metrics (prometheus_client's ProcessCollector).
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds",
                 "process_start_time_seconds"):
        assert name in families, name
    start = families["process_start_time_seconds"].samples[0].value
    assert abs(start - os.stat(f"/proc/{daemon.proc.pid}").st_mtime) < 30  # it is the daemon's, not ours

    # GPU series carry the UUID and model name (snake_case in the exposition; the shipped
    # Prometheus config stores them as dcgm-exporter's UUID / modelName: test below).
    for fam in ("wattprint_device_power_watts", "wattprint_device_energy_joules", "wattprint_device_info"):
        gpu_samples = [s for s in families[fam].samples if s.labels["kind"] == "gpu"]
        assert {s.labels["device"]: (s.labels["uuid"], s.labels["model_name"]) for s in gpu_samples} == SIM_GPUS
        cpu_samples = [s for s in families[fam].samples if s.labels["kind"] != "gpu"]
        assert cpu_samples and all("uuid" not in s.labels for s in cpu_samples)

    # The reason is a label; the old reason-in-name counters still exist, marked deprecated,
    # with the same values.
    labelled = {s.labels["reason"]: s.value for s in families["wattprint_influx_points_dropped"].samples}
    assert {"spool_full", "invalid", "rejected"} <= set(labelled)
    for reason, value in labelled.items():
        old = f"wattprint_influx_points_dropped_{reason}"
        assert families[old].samples[0].value == value
        assert helps[old + "_total"].startswith("Deprecated")

    # The version is in /api/v1/host as well.
    assert daemon.get("/api/v1/host")["version"] == PYPROJECT_VERSION


@pytest.mark.slow
def test_shipped_prometheus_config_stores_dcgm_join_labels(daemon: DaemonProcess, tmp_path: Path) -> None:
    """A real Prometheus with deploy/prometheus/prometheus.yml scraping the real daemon
    stores GPU series with dcgm-exporter's UUID and modelName (and not uuid/model_name)."""
    from servers import LOOPBACK, ServerError, require_binary, wait_http
    from test_deploy_prometheus import RULES, api, example_config_for, poll

    binary = require_binary("prometheus")
    (tmp_path / "prometheus.yml").write_text(example_config_for(f"127.0.0.1:{daemon.port}"))
    (tmp_path / "wattprint.rules.yml").write_text(RULES.read_text())
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address={LOOPBACK}:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    url = f"http://{LOOPBACK}:{port}"
    try:
        try:
            wait_http(f"{url}/-/ready", expect=(200,), alive=lambda: proc.poll() is None)
        except ServerError as exc:
            raise ServerError(f"{exc}\n{(tmp_path / 'prometheus.log').read_text(errors='replace')}") from None

        def gpu_series() -> list[dict[str, str]]:
            result = api(url, "/api/v1/query?query=wattprint_device_power_watts%7Bkind%3D%22gpu%22%7D")["result"]
            assert len(result) == 2, result
            return [r["metric"] for r in result]

        metrics = poll(gpu_series)
        assert {m["device"]: (m["UUID"], m["modelName"]) for m in metrics} == SIM_GPUS
        assert not any("uuid" in m or "model_name" in m for m in metrics)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


BATCH = 100  # short processes alive at once
TOTAL = 3000


def _mine(label: str) -> bool:
    """A job of this test (run outside the suite's PID namespace, the daemon also sees
    other tests' processes)."""
    return label.startswith("short-") or label == "_overflow"


def _count(text: str) -> tuple[int, int, int, int, int]:
    """(per-job series, running jobs, finished jobs, all series, running jobs of this
    test) in one exposition."""
    jobs = running = finished = total = mine = 0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            total += 1
            if s.name.startswith("wattprint_job_"):
                jobs += 1
            if s.name == "wattprint_job_running":
                running += s.value == 1.0
                finished += s.value == 0.0
                mine += s.value == 1.0 and _mine(s.labels["label"])
    return jobs, running, finished, total, mine


@pytest.mark.slow
def test_series_stay_bounded_with_3000_short_lived_labelled_processes(tmp_path: Path, labelled_process) -> None:
    """Docs/api.md: one scrape holds at most 8 x (running jobs + [jobs]
    max_finished_in_metrics) per-job series. 3,000 labelled processes of one user, 100
    alive at a time, each living across at least one tick; before the bound, every job
    finished in the last finished_grace_s (300 s) stayed: about 15,000 series."""
    max_finished = 200
    d = DaemonProcess(tmp_path, sim_file=None, powercap_root=None,
                      extra_toml=f"[jobs]\nmax_finished_in_metrics = {max_finished}\nfinished_grace_s = 3600.0\n")
    d.start()
    scrapes: list[tuple[int, int, int, int]] = []
    started = 0
    since = time.time() - 1
    try:
        while started < TOTAL:
            batch = []
            for i in range(started, min(TOTAL, started + BATCH)):
                batch.append(labelled_process(f"short-{i}", argv=["sleep", "1.3"], new_session=False))
            started += len(batch)
            wait_ticks(d, 1)  # every process of the batch is alive across this tick
            for p in batch:
                p.wait()
            scrapes.append(_count(d.metrics_text()))
        wait_ticks(d, 2)  # the last batch is seen to end
        scrapes.append(_count(d.metrics_text()))
        seen = d.get(f"/api/v1/jobs?since={since}&limit=10000")["jobs"]
    finally:
        d.stop()
    # The daemon really saw (nearly) every process as a job: the bound was exercised.
    assert len([j for j in seen if _mine(j["label"])]) >= 0.9 * TOTAL, len(seen)
    for jobs, running, finished, total, mine in scrapes:
        # the documented bound, with the running jobs of that very scrape
        assert jobs <= SERIES_PER_JOB * (running + max_finished), (jobs, running, finished)
        assert finished <= max_finished
        # the daemon sees at most this batch and stragglers of the one before as running
        assert mine <= 2 * BATCH
        # everything not per job is a fixed part (devices, health, self-metrics, process_*)
        assert total - jobs <= 300, total - jobs
    assert max(s[2] for s in scrapes) == max_finished  # the cap, not the grace, bounded them
    assert scrapes[-1][4] == 0, scrapes[-3:]  # at the end none of ours runs
