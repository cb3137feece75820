"""Packaging and layout rules: every subpackage ships in the wheel, every built-in plugin is an entry
point, nothing imports ``core`` or ``plugins`` by their directory names, hookspecs are documented."""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path

from loraserve import docgen, hookspecs

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


def test_every_hookspec_documents_when_parameters_and_return():
    hooks = docgen.hook_functions()
    assert len(hooks) >= 10
    for fn in hooks:
        doc = inspect.getdoc(fn) or ""
        assert "Called" in doc, f"{fn.__name__}: say when it is called"
        for param in inspect.signature(fn).parameters:
            assert f":param {param}:" in doc, f"{fn.__name__}: document parameter {param}"
        assert ":return:" in doc, f"{fn.__name__}: document the return value"


def test_readme_generated_blocks_are_in_step_with_the_code():
    readme = (ROOT / "README.md").read_text()
    for block in docgen.RENDERERS:
        current = docgen.extract(readme, block)
        assert current is not None, f"README lacks the {block} block markers"
        assert current == docgen.render(block), f"README {block} block is stale: run `python -m loraserve.docgen README.md`"
    hooks = docgen.extract(readme, docgen.HOOKS)
    for name in (n for n in dir(hookspecs) if n.startswith("loraserve_")):
        assert f"`{name}(" in hooks


def test_every_module_has_a_docstring_and_future_annotations():
    for path in [*ROOT.glob("core/**/*.py"), *ROOT.glob("plugins/**/*.py")]:
        text = path.read_text()
        assert text.lstrip().startswith('"""'), f"{path}: start with a module docstring"
        if path.name != "__init__.py" or "import" in text:
            assert "from __future__ import annotations" in text, f"{path}: add `from __future__ import annotations`"
