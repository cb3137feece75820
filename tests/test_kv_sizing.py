"""The KV cache's memory budget on CUDA as plain arithmetic: what the profile run measured, the CUDA
graphs' estimate and the margin are set aside, and a budget with no room names the flags to change."""

from __future__ import annotations

import pytest

from loraserve.engine.kv_sizing import (
    BLOCK_SIZE,
    GRAPH_OVERHEAD_BYTES,
    SAFETY_MARGIN_BYTES,
    SAFETY_MARGIN_FRACTION,
    MemoryPlan,
    graph_memory_estimate,
    kv_tokens,
    profile_shape,
)
from loraserve.errors import ConfigError
from loraserve.runner.warmup_plan import StepLimits

GiB = 1 << 30


def test_memory_plan_sets_aside_activations_graphs_and_margin():
    plan = MemoryPlan.of(total=80 * GiB, free=62 * GiB, fraction=None, activations=5 * GiB, graphs=GiB)
    assert plan.in_use == 18 * GiB
    assert plan.margin == SAFETY_MARGIN_BYTES + int(SAFETY_MARGIN_FRACTION * 6 * GiB)
    assert plan.kv_bytes == 62 * GiB - 6 * GiB - plan.margin
    assert "activations 5.00" in plan.describe() and "KV cache" in plan.describe()


def test_mem_fraction_static_bounds_the_cache_and_the_measured_headroom_too():
    # the fraction leaves room for the activations: it decides
    loose = MemoryPlan.of(80 * GiB, 62 * GiB, 0.8, 5 * GiB, GiB)
    assert loose.kv_bytes == int(80 * GiB * 0.8) - 18 * GiB
    # a fraction that would leave less than the largest step needs: the measurement decides
    tight = MemoryPlan.of(80 * GiB, 62 * GiB, 0.94, 5 * GiB, GiB)
    assert tight.kv_bytes == 62 * GiB - tight.headroom < tight.by_fraction


def test_no_room_names_the_flags_to_change():
    per_token = 128 * 1024
    with pytest.raises(ConfigError, match="--mem-fraction-static 0.2 leaves no room"):
        kv_tokens(MemoryPlan.of(80 * GiB, 62 * GiB, 0.2, GiB, 0), per_token)
    with pytest.raises(ConfigError, match="--max-prefill-tokens.*--chunked-prefill-size.*--max-running-requests"):
        kv_tokens(MemoryPlan.of(24 * GiB, 8 * GiB, None, 7 * GiB, 0), per_token)
    tokens = kv_tokens(MemoryPlan.of(24 * GiB, 8 * GiB, None, 2 * GiB, 0), per_token)
    assert tokens >= BLOCK_SIZE and tokens * per_token <= 8 * GiB - 2 * GiB - SAFETY_MARGIN_BYTES


def test_graph_estimate_counts_every_graphs_logits_and_the_largest_batch():
    sizes, vocab = [1, 2, 4, 8], 1000
    est = graph_memory_estimate(sizes, vocab, 2, activations=1600, profile_tokens=16)
    assert est == 15 * vocab * 4 + 8 * (vocab * 2 + 100) + 4 * GRAPH_OVERHEAD_BYTES
    assert graph_memory_estimate([], vocab, 2, 1600, 16) == 0


@pytest.mark.parametrize(
    ("limits", "tokens", "segments"),
    [
        (StepLimits(256, 16384, 8192), 16384, 256),  # every sequence samples: logits of 256 rows
        (StepLimits(4, 16384, 512), 2048, 4),  # each chunk at most --chunked-prefill-size
        (StepLimits(64, 40, 512), 40, 40),
    ],
)
def test_profile_shape_is_the_largest_step_the_scheduler_may_run(limits, tokens, segments):
    shape = profile_shape(limits, lora=True)
    assert (shape.num_tokens, shape.num_segments, shape.lora) == (tokens, segments, True)
    assert max(shape.seg_lens) <= limits.max_chunk and max(shape.seg_lens) - min(shape.seg_lens) <= 1


def test_profile_step_runs_the_largest_step_and_its_sampling(tiny_model_dir, monkeypatch):
    """The profile run's plumbing on a CPU engine (CUDA's memory queries simulated): the largest step
    runs with LoRA on every row on a temporary cache, is sampled on the heaviest path, and leaves
    the engine's cache, adapters and hooks as they were."""
    import torch

    from loraserve.engine.engine import Engine
    from loraserve.engine.kv_sizing import profile_step
    from loraserve.settings import make_settings

    calls = []
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, name=name, **k: calls.append(name))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1000)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5000)
    engine = Engine(make_settings(model_path=tiny_model_dir, device="cpu", enable_lora=True, max_lora_rank=4))
    try:
        free = engine.kv.allocator.num_free
        limits = StepLimits(max_running=6, step_tokens=100, max_chunk=32)
        peak, tokens, capturable = profile_step(
            engine.model,
            engine.plugins,
            engine.attention_name,
            engine.lora,
            engine.device,
            engine.dtype,
            limits,
        )
        assert (peak, tokens, capturable) == (4000, 100, False)  # torch_native attention: no graphs
        assert "reset_peak_memory_stats" in calls
        assert engine.kv.allocator.num_free == free
        engine.lora.check_integrity()
        assert not engine.lora.hooks.active
    finally:
        engine.shutdown()
