"""A Redfish client that reads the node's input power and energy counter from its BMC.

Blocking (``http.client``); the node source calls it on its own polling thread, never
on the tick's. One ``read()`` has one deadline (``timeout_s``) for all its requests.

Authentication: HTTP basic (``auth = "basic"``, every request) or a Redfish session
(``auth = "session"``: POST ``/redfish/v1/SessionService/Sessions``, then the
``X-Auth-Token`` header; logged in again once on a 401, logged out at ``close``).
TLS certificates are verified by default (the system CAs, or ``ca_file``);
``verify_tls = False`` turns that off for BMCs with self-signed certificates.

Discovery (first read, and again after the resource it found disappears):

1. The chassis: ``[node] chassis`` when set; else the members of
   ``/redfish/v1/Chassis`` in the BMC's order, those whose ``ChassisType`` is a whole
   machine (RackMount, StandAlone, Blade, Sled, Enclosure, ...) first, and the first
   of them that has power data by step 2 is the node. A chassis of a card, a module
   or a drive comes only after those.
2. Within a chassis, the best of three shapes:
   a. ``Chassis/<id>/Sensors``: a sensor with ``ReadingType`` ``Power`` (W) for the
      whole chassis (``PhysicalContext`` ``Chassis``, its ``Total`` first; else one
      with no ``PhysicalContext``), and an energy counter (``ReadingType``
      ``EnergykWh``, ``EnergyWh`` or ``EnergyJoules``) of the same scope when present.
      Per-CPU or per-power-supply sensors (another ``PhysicalContext``) are not the node.
   b. ``Chassis/<id>/Power`` (legacy): the first ``PowerControl[]`` entry with a
      number in ``PowerConsumedWatts`` (the system's input power).
   c. ``Chassis/<id>/PowerSubsystem``: the ``Metrics`` ``InputPowerWatts.Reading``
      of every power supply that has metrics, summed (each must answer every read).

Ages: a sensor's ``ReadingTime`` is compared with the HTTP ``Date`` header of the same
answer (both on the BMC's clock, so a BMC clock that is off does not make every
reading stale); without a ``Date`` header, with the host's clock.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import json
import math
import ssl
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .sample import BmcError, BmcSample

MAX_BODY_BYTES = 4 * 1024 * 1024  # a Redfish resource larger than this is refused
# Chassis types that are a whole machine; the node is looked for among these first.
NODE_CHASSIS_TYPES = ("RackMount", "StandAlone", "Blade", "Sled", "Enclosure", "Rack", "Zone", "Other",
                      "Tower", "Desktop", "Expansion", "Sidecar")
# Energy counter ReadingType -> joules per unit of Reading.
ENERGY_J_PER_UNIT = {"EnergykWh": 3.6e6, "EnergyWh": 3600.0, "EnergyJoules": 1.0}


@dataclass(frozen=True, slots=True)
class RedfishPlan:
    """What discovery found: which resources to read for the node's power and energy."""

    chassis: str  # the chassis id
    shape: str  # "sensors" | "power" | "powersubsystem"
    power_uri: str = ""  # sensors: the power sensor; power: the Power resource
    power_index: int = 0  # power: the PowerControl entry
    energy_uri: str = ""  # sensors: the energy counter sensor ("" = none)
    energy_j_per_unit: float = 1.0
    psu_metrics: tuple[str, ...] = field(default_factory=tuple)  # powersubsystem: each supply's Metrics


def parse_reading_time(text: Any) -> float | None:
    """A Redfish ``ReadingTime`` (ISO 8601 with an offset) as epoch seconds, None when
    absent or not a time."""
    if not isinstance(text, str) or not text:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _link(doc: Any, key: str) -> str:
    ref = doc.get(key) if isinstance(doc, dict) else None
    uri = ref.get("@odata.id") if isinstance(ref, dict) else None
    return uri if isinstance(uri, str) and uri.startswith("/") else ""


def _members(doc: Any) -> list[str]:
    out: list[str] = []
    for m in (doc.get("Members") if isinstance(doc, dict) else None) or []:
        uri = m.get("@odata.id") if isinstance(m, dict) else None
        if isinstance(uri, str) and uri.startswith("/"):
            out.append(uri)
    return out


def _shown(text: str, limit: int = 80) -> str:
    """An untrusted string (from the BMC) for a message: repr, cut to ``limit``."""
    r = repr(text)
    return r if len(r) <= limit else r[:limit] + "..."


class RedfishClient:
    """Reads one node's power (and energy counter, where present) from a Redfish BMC."""

    def __init__(self, url: str, username: str, password: str, *, auth: str = "basic",
                 ca_file: str = "", verify_tls: bool = True, chassis: str = "", timeout_s: float = 4.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._username = username
        self._password = password
        self._auth = auth
        self._chassis = chassis
        self.timeout_s = timeout_s
        self._ssl: ssl.SSLContext | None = None
        if self._https:
            ctx = ssl.create_default_context(cafile=ca_file or None)
            if not verify_tls:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._ssl = ctx
        self._conn: http.client.HTTPConnection | None = None
        self._token = ""  # session auth: X-Auth-Token
        self._session_uri = ""
        self.plan: RedfishPlan | None = None
        self.requests_total = 0

    # ------------------------------------------------------------------ HTTP
    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._https:
                self._conn = http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._ssl)
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        else:
            self._conn.timeout = timeout
            if self._conn.sock is not None:
                self._conn.sock.settimeout(timeout)
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass
            self._conn = None

    def _request(self, method: str, path: str, deadline: float, body: Any = None,
                 auth: bool = True) -> tuple[int, dict[str, str], Any]:
        """One request; (status, headers, parsed JSON or None). Raises BmcError for a
        timeout, a connection or TLS failure, or a body that is not JSON."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise BmcError("timeout", f"the BMC did not answer within timeout_s ({self.timeout_s:g} s)")
        headers = {"Accept": "application/json", "OData-Version": "4.0"}
        if auth:
            headers.update(self._auth_headers(deadline))
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        self.requests_total += 1
        try:
            conn = self._connection(left)
            conn.request(method, self._prefix + path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read(MAX_BODY_BYTES + 1)
            status = resp.status
            got = {k.lower(): v for k, v in resp.getheaders()}
            if resp.will_close:
                self._drop_connection()
        except TimeoutError:
            self._drop_connection()
            raise BmcError("timeout", f"the BMC did not answer within timeout_s ({self.timeout_s:g} s)") from None
        except ssl.SSLError as exc:
            self._drop_connection()
            raise BmcError("connect", f"TLS with the BMC failed ({exc.reason or exc}); set [node] ca_file to the "
                                      "BMC's CA certificate") from None
        except (OSError, http.client.HTTPException) as exc:
            self._drop_connection()
            raise BmcError("connect", f"cannot reach the BMC at {self._host}:{self._port} "
                                      f"({type(exc).__name__}: {exc})") from None
        if len(raw) > MAX_BODY_BYTES:
            self._drop_connection()
            raise BmcError("protocol", f"{path}: answer larger than {MAX_BODY_BYTES} bytes")
        parsed: Any = None
        if raw and 200 <= status < 300:
            try:
                parsed = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise BmcError("protocol", f"{_shown(path)}: the BMC's answer is not JSON") from None
        return status, got, parsed

    def _auth_headers(self, deadline: float) -> dict[str, str]:
        if self._auth == "session":
            if not self._token:
                self._login(deadline)
            return {"X-Auth-Token": self._token}
        creds = base64.b64encode(f"{self._username}:{self._password}".encode()).decode()
        return {"Authorization": f"Basic {creds}"}

    def _login(self, deadline: float) -> None:
        status, headers, _ = self._request("POST", "/redfish/v1/SessionService/Sessions", deadline,
                                           body={"UserName": self._username, "Password": self._password},
                                           auth=False)
        if status in (401, 403):
            raise BmcError("auth", f"the BMC refused the login (HTTP {status}): check [node] username and "
                                   "password (or password_file)")
        token = headers.get("x-auth-token", "")
        if not (200 <= status < 300) or not token:
            raise BmcError("http", f"session login failed (HTTP {status}{', no X-Auth-Token' if not token else ''})")
        self._token = token
        location = headers.get("location", "")
        self._session_uri = urllib.parse.urlsplit(location).path if location else ""

    def get(self, path: str, deadline: float) -> tuple[Any, float | None]:
        """GET a resource: (its JSON, the answer's ``Date`` as epoch seconds or None).
        A 401/403 raises ``BmcError("auth")`` (a session is renewed once first)."""
        status, headers, doc = self._request("GET", path, deadline)
        if status == 401 and self._auth == "session" and self._token:
            self._token = ""  # the session expired: log in again, once
            status, headers, doc = self._request("GET", path, deadline)
        if status in (401, 403):
            what = "the login" if self._auth == "session" else "the credentials"
            raise BmcError("auth", f"the BMC refused {what} (HTTP {status}): check [node] username and password "
                                   "(or password_file), and that the account may read Chassis")
        if status == 404:
            raise BmcError("missing", f"{_shown(path)} not found (HTTP 404)")
        if not (200 <= status < 300):
            raise BmcError("http", f"{_shown(path)}: HTTP {status}")
        if not isinstance(doc, dict):
            raise BmcError("protocol", f"{_shown(path)}: the BMC's answer is not a JSON object")
        date = None
        if "date" in headers:
            try:
                date = email.utils.parsedate_to_datetime(headers["date"]).timestamp()
            except (TypeError, ValueError, IndexError):
                date = None
        return doc, date

    # ------------------------------------------------------------------ discovery
    def discover(self, deadline: float) -> RedfishPlan:
        """Find the node's chassis and the best power/energy shape (module docstring)."""
        collection, _ = self.get("/redfish/v1/Chassis", deadline)
        uris = _members(collection)
        if self._chassis:
            uris = [u for u in uris if u.rstrip("/").rsplit("/", 1)[-1] == self._chassis]
            if not uris:
                raise BmcError("missing", f"[node] chassis {_shown(self._chassis)} is not among the BMC's Chassis")
        docs: list[tuple[str, dict[str, Any]]] = []
        for uri in uris:
            doc, _ = self.get(uri, deadline)
            docs.append((uri, doc))
        docs.sort(key=lambda d: 0 if d[1].get("ChassisType") in NODE_CHASSIS_TYPES else 1)  # stable
        for uri, doc in docs:
            plan = self._plan_for(uri, doc, deadline)
            if plan is not None:
                return plan
        raise BmcError("missing", "no chassis with power data (Sensors with a Power reading, Power, or "
                                  "PowerSubsystem) on this BMC")

    def _plan_for(self, uri: str, doc: dict[str, Any], deadline: float) -> RedfishPlan | None:
        chassis = str(doc.get("Id") or uri.rstrip("/").rsplit("/", 1)[-1])
        sensors = _link(doc, "Sensors")
        if sensors:
            plan = self._sensors_plan(chassis, sensors, deadline)
            if plan is not None:
                return plan
        power = _link(doc, "Power")
        if power:
            try:
                pdoc, _ = self.get(power, deadline)
            except BmcError as exc:
                if exc.kind != "missing":
                    raise
                pdoc = {}
            for i, ctl in enumerate(pdoc.get("PowerControl") or []):
                if isinstance(ctl, dict) and _number(ctl.get("PowerConsumedWatts")) is not None:
                    return RedfishPlan(chassis=chassis, shape="power", power_uri=power, power_index=i)
        subsystem = _link(doc, "PowerSubsystem")
        if subsystem:
            try:
                sdoc, _ = self.get(subsystem, deadline)
                supplies = _link(sdoc, "PowerSupplies")
                metrics: list[str] = []
                if supplies:
                    coll, _ = self.get(supplies, deadline)
                    for member in _members(coll):
                        psu, _ = self.get(member, deadline)
                        m = _link(psu, "Metrics")
                        if m:
                            mdoc, _ = self.get(m, deadline)
                            if _number((mdoc.get("InputPowerWatts") or {}).get("Reading")) is not None:
                                metrics.append(m)
            except BmcError as exc:
                if exc.kind != "missing":
                    raise
                metrics = []
            if metrics:
                return RedfishPlan(chassis=chassis, shape="powersubsystem", psu_metrics=tuple(metrics))
        return None

    def _sensors_plan(self, chassis: str, sensors_uri: str, deadline: float) -> RedfishPlan | None:
        try:
            coll, _ = self.get(sensors_uri, deadline)
        except BmcError as exc:
            if exc.kind == "missing":
                return None
            raise
        power: list[tuple[int, str]] = []
        energy: list[tuple[int, str, float]] = []
        for member in _members(coll):
            doc, _ = self.get(member, deadline)
            rtype = doc.get("ReadingType")
            physical = doc.get("PhysicalContext")
            if physical not in ("Chassis", None):
                continue  # a CPU's, a power supply's or a fan's sensor: not the node
            # The chassis' total first, then any chassis-wide one, then one that names no context.
            scope = 0 if physical == "Chassis" and doc.get("ElectricalContext") in ("Total", None) else \
                1 if physical == "Chassis" else 2
            if rtype == "Power" and doc.get("ReadingUnits", "W") == "W":
                power.append((scope, member))
            elif rtype in ENERGY_J_PER_UNIT:
                energy.append((scope, member, ENERGY_J_PER_UNIT[rtype]))
        if not power and not energy:
            return None
        power.sort(key=lambda p: p[0])
        energy.sort(key=lambda e: e[0])
        return RedfishPlan(chassis=chassis, shape="sensors", power_uri=power[0][1] if power else "",
                           energy_uri=energy[0][1] if energy else "",
                           energy_j_per_unit=energy[0][2] if energy else 1.0)

    # ------------------------------------------------------------------ reading
    def read(self) -> BmcSample:
        """One reading of the node's power (and energy counter). Raises BmcError."""
        deadline = time.monotonic() + self.timeout_s
        if self.plan is None:
            self.plan = self.discover(deadline)
        try:
            return self._read_plan(self.plan, deadline)
        except BmcError as exc:
            if exc.kind == "missing":
                self.plan = None  # the resource went away (firmware update): discover again next time
            raise

    def _read_plan(self, plan: RedfishPlan, deadline: float) -> BmcSample:
        if plan.shape == "sensors":
            power_w = power_age = energy_j = energy_age = None
            if plan.power_uri:
                doc, date = self.get(plan.power_uri, deadline)
                power_w = _number(doc.get("Reading"))
                if power_w is None:
                    raise BmcError("protocol", f"{_shown(plan.power_uri)}: Reading is not a number")
                power_age = _age(doc, date)
            if plan.energy_uri:
                doc, date = self.get(plan.energy_uri, deadline)
                value = _number(doc.get("Reading"))
                if value is None:
                    raise BmcError("protocol", f"{_shown(plan.energy_uri)}: Reading is not a number")
                energy_j = value * plan.energy_j_per_unit
                energy_age = _age(doc, date)
            return BmcSample(power_w=power_w, energy_j=energy_j, power_age_s=power_age, energy_age_s=energy_age,
                             where=f"Chassis/{plan.chassis}/Sensors")
        if plan.shape == "power":
            doc, _ = self.get(plan.power_uri, deadline)
            controls = doc.get("PowerControl") or []
            ctl = controls[plan.power_index] if plan.power_index < len(controls) else None
            watts = _number(ctl.get("PowerConsumedWatts")) if isinstance(ctl, dict) else None
            if watts is None:
                raise BmcError("missing", f"{_shown(plan.power_uri)}: no PowerConsumedWatts")
            return BmcSample(power_w=watts, where=f"Chassis/{plan.chassis}/Power")
        total = 0.0
        for m in plan.psu_metrics:
            doc, _ = self.get(m, deadline)
            watts = _number((doc.get("InputPowerWatts") or {}).get("Reading"))
            if watts is None:
                raise BmcError("missing", f"{_shown(m)}: no InputPowerWatts")
            total += watts
        return BmcSample(power_w=total, where=f"Chassis/{plan.chassis}/PowerSubsystem")

    def close(self) -> None:
        """Log out of a session (best effort, 2 s) and close the connection."""
        if self._auth == "session" and self._token and self._session_uri:
            try:
                self._request("DELETE", self._session_uri, time.monotonic() + 2.0)
            except BmcError:
                pass
        self._token = ""
        self._drop_connection()


def _age(doc: dict[str, Any], date: float | None) -> float | None:
    """How old a sensor's reading was when the BMC answered (seconds; None: no ReadingTime)."""
    when = parse_reading_time(doc.get("ReadingTime"))
    if when is None:
        return None
    now = date if date is not None else time.time()
    # Date has whole seconds: a reading from within the same second may look up to 1 s in the future.
    return max(0.0, now - when)
