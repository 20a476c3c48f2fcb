"""The Prometheus example files (deploy/prometheus/): promtool accepts them, the rules'
unit tests pass, and a real Prometheus running the example config with the example
rules scrapes wattprint's real exporter and raises the expected alerts.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from aiohttp import web

from servers import (
    LOOPBACK,
    BackgroundAppFactory,
    ServerError,
    free_port,
    http_request,
    require_binary,
    wait_http,
)
from wattprint.daemon.model import DeviceState, JobTotals, Snapshot, SourceHealth
from wattprint.exporters.prometheus import RESERVED_NAMES, build_registry, render

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "deploy" / "prometheus"
CONFIG = PROM_DIR / "prometheus.yml"
RULES = PROM_DIR / "wattprint.rules.yml"
RULES_TEST = PROM_DIR / "tests" / "wattprint.rules.test.yml"

ALERTS = {"WattprintJobOverCO2eBudget", "WattprintSourceDown", "WattprintSpoolGrowing", "WattprintTicksStalled",
          "WattprintScrapeDown"}
# Metrics that come from Snapshot.counters (exported as wattprint_<key>) rather than
# from the exporter's fixed families.
COUNTER_METRICS = {"wattprint_spool_bytes", "wattprint_tick_overruns_total", "wattprint_tick_errors_total"}


def promtool_run(promtool: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_promtool_check_config(promtool: str) -> None:
    result = promtool_run(promtool, "check", "config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr  # rule_files resolves next to the config


def test_promtool_check_rules(promtool: str) -> None:
    result = promtool_run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(ALERTS)} rules found" in result.stdout + result.stderr


def test_promtool_rule_unit_tests(promtool: str) -> None:
    result = promtool_run(promtool, "test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    tested = set(re.findall(r"alertname: (\w+)", RULES_TEST.read_text()))
    assert tested == ALERTS  # every alert has a unit test


def test_rules_and_config_use_real_metric_names() -> None:
    text = RULES.read_text()
    used = set(re.findall(r"\bwattprint_[a-z0-9_]+", text))
    assert used, "no wattprint metrics in the rules?"
    assert used <= RESERVED_NAMES | COUNTER_METRICS, used - RESERVED_NAMES - COUNTER_METRICS
    assert 'up{job="wattprint"}' in text
    assert "job_name: wattprint" in CONFIG.read_text()


# ------------------------------------------------------- real Prometheus, real rules


def over_budget_snapshot() -> Snapshot:
    now = time.time()
    return Snapshot(
        taken_at=now, tick=100, tick_duration_s=0.01,
        devices=(DeviceState("gpu", "gpu0", "NVIDIA RTX A4000", 140.0, 1.0e7, "counter"),),
        jobs=(
            JobTotals(job_id="1234@1700000000.25", label="llama-lora", user="alice", uid=1000,
                      energy_j={"gpu": 4.0e7, "cpu": 1.0e6, "dram": 1.0e5}, co2e_g=1500.0, state="running"),
            JobTotals(job_id="99@1700000100.5", label="small", user="bob", uid=1001,
                      energy_j={"gpu": 1.0e5}, co2e_g=10.0, state="running"),
        ),
        health=(SourceHealth("gpu", "ok"), SourceHealth("rapl", "degraded", "permission denied", 4),
                SourceHealth("influxdb", "disabled", "not configured")),
        grid_zone="DK1", grid_provider="static", grid_g_per_kwh=475.0,
        counters={"spool_bytes": 0.0},
    )


def example_config_for(target: str) -> str:
    """deploy/prometheus/prometheus.yml with its target replaced and every interval 1 s."""
    text = CONFIG.read_text()
    assert '"localhost:9877"' in text
    text = text.replace('"localhost:9877"', json.dumps(target))
    return re.sub(r"\b(scrape_interval|scrape_timeout|evaluation_interval): \d+s\b", r"\1: 1s", text)


@pytest.fixture
def example_prometheus(tmp_path: Path, background_app: BackgroundAppFactory) -> Iterator[str]:
    """A real Prometheus running the example config and rules against the real exporter
    serving ``over_budget_snapshot()``; yields its base URL."""
    binary = require_binary("prometheus")
    registry = build_registry(over_budget_snapshot)

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = render(registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    target = background_app(app)

    (tmp_path / "prometheus.yml").write_text(example_config_for(target.host_port))
    (tmp_path / "wattprint.rules.yml").write_text(RULES.read_text())
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address={LOOPBACK}:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    log.close()
    url = f"http://{LOOPBACK}:{port}"
    try:
        try:
            wait_http(f"{url}/-/ready", expect=(200,), alive=lambda: proc.poll() is None)
        except ServerError as exc:
            raise ServerError(f"{exc}\n{(tmp_path / 'prometheus.log').read_text(errors='replace')}") from None
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def api(url: str, path: str) -> Any:
    status, body = http_request(url + path)
    answer = json.loads(body)
    assert status == 200 and answer["status"] == "success", answer
    return answer["data"]


def poll(check: Any, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.25)


@pytest.mark.slow
def test_example_config_scrapes_and_rules_fire(example_prometheus: str) -> None:
    url = example_prometheus

    def target_up() -> dict[str, Any]:
        targets = api(url, "/api/v1/targets")["activeTargets"]
        assert len(targets) == 1, targets
        target = targets[0]
        assert target["health"] == "up", target
        return target

    target = poll(target_up)
    assert target["scrapePool"] == "wattprint" and target["labels"]["job"] == "wattprint"
    assert target["scrapeUrl"].endswith("/metrics")

    def rules_evaluated() -> list[dict[str, Any]]:
        groups = api(url, "/api/v1/rules")["groups"]
        assert len(groups) == 1, groups
        group = groups[0]
        assert all(r["health"] == "ok" for r in group["rules"]), group["rules"]
        assert all(r.get("lastEvaluation", "").startswith("2") for r in group["rules"])
        return group["rules"]

    rules = poll(rules_evaluated)
    assert {r["name"] for r in rules} == ALERTS

    def alerts() -> dict[tuple[str, str], str]:
        got = api(url, "/api/v1/alerts")["alerts"]
        by_key = {(a["labels"]["alertname"], a["labels"].get("job_id") or a["labels"].get("source", "")): a["state"]
                  for a in got}
        assert by_key.get(("WattprintJobOverCO2eBudget", "1234@1700000000.25")) == "firing", got
        assert ("WattprintSourceDown", "rapl") in by_key, got
        return by_key

    by_key = poll(alerts)
    # Only the job over budget; only the degraded source (5 min "for": pending), not the
    # disabled one; the scrape works, ticks are fresh, the spool is empty.
    assert set(by_key) == {("WattprintJobOverCO2eBudget", "1234@1700000000.25"), ("WattprintSourceDown", "rapl")}
    assert by_key[("WattprintSourceDown", "rapl")] == "pending"
