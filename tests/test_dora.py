"""DoRA adapters against PEFT (the oracle): greedy tokens and log-probabilities of DoRA adapters of
two ranks and target sets (fused qkv / gate_up slices, o_proj, down_proj) equal PEFT's in one batch
with a plain LoRA adapter and base rows, on Llama and on Qwen2 (biased qkv); and the refusals
(other backends, tensor parallelism, compositions, DoRA on lm_head, magnitudes without use_dora)."""

from __future__ import annotations

import pytest
import torch
from lora_utils import make_peft_adapter, tiny_llama_config, tiny_model, write_adapter_dir
from peft import PeftModel
from test_multi_lora import GREEDY, NEW, assert_matches_peft, engine_with

from loraserve import hookimpl
from loraserve.contract import AdapterError
from loraserve.engine.engine import Engine, default_plugins
from loraserve.errors import UserError
from loraserve.lora.adapter import BaseModelShape
from loraserve.lora.dora import dora_refusal
from loraserve.plugins.backend_torch.backend import TorchLoRABackend
from loraserve.plugins.loader_peft.loader import PeftAdapterLoader
from loraserve.settings import make_settings

ADAPTERS = {
    # name: (r, alpha, targets, extra LoraConfig options)
    "dora_attn": (3, 6, ["q_proj", "v_proj", "o_proj"], {"use_dora": True}),
    "dora_mlp": (5, 10, ["gate_proj", "up_proj", "down_proj", "k_proj"], {"use_dora": True, "use_rslora": True}),
    "plain": (4, 8, ["q_proj", "k_proj", "down_proj"], {}),
}
ROWS = ["dora_attn", "plain", None, "dora_mlp", "dora_attn", None]


def _case(base_model, root):
    """Save the base and the adapters; returns (base_dir, paths, PEFT model holding every adapter)."""
    base_model.generation_config.eos_token_id = None
    base_model.save_pretrained(root / "base")
    paths = {}
    for i, (name, (r, alpha, targets, extra)) in enumerate(ADAPTERS.items()):
        paths[name] = str(
            make_peft_adapter(
                base_model, root / name, r=r, lora_alpha=alpha, target_modules=targets, seed=40 + i, **extra
            )
        )
    peft = PeftModel.from_pretrained(base_model, paths["dora_attn"], adapter_name="dora_attn")
    for name in list(paths)[1:]:
        peft.load_adapter(paths[name], adapter_name=name)
    return str(root / "base"), paths, peft.eval()


def peft_rows(peft, batch: list[list[int]], adapters: list[str | None]) -> tuple[list, list]:
    """PEFT's greedy outputs row by row, one adapter at a time (PEFT refuses mixed batches with DoRA)."""
    tokens, logprobs = [None] * len(batch), [None] * len(batch)
    for name in dict.fromkeys(adapters):
        rows = [i for i, a in enumerate(adapters) if a == name]
        if name is None:
            with peft.disable_adapter():
                t, lp = _generate(peft, [batch[i] for i in rows])
        else:
            peft.set_adapter(name)
            t, lp = _generate(peft, [batch[i] for i in rows])
        for j, i in enumerate(rows):
            tokens[i], logprobs[i] = t[j], lp[j]
    return tokens, logprobs


def _generate(peft, batch: list[list[int]]) -> tuple[list, list]:
    """PEFT's greedy generate with its active adapter (equal-length prompts: no padding)."""
    ids = torch.tensor(batch)
    out = peft.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=NEW,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    n = len(batch[0])
    tokens = out.sequences[:, n:].tolist()
    logprobs = [
        [torch.log_softmax(step[i].float(), -1)[t].item() for step, t in zip(out.logits, tokens[i])]
        for i in range(len(batch))
    ]
    return tokens, logprobs


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _case(tiny_model(tiny_llama_config(), seed=0), tmp_path_factory.mktemp("dora-llama"))


@pytest.fixture(scope="module")
def llama_engine(llama):
    base, paths, _ = llama
    engine = engine_with(base, paths)
    yield engine
    engine.shutdown()


def _check_mixed_batch(engine, peft, vocab: int, label: str) -> None:
    gen = torch.Generator().manual_seed(5)
    batch = torch.randint(0, vocab, (len(ROWS), 5), generator=gen).tolist()
    expected, expected_lp = peft_rows(peft, batch, ROWS)
    results = engine.generate(input_ids=batch, sampling_params=GREEDY, lora_path=ROWS)
    assert_matches_peft(results, expected, expected_lp, ROWS, label)
    assert len({tuple(r["output_ids"]) for r in results[:4]}) == 4  # the adapters really differ


