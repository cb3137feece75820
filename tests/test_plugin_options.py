"""Plugin kinds beyond the registries of old: plugins' own options, priorities that pick defaults,
attention backends through a registry."""

from __future__ import annotations

import os

import pytest
from conftest import make_manager

from loraserve.cli import build_parser, parse_settings
from loraserve.errors import ConfigError, PluginError
from loraserve.settings import Settings

OPTIONS_PLUGIN = """
    from pydantic import Field
    from loraserve import hookimpl
    from loraserve.contract import PluginOptions

    class Opts(PluginOptions):
        '''Options of a test plugin.'''
        {field}: int = Field(7, description="a test option", ge=0)

    seen = []

    def make(settings=None, device="cpu", options=None):
        seen.append(options)
        from loraserve.plugins.backend_torch.backend import TorchLoRABackend
        return TorchLoRABackend(device)

    @hookimpl
    def loraserve_register_options(register):
        register(Opts)

    @hookimpl
    def loraserve_register_backends(register, options):
        register("{backend}", make, priority={{"cpu": options.{field}}})
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("LORASERVE_"):
            monkeypatch.delenv(key)


@pytest.fixture
def pm(installed_entry_points):
    return make_manager(installed_entry_points)


def test_csgmv_chunk_size_is_the_plugins_option_in_help_env_and_factory(pm, monkeypatch):
    help_text = build_parser(pm).format_help()
    section = help_text[help_text.index("plugin backend_csgmv:") :]
    assert "--max-lora-chunk-size {16,32,64,128}" in section
    assert "max_lora_chunk_size" not in Settings.model_fields  # not a core setting any more
    settings = parse_settings(["--max-lora-chunk-size", "64"], pm)
    assert settings.plugin_options == {"max_lora_chunk_size": 64}
    assert pm.backends.create("csgmv", settings, "cpu").max_chunk == 64
    monkeypatch.setenv("LORASERVE_MAX_LORA_CHUNK_SIZE", "32")
    assert pm.backends.create("csgmv", parse_settings([], pm), "cpu").max_chunk == 32
    assert pm.backends.create("csgmv", parse_settings(["--max-lora-chunk-size", "128"], pm), "cpu").max_chunk == 128


def test_bad_plugin_option_values_name_the_flag(pm, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--max-lora-chunk-size", "20"], pm)
    assert "{16,32,64,128}" in capsys.readouterr().err
    monkeypatch.setenv("LORASERVE_MAX_LORA_CHUNK_SIZE", "20")
    with pytest.raises(ConfigError, match=r"--max-lora-chunk-size \(env LORASERVE_MAX_LORA_CHUNK_SIZE\).*16, 32"):
        parse_settings([], pm)
    monkeypatch.delenv("LORASERVE_MAX_LORA_CHUNK_SIZE")
    with pytest.raises(ConfigError, match="unknown plugin option.*chunk_sise.*max_lora_chunk_size"):
        pm.configure({"max_lora_chunk_sise": 32})


def test_a_plugin_option_reaches_its_factories_and_its_register_hook(plugin_dir, installed_entry_points):
    ep = plugin_dir("optplug", OPTIONS_PLUGIN.format(field="optplug_level", backend="optbackend"))
    pm = make_manager([*installed_entry_points, ep])
    assert "--optplug-level OPTPLUG_LEVEL" in build_parser(pm).format_help()
    settings = parse_settings(["--optplug-level", "300"], pm)
    pm.backends.create("optbackend", settings, "cpu")
    import optplug

    assert optplug.seen[-1].optplug_level == 300
    assert pm.backends.default_for("cpu") == "optbackend"  # 300 beats backend_torch's 100
    pm.configure({"optplug_level": 3})
    assert pm.backends.default_for("cpu") == "torch"
    with pytest.raises(ConfigError, match="--optplug-level.*greater than or equal to 0"):
        pm.configure({"optplug_level": -1})


def test_an_option_clashing_with_a_core_flag_or_another_plugin_names_both(plugin_dir, installed_entry_points):
    clash_core = plugin_dir("clashcore", OPTIONS_PLUGIN.format(field="port", backend="b1"))
    with pytest.raises(PluginError, match="'clashcore'.*'port'.*core setting"):
        make_manager([*installed_entry_points, clash_core]).option_classes()
    one = plugin_dir("first", OPTIONS_PLUGIN.format(field="shared_knob", backend="b2"))
    two = plugin_dir("second", OPTIONS_PLUGIN.format(field="shared_knob", backend="b3"))
    with pytest.raises(PluginError, match="'shared_knob'.*'first'.*'second'"):
        make_manager([one, two]).option_classes()


def test_priorities_pick_the_default_per_device(pm):
    assert pm.backends.default_for("cuda") == "csgmv" and pm.backends.default_for("cpu") == "torch"
    assert pm.attention_backends.default_for("cuda") == "triton"
    assert pm.attention_backends.default_for("cpu") == "torch_native"
    with pytest.raises(ConfigError, match="no LoRA backend states a priority for device 'xpu'.*--lora-backend"):
        pm.backends.default_for("xpu")


def test_a_priority_that_is_not_a_mapping_of_ints_is_refused(plugin_dir):
    ep = plugin_dir(
        "badprio",
        """
        from loraserve import hookimpl

        @hookimpl
        def loraserve_register_backends(register):
            register("bp", lambda settings, device: None, priority={"cuda": "high"})
    """,
    )
    with pytest.raises(PluginError, match="'badprio'.*'bp'.*priority"):
        make_manager([ep]).backends


def test_attention_backends_come_from_the_registry(pm, capsys):
    assert sorted(pm.attention_backends.names()) == ["torch_native", "triton"]
    assert parse_settings(["--attention-backend", "torch_native"], pm).attention_backend == "torch_native"
    with pytest.raises(SystemExit):
        parse_settings(["--attention-backend", "flash"], pm)
    assert "torch_native" in capsys.readouterr().err
