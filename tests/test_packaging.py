"""Packaging and layout rules: every subpackage ships in the wheel, every built-in plugin is an entry
point, nothing imports ``core`` or ``plugins`` by their directory names (the documentation checks are in
test_docs.py)."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _packages_on_disk() -> set[str]:
    found = set()
    for top, name in (("core", "loraserve"), ("plugins", "loraserve.plugins")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    return found


def test_every_subpackage_is_listed_for_the_wheel():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert _packages_on_disk() == listed


def test_every_builtin_plugin_is_an_entry_point():
    eps = PYPROJECT["project"]["entry-points"]["loraserve"]
    dirs = {p.parent.name for p in (ROOT / "plugins").glob("*/__init__.py")}
    assert {v.removeprefix("loraserve.plugins.") for v in eps.values()} == dirs
    assert all(name == value.rsplit(".", 1)[1] for name, value in eps.items())


def test_no_module_imports_core_or_plugins_by_directory_name():
    bad = re.compile(r"^\s*(from|import)\s+(core|plugins)(\.|\s|$)", re.M)
    for path in [*ROOT.glob("core/**/*.py"), *ROOT.glob("plugins/**/*.py"), *ROOT.glob("tests/**/*.py")]:
        assert not bad.search(path.read_text()), f"{path} imports core/plugins directly; use loraserve"


def test_every_module_has_a_docstring_and_future_annotations():
    for path in [*ROOT.glob("core/**/*.py"), *ROOT.glob("plugins/**/*.py")]:
        text = path.read_text()
        assert text.lstrip().startswith('"""'), f"{path}: start with a module docstring"
        if path.name != "__init__.py" or "import" in text:
            assert "from __future__ import annotations" in text, f"{path}: add `from __future__ import annotations`"


MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60
SIZE_NOTE = "# size:"  # a comment saying why a file or function is longer


def test_files_and_functions_stay_small_or_say_why():
    import ast

    too_long = []
    for path in sorted([*ROOT.glob("core/**/*.py"), *ROOT.glob("plugins/**/*.py")]):
        text = path.read_text()
        lines = text.splitlines()
        if len(lines) > MAX_FILE_LINES and not any(line.startswith(SIZE_NOTE) for line in lines[:60]):
            too_long.append(f"{path.relative_to(ROOT)}: {len(lines)} lines")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            kernel = any("jit" in ast.unparse(d) for d in node.decorator_list)
            if length > MAX_FUNCTION_LINES and not kernel and not lines[first - 2].strip().startswith(SIZE_NOTE):
                too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}(): {length} lines")
    assert not too_long, "split these, or put a '# size: why' comment above them:\n" + "\n".join(too_long)
