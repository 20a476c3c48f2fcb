"""exporters/prometheus.py: exact values, valid exposition (promtool), untrusted labels
round-tripping, failures that do not fail a scrape, and a real Prometheus scraping it."""

from __future__ import annotations

import logging
from typing import Mapping

import prometheus_client
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from servers import BackgroundAppFactory, PrometheusFactory, promtool_check_metrics
from wattprint.daemon.model import DeviceState, JobTotals, SourceHealth, Snapshot
from wattprint.exporters.prometheus import CONTENT_TYPE, SnapshotCollector, build_registry, render

# Everything a local user can put into a job label, and then some.
NASTY = 'lora "7b", run=1 {x} a\\b\\n\nnext\tline ü ✓ 🚀 # } \\'
NASTY_USER = 'bob"}, evil="1'

GPU_UUID = "GPU-5f8a3c1e-0b7d-4e2a-9c61-2d4b8e7f1a30"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(body: bytes) -> Samples:
    """Every sample of an exposition as {(name, labels): value}."""
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = sample.value
    return out


def series(metric: str, /, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return metric, frozenset(labels.items())


def scrape(snapshot: Snapshot | None) -> bytes:
    body, content_type = render(build_registry(lambda: snapshot))
    assert content_type == CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    return body


def assert_promtool_ok(promtool: str, body: bytes) -> None:
    result = promtool_check_metrics(body, promtool)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), body.decode()


def full_snapshot(label: str = "lora-7b", user: str = "alice", counters: Mapping[str, float] | None = None) -> Snapshot:
    return Snapshot(
        taken_at=1_700_000_000.25,
        tick=3600,
        tick_duration_s=0.0125,
        devices=(
            DeviceState(
                kind="gpu",
                device="gpu0",
                name="NVIDIA RTX A4000",
                power_w=140.5,
                energy_j_total=2_000_000.0,
                source="counter",
                uuid=GPU_UUID,
                vendor="nvidia",
            ),
            DeviceState(
                kind="cpu", device="package-0", name="", power_w=35.25, energy_j_total=400_000.0, source="counter"
            ),
            DeviceState(kind="dram", device="dram-0", name="", power_w=4.0, energy_j_total=50_000.0, source="estimate"),
        ),
        jobs=(
            JobTotals(
                job_id="1234-1700000000",
                label=label,
                user=user,
                uid=1000,
                energy_j={"gpu": 2_000_000.0, "cpu": 380_000.0, "dram": 118_400.0, "total": 2_498_400.0},
                co2e_g=57.25,
                state="running",
                embodied_co2e_g=12.75,
                co2e_market_g=31.5,
                water_l=4.125,
            ),
            JobTotals(
                job_id="99-1699990000",
                label="",
                user="bob",
                uid=1001,
                energy_j={"cpu": 10.5},
                co2e_g=0.0,
                state="finished",
            ),
        ),
        unattributed_j_total={"gpu": 12.5, "cpu": 20_000.0, "dram": 0.0},
        health=(
            SourceHealth(name="gpu", state="ok"),
            SourceHealth(name="rapl", state="degraded", detail="permission denied", errors_total=7),
            SourceHealth(name="influxdb", state="disabled"),
        ),
        grid_zone="DK1",
        grid_provider="energidataservice",
        grid_g_per_kwh=82.5,
        counters=counters if counters is not None else {"spool_bytes": 4096.0, "points_dropped_total": 3.0,
                                                        "unattributed_embodied_co2e_grams_total": 2.5},
    )


