"""The OpenAPI 3.0.3 description of the daemon's HTTP API (``daemon/api.py``), served
as ``GET /api/v1/openapi.json``.

``openapi_spec()`` builds the document as plain data; nothing here touches the
network or the store. Keep it in step with api.py: tests compare its paths with the
router's and validate it.
"""

from __future__ import annotations

import copy
from typing import Any

from . import model
from .api import (JOB_STATES, MAX_FILTER_CHARS, MAX_JOB_ID_CHARS, MAX_LIMIT, MAX_URL_BYTES,
                  PARSER_MAX_FIELD_BYTES, PARSER_MAX_LINE_BYTES, REQUEST_TIMEOUT_S)

API_VERSION = "1"
COMPONENTS = model.COMPONENTS  # gpu, cpu, dram, other (the node remainder)
DEVICE_KINDS = model.DEVICE_KINDS  # the measured components and node
ENERGY_SOURCES = ["counter", "power", "estimate"]

_NUMBER = {"type": "number"}
_INT = {"type": "integer"}
_STR = {"type": "string"}
_EPOCH = {"type": "number", "description": "seconds since the Unix epoch (UTC)"}
_EPOCH_NULLABLE = {"type": "number", "nullable": True,
                   "description": "seconds since the Unix epoch (UTC); null when not set"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: dict[str, Any], required: list[str] | None = None, description: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": properties}
    out["required"] = list(properties) if required is None else required
    if description:
        out["description"] = description
    return out


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json_content(_ref("Error"))}


_TIME_PARAM_SCHEMA = {
    "oneOf": [
        {"type": "number", "minimum": 0, "description": "seconds since the Unix epoch"},
        {"type": "string", "format": "date-time", "description": "ISO 8601; without a zone it means UTC"},
    ]
}


