"""Helper of scripts/mutation.sh: builds mutmut's staging directory and reports scores.

Why a staging directory: the tests import the code as ``wattprint.daemon...`` and
``wattprint.exporters...`` (pyproject.toml maps those names onto ``daemon/`` and
``exporters/``), while mutmut 3 derives a module's name from its path and puts its
``mutants/`` copy first on ``sys.path``. In the stage the code sits at
``wattprint/daemon`` and ``wattprint/exporters``, so the mutated copy in
``mutants/wattprint/...`` is what ``import wattprint.exporters.spool`` finds (Python's
path finder runs before the editable install's finder), and mutant names match the
names the tests import. The repository itself is never touched.

Two rewrites of the staged copy of each module under test, neither changing behaviour:
mutmut 3 never mutates a decorated function, so

- ``@lru_cache(...)`` / ``@functools.lru_cache`` / ``@cache`` lines are dropped (pure
  memoisation of pure functions: the line protocol escapers);
- a getter-only ``@property`` becomes ``def name(self)`` followed by
  ``name = property(name)`` in the class body (the same property object).

Subcommands:
    stage STAGE_DIR MODULE...              build STAGE_DIR/wattprint/... (+ rewrites)
    report STAGE_DIR EQUIVALENTS MODULE... [-- PATTERN...]
                                           scores per module, survivors with diffs; with
                                           PATTERNs (mutmut name patterns, fnmatch), only
                                           the mutants they match count (the functions
                                           scripts/mutation.sh restricts a module to)
"""

from __future__ import annotations

import ast
import fnmatch
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE_DIRS = {"daemon": "wattprint/daemon", "exporters": "wattprint/exporters"}
MEMO_DECORATORS = {"lru_cache", "cache"}


def staged_path(module: str) -> str:
    """``exporters/spool.py`` -> ``wattprint/exporters/spool.py``."""
    top, _, rest = module.partition("/")
    if top not in PACKAGE_DIRS or not rest.endswith(".py"):
        raise SystemExit(f"mutation: {module!r} is not a .py file under daemon/ or exporters/")
    return f"{PACKAGE_DIRS[top]}/{rest}"


def dotted(module: str) -> str:
    """``exporters/spool.py`` -> ``wattprint.exporters.spool`` (mutmut's key prefix)."""
    return staged_path(module)[: -len(".py")].replace("/", ".")


def _decorator_name(node: ast.expr) -> str:
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return ""


def undecorate(source: str) -> tuple[str, list[str]]:
    """The rewrites described in the module docstring. Returns the new source and what
    was rewritten (for the log)."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    drop: set[int] = set()  # 0-based line numbers to delete
    insert_after: dict[int, str] = {}  # 0-based line -> text to insert after it
    done: list[str] = []
    property_names: dict[int, set[str]] = {}  # class node id -> names with setters etc.
    for cls in ast.walk(tree):
        if isinstance(cls, ast.ClassDef):
            property_names[id(cls)] = {
                fn.name for fn in cls.body if isinstance(fn, ast.FunctionDef)
                for d in fn.decorator_list if isinstance(d, ast.Attribute) and d.attr in ("setter", "deleter")
            }
    parents: dict[int, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[id(child)] = node
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef) or len(fn.decorator_list) != 1:
            continue
        dec = fn.decorator_list[0]
        name = _decorator_name(dec)
        parent = parents.get(id(fn))
        if name in MEMO_DECORATORS:
            drop.update(range(dec.lineno - 1, dec.end_lineno or dec.lineno))
            done.append(f"{fn.name}: @{name} dropped")
        elif (isinstance(dec, ast.Name) and dec.id == "property" and isinstance(parent, ast.ClassDef)
              and fn.name not in property_names[id(parent)]):
            drop.update(range(dec.lineno - 1, dec.end_lineno or dec.lineno))
            indent = " " * fn.col_offset
            insert_after[(fn.end_lineno or fn.lineno) - 1] = f"{indent}{fn.name} = property({fn.name})\n"
            done.append(f"{fn.name}: @property -> {fn.name} = property({fn.name})")
    out: list[str] = []
    for i, line in enumerate(lines):
        if i not in drop:
            out.append(line)
        if i in insert_after:
            if not out[-1].endswith("\n"):
                out[-1] += "\n"
            out.append(insert_after[i])
    return "".join(out), done


def stage(stage_dir: Path, modules: list[str], repo: Path) -> None:
    for top, target in PACKAGE_DIRS.items():
        dest = stage_dir / target
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(repo / top, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for module in modules:
        path = stage_dir / staged_path(module)
        if not path.is_file():
            raise SystemExit(f"mutation: {module} does not exist")
        new, done = undecorate(path.read_text(encoding="utf-8"))
        path.write_text(new, encoding="utf-8")
        for what in done:
            print(f"mutation: staged {module}: {what}")


# ---------------------------------------------------------------------- report


@dataclass
class Equivalent:
    name: str
    fingerprint: str  # the mutant's "+" line(s), whitespace-collapsed
    reason: str


@dataclass
class ModuleScore:
    module: str
    statuses: dict[str, str] = field(default_factory=dict)  # mutant -> status


def load_equivalents(path: Path) -> dict[str, Equivalent]:
    """``name<TAB>fingerprint<TAB>reason`` per line; ``#`` starts a comment line."""
    out: dict[str, Equivalent] = {}
    if not path.is_file():
        return out
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        parts = raw.split("\t")
        if len(parts) != 3:
            raise SystemExit(f"mutation: {path}:{n}: expected name<TAB>fingerprint<TAB>reason")
        out[parts[0]] = Equivalent(*parts)
    return out