def test_full_snapshot_renders_exact_values() -> None:
    got = samples(scrape(full_snapshot()))
    job = {"job_id": "1234-1700000000", "label": "lora-7b", "user": "alice"}
    finished = {"job_id": "99-1699990000", "label": "", "user": "bob"}
    gpu_ids = {"uuid": GPU_UUID, "model_name": "NVIDIA RTX A4000", "vendor": "nvidia"}
    expected: Samples = {
        # GPU series: uuid and model_name (the shipped Prometheus config stores them as UUID, modelName)
        series("wattprint_device_power_watts", kind="gpu", device="gpu0", **gpu_ids): 140.5,
        series("wattprint_device_power_watts", kind="cpu", device="package-0"): 35.25,
        series("wattprint_device_power_watts", kind="dram", device="dram-0"): 4.0,
        series("wattprint_device_energy_joules_total", kind="gpu", device="gpu0", **gpu_ids): 2_000_000.0,
        series("wattprint_device_energy_joules_total", kind="cpu", device="package-0"): 400_000.0,
        series("wattprint_device_energy_joules_total", kind="dram", device="dram-0"): 50_000.0,
        series("wattprint_device_info", kind="gpu", device="gpu0", name="NVIDIA RTX A4000", source="counter",
               **gpu_ids): 1.0,
        series("wattprint_device_info", kind="cpu", device="package-0", name="", source="counter"): 1.0,
        series("wattprint_device_info", kind="dram", device="dram-0", name="", source="estimate"): 1.0,
        # "total" in energy_j is not a kind: summing over kind must not double-count
        series("wattprint_job_energy_joules_total", **job, kind="gpu"): 2_000_000.0,
        series("wattprint_job_energy_joules_total", **job, kind="cpu"): 380_000.0,
        series("wattprint_job_energy_joules_total", **job, kind="dram"): 118_400.0,
        series("wattprint_job_energy_joules_total", **finished, kind="cpu"): 10.5,
        series("wattprint_job_co2e_grams", **job): 57.25,
        series("wattprint_job_co2e_grams", **finished): 0.0,
        # lifecycle figures (issue 16): every job has them, 0 until booked
        series("wattprint_job_embodied_co2e_grams", **job): 12.75,
        series("wattprint_job_embodied_co2e_grams", **finished): 0.0,
        series("wattprint_job_market_co2e_grams", **job): 31.5,
        series("wattprint_job_market_co2e_grams", **finished): 0.0,
        series("wattprint_job_water_litres", **job): 4.125,
        series("wattprint_job_water_litres", **finished): 0.0,
        series("wattprint_job_running", **job): 1.0,
        series("wattprint_job_running", **finished): 0.0,
        series("wattprint_unattributed_energy_joules_total", kind="gpu"): 12.5,
        series("wattprint_unattributed_energy_joules_total", kind="cpu"): 20_000.0,
        series("wattprint_unattributed_energy_joules_total", kind="dram"): 0.0,
        series("wattprint_grid_intensity_grams_per_kwh", zone="DK1", provider="energidataservice"): 82.5,
        series("wattprint_source_up", source="gpu"): 1.0,
        series("wattprint_source_up", source="rapl"): 0.0,
        series("wattprint_source_up", source="influxdb"): 0.0,
        series("wattprint_source_state", source="gpu", state="ok"): 1.0,
        series("wattprint_source_state", source="rapl", state="degraded"): 1.0,
        series("wattprint_source_state", source="influxdb", state="disabled"): 1.0,
        series("wattprint_source_errors_total", source="gpu"): 0.0,
        series("wattprint_source_errors_total", source="rapl"): 7.0,
        series("wattprint_source_errors_total", source="influxdb"): 0.0,
        series("wattprint_tick_duration_seconds"): 0.0125,
        series("wattprint_ticks_total"): 3600.0,
        series("wattprint_last_tick_timestamp_seconds"): 1_700_000_000.25,
        series("wattprint_spool_bytes"): 4096.0,
        series("wattprint_points_dropped_total"): 3.0,
        series("wattprint_unattributed_embodied_co2e_grams_total"): 2.5,
        series("wattprint_exporter_errors_total"): 0.0,
    }
    assert got == expected


