"""Tests of the PEFT adapter loader and the adapter data model, with PEFT itself as the oracle.

Every accepted configuration is checked by loading the same saved adapter through PEFT and
comparing, for every fused projection of every layer (and embed_tokens / lm_head), the delta PEFT
adds on random inputs with ``scaling * (x @ A_i^T) @ B_i^T`` from our weights. Every refusal is
checked for a message that names the offending field, tensor or flag.
"""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch
from lora_utils import (
    fused_lora_delta,
    load_peft_model,
    make_peft_adapter,
    peft_fused_delta,
    peft_module,
    peft_module_delta,
    shape_of,
    tiny_llama_config,
    tiny_model,
    write_adapter_dir,
)

from loraserve.contract import AdapterError, AdapterLoader, LoRABatchInfo
from loraserve.lora.adapter import BaseModelShape, LoRAAdapter
from loraserve.lora.loader import allowed_modules
from loraserve.lora.targets import FUSED_MODULES
from loraserve.plugins.backend_torch.backend import TorchLoRABackend
from loraserve.plugins.loader_peft.loader import PeftAdapterLoader
from loraserve.plugins.loader_peft.patterns import MATCH_BUDGET_S, MAX_PATTERN_CHARS, PatternBudget

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def base():
    return tiny_model(tiny_llama_config(), seed=0)


@pytest.fixture(scope="module")
def shape(base):
    return shape_of(base)


@pytest.fixture
def loader():
    return PeftAdapterLoader()


def edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def assert_matches_peft(adapter: LoRAAdapter, peft_model, shape: BaseModelShape, seed: int = 7) -> None:
    """Our weights reproduce PEFT's delta for every fused projection and embedding module."""
    gen = torch.Generator().manual_seed(seed)
    adapter.check(shape)
    peft_targets = set()
    for layer in range(shape.num_layers):
        for fused, members in FUSED_MODULES.items():
            lora_members = [m for m in members if hasattr(peft_module(peft_model, layer, m), "base_layer")]
            peft_targets.update(lora_members)
            x = torch.randn(5, shape.fused_in_features(fused), generator=gen)
            expected = peft_fused_delta(peft_model, layer, fused, x)
            if not lora_members:
                assert (layer, fused) not in adapter.weights
                continue
            assert expected.abs().max() > 1e-3  # the oracle is not trivially zero
            A, B = adapter.weights[(layer, fused)]
            got = fused_lora_delta(x, A, B, adapter.scaling, shape.output_offsets(fused))
            torch.testing.assert_close(got, expected, **TOL)
    for module in ("embed_tokens", "lm_head"):
        pair = getattr(adapter, module)
        if not hasattr(peft_module(peft_model, None, module), "base_layer"):
            assert pair is None
            continue
        peft_targets.add(module)
        A, B = pair
        if module == "embed_tokens":
            ids = torch.randint(0, shape.vocab_size, (6,), generator=gen)
            got = adapter.scaling * A[:, ids].T @ B.T
            expected = peft_module_delta(peft_model, None, module, ids)
        else:
            x = torch.randn(6, shape.hidden_size, generator=gen)
            got = adapter.scaling * (x @ A.T) @ B.T
            expected = peft_module_delta(peft_model, None, module, x)
        assert expected.abs().max() > 1e-3
        torch.testing.assert_close(got, expected, **TOL)
    assert adapter.target_modules == peft_targets


