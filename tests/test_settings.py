"""Settings: SGLang flag names and defaults, env vars, CLI precedence, and start-up validation."""

from __future__ import annotations

import pytest
from conftest import make_manager

from loraserve.cli import build_parser, parse_settings
from loraserve.errors import ConfigError, NotSupportedYet
from loraserve.lora.targets import LAYER_MODULES
from loraserve.settings import Settings, make_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("LORASERVE_"):
            monkeypatch.delenv(key)


@pytest.fixture
def pm(installed_entry_points):
    return make_manager(installed_entry_points)


def test_defaults_follow_sglang():
    s = Settings()
    assert (s.max_loras_per_batch, s.lora_eviction_policy, s.port, s.tp_size) == (8, "lru", 30000, 1)
    assert s.max_loaded_loras is None and s.max_lora_rank is None and not s.enable_lora_overlap_loading
    assert s.lora_backend is None and s.attention_backend is None  # chosen by the registries' priorities


def test_every_sglang_flag_exists(pm):
    flags = set(build_parser(pm).format_help().replace(",", " ").split())
    for flag in [
        "--model-path",
        "--tokenizer-path",
        "--load-format",
        "--dtype",
        "--device",
        "--host",
        "--port",
        "--api-key",
        "--enable-lora",
        "--lora-paths",
        "--max-loras-per-batch",
        "--max-loaded-loras",
        "--max-lora-rank",
        "--lora-target-modules",
        "--lora-backend",
        "--backend",
        "--lora-eviction-policy",
        "--eviction",
        "--max-lora-chunk-size",
        "--enable-lora-overlap-loading",
        "--tp-size",
        "--max-running-requests",
        "--cuda-graph-max-bs",
        "--disable-cuda-graph",
        "--log-level",
        "--disable-plugin",
    ]:
        assert flag in flags, flag


def test_env_vars_and_cli_precedence(pm, monkeypatch):
    monkeypatch.setenv("LORASERVE_MAX_LORAS_PER_BATCH", "4")
    monkeypatch.setenv("LORASERVE_LORA_EVICTION_POLICY", "fifo")
    assert parse_settings([], pm).max_loras_per_batch == 4
    s = parse_settings(["--max-loras-per-batch", "6", "--eviction", "lru"], pm)
    assert s.max_loras_per_batch == 6 and s.lora_eviction_policy == "lru"
    monkeypatch.setenv("LORASERVE_PLUGINS", "backend_torch, eviction_lru")
    assert Settings().plugins == ["backend_torch", "eviction_lru"]


def test_short_forms_of_backend_and_eviction(pm):
    s = parse_settings(["--backend", "torch", "--eviction", "fifo"], pm)
    assert s.lora_backend == "torch" and s.lora_eviction_policy == "fifo"


def test_lora_paths_three_formats(pm):
    s = parse_settings(
        ["--lora-paths", "/a/one", "two=/b/two", '{"lora_name": "three", "lora_path": "/c/three", "pinned": true}'], pm
    )
    specs = [(p.lora_name, p.lora_path, p.pinned) for p in s.lora_paths]
    assert specs == [("/a/one", "/a/one", False), ("two", "/b/two", False), ("three", "/c/three", True)]
    assert s.lora_enabled


def test_lora_paths_from_env_as_json_list(monkeypatch):
    monkeypatch.setenv("LORASERVE_LORA_PATHS", '["x=/p/x", {"lora_name": "y", "lora_path": "/p/y"}]')
    assert [p.lora_name for p in Settings().lora_paths] == ["x", "y"]


