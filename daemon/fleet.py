"""Per-label totals across every host that writes to the same InfluxDB (``wattprint
jobs --fleet``).

Sums ``job_energy.joules`` and ``job_co2e.grams`` grouped by label and host (and the
lifecycle figures, issue 16: ``job_co2e.market_grams``, ``job_footprint.embodied_grams``
and ``job_footprint.water_litres``; 0 for hosts that do not write them). Every
user-supplied value (time range, label) is a bound parameter: InfluxQL ``$name``
placeholders with ``params=`` on the v1 ``/query`` endpoint (InfluxDB 1.x, and the
v1-compatibility API of 2.x/3.x), Flux ``params`` through influxdb-client for v2.
Nothing is formatted into a query string. Credentials in ``[influxdb] url``
(``http://user:password@host:8086``) are sent as Basic auth, never shown: every error
message has the URL's password and the configured secrets redacted.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from typing import Any

from .carbon import J_PER_KWH
from .config import InfluxConfig, redact_text, redact_url
from .timefmt import iso_z


class FleetError(Exception):
    """The fleet query failed; the message says why (never a traceback)."""


def _iso(t_s: float) -> str:
    return iso_z(t_s, fraction=True)


def _secrets(cfg: InfluxConfig) -> list[str]:
    found = [v for v in (cfg.password, cfg.token) if v]
    try:
        password = urllib.parse.urlsplit(cfg.url).password
    except ValueError:
        password = None
    return found + ([password] if password else [])


def _clean(cfg: InfluxConfig, text: str) -> str:
    """An error text with every credential of ``cfg`` redacted."""
    return redact_text(text, _secrets(cfg))


def _split_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """(url without userinfo, user, password): credentials in the URL become Basic auth."""
    try:
        parts = urllib.parse.urlsplit(url)
        user, password = parts.username, parts.password
    except ValueError:
        return url, None, None
    if user is None and password is None:
        return url, None, None
    hostport = parts.netloc.rpartition("@")[2]
    bare = urllib.parse.urlunsplit((parts.scheme, hostport, parts.path, parts.query, parts.fragment))
    return (bare, urllib.parse.unquote(user or ""), urllib.parse.unquote(password or ""))


def _v1_query(cfg: InfluxConfig, q: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    form = {"q": q, "db": cfg.database, "params": json.dumps(params), "epoch": "s"}
    if cfg.retention_policy:
        form["rp"] = cfg.retention_policy
    url, url_user, url_password = _split_userinfo(cfg.url)
    shown = redact_url(cfg.url)
    req = urllib.request.Request(f"{url.rstrip('/')}/query", data=urllib.parse.urlencode(form).encode(),
                                 method="POST", headers={"Content-Type": "application/x-www-form-urlencoded"})
    if cfg.token:
        req.add_header("Authorization", f"Token {cfg.token}")
    elif cfg.username or url_user:
        user, password = (cfg.username, cfg.password) if cfg.username else (url_user, url_password)
        req.add_header("Authorization", "Basic " + b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=cfg.timeout_s) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as exc:
        text = exc.read(300).decode(errors="replace")
        raise FleetError(_clean(cfg, f"InfluxDB at {shown} answered {exc.code}: {text}")) from None
    except (OSError, ValueError) as exc:
        raise FleetError(_clean(cfg, f"InfluxDB at {shown} not reachable: {getattr(exc, 'reason', exc)}")) from None
    if "error" in body:
        raise FleetError(_clean(cfg, f"InfluxDB: {body['error']}"))
    out: list[dict[str, Any]] = []
    for result in body.get("results", []):
        if "error" in result:
            raise FleetError(_clean(cfg, f"InfluxDB: {result['error']}"))
        for series in result.get("series", []):
            tags = series.get("tags", {})
            for row in series.get("values", []):
                out.append({**tags, **dict(zip(series["columns"], row))})
    return out


def _v2_query(cfg: InfluxConfig, measurement: str, field: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    from influxdb_client import InfluxDBClient  # imported only for v2

    flux = (
        'from(bucket: params.bucket) |> range(start: time(v: params.since), stop: time(v: params.until))'
        ' |> filter(fn: (r) => r._measurement == params.measurement and r._field == params.field)'
        + (' |> filter(fn: (r) => r.label == params.label)' if "label" in params else "")
        + ' |> group(columns: ["label", "host"]) |> sum()'
    )
    bound = {"bucket": cfg.bucket, "measurement": measurement, "field": field, **params}
    url, _user, _password = _split_userinfo(cfg.url)
    try:
        with InfluxDBClient(url=url, token=cfg.token, org=cfg.org, timeout=int(cfg.timeout_s * 1000)) as client:
            tables = client.query_api().query(flux, params=bound)
    except Exception as exc:  # the client raises many types; all mean the same to the user
        raise FleetError(_clean(cfg, f"InfluxDB v2 at {redact_url(cfg.url)}: {type(exc).__name__}: {exc}")) from None
    return [{"label": r.values.get("label"), "host": r.values.get("host"), "sum": r.get_value()}
            for table in tables for r in table.records]


# (measurement, field, the total's key in a row of fleet_totals); joules become kWh
FLEET_SUMS: tuple[tuple[str, str, str], ...] = (
    ("job_energy", "joules", "energy_kwh"),
    ("job_co2e", "grams", "co2e_g"),
    ("job_co2e", "market_grams", "co2e_market_g"),
    ("job_footprint", "embodied_grams", "embodied_co2e_g"),
    ("job_footprint", "water_litres", "water_l"),
)


def fleet_totals(cfg: InfluxConfig, since: float, until: float, label: str | None = None) -> list[dict[str, Any]]:
    """Per label: energy (kWh), CO2e (g; location- and market-based), embodied CO2e (g),
    water (L) and the hosts it ran on, largest energy first."""
    params: dict[str, Any] = {"since": _iso(since), "until": _iso(until)}
    if label is not None:
        params["label"] = label
    sums: list[tuple[str, list[dict[str, Any]]]] = []
    if cfg.api == "v2":
        for measurement, field, key in FLEET_SUMS:
            sums.append((key, _v2_query(cfg, measurement, field, params)))
    else:
        where = "time >= $since AND time < $until" + (' AND "label" = $label' if label is not None else "")
        for measurement, field, key in FLEET_SUMS:
            # names from the table above, never from the user; values are bound parameters
            sums.append((key, _v1_query(cfg, f'SELECT sum("{field}") AS "sum" FROM "{measurement}" WHERE {where} '
                                             'GROUP BY "label", "host"', params)))
    totals: dict[str, dict[str, Any]] = {}
    for key, rows in sums:
        for row in rows:
            name = row.get("label") or ""
            t = totals.setdefault(name, {"label": name, **{k: 0.0 for _, _, k in FLEET_SUMS}, "hosts": set()})
            value = float(row["sum"] or 0.0)
            t[key] += value / J_PER_KWH if key == "energy_kwh" else value
            t["hosts"].add(row.get("host") or "")
    out = [{**t, "hosts": sorted(t["hosts"])} for t in totals.values()]
    return sorted(out, key=lambda t: -t["energy_kwh"])


# -- one Slurm job across its hosts (``wattprint slurm-summary --fleet``) -------------------


def _v1_only(cfg: InfluxConfig) -> None:
    if cfg.api == "v2":
        raise FleetError("the whole-job figure needs InfluxDB's v1 query API ([influxdb] api = \"v1\"; "
                         "InfluxDB 2.x/3.x serve it too, with a DBRP mapping for the bucket)")


def label_host_totals(cfg: InfluxConfig, label: str, since: float, until: float,
                      user: str | None = None) -> dict[str, dict[str, float]]:
    """Per host, for the jobs labelled ``label`` (of ``user`` when given) between
    ``since`` and ``until``: ``energy_j`` (sum of ``job_energy.joules``), ``co2e_g``
    (sum of ``job_co2e.grams``) and ``provisional`` (CO2e points not yet final).
    Every value is a bound parameter."""
    _v1_only(cfg)
    where = 'time >= $since AND time < $until AND "label" = $label' + (' AND "user" = $user' if user else "")
    params: dict[str, Any] = {"since": _iso(since), "until": _iso(until), "label": label}
    if user:
        params["user"] = user
    energy = _v1_query(cfg, f'SELECT sum("joules") AS "sum" FROM "job_energy" WHERE {where} GROUP BY "host"', params)
    co2e = _v1_query(cfg, f'SELECT sum("grams") AS "sum" FROM "job_co2e" WHERE {where} GROUP BY "host"', params)
    provisional = _v1_query(cfg, f'SELECT count("grams") AS "n" FROM "job_co2e" WHERE {where} AND "status" = $status '
                                 'GROUP BY "host"', {**params, "status": "provisional"})
    out: dict[str, dict[str, float]] = {}

    def host(row: dict[str, Any]) -> dict[str, float]:
        return out.setdefault(row.get("host") or "", {"energy_j": 0.0, "co2e_g": 0.0, "provisional": 0.0})

    for row in energy:
        host(row)["energy_j"] += float(row["sum"] or 0.0)
    for row in co2e:
        host(row)["co2e_g"] += float(row["sum"] or 0.0)
    for row in provisional:
        host(row)["provisional"] += float(row["n"] or 0.0)
    return out


def hosts_with_points_since(cfg: InfluxConfig, since: float) -> dict[str, float]:
    """Host -> time (s) of its latest ``device_power`` point at or after ``since``, for
    every host with one. Each daemon writes ``device_power`` every tick and delivers its
    spool in order, so such a point means every earlier point of that host (its job
    energy up to ``since``) is in InfluxDB."""
    _v1_only(cfg)
    rows = _v1_query(cfg, 'SELECT last("watts") AS "w" FROM "device_power" WHERE time >= $since GROUP BY "host"',
                     {"since": _iso(since)})
    return {row.get("host") or "": float(row["time"]) for row in rows if row.get("time") is not None}
