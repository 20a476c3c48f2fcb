"""The repository stands alone: nothing in it reads or points outside the checkout.

A clone with no sibling folders must pass the README's test command, so no code, test,
script or doc may name a path above the repository root (the fixtures the tests use are
copied under tests/fixtures/ with their PROVENANCE.md).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# "../shared", "parents[2] / 'shared'", "shared/fixtures", "shared/design.md": outside the checkout.
OUTSIDE = re.compile(r"\.\./shared|parents\[2\]|shared/(fixtures|design\.md|notes)")


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.split("\n")
    files = []
    for name in out:
        if not name or name.startswith("tests/fixtures/"):  # recorded data and its provenance notes
            continue
        path = ROOT / name
        if path.is_file() and path.suffix in {".py", ".md", ".sh", ".toml", ".json", ".yml", ".yaml", ".service", ""}:
            files.append(path)
    return files


def test_nothing_points_outside_the_checkout() -> None:
    offenders = []
    for path in _tracked_text_files():
        if path == Path(__file__).resolve():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()[:120]}")
    assert not offenders, "paths outside the repository:\n" + "\n".join(offenders)


def test_grid_fixtures_are_in_the_repository() -> None:
    grid = ROOT / "tests" / "fixtures" / "grid"
    assert (grid / "PROVENANCE.md").is_file()
    assert len(list(grid.glob("*.json"))) >= 10
