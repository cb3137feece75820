"""The ``loraserve`` command: --help choices from the registries, ``plugins`` JSON, the example plugin."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loraserve.cli import main

ROOT = Path(__file__).resolve().parents[1]
BUILTIN_DIRS = sorted(p.parent.name for p in (ROOT / "plugins").glob("*/__init__.py"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraserve.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_backends_and_eviction_policies_from_entry_points():
    out = run_cli("--help")
    assert out.returncode == 0, out.stderr
    backend_line = next(line for line in out.stdout.splitlines() if "--lora-backend {" in line)
    eviction_line = next(line for line in out.stdout.splitlines() if "--lora-eviction-policy {" in line)
    for name in ("torch", "triton", "csgmv"):
        assert name in backend_line
    for name in ("lru", "fifo"):
        assert name in eviction_line


def test_plugins_all_lists_every_builtin_package(capsys):
    assert main(["plugins", "--all"]) == 0
    rows = json.loads(capsys.readouterr().out)
    modules = {row["module"]: row for row in rows}
    for name in BUILTIN_DIRS:
        row = modules[f"loraserve.plugins.{name}"]
        # a resolver registers only when its flag names where to look
        gated = name.startswith("resolver_") and "loraserve_register_options" in row["hooks"]
        assert row["status"] == "loaded" and row["hooks"] and (row["registered"] or gated), row


def test_plugins_external_hides_builtins(capsys):
    assert main(["plugins", "--external"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(not row["builtin"] for row in rows)


def test_bad_flag_value_exits_with_a_message(capsys):
    assert main(["--max-loaded-loras", "2", "--max-loras-per-batch", "4"]) == 2
    err = capsys.readouterr().err
    assert "--max-loaded-loras (2) must be at least --max-loras-per-batch (4)" in err


# -- the third-party example plugin (installed by `make test` / .ci/run) ------------------------

example = pytest.importorskip("loraserve_example", reason="install examples/loraserve-example-plugin")


def test_example_plugin_is_listed(capsys):
    assert main(["plugins"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    row = rows["example"]
    assert row["distribution"] == "loraserve-example-plugin" and not row["builtin"]
    assert row["registered"] == {"backends": ["einsum"], "eviction_policies": ["lfu"]}


def test_example_plugin_is_selectable_and_builds_an_engine(installed_entry_points, tiny_model_dir):
    from conftest import make_manager

    from loraserve.cli import parse_settings
    from loraserve.engine.engine import Engine
    from loraserve_example.backend import EinsumLoRABackend
    from loraserve_example.lfu import LFUPolicy

    pm = make_manager(installed_entry_points)
    settings = parse_settings(
        [
            "--backend",
            "einsum",
            "--eviction",
            "lfu",
            "--device",
            "cpu",
            "--enable-lora",
            "--max-lora-rank",
            "8",
            "--model-path",
            tiny_model_dir,
            "--max-total-tokens",
            "256",
        ],
        pm,
    )
    engine = Engine(settings, pm)
    assert isinstance(engine.lora.backend, EinsumLoRABackend)
    assert isinstance(engine.lora.pool.policy, LFUPolicy) and isinstance(engine.lora.host.policy, LFUPolicy)


def test_example_plugin_can_be_disabled():
    out = run_cli("--disable-plugin", "example", "--help")
    assert out.returncode == 0, out.stderr
    backend_line = next(line for line in out.stdout.splitlines() if "--lora-backend {" in line)
    assert "einsum" not in backend_line and "torch" in backend_line
    rejected = run_cli("--disable-plugin", "example", "--backend", "einsum")
    assert rejected.returncode == 2 and "einsum" in rejected.stderr and "invalid choice" in rejected.stderr
    listing = run_cli("plugins", "--disable-plugin", "example")
    rows = {row["name"]: row for row in json.loads(listing.stdout)}
    assert rows["example"]["status"] == "disabled" and rows["example"]["registered"] == {}


def test_example_plugin_option_is_shown_in_help_under_its_name():
    out = run_cli("--help")
    assert out.returncode == 0, out.stderr
    section = " ".join(out.stdout[out.stdout.index("plugin example:") :].split())
    assert "--einsum-priority EINSUM_PRIORITY" in section and "(default: -1)" in section
    assert "--einsum-priority" not in run_cli("--disable-plugin", "example", "--help").stdout


def test_example_backend_with_raised_priority_is_the_default(installed_entry_points, tiny_model_dir, monkeypatch):
    from conftest import make_manager

    from loraserve.cli import parse_settings
    from loraserve.engine.engine import Engine
    from loraserve_example.backend import EinsumLoRABackend

    argv = [
        "--device",
        "cpu",
        "--enable-lora",
        "--max-lora-rank",
        "8",
        "--model-path",
        tiny_model_dir,
        "--max-total-tokens",
        "256",
    ]
    pm = make_manager(installed_entry_points)
    engine = Engine(parse_settings(argv, pm), pm)
    assert engine.effective_settings()["lora_backend"] == "torch"  # -1 by default: chosen only by name
    pm = make_manager(installed_entry_points)
    engine = Engine(parse_settings([*argv, "--einsum-priority", "200"], pm), pm)
    assert isinstance(engine.lora.backend, EinsumLoRABackend)
    assert engine.effective_settings()["lora_backend"] == "einsum"
    monkeypatch.setenv("LORASERVE_EINSUM_PRIORITY", "150")  # the option's environment variable does the same
    pm = make_manager(installed_entry_points)
    assert isinstance(Engine(parse_settings(argv, pm), pm).lora.backend, EinsumLoRABackend)


def test_example_plugin_passes_the_conformance_kit(installed_entry_points):
    from conftest import make_manager

    from loraserve.testing import check_backend, check_eviction_policy

    pm = make_manager(installed_entry_points)
    check_backend(lambda device: pm.backends.create("einsum", None, device), device="cpu")
    check_eviction_policy(lambda: pm.eviction_policies.create("lfu"))
