"""The test-server harness works for real: influxd stores and returns points across a
restart, Prometheus scrapes a local endpoint, and missing binaries skip or fail."""

from __future__ import annotations

import pytest
from aiohttp import web

from servers import (
    BackgroundAppFactory,
    InfluxServer,
    PrometheusFactory,
    ServerError,
    free_port,
    http_request,
    require_binary,
    wait_http,
)

pytestmark = pytest.mark.slow

POINT_NS = 1_700_000_000_000_000_000  # 2023-11-14T22:13:20Z


def _select_value(influx: InfluxServer) -> list[list[object]]:
    return influx.series_values(
        "SELECT value FROM cpu WHERE host = $host",
        db="harness",
        params={"host": 'box "one", x=1'},
    )


def test_influx_write_then_query_with_bound_param(influxdb_server: InfluxServer) -> None:
    influxdb_server.create_database("harness")
    influxdb_server.write(
        f'cpu,host=box\\ "one"\\,\\ x\\=1 value=1.5 {POINT_NS}\ncpu,host=other value=9 {POINT_NS}\n',
        db="harness",
    )
    assert _select_value(influxdb_server) == [["2023-11-14T22:13:20Z", 1.5]]


def test_influx_keeps_data_across_restart_on_same_port(influxdb_server: InfluxServer) -> None:
    influxdb_server.create_database("harness")
    influxdb_server.write(f'cpu,host=box\\ "one"\\,\\ x\\=1 value=2.5 {POINT_NS}', db="harness")
    url = influxdb_server.url

    influxdb_server.stop()
    assert not influxdb_server.running()
    with pytest.raises(OSError):
        http_request(f"{url}/ping", timeout=1.0)

    influxdb_server.start()
    assert influxdb_server.url == url
    assert _select_value(influxdb_server) == [["2023-11-14T22:13:20Z", 2.5]]


def test_influx_query_errors_raise(influxdb_server: InfluxServer) -> None:
    with pytest.raises(ServerError, match="database not found"):
        influxdb_server.query("SELECT * FROM cpu", db="nope")


def test_prometheus_scrapes_local_aiohttp_counter(
    background_app: BackgroundAppFactory, prometheus_factory: PrometheusFactory
) -> None:
    async def metrics(request: web.Request) -> web.Response:
        body = (
            "# HELP harness_requests_total Requests.\n"
            "# TYPE harness_requests_total counter\n"
            "harness_requests_total 42\n"
        )
        return web.Response(text=body, content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/custom/metrics", metrics)
    target = background_app(app)

    prometheus = prometheus_factory([target.host_port], metrics_path="/custom/metrics")
    result = prometheus.wait_for("harness_requests_total", lambda r: len(r) == 1, timeout=30)

    assert float(result[0]["value"][1]) == 42.0
    assert result[0]["metric"]["instance"] == target.host_port


def test_wait_http_times_out_on_a_closed_port() -> None:
    with pytest.raises(ServerError, match="no .* answer within"):
        wait_http(f"http://127.0.0.1:{free_port()}/", timeout=0.3)


def test_missing_binary_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="apt-get install"):
        require_binary("wattprint-no-such-binary")


def test_missing_binary_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="wattprint-no-such-binary not found"):
        require_binary("wattprint-no-such-binary")
