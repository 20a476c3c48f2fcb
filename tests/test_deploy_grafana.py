"""Grafana provisioning and dashboards (deploy/grafana/): valid for provisioning, and
every panel query parses and returns data on the real data sources.

- The provisioning YAML names both data sources with the uids the dashboards use.
- Each dashboard JSON is what Grafana's file provisioning accepts: schemaVersion >= 36,
  a stable unique uid, unique panel ids, every panel and target naming a provisioned
  data source by ``{"type", "uid"}``, every target carrying a query, every variable a
  query uses defined.
- Every Prometheus expression (variables filled with "All" = ``.*`` and with concrete
  values) runs on a real Prometheus scraping wattprint's real exporter; every InfluxQL
  query runs on a real influxd holding points made by wattprint's own line-protocol
  code. Each must parse and return data, and the per-job tables must give the totals
  that went in.
- End to end (``test_panels_return_data_end_to_end``): the real daemon writing to a
  real InfluxDB and scraped by a real Prometheus; every panel returns data and the
  per-job panels agree with the daemon's API within 1%.

PyYAML is not a dependency, so the provisioning files are read with ``load_yaml``, a
reader for the plain block-style YAML subset they are written in (it refuses anything
else, so the files cannot silently drift out of what it understands).
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from aiohttp import web

from processes import Processes
from servers import BackgroundAppFactory, InfluxServer, PrometheusFactory, PrometheusServer, http_request
from wattprint.daemon.model import (
    DeviceReading,
    DeviceState,
    JobRef,
    JobTotals,
    Snapshot,
    SourceHealth,
    TickRecord,
)
from wattprint.exporters.influx_points import grid_intensity_line, job_co2e_line, tick_to_lines
from wattprint.exporters.prometheus import RESERVED_NAMES, build_registry, render

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "deploy" / "grafana"
DATASOURCES_YML = GRAFANA / "provisioning" / "datasources" / "wattprint.yml"
DASHBOARDS_YML = GRAFANA / "provisioning" / "dashboards" / "wattprint.yml"
DASHBOARD_FILES = sorted((GRAFANA / "dashboards").glob("*.json"))

J_PER_KWH = 3_600_000.0

# Grafana's built-in variables that queries may use without defining them.
BUILTIN_VARIABLES = {
    "timeFilter", "__timeFilter", "__interval", "__interval_ms", "__rate_interval", "__range", "__range_s",
    "__range_ms", "__from", "__to", "__dashboard", "__org", "__user", "__name", "__all",
}
# What Grafana's ``$__...`` placeholders become in the tests (as Grafana would send them).
PROM_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h", "__range_s": "3600"}
INFLUX_BUILTINS = {"__interval": "10s", "__interval_ms": "10000"}

# Per-job totals panels: (dashboard uid, panel title) -> {refId: API field it must match}.
PER_JOB_TOTALS = {
    ("wattprint-live", "Per-job energy and CO2e"): {"kWh": "energy_kwh", "CO2e": "co2e_g"},
    ("wattprint-jobs", "Per-job energy and CO2e"): {"kWh": "energy_kwh", "CO2e": "co2e_g"},
    ("wattprint-jobs", "Per-job lifecycle footprint"): {"Embodied": "embodied_co2e_g", "Water": "water_l",
                                                       "Location": "co2e_g", "Market": "co2e_market_g"},
    ("wattprint-live", "Per-job lifecycle footprint"): {"Embodied": "embodied_co2e_g", "Water": "water_l",
                                                       "Location": "co2e_g", "Market": "co2e_market_g"},
}


# --------------------------------------------------------------------- YAML (subset)


class YamlSubsetError(ValueError):
    pass


def _strip_comment(line: str) -> str:
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def _scalar(text: str) -> Any:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text[:1] in "[{&*!|>%@`":
        raise YamlSubsetError(f"unsupported YAML construct: {text!r}")
    if text in ("true", "false"):
        return text == "true"
    if text in ("null", "~", ""):
        return None
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return text


def load_yaml(text: str) -> Any:
    """Parse block-style YAML: mappings, sequences, plain or quoted scalars, comments."""
    lines: list[tuple[int, str]] = []
    for raw in text.splitlines():
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise YamlSubsetError(f"tab in indentation: {raw!r}")
        stripped = _strip_comment(raw)
        if stripped.strip():
            lines.append((len(stripped) - len(stripped.lstrip(" ")), stripped.strip()))

    def block(i: int, indent: int) -> tuple[Any, int]:
        if lines[i][1].startswith("- ") or lines[i][1] == "-":
            return sequence(i, indent)
        return mapping(i, indent)

    def sequence(i: int, indent: int) -> tuple[list[Any], int]:
        out: list[Any] = []
        while i < len(lines) and lines[i][0] == indent and (lines[i][1].startswith("- ") or lines[i][1] == "-"):
            rest = lines[i][1][1:].strip()
            if not rest:
                value, i = block(i + 1, lines[i + 1][0])
            elif re.match(r"^[^'\"]+?:( |$)", rest):
                lines[i] = (indent + 2, rest)  # "- key: value" opens a mapping at indent + 2
                value, i = mapping(i, indent + 2)
            else:
                value, i = _scalar(rest), i + 1
            out.append(value)
        return out, i

    def mapping(i: int, indent: int) -> tuple[dict[str, Any], int]:
        out: dict[str, Any] = {}
        while i < len(lines) and lines[i][0] == indent:
            content = lines[i][1]
            m = re.match(r"^([A-Za-z0-9_.-]+):(?: (.*))?$", content)
            if m is None:
                raise YamlSubsetError(f"expected 'key: value', got {content!r}")
            key, rest = m.group(1), (m.group(2) or "").strip()
            if key in out:
                raise YamlSubsetError(f"duplicate key {key!r}")
            i += 1
            if rest:
                out[key] = _scalar(rest)
            elif i < len(lines) and lines[i][0] > indent:
                out[key], i = block(i, lines[i][0])
            elif i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
                out[key], i = sequence(i, indent)
            else:
                out[key] = None
        if i < len(lines) and lines[i][0] > indent:
            raise YamlSubsetError(f"unexpected indentation at {lines[i][1]!r}")
        return out, i

    if not lines:
        return None
    value, end = block(0, lines[0][0])
    if end != len(lines):
        raise YamlSubsetError(f"could not parse from {lines[end][1]!r}")
    return value


def test_yaml_subset_reader() -> None:
    doc = load_yaml(
        "# comment\napiVersion: 1\nitems:\n  - name: a # trailing\n    url: 'http://x:1/#frag'\n"
        "    nested:\n      k: true\n  - name: b\nlist:\n- 1\n- two\n"
    )
    assert doc == {"apiVersion": 1, "items": [{"name": "a", "url": "http://x:1/#frag", "nested": {"k": True}},
                                              {"name": "b"}], "list": [1, "two"]}
    with pytest.raises(YamlSubsetError):
        load_yaml("a: [1, 2]\n")
    with pytest.raises(YamlSubsetError):
        load_yaml("a: 1\na: 2\n")


# ------------------------------------------------------------- provisioning files


def datasources() -> dict[str, dict[str, Any]]:
    doc = load_yaml(DATASOURCES_YML.read_text())
    assert doc["apiVersion"] == 1
    return {ds["uid"]: ds for ds in doc["datasources"]}


def dashboards() -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in DASHBOARD_FILES]


def test_datasource_provisioning() -> None:
    by_uid = datasources()
    assert set(by_uid) == {"wattprint-prometheus", "wattprint-influxdb"}
    prom = by_uid["wattprint-prometheus"]
    assert prom["type"] == "prometheus" and prom["url"] == "http://localhost:9090" and prom["access"] == "proxy"
    influx = by_uid["wattprint-influxdb"]
    assert influx["type"] == "influxdb" and influx["url"] == "http://localhost:8086" and influx["access"] == "proxy"
    assert influx["jsonData"]["dbName"] == "wattprint" and influx["database"] == "wattprint"
    assert influx["jsonData"].get("version", "InfluxQL") == "InfluxQL"
    names = [ds["name"] for ds in by_uid.values()]
    assert len(set(names)) == len(names)
    for ds in by_uid.values():
        assert "password" not in ds and "secureJsonData" not in ds  # no secrets in the example


def test_dashboard_provider_provisioning() -> None:
    doc = load_yaml(DASHBOARDS_YML.read_text())
    assert doc["apiVersion"] == 1
    [provider] = doc["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")
    assert provider["folderUid"] and len(provider["folderUid"]) <= 40


# ------------------------------------------------------------------ dashboard JSON


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def query_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    return (p for p in all_panels(dashboard) if p.get("type") != "row")


def target_query(target: dict[str, Any], ds_type: str) -> str:
    return str(target.get("expr") if ds_type == "prometheus" else target.get("query") or "")


def variable_query(variable: dict[str, Any]) -> str:
    query = variable.get("query")
    if isinstance(query, dict):
        query = query.get("query", "")
    return str(query or "")


VAR_REF = re.compile(r"\$\{([A-Za-z0-9_]+)(?::[^}]*)?\}|\[\[([A-Za-z0-9_]+)(?::[^\]]*)?\]\]|\$([A-Za-z0-9_]+)")


def referenced_variables(text: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in VAR_REF.finditer(text)}


DS_VAR = re.compile(r"^\$\{([A-Za-z0-9_]+)\}$")


def datasource_variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"] if v.get("type") == "datasource"}


def resolved_uid(dashboard: dict[str, Any], ds: dict[str, Any]) -> str:
    """A panel's data source uid as provisioning resolves it: ``${DS_X}`` is the data
    source variable DS_X, whose current value is the provisioned uid (a UI import with
    ``__inputs`` replaces ``${DS_X}`` by the data source picked instead)."""
    m = DS_VAR.match(str(ds.get("uid", "")))
    if m is None:
        return str(ds.get("uid"))
    variable = datasource_variables(dashboard)[m.group(1)]
    assert variable["query"] == ds["type"], f"{m.group(1)}: a {variable['query']} variable for a {ds['type']} panel"
    return str(variable["current"]["value"])


def test_dashboards_import_with_inputs() -> None:
    """Grafana's UI import asks for each ``__inputs`` data source and substitutes
    ``${NAME}``: every data source the panels and variables name is such an input, of
    the right plugin, and a data source variable of the same name makes the same JSON
    work when provisioned."""
    for dash in dashboards():
        inputs = {i["name"]: i for i in dash["__inputs"]}
        assert inputs and all(i["type"] == "datasource" for i in inputs.values()), dash["uid"]
        used: set[tuple[str, str]] = set()
        for panel in query_panels(dash):
            used.add((panel["datasource"]["uid"], panel["datasource"]["type"]))
            used |= {(t["datasource"]["uid"], t["datasource"]["type"]) for t in panel["targets"] if "datasource" in t}
        for variable in dash["templating"]["list"]:
            if variable.get("type") != "datasource":
                used.add((variable["datasource"]["uid"], variable["datasource"]["type"]))
        for uid, typ in used:
            m = DS_VAR.match(uid)
            assert m is not None, f"{dash['uid']}: data source {uid!r} is not an import input"
            assert inputs[m.group(1)]["pluginId"] == typ
        assert {m for u, _ in used for m in [DS_VAR.match(u).group(1)]} == set(inputs)  # type: ignore[union-attr]
        assert set(datasource_variables(dash)) == set(inputs)
        assert {resolved_uid(dash, {"uid": uid, "type": typ}) for uid, typ in used} <= set(datasources())


def test_intensity_panels_have_a_gco2e_per_kwh_unit() -> None:
    panels = [(d["uid"], p) for d in dashboards() for p in query_panels(d) if "intensity" in p["title"].lower()]
    assert len(panels) == 2
    for uid, panel in panels:
        assert panel["fieldConfig"]["defaults"]["unit"] == "suffix: gCO2e/kWh", (uid, panel["title"])


def test_dashboards_are_valid_for_provisioning() -> None:
    assert {p.name for p in DASHBOARD_FILES} == {"wattprint-live.json", "wattprint-jobs.json"}
    by_uid = datasources()
    uids: list[str] = []
    for path, dash in zip(DASHBOARD_FILES, dashboards()):
        where = path.name
        assert "id" not in dash or dash["id"] is None, f"{where}: provisioned dashboards must not carry an id"
        assert isinstance(dash.get("schemaVersion"), int) and dash["schemaVersion"] >= 36, where
        uid = dash.get("uid")
        assert isinstance(uid, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,40}", uid), f"{where}: uid {uid!r}"
        assert path.stem == uid, f"{where}: file name should be the uid"
        uids.append(uid)
        assert dash.get("title") and "wattprint" in dash.get("tags", [])
        assert isinstance(dash.get("panels"), list) and dash["panels"]

        variables = {v["name"]: v for v in dash["templating"]["list"]}
        assert {"host", "label", "user"} <= set(variables), f"{where}: host, label and user variables"
        defined = set(variables) | BUILTIN_VARIABLES

        panel_ids = [p["id"] for p in all_panels(dash)]
        assert len(panel_ids) == len(set(panel_ids)), f"{where}: duplicate panel ids"
        for panel in all_panels(dash):
            grid = panel["gridPos"]
            assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, f"{where}: {panel['title']}"

        for panel in query_panels(dash):
            title = f"{where}: panel {panel.get('title')!r}"
            ds = panel.get("datasource")
            assert isinstance(ds, dict) and set(ds) == {"type", "uid"}, f"{title}: datasource must be {{type, uid}}"
            uid = resolved_uid(dash, ds)
            assert uid in by_uid, f"{title}: unknown data source uid {uid!r}"
            assert ds["type"] == by_uid[uid]["type"], f"{title}: data source type mismatch"
            targets = panel.get("targets") or []
            assert targets, f"{title}: no targets"
            ref_ids = [t.get("refId") for t in targets]
            assert all(ref_ids) and len(set(ref_ids)) == len(ref_ids), f"{title}: refIds"
            for target in targets:
                if "datasource" in target:
                    assert target["datasource"] == ds, f"{title}: target data source differs from the panel's"
                query = target_query(target, ds["type"])
                assert query.strip(), f"{title}: target {target.get('refId')} has no query"
                if ds["type"] == "influxdb":
                    assert target.get("rawQuery") is True, f"{title}: InfluxQL targets are raw queries"
                undefined = referenced_variables(query) - defined
                assert not undefined, f"{title}: undefined variables {undefined}"
                for text in (target.get("legendFormat", ""), target.get("alias", "")):
                    assert not (referenced_variables(text) - defined - {f"tag_{t}" for t in
                                ("host", "job_id", "label", "user", "kind", "device", "zone", "provider")}), title

        for name, variable in variables.items():
            if variable.get("type") == "datasource":
                assert variable["current"]["value"] in by_uid, f"{where}: variable {name} default"
                continue
            ds = variable.get("datasource")
            assert isinstance(ds, dict) and resolved_uid(dash, ds) in by_uid, f"{where}: variable {name} data source"
            assert variable_query(variable), f"{where}: variable {name} has no query"
            assert not (referenced_variables(variable_query(variable)) - defined), f"{where}: variable {name}"
    assert len(uids) == len(set(uids)), "dashboard uids must be unique"


def test_dashboards_use_real_metric_names() -> None:
    """Every wattprint_* metric a panel queries is one the exporter emits (its fixed
    families, or a daemon counter exported as wattprint_<key>)."""
    counters = {"wattprint_spool_bytes", "wattprint_tick_overruns_total", "wattprint_tick_errors_total"}
    used = {name for _, query, _ in all_queries("prometheus") for name in re.findall(r"\bwattprint_[a-z0-9_]+", query)}
    assert used and used <= RESERVED_NAMES | counters, used - RESERVED_NAMES - counters
    measurements = {"device_power", "job_energy", "job_co2e", "grid_intensity", "unattributed_energy", "job_footprint"}
    used = {m for _, query, _ in all_queries("influxdb") for m in re.findall(r'FROM "([a-z0-9_]+)"', query)}
    assert used == measurements


def test_per_job_totals_panels_exist() -> None:
    found = {(d["uid"], p["title"]): {t["refId"] for t in p["targets"]} for d in dashboards() for p in query_panels(d)}
    for key, refs in PER_JOB_TOTALS.items():
        assert key in found, key
        assert set(refs) == found[key], key


# --------------------------------------------------------- running the queries


def all_queries(ds_type: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(where, query, target) for every target and variable using a ``ds_type`` source."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    for dash in dashboards():
        for panel in query_panels(dash):
            if panel["datasource"]["type"] != ds_type:
                continue
            for target in panel["targets"]:
                out.append((f"{dash['uid']}: {panel['title']} [{target['refId']}]", target_query(target, ds_type), target))
        for variable in dash["templating"]["list"]:
            if variable.get("type") != "datasource" and variable["datasource"]["type"] == ds_type:
                out.append((f"{dash['uid']}: variable {variable['name']}", variable_query(variable), {}))
    return out


def substitute(query: str, values: dict[str, str]) -> str:
    def repl(m: re.Match[str]) -> str:
        name = next(g for g in m.groups() if g)
        if name not in values:
            raise KeyError(f"no test value for ${name} in {query!r}")
        return values[name]

    return VAR_REF.sub(repl, query)


def go_regex_escape(text: str) -> str:
    """Escape a value for an RE2 regex (Prometheus =~ and InfluxQL /.../), as Grafana does."""
    return re.sub(r"([\\.+*?()|\[\]{}^$/])", r"\\\1", text)


def prom_regex_escape(text: str) -> str:
    """A value for ``label=~"$var"``: regex-escaped, then escaped for a PromQL string
    (Grafana's prometheusRegularEscape does the same)."""
    return go_regex_escape(text).replace("\\", "\\\\")


LABEL_VALUES = re.compile(r"^label_values\((?:(.*),\s*)?([A-Za-z_][A-Za-z0-9_]*)\)$")


def prometheus_api(server: PrometheusServer, path: str, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
    status, body = http_request(f"{server.url}{path}?{urllib.parse.urlencode(params)}")
    return status, (json.loads(body) if body else {})


def run_prometheus_queries(server: PrometheusServer, values: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Run every Prometheus target and variable query with ``values``; assert each
    parses and returns data; return results by ``where``."""
    results: dict[str, list[dict[str, Any]]] = {}
    now = time.time()
    for where, query, target in all_queries("prometheus"):
        expr = substitute(query, {**PROM_BUILTINS, **values})
        m = LABEL_VALUES.match(expr)
        if m is not None:  # a Grafana variable query: label_values(selector, label)
            selector, label = m.group(1) or "", m.group(2)
            status, answer = prometheus_api(server, f"/api/v1/label/{label}/values",
                                            {"match[]": selector} if selector else {})
            assert status == 200 and answer.get("status") == "success", f"{where}: {expr!r}: {answer}"
            assert answer["data"], f"{where}: {expr!r} returned no values"
            results[where] = [{"value": v} for v in answer["data"]]
            continue
        if target.get("instant") or not target.get("range", True):
            status, answer = prometheus_api(server, "/api/v1/query", {"query": expr, "time": f"{now:.3f}"})
        else:
            status, answer = prometheus_api(server, "/api/v1/query_range",
                                            {"query": expr, "start": f"{now - 120:.3f}", "end": f"{now:.3f}", "step": "1"})
        assert status == 200 and answer.get("status") == "success", f"{where}: {expr!r} does not run: {answer}"
        result = answer["data"]["result"]
        assert result, f"{where}: {expr!r} returned no data"
        results[where] = result
    return results


def influx_query(server: InfluxServer, q: str) -> dict[str, Any]:
    status, body = http_request(
        f"{server.url}/query", method="POST",
        data=urllib.parse.urlencode({"q": q, "db": "wattprint", "epoch": "ms"}).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    answer: dict[str, Any] = json.loads(body) if body else {}
    errors = [answer["error"]] if "error" in answer else []
    errors += [r["error"] for r in answer.get("results", []) if "error" in r]
    assert status == 200 and not errors, f"InfluxQL {q!r}: HTTP {status}: {errors or body[:300]!r}"
    return answer


def run_influx_queries(server: InfluxServer, values: dict[str, str], since_s: float,
                       until_s: float) -> dict[str, list[dict[str, Any]]]:
    """Run every InfluxQL target and variable query with ``values`` over [since, until];
    assert each parses and returns data; return the series by ``where``."""
    time_filter = f"time >= {int(since_s * 1000)}ms and time <= {int(until_s * 1000)}ms"
    results: dict[str, list[dict[str, Any]]] = {}
    for where, query, _target in all_queries("influxdb"):
        q = substitute(query, {**INFLUX_BUILTINS, "timeFilter": time_filter, **values})
        answer = influx_query(server, q)
        series = [s for r in answer.get("results", []) for s in r.get("series", [])]
        assert series and any(s.get("values") for s in series), f"{where}: {q!r} returned no data"
        results[where] = series
    return results


def totals_by_job(series: list[dict[str, Any]], *, influx: bool) -> dict[str, float]:
    """job_id -> the table's number, from an InfluxQL (tag-grouped) or Prometheus result."""
    out: dict[str, float] = {}
    for item in series:
        if influx:
            out[item["tags"]["job_id"]] = float(item["values"][0][1])
        else:
            out[item["metric"]["job_id"]] = float(item["value"][1])
    return out


def per_job_where(dash_uid: str, title: str, ref: str) -> str:
    return f"{dash_uid}: {title} [{ref}]"


# ----------------------------------------------- Prometheus panels, real exporter


JOBS = (("1234@1700000000.25", "lora-7b", "alice"), ("4321@1700000100.5", "eval.run", "bob"))


def advancing_snapshot(started: float) -> Callable[[], Snapshot]:
    """A snapshot whose counters grow with time, like the daemon's."""

    def get() -> Snapshot:
        now = time.time()
        t = now - started + 10.0
        return Snapshot(
            taken_at=now, tick=int(t), tick_duration_s=0.012,
            devices=(
                DeviceState("gpu", "gpu0", "NVIDIA RTX A4000", 140.0, 140.0 * t, "counter"),
                DeviceState("cpu", "package-0", "package-0", 35.0, 35.0 * t, "counter"),
                DeviceState("dram", "dram-0", "dram", 4.0, 4.0 * t, "counter"),
                # the node from its BMC: 179 W measured + 71 W remainder (other)
                DeviceState("node", "node", "redfish", 250.0, 250.0 * t, "counter"),
            ),
            jobs=tuple(
                JobTotals(job_id=jid, label=label, user=user, uid=1000 + n,
                          energy_j={"gpu": 60.0 * t, "cpu": 15.0 * t, "dram": 1.5 * t, "other": 30.0 * t},
                          co2e_g=106.5 * t / J_PER_KWH * 82.5, state="running",
                          # lifecycle (issue 16): a 60 % PPA at 20 g/kWh, 0.5 g embodied and 2 mL water a second
                          co2e_market_g=106.5 * t / J_PER_KWH * (0.4 * 82.5 + 0.6 * 20.0),
                          embodied_co2e_g=0.5 * t * (n + 1), water_l=0.002 * t)
                for n, (jid, label, user) in enumerate(JOBS)
            ),
            unattributed_j_total={"gpu": 20.0 * t, "cpu": 5.0 * t, "dram": 1.0 * t, "other": 11.0 * t},
            health=(SourceHealth("gpu", "ok"), SourceHealth("rapl", "ok"), SourceHealth("processes", "ok"),
                    SourceHealth("store", "ok"), SourceHealth("influxdb", "degraded", "connection refused", 3)),
            grid_zone="DK1", grid_provider="energidataservice", grid_g_per_kwh=82.5,
            counters={"tick_overruns_total": 0.0, "tick_errors_total": 0.0, "spool_bytes": 4096.0 + 100 * t},
        )

    return get


@pytest.mark.slow
def test_prometheus_panels_parse_and_return_data(
    background_app: BackgroundAppFactory, prometheus_factory: PrometheusFactory
) -> None:
    registry = build_registry(advancing_snapshot(time.time()))

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = render(registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    target = background_app(app)
    prometheus = prometheus_factory([target.host_port])
    # rate() and increase() need two samples in their window: wait for a few scrapes.
    prometheus.wait_for("count_over_time(wattprint_ticks_total[1m])",
                        lambda r: bool(r) and float(r[0]["value"][1]) >= 3, timeout=30)

    all_values = {"host": ".*", "label": ".*", "user": ".*"}
    every = run_prometheus_queries(prometheus, all_values)
    # Fleet (per label) and per-user tables: each label / user has one job here, so its
    # row is that job's row of the per-job table (read a scrape or two apart).
    per_job = totals_by_job(every[per_job_where("wattprint-live", "Per-job energy and CO2e", "kWh")], influx=False)
    for key, title in (("label", "Energy and CO2e per label, across hosts"), ("user", "Energy and CO2e per user")):
        rows = {r["metric"][key]: float(r["value"][1]) for r in every[per_job_where("wattprint-live", title, "kWh")]}
        index = 1 if key == "label" else 2
        assert rows == pytest.approx({job[index]: per_job[job[0]] for job in JOBS}, rel=0.05), (key, rows)
    jid, label, user = JOBS[0]
    concrete = {"host": prom_regex_escape(target.host_port), "label": prom_regex_escape(label),
                "user": prom_regex_escape(user)}
    results = run_prometheus_queries(prometheus, concrete)

    # The per-job table shows exactly what the exporter says, for the selected job only.
    where_kwh = per_job_where("wattprint-live", "Per-job energy and CO2e", "kWh")
    where_co2e = per_job_where("wattprint-live", "Per-job energy and CO2e", "CO2e")
    kwh = totals_by_job(results[where_kwh], influx=False)
    co2e = totals_by_job(results[where_co2e], influx=False)
    assert set(kwh) == set(co2e) == {jid}
    assert co2e[jid] == pytest.approx(kwh[jid] * 82.5, rel=0.05)  # both read within a scrape or two
    # The lifecycle table: the snapshot's figures for the selected job (t from its energy).
    t = kwh[jid] * J_PER_KWH / 106.5
    want = {"Location": 82.5 * t * 106.5 / J_PER_KWH, "Market": (0.4 * 82.5 + 0.6 * 20.0) * t * 106.5 / J_PER_KWH,
            "Embodied": 0.5 * t * 1, "Water": 0.002 * t}
    for ref, value in want.items():
        got = totals_by_job(results[per_job_where("wattprint-live", "Per-job lifecycle footprint", ref)], influx=False)
        assert got == {jid: pytest.approx(value, rel=0.05)}, ref
    # With a node from its BMC, the unattributed share is over the node's energy (250 W), not over
    # node + GPU + CPU + DRAM: unattributed 26 W measured + 11 W of the remainder.
    share = results[per_job_where("wattprint-live", "Unattributed share of energy", "A")]
    assert float(share[0]["value"][1]) == pytest.approx(37.0 / 250.0, rel=0.02)


def test_prometheus_panel_with_a_typo_fails_to_parse(prometheus_factory: PrometheusFactory) -> None:
    """The check above really catches parse errors (a 400 from the query API)."""
    prometheus = prometheus_factory([])
    status, answer = prometheus_api(prometheus, "/api/v1/query", {"query": "sum by (job_id (wattprint_ticks_total)"})
    assert status == 400 and answer.get("errorType") == "bad_data"


# ------------------------------------------------ InfluxQL panels, real influxd


def influx_points(now: float) -> tuple[str, dict[str, dict[str, float]]]:
    """Line protocol for 120 one-second ticks ending at ``now`` plus CO2e buckets and grid
    intensity, made by wattprint's own exporter code; and the per-job totals written."""
    lines: list[str] = []
    totals: dict[str, dict[str, float]] = {
        jid: {"energy_kwh": 0.0, "co2e_g": 0.0, "co2e_market_g": 0.0, "embodied_co2e_g": 0.0, "water_l": 0.0}
        for jid, _, _ in JOBS}
    refs = {jid: JobRef(jid, label, user, 1000 + n) for n, (jid, label, user) in enumerate(JOBS)}
    for k in range(120):
        at = now - 120 + k
        job_energy = {jid: {"gpu": 60.0 + n, "cpu": 15.0, "dram": 1.5, "other": 30.0}
                      for n, (jid, _, _) in enumerate(JOBS)}
        record = TickRecord(
            sampled_at=at, interval_s=1.0,
            readings=(
                DeviceReading("gpu", "gpu0", 141.0, 141.0, "counter", 1.0, name="NVIDIA RTX A4000"),
                DeviceReading("cpu", "package-0", 35.0, 35.0, "counter", 1.0),
                DeviceReading("dram", "dram-0", 4.0, 4.0, "counter", 1.0),
                DeviceReading("node", "node", 251.0, 251.0, "counter", 1.0, name="redfish"),
            ),
            jobs=refs, job_energy_j=job_energy,
            unattributed_j={"gpu": 20.0, "cpu": 5.0, "dram": 1.0, "other": 11.0},
            # lifecycle (issue 16): this tick's embodied grams and litres per job
            job_embodied_co2e_g={jid: 0.0125 * (n + 1) * (1 + k % 4) for n, (jid, _, _) in enumerate(JOBS)},
            job_water_l={jid: 0.0015 * (n + 2) * (1 + k % 3) for n, (jid, _, _) in enumerate(JOBS)},
        )
        lines += tick_to_lines(record, host="gpu-node-01")
        for jid, parts in job_energy.items():
            totals[jid]["energy_kwh"] += sum(parts.values()) / J_PER_KWH
            totals[jid]["embodied_co2e_g"] += record.job_embodied_co2e_g[jid]
            totals[jid]["water_l"] += record.job_water_l[jid]
    for b in range(2):  # two 60 s CO2e buckets per job
        at = now - 120 + 60 * b
        for n, (jid, label, user) in enumerate(JOBS):
            grams = (106.5 + n) * 60 / J_PER_KWH * 82.5
            market = grams * 0.4 + (106.5 + n) * 60 / J_PER_KWH * 0.6 * 20.0  # a 60 % PPA at 20 g/kWh
            line = job_co2e_line(host="gpu-node-01", job_id=jid, label=label, user=user, grams=grams,
                                 g_per_kwh=82.5, status="final" if b == 0 else "provisional", at_s=at,
                                 market_grams=market)
            assert line is not None
            lines.append(line)
            totals[jid]["co2e_g"] += grams
            totals[jid]["co2e_market_g"] += market
    for h in range(-3, 3):
        at = now + 300 * h
        for kind, value in (("actual", 80.0 + h), ("forecast", 85.0 + h)):
            if kind == "actual" and h > 0:
                continue
            line = grid_intensity_line(zone="DK1", provider="energidataservice", kind=kind, g_per_kwh=value, at_s=at,
                                       host="gpu-node-01")
            other = grid_intensity_line(zone="GB", provider="carbonintensity_uk", kind=kind, g_per_kwh=200.0, at_s=at,
                                        host="gpu-node-02")
            assert line is not None and other is not None
            lines += [line, other]
    return "\n".join(lines) + "\n", totals


@pytest.mark.slow
def test_influxql_panels_parse_and_return_data(influxdb_server: InfluxServer) -> None:
    influxdb_server.create_database("wattprint")
    now = time.time()
    lines, totals = influx_points(now)
    influxdb_server.write(lines, db="wattprint")

    since, until = now - 3600, now + 3600
    every = run_influx_queries(influxdb_server, {"host": ".*", "label": ".*", "user": ".*"}, since, until)
    # Fleet and per-user tables: per label / per user, the totals that went in.
    for key, ref_field in (("label", 1), ("user", 2)):
        title = "Energy and CO2e per label, across hosts" if key == "label" else "Energy and CO2e per user"
        got_kwh = {s["tags"][key]: float(s["values"][0][1]) for s in every[per_job_where("wattprint-jobs", title, "kWh")]}
        got_co2e = {s["tags"][key]: float(s["values"][0][1]) for s in every[per_job_where("wattprint-jobs", title, "CO2e")]}
        want_kwh: dict[str, float] = {}
        want_co2e: dict[str, float] = {}
        for job in JOBS:
            want_kwh[job[ref_field]] = want_kwh.get(job[ref_field], 0.0) + totals[job[0]]["energy_kwh"]
            want_co2e[job[ref_field]] = want_co2e.get(job[ref_field], 0.0) + totals[job[0]]["co2e_g"]
        assert got_kwh == pytest.approx(want_kwh, rel=1e-9) and got_co2e == pytest.approx(want_co2e, rel=1e-9)
    grid_all = next(v for k, v in every.items() if "forecast vs actual" in k)
    assert {s["tags"]["zone"] for s in grid_all} == {"DK1", "GB"}
    jid, label, user = JOBS[1]
    results = run_influx_queries(
        influxdb_server,
        {"host": go_regex_escape("gpu-node-01"), "label": go_regex_escape(label), "user": go_regex_escape(user)},
        since, until,
    )
    kwh = totals_by_job(results[per_job_where("wattprint-jobs", "Per-job energy and CO2e", "kWh")], influx=True)
    co2e = totals_by_job(results[per_job_where("wattprint-jobs", "Per-job energy and CO2e", "CO2e")], influx=True)
    assert set(kwh) == set(co2e) == {jid}  # the label and user variables select one job
    assert kwh[jid] == pytest.approx(totals[jid]["energy_kwh"], rel=1e-9)
    assert co2e[jid] == pytest.approx(totals[jid]["co2e_g"], rel=1e-9)
    # The lifecycle table (issue 16): each column the total that went in, for the selected job.
    for ref, field in PER_JOB_TOTALS[("wattprint-jobs", "Per-job lifecycle footprint")].items():
        got = totals_by_job(results[per_job_where("wattprint-jobs", "Per-job lifecycle footprint", ref)], influx=True)
        assert got == {jid: pytest.approx(totals[jid][field], rel=1e-9)}, ref
    # ... and with "All", every job's.
    for ref, field in PER_JOB_TOTALS[("wattprint-jobs", "Per-job lifecycle footprint")].items():
        got = totals_by_job(every[per_job_where("wattprint-jobs", "Per-job lifecycle footprint", ref)], influx=True)
        assert got == {j: pytest.approx(totals[j][field], rel=1e-9) for j, _, _ in JOBS}, ref
    # Cumulative curves end at the totals: per job for embodied CO2e and water, over the
    # selected jobs for market and location CO2e.
    for title, field in (("Embodied CO2e per job, cumulative (g)", "embodied_co2e_g"),
                         ("Water per job, cumulative (L)", "water_l")):
        last = {s["tags"]["job_id"]: float(s["values"][-1][1]) for s in every[per_job_where("wattprint-jobs", title, "A")]}
        assert last == {j: pytest.approx(totals[j][field], rel=1e-9) for j, _, _ in JOBS}, title
    for ref, field in (("Location", "co2e_g"), ("Market", "co2e_market_g")):
        [curve] = every[per_job_where("wattprint-jobs", "CO2e, market vs location, cumulative (g)", ref)]
        assert float(curve["values"][-1][1]) == pytest.approx(sum(totals[j][field] for j, _, _ in JOBS), rel=1e-9)

    # Forecast and actual come out as separate series of the grid panel, for the selected
    # host's zone only ($host: gpu-node-02's GB points are not shown).
    grid = next(v for k, v in results.items() if "forecast vs actual" in k)
    assert {s["tags"]["kind"] for s in grid} == {"actual", "forecast"}
    assert {s["tags"]["zone"] for s in grid} == {"DK1"}


def test_influxql_typo_is_reported(influxdb_server: InfluxServer) -> None:
    """The check above really catches parse errors (an error in the /query answer)."""
    influxdb_server.create_database("wattprint")
    with pytest.raises(AssertionError, match="error parsing query"):
        influx_query(influxdb_server, 'SELECT sum("joules" FROM "job_energy"')


# ------------------------------------------------------------------- end to end


def fake_uk_grid_api(now: float) -> web.Application:
    """A stand-in for the UK Carbon Intensity API's national endpoint: half-hour windows
    from 3 h before ``now`` to 3 h after, with an actual value for windows that have
    ended and only a forecast for the rest (as the real API publishes them)."""
    from datetime import datetime, timedelta, timezone

    half_hour = 1800
    first = int(now // half_hour) * half_hour - 6 * half_hour
    windows = []
    for k in range(12):
        start = datetime.fromtimestamp(first + k * half_hour, timezone.utc)
        end = start + timedelta(seconds=half_hour)
        ended = end.timestamp() <= now
        windows.append({"from": start.strftime("%Y-%m-%dT%H:%MZ"), "to": end.strftime("%Y-%m-%dT%H:%MZ"),
                        "intensity": {"forecast": 120 + k, "actual": 100 + k if ended else None, "index": "low"}})

    async def intensity(request: web.Request) -> web.Response:
        return web.json_response({"data": windows})

    app = web.Application()
    app.router.add_get("/intensity/{start}/{end}", intensity)
    return app


def _poll(what: str, check: Callable[[], Any], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            return check()
        except AssertionError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s:.0f} s: {last}")
        time.sleep(0.5)


@pytest.mark.slow
def test_panels_return_data_end_to_end(
    tmp_path: Path,
    influxdb_server: InfluxServer,
    prometheus_factory: PrometheusFactory,
    background_app: BackgroundAppFactory,
    labelled_process: Processes,
) -> None:
    from daemon_harness import DaemonProcess
    from gpusim import gpu, proc, write_sim
    from powercap import PowercapTree

    influxdb_server.create_database("wattprint")
    tree = PowercapTree(tmp_path / "powercap")
    zones = tree.add_package(0, dram=True)
    sim = tmp_path / "sim.json"
    worker = labelled_process("grafana-e2e")
    write_sim(sim, [gpu(0, power_w=250.0, processes=[proc(worker.pid, sm_util=90)])])
    started = time.time()
    grid = background_app(fake_uk_grid_api(started))  # actual and forecast for the grid panel
    daemon = DaemonProcess(
        tmp_path, sim_file=sim, powercap_root=tmp_path / "powercap",
        extra_toml=f'[influxdb]\nenabled = true\nurl = "{influxdb_server.url}"\ndatabase = "wattprint"\n'
                   'flush_interval_s = 0.5\n'
                   f'[grid]\nprovider = "carbonintensity_uk"\nzone = "GB"\nbase_url = "{grid.url}"\n'
                   # a 60 % PPA at 20 g/kWh, so that market-based CO2e differs from location-based
                   '[market]\ncontract_share = 0.6\ncontract_g_per_kwh = 20.0\n',
        env={"WATTPRINT_DAEMON_BUCKET_S": "5"},
    )
    feeder = tree.start_feeding({zones["package"]: 30.0, zones["dram"]: 5.0}, period_s=0.05)
    try:
        daemon.start()
        prometheus = prometheus_factory([f"127.0.0.1:{daemon.port}"])
        job = daemon.wait_for_job("grafana-e2e")
        time.sleep(8)
        # End the job, so that its totals stop moving, and let it settle.
        labelled_process.end(worker)

        def finished() -> dict[str, Any]:
            j = daemon.get(f"/api/v1/jobs/{urllib.parse.quote(job['id'], safe='')}")
            assert j["state"] == "finished", j["state"]
            return j

        api_job = _poll("job finished", finished, 20)
        # the lifecycle figures are there to compare (the shipped factors: a GPU class default)
        assert api_job["embodied_co2e_g"] > 0 and api_job["water_l"] > 0, api_job
        assert 0 < api_job["co2e_market_g"] < 0.9 * api_job["co2e_g"], api_job  # the grid is above 100 g/kWh
        # A dashboard-like range: grid intensity points are stamped at the start of the
        # provider's interval (up to an hour back; forecasts lie ahead). The database is
        # this test's own, so the per-job sums see this daemon's job only.
        since, until = started - 3 * 3600, time.time() + 3 * 3600
        host_values = {"host": go_regex_escape("testhost"), "label": go_regex_escape("grafana-e2e"),
                       "user": go_regex_escape(api_job["user"])}

        def influx_agrees() -> dict[str, list[dict[str, Any]]]:
            res = run_influx_queries(influxdb_server, host_values, since, until)
            kwh = totals_by_job(res[per_job_where("wattprint-jobs", "Per-job energy and CO2e", "kWh")], influx=True)
            co2e = totals_by_job(res[per_job_where("wattprint-jobs", "Per-job energy and CO2e", "CO2e")], influx=True)
            assert kwh.get(api_job["id"]) == pytest.approx(api_job["energy_kwh"], rel=0.01), (kwh, api_job["energy_kwh"])
            assert co2e.get(api_job["id"]) == pytest.approx(api_job["co2e_g"], rel=0.01), (co2e, api_job["co2e_g"])
            # The lifecycle table (issue 16): embodied CO2e, water, location- and market-based
            # CO2e as the daemon booked them, per tick and per bucket, sum to the API's totals.
            for ref, field in PER_JOB_TOTALS[("wattprint-jobs", "Per-job lifecycle footprint")].items():
                got = totals_by_job(res[per_job_where("wattprint-jobs", "Per-job lifecycle footprint", ref)],
                                    influx=True)
                assert got.get(api_job["id"]) == pytest.approx(api_job[field], rel=0.01), (ref, got, api_job[field])
            return res

        _poll("InfluxDB per-job panels agree with the API", influx_agrees, 40)
        res_all = run_influx_queries(influxdb_server, {"host": ".*", "label": ".*", "user": ".*"}, since, until)
        grid_series = next(v for k, v in res_all.items() if "forecast vs actual" in k)
        assert {s["tags"]["kind"] for s in grid_series} == {"actual", "forecast"}

        instance = f"127.0.0.1:{daemon.port}"
        prom_values = {"host": prom_regex_escape(instance), "label": prom_regex_escape("grafana-e2e"),
                       "user": prom_regex_escape(api_job["user"])}

        def prometheus_agrees() -> None:
            res = run_prometheus_queries(prometheus, prom_values)
            kwh = totals_by_job(res[per_job_where("wattprint-live", "Per-job energy and CO2e", "kWh")], influx=False)
            co2e = totals_by_job(res[per_job_where("wattprint-live", "Per-job energy and CO2e", "CO2e")], influx=False)
            assert kwh.get(api_job["id"]) == pytest.approx(api_job["energy_kwh"], rel=0.01), (kwh, api_job["energy_kwh"])
            assert co2e.get(api_job["id"]) == pytest.approx(api_job["co2e_g"], rel=0.01), (co2e, api_job["co2e_g"])
            # the lifecycle table: the daemon's per-job gauges, as the API restates them
            for ref, field in PER_JOB_TOTALS[("wattprint-live", "Per-job lifecycle footprint")].items():
                got = totals_by_job(res[per_job_where("wattprint-live", "Per-job lifecycle footprint", ref)],
                                    influx=False)
                assert got.get(api_job["id"]) == pytest.approx(api_job[field], rel=0.01), (ref, got, api_job[field])

        _poll("Prometheus per-job panels agree with the API", prometheus_agrees, 40)
        run_prometheus_queries(prometheus, {"host": ".*", "label": ".*", "user": ".*"})
    finally:
        feeder.stop()
        daemon.stop()