ORACLE_CASES = {
    "rank1_all_modules": dict(r=1, lora_alpha=2, target_modules=ALL7),
    "rank3_q_v_down": dict(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": dict(r=4, lora_alpha=8, target_modules=ALL7, use_rslora=True),
    "rank_and_alpha_pattern": dict(
        r=4,
        lora_alpha=8,
        target_modules=ALL7,
        rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6, r"layers\.0\.self_attn\.k_proj": 3},
        alpha_pattern={"v_proj": 3, "o_proj": 32},
    ),
    "rslora_with_patterns": dict(
        r=5,
        lora_alpha=4,
        target_modules=["k_proj", "up_proj"],
        use_rslora=True,
        rank_pattern={"up_proj": 7},
        alpha_pattern={"k_proj": 9},
    ),
    "regex_target_modules": dict(
        r=2, lora_alpha=4, target_modules=r".*\.layers\.1\.(self_attn\.k_proj|mlp\.gate_proj)|.*\.0\.self_attn\.o_proj"
    ),
    "layers_to_transform": dict(
        r=3,
        lora_alpha=6,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
        layers_to_transform=[1],
        layers_pattern="layers",
    ),
    "exclude_modules": dict(r=2, lora_alpha=2, target_modules=ALL7, exclude_modules=["model.layers.0.mlp.up_proj"]),
    "embeddings": dict(
        r=4,
        lora_alpha=8,
        target_modules=["embed_tokens", "lm_head", "q_proj"],
        rank_pattern={"lm_head": 2},
        alpha_pattern={"embed_tokens": 16},
    ),
    "alpha_zero_with_alpha_pattern": dict(
        r=2, lora_alpha=0, target_modules=["q_proj", "v_proj"], alpha_pattern={"q_proj": 4}
    ),
}


@pytest.mark.parametrize("case", list(ORACLE_CASES))
def test_adapter_reproduces_peft(case, base, shape, loader, tmp_path):
    kwargs = ORACLE_CASES[case]
    path = make_peft_adapter(base, tmp_path / case, seed=11, **kwargs)
    if case == "alpha_zero_with_alpha_pattern":
        peft_model = load_peft_model(base, path)
        adapter = loader.load(str(path), name=case, shape=shape)
        # v_proj has scaling 0 in PEFT: its slice is all zeros, q_proj's survives through B.
        A, B = adapter.weights[(0, "qkv_proj")]
        offsets = shape.output_offsets("qkv_proj")
        assert B[offsets[2] :].abs().max() == 0
        x = torch.randn(3, shape.hidden_size)
        torch.testing.assert_close(
            fused_lora_delta(x, A, B, adapter.scaling, offsets), peft_fused_delta(peft_model, 0, "qkv_proj", x), **TOL
        )
        return
    adapter = loader.load(str(path), name=case, shape=shape)
    assert_matches_peft(adapter, load_peft_model(base, path), shape)
    assert adapter.name == case and adapter.source == str(path)
    expected_scaling = kwargs["lora_alpha"] / (math.sqrt(kwargs["r"]) if kwargs.get("use_rslora") else kwargs["r"])
    assert adapter.scaling == pytest.approx(expected_scaling)
    ranks = [kwargs["r"], *(kwargs.get("rank_pattern") or {}).values()]
    assert adapter.rank == max(ranks)
    assert adapter.nbytes == sum(t.numel() * 4 for t in adapter.tensors())
    assert all(t.device.type == "cpu" for t in adapter.tensors())


def test_layers_not_transformed_have_no_entry(base, shape, loader, tmp_path):
    path = make_peft_adapter(
        base, tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[0], seed=3
    )
    adapter = loader.load(str(path), name="a", shape=shape)
    assert set(adapter.weights) == {(0, "qkv_proj"), (0, "down_proj")}
    assert adapter.module_rank(1, "qkv_proj") == 0 and adapter.module_rank(0, "qkv_proj") == 2


@pytest.mark.parametrize("edit", ["fan_in_fan_out", "all-linear", "adapter_name_in_keys", "bin_weights"])
def test_config_and_file_variants_match_peft(edit, base, shape, loader, tmp_path):
    """Variants PEFT accepts for the same weights: our loader must agree with PEFT on each."""
    target = ALL7 if edit == "all-linear" else ["q_proj", "k_proj", "gate_proj"]
    path = make_peft_adapter(base, tmp_path / "a", r=3, lora_alpha=7, target_modules=target, seed=5)
    if edit == "fan_in_fan_out":
        edit_config(path, fan_in_fan_out=True)  # PEFT resets it for nn.Linear: weights stay [r, in] / [out, r]
    elif edit == "all-linear":
        edit_config(path, target_modules="all-linear")
    from safetensors.torch import load_file, save_file

    peft_model = load_peft_model(base, path)  # before the file changes below, which PEFT need not accept
    tensors = load_file(str(path / "adapter_model.safetensors"))
    if edit == "adapter_name_in_keys":
        tensors = {
            k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
            for k, v in tensors.items()
        }
        save_file(tensors, str(path / "adapter_model.safetensors"))
    elif edit == "bin_weights":
        (path / "adapter_model.safetensors").unlink()
        torch.save(tensors, str(path / "adapter_model.bin"))
    assert_matches_peft(loader.load(str(path), name="a", shape=shape), peft_model, shape)


