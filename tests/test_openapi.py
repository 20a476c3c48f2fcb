"""The OpenAPI document describes the HTTP API as daemon/api.py serves it.

- it is a valid OpenAPI 3.0.3 document (openapi-spec-validator, when installed);
- every route of the real aiohttp router is in it, and every path in it is routed
  (``/api/v1/intensity`` and ``/api/v1/openapi.json`` may be missing from the router
  until they are wired);
- every JSON answer of the real API (served over a small store) matches the schema the
  document gives for it, error answers included, and the job object has exactly the
  documented fields;
- the query parameters, their enums and bounds are the ones the API enforces.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pytest

from wattprint.daemon.api import MAX_LIMIT, Api
from wattprint.daemon.ledger import Intensity, JobTick, Ledger, LedgerReader
from wattprint.daemon.model import DeviceState, Snapshot, SourceHealth
from wattprint.daemon.openapi import openapi_spec
from wattprint.daemon.procs import JobIdentity

NOT_YET_ROUTED = {"/api/v1/intensity", "/api/v1/openapi.json"}
JOB_ID = "77-600000"


# -- a small JSON-schema checker for the OpenAPI 3.0 subset the document uses ---------

def check(schema: dict[str, Any], value: Any, spec: dict[str, Any], where: str = "$") -> list[str]:
    """Problems of ``value`` against ``schema`` (empty when it conforms)."""
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        return check(spec["components"]["schemas"][name], value, spec, where)
    if value is None:
        return [] if schema.get("nullable") else [f"{where}: null but not nullable"]
    if "oneOf" in schema:
        ok = [s for s in schema["oneOf"] if not check(s, value, spec, where)]
        return [] if len(ok) == 1 else [f"{where}: matches {len(ok)} of oneOf"]
    problems: list[str] = []
    typ = schema.get("type")
    type_ok = {
        "object": isinstance(value, dict), "array": isinstance(value, list), "string": isinstance(value, str),
        "boolean": isinstance(value, bool),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        None: True,
    }[typ]
    if not type_ok:
        return [f"{where}: {value!r} is not {typ}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} not in {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        problems.append(f"{where}: {value!r} < {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        problems.append(f"{where}: {value!r} > {schema['maximum']}")
    if typ == "object":
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                problems.append(f"{where}: required {key!r} missing")
        for key, item in value.items():
            if key in props:
                problems += check(props[key], item, spec, f"{where}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                problems += check(schema["additionalProperties"], item, spec, f"{where}.{key}")
    if typ == "array":
        for i, item in enumerate(value):
            problems += check(schema["items"], item, spec, f"{where}[{i}]")
    return problems


def resolve(schema: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].removeprefix("#/components/schemas/")]
    return schema


def test_checker_catches_mistakes():
    spec = openapi_spec()
    job_schema = {"$ref": "#/components/schemas/Job"}
    assert check({"type": "integer"}, 1.5, spec)
    assert check(job_schema, {"id": "x"}, spec)  # required fields missing
    assert check({"type": "object", "properties": {"s": {"type": "string", "enum": ["a"]}}}, {"s": "b"}, spec)


# -- the document itself ---------------------------------------------------------------

def test_spec_is_valid_openapi_3_0_3():
    validator = pytest.importorskip("openapi_spec_validator", reason="openapi-spec-validator not installed")
    spec = openapi_spec()
    assert spec["openapi"] == "3.0.3"
    validator.validate(json.loads(json.dumps(spec, allow_nan=False)))


def test_spec_is_plain_json_and_self_consistent():
    spec = openapi_spec()
    text = json.dumps(spec, allow_nan=False)
    assert json.loads(text) == spec
    assert spec is not openapi_spec()  # a fresh document each call: callers may change theirs
    schemas = spec["components"]["schemas"]
    for ref in {part.split('"')[0] for part in text.split('"$ref": "')[1:]}:
        assert ref.startswith("#/components/schemas/") and ref.removeprefix("#/components/schemas/") in schemas, ref
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "needed only when `[http] token` is set"}
    assert {} in spec["security"]  # the token is optional
    error = schemas["Error"]["properties"]["error"]
    assert error["required"] == ["status", "message"]
    operation_ids = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            assert method == "get", (path, method)
            operation_ids.append(op["operationId"])
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            templated = {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}
            assert declared == templated, path
            assert "200" in op["responses"]
            for status, resp in op["responses"].items():
                if status.startswith("4") or status == "500":
                    assert resp["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert len(operation_ids) == len(set(operation_ids))
    assert spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"].keys() == {"text/plain"}


# -- against the real API ----------------------------------------------------------------

@pytest.fixture
def api_server(tmp_path, background_app):
    path = str(tmp_path / "s.sqlite3")
    ledger = Ledger(path, host="h", bucket_s=60)
    ident = JobIdentity(job_id=JOB_ID, label="docs", label_source="WATTPRINT_JOB", uid=1000, user="alice",
                        command="python", root_pid=77, started_at=6000.0, label_raw="docs")
    for i in range(70):
        ledger.record_tick(6000.0 + i,
                           [JobTick(ident, {"gpu": 40.0, "cpu": 4.0, "dram": 1.0}, gpu_seconds=1.0,
                                    gpu_memory_bytes=1 << 30,
                                    sources={"gpu": "counter", "cpu": "estimate", "dram": "estimate"})],
                           [("gpu", "gpu0", 50.0, "counter"), ("cpu", "cpu", 5.0, "estimate"),
                            ("dram", "dram", 1.0, "estimate")],
                           {"gpu": 10.0, "cpu": 1.0, "dram": 0.0},
                           Intensity(100.0, "provisional", "static", "DK1", "forecast") if i < 60 else None)
    ledger.finish_jobs([(JOB_ID, 6070.0)])
    ledger.close()
    reader = LedgerReader(path, pue=1.1, price_per_kwh=0.4, currency="EUR")
    snapshot = Snapshot(
        taken_at=time.time(), tick=3, tick_duration_s=0.01,
        devices=(DeviceState("gpu", "gpu0", "NVIDIA H100", 250.0, 1000.0, "counter"),),
        health=(SourceHealth("gpu", "ok", "", 0, time.time()), SourceHealth("rapl", "disabled", "none", 0, None)),
    )
    api = Api(lambda: snapshot, reader, lambda: (b"# HELP x\n", "text/plain; version=0.0.4; charset=utf-8"),
              host="h", bucket_s=60)
    app = api.app()
    server = background_app(app)
    yield server, app
    reader.close()


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def routed_paths(app) -> set[str]:
    return {r.resource.canonical for r in app.router.routes() if r.method in ("GET", "HEAD")}


def test_router_and_spec_have_the_same_paths(api_server):
    _server, app = api_server
    spec_paths = set(openapi_spec()["paths"])
    routed = routed_paths(app)
    assert routed - spec_paths == set(), "routes missing from the OpenAPI document"
    assert spec_paths - routed <= NOT_YET_ROUTED, "documented paths that are not routed"


def test_every_answer_matches_its_documented_schema(api_server):
    server, app = api_server
    spec = openapi_spec()
    quoted = urllib.parse.quote(JOB_ID, safe="")
    checked = []
    for path, item in spec["paths"].items():
        if path not in routed_paths(app):
            continue
        op = item["get"]
        status, ctype, body = get(server.url + path.replace("{id}", quoted))
        assert str(status) in op["responses"], (path, status, body)
        content = op["responses"][str(status)]["content"]
        if "application/json" in content:
            assert ctype.startswith("application/json"), path
            problems = check(content["application/json"]["schema"], json.loads(body), spec)
            assert problems == [], (path, problems)
        else:
            assert ctype.startswith("text/plain"), path
        checked.append(path)
    assert {"/healthz", "/api/v1/jobs", "/api/v1/jobs/{id}", "/api/v1/jobs/{id}/series", "/api/v1/host"} <= set(checked)


def test_job_object_has_exactly_the_documented_fields(api_server):
    server, _app = api_server
    spec = openapi_spec()
    job_schema = spec["components"]["schemas"]["Job"]
    _s, _t, body = get(f"{server.url}/api/v1/jobs/{urllib.parse.quote(JOB_ID, safe='')}")
    job = json.loads(body)
    assert set(job) == set(job_schema["properties"]), "job fields and the Job schema differ"
    assert set(job_schema["required"]) <= set(job)
    assert job["co2e_status"] == "provisional" and job["energy_sources"]["gpu"] == "counter"
    _s, _t, body = get(f"{server.url}/api/v1/jobs/{urllib.parse.quote(JOB_ID, safe='')}/series")
    bucket_schema = spec["components"]["schemas"]["JobSeries"]["properties"]["buckets"]["items"]
    buckets = json.loads(body)["buckets"]
    assert {b["intensity_status"] for b in buckets} == {"provisional", "missing"}
    for b in buckets:
        assert set(b) == set(bucket_schema["properties"])


def test_errors_match_the_error_schema(api_server):
    server, _app = api_server
    spec = openapi_spec()
    for path, status in [("/api/v1/jobs/nope", 404), ("/api/v1/jobs?state=zombie", 400),
                         (f"/api/v1/jobs/{'x' * 129}", 400), ("/api/v1/jobs/nope/series", 404)]:
        code, ctype, body = get(server.url + path)
        assert code == status and ctype.startswith("application/json"), path
        documented = spec["paths"][path.split("?")[0].replace("nope", "{id}").replace("x" * 129, "{id}")]["get"]
        assert str(status) in documented["responses"], path
        assert check({"$ref": "#/components/schemas/Error"}, json.loads(body), spec) == []


def test_query_parameters_are_the_ones_the_api_enforces(api_server):
    server, _app = api_server
    spec = openapi_spec()
    params = {p["name"]: p["schema"] for p in spec["paths"]["/api/v1/jobs"]["get"]["parameters"]}
    valid = {"state": "finished", "since": "2026-01-01T00:00:00Z", "until": "4000000000", "label": "docs",
             "user": "alice", "limit": "5"}
    assert set(params) == set(valid)
    base = f"{server.url}/api/v1/jobs?"
    for name, value in valid.items():
        code, _t, body = get(base + urllib.parse.urlencode({name: value}))
        assert code == 200, (name, body)
    assert get(base + "bogus=1")[0] == 400  # nothing undocumented is accepted
    assert params["state"]["enum"] == ["running", "finished"]
    for state in params["state"]["enum"]:
        assert get(base + f"state={state}")[0] == 200
    assert get(base + "state=zombie")[0] == 400
    limit = params["limit"]
    assert (limit["minimum"], limit["maximum"]) == (1, MAX_LIMIT)
    assert get(base + f"limit={limit['maximum']}")[0] == 200
    assert get(base + f"limit={limit['maximum'] + 1}")[0] == 400
    assert get(base + f"limit={limit['minimum'] - 1}")[0] == 400
    for name in ("label", "user"):
        n = params[name]["maxLength"]
        assert get(base + urllib.parse.urlencode({name: "a" * n}))[0] == 200
        assert get(base + urllib.parse.urlencode({name: "a" * (n + 1)}))[0] == 400
    for name in ("since", "until"):
        kinds = {s["type"] for s in params[name]["oneOf"]}
        assert kinds == {"number", "string"}
        assert get(base + f"{name}=1700000000.5")[0] == 200
        assert get(base + f"{name}=2026-01-01T00:00:00")[0] == 200
        assert get(base + f"{name}=yesterday")[0] == 400
    one = json.loads(get(base + "label=docs&state=finished")[2])
    assert one["count"] == 1 and check(resolve({"$ref": "#/components/schemas/JobList"}, spec), one, spec) == []
