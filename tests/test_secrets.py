"""Secrets never leave through the CLI, config errors, the log or /healthz, and risky
HTTP settings are loud (issue 11). Against the real CLI and the REAL daemon process.

- ``check-config`` shows a password in ``[influxdb] url``'s userinfo (and secret
  query values) as ``<redacted>``; a secret of the wrong type is reported without its
  value; a token with a control character is a config error (exit 2), at start too;
- ``jobs --fleet`` errors never show the URL's password; credentials in the URL are
  used as Basic auth (the query against the real influxd works);
- a listen address that is not loopback without a token: a WARNING in check-config
  and at daemon start;
- the daemon with such a URL pointing at nothing: the password is in neither its
  log nor /healthz.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon_harness import DaemonProcess
from servers import free_port

PASSWORD = "hunter2-Sekr3t-pw"
TOKEN = "tok-9f8e7d6c5b4a"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("WATTPRINT_")}
    base.update(env or {})
    return subprocess.run([sys.executable, "-m", "wattprint.daemon", *args], capture_output=True, text=True,
                          timeout=60, env=base)


def test_check_config_redacts_url_passwords(tmp_path: Path) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text(f'[influxdb]\nurl = "http://admin:{PASSWORD}@db.example:8086/?token={TOKEN}"\n'
                   f'[grid]\nbase_url = "https://u:{PASSWORD}x@grid.example/"\n')
    out = cli("check-config", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert PASSWORD not in out.stdout + out.stderr and TOKEN not in out.stdout + out.stderr
    assert 'url = "http://admin:<redacted>@db.example:8086/?token=<redacted>"' in out.stdout


@pytest.mark.parametrize("toml, key", [
    ("[http]\ntoken = 31415926535\n", "[http] token"),
    (f'[influxdb]\npassword = ["{PASSWORD}"]\n', "[influxdb] password"),
    ("[grid]\ntoken = 27182818284.5\n", "[grid] token"),
])
def test_wrong_type_secret_is_not_echoed(tmp_path: Path, toml: str, key: str) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text(toml)
    out = cli("check-config", "--config", str(cfg))
    assert out.returncode == 2
    assert key in out.stderr and "value not shown" in out.stderr, out.stderr
    for secret in (PASSWORD, "31415926535", "27182818284"):
        assert secret not in out.stderr + out.stdout


@pytest.mark.parametrize("token", ["abc\x1bdef", "abc\x7fdef", "abc\u200bdef", "abc\ndef"])
def test_token_with_control_characters_is_a_config_error(tmp_path: Path, token: str) -> None:
    out = cli("check-config", env={"WATTPRINT_HTTP_TOKEN": token})
    assert out.returncode == 2, out.stdout
    assert "[http] token" in out.stderr and "non-printable" in out.stderr
    assert token not in out.stderr
    run = cli("run", env={"WATTPRINT_HTTP_TOKEN": token, "WATTPRINT_DAEMON_STATE_DIR": str(tmp_path / "s")})
    assert run.returncode == 2 and "[http] token" in run.stderr


def test_non_loopback_listen_without_token_warns(tmp_path: Path) -> None:
    out = cli("check-config", env={"WATTPRINT_HTTP_LISTEN": "0.0.0.0:9877"})
    assert out.returncode == 0
    assert "WARNING" in out.stderr and "not a loopback address" in out.stderr
    quiet = cli("check-config", env={"WATTPRINT_HTTP_LISTEN": "0.0.0.0:9877", "WATTPRINT_HTTP_TOKEN": TOKEN})
    assert "WARNING" not in quiet.stderr and TOKEN not in quiet.stdout
    assert "WARNING" not in cli("check-config", env={"WATTPRINT_HTTP_LISTEN": "[::1]:9877"}).stderr


def test_fleet_error_does_not_show_the_url_password(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    out = cli("jobs", "--fleet", env={"WATTPRINT_INFLUXDB_URL": f"http://admin:{PASSWORD}@127.0.0.1:{port}",
                                      "WATTPRINT_INFLUXDB_TIMEOUT_S": "2"})
    assert out.returncode == 1
    assert "not reachable" in out.stderr and "<redacted>" in out.stderr, out.stderr
    assert PASSWORD not in out.stderr + out.stdout


@pytest.mark.slow
def test_fleet_uses_url_credentials(influxdb_server) -> None:
    url = influxdb_server.url.replace("http://", f"http://admin:{PASSWORD}@")
    out = cli("jobs", "--fleet", "--json", env={"WATTPRINT_INFLUXDB_URL": url,
                                                "WATTPRINT_INFLUXDB_DATABASE": "wattprint_fleet_creds"})
    assert PASSWORD not in out.stderr + out.stdout
    # The database does not exist: InfluxDB answers with an error (not a URL parse failure).
    assert out.returncode in (0, 1)
    if out.returncode == 1:
        assert "InfluxDB" in out.stderr and "nonnumeric port" not in out.stderr, out.stderr
    else:
        assert json.loads(out.stdout)["labels"] == []


@pytest.mark.slow
def test_daemon_log_and_healthz_never_show_secrets(tmp_path: Path) -> None:
    port = free_port()
    daemon = DaemonProcess(tmp_path, sim_file=None, powercap_root=None, env={
        "WATTPRINT_HTTP_LISTEN": "0.0.0.0:0",  # replaced below: the harness's port, all interfaces
        "WATTPRINT_INFLUXDB_ENABLED": "true",
        "WATTPRINT_INFLUXDB_URL": f"http://admin:{PASSWORD}@127.0.0.1:{port}",
        "WATTPRINT_INFLUXDB_TIMEOUT_S": "1",
        "WATTPRINT_DAEMON_LOG_LEVEL": "debug",
    })
    daemon.env["WATTPRINT_HTTP_LISTEN"] = f"0.0.0.0:{daemon.port}"
    daemon.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            parts = {p["name"]: p for p in daemon.get("/healthz")["parts"]}
            if parts.get("influxdb", {}).get("state") == "degraded":
                break
            time.sleep(0.3)
        hz = json.dumps(daemon.get("/healthz"))
        assert PASSWORD not in hz
    finally:
        assert daemon.stop() == 0
    text = daemon.log_path.read_text(errors="replace")
    assert PASSWORD not in text
    assert "WARNING" in text and "not a loopback address" in text