def test_layout_matches_torch_backend_contract(base, shape, loader, tmp_path):
    """Two adapters and the base model in one batch through backend_torch give PEFT's deltas."""
    p1 = make_peft_adapter(
        base,
        tmp_path / "a1",
        r=3,
        lora_alpha=6,
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        rank_pattern={"v_proj": 5},
        alpha_pattern={"q_proj": 2},
        seed=1,
    )
    p2 = make_peft_adapter(
        base, tmp_path / "a2", r=2, lora_alpha=3, target_modules=["k_proj", "embed_tokens"], use_rslora=True, seed=2
    )
    adapters = [loader.load(str(p), name=p.name, shape=shape) for p in (p1, p2)]
    oracles = [load_peft_model(base, p) for p in (p1, p2)]
    R = max(a.rank for a in adapters) + 1  # a pool capacity above every adapter's rank
    seg_lens, seg_slot = [2, 1, 3], [1, 0, 2]
    batch = LoRABatchInfo.build(
        seg_lens,
        seg_slot,
        ranks=[0] + [a.rank for a in adapters],
        scalings=[0.0] + [a.scaling for a in adapters],
        max_rank=R,
    )
    backend = TorchLoRABackend()
    backend.prepare(batch)

    offsets = shape.output_offsets("qkv_proj")
    A_pool = torch.zeros(3, 3 * R, shape.hidden_size)
    B_pool = torch.zeros(3, offsets[-1], R)
    for slot, a in enumerate(adapters, start=1):
        A, B = a.weights[(0, "qkv_proj")]
        r = A.shape[0] // 3
        for i in range(3):
            A_pool[slot, i * R : i * R + r] = A[i * r : (i + 1) * r]
        B_pool[slot, :, :r] = B
    x = torch.randn(batch.num_tokens, shape.hidden_size)
    out = torch.randn(batch.num_tokens, offsets[-1])
    before = out.clone()
    backend.run_lora(x, A_pool, B_pool, out, offsets)
    torch.testing.assert_close(out[2:3], before[2:3], atol=0, rtol=0)  # base-model token untouched
    torch.testing.assert_close(out[0:2] - before[0:2], peft_fused_delta(oracles[0], 0, "qkv_proj", x[0:2]), **TOL)
    torch.testing.assert_close(out[3:6] - before[3:6], peft_fused_delta(oracles[1], 0, "qkv_proj", x[3:6]), **TOL)

    E_A = torch.zeros(3, R, shape.vocab_size)
    E_B = torch.zeros(3, shape.hidden_size, R)
    for slot, a in enumerate(adapters, start=1):
        A, B = a.embed_tokens
        E_A[slot, : A.shape[0]], E_B[slot, :, : A.shape[0]] = A, B
    ids = torch.randint(0, shape.vocab_size, (batch.num_tokens,))
    emb = torch.randn(batch.num_tokens, shape.hidden_size)
    before = emb.clone()
    backend.run_lora_embedding(ids, E_A, E_B, emb)
    torch.testing.assert_close(
        emb[0:2] - before[0:2], peft_module_delta(oracles[0], None, "embed_tokens", ids[0:2]), **TOL
    )
    torch.testing.assert_close(
        emb[3:6] - before[3:6], peft_module_delta(oracles[1], None, "embed_tokens", ids[3:6]), **TOL
    )


# -- refusals -------------------------------------------------------------------------------------


