"""The built wheel installs daemon/ and exporters/ as wattprint.daemon and
wattprint.exporters, with every subpackage, and the `wattprint` console script."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
# source dir -> where it lands in the wheel
PACKAGE_ROOTS = {"daemon": "wattprint/daemon", "exporters": "wattprint/exporters"}
PACKAGE_DATA = {"daemon/data": (".json", ".csv")}  # [tool.setuptools.package-data]
NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".gl", ".whl"
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    """A wheel built from a copy of the work tree (the build writes build/ and
    *.egg-info next to pyproject.toml; the real tree stays untouched)."""
    base = tmp_path_factory.mktemp("packaging")
    source, out = base / "src", base / "dist"
    shutil.copytree(REPO, source, ignore=NOT_COPIED)
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"wheel build failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    wheels = sorted(out.glob("wattprint-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as archive:
        archive.testzip()
        yield archive


def source_packages() -> dict[Path, str]:
    """Every directory under daemon/ and exporters/ holding an __init__.py -> its wheel path."""
    found: dict[Path, str] = {}
    for top, target in PACKAGE_ROOTS.items():
        for dirpath, dirnames, filenames in os.walk(REPO / top):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
            if "__init__.py" in filenames:
                relative = Path(dirpath).relative_to(REPO / top)
                found[Path(dirpath)] = target if relative == Path(".") else f"{target}/{relative.as_posix()}"
    return found


def test_source_tree_has_the_expected_packages() -> None:
    packages = set(source_packages().values())
    assert {"wattprint/daemon", "wattprint/exporters"} <= packages


def test_every_subpackage_and_module_is_in_the_wheel(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    missing = []
    for directory, target in source_packages().items():
        for module in sorted(directory.glob("*.py")):
            if f"{target}/{module.name}" not in names:
                missing.append(f"{target}/{module.name}")
    assert not missing, f"not in the wheel (list the subpackage in pyproject.toml): {missing}"


def test_package_data_is_in_the_wheel(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for folder, suffixes in PACKAGE_DATA.items():
        top, _, rest = folder.partition("/")
        for path in sorted((REPO / folder).glob("*")):
            if path.suffix in suffixes:
                assert f"{PACKAGE_ROOTS[top]}/{rest}/{path.name}" in names


def test_nothing_claims_top_level_daemon_or_exporters(wheel: zipfile.ZipFile) -> None:
    top_level = {name.split("/", 1)[0] for name in wheel.namelist()}
    assert "daemon" not in top_level and "exporters" not in top_level
    dist_info = {name for name in top_level if name.endswith(".dist-info")}
    assert len(dist_info) == 1
    assert top_level - dist_info == {"wattprint"}


def test_console_script_entry_point(wheel: zipfile.ZipFile) -> None:
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(wheel.read(entry_points).decode())
    assert parser["console_scripts"]["wattprint"] == "wattprint.daemon.cli:main"
