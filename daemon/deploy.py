"""``wattprint deploy systemd|prometheus|grafana DIR``: write the shipped deployment files.

The wheel carries deploy/ as the package ``wattprint.deploy`` (package data), so an
install without a checkout (pip, pipx) can still get the unit, the example config, the
Prometheus config and rules, and the Grafana provisioning and dashboards. In a checkout
whose editable install predates that package, the files are read from deploy/ next to
daemon/.

``systemd`` writes ``wattprint.service`` with ``ExecStart=`` pointing at the
``wattprint`` executable that is running (the pipx or venv path), or at ``--exec``;
files that exist are left alone unless ``--force``. docs/deploy.md says where each
file goes.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

KINDS = ("systemd", "prometheus", "grafana")
DEFAULT_EXEC = "/opt/wattprint/venv/bin/wattprint"
_EXEC_LINE = re.compile(r"^ExecStart=(\S+)( .*)$", re.MULTILINE)
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._+/@:-]+$")  # no spaces, quotes or specifiers (%)


class DeployError(Exception):
    """What cannot be written, and why (one line)."""


def _root() -> Traversable:
    try:
        return resources.files("wattprint.deploy")
    except ModuleNotFoundError:  # an editable install made before wattprint.deploy existed
        return Path(__file__).resolve().parent.parent / "deploy"


def files(kind: str) -> list[tuple[Traversable, str]]:
    """(shipped file, path relative to DIR) of one kind, in a stable order."""
    root = _root()
    if kind == "systemd":
        return [(root / "systemd" / "wattprint.service", "wattprint.service"),
                (root / "systemd" / "wattprint.toml", "wattprint.toml")]
    if kind == "prometheus":
        return [(root / "prometheus" / "prometheus.yml", "prometheus.yml"),
                (root / "prometheus" / "wattprint.rules.yml", "wattprint.rules.yml")]
    if kind == "grafana":
        graf = root / "grafana"
        out = [(graf / "provisioning" / "datasources" / "wattprint.yml", "provisioning/datasources/wattprint.yml"),
               (graf / "provisioning" / "dashboards" / "wattprint.yml", "provisioning/dashboards/wattprint.yml")]
        dashboards = sorted((p for p in (graf / "dashboards").iterdir() if p.name.endswith(".json")),
                            key=lambda p: p.name)
        return out + [(p, f"dashboards/{p.name}") for p in dashboards]
    raise DeployError(f"unknown kind {kind!r}: one of {', '.join(KINDS)}")


def running_executable() -> str | None:
    """The absolute path of the ``wattprint`` command that is running (as invoked, so a
    pipx link on PATH stays that link), or the one next to this Python; None if neither."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "wattprint" and os.path.isfile(argv0):
        return os.path.abspath(argv0)
    beside = Path(sys.executable).parent / "wattprint"
    if beside.is_file():
        return str(beside)
    found = shutil.which("wattprint")
    return os.path.abspath(found) if found else None


def unit_text(template: str, executable: str) -> str:
    """The unit with its ExecStart= running ``executable``."""
    if not _SAFE_PATH.match(executable):
        raise DeployError(f"--exec {executable!r}: give an absolute path without spaces, quotes or '%'")
    text, n = _EXEC_LINE.subn(lambda m: f"ExecStart={executable}{m.group(2)}", template, count=1)
    if n != 1:
        raise DeployError("the shipped unit has no ExecStart= line")
    return text


def write(kind: str, directory: str, *, executable: str | None = None, force: bool = False) -> list[str]:
    """Write the files of ``kind`` under ``directory`` (made if missing); return their paths."""
    plan: list[tuple[str, str]] = []
    for source, relative in files(kind):
        text = source.read_text(encoding="utf-8")
        if relative == "wattprint.service":
            text = unit_text(text, executable or running_executable() or DEFAULT_EXEC)
        plan.append((os.path.join(directory, relative), text))
    existing = [path for path, _ in plan if os.path.lexists(path)]
    if existing and not force:
        raise DeployError(f"not overwriting {', '.join(existing)} (use --force)")
    written = []
    for path, text in plan:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        written.append(path)
    return written