@pytest.fixture
def good(base, tmp_path):
    """A valid adapter directory: rank 2 on q_proj and v_proj."""
    return make_peft_adapter(base, tmp_path / "good", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], seed=9)


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(use_dora=True, target_modules=["q_proj", "lm_head"]), ["use_dora", "lm_head"]),
        (dict(use_dora=True), ["q_proj", "no lora_magnitude_vector", "use_dora"]),
        (dict(bias="all"), ["bias", "'all'"]),
        (dict(bias="lora_only"), ["bias", "lora_only"]),
        (dict(modules_to_save=["lm_head"]), ["modules_to_save"]),
        (dict(lora_bias=True), ["lora_bias"]),
        (dict(trainable_token_indices=[3, 4]), ["trainable_token_indices"]),
        (dict(peft_type="IA3"), ["peft_type", "IA3"]),
        (dict(target_modules=["q_proj", "fc1"]), ["target_modules", "fc1"]),
        (dict(target_modules=["q_proj", "qkv_proj"]), ["target_modules", "qkv_proj"]),
        (dict(target_modules=r".*(q_proj|input_layernorm)"), ["target_modules", "input_layernorm"]),
        (dict(target_modules=[]), ["target_modules"]),
        (dict(target_modules=r".*\.nothing_here"), ["target_modules", "matches no module"]),
        (dict(target_modules="q_proj("), ["target_modules", "regex"]),
        (dict(r=0), ["r = 0"]),
        (dict(lora_alpha="eight"), ["lora_alpha"]),
        (dict(rank_pattern={"q_proj": -1}), ["rank_pattern"]),
        (dict(rank_pattern={"q_proj[": 2}), ["rank_pattern", "q_proj["]),
        (dict(alpha_pattern=[1, 2]), ["alpha_pattern"]),
        (dict(layers_to_transform="0"), ["layers_to_transform"]),
        (dict(r=4), ["lora_A.weight", "(2, 64)", "(4, 64)", "disagrees with r = 4"]),
        (dict(rank_pattern={"v_proj": 3}), ["v_proj.lora_A.weight", "rank_pattern['v_proj'] = 3"]),
        (dict(target_modules=["q_proj"]), ["v_proj.lora_A.weight", "does not target"]),
        (dict(target_modules=["q_proj", "v_proj", "k_proj"]), ["k_proj", "no lora_A and no lora_B"]),
        (dict(layers_to_transform=[0]), ["layers.1", "does not target"]),
    ],
)
def test_config_refusals_name_the_field(good, shape, loader, changes, words):
    edit_config(good, **changes)
    with pytest.raises(AdapterError) as err:
        loader.load(str(good), name="x", shape=shape)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


# -- bounded regexes -------------------------------------------------------------------------------

SLOW_REGEX = "(.*){1,32000}[bc]"  # backtracks for seconds on every module name, in regex as in re


@pytest.mark.parametrize(
    "changes, shown",
    [
        (dict(target_modules="(?:.|.){0,20}Z"), "(?:.|.){0,20}Z"),  # 25 s to refuse with re; regex is quick
        (dict(target_modules=SLOW_REGEX), SLOW_REGEX),
        (dict(exclude_modules=SLOW_REGEX), SLOW_REGEX),
        (dict(rank_pattern={SLOW_REGEX: 2}), SLOW_REGEX),
        (dict(alpha_pattern={SLOW_REGEX: 2}), SLOW_REGEX),
        (dict(layers_to_transform=[0], layers_pattern=SLOW_REGEX), SLOW_REGEX),
    ],
)
def test_catastrophic_regexes_are_refused_in_bounded_time(good, shape, loader, changes, shown):
    edit_config(good, **changes)
    started = time.perf_counter()
    with pytest.raises(AdapterError) as err:
        loader.load(str(good), name="x", shape=shape)
    assert time.perf_counter() - started < 2.5
    assert repr(shown) in str(err.value)
    if shown == SLOW_REGEX:
        assert f"takes more than {MATCH_BUDGET_S:g} s" in str(err.value)


