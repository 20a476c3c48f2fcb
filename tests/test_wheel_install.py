"""Issue 17 item 6: the sdist and wheel carry the deployment files, the wheel installs
into a fresh venv whose ``wattprint --version`` and ``wattprint deploy systemd DIR``
work without a checkout; the example config lists every key of the config schema and
round-trips through ``check-config``; ``scripts/run.sh`` installs no test extras.

The fresh venv gets the wheel with ``--no-index --no-deps`` (no network in the test);
its dependencies (aiohttp, pynvml, ...) come from the project's .venv through a
``.pth`` line. A path added that way is not a site directory, so the editable install's
finder in .venv is not activated: ``wattprint`` is imported from the wheel.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path
from typing import Iterator

import pytest

from test_deploy_systemd import unit_complaints, verify_copy
from wattprint.daemon.config import load_config

REPO = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".gl", ".whl", ".mutmut", "mutants", ".venv-*")
DEPLOY_FILES = ["systemd/wattprint.service", "systemd/wattprint.toml", "prometheus/prometheus.yml",
                "prometheus/wattprint.rules.yml", "grafana/dashboards/wattprint-live.json",
                "grafana/dashboards/wattprint-jobs.json", "grafana/provisioning/dashboards/wattprint.yml",
                "grafana/provisioning/datasources/wattprint.yml"]
# Keys the example may leave commented out, and why.
NOT_IN_EXAMPLE = {("daemon", "host"): "its default is the machine's hostname"}
# Lifecycle factors (issue 16): unset means the shipped data file's sourced value (or no
# contract); set, even to that value, it becomes "config: [footprint] <key>". The example
# lists them commented out.
NOT_IN_EXAMPLE |= {(s, k): "unset = the data file's sourced value" for s, k in (
    ("footprint", "service_life_years"), ("footprint", "gpu_kgco2e"), ("footprint", "cpu_kgco2e_per_socket"),
    ("footprint", "dram_kgco2e_per_gb"), ("footprint", "platform_kgco2e"), ("footprint", "wue_l_per_kwh"),
    ("footprint", "ewif_l_per_kwh"), ("market", "contract_g_per_kwh"), ("market", "residual_g_per_kwh"))}
ENV = {k: v for k, v in os.environ.items() if not k.startswith("WATTPRINT_")}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``python -m build`` (an sdist, then the wheel built from that sdist) of a copy
    of the work tree."""
    base = tmp_path_factory.mktemp("dist")
    source, out = base / "src", base / "dist"
    shutil.copytree(REPO, source, ignore=NOT_COPIED)
    result = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(source)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"build failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    yield out