def _schemas() -> dict[str, Any]:
    energy_by_component = _obj(
        {c: {"type": "number", "minimum": 0, "description": f"{c.upper()} energy, joules"} for c in COMPONENTS},
        description=("Energy by component, joules. `other` is the node remainder: the node's input energy from "
                     "its BMC minus GPU, CPU and DRAM (0 without a BMC)."),
    )
    energy_by_component["properties"]["other"]["description"] = (
        "the node remainder (fans, power supply losses, NICs, the board), joules; 0 without a node reading")
    energy_with_total = copy.deepcopy(energy_by_component)
    energy_with_total["properties"]["total"] = {"type": "number", "minimum": 0,
                                                "description": "sum of the components, joules"}
    energy_with_total["required"] = [*COMPONENTS, "total"]
    energy_with_total["description"] = "Energy by component and in total, joules."

    job = _obj({
        "id": {"type": "string", "description": "`<leader pid>-<leader start time in centiseconds>`; unique per host"},
        "label": {"type": "string",
                  "description": ("the job's label, sanitised (letters, digits and `_.:/@+-`, at most 64 characters; "
                                  "`_overflow` beyond a user's label limit); empty for process-group jobs")},
        "label_raw": {"type": "string",
                      "description": "the label exactly as set (untrusted text); `label` is its sanitised form"},
        "label_sanitised": {"type": "boolean", "description": "true when `label` differs from `label_raw`"},
        "label_note": {"type": "string",
                       "description": ("why `label` differs from `label_raw`: `label cap reached for user <user> "
                                       "(max_labels_per_user = N)` (filed as `_overflow`) or `sanitised for export`; "
                                       "empty when they are equal")},
        "label_source": {"type": "string",
                         "description": "the environment variable the label came from, `cgroup:<kind>`, or `pgid`"},
        "host": _STR,
        "user": {"type": "string", "description": "user name of the job's leader (untrusted text)"},
        "uid": _INT,
        "command": {"type": "string", "description": "executable name of the leader only, never the command line"},
        "root_pid": _INT,
        "state": {"type": "string", "enum": list(JOB_STATES)},
        "started_at": _EPOCH,
        "ended_at": _EPOCH_NULLABLE,
        "last_seen": _EPOCH,
        "duration_s": {"type": "number", "minimum": 0},
        "energy_j": energy_with_total,
        "energy_kwh": {"type": "number", "minimum": 0, "description": "energy_j.total in kWh (before PUE)"},
        "energy_sources": {
            "type": "object",
            "description": ("per component, the weakest source (estimate < power < counter) among the "
                            "job's own devices that gave it energy, over the job's whole life; and `node`, "
                            "the BMC method that gave the job its share of the node remainder"),
            "properties": {"node": {"type": "string", "enum": list(model.NODE_METHODS),
                                    "description": "`redfish` or `ipmi`; `none` when the job never got a share "
                                                   "of node power (no BMC, or `[node] remainder = \"unattributed\"`)"}},
            "required": ["node"],
            "additionalProperties": {"type": "string", "enum": ENERGY_SOURCES},
        },
        "co2e_g": {"type": "number", "minimum": 0,
                   "description": "sum over buckets of kWh x the bucket's intensity x PUE"},
        "co2e_status": {"type": "string", "enum": ["provisional", "final"]},
        "intensity_g_per_kwh_avg": {"type": "number", "nullable": True,
                                    "description": "energy-weighted mean intensity (before PUE); null without energy"},
        "zone": {"type": "string", "description": "grid zone(s) of the intensities used, comma-separated"},
        "pue": {"type": "number", "minimum": 1},
        "gpu_seconds": {"type": "number", "minimum": 0},
        "peak_gpu_memory_bytes": {"type": "integer", "minimum": 0},
        "cost": _obj({
            "amount": {"type": "number", "minimum": 0, "description": "energy_kwh x PUE x price_per_kwh"},
            "currency": _STR,
            "price_per_kwh": {"type": "number", "minimum": 0},
        }),
        # Lifecycle (issue 16; docs/carbon.md "Lifecycle"): computed when read from the stored energy,
        # CO2e and occupancy with the factors in effect, so restated when factors change.
        "embodied_co2e_g": {"type": "number", "minimum": 0,
                            "description": ("manufacturing carbon of the devices the job occupied, amortised over "
                                            "their service life: Σ over items factor (kg) x 1000 x item-seconds / "
                                            "life (s); 0 for jobs stored before schema 5")},
        "co2e_market_g": {"type": "number", "minimum": 0,
                          "description": ("market-based CO2e (GHG Protocol Scope 2): PUE x kWh x contract_share x "
                                          "contract + (1 - contract_share) x (PUE x kWh x residual, or the "
                                          "location-based co2e_g of that part without a residual mix)")},
        "water_l": {"type": "number", "minimum": 0, "description": "litres: kWh x (WUE + PUE x EWIF)"},
        "sci_g": {"type": "number", "minimum": 0,
                  "description": "co2e_g + embodied_co2e_g (the SCI with the job as its functional unit)"},
    }, description="One job's totals. Fields may be added; none is removed without a changelog entry.")
    job["properties"]["occupancy_s"] = {
        "type": "object", "additionalProperties": {"type": "number", "minimum": 0},
        "description": ("Only in GET /api/v1/jobs/{id}: item -> item-seconds the job occupied: `gpu:<model>` "
                        "board-seconds (a MIG instance by its slices), `cpu` socket-seconds, `dram` GB-seconds, "
                        "`platform` server-seconds; empty for jobs stored before schema 5")}
    job["properties"]["factors"] = {
        "type": "array", "items": _obj({
            "name": {"type": "string", "description": ("`gpu:<model>`, `cpu`, `dram`, `platform`, `service_life`, "
                                                       "`wue`, `ewif`, `market.contract`, `market.residual`")},
            "value": {"type": "number"},
            "unit": {"type": "string", "description": "e.g. kgCO2e/device, year, L/kWh, gCO2e/kWh"},
            "source": {"type": "string", "description": "citation in the data file, or `config: [section] key`"},
            "version": {"type": "string", "description": "data file version, or `config`"},
            "default": {"type": "boolean", "description": "a class default standing in for an unknown model"},
        }),
        "description": "Only in GET /api/v1/jobs/{id}: every factor the lifecycle figures used"}
    job["properties"]["carbon_hint"] = _obj({
        "window_start": _EPOCH,
        "window_end": _EPOCH,
        "g_per_kwh": {"type": "number", "minimum": 0, "description": "mean intensity of that window"},
        "co2e_g": {"type": "number", "minimum": 0, "description": "CO2e the same energy would have had then"},
        "saving_g": {"type": "number", "minimum": 0},
    }, description=("Only in GET /api/v1/jobs/{id}: the lowest-intensity window of the job's length in the "
                    "known series (past day and forecast); null with a static intensity or no series."))
    job["properties"]["carbon_hint"]["nullable"] = True
    job["properties"]["slurm"] = _obj({
        "job_id": {"type": "string", "description": "SLURM_JOB_ID"},
        "name": {"type": "string", "description": "the job as Slurm names it: `<job id>`, or "
                                                  "`<array job id>_<task id>` for an array task (also the `label`)"},
        "array_job_id": {"type": "string", "description": "empty unless an array task"},
        "array_task_id": {"type": "string", "description": "empty unless an array task"},
        "partition": {"type": "string", "description": "SLURM_JOB_PARTITION"},
        "user": {"type": "string", "description": "SLURM_JOB_USER"},
        "steps": {"type": "array", "items": {"type": "string"},
                  "description": "the job's steps seen on this host: `batch`, `extern`, `interactive` or a number"},
    }, description=("The Slurm job (label from SLURM_JOB_ID: every process of the Slurm job on this host, "
                    "batch script, srun steps and tasks, is this one job); null for other jobs."))
    job["properties"]["slurm"]["nullable"] = True

    bucket = _obj({
        "start": {"type": "integer", "description": "bucket start, seconds since the Unix epoch"},
        "energy_j": energy_with_total,
        "g_per_kwh": {"type": "number", "nullable": True,
                      "description": ("intensity used for the bucket: the energy-weighted mean of the grid "
                                     "provider's intervals the job's energy fell in; null when none is known yet")},
        "intensity_status": {"type": "string", "enum": ["provisional", "final", "missing"]},
        "intensity_provider": {"type": "string", "nullable": True},
        "intensity_zone": {"type": "string", "nullable": True},
        "intensity_basis": {"type": "string", "nullable": True,
                            "description": ("actual | forecast | latest | fallback | static "
                                            "(the least sure of the bucket's intervals)")},
        "co2e_g": {"type": "number", "minimum": 0},
    })

    health_part = _obj({
        "name": _STR,
        "state": {"type": "string", "enum": ["ok", "degraded", "disabled"]},
        "detail": _STR,
        "errors_total": {"type": "integer", "minimum": 0},
        "since": _EPOCH_NULLABLE,
    })

    return {
        "Error": _obj({
            "error": _obj({
                "status": {"type": "integer", "minimum": 400, "maximum": 599},
                "message": _STR,
            }),
        }, description="Every error answer."),
        "Health": _obj({
            "status": {"type": "string", "enum": ["ok", "degraded", "stalled", "starting"]},
            "tick": _INT,
            "last_tick_at": _EPOCH,
            "last_tick_duration_s": _NUMBER,
            "parts": {"type": "array", "items": health_part},
        }, required=["status", "parts"], description="`starting` (before the first tick) has only status and parts."),
        "EnergyByComponent": energy_by_component,
        "Job": job,
        "JobList": _obj({"jobs": {"type": "array", "items": _ref("Job")}, "count": {"type": "integer", "minimum": 0}}),
        "JobSeries": _obj({
            "id": _STR,
            "bucket_s": {"type": "integer", "minimum": 1},
            "buckets": {"type": "array", "items": bucket},
        }),
        "Host": _obj({
            "host": _STR,
            "version": {"type": "string", "description": "the daemon's wattprint version (extension)"},
            "devices": {"type": "array", "items": _obj({
                "kind": {"type": "string", "enum": list(DEVICE_KINDS)},
                "device": _STR,
                "energy_j": {"type": "number", "minimum": 0},
                "source": {"type": "string", "enum": ENERGY_SOURCES},
            })},
            "device_energy_j": _ref("EnergyByComponent"),
            "attributed_energy_j": _ref("EnergyByComponent"),
            "unattributed_energy_j": _ref("EnergyByComponent"),
            "node_energy_j": {"type": "number", "minimum": 0,
                              "description": ("the node's input energy from its BMC (devices of kind `node`), "
                                              "joules; 0 without a BMC. `device_energy_j.other` is the remainder "
                                              "booked from it (attributed + unattributed)")},
            "power_w": {"type": "array", "description": "latest power of each device (empty before the first tick)",
                        "items": _obj({
                            "kind": {"type": "string", "enum": list(DEVICE_KINDS)},
                            "device": _STR,
                            "name": _STR,
                            "power_w": {"type": "number", "minimum": 0},
                            "source": {"type": "string", "enum": ENERGY_SOURCES},
                        })},
        }, description="Device totals in the store; for every component, attributed + unattributed = device."),
        "Intensity": _obj({
            "zone": _STR,
            "provider": _STR,
            "points": {"type": "array", "items": _obj({
                "start": _EPOCH,
                "end": _EPOCH,
                "g_per_kwh": {"type": "number", "minimum": 0},
                "kind": {"type": "string", "description": "actual | forecast"},
            })},
        }, description="Grid carbon intensity series of the configured zone."),
    }


def _job_id_param() -> dict[str, Any]:
    return {"name": "id", "in": "path", "required": True, "description": "job id (percent-encoded)",
            "schema": {"type": "string", "maxLength": MAX_JOB_ID_CHARS}}


def _common_responses() -> dict[str, Any]:
    """Answers any operation can give: auth, identity, limits, timeouts, failures."""
    too_many = _error_response("more than `[http] rate_limit_per_s` requests per second from this client "
                               "(peer address over TCP, uid on the Unix socket)")
    too_many["headers"] = {"Retry-After": {"description": "seconds to wait before the next request",
                                           "schema": {"type": "integer", "minimum": 1}}}
    return {
        "401": _error_response("`[http] token` is set and the bearer token is missing or wrong (over TCP; on the "
                               "Unix socket only for /metrics and /healthz)"),
        "403": _error_response("Unix socket only: the kernel did not say who the caller is"),
        "413": _error_response("the request body is larger than `[http] max_request_bytes`"),
        "414": _error_response(f"the request target (path and query) is longer than {MAX_URL_BYTES} bytes"),
        "429": too_many,
        "500": _error_response("unexpected failure (logged; no details given)"),
        "503": _error_response(f"the request took longer than {REQUEST_TIMEOUT_S:g} s"),
    }


def openapi_spec() -> dict[str, Any]:
    """The OpenAPI 3.0.3 document for the whole HTTP API."""
    bad_request = _error_response(
        "a query parameter is unknown, repeated or invalid, or `since` is after `until`; also a request that "
        f"is not valid HTTP (request line over {PARSER_MAX_LINE_BYTES} bytes, a header over "
        f"{PARSER_MAX_FIELD_BYTES} bytes)")
    malformed = _error_response(
        f"not valid HTTP (request line over {PARSER_MAX_LINE_BYTES} bytes, a header over "
        f"{PARSER_MAX_FIELD_BYTES} bytes)")
    not_found = _error_response("no job with this id (on the Unix socket: none of the caller's)")
    common = {"400": malformed, **_common_responses()}

    paths: dict[str, Any] = {
        "/healthz": {"get": {
            "operationId": "getHealth",
            "summary": "State of each source and sink",
            "responses": {
                "200": {"description": "ok or degraded", "content": _json_content(_ref("Health"))},
                **common,
                "503": {"description": ("starting (no tick yet) or stalled (no tick for 5 intervals): Health; "
                                        f"the request took longer than {REQUEST_TIMEOUT_S:g} s: Error"),
                        "content": _json_content({"oneOf": [_ref("Health"), _ref("Error")]})},
            },
        }},
        "/metrics": {"get": {
            "operationId": "getMetrics",
            "summary": "Prometheus exposition",
            "responses": {
                "200": {"description": "Prometheus text format (version 0.0.4)",
                        "content": {"text/plain": {"schema": {"type": "string"}}}},
                **common,
            },
        }},
        "/api/v1/jobs": {"get": {
            "operationId": "listJobs",
            "summary": "Per-job totals, newest first",
            "parameters": [
                {"name": "state", "in": "query", "schema": {"type": "string", "enum": list(JOB_STATES)}},
                {"name": "since", "in": "query", "description": "jobs active at or after this time",
                 "schema": _TIME_PARAM_SCHEMA},
                {"name": "until", "in": "query", "description": "jobs started before this time",
                 "schema": _TIME_PARAM_SCHEMA},
                {"name": "label", "in": "query",
                 "description": "exact label: the exported (sanitised) `label` or the label as set (`label_raw`)",
                 "schema": {"type": "string", "maxLength": MAX_FILTER_CHARS}},
                {"name": "user", "in": "query",
                 "description": "exact user name (on the Unix socket another user's name gives no jobs)",
                 "schema": {"type": "string", "maxLength": MAX_FILTER_CHARS}},
                {"name": "limit", "in": "query",
                 "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 100}},
            ],
            "responses": {
                **common,
                "200": {"description": "matching jobs (on the Unix socket, a caller other than root gets only "
                                       "its own)", "content": _json_content(_ref("JobList"))},
                "400": bad_request,
            },
        }},
        "/api/v1/jobs/{id}": {"get": {
            "operationId": "getJob",
            "summary": "One job's totals",
            "parameters": [_job_id_param()],
            "responses": {
                **common,
                "200": {"description": "the job", "content": _json_content(_ref("Job"))},
                "400": _error_response(f"job id longer than {MAX_JOB_ID_CHARS} characters, or not valid HTTP"),
                "404": not_found,
            },
        }},
        "/api/v1/jobs/{id}/series": {"get": {
            "operationId": "getJobSeries",
            "summary": "One job's energy and CO2e per time bucket",
            "parameters": [_job_id_param()],
            "responses": {
                **common,
                "200": {"description": "the job's buckets, oldest first", "content": _json_content(_ref("JobSeries"))},
                "400": _error_response(f"job id longer than {MAX_JOB_ID_CHARS} characters, or not valid HTTP"),
                "404": not_found,
            },
        }},
        "/api/v1/host": {"get": {
            "operationId": "getHost",
            "summary": "Device totals, attributed and unattributed energy",
            "responses": {"200": {"description": "host totals", "content": _json_content(_ref("Host"))}, **common},
        }},
        "/api/v1/intensity": {"get": {
            "operationId": "getIntensity",
            "summary": "Grid carbon intensity over a time range",
            "parameters": [
                {"name": "since", "in": "query", "schema": _TIME_PARAM_SCHEMA,
                 "description": "default: one day before now (or before `until`, when that is earlier)"},
                {"name": "until", "in": "query", "schema": _TIME_PARAM_SCHEMA,
                 "description": "default: two days after now (or after `since`, when that is later)"},
            ],
            "responses": {
                **common,
                "200": {"description": "intensity points", "content": _json_content(_ref("Intensity"))},
                "400": bad_request,
            },
        }},
        "/api/v1/openapi.json": {"get": {
            "operationId": "getOpenApi",
            "summary": "This document",
            "responses": {
                "200": {"description": "OpenAPI 3.0.3 document",
                        "content": {"application/json": {"schema": {"type": "object"}}}},
                **common,
            },
        }},
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "wattprint",
            "version": API_VERSION,
            "description": ("Per-job GPU, CPU, DRAM and node (BMC) energy and CO2e of one host. Times are seconds since the "
                            "Unix epoch; energies are joules unless a name says kWh. Every error is JSON "
                            "`{\"error\": {\"status\": N, \"message\": \"...\"}}`. When `[http] token` is set, "
                            "every request needs `Authorization: Bearer <token>`. With `[http] socket` the API is also "
                            "served on a Unix socket, where the caller's uid (SO_PEERCRED) decides: a user other "
                            "than root sees only their own jobs."),
        },
        "servers": [{"url": "http://127.0.0.1:9877", "description": "default `[http] listen`"}],
        # Auth is optional: the empty requirement {} means "no token needed" (the default).
        "security": [{}, {"bearerAuth": []}],
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer",
                               "description": "needed only when `[http] token` is set"},
            },
        },
    }
