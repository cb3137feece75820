"""The import graph of the ``loraserve`` package, read from the source (nothing is imported).

Prints the number of modules, the imports between them (module-level and inside functions counted
apart), the strongly connected components of the module-level graph (import cycles), and with
``--json`` the whole graph. ``core/`` is ``loraserve`` and ``plugins/`` is ``loraserve.plugins``, as
pyproject.toml maps them. Used to compare layouts and by the tests to keep the package free of
module-level import cycles.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"loraserve": ROOT / "core", "loraserve.plugins": ROOT / "plugins"}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for prefix, base in PACKAGE_DIRS.items():
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts]) if parts else prefix
            if prefix == "loraserve" and parts and parts[0] == "plugins":
                continue  # not part of the package (plugins/ maps to loraserve.plugins)
            out[name] = path
    return out


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest known module that ``name`` is or lies in."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(module-level imports, imports inside functions) of ``module`` that are package modules."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    top, lazy = set(), set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                continue  # typing-only imports never run
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = module if is_pkg else module.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                targets = [f"{base}.{a.name}" for a in child.names] or [base]
            for t in targets:
                dep = _resolve(t, known)
                if dep is not None and dep != module:
                    (lazy if nested else top).add(dep)
            visit(child, nested)

    visit(tree, False)
    return top, lazy - top


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def graph() -> dict[str, dict]:
    mods = modules()
    known = set(mods)
    out = {}
    for name, path in mods.items():
        top, lazy = imports_of(name, path, known)
        # a package's own parent package is imported by Python anyway: not an edge worth counting
        out[name] = {"imports": sorted(top), "lazy_imports": sorted(lazy), "lines": len(path.read_text().splitlines())}
    return out


def summary(g: dict[str, dict]) -> dict:
    top = {m: set(v["imports"]) for m, v in g.items()}
    return {
        "modules": len(g),
        "imports": sum(len(v["imports"]) for v in g.values()),
        "lazy_imports": sum(len(v["lazy_imports"]) for v in g.values()),
        "cycles": cycles(top),
        "largest_modules": sorted(((v["lines"], m) for m, v in g.items()), reverse=True)[:5],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the whole graph as JSON")
    args = parser.parse_args()
    g = graph()
    if args.json:
        print(json.dumps(g, indent=1))
        return 0
    s = summary(g)
    print(
        f"modules: {s['modules']}  module-level imports between them: {s['imports']}  "
        f"imports inside functions: {s['lazy_imports']}  cycles: {len(s['cycles'])}"
    )
    for comp in s["cycles"]:
        print("  cycle: " + " <-> ".join(comp))
    print("largest: " + ", ".join(f"{m} ({n} lines)" for n, m in s["largest_modules"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