def test_long_regexes_are_refused(good, shape, loader):
    long_regex = "|".join([".*q_proj"] * 100)
    assert len(long_regex) > MAX_PATTERN_CHARS
    for changes in (
        dict(target_modules=long_regex),
        dict(exclude_modules=long_regex),
        dict(rank_pattern={long_regex: 2}),
    ):
        edit_config(good, **changes)
        with pytest.raises(AdapterError, match=f"{len(long_regex)} characters long, more than the {MAX_PATTERN_CHARS}"):
            loader.load(str(good), name="x", shape=shape)
        edit_config(good, target_modules=["q_proj", "v_proj"], exclude_modules=None, rank_pattern={})
    edit_config(good, target_modules="|".join([".*q_proj"] * 50) + "|.*v_proj")  # under the limit: as PEFT reads it
    assert set(loader.load(str(good), name="x", shape=shape).weights) == {(0, "qkv_proj"), (1, "qkv_proj")}


def test_the_regex_time_budget_is_shared_by_every_match_of_one_config():
    budget = PatternBudget("adapter_config.json", seconds=0.2)
    assert budget.fullmatch(r".*q_proj", "model.layers.0.self_attn.q_proj", "target_modules")
    started = time.perf_counter()
    with pytest.raises(AdapterError, match="takes more than 0.2 s"):
        budget.fullmatch(SLOW_REGEX, "model.layers.0.self_attn.q_proj", "target_modules")
    assert time.perf_counter() - started < 1.0 and budget.left <= 0
    with pytest.raises(AdapterError, match="takes more than 0.2 s"):  # spent: even a quick regex is refused now
        budget.fullmatch(r".*q_proj", "model.layers.0.self_attn.q_proj", "target_modules")


def test_rank_above_max_lora_rank(good, base, shape, loader, tmp_path):
    with pytest.raises(AdapterError, match=r"rank 2 \(r = 2, .*--max-lora-rank 1"):
        loader.load(str(good), name="x", shape=shape, max_rank=1)
    assert loader.load(str(good), name="x", shape=shape, max_rank=2).rank == 2
    p = make_peft_adapter(
        base, tmp_path / "p", r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], rank_pattern={"o_proj": 6}, seed=1
    )
    with pytest.raises(AdapterError) as err:
        loader.load(str(p), name="x", shape=shape, max_rank=4)
    assert "rank_pattern['o_proj']" in str(err.value) and "--max-lora-rank" in str(err.value)
    assert "o_proj" in str(err.value)


def test_target_module_outside_lora_target_modules(good, base, shape, loader, tmp_path):
    with pytest.raises(AdapterError) as err:
        loader.load(str(good), name="x", shape=shape, target_modules=["q_proj", "k_proj"])
    assert "v_proj" in str(err.value) and "--lora-target-modules" in str(err.value)
    assert loader.load(str(good), name="x", shape=shape, target_modules=["all"]).target_modules == {"q_proj", "v_proj"}
    emb = make_peft_adapter(base, tmp_path / "emb", r=2, lora_alpha=2, target_modules=["embed_tokens"], seed=1)
    with pytest.raises(AdapterError, match="embed_tokens.*--lora-target-modules"):
        loader.load(str(emb), name="x", shape=shape, target_modules=["all"])
    assert allowed_modules(["all"]) == frozenset(ALL7)
    with pytest.raises(AdapterError, match="bogus"):
        allowed_modules(["bogus"])


