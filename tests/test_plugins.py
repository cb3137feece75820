"""The plugin manager: discovery, failures, allow/deny lists, hook checking, conflicts, tracing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import make_manager

from loraserve import hookimpl
from loraserve.errors import ConfigError, PluginError
from loraserve.plugin_manager import PluginManager

ROOT = Path(__file__).resolve().parents[1]
BUILTIN_DIRS = sorted(p.parent.name for p in (ROOT / "plugins").glob("*/__init__.py"))


def test_every_builtin_plugin_is_found_through_entry_points(installed_entry_points):
    pm = make_manager(installed_entry_points)
    infos = {i.module: i for i in pm.plugin_infos()}
    for name in BUILTIN_DIRS:
        info = infos.get(f"loraserve.plugins.{name}")
        assert info is not None, f"plugins/{name} is not declared in the loraserve entry-point group"
        assert info.status == "loaded" and info.builtin and info.distribution == "loraserve"
    assert {"torch", "triton", "csgmv"} <= set(pm.backends.names())
    assert {"lru", "fifo"} <= set(pm.eviction_policies.names())


def test_broken_plugin_is_reported_by_name_and_others_keep_working(plugin_dir, installed_entry_points):
    broken = plugin_dir("broken_plugin", "raise RuntimeError('boom at import')\n")
    pm = make_manager([*installed_entry_points, broken])
    info = {i.name: i for i in pm.plugin_infos()}["broken_plugin"]
    assert info.status == "failed" and "boom at import" in info.error
    assert "torch" in pm.backends  # the rest still loaded
    described = {row["name"]: row for row in pm.describe()}
    assert described["broken_plugin"]["status"] == "failed"


def test_misspelled_hook_fails_loudly_naming_plugin_and_suggestion(plugin_dir):
    ep = plugin_dir(
        "typo_plugin",
        """
        from loraserve import hookimpl
        @hookimpl
        def loraserve_register_backend(register):
            register("x", object)
    """,
    )
    with pytest.raises(PluginError) as err:
        make_manager([ep])
    assert "typo_plugin" in str(err.value) and "loraserve_register_backends" in str(err.value)


def test_two_plugins_registering_one_name_is_an_error_naming_both(plugin_dir):
    eps = [
        plugin_dir(
            mod,
            """
        from loraserve import hookimpl
        @hookimpl
        def loraserve_register_backends(register):
            register("dup", lambda settings, device: None)
    """,
        )
        for mod in ("first_dup", "second_dup")
    ]
    pm = make_manager(eps)
    with pytest.raises(PluginError) as err:
        pm.backends
    assert "first_dup" in str(err.value) and "second_dup" in str(err.value) and "'dup'" in str(err.value)


def test_allow_list_and_deny_list(installed_entry_points):
    only = make_manager(installed_entry_points, allow=["backend_torch", "eviction_lru"])
    assert only.backends.names() == ["torch"] and only.eviction_policies.names() == ["lru"]
    status = {i.name: i.status for i in only.plugin_infos()}
    assert status["backend_triton"] == "disabled"

    deny = make_manager(installed_entry_points, deny=["eviction_fifo"])
    assert "fifo" not in deny.eviction_policies and "lru" in deny.eviction_policies
    with pytest.raises(ConfigError) as err:
        deny.eviction_policies.get("fifo")
    assert "lru" in str(err.value)  # the message lists what can be chosen


@pytest.mark.parametrize(
    "kwargs, option", [({"allow": ["nope"]}, "LORASERVE_PLUGINS"), ({"deny": ["nope"]}, "--disable-plugin")]
)
def test_unknown_plugin_names_in_allow_or_deny_list(installed_entry_points, kwargs, option):
    with pytest.raises(ConfigError) as err:
        make_manager(installed_entry_points, **kwargs)
    assert option in str(err.value) and "'nope'" in str(err.value) and "backend_torch" in str(err.value)


def test_entry_points_load_once(plugin_dir):
    ep = plugin_dir(
        "counting_plugin",
        """
        import builtins
        builtins.COUNT_LOADS = getattr(builtins, "COUNT_LOADS", 0) + 1
    """,
    )
    import builtins

    pm = PluginManager(entry_points=[ep])
    pm.load()
    pm.load()
    pm.backends
    assert builtins.COUNT_LOADS == 1
    del builtins.COUNT_LOADS


class _Observer:
    def __init__(self):
        self.seen = []

    @hookimpl
    def loraserve_adapter_loaded(self, name, version):
        self.seen.append((name, version))


class _FailingObserver:
    @hookimpl
    def loraserve_adapter_loaded(self, name):
        raise ValueError("observer bug")


@pytest.fixture
def registered_observers(installed_entry_points):
    pm = make_manager(installed_entry_points)
    good, bad = _Observer(), _FailingObserver()
    pm.register(bad, name="bad-observer")
    pm.register(good, name="good-observer")
    yield pm, good
    pm.unregister("good-observer")
    pm.unregister("bad-observer")


def test_observer_hooks_receive_events_and_failures_are_contained(registered_observers, caplog):
    pm, good = registered_observers
    with caplog.at_level(logging.ERROR, logger="loraserve.plugin_manager"):
        pm.notify("loraserve_adapter_loaded", name="a", version=3, source="/x", rank=8, pinned=False)
    assert good.seen == [("a", 3)]
    assert "bad-observer" in caplog.text and "observer bug" in caplog.text


def test_tracing_logs_every_hook_call(installed_entry_points, caplog):
    pm = make_manager(installed_entry_points, trace=True)
    with caplog.at_level(logging.INFO, logger="loraserve.plugin_manager"):
        pm.backends
    assert "loraserve_register_backends" in caplog.text and "backend_torch" in caplog.text


def test_plugin_registered_in_a_test_is_selectable_and_goes_away(installed_entry_points):
    pm = make_manager(installed_entry_points)

    class Extra:
        @hookimpl
        def loraserve_register_eviction_policies(self, register):
            register("never", lambda: None, description="test policy")

    pm.register(Extra(), name="extra")
    try:
        assert "never" in pm.eviction_policies
        row = {r["name"]: r for r in pm.describe()}["extra"]
        assert row["registered"] == {"eviction_policies": ["never"]}
    finally:
        pm.unregister("extra")
    assert "never" not in pm.eviction_policies


def test_register_hook_that_raises_names_the_plugin(plugin_dir):
    ep = plugin_dir(
        "raising_plugin",
        """
        from loraserve import hookimpl
        @hookimpl
        def loraserve_register_models(register):
            raise KeyError("no such arch")
    """,
    )
    pm = make_manager([ep])
    with pytest.raises(PluginError) as err:
        pm.models
    assert "raising_plugin" in str(err.value) and "loraserve_register_models" in str(err.value)


def test_loading_every_plugin_and_its_registrations_imports_no_torch():
    """Plugins register cheap factories: `loraserve --help` and `loraserve plugins` load every
    installed plugin, build every registry and read every option class without importing torch."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from loraserve.plugin_manager import REGISTRY_KINDS, PluginManager\n"
        "pm = PluginManager().load()\n"
        "pm.option_classes()\n"
        "[pm.registry(kind) for kind in REGISTRY_KINDS]\n"
        "print(sorted(m for m in ('torch', 'triton') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
