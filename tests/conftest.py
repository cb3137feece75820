"""Shared fixtures: seeded random generators and plugin managers built from test entry points."""

from __future__ import annotations

import importlib.metadata
import os
import textwrap

import torch

if not torch.cuda.is_available():
    # Kernel tests run Triton's interpreter on CPU. Triton reads this when it is imported and when a
    # kernel is decorated, and other libraries (transformers, peft) may import it first: set it here,
    # before any test module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from loraserve.plugin_manager import PluginManager


@pytest.fixture(autouse=True)
def _free_gpu_memory_after_gpu_tests(request):
    """An engine sized by the memory budget takes most of the GPU; the next GPU test's engine fits only
    once the last one is collected (its engine thread's closures form reference cycles)."""
    yield
    if request.node.get_closest_marker("gpu") is not None and torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A directory on sys.path where a test writes plugin modules; returns a writer function."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(module: str, source: str) -> importlib.metadata.EntryPoint:
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        return importlib.metadata.EntryPoint(name=module, value=module, group="loraserve")

    return write


@pytest.fixture
def installed_entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group="loraserve"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A saved tiny random Llama (no tokenizer) for tests that need an engine but no oracle."""
    from lora_utils import tiny_llama_config, tiny_model

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model(tiny_llama_config(), seed=0).save_pretrained(path)
    return str(path)


def make_manager(entry_points, **kwargs) -> PluginManager:
    return PluginManager(entry_points=entry_points, **kwargs).load()