def test_target_modules_all_expands():
    assert make_settings(lora_target_modules=["all"]).lora_target_modules == list(LAYER_MODULES)
    assert make_settings(lora_target_modules="q_proj,v_proj").lora_target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "argv, must_say",
    [
        (["--max-loaded-loras", "4", "--max-loras-per-batch", "8"], ["--max-loaded-loras", "--max-loras-per-batch"]),
        (
            [
                "--max-loras-per-batch",
                "2",
                "--lora-paths",
                '{"lora_name":"a","lora_path":"/a","pinned":true}',
                '{"lora_name":"b","lora_path":"/b","pinned":true}',
            ],
            ["pins 2", "at most --max-loras-per-batch - 1 = 1"],
        ),
        (["--lora-target-modules", "qkv"], ["--lora-target-modules", "qkv", "q_proj"]),
        (["--lora-paths", "a=/x", "a=/y"], ["more than once", "a"]),
        (["--lora-paths", "{bad json"], ["not valid JSON", "lora_name"]),
        (["--lora-paths", "=/x"], ["NAME=PATH"]),
        (["--port", "70000"], ["--port", "65535"]),
        (["--max-loras-per-batch", "0"], ["--max-loras-per-batch", "greater than or equal to 1"]),
    ],
)
def test_invalid_combinations_name_the_flag(pm, argv, must_say):
    with pytest.raises(ConfigError) as err:
        parse_settings(argv, pm)
    for text in must_say:
        assert text in str(err.value), (text, str(err.value))


def test_unknown_backend_is_rejected_with_the_choices(pm, capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--backend", "cutlass"], pm)
    err = capsys.readouterr().err
    assert "cutlass" in err and "torch" in err and "csgmv" in err


def test_unknown_backend_from_env_is_rejected_by_the_engine(installed_entry_points, monkeypatch, tiny_model_dir):
    from loraserve.engine.engine import Engine

    monkeypatch.setenv("LORASERVE_LORA_BACKEND", "cutlass")
    with pytest.raises(ConfigError) as err:
        Engine(Settings(model_path=tiny_model_dir), make_manager(installed_entry_points))
    assert "--lora-backend" in str(err.value) and "'cutlass'" in str(err.value) and "torch" in str(err.value)


def test_flags_not_landed_yet_fail_clearly(monkeypatch):
    # every flag has landed; the mechanism stays for the next one (and for plugins' flags)
    from loraserve import settings as settings_module

    monkeypatch.setitem(settings_module.NOT_SUPPORTED_YET, "--tp-size > 3", lambda s: s.tp_size > 3)
    with pytest.raises(NotSupportedYet) as err:
        make_settings(tp_size=4).check_supported()
    assert "--tp-size > 3 is not supported yet" in str(err.value)
    make_settings(tp_size=3).check_supported()


def test_overlap_loading_bounds_the_host_cache():
    # page-locked host copies: at most 2 x --max-loras-per-batch, checked at start-up with the numbers
    with pytest.raises(ConfigError) as err:
        make_settings(enable_lora_overlap_loading=True, max_loras_per_batch=4, max_loaded_loras=9)
    msg = str(err.value)
    assert "--max-loaded-loras (9)" in msg and "2 x --max-loras-per-batch = 8" in msg
    ok = make_settings(enable_lora_overlap_loading=True, max_loras_per_batch=4, max_loaded_loras=8)
    ok.check_supported()
    assert ok.host_cache_capacity == 8
    assert make_settings(enable_lora_overlap_loading=True, max_loras_per_batch=3).host_cache_capacity == 6
    assert make_settings(max_loras_per_batch=3).host_cache_capacity is None  # without the flag: unbounded
    assert make_settings(max_loras_per_batch=3, max_loaded_loras=20).host_cache_capacity == 20
    # a byte bound stands in for the count bound: thousands of adapters in page-locked memory
    gib = make_settings(enable_lora_overlap_loading=True, max_loras_per_batch=4, max_loaded_lora_gib=32)
    assert gib.host_cache_capacity is None
    both = dict(enable_lora_overlap_loading=True, max_loras_per_batch=4, max_loaded_lora_gib=32, max_loaded_loras=900)
    assert make_settings(**both).host_cache_capacity == 900


def test_bad_value_names_the_flag_and_the_value():
    with pytest.raises(ConfigError) as err:
        make_settings(max_loras_per_batch="many")
    assert "--max-loras-per-batch" in str(err.value) and "many" in str(err.value)
