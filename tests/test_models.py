"""Our Llama-family model against Hugging Face transformers (the oracle), on tiny random configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from loraserve.errors import ConfigError
from loraserve.models.llama import LlamaForCausalLM

SMALL = dict(
    vocab_size=131,
    hidden_size=64,
    intermediate_size=88,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)


def make_config(family: str):
    if family == "llama":
        return LlamaConfig(**SMALL, rope_theta=10000.0)
    if family == "llama3":
        return LlamaConfig(
            **SMALL,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if family == "mistral":  # head_dim given explicitly and unequal to hidden / heads
        return MistralConfig(**{**SMALL, "num_key_value_heads": 1}, head_dim=32, sliding_window=4096)
    if family == "qwen2":
        return Qwen2Config(**SMALL)
    if family == "smollm2":
        return LlamaConfig(
            **{**SMALL, "num_attention_heads": 8, "num_key_value_heads": 8},
            tie_word_embeddings=True,
            rope_theta=100000.0,
        )
    raise ValueError(family)


FAMILIES = ("llama", "llama3", "mistral", "qwen2", "smollm2")


def make_hf(config, seed: int = 0):
    """An HF model with every parameter random (HF's init leaves biases at 0 and norms at 1)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)
    return model


def make_ours(hf, dtype=torch.float32) -> LlamaForCausalLM:
    ours = LlamaForCausalLM(hf.config, dtype=dtype, device="cpu")
    ours.load_weights(hf.state_dict().items())
    return ours


class DenseCausalAttention:
    """A dense causal attention context: sequences of the given lengths, concatenated."""

    def __init__(self, seq_lens):
        self.seq_lens = list(seq_lens)
        self.calls: list[int] = []

    def attention(self, layer_idx, q, k, v):
        self.calls.append(layer_idx)
        outs, start = [], 0
        groups = q.shape[1] // k.shape[1]
        for n in self.seq_lens:
            qs = q[start : start + n].transpose(0, 1)
            ks = k[start : start + n].transpose(0, 1).repeat_interleave(groups, dim=0)
            vs = v[start : start + n].transpose(0, 1).repeat_interleave(groups, dim=0)
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1))
            start += n
        return torch.cat(outs)


def our_logits(model, ids, positions=None):
    positions = torch.arange(ids.numel()) if positions is None else positions
    with torch.no_grad():
        return model.compute_logits(model(ids, positions, DenseCausalAttention([ids.numel()])))


def hf_logits(hf, ids, positions=None):
    with torch.no_grad():
        kwargs = {} if positions is None else {"position_ids": positions[None]}
        return hf(input_ids=ids[None], **kwargs).logits[0].float()


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    hf = make_hf(make_config(request.param))
    return request.param, hf, make_ours(hf)


def test_logits_match_transformers(pair, gen):
    family, hf, ours = pair
    ids = torch.randint(0, hf.config.vocab_size, (7,), generator=gen)
    got, want = our_logits(ours, ids), hf_logits(hf, ids)
    assert got.dtype == torch.float32 and got.shape == (7, hf.config.vocab_size)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_positions_far_from_zero_match(pair, gen):
    """A chunk that starts at position 300 (past llama3's original context) rotates like HF's."""
    family, hf, ours = pair
    ids = torch.randint(0, hf.config.vocab_size, (5,), generator=gen)
    positions = torch.arange(300, 305)
    torch.testing.assert_close(our_logits(ours, ids, positions), hf_logits(hf, ids, positions), atol=1e-4, rtol=1e-4)