def test_missing_and_corrupt_files(good, shape, loader):
    cfg = good / "adapter_config.json"
    text = cfg.read_text()
    cfg.write_text(text[:-20])
    with pytest.raises(AdapterError, match="not valid JSON") as err:
        loader.load(str(good), name="x", shape=shape)
    assert str(cfg) in str(err.value)
    cfg.write_text("[1, 2]")
    with pytest.raises(AdapterError, match="JSON object"):
        loader.load(str(good), name="x", shape=shape)
    cfg.unlink()
    with pytest.raises(AdapterError, match="adapter_config.json"):
        loader.load(str(good), name="x", shape=shape)
    cfg.write_text(text)

    weights = good / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="safetensors") as err:
        loader.load(str(good), name="x", shape=shape)
    assert str(weights) in str(err.value)
    weights.unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors nor adapter_model.bin"):
        loader.load(str(good), name="x", shape=shape)
    (good / "adapter_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(AdapterError, match="adapter_model.bin"):
        loader.load(str(good), name="x", shape=shape)


def test_shapes_that_do_not_fit_the_base_model(good, shape, loader):
    import dataclasses

    narrow = dataclasses.replace(shape, q_size=32)
    with pytest.raises(AdapterError) as err:
        loader.load(str(good), name="x", shape=narrow)
    msg = str(err.value)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight" in msg
    assert "(64, 2)" in msg and "expected (32, 2)" in msg
    with pytest.raises(AdapterError, match="layer 1 but the base model has 1 layer;"):
        loader.load(str(good), name="x", shape=dataclasses.replace(shape, num_layers=1))
    with pytest.raises(AdapterError, match="no tensor for layer 2 .*fewer layers than this one's 3"):
        loader.load(str(good), name="x", shape=dataclasses.replace(shape, num_layers=3))


def _hand_tensors(shape, r=2, layers=(0, 1)):
    gen = torch.Generator().manual_seed(4)
    t = {}
    for i in layers:
        p = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        t[f"{p}.lora_A.weight"] = torch.randn(r, shape.hidden_size, generator=gen)
        t[f"{p}.lora_B.weight"] = torch.randn(shape.q_size, r, generator=gen)
    return t


@pytest.mark.parametrize(
    "mutation, words",
    [
        ("extra_key", ["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight", "does not target"]),
        ("junk_key", ["'base_model.model.model.layers.0.self_attn.q_proj.magnitude'", "not a LoRA weight"]),
        ("missing_B", ["model.layers.1.self_attn.q_proj", "no lora_B"]),
        ("nan", ["layers.0.self_attn.q_proj.lora_A.weight", "NaN"]),
        ("inf", ["layers.1.self_attn.q_proj.lora_B.weight", "infinite"]),
        ("inf_and_minus_inf", ["layers.0.self_attn.q_proj.lora_B.weight", "infinite"]),
        ("int_dtype", ["layers.0.self_attn.q_proj.lora_B.weight", "dtype"]),
        ("unsupported_module", ["rotary_emb", "not support"]),
        ("two_adapters", ["several adapters"]),
        ("duplicate", ["both hold lora_A"]),
        ("embedding_as_lora_A", ["lora_embedding_A", "q_proj"]),
    ],
)
def test_weight_refusals_name_the_tensor(shape, loader, tmp_path, mutation, words):
    t = _hand_tensors(shape)
    q0 = "base_model.model.model.layers.0.self_attn.q_proj"
    if mutation == "extra_key":
        t["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.randn(2, 64)
    elif mutation == "junk_key":
        t[f"{q0}.magnitude"] = torch.randn(64)
    elif mutation == "missing_B":
        del t["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    elif mutation == "nan":
        t[f"{q0}.lora_A.weight"][0, 3] = float("nan")
    elif mutation == "inf":
        t["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"][5, 1] = float("inf")
    elif mutation == "inf_and_minus_inf":  # (they cancel in no sum: inf - inf is NaN)
        t[f"{q0}.lora_B.weight"][0, 0] = float("inf")
        t[f"{q0}.lora_B.weight"][1, 0] = float("-inf")
    elif mutation == "int_dtype":
        t[f"{q0}.lora_B.weight"] = torch.ones(shape.q_size, 2, dtype=torch.int32)
    elif mutation == "unsupported_module":
        t["base_model.model.model.rotary_emb.lora_A.weight"] = torch.randn(2, 64)
    elif mutation == "two_adapters":
        t[f"{q0}.lora_A.other.weight"] = t.pop(f"{q0}.lora_A.weight")
        t[f"{q0}.lora_B.default.weight"] = t.pop(f"{q0}.lora_B.weight")
    elif mutation == "duplicate":
        t[f"{q0}.lora_A.default.weight"] = t[f"{q0}.lora_A.weight"].clone()
    elif mutation == "embedding_as_lora_A":
        t[f"{q0}.lora_embedding_A"] = t.pop(f"{q0}.lora_A.weight")
    d = write_adapter_dir(tmp_path / "h", {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}, t)
    with pytest.raises(AdapterError) as err:
        loader.load(str(d), name="x", shape=shape)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_large_finite_16_bit_weights_are_not_taken_for_infinite(shape, loader, tmp_path):
    """The finiteness check sums in float64: float16 weights at float16's largest value (65504), whose
    float16 sum would overflow, load."""
    t = {k: torch.full_like(v, 65504.0).to(torch.float16) for k, v in _hand_tensors(shape).items()}
    d = write_adapter_dir(tmp_path / "h", {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}, t)
    adapter = loader.load(str(d), name="x", shape=shape)
    assert adapter.rank == 2


def test_hand_written_adapter_loads(shape, loader, tmp_path):
    t = _hand_tensors(shape, r=3)
    d = write_adapter_dir(tmp_path / "h", {"r": 3, "lora_alpha": 6, "target_modules": ["q_proj"]}, t)
    adapter = loader.load(str(d), name="h", shape=shape)
    A, B = adapter.weights[(1, "qkv_proj")]
    x = torch.randn(4, shape.hidden_size)
    expected = (
        2.0
        * x
        @ t["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].T
        @ t["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].T
    )
    got = fused_lora_delta(x, A, B, adapter.scaling, shape.output_offsets("qkv_proj"))
    torch.testing.assert_close(got[:, : shape.q_size], expected, **TOL)
    assert got[:, shape.q_size :].abs().max() == 0


# -- added tokens ----------------------------------------------------------------------------------


def test_added_tokens_are_refused(good, base, shape, loader, tmp_path):
    (good / "added_tokens.json").write_text(json.dumps({"<tool>": 200}))  # inside the base vocab: fine
    loader.load(str(good), name="x", shape=shape)
    (good / "added_tokens.json").write_text(json.dumps({"<tool>": 200, "<new>": 256}))
    with pytest.raises(AdapterError, match=r"added_tokens.json adds 1 token.*'<new>' with id 256"):
        loader.load(str(good), name="x", shape=shape)
    (good / "added_tokens.json").unlink()
    vocab = {f"t{i}": i for i in range(256)}
    (good / "tokenizer.json").write_text(
        json.dumps({"model": {"type": "BPE", "vocab": vocab}, "added_tokens": [{"id": 257, "content": "<x>"}]})
    )
    with pytest.raises(AdapterError, match=r"tokenizer.json adds 1 token"):
        loader.load(str(good), name="x", shape=shape)

    emb = make_peft_adapter(base, tmp_path / "emb", r=2, lora_alpha=2, target_modules=["embed_tokens"], seed=1)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(emb / "adapter_model.safetensors"))
    grown = dict(tensors)
    grown["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.randn(2, 260)
    save_file(grown, str(emb / "adapter_model.safetensors"))
    with pytest.raises(AdapterError) as err:
        loader.load(str(emb), name="x", shape=shape)
    assert "embed_tokens.lora_embedding_A" in str(err.value) and "(2, 260)" in str(err.value)
    assert "vocabulary" in str(err.value)
    grown = dict(tensors)
    grown["base_model.model.model.embed_tokens.base_layer.weight"] = torch.randn(260, 64)
    save_file(grown, str(emb / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"embed_tokens.base_layer.weight.*\(260, 64\).*vocabulary"):
        loader.load(str(emb), name="x", shape=shape)


# -- sources ---------------------------------------------------------------------------------------


def test_hub_id_offline_gives_a_clear_message(loader, shape, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert loader.can_load("loraserve-test/no-such-adapter")
    with pytest.raises(AdapterError) as err:
        loader.load("loraserve-test/no-such-adapter", name="x", shape=shape)
    msg = str(err.value)
    assert "could not be fetched from the Hugging Face hub" in msg and "HF_HUB_OFFLINE" in msg
    assert "local directory" in msg
    with pytest.raises(AdapterError, match="Hugging Face hub"):
        loader.peek("loraserve-test/no-such-adapter")


def test_sources_that_are_neither_directory_nor_hub_id(good, loader, shape, tmp_path):
    missing = str(tmp_path / "nowhere" / "adapter")
    assert not loader.can_load(missing)
    with pytest.raises(AdapterError, match="does not exist and is not a Hugging Face hub id"):
        loader.load(missing, name="x", shape=shape)
    cfg = str(good / "adapter_config.json")
    assert not loader.can_load(cfg)
    with pytest.raises(AdapterError, match="is a file"):
        loader.load(cfg, name="x", shape=shape)
    with pytest.raises(AdapterError, match="empty"):
        loader.load("", name="x", shape=shape)
    assert loader.can_load(str(good)) and not loader.can_load(str(tmp_path)) and not loader.can_load("")


def test_peek_reads_only_the_config(base, loader, shape, tmp_path):
    p = make_peft_adapter(
        base,
        tmp_path / "p",
        r=2,
        lora_alpha=4,
        target_modules=["q_proj", "down_proj", "lm_head"],
        rank_pattern={"down_proj": 6},
        layers_to_transform=[1],
        seed=1,
    )
    (p / "adapter_model.safetensors").unlink()
    assert loader.peek(str(p)) == (6, frozenset({"q_proj", "down_proj", "lm_head"}))
    assert loader.peek(str(p), shape).rank == 6


def test_loader_is_stateless_and_failures_leave_nothing(good, shape, loader):
    before = sorted(os.listdir(good))
    edit_config(good, use_dora=True)  # the weights have no DoRA magnitudes
    with pytest.raises(AdapterError):
        loader.load(str(good), name="x", shape=shape)
    assert vars(loader) == {} and sorted(os.listdir(good)) == before
    edit_config(good, use_dora=False)
    a = loader.load(str(good), name="x", shape=shape)
    b = loader.load(str(good), name="y", shape=shape)
    assert vars(loader) == {}
    assert a.weights.keys() == b.weights.keys() and a.weights[(0, "qkv_proj")][0] is not b.weights[(0, "qkv_proj")][0]


# -- data model ------------------------------------------------------------------------------------


def test_base_model_shape_from_config():
    s = BaseModelShape.from_config(tiny_llama_config(head_dim=8))
    assert (s.num_layers, s.hidden_size, s.q_size, s.kv_size, s.intermediate_size, s.vocab_size) == (
        2,
        64,
        32,
        16,
        128,
        256,
    )
    assert s.output_offsets("qkv_proj") == (0, 32, 48, 64)
    assert s.output_offsets("gate_up_proj") == (0, 128, 256)
    assert s.fused_in_features("o_proj") == 32 and s.fused_in_features("down_proj") == 128
    feats = s.module_features()
    assert feats["embed_tokens"] == (256, 64) and feats["lm_head"] == (64, 256) and feats["v_proj"] == (64, 16)
    model = tiny_model(tiny_llama_config(head_dim=8))
    for name in ("q_proj", "k_proj", "o_proj"):
        lin = getattr(model.model.layers[0].self_attn, name)
        assert feats[name] == (lin.in_features, lin.out_features)
    with pytest.raises(ValueError, match="q_size"):
        BaseModelShape(num_layers=1, hidden_size=8, q_size=0, kv_size=8, intermediate_size=8, vocab_size=8)
    with pytest.raises(ValueError, match="unknown fused projection 'qkv'"):
        s.output_offsets("qkv")
    with pytest.raises(ValueError, match="num_hidden_layers"):
        BaseModelShape.from_config({"hidden_size": 8})


def test_adapter_check_catches_bad_layout(good, shape, loader):
    adapter = loader.load(str(good), name="x", shape=shape)
    A, B = adapter.weights[(0, "qkv_proj")]
    adapter.weights[(0, "qkv_proj")] = (A[:-1], B)
    with pytest.raises(ValueError, match="qkv_proj: A has shape"):
        adapter.check(shape)


def test_base_class_is_the_contract():
    assert issubclass(PeftAdapterLoader, AdapterLoader)
    with pytest.raises(NotImplementedError):
        AdapterLoader().can_load("x")
    from loraserve.plugins.loader_peft import _make

    assert isinstance(_make(), PeftAdapterLoader)
