"""Real servers for tests: InfluxDB 1.x and Prometheus on free loopback ports in temp dirs.

Each server is a child process with its own config, data directory and log file under
a directory the caller owns (pytest's ``tmp_path``). Everything listens on 127.0.0.1
only. A failed start raises ``ServerError`` with the tail of the server's log.
``BackgroundApp`` serves an aiohttp application from a thread, as a scrape target.
``require_binary`` decides what a test does when a server binary is missing: skip it,
or fail it when ``CI=true`` (CI must run every test).

Nothing here depends on the fixtures; ``conftest.py`` wraps these classes in fixtures.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest
from aiohttp import web

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0

# binary -> Debian package that ships it
DEBIAN_PACKAGES = {"influxd": "influxdb", "prometheus": "prometheus", "promtool": "prometheus",
                   "systemd-nspawn": "systemd-container", "nsenter": "util-linux",
                   "ipmi_sim": "openipmi", "ipmitool": "ipmitool"}


class ServerError(RuntimeError):
    """A test server did not start, stop or answer as expected."""


def running_in_ci() -> bool:
    """True when the environment says this is a CI run (CI=true), where nothing may skip."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_binary(name: str) -> str:
    """Path of executable ``name``; if missing, fail under CI=true, else skip the test."""
    path = shutil.which(name)
    if path is not None:
        return path
    package = DEBIAN_PACKAGES.get(name, name)
    message = (
        f"{name} not found on PATH: install the Debian package '{package}' "
        f"(apt-get install {package}), or run ./scripts/test.sh, which installs it"
    )
    if running_in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def http_request(
    url: str,
    method: str = "GET",
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    """One HTTP request; returns (status, body) for any status, raises on connection errors."""
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_http(
    url: str,
    timeout: float = START_TIMEOUT_S,
    expect: Sequence[int] = (200, 204),
    alive: Callable[[], bool] | None = None,
) -> None:
    """Poll ``url`` until it answers one of the ``expect`` statuses.

    Raises ``ServerError`` after ``timeout`` seconds, or as soon as ``alive()`` says
    the server process has gone.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            status, _ = http_request(url, timeout=2.0)
            if status in expect:
                return
            last = f"HTTP {status}"
        except OSError as err:
            last = str(err)
        if alive is not None and not alive():
            raise ServerError(f"{url}: server exited before it answered ({last})")
        if time.monotonic() >= deadline:
            raise ServerError(f"{url}: no {list(expect)} answer within {timeout:.0f} s ({last})")
        time.sleep(0.05)


class _Process:
    """A server child process whose output goes to a log file; stop() is idempotent."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise ServerError(f"{self.name} is already running")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal does not reach it first
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, url: str, timeout: float, expect: Sequence[int]) -> None:
        try:
            wait_http(url, timeout=timeout, expect=expect, alive=self.alive)
        except ServerError as err:
            self.stop()
            raise ServerError(f"{self.name} did not start: {err}\n--- log tail ---\n{self.log_tail()}") from None


# --------------------------------------------------------------------------- InfluxDB


_INFLUX_CONFIG = """\
# Written by tests/servers.py: loopback only, no reporting, no extra listeners.
# Upstream 1.x spells the switch reporting-disabled, Debian's build reporting-enabled;
# influxd ignores the key it does not know.
reporting-disabled = true
reporting-enabled = false
bind-address = "{rpc_address}"

[meta]
  dir = "{dir}/meta"
  logging-enabled = false

[data]
  dir = "{dir}/data"
  wal-dir = "{dir}/wal"
  wal-fsync-delay = "0s"
  query-log-enabled = false

[monitor]
  store-enabled = false

[subscriber]
  enabled = false

[continuous_queries]
  enabled = false

[http]
  enabled = true
  bind-address = "{http_address}"
  auth-enabled = false
  log-enabled = false
  pprof-enabled = false
  unix-socket-enabled = false

[logging]
  level = "warn"
  suppress-logo = true
"""


