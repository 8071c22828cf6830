"""The house in numbers: files, lines, the largest file, duplicate pairs, import cycles, imports
against the stage order, and public names without a docstring (issue 14's before/after table).

    python bench/house.py            # table on stdout
    python bench/house.py --json     # the same as JSON

Modules are found through pyproject.toml's ``package-dir`` (``calib/`` is ``flarc.calib``).
Imports are read with ``ast`` (function-level imports included). The stage order is
core < calib < rewrite < latency < export < front door (``flarc`` itself): a module may import
its own stage or an earlier one. Duplicates come from the ``duplicates`` tool when it is on PATH.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("flarc.core", "flarc.calib", "flarc.rewrite", "flarc.latency", "flarc.export")


def modules(root: Path) -> dict[str, Path]:
    """Module name -> file, from pyproject's package-dir mapping."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    dirs = config["tool"]["setuptools"]["package-dir"]
    out = {}
    for package, folder in dirs.items():
        for path in sorted((root / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = path
    for path in sorted((root / "flarc").rglob("*.py")):  # subpackages not in package-dir
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.setdefault(".".join(parts), path)
    return out


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """flarc modules imported anywhere in ``path`` (resolved to the longest known module)."""
    tree = ast.parse(path.read_text())
    found = set()
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def stage_of(module: str) -> int:
    """Index in STAGES, or len(STAGES) for the front door (the rest of ``flarc``)."""
    for i, stage in enumerate(STAGES):
        if module == stage or module.startswith(stage + "."):
            return i
    return len(STAGES)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def documented_methods(paths: list[Path]) -> dict[str, set[str]]:
    """Class name -> its methods that have a docstring, over all ``paths``."""
    out: dict[str, set[str]] = {}
    for path in paths:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                out.setdefault(node.name, set()).update(
                    item.name
                    for item in node.body
                    if isinstance(item, ast.FunctionDef) and ast.get_docstring(item) is not None
                )
    return out


def undocumented(path: Path, inherited: dict[str, set[str]]) -> list[str]:
    """Public module-level functions and classes, and public methods of public classes, with no
    docstring; properties, dunder methods and overrides of a documented method of a base class
    (whose docstring ``help()`` shows) excepted."""
    tree = ast.parse(path.read_text())
    missing = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node.name.startswith("_"):
                continue
            if ast.get_docstring(node) is None:
                missing.append(node.name)
            if isinstance(node, ast.ClassDef):
                bases = {b.id for b in node.bases if isinstance(b, ast.Name)}
                from_bases = set().union(*(inherited.get(b, set()) for b in bases))
                for item in node.body:
                    if (
                        isinstance(item, ast.FunctionDef)
                        and not item.name.startswith("_")
                        and item.name not in from_bases
                        and not any(
                            isinstance(d, ast.Name) and d.id in ("property", "staticmethod")
                            for d in item.decorator_list
                        )
                        and ast.get_docstring(item) is None
                    ):
                        missing.append(f"{node.name}.{item.name}")
    return missing


def duplicate_pairs(root: Path) -> dict:
    """``duplicates`` over the tree: pairs in all, and pairs with no side under tests/."""
    if shutil.which("duplicates") is None:
        return {"all": None, "outside_tests": None, "rows": []}
    text = subprocess.run(
        ["duplicates", "--most", "200", "--seconds", "120"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    rows = [line for line in text.splitlines() if re.match(r"D\d+ ", line)]
    outside = [r for r in rows if not re.search(r"\btests/", r)]
    return {"all": len(rows), "outside_tests": len(outside), "rows": outside}


def measure(root: Path) -> dict:
    mods = modules(root)
    known = set(mods)
    graph = {name: imports_of(path, name, known) for name, path in mods.items()}
    against = sorted(
        f"{a} -> {b}" for a, deps in graph.items() for b in deps if stage_of(b) > stage_of(a)
    )
    library = {name: path for name, path in mods.items()}
    lines = {name: len(path.read_text().splitlines()) for name, path in library.items()}
    largest = max(lines, key=lines.get)
    tests = sorted((root / "tests").glob("*.py"))
    bench = sorted((root / "bench").glob("*.py"))
    inherited = documented_methods(list(library.values()))
    missing = {name: undocumented(path, inherited) for name, path in library.items()}
    folders: dict[str, int] = defaultdict(int)
    for path in library.values():
        folders[str(path.parent.relative_to(root))] += 1
    return {
        "library_files": len(library),
        "library_lines": sum(lines.values()),
        "largest_file": f"{library[largest].relative_to(root)} ({lines[largest]} lines)",
        "files_per_folder": dict(sorted(folders.items())),
        "test_files": len(tests),
        "test_lines": sum(len(p.read_text().splitlines()) for p in tests),
        "bench_files": len(bench),
        "bench_lines": sum(len(p.read_text().splitlines()) for p in bench),
        "import_cycles": cycles(graph),
        "imports_against_stage_order": against,
        "undocumented_public_names": sum(len(v) for v in missing.values()),
        "undocumented": {k: v for k, v in missing.items() if v},
        "duplicates": duplicate_pairs(root),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON")
    ap.add_argument("--root", type=Path, default=ROOT, help="repository root")
    args = ap.parse_args()
    m = measure(args.root)
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    dup = m["duplicates"]
    rows = [
        ("library files", m["library_files"]),
        ("library lines", m["library_lines"]),
        ("largest file", m["largest_file"]),
        ("test files / lines", f"{m['test_files']} / {m['test_lines']}"),
        ("bench files / lines", f"{m['bench_files']} / {m['bench_lines']}"),
        ("duplicate pairs (all / outside tests)", f"{dup['all']} / {dup['outside_tests']}"),
        ("import cycles", len(m["import_cycles"])),
        ("imports against the stage order", len(m["imports_against_stage_order"])),
        ("public names without docstrings", m["undocumented_public_names"]),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for c in m["import_cycles"]:
        print("cycle:", " <-> ".join(c))
    for a in m["imports_against_stage_order"]:
        print("against the order:", a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