def test_dora_in_a_mixed_batch_matches_peft(llama, llama_engine):
    _, _, peft = llama
    _check_mixed_batch(llama_engine, peft, 256, "llama")
    llama_engine.lora.check_integrity()


def test_the_scale_is_not_one(llama_engine):
    """The magnitudes are random, so the scale is far from 1 (a test with scale 1 could not fail)."""
    ref = llama_engine.lora.registry.get("dora_attn")
    adapter = llama_engine.lora.read_adapter(ref.name, ref.source)
    scale = adapter.dora_scales[(0, "qkv_proj")]
    q, kv = llama_engine.lora.shape.q_size, llama_engine.lora.shape.kv_size
    assert (scale[:q] - 1).abs().max() > 0.5 and (scale[q + kv :] - 1).abs().max() > 0.5
    assert torch.equal(scale[q : q + kv], torch.ones(kv))  # k_proj has no DoRA in this adapter


def test_dora_on_qwen2_with_biased_qkv_matches_peft(tmp_path):
    from test_models import make_config, make_hf

    hf = make_hf(make_config("qwen2"))
    base, paths, peft = _case(hf, tmp_path)
    engine = engine_with(base, paths)
    try:
        _check_mixed_batch(engine, peft, hf.config.vocab_size, "qwen2")
    finally:
        engine.shutdown()


def test_a_composition_with_a_dora_adapter_is_refused(llama_engine):
    with pytest.raises(UserError, match=r"DoRA adapter\(s\) 'dora_attn'.*compose plain LoRA adapters only"):
        llama_engine.generate(input_ids=[1, 2, 3], sampling_params=GREEDY, lora_path="dora_attn*0.5+plain*0.5")


class _NoDoraBackend(TorchLoRABackend):
    name = "nodora"
    supports_dora = False


class _NoDoraPlugin:
    @hookimpl
    def loraserve_register_backends(self, register):
        register("nodora", lambda settings=None, device="cpu": _NoDoraBackend(device))


def test_backends_without_dora_and_tensor_parallelism_refuse_it(llama):
    base, paths, _ = llama
    settings = make_settings(
        model_path=base,
        device="cpu",
        max_total_tokens=1024,
        lora_backend="nodora",
        enable_lora=True,
        max_lora_rank=8,
        lora_target_modules=["all"],
    )
    plugins = default_plugins(settings)
    plugins.register(_NoDoraPlugin(), name="nodora")
    engine = Engine(settings, plugins)
    try:
        with pytest.raises(UserError, match=r"'dora_attn' is a DoRA adapter: .*need --lora-backend torch for now"):
            engine.load_adapter("dora_attn", paths["dora_attn"])
        engine.load_adapter("plain", paths["plain"])  # plain LoRA is served as before
        assert [a["name"] for a in engine.lora.loaded_adapters()] == ["plain"]
    finally:
        engine.shutdown()
        plugins.unregister("nodora")
    assert "--tp-size > 1" in dora_refusal(TorchLoRABackend(), tensor_parallel=True)


def test_loader_refusals(tmp_path):
    shape = BaseModelShape.from_config(tiny_llama_config())
    loader = PeftAdapterLoader()
    on_head = write_adapter_dir(tmp_path / "head", {"target_modules": ["q_proj", "lm_head"], "use_dora": True}, {})
    with pytest.raises(AdapterError, match="DoRA is served on the layer projections"):
        loader.load(str(on_head), name="h", shape=shape)
    cfg = {"target_modules": ["q_proj"], "layers_to_transform": [0], "r": 2}
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{prefix}.lora_A.weight": torch.randn(2, shape.hidden_size),
        f"{prefix}.lora_B.weight": torch.randn(shape.q_size, 2),
        f"{prefix}.lora_magnitude_vector": torch.randn(shape.q_size),
    }
    stray = write_adapter_dir(tmp_path / "stray", cfg, tensors)
    with pytest.raises(AdapterError, match="DoRA magnitude but .* does not set use_dora"):
        loader.load(str(stray), name="s", shape=shape)
    short = write_adapter_dir(
        tmp_path / "short", {**cfg, "use_dora": True}, {**tensors, f"{prefix}.lora_magnitude_vector": torch.randn(3)}
    )
    with pytest.raises(AdapterError, match=r"shape \(3,\).*DoRA magnitude"):
        loader.load(str(short), name="t", shape=shape)
    del tensors[f"{prefix}.lora_magnitude_vector"]
    missing = write_adapter_dir(tmp_path / "missing", {**cfg, "use_dora": True}, tensors)
    with pytest.raises(AdapterError, match="no lora_magnitude_vector tensor"):
        loader.load(str(missing), name="m", shape=shape)