def test_two_sequences_in_one_batch_match_each_alone(pair, gen):
    family, hf, ours = pair
    a = torch.randint(0, hf.config.vocab_size, (5,), generator=gen)
    b = torch.randint(0, hf.config.vocab_size, (1,), generator=gen)
    ids, positions = torch.cat([a, b]), torch.cat([torch.arange(5), torch.arange(1)])
    ctx = DenseCausalAttention([5, 1])
    with torch.no_grad():
        both = ours.compute_logits(ours(ids, positions, ctx))
    assert ctx.calls == list(range(ours.num_layers))
    torch.testing.assert_close(both[:5], our_logits(ours, a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[5:], our_logits(ours, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[5:], hf_logits(hf, b), atol=1e-4, rtol=1e-4)


def test_engine_attributes(pair):
    family, hf, ours = pair
    cfg = hf.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert (ours.num_layers, ours.num_heads, ours.num_kv_heads, ours.head_dim) == (
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        head_dim,
    )
    assert ours.q_size == cfg.num_attention_heads * head_dim and ours.kv_size == cfg.num_key_value_heads * head_dim
    assert (ours.hidden_size, ours.vocab_size, ours.intermediate_size) == (
        cfg.hidden_size,
        cfg.vocab_size,
        cfg.intermediate_size,
    )
    assert ours.dtype == torch.float32 and ours.device == torch.device("cpu")
    assert ours.sliding_window == (4096 if family == "mistral" else None)
    targets = list(ours.lora_targets())
    assert [(i, n) for i, n, _ in targets] == [
        (i, n) for i in range(2) for n in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    ]
    qkv = targets[0][2]
    assert qkv.output_offsets == (0, ours.q_size, ours.q_size + ours.kv_size, ours.q_size + 2 * ours.kv_size)
    assert qkv.input_size == cfg.hidden_size and qkv.weight.shape == (ours.q_size + 2 * ours.kv_size, cfg.hidden_size)
    assert targets[2][2].output_offsets == (0, cfg.intermediate_size, 2 * cfg.intermediate_size)
    assert targets[3][2].output_offsets == (0, cfg.hidden_size) and targets[3][2].input_size == cfg.intermediate_size
    assert (qkv.bias is not None) == (family == "qwen2") and targets[1][2].bias is None
    tied = ours.lm_head.weight is ours.model.embed_tokens.weight
    assert tied == (family == "smollm2")


def test_lora_hooks_see_shapes_and_edit_output_in_place(gen):
    """A hook adding x @ D^T on down_proj equals HF with down_proj.weight + D (the oracle)."""
    hf = make_hf(make_config("qwen2"))
    ours = make_ours(hf)
    ids = torch.randint(0, hf.config.vocab_size, (6,), generator=gen)
    base = our_logits(ours, ids)
    delta = 0.05 * torch.randn(hf.config.hidden_size, hf.config.intermediate_size, generator=gen)
    seen = []

    def down_hook(x, out):
        seen.append(("down", tuple(x.shape), tuple(out.shape)))
        out += x @ delta.T

    def record(tag):
        return lambda x, out: seen.append((tag, tuple(x.shape), tuple(out.shape)))

    layer1 = ours.model.layers[1]
    layer1.mlp.down_proj.attach_lora(down_hook)
    layer1.self_attn.qkv_proj.attach_lora(record("qkv"))
    ours.model.embed_tokens.attach_lora(record("embed"))
    ours.lm_head.attach_lora(record("lm_head"))
    got = our_logits(ours, ids)
    qkv_out = ours.q_size + 2 * ours.kv_size
    assert seen == [
        ("embed", (6,), (6, 64)),
        ("qkv", (6, 64), (6, qkv_out)),
        ("down", (6, 88), (6, 64)),
        ("lm_head", (6, 64), (6, 131)),
    ]
    assert not torch.allclose(got, base, atol=1e-3)
    with torch.no_grad():
        hf.model.layers[1].mlp.down_proj.weight += delta
    torch.testing.assert_close(got, hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_bfloat16_model_is_close_to_float32(gen):
    hf = make_hf(make_config("llama"))
    ours = make_ours(hf, dtype="bfloat16")
    assert ours.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 131, (6,), generator=gen)
    got = our_logits(ours, ids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, hf_logits(hf, ids), atol=0.15, rtol=0.05)


def test_missing_tensor_is_named():
    hf = make_hf(make_config("llama"))
    weights = {k: v for k, v in hf.state_dict().items() if k != "model.layers.1.self_attn.k_proj.weight"}
    with pytest.raises(ConfigError, match=r"missing 1 tensor\(s\): model\.layers\.1\.self_attn\.k_proj\.weight"):
        LlamaForCausalLM(hf.config).load_weights(weights.items())


def test_shape_mismatch_names_tensor_and_both_shapes():
    hf = make_hf(make_config("llama"))
    weights = dict(hf.state_dict())
    weights["model.layers.0.mlp.up_proj.weight"] = torch.zeros(80, 64)
    with pytest.raises(
        ConfigError,
        match=r"'model\.layers\.0\.mlp\.up_proj\.weight' has shape \(80, 64\) "
        r"but the model expects \(88, 64\)",
    ):
        LlamaForCausalLM(hf.config).load_weights(weights.items())


def test_unknown_tensor_is_named_and_inv_freq_is_skipped():
    hf = make_hf(make_config("llama"))
    weights = dict(hf.state_dict())
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    LlamaForCausalLM(hf.config).load_weights(weights.items())  # inv_freq is skipped silently
    weights["model.layers.0.self_attn.extra_proj.weight"] = torch.ones(2, 2)
    with pytest.raises(ConfigError, match=r"has no place for: model\.layers\.0\.self_attn\.extra_proj\.weight"):
        LlamaForCausalLM(hf.config).load_weights(weights.items())


def test_tied_checkpoint_with_only_lm_head_loads(gen):
    hf = make_hf(make_config("smollm2"))
    weights = dict(hf.state_dict())
    assert "lm_head.weight" in weights  # HF's state_dict lists the tied matrix under both names
    del weights["model.embed_tokens.weight"]
    ours = LlamaForCausalLM(hf.config)
    ours.load_weights(weights.items())
    ids = torch.randint(0, 131, (4,), generator=gen)
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_unsupported_rope_type_is_refused():
    cfg = LlamaConfig(**SMALL, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ConfigError, match="rope type 'dynamic'"):
        LlamaForCausalLM(cfg)


def test_bad_dtype_name_is_refused():
    with pytest.raises(ConfigError, match="dtype 'int8'"):
        LlamaForCausalLM(make_config("llama"), dtype="int8")
