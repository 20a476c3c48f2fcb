"""Config: TOML + environment into frozen typed objects; every problem named at once."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from wattprint.daemon.config import Config, ConfigError, load_config


def write(tmp_path, text: str):
    p = tmp_path / "wattprint.toml"
    p.write_text(text)
    return p


def test_defaults_without_file_are_valid_and_frozen():
    cfg = load_config(None, env={})
    assert isinstance(cfg, Config)
    assert cfg.daemon.interval_s == 1.0
    assert cfg.http.listen == "127.0.0.1:9877"
    assert cfg.grid.provider == "static"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.daemon.interval_s = 2.0  # type: ignore[misc]


def test_file_values_and_env_override(tmp_path):
    p = write(tmp_path, '[daemon]\ninterval_s = 2\nstate_dir = "/tmp/x"\n[gpu]\nbackend = "none"\n'
                        '[jobs]\nlabel_env = ["A", "B"]\n[influxdb]\ngzip = false\n')
    cfg = load_config(p, env={"WATTPRINT_DAEMON_INTERVAL_S": "0.5", "WATTPRINT_INFLUXDB_GZIP": "true",
                              "WATTPRINT_JOBS_LABEL_ENV": "X,Y", "WATTPRINT_JOB": "not-a-config-key"})
    assert cfg.daemon.interval_s == 0.5
    assert cfg.daemon.state_dir == "/tmp/x"
    assert cfg.gpu.backend == "none"
    assert cfg.influxdb.gzip is True
    assert cfg.jobs.label_env == ("X", "Y")
    assert cfg.source_path == str(p)


def test_all_problems_reported_at_once_with_file_and_key(tmp_path):
    p = write(tmp_path, '[daemon]\ninterval_s = "fast"\nbogus = 1\n[gpu]\nbackend = "cuda"\n'
                        '[nope]\nx = 1\n[accounting]\npue = 0.5\n')
    with pytest.raises(ConfigError) as info:
        load_config(p, env={"WATTPRINT_HTTP_PORT": "1"})
    problems = info.value.problems
    text = "\n".join(problems)
    assert f"{p}: [daemon] interval_s: expected a number" in text
    assert f"{p}: [daemon] bogus: unknown key" in text
    assert f"{p}: [gpu] backend: 'cuda' is not one of" in text
    assert f"{p}: unknown section [nope]" in text
    assert f"{p}: [accounting] pue: 0.5 is outside" in text
    assert "environment WATTPRINT_HTTP_PORT: unknown key http.port" in text
    assert len(problems) == 6


def test_cross_checks(tmp_path):
    p = write(tmp_path, '[gpu]\nbackend = "sim"\n[http]\nlisten = "nohost"\n[grid]\nprovider = "electricitymaps"\n')
    with pytest.raises(ConfigError) as info:
        load_config(p, env={})
    text = "\n".join(info.value.problems)
    assert "[gpu] sim_file: required" in text
    assert "[http] listen: 'nohost' is not HOST:PORT" in text
    assert "[grid] token: required" in text


@pytest.mark.parametrize("content,needle", [
    ("[daemon\n", "not valid TOML"),
    ("daemon = 3\n", "daemon must be a table"),
    ("[daemon]\ninterval_s = nan\n", "finite"),
    ("[daemon]\ninterval_s = true\n", "expected a number"),
    ("[influxdb]\nbatch_size = 1.5\n", "expected an integer"),
])
def test_bad_values(tmp_path, content, needle):
    p = write(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        load_config(p, env={})
    assert needle in str(info.value)
    assert str(p) in str(info.value)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.toml", env={})


def test_secrets_redacted_in_effective_config():
    cfg = load_config(None, env={"WATTPRINT_HTTP_TOKEN": "s3cret", "WATTPRINT_INFLUXDB_PASSWORD": "pw"})
    d = cfg.to_dict()
    assert d["http"]["token"] == "<redacted>"
    assert d["influxdb"]["password"] == "<redacted>"
    assert cfg.http.token == "s3cret"


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "wattprint.daemon", *args], capture_output=True, text=True,
                          env=env, timeout=60)


def test_check_config_cli_exit_codes(tmp_path):
    good = write(tmp_path, '[daemon]\ninterval_s = 3\n')
    r = _cli("check-config", "--config", str(good))
    assert r.returncode == 0, r.stderr
    assert "interval_s = 3.0" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[daemon]\ninterval_s = -1\nx = 2\n')
    r = _cli("check-config", "--config", str(bad))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"{bad}: [daemon] interval_s" in r.stderr and f"{bad}: [daemon] x: unknown key" in r.stderr
    r = _cli("run", "--config", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr
