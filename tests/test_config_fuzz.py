"""Config fuzzing (hypothesis): random TOML documents, random bytes and random
``WATTPRINT_*`` environments.

- ``load_config`` returns a Config or raises ConfigError, never anything else;
- every problem names where the value came from (the file, or the environment variable
  that set it) and the key (or the section, for section problems; a file that cannot be
  parsed at all is named as a whole);
- a value that came from the environment is blamed on its variable, not on the file,
  in range and choice checks and in the cross checks too;
- ``wattprint check-config`` exits 0 (printing the effective config) or 2 (printing the
  problems), never with a traceback: in-process for many examples, and as a real
  subprocess with undecodable bytes in its environment for a few.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, get_type_hints

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wattprint.daemon import cli
from wattprint.daemon.config import ENV_PREFIX, Config, ConfigError, choices, load_config, section_types

# Every section: the daemon's own and each sink's (declared next to the sink).
SECTIONS: dict[str, dict[str, Any]] = {name: get_type_hints(typ) for name, typ in section_types().items()}
# Cross checks blame the key that makes another one a problem.
TRIGGERS = {("gpu", "sim_file"): ("gpu", "backend"), ("grid", "token"): ("grid", "provider"),
            ("market", "contract_g_per_kwh"): ("market", "contract_share")}

# ------------------------------------------------------------------------- TOML writer


def toml_string(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's, DEL aside)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def toml_document(doc: dict[str, Any]) -> str:
    top, tables = [], []
    for name, body in doc.items():
        if isinstance(body, dict):
            tables.append(f"[{toml_string(name)}]")
            tables += [f"{toml_string(k)} = {toml_value(v)}" for k, v in body.items()]
        else:
            top.append(f"{toml_string(name)} = {toml_value(body)}")
    return "\n".join(top + tables) + "\n"


# --------------------------------------------------------------------------- strategies

TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=30)
NUMBER_TEXT = st.one_of(st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True).map(repr),
                        st.sampled_from(["", " 1 ", "1e999", "-0", "0x10", "1_000", "nan", "inf", "٣"]))
SCALAR = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
)
VALUE = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(TEXT, inner, max_size=2)), max_leaves=6)


@st.composite
def key_value(draw: st.DrawFn, section: str) -> tuple[str, Any]:
    hints = SECTIONS.get(section, {})
    if hints and draw(st.integers(0, 9)) < 8:
        key = draw(st.sampled_from(sorted(hints)))
        allowed = choices(section, key)
        if allowed and draw(st.booleans()):
            return key, draw(st.sampled_from(allowed))
        typ = hints[key]
        plausible = {bool: st.booleans(), int: st.integers(-10, 10**7), float: st.floats(-10, 10**5),
                     str: TEXT}.get(typ, st.lists(TEXT, max_size=3))
        return key, draw(st.one_of(plausible, VALUE))
    return draw(TEXT), draw(VALUE)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(st.one_of(st.sampled_from(sorted(SECTIONS)), TEXT), max_size=5, unique=True))
    doc: dict[str, Any] = {}
    for name in names:
        if draw(st.integers(0, 9)) == 0:
            doc[name] = draw(SCALAR)  # a section that is not a table
        else:
            pairs = draw(st.lists(key_value(name), max_size=5))
            doc[name] = dict(pairs)
    return doc


@st.composite
def environments(draw: st.DrawFn, allow_nul: bool = True) -> dict[str, str]:
    env: dict[str, str] = {}
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from(sorted(SECTIONS)))
        if draw(st.integers(0, 4)) == 0:
            key = draw(st.text(alphabet="ABCXYZ_", min_size=1, max_size=8))
        else:
            key = draw(st.sampled_from(sorted(SECTIONS[section]))).upper()
        alphabet = st.characters(exclude_categories=["Cs"] if allow_nul else ["Cs", "Cc"])
        value = draw(st.one_of(st.text(alphabet=alphabet, max_size=20), NUMBER_TEXT,
                               st.sampled_from(["true", "no", "sim", "v2", "electricitymaps", "A,B", ",", "x:1"])))
        if not allow_nul:
            value = value.replace("\x00", "")
        env[f"{ENV_PREFIX}{section.upper()}_{key}"] = value
    return env


# ------------------------------------------------------------------------------ oracle

_KEY_PROBLEM = re.compile(r"\[(?P<sec>[a-z]+)\] (?P<key>[a-z0-9_]+(?:, [a-z0-9_]+)*): ")  # gpu_kgco2e has digits


def assert_problems_are_named(problems: list[str], path: str, doc: dict[str, Any] | None, env: dict[str, str]) -> None:
    assert problems, "ConfigError without problems"
    for p in problems:
        if p.startswith(f"{path}: "):
            rest = p[len(path) + 2:]
            if rest.startswith(("not valid TOML", "not valid UTF-8", "cannot read", "file not found")):
                continue  # the whole file
            assert doc is not None, p
            if rest.startswith("unknown section ["):
                assert any(rest.startswith(f"unknown section [{n}] (known") for n in doc if n not in SECTIONS), p
                continue
            if any(rest.startswith(f"{n} must be a table") for n in doc if n in SECTIONS):
                continue
            sec_key = _set_key(rest, lambda sec, key: isinstance(doc.get(sec), dict) and key in doc[sec])
            unknown = any(rest.startswith(f"[{sec}] {key}: unknown key") for sec, body in doc.items()
                          if sec in SECTIONS and isinstance(body, dict) for key in body if key not in SECTIONS[sec])
            assert sec_key or unknown, f"problem does not name a key set in the file: {p!r}"
        else:
            m = re.match(r"environment (WATTPRINT_[^:\s]*): ", p)
            assert m and m.group(1) in env, f"problem names neither the file nor a variable: {p!r}"
            var, rest = m.group(1), p[m.end():]
            if rest.startswith("unknown key "):
                assert rest.startswith(f"unknown key {_env_key(var)}"), p
                continue
            assert _set_key(rest, lambda sec, key: f"{ENV_PREFIX}{sec.upper()}_{key.upper()}" == var), \
                f"problem does not name the key its variable set: {p!r}"


def _env_key(var: str) -> str:
    for sec in SECTIONS:
        prefix = f"{ENV_PREFIX}{sec.upper()}_"
        if var.startswith(prefix):
            return f"{sec}.{var[len(prefix):].lower()}"
    raise AssertionError(var)


def _set_key(rest: str, was_set: Any) -> bool:
    """``rest`` starts with ``[sec] key: `` for a known key that was set there (or whose
    trigger was, for cross checks)."""
    m = _KEY_PROBLEM.match(rest)
    if not m or m.group("sec") not in SECTIONS:
        return False
    sec = m.group("sec")
    keys = m.group("key").split(", ")
    if not all(k in SECTIONS[sec] for k in keys):
        return False
    candidates = {(sec, k) for k in keys} | {TRIGGERS.get((sec, k), (sec, k)) for k in keys}
    if sec == "influxdb" and len(keys) >= 1 and "api" not in keys and rest.find('api = "v2"') >= 0:
        candidates.add(("influxdb", "api"))
    return any(was_set(s, k) for s, k in candidates)


def load_or_problems(path: str, env: dict[str, str]) -> Config | list[str]:
    try:
        return load_config(path, env=env)
    except ConfigError as exc:
        return exc.problems


# ------------------------------------------------------------------------------- tests

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(doc=documents(), env=environments())
def test_random_documents_and_environments(doc: dict[str, Any], env: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "wattprint.toml")
        Path(path).write_text(toml_document(doc), encoding="utf-8")
        result = load_or_problems(path, env)
    if isinstance(result, Config):
        assert result.source_path == path
        return
    assert_problems_are_named(result, path, doc, env)


@settings(max_examples=200, deadline=None)
@given(data=st.one_of(st.binary(max_size=200), TEXT.map(lambda t: t.encode("utf-8")),
                      st.sampled_from([b"[daemon\n", b"a = \n", b"\xff\xfe[daemon]", b"[[daemon]]\n", b"x = 1979-05-27\n",
                                       b"[daemon]\ninterval_s = " + b"9" * 400 + b"\n",
                                       b"[daemon]\ninterval_s = " + b"9" * 5000 + b"\n",
                                       b"[daemon.sub]\nx = 1\n", b'"daemon" = {interval_s = 2}\n'])))
def test_random_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "wattprint.toml")
        Path(path).write_bytes(data)
        result = load_or_problems(path, {})
        if isinstance(result, list):
            # the document may still parse: then problems name keys of what it holds
            try:
                import tomllib

                doc = tomllib.loads(data.decode("utf-8"))
            except Exception:
                doc = None
            assert_problems_are_named(result, path, doc, {})


def test_unreadable_paths_are_config_errors(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for path in (str(loop), str(tmp_path / ("x" * 300)), str(tmp_path), "/nonexistent/x.toml", str(tmp_path / "a\x00b")):
        problems = load_or_problems(path, {})
        assert isinstance(problems, list) and len(problems) == 1 and problems[0].startswith(path), problems


@pytest.mark.parametrize(("env", "expected"), [
    ({"WATTPRINT_DAEMON_INTERVAL_S": "0"}, "environment WATTPRINT_DAEMON_INTERVAL_S: [daemon] interval_s: 0.0 is outside"),
    ({"WATTPRINT_GPU_BACKEND": "cuda"}, "environment WATTPRINT_GPU_BACKEND: [gpu] backend: 'cuda' is not one of"),
    ({"WATTPRINT_GPU_BACKEND": "sim"}, "environment WATTPRINT_GPU_BACKEND: [gpu] sim_file: required"),
    ({"WATTPRINT_HTTP_LISTEN": "nohost"}, "environment WATTPRINT_HTTP_LISTEN: [http] listen:"),
    ({"WATTPRINT_GRID_PROVIDER": "electricitymaps"}, "environment WATTPRINT_GRID_PROVIDER: [grid] token: required"),
    ({"WATTPRINT_INFLUXDB_ENABLED": "yes", "WATTPRINT_INFLUXDB_API": "v2"},
     "environment WATTPRINT_INFLUXDB_API: [influxdb] org, token: api = \"v2\" needs"),
    ({"WATTPRINT_JOBS_LABEL_ENV": "A,B-C"}, "environment WATTPRINT_JOBS_LABEL_ENV: [jobs] label_env: 'B-C'"),
    ({"WATTPRINT_HTTP_RATE_LIMIT_PER_S": "-1"}, "environment WATTPRINT_HTTP_RATE_LIMIT_PER_S: [http] rate_limit_per_s:"),
])
def test_values_from_the_environment_are_blamed_on_their_variable(tmp_path: Path, env: dict[str, str],
                                                                  expected: str) -> None:
    path = tmp_path / "wattprint.toml"
    path.write_text("[daemon]\ninterval_s = 2\n")
    problems = load_or_problems(str(path), env)
    assert isinstance(problems, list) and any(p.startswith(expected) for p in problems), problems
    assert not any(p.startswith(str(path)) for p in problems), problems
    assert_problems_are_named(problems, str(path), {"daemon": {"interval_s": 2}}, env)


@contextlib.contextmanager
def environment(env: dict[str, str]):
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
            del os.environ[key]
        os.environ.update(env)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=documents(), env=environments(allow_nul=False))
def test_check_config_exits_0_or_2_in_process(doc: dict[str, Any], env: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "wattprint.toml")
        Path(path).write_text(toml_document(doc), encoding="utf-8")
        out, err = io.StringIO(), io.StringIO()
        with environment(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["check-config", "--config", path])
    assert code in (0, 2)
    if code == 0:
        assert out.getvalue().startswith("# effective wattprint config") and "[http]" in out.getvalue()
    else:
        assert "invalid configuration" in err.getvalue() and out.getvalue() == ""


@pytest.mark.slow
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=documents(), env=environments(allow_nul=False),
       raw_env=st.lists(st.tuples(st.sampled_from(["WATTPRINT_DAEMON_HOST", "WATTPRINT_DAEMON_STATE_DIR",
                                                   "WATTPRINT_GRID_ZONE", "WATTPRINT_HTTP_TOKEN",
                                                   "WATTPRINT_DAEMON_INTERVAL_S"]),
                                  st.binary(min_size=1, max_size=8).filter(lambda b: b"\x00" not in b)),
                        max_size=2))
def test_check_config_cli_never_shows_a_traceback(doc: dict[str, Any], env: dict[str, str],
                                                  raw_env: list[tuple[str, bytes]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "wattprint.toml")
        Path(path).write_text(toml_document(doc), encoding="utf-8")
        child_env: dict[bytes, bytes] = {os.fsencode(k): os.fsencode(v) for k, v in os.environ.items()
                                         if not k.startswith(ENV_PREFIX)}
        child_env.update({k.encode(): v.encode("utf-8") for k, v in env.items()})
        child_env.update({k.encode(): v for k, v in raw_env})  # may be undecodable
        r = subprocess.run([sys.executable, "-m", "wattprint.daemon", "check-config", "--config", path],
                           capture_output=True, env=child_env, timeout=60)
    assert r.returncode in (0, 2), r.stderr.decode(errors="replace")
    assert b"Traceback" not in r.stderr and b"Traceback" not in r.stdout
    if r.returncode == 2:
        assert b"invalid configuration" in r.stderr


@pytest.mark.slow
def test_check_config_with_an_undecodable_path_and_strict_stdout(tmp_path: Path) -> None:
    path = os.path.join(os.fsencode(tmp_path), b"conf-\xff.toml")
    with open(path, "wb") as fh:
        fh.write(b'[daemon]\nhost = "h"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env["PYTHONIOENCODING"] = "utf-8:strict"
    for config, expected in ((path, 0), (path + b".missing", 2)):
        r = subprocess.run([sys.executable, "-m", "wattprint.daemon", "check-config", "--config", config],
                           capture_output=True, env=env, timeout=60)
        assert r.returncode == expected, r.stderr.decode(errors="replace")
        assert b"Traceback" not in r.stderr
        assert b"conf-\\udcff.toml" in (r.stdout if expected == 0 else r.stderr)
