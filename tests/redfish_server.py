"""A local Redfish BMC for tests: the DMTF's public mockup (tests/fixtures/redfish/,
see its PROVENANCE.md) served under ``/redfish/v1/`` by aiohttp, with the node's power
and energy counter under the test's control.

``RedfishBmc`` (started on a free loopback port from a thread, like ``BackgroundApp``):

- ``set_power(w)``: the node's input power from now on. The energy counter
  (``Sensors/TotalEnergy``, kWh) is integrated from it on the server's own monotonic
  clock; ``energy_j()`` is that counter in joules (the truth a test compares with).
  ``TotalPower`` / ``Power`` ``PowerConsumedWatts`` / ``Bay1`` ``InputPowerWatts``
  all read the power set.
- ``shape``: ``"sensors"`` (the mockup as published), ``"power"`` (no ``Sensors``
  resource: the legacy ``Power`` is the best there is), ``"powersubsystem"`` (neither
  ``Sensors`` nor ``Power``). ``energy_counter = False`` drops ``TotalEnergy``.
- Failure switches: ``stale_s`` (``ReadingTime`` this many seconds in the past),
  ``reset_energy()`` (the counter back to 0), ``add_energy_j(j)`` (a jump), ``reject_auth`` (every request 401),
  ``stall_s`` (every answer waits this long first).
- TLS: with ``tls_dir`` the server speaks HTTPS with a certificate for 127.0.0.1
  signed by a throw-away CA (``ca_file``), made with the openssl CLI.
- Auth: HTTP basic with ``username`` / ``password``, or a Redfish session (POST
  ``/redfish/v1/SessionService/Sessions``; ``X-Auth-Token``).
- ``requests``: (method, path, status) of each request; ``served_energy_j``: every
  energy counter value answered (J), in order: the truth for "totals equal the
  counter's difference".
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import secrets
import ssl
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from servers import BackgroundApp, require_binary

MOCKUP_ROOT = Path(__file__).parent / "fixtures" / "redfish" / "public-rackmount1"
CHASSIS = "/redfish/v1/Chassis/1U"
J_PER_KWH = 3.6e6


def make_test_pki(tls_dir: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it, made with
    the openssl CLI in ``tls_dir``: (ca.pem, bmc.pem, bmc.key)."""
    openssl = require_binary("openssl")
    tls_dir.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (tls_dir / n for n in ("ca.key", "ca.pem", "bmc.key", "bmc.csr", "bmc.pem"))
    ext = tls_dir / "bmc.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
                   "authorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n")
    for argv in (
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=wattprint test BMC CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        [openssl, "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
         "-days", "2", "-extfile", ext],
    ):
        subprocess.run([str(a) for a in argv], check=True, capture_output=True, timeout=60)
    return ca, cert, key


class RedfishBmc:
    """The mockup BMC with a controllable power and energy counter (module docstring)."""

    def __init__(self, username: str = "wattprint", password: str = "bmc-s3cret!", root: Path = MOCKUP_ROOT,
                 tls_dir: Path | None = None):
        self.username = username
        self.password = password
        self.root = root
        self.shape = "sensors"
        self.energy_counter = True
        self.stale_s = 0.0
        self.reject_auth = False
        self.stall_s = 0.0
        self.requests: list[tuple[str, str, int]] = []
        self.served_energy_j: list[float] = []  # every TotalEnergy value answered, in J, in order
        self.sessions: set[str] = set()
        self._lock = threading.Lock()
        self._power_w = 0.0
        self._energy_j = 0.0
        self._at = time.monotonic()
        self.ca_file: Path | None = None  # with tls_dir: the CA that signed the server's certificate
        context = None
        if tls_dir is not None:
            self.ca_file, cert, key = make_test_pki(tls_dir)
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(cert, key)
        self._app = BackgroundApp(self._make_app(), ssl_context=context)

    # ------------------------------------------------------------------ control
    def _integrate(self) -> None:
        now = time.monotonic()
        self._energy_j += self._power_w * (now - self._at)
        self._at = now

    def set_power(self, watts: float) -> None:
        with self._lock:
            self._integrate()
            self._power_w = float(watts)

    def energy_j(self) -> float:
        """The energy counter now, in joules (what TotalEnergy reads, times 3.6e6)."""
        with self._lock:
            self._integrate()
            return self._energy_j

    def add_energy_j(self, joules: float) -> None:
        """Step the counter by ``joules`` at once (an implausible jump)."""
        with self._lock:
            self._integrate()
            self._energy_j += joules

    def reset_energy(self) -> None:
        with self._lock:
            self._integrate()
            self._energy_j = 0.0

    @property
    def power_w(self) -> float:
        return self._power_w

    # ------------------------------------------------------------------ serving
    def start(self) -> RedfishBmc:
        self._app.start()
        return self

    def stop(self) -> None:
        self._app.stop()

    @property
    def url(self) -> str:
        return self._app.url

    def __enter__(self) -> RedfishBmc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/redfish/v1{tail:.*}", self._handle)
        return app

    def _authorised(self, request: web.Request) -> bool:
        if self.reject_auth:
            return False
        token = request.headers.get("X-Auth-Token", "")
        if token:
            return token in self.sessions
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return secrets.compare_digest(user, self.username) and secrets.compare_digest(password, self.password)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = "/redfish/v1" + request.match_info["tail"].rstrip("/")
        if self.stall_s > 0:
            await asyncio.sleep(self.stall_s)
            if request.transport is None or request.transport.is_closing():  # the client gave up: nothing served
                self.requests.append((request.method, path, 0))
                return web.Response(status=504)
        response = await self._answer(request, path)
        self.requests.append((request.method, path, response.status))
        return response

    async def _answer(self, request: web.Request, path: str) -> web.StreamResponse:
        if path == "/redfish/v1/SessionService/Sessions" and request.method == "POST":
            try:
                body = await request.json()
            except ValueError:
                return web.json_response({"error": "bad body"}, status=400)
            ok = (not self.reject_auth and isinstance(body, dict)
                  and body.get("UserName") == self.username and body.get("Password") == self.password)
            if not ok:
                return web.json_response({"error": "unauthorised"}, status=401)
            token = secrets.token_hex(16)
            self.sessions.add(token)
            uri = f"/redfish/v1/SessionService/Sessions/{token[:8]}"
            return web.json_response({"@odata.id": uri, "Id": token[:8]}, status=201,
                                     headers={"X-Auth-Token": token, "Location": uri})
        if path == "/redfish/v1":  # the service root needs no credentials (Redfish)
            return self._json(self._load(path))
        if not self._authorised(request):
            return web.json_response({"error": "unauthorised"}, status=401,
                                     headers={"WWW-Authenticate": 'Basic realm="bmc"'})
        if path.startswith("/redfish/v1/SessionService/Sessions/") and request.method == "DELETE":
            self.sessions = {t for t in self.sessions if not path.endswith(t[:8])}
            return web.Response(status=204)
        if request.method != "GET":
            return web.json_response({"error": "method not allowed"}, status=405)
        doc = self._load(path)
        if doc is None or self._hidden(path):
            return web.json_response({"error": "not found"}, status=404)
        return self._json(self._live(path, doc))

    def _hidden(self, path: str) -> bool:
        if self.shape in ("power", "powersubsystem") and path.startswith(CHASSIS + "/Sensors"):
            return True
        if self.shape == "powersubsystem" and path.startswith(CHASSIS + "/Power") \
                and not path.startswith(CHASSIS + "/PowerSubsystem"):
            return True
        return not self.energy_counter and path == CHASSIS + "/Sensors/TotalEnergy"

    def _load(self, path: str) -> dict[str, Any] | None:
        rel = path[len("/redfish/v1"):].strip("/")
        file = self.root / rel / "index.json" if rel else self.root / "index.json"
        if ".." in rel.split("/") or not file.is_file():
            return None
        doc: dict[str, Any] = json.loads(file.read_text())
        return doc

    def _reading_time(self) -> str:
        when = datetime.now(UTC) - timedelta(seconds=self.stale_s)
        return when.isoformat(timespec="milliseconds")

    def _live(self, path: str, doc: dict[str, Any]) -> dict[str, Any]:
        """The mockup's document with the power, energy and times the test set."""
        doc = copy.deepcopy(doc)
        power = self._power_w
        if path == CHASSIS:
            if self.shape != "sensors":
                doc.pop("Sensors", None)
            if self.shape == "powersubsystem":
                doc.pop("Power", None)
        elif path == CHASSIS + "/Sensors":
            members = doc.get("Members", [])
            if not self.energy_counter:
                members = [m for m in members if not m["@odata.id"].endswith("/TotalEnergy")]
            doc["Members"] = members
            doc["Members@odata.count"] = len(members)
        elif path == CHASSIS + "/Sensors/TotalPower":
            doc["Reading"] = power
            doc["ReadingTime"] = self._reading_time()
        elif path == CHASSIS + "/Sensors/TotalEnergy":
            energy_j = self.energy_j()
            self.served_energy_j.append(energy_j)
            doc["Reading"] = energy_j / J_PER_KWH
            doc["ReadingTime"] = self._reading_time()
        elif path == CHASSIS + "/Power":
            doc["PowerControl"][0]["PowerConsumedWatts"] = power
        elif path == CHASSIS + "/PowerSubsystem/PowerSupplies/Bay1/Metrics":
            doc["InputPowerWatts"]["Reading"] = power
        return doc

    @staticmethod
    def _json(doc: Any) -> web.Response:
        return web.json_response(doc)