def fingerprint(diff: str) -> str:
    added = [ln[1:] for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return " | ".join(" ".join(ln.split()) for ln in added)


def report(stage_dir: Path, equivalents_path: Path, modules: list[str], patterns: list[str] | None = None) -> int:
    sys.path.insert(0, str(stage_dir))
    import os

    os.chdir(stage_dir)
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    equivalents = load_equivalents(equivalents_path)
    scores: list[ModuleScore] = []
    diffs: dict[str, str] = {}
    for module in modules:
        meta = Path("mutants") / (staged_path(module) + ".meta")
        score = ModuleScore(module)
        if meta.is_file():
            data = json.loads(meta.read_text(encoding="utf-8"))
            for name, code in data["exit_code_by_key"].items():
                if patterns and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
                    continue  # a function the run was not restricted to
                score.statuses[name] = status_by_exit_code[code]
        scores.append(score)
        for name, status in score.statuses.items():
            if status != "killed" and status != "timeout":
                diffs[name] = get_diff_for_mutant(name, path=staged_path(module))

    survivors_file = Path("mutants") / "survivors.txt"
    stale: list[str] = []
    with open(survivors_file, "w", encoding="utf-8") as fh:
        for name, diff in diffs.items():
            eq = equivalents.get(name)
            tag = ""
            if eq is not None:
                tag = "  [equivalent]" if eq.fingerprint == fingerprint(diff) else "  [listed as equivalent, but the mutant changed: re-argue]"
            fh.write(f"### {name}{tag}\n{diff}\n\n")

    all_names = {n for s in scores for n in s.statuses}
    print()
    print(f"{'module':34} {'mutants':>7} {'killed':>6} {'equiv':>5} {'alive':>5} {'score':>7}")
    worst = 100.0
    for s in scores:
        total = len(s.statuses)
        killed = sum(1 for st in s.statuses.values() if st in ("killed", "timeout"))
        equiv = 0
        for name, st in s.statuses.items():
            eq = equivalents.get(name)
            if st in ("killed", "timeout") or eq is None:
                continue
            if eq.fingerprint == fingerprint(diffs[name]):
                equiv += 1
            else:
                stale.append(f"{name}: fingerprint differs (the module changed): re-argue or drop it")
        alive = total - killed - equiv
        denominator = total - equiv
        pct = 100.0 * killed / denominator if denominator else 100.0
        worst = min(worst, pct)
        print(f"{s.module:34} {total:7d} {killed:6d} {equiv:5d} {alive:5d} {pct:6.1f}%")
        other = sorted({st for st in s.statuses.values()} - {"killed", "timeout", "survived"})
        for st in other:
            print(f"{'':34} ({sum(1 for v in s.statuses.values() if v == st)} {st})")
    for name, eq in equivalents.items():
        if any(name.startswith(dotted(m) + ".") for m in modules) and (
                not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)):
            if name not in all_names:
                stale.append(f"{name}: listed as equivalent, but no such mutant now (the module changed)")
            elif name not in diffs:
                moved = [n for n, d in diffs.items() if fingerprint(d) == eq.fingerprint and n not in equivalents]
                stale.append(f"{name}: listed as equivalent, but killed now"
                             + (f" (renumbered? the same change survives as {', '.join(moved)})" if moved else
                                ": drop it from the list"))
    print()
    print("score = killed / (mutants - equivalent); 'alive' = survived, untested or not checked")
    print(f"every mutant that is not killed, with its diff: {stage_dir / survivors_file}")
    for line in stale:
        print(f"mutation: stale equivalent: {line}")
    return 0 if worst >= 90.0 else 1


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[1] == "stage":
        stage(Path(argv[2]).resolve(), argv[3:], Path(__file__).resolve().parent.parent)
        return 0
    if len(argv) >= 4 and argv[1] == "report":
        rest = argv[4:]
        modules, patterns = (rest[:rest.index("--")], rest[rest.index("--") + 1:]) if "--" in rest else (rest, [])
        return report(Path(argv[2]).resolve(), Path(argv[3]).resolve(), modules, patterns)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
