"""The documentation that must match the code: hooks documented and typed against the contract, and
the generated blocks of the README and docs/plugins.md in step (``python scripts/docgen.py``)."""

from __future__ import annotations

import importlib.util
import inspect
import typing
from pathlib import Path

import pytest

from loraserve import contract, hookspecs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def docgen():
    spec = importlib.util.spec_from_file_location("docgen", ROOT / "scripts" / "docgen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_hookspec_documents_when_parameters_and_return(docgen):
    hooks = docgen.hook_functions()
    assert len(hooks) >= 12
    for fn in hooks:
        doc = inspect.getdoc(fn) or ""
        assert "Called" in doc, f"{fn.__name__}: say when it is called"
        for param in inspect.signature(fn).parameters:
            assert f":param {param}:" in doc, f"{fn.__name__}: document parameter {param}"
        assert ":return:" in doc, f"{fn.__name__}: document the return value"


def test_hookspecs_are_typed_and_their_types_come_from_the_contract(docgen):
    namespace = {**vars(contract), **vars(typing)}
    for fn in docgen.hook_functions():
        hints = typing.get_type_hints(fn, globalns=namespace)
        params = inspect.signature(fn).parameters
        missing = [p for p in params if p not in hints]
        assert not missing and "return" in hints, f"{fn.__name__}: annotate {missing or 'the return'}"
        if "register" in params and fn.__name__ != "loraserve_register_options":
            assert hints["register"] is contract.Register, fn.__name__


def test_register_hooks_name_contract_classes_that_exist(docgen):
    """Every ``loraserve.contract.X`` a hook's documentation names is defined there."""
    import re

    for fn in docgen.hook_functions():
        for name in re.findall(r"loraserve\.contract\.(\w+)", inspect.getdoc(fn) or ""):
            assert hasattr(contract, name), f"{fn.__name__} names loraserve.contract.{name}, which does not exist"


@pytest.mark.parametrize("path", ["README.md", "docs/plugins.md"])
def test_generated_blocks_are_in_step_with_the_code(docgen, path):
    text = (ROOT / path).read_text()
    for block in docgen.FILES[path]:
        current = docgen.extract(text, block)
        assert current is not None, f"{path} lacks the {block} block markers"
        assert current == docgen.render(block), f"{path}: the {block} block is stale; run `python scripts/docgen.py`"


def test_the_contract_documents_every_class_and_the_readme_lists_them(docgen):
    classes = docgen.contract_classes()
    names = {c.__name__ for c in classes}
    assert {
        "LoRABackend",
        "LoRABatchInfo",
        "LoRAEpilogue",
        "EvictionPolicy",
        "AdapterLoader",
        "AdapterResolver",
        "AttentionBackend",
        "PluginOptions",
        "FrontendFactory",
        "EngineClient",
    } <= names
    readme = (ROOT / "README.md").read_text()
    for cls in classes:
        assert len(inspect.getdoc(cls) or "") > 40, f"{cls.__name__}: state the contract in the docstring"
        assert f"`{cls.__name__}`" in readme, f"README's contract table lacks {cls.__name__}"
    for name in dir(hookspecs):
        if name.startswith("loraserve_"):
            assert f"`{name}(" in readme, f"README's hook reference lacks {name}"