def test_metric_types_and_no_created_series() -> None:
    body = scrape(full_snapshot())
    types = {family.name: family.type for family in text_string_to_metric_families(body.decode())}
    counters = {name for name, typ in types.items() if typ == "counter"}
    gauges = {name for name, typ in types.items() if typ == "gauge"}
    # the parser names counter families without their _total suffix
    assert counters == {
        "wattprint_device_energy_joules",
        "wattprint_job_energy_joules",
        "wattprint_unattributed_energy_joules",
        "wattprint_source_errors",
        "wattprint_ticks",
        "wattprint_points_dropped",
        "wattprint_unattributed_embodied_co2e_grams",
        "wattprint_exporter_errors",
    }
    assert gauges == {
        "wattprint_device_power_watts",
        "wattprint_device_info",
        "wattprint_job_co2e_grams",
        "wattprint_job_embodied_co2e_grams",
        "wattprint_job_market_co2e_grams",
        "wattprint_job_water_litres",
        "wattprint_job_running",
        "wattprint_grid_intensity_grams_per_kwh",
        "wattprint_source_up",
        "wattprint_source_state",
        "wattprint_tick_duration_seconds",
        "wattprint_last_tick_timestamp_seconds",
        "wattprint_spool_bytes",
    }
    assert b"_created" not in body
    assert b"# TYPE wattprint_ticks_total counter\n" in body


def test_full_snapshot_passes_promtool(promtool: str) -> None:
    assert_promtool_ok(promtool, scrape(full_snapshot()))


def test_untrusted_label_round_trips_exactly(promtool: str) -> None:
    body = scrape(full_snapshot(label=NASTY, user=NASTY_USER))
    assert_promtool_ok(promtool, body)
    got = samples(body)
    job = {"job_id": "1234-1700000000", "label": NASTY, "user": NASTY_USER}
    assert got[series("wattprint_job_co2e_grams", **job)] == 57.25
    assert got[series("wattprint_job_energy_joules_total", **job, kind="gpu")] == 2_000_000.0
    # nothing the user wrote became a series or a label of its own
    assert {name for name, _ in got} == {name for name, _ in samples(scrape(full_snapshot()))}
    assert all(
        set(dict(labels))
        <= {"kind", "device", "name", "source", "job_id", "label", "user", "zone", "provider", "state", "uuid",
            "model_name", "vendor"}
        for _, labels in got
    )


def test_undecodable_label_bytes_do_not_fail_the_scrape(promtool: str) -> None:
    label = b"job-\xff\xfe".decode("utf-8", "surrogateescape")  # as os.environb would give it
    body = scrape(full_snapshot(label=label))
    assert_promtool_ok(promtool, body)
    got = samples(body)
    assert (
        got[series("wattprint_job_co2e_grams", job_id="1234-1700000000", label="job-\\udcff\\udcfe", user="alice")]
        == 57.25
    )


def test_no_snapshot_yet_renders_valid_output(promtool: str) -> None:
    body = scrape(None)
    assert_promtool_ok(promtool, body)
    assert samples(body) == {series("wattprint_exporter_errors_total"): 0.0}


def test_empty_snapshot_renders_tick_metrics_only(promtool: str) -> None:
    body = scrape(Snapshot(taken_at=1.0, tick=0, tick_duration_s=0.0))
    assert_promtool_ok(promtool, body)
    assert samples(body) == {
        series("wattprint_tick_duration_seconds"): 0.0,
        series("wattprint_ticks_total"): 0.0,
        series("wattprint_last_tick_timestamp_seconds"): 1.0,
        series("wattprint_exporter_errors_total"): 0.0,
    }


def test_grid_absent_without_intensity() -> None:
    snapshot = Snapshot(taken_at=1.0, tick=1, tick_duration_s=0.1, grid_zone="DK1", grid_provider="static")
    assert b"wattprint_grid_intensity" not in scrape(snapshot)