class InfluxServer:
    """An InfluxDB 1.x ``influxd`` on free loopback ports, data under ``base_dir``.

    ``stop()`` and ``start()`` keep the ports and the data, so a test can take the
    database away and bring it back (outage tests).
    """

    def __init__(self, base_dir: Path, binary: str = "influxd") -> None:
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.rpc_port = free_port()
        self.config_path = self.base_dir / "influxdb.conf"
        self.config_path.write_text(
            _INFLUX_CONFIG.format(
                dir=self.base_dir,
                rpc_address=f"{LOOPBACK}:{self.rpc_port}",
                http_address=f"{LOOPBACK}:{self.port}",
            )
        )
        self._process = _Process("influxd", [binary, "-config", str(self.config_path)], self.base_dir / "influxd.log")

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start influxd (again) and wait until ``/ping`` answers 204."""
        self._process.start()
        self._process.wait_ready(f"{self.url}/ping", timeout, expect=(204,))

    def stop(self) -> None:
        """Stop influxd (SIGTERM, then SIGKILL after 10 s); the data stay."""
        self._process.stop()

    def running(self) -> bool:
        return self._process.alive()

    def log_tail(self, lines: int = 40) -> str:
        return self._process.log_tail(lines)

    def query(
        self,
        q: str,
        db: str | None = None,
        params: dict[str, Any] | None = None,
        epoch: str | None = None,
    ) -> dict[str, Any]:
        """Run InfluxQL ``q`` (POST /query); ``params`` are bound to ``$name`` placeholders.

        Returns the decoded JSON. Raises ``ServerError`` on an HTTP error or when the
        server or any statement reports an error.
        """
        form: dict[str, str] = {"q": q}
        if db is not None:
            form["db"] = db
        if params is not None:
            form["params"] = json.dumps(params)
        if epoch is not None:
            form["epoch"] = epoch
        status, body = http_request(
            f"{self.url}/query",
            method="POST",
            data=urllib.parse.urlencode(form).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        if status != 200:
            raise ServerError(f"influxd query {q!r}: HTTP {status}: {body[:500]!r}")
        answer: dict[str, Any] = json.loads(body)
        errors = [answer["error"]] if "error" in answer else []
        errors += [r["error"] for r in answer.get("results", []) if "error" in r]
        if errors:
            raise ServerError(f"influxd query {q!r}: {errors}")
        return answer

    def create_database(self, name: str) -> None:
        self.query("CREATE DATABASE " + quote_identifier(name))

    def write(self, lines: str, db: str, precision: str = "ns") -> None:
        """Write line protocol to ``db``; raises ``ServerError`` unless influxd answers 204."""
        query = urllib.parse.urlencode({"db": db, "precision": precision})
        status, body = http_request(f"{self.url}/write?{query}", method="POST", data=lines.encode())
        if status != 204:
            raise ServerError(f"influxd write: HTTP {status}: {body[:500]!r}")

    def series_values(self, q: str, db: str, params: dict[str, Any] | None = None) -> list[list[Any]]:
        """Rows of the first series of the first statement of ``q`` ([] when none)."""
        result = self.query(q, db=db, params=params)["results"][0]
        series = result.get("series", [])
        return series[0]["values"] if series else []


def quote_identifier(name: str) -> str:
    """An InfluxQL double-quoted identifier."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ------------------------------------------------------------------------- Prometheus


