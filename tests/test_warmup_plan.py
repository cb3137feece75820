"""The warm-up's plan (which steps it runs) against the scheduler's limits and the kernel backends'
variant keys, and the warm-up itself on a CPU engine: it leaves no state behind."""

from __future__ import annotations

import pytest
import torch

from loraserve.runner.warmup_plan import (
    DENSE_TOKENS,
    StepLimits,
    StepShape,
    attention_shapes,
    coarse_lora_key,
    even_split,
    lora_shapes,
    plan_warmup,
)

# Llama-3-8B's projections: (in_dim, out_dim, n_slices, may shrink in the GEMM)
LLAMA_8B = [(4096, 6144, 3, True), (4096, 4096, 1, True), (4096, 28672, 2, True), (14336, 4096, 1, True)]


def h100_splits(n: int) -> int:
    """PagedTritonAttention.splits_for with 132 multiprocessors and 8 kv heads."""
    want = -(-8 * 132 // (n * 8))
    return min(16, 1 << (want - 1).bit_length()) if want > 1 else 1


def assert_within(shape: StepShape, limits: StepLimits) -> None:
    assert 1 <= shape.num_segments <= limits.max_running, shape
    assert 1 <= shape.num_tokens <= limits.step_tokens, shape
    assert all(1 <= n <= limits.max_chunk for n in shape.seg_lens), shape


@pytest.mark.parametrize("limits", [StepLimits(256, 16384, 8192), StepLimits(3, 40, 16), StepLimits(64, 64, 4)])
def test_attention_shapes_take_every_decode_split_and_a_prefill(limits):
    shapes = attention_shapes(limits, h100_splits)
    for s in shapes:
        assert_within(s, limits)
        assert not s.lora
    wanted = {h100_splits(n) for n in range(1, min(limits.max_running, limits.step_tokens) + 1)}
    assert {h100_splits(s.num_decode) for s in shapes if s.num_decode} == wanted
    assert any(n > 1 for s in shapes for n in s.seg_lens)  # the prefill kernel
    assert len(shapes) <= len(wanted) + 1


def test_even_split_and_limits_are_checked():
    assert even_split(10, 3) == (4, 3, 3) and even_split(5, 5) == (1,) * 5
    with pytest.raises(ValueError):
        even_split(2, 3)
    with pytest.raises(ValueError, match="max_chunk"):
        StepLimits(4, 10, 0)
    limits = StepLimits(4, 100, 16)
    assert list(limits.segments_for(40)) == [3, 4] and not limits.segments_for(80)
    assert limits.within(12) == StepLimits(4, 12, 12) and limits.within(1000) == limits


def test_dense_token_counts_cover_the_backends_token_thresholds():
    """Above DENSE_TOKENS the plan assumes no LoRA decision depends on the token count alone."""
    from loraserve.plugins.backend_triton import cost_model as backend

    assert backend.COMPUTE_BOUND_TOKENS <= DENSE_TOKENS
    assert max(backend.EPILOGUE_MAX_TOKENS, backend.EPILOGUE_MAX_TOKENS_TWO_SLICES_RANK_16) < DENSE_TOKENS


def kernel_backend(name: str, n_sms: int = 132, **kwargs):
    if name == "csgmv":
        from loraserve.plugins.backend_csgmv.backend import ChunkedSgmvLoRABackend

        backend = ChunkedSgmvLoRABackend("cpu", **kwargs)  # the interpreter device; keys are host integers
    else:
        from loraserve.plugins.backend_triton.backend import SgmvLoRABackend

        backend = SgmvLoRABackend("cpu", **kwargs)
    backend.n_sms = n_sms  # as an H100 reports it
    return backend


@pytest.mark.parametrize(
    ("name", "rank", "slots", "options"),
    [("csgmv", 16, 8, {}), ("csgmv", 64, 4, {"max_chunk": 64}), ("triton", 16, 8, {}), ("triton", 128, 3, {})],
)
def test_lora_shapes_take_every_key_the_scheduler_can_produce(name, rank, slots, options):
    """Brute force over every (tokens, segments) within the limits: each key appears in the plan,
    with the fewest tokens that give it, and the plan has no two shapes of one key."""
    backend = kernel_backend(name, **options)
    keys = backend.variant_keys(slots, rank, LLAMA_8B)
    limits = StepLimits(max_running=48, step_tokens=3000, max_chunk=512)
    plan = lora_shapes(limits, keys)
    planned = {}
    for s in plan:
        assert s.lora and s.seg_lens == even_split(s.num_tokens, s.num_segments)
        assert_within(s, limits)
        key = keys(s.num_tokens, s.num_segments)
        assert key not in planned, (s, planned.get(key))
        planned[key] = s.num_tokens
    for t in range(1, limits.step_tokens + 1):
        for s in limits.segments_for(t):
            key = keys(t, s)
            assert key in planned, f"{t} tokens in {s} segments: key {key} is not warmed up"
            assert planned[key] <= t
    assert len({k[2] for k in planned}) > 1  # the split-k and shrink-in-GEMM choices really vary


def test_variant_keys_match_what_prepare_plans():
    """tile_shape (what the key reads) is what prepare builds, on random batches."""
    from loraserve.contract import LoRABatchInfo

    gen = torch.Generator().manual_seed(7)
    for name in ("csgmv", "triton"):
        backend = kernel_backend(name)
        for _ in range(20):
            n_seg = int(torch.randint(1, 12, (), generator=gen))
            lens = torch.randint(1, 300, (n_seg,), generator=gen).tolist()
            slots = torch.randint(0, 4, (n_seg,), generator=gen).tolist()
            info = LoRABatchInfo.build(lens, slots, [8, 0, 8, 3], [1.0] * 4, 8)
            backend.prepare(info)
            plan = backend._plan  # the test reads the plan prepare built
            assert backend.tile_shape(sum(lens), n_seg, 4) == (plan.block_m, plan.num_tiles, plan.perm is not None)


def test_plan_warmup_with_a_backend_without_keys_is_bounded():
    limits = StepLimits(256, 16384, 8192)
    shapes = plan_warmup(limits, h100_splits, coarse_lora_key)
    lora = [s for s in shapes if s.lora]
    assert 0 < len(lora) <= 60
    assert max(s.num_tokens for s in lora) <= 2048
    for s in shapes:
        assert_within(s, limits)
    assert plan_warmup(limits, h100_splits, None) == attention_shapes(limits, h100_splits)


def test_warm_up_on_a_cpu_engine_leaves_no_state_behind(tiny_model_dir):
    """The warm-up's steps run through the model (LoRA rows active) and give back every KV block;
    the adapters, the hooks and the tokens served are as without it."""
    from loraserve.engine.engine import Engine
    from loraserve.runner.warmup import warm_up
    from loraserve.settings import make_settings

    engine = Engine(make_settings(model_path=tiny_model_dir, device="cpu", enable_lora=True, max_lora_rank=4))
    try:
        prompt = {"input_ids": [[3, 1, 4, 1, 5]], "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
        before = engine.generate(**prompt)[0]["output_ids"]
        free = engine.kv.allocator.num_free
        limits = StepLimits(4, 40, 16)
        shapes = engine.call_in_engine(
            lambda: warm_up(engine.model, engine.kv, engine.runner.attention, engine.device, limits, engine.lora)
        )
        assert any(s.lora for s in shapes) and any(not s.lora for s in shapes)
        assert engine.kv.allocator.num_free == free
        engine.kv.allocator.check_integrity()
        engine.lora.check_integrity()
        assert not engine.lora.hooks.active
        assert engine.generate(**prompt)[0]["output_ids"] == before
    finally:
        engine.shutdown()