def test_raising_get_snapshot_still_yields_a_valid_scrape(promtool: str, caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> Snapshot | None:
        raise RuntimeError("ledger exploded")

    registry = build_registry(broken)
    with caplog.at_level(logging.DEBUG, logger="wattprint.exporters.prometheus"):
        first, _ = render(registry)
        second, _ = render(registry)
    assert_promtool_ok(promtool, second)
    assert samples(first) == {series("wattprint_exporter_errors_total"): 1.0}
    assert samples(second) == {series("wattprint_exporter_errors_total"): 2.0}
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "ledger exploded" in caplog.text  # logged once, with the cause


def test_one_broken_section_leaves_the_rest(promtool: str) -> None:
    bad_job = JobTotals(job_id="x", label="x", user="x", uid=0, energy_j={"gpu": "lots"}, co2e_g=0.0, state="running")  # type: ignore[dict-item]
    snapshot = Snapshot(
        taken_at=5.0,
        tick=5,
        tick_duration_s=0.5,
        devices=(
            DeviceState(kind="gpu", device="gpu0", name="A4000", power_w=100.0, energy_j_total=500.0, source="counter"),
        ),
        jobs=(bad_job,),
    )
    body = scrape(snapshot)
    assert_promtool_ok(promtool, body)
    got = samples(body)
    assert got[series("wattprint_device_power_watts", kind="gpu", device="gpu0", uuid="", model_name="A4000", vendor="")] == 100.0
    assert got[series("wattprint_ticks_total")] == 5.0
    assert got[series("wattprint_exporter_errors_total")] == 1.0
    assert not any(name.startswith("wattprint_job_") for name, _ in got)


def test_daemon_counters_with_unusable_names_are_left_out(promtool: str) -> None:
    body = scrape(full_snapshot(counters={"spool_bytes": 1.0, "bad-name": 2.0, "ticks_total": 99.0, "ok_total": 4.0}))
    assert_promtool_ok(promtool, body)
    got = samples(body)
    assert got[series("wattprint_spool_bytes")] == 1.0
    assert got[series("wattprint_ok_total")] == 4.0
    assert got[series("wattprint_ticks_total")] == 3600.0  # the real tick count, not the shadowing key
    assert got[series("wattprint_exporter_errors_total")] == 2.0
    assert b"bad" not in body


def test_registry_is_not_the_global_one() -> None:
    registry = build_registry(lambda: full_snapshot())
    assert registry is not prometheus_client.REGISTRY
    assert b"wattprint_" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)
    collector = SnapshotCollector(lambda: None)
    assert collector.errors_total == 0


@pytest.mark.slow
def test_real_prometheus_scrapes_and_label_round_trips(
    background_app: BackgroundAppFactory, prometheus_factory: PrometheusFactory
) -> None:
    registry = build_registry(lambda: full_snapshot(label=NASTY, user=NASTY_USER))

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = render(registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    target = background_app(app)
    prometheus = prometheus_factory([target.host_port])

    result = prometheus.wait_for("wattprint_job_co2e_grams", lambda r: len(r) == 2, timeout=30)
    by_job = {item["metric"]["job_id"]: item for item in result}
    labels = by_job["1234-1700000000"]["metric"]
    assert labels["label"] == NASTY
    assert labels["user"] == NASTY_USER
    assert float(by_job["1234-1700000000"]["value"][1]) == 57.25

    energy = prometheus.query('sum by (kind) (wattprint_job_energy_joules_total{job_id="1234-1700000000"})')
    assert {item["metric"]["kind"]: float(item["value"][1]) for item in energy} == {
        "gpu": 2_000_000.0,
        "cpu": 380_000.0,
        "dram": 118_400.0,
    }
    up = prometheus.query("up")
    assert [float(item["value"][1]) for item in up] == [1.0]

    # Lifecycle figures (issue 16) as Prometheus stored them: the values the snapshot set,
    # per job with the same labels as wattprint_job_co2e_grams, and the unattributed counter.
    for metric, value in (("wattprint_job_embodied_co2e_grams", 12.75), ("wattprint_job_market_co2e_grams", 31.5),
                          ("wattprint_job_water_litres", 4.125)):
        got = {item["metric"]["job_id"]: (item["metric"].get("label", ""), item["metric"]["user"],
                                          float(item["value"][1]))
               for item in prometheus.query(metric)}  # (Prometheus leaves an empty label out)
        assert got == {"1234-1700000000": (NASTY, NASTY_USER, value), "99-1699990000": ("", "bob", 0.0)}, metric
    [unattributed] = prometheus.query("wattprint_unattributed_embodied_co2e_grams_total")
    assert float(unattributed["value"][1]) == 2.5
    # Grafana's "market vs location" reads both per job
    ratio = prometheus.query('wattprint_job_market_co2e_grams{job_id="1234-1700000000"} '
                             '/ on(job_id) wattprint_job_co2e_grams')
    assert [float(item["value"][1]) for item in ratio] == [pytest.approx(31.5 / 57.25)]