@pytest.mark.slow
def test_sdist_and_wheel_carry_the_deployment_files(dist: Path) -> None:
    [sdist] = dist.glob(f"wattprint-{VERSION}.tar.gz")
    [wheel] = dist.glob(f"wattprint-{VERSION}-*.whl")
    with tarfile.open(sdist) as tar:
        names = set(tar.getnames())
    assert {f"wattprint-{VERSION}/deploy/{f}" for f in DEPLOY_FILES} <= names
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert {f"wattprint/deploy/{f}" for f in DEPLOY_FILES} <= names
        assert zf.read("wattprint/deploy/systemd/wattprint.toml") == (REPO / "deploy/systemd/wattprint.toml").read_bytes()


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_reports_its_version_and_deploys_the_unit(dist: Path, tmp_path: Path) -> None:
    [wheel] = dist.glob(f"wattprint-{VERSION}-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    fresh_site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(fresh_site) / "_wattprint_test_deps.pth").write_text("\n".join(deps) + "\n")
    result = subprocess.run([str(py), "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                             "--disable-pip-version-check", str(wheel)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    exe = venv / "bin" / "wattprint"
    where = subprocess.run([str(py), "-c", "import wattprint.daemon as d; print(d.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip()
    assert where.startswith(fresh_site), where  # the wheel's copy, not the checkout

    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=ENV)
    assert (out.returncode, out.stdout.strip()) == (0, f"wattprint {VERSION}"), out.stderr

    target = tmp_path / "unit"
    out = subprocess.run([str(exe), "deploy", "systemd", str(target)], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env=ENV)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(target / "wattprint.service"), str(target / "wattprint.toml")]
    unit = (target / "wattprint.service").read_text()
    assert f"ExecStart={exe} run --config /etc/wattprint/wattprint.toml\n" in unit
    shipped = (REPO / "deploy/systemd/wattprint.service").read_text()
    assert unit == shipped.replace("ExecStart=/opt/wattprint/venv/bin/wattprint ", f"ExecStart={exe} ")
    assert (target / "wattprint.toml").read_text() == (REPO / "deploy/systemd/wattprint.toml").read_text()
    # The written unit is one systemd accepts.
    check = verify_copy(tmp_path / "verify", unit.replace(f"ExecStart={exe} ", "ExecStart=/opt/wattprint/venv/bin/wattprint "))
    assert check.returncode == 0 and unit_complaints(check) == [], check.stdout + check.stderr
    # A second run does not overwrite; --force does.
    again = subprocess.run([str(exe), "deploy", "systemd", str(target)], capture_output=True, text=True, env=ENV)
    assert again.returncode == 2 and "not overwriting" in again.stderr
    forced = subprocess.run([str(exe), "deploy", "systemd", str(target), "--force", "--exec", "/usr/local/bin/wattprint"],
                            capture_output=True, text=True, env=ENV)
    assert forced.returncode == 0 and "ExecStart=/usr/local/bin/wattprint run" in (target / "wattprint.service").read_text()
    # Prometheus and Grafana files come out the same as the checkout's.
    for kind, files in (("prometheus", ["prometheus.yml", "wattprint.rules.yml"]),
                        ("grafana", ["provisioning/datasources/wattprint.yml", "provisioning/dashboards/wattprint.yml",
                                     "dashboards/wattprint-jobs.json", "dashboards/wattprint-live.json"])):
        out = subprocess.run([str(exe), "deploy", kind, str(tmp_path / kind)], capture_output=True, text=True, env=ENV)
        assert out.returncode == 0, out.stderr
        src = REPO / "deploy" / kind
        for f in files:
            assert (tmp_path / kind / f).read_bytes() == (src / f).read_bytes(), f


def test_example_config_lists_every_key_of_the_schema_with_its_default() -> None:
    example = tomllib.loads((REPO / "deploy/systemd/wattprint.toml").read_text())
    defaults = load_config(None, env={}).to_dict()
    missing = [(s, k) for s, keys in defaults.items() for k in keys
               if k not in example.get(s, {}) and (s, k) not in NOT_IN_EXAMPLE]
    assert not missing, f"keys missing from deploy/systemd/wattprint.toml: {missing}"
    unknown = [(s, k) for s, keys in example.items() for k in keys if k not in defaults.get(s, {})]
    assert not unknown, unknown
    differ = [(s, k, v, defaults[s][k]) for s, keys in example.items() for k, v in keys.items() if v != defaults[s][k]]
    assert not differ, f"the example's values differ from the defaults: {differ}"


def test_example_config_round_trips_through_check_config(tmp_path: Path) -> None:
    example_path = REPO / "deploy/systemd/wattprint.toml"
    out = subprocess.run([sys.executable, "-m", "wattprint.daemon", "check-config", "--config", str(example_path)],
                         capture_output=True, text=True, timeout=60, env=ENV)
    assert out.returncode == 0, out.stderr
    effective = tomllib.loads(out.stdout)
    example = tomllib.loads(example_path.read_text())
    for section, keys in example.items():
        for key, value in keys.items():
            assert effective[section][key] == value, (section, key)
    # and the printed config is itself a valid config that gives the same again
    again_path = tmp_path / "again.toml"
    again_path.write_text(out.stdout)
    again = subprocess.run([sys.executable, "-m", "wattprint.daemon", "check-config", "--config", str(again_path)],
                           capture_output=True, text=True, timeout=60, env=ENV)
    assert again.returncode == 0 and tomllib.loads(again.stdout) == effective


def test_run_sh_installs_the_daemon_without_the_test_extras(tmp_path: Path) -> None:
    """scripts/run.sh in a copy of the tree, with a stand-in venv whose python records
    the pip command: it installs the project itself, not ``[test]``; test.sh's default
    still installs ``[test]``."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "scripts", root / "scripts")
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    log = tmp_path / "pip.log"
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\n[ "$3" = "--version" ] && exit 0\necho "$@" >> {log}\n')
    (bin_dir / "wattprint").write_text('#!/bin/sh\necho "ran wattprint $@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    out = subprocess.run([str(root / "scripts" / "run.sh"), "--config", "x.toml"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ran wattprint run --config x.toml"
    [install] = log.read_text().splitlines()
    assert install.endswith(f"-e {root}"), install  # no [test]
    # Nothing to do the second time; the test set-up then asks for [test].
    subprocess.run([str(root / "scripts" / "run.sh")], capture_output=True, text=True, timeout=60, check=True)
    assert len(log.read_text().splitlines()) == 1
    subprocess.run(["bash", "-c", f"source {root}/scripts/setup-venv.sh && setup_venv"], check=True, timeout=60)
    assert log.read_text().splitlines()[-1].endswith(f"-e {root}[test]")