class PrometheusServer:
    """A Prometheus server scraping ``targets`` (``host:port``) every second."""

    def __init__(
        self,
        base_dir: Path,
        targets: Sequence[str],
        metrics_path: str = "/metrics",
        binary: str = "prometheus",
        scrape_interval: str = "1s",
    ) -> None:
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.targets = list(targets)
        self.config_path = self.base_dir / "prometheus.yml"
        config = {  # JSON is YAML: no YAML library needed, no quoting traps
            "global": {
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "evaluation_interval": scrape_interval,
            },
            "scrape_configs": [
                {
                    "job_name": "test",
                    "metrics_path": metrics_path,
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }
        self.config_path.write_text(json.dumps(config, indent=2))
        argv = [
            binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.base_dir / 'data'}",
            f"--web.listen-address={LOOPBACK}:{self.port}",
            "--log.level=warn",
        ]
        self._process = _Process("prometheus", argv, self.base_dir / "prometheus.log")

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start Prometheus and wait until ``/-/ready`` answers 200."""
        self._process.start()
        self._process.wait_ready(f"{self.url}/-/ready", timeout, expect=(200,))

    def stop(self) -> None:
        self._process.stop()

    def running(self) -> bool:
        return self._process.alive()

    def log_tail(self, lines: int = 40) -> str:
        return self._process.log_tail(lines)

    def _api(self, path: str, params: dict[str, str] | None = None) -> Any:
        query = "?" + urllib.parse.urlencode(params) if params else ""
        status, body = http_request(f"{self.url}{path}{query}")
        answer = json.loads(body) if body else {}
        if status != 200 or answer.get("status") != "success":
            raise ServerError(f"prometheus {path} {params}: HTTP {status}: {body[:500]!r}")
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query: the ``data.result`` list of /api/v1/query (vector results)."""
        data = self._api("/api/v1/query", {"query": expr})
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets_health(self) -> list[dict[str, Any]]:
        """Active targets with ``health`` and ``lastError`` (for diagnostics)."""
        targets: list[dict[str, Any]] = self._api("/api/v1/targets")["activeTargets"]
        return targets

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[list[dict[str, Any]]], bool] = bool,
        timeout: float = 30.0,
    ) -> list[dict[str, Any]]:
        """Poll ``query(expr)`` until ``predicate(result)`` holds; return that result.

        On timeout raises ``ServerError`` with the last result and the targets' health.
        """
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() >= deadline:
                health = [{k: t.get(k) for k in ("scrapeUrl", "health", "lastError")} for t in self.targets_health()]
                raise ServerError(
                    f"prometheus: {expr!r} not satisfied within {timeout:.0f} s; "
                    f"last result {result!r}; targets {health!r}"
                )
            time.sleep(0.2)


def promtool_check_metrics(exposition: bytes, binary: str = "promtool") -> subprocess.CompletedProcess[str]:
    """Run ``promtool check metrics`` on an exposition fed through stdin."""
    return subprocess.run(
        [binary, "check", "metrics"],
        input=exposition.decode("utf-8"),
        capture_output=True,
        text=True,
        timeout=30,
    )


# Signatures of the factory fixtures in conftest.py, for annotating test parameters.
PrometheusFactory = Callable[..., PrometheusServer]  # (targets, metrics_path="/metrics")


# ---------------------------------------------------------------- aiohttp in a thread


class BackgroundApp:
    """An aiohttp ``web.Application`` served on 127.0.0.1 from a thread with its own loop.

    Lets synchronous tests put up a real HTTP endpoint (e.g. a scrape target).
    """

    def __init__(self, app: web.Application, ssl_context: "ssl.SSLContext | None" = None) -> None:
        self.app = app
        self.ssl_context = ssl_context  # set: served over HTTPS
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def host_port(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context is not None else 'http'}://{self.host_port}"

    def start(self, timeout: float = 10.0) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        async def serve() -> None:
            runner = web.AppRunner(self.app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, LOOPBACK, 0, ssl_context=self.ssl_context)
            await site.start()
            self._runner = runner
            self.port = int(runner.addresses[0][1])

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(serve())
            except BaseException as err:  # reported to the starting thread
                failure.append(err)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="BackgroundApp", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise ServerError("aiohttp app did not start in time")
        if failure:
            raise ServerError(f"aiohttp app did not start: {failure[0]!r}")

    def stop(self) -> None:
        loop, runner, thread = self._loop, self._runner, self._thread
        self._loop = self._runner = self._thread = None
        if loop is None or thread is None:
            return
        if runner is not None and loop.is_running():
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        if loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


BackgroundAppFactory = Callable[[web.Application], BackgroundApp]
