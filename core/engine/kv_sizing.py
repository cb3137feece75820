"""Sizing the KV cache on CUDA from a profile run, as vLLM does: the memory it may take is what is
left once the weights, the LoRA pools, the largest step's activations, the CUDA graphs and a safety
margin are set aside.

:func:`profile_step` runs, before the KV cache exists, one forward of the largest step the
scheduler may run (its whole token budget spread over the most sequences, so the logits of every
row are computed, with LoRA on every row when LoRA is enabled) and the sampler's heaviest path on
those logits, over a minimal temporary KV cache, and measures the peak of the memory allocated.
:func:`graph_memory_estimate` estimates what the decode CUDA graphs will hold. :class:`MemoryPlan`
is the arithmetic (pure, tested on CPU) and :func:`kv_budget_tokens` turns it into tokens.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Any

import torch

from loraserve.contract import AttentionSpec
from loraserve.errors import ConfigError
from loraserve.runner.warmup import ScratchSteps
from loraserve.runner.warmup_plan import StepLimits, StepShape, even_split
from loraserve.sched.kv_cache import KVCache

logger = logging.getLogger("loraserve.engine.engine")

BLOCK_SIZE = 16
CPU_KV_BUDGET_BYTES = 1 << 30
CPU_MAX_KV_TOKENS = 32768
#: set aside besides the measured activations and the graphs' estimate: allocator fragmentation
#: across step shapes, CUDA's own allocations, what a request's state holds
SAFETY_MARGIN_BYTES = 1 << 30
SAFETY_MARGIN_FRACTION = 0.1  # of the activations and graphs, on top
#: device memory a captured graph takes outside PyTorch's allocator (its executable), an estimate
GRAPH_OVERHEAD_BYTES = 4 << 20


@dataclass(frozen=True)
class MemoryPlan:
    """Where the device's memory goes (bytes).

    :ivar total: the device's memory.
    :ivar free: free now, with the weights and the LoRA pools allocated (and nothing else).
    :ivar fraction: ``--mem-fraction-static``, or None.
    :ivar activations: the profile run's peak (largest step and its sampling).
    :ivar graphs: the decode CUDA graphs' estimate (0 without graphs).
    :ivar margin: the safety margin.

    The KV cache gets ``free - activations - graphs - margin``; with ``fraction`` at most
    ``fraction * total`` minus what is in use (weights, LoRA pools), as SGLang's flag means: the
    weights, LoRA slots and KV cache together take that fraction.
    """

    total: int
    free: int
    fraction: float | None
    activations: int
    graphs: int
    margin: int

    @classmethod
    def of(cls, total: int, free: int, fraction: float | None, activations: int, graphs: int) -> MemoryPlan:
        margin = SAFETY_MARGIN_BYTES + int(SAFETY_MARGIN_FRACTION * (activations + graphs))
        return cls(total, free, fraction, activations, graphs, margin)

    @property
    def in_use(self) -> int:
        return self.total - self.free

    @property
    def headroom(self) -> int:
        return self.activations + self.graphs + self.margin

    @property
    def by_fraction(self) -> int | None:
        return None if self.fraction is None else int(self.total * self.fraction) - self.in_use

    @property
    def kv_bytes(self) -> int:
        left = self.free - self.headroom
        return left if self.fraction is None else min(left, self.by_fraction)

    def describe(self) -> str:
        gib = 2**30
        parts = [
            f"total {self.total / gib:.1f} GiB",
            f"in use {self.in_use / gib:.2f} (weights, LoRA pools, CUDA context)",
            f"activations {self.activations / gib:.2f} (measured)",
            f"CUDA graphs {self.graphs / gib:.2f} (estimated)",
            f"margin {self.margin / gib:.2f}",
        ]
        if self.fraction is not None:
            parts.append(f"--mem-fraction-static {self.fraction} allows {self.by_fraction / gib:.2f}")
        return ", ".join(parts) + f" -> KV cache {max(0, self.kv_bytes) / gib:.2f} GiB"


def kv_tokens(plan: MemoryPlan, per_token: int, limits_hint: str = "") -> int:
    """KV-cache tokens of ``plan`` (``per_token`` bytes each); a ConfigError naming the flag to
    change when not even one block fits."""
    tokens = max(0, plan.kv_bytes) // per_token
    if tokens >= BLOCK_SIZE:
        return int(tokens)
    gib = 2**30
    if plan.fraction is not None and plan.by_fraction < plan.free - plan.headroom:
        raise ConfigError(
            f"--mem-fraction-static {plan.fraction} leaves no room for the KV cache: {plan.fraction} x "
            f"{plan.total / gib:.1f} GiB = {plan.total * plan.fraction / gib:.1f} GiB, but "
            f"{plan.in_use / gib:.1f} GiB are already in use (weights, LoRA slots); raise it (at most 0.95) "
            "or give --max-total-tokens"
        )
    raise ConfigError(
        f"no memory is left for the KV cache: {plan.describe()}. The largest step {limits_hint}needs "
        f"{plan.activations / gib:.2f} GiB of activations; lower --max-prefill-tokens, --chunked-prefill-size, "
        "--max-running-requests or --cuda-graph-max-bs (or --max-loras-per-batch / --max-lora-rank), "
        "or use a smaller model"
    )


def kv_budget_tokens(
    model: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    mem_fraction_static: float | None = None,
    activations: int = 0,
    graphs: int = 0,
    limits_hint: str = "",
) -> int:
    """KV-cache tokens that fit: on CUDA the :class:`MemoryPlan` of the memory free now and the
    measured ``activations`` and estimated ``graphs`` (logged); on CPU 1 GiB, at most 32768 tokens."""
    per_token = KVCache.bytes_per_token(model.num_layers, model.num_kv_heads, model.head_dim, dtype)
    if device.type != "cuda":
        return int(min(CPU_KV_BUDGET_BYTES // per_token, CPU_MAX_KV_TOKENS))
    free, total = torch.cuda.mem_get_info(device)
    plan = MemoryPlan.of(total, free, mem_fraction_static, activations, graphs)
    logger.info("memory: %s", plan.describe())
    if plan.fraction is not None and plan.by_fraction > plan.free - plan.headroom > 0:
        logger.warning(
            "--mem-fraction-static %s would leave less than the largest step needs beside the KV cache; "
            "the cache takes %.2f GiB instead of %.2f GiB",
            plan.fraction,
            plan.kv_bytes / 2**30,
            plan.by_fraction / 2**30,
        )
    return kv_tokens(plan, per_token, limits_hint)


def profile_shape(limits: StepLimits, lora: bool) -> StepShape:
    """The largest step: the token budget over the most sequences (each chunk at most
    ``max_chunk``), every sequence sampling."""
    tokens = min(limits.step_tokens, limits.max_running * limits.max_chunk)
    return StepShape(even_split(tokens, min(limits.max_running, tokens)), lora=lora)


def profile_step(
    model: torch.nn.Module,
    plugins: Any,
    attention_name: str,
    lora: Any,
    device: torch.device,
    dtype: torch.dtype,
    limits: StepLimits,
) -> tuple[int, int, bool]:
    """Run :func:`profile_shape` and sample it on a temporary KV cache of the fewest blocks (shared
    by the step's sequences); returns ``(peak bytes allocated beyond what was before, tokens of the
    step, whether the attention backend can be captured in CUDA graphs)``."""
    shape = profile_shape(limits, lora is not None)
    blocks = -(-max(shape.seg_lens) // BLOCK_SIZE)
    kv = KVCache(model.num_layers, model.num_kv_heads, model.head_dim, blocks, BLOCK_SIZE, dtype, device)
    spec = AttentionSpec(
        kv=kv,
        device=device,
        sliding_window=getattr(model, "sliding_window", None),
        max_seqs=limits.max_running,
        context_len=limits.max_chunk,  # the longest sequence of the profiled step
    )
    attention = plugins.attention_backends.create(attention_name, spec)
    steps = ScratchSteps(model, kv, range(blocks), attention, device, lora)
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        logits = steps.run(shape)
        steps.sample(logits)
        del logits
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    capturable = bool(getattr(attention, "graph_capturable", False))
    del steps, attention, kv
    gc.collect()
    torch.cuda.empty_cache()
    logger.info(
        "profile run: a step of %d tokens in %d sequences%s peaks at %.2f GiB of activations",
        shape.num_tokens,
        shape.num_segments,
        " with LoRA" if shape.lora else "",
        peak / 2**30,
    )
    return peak, shape.num_tokens, capturable


def graph_memory_estimate(sizes: list[int], vocab: int, dtype_bytes: int, activations: int, profile_tokens: int) -> int:
    """What decode graphs of batch ``sizes`` hold: each graph's float32 logits stay in the graphs'
    memory pool, the largest batch's activations (the profile's per token, plus its logits in the
    model dtype) are shared by all, and each graph's executable takes ``GRAPH_OVERHEAD_BYTES``."""
    if not sizes:
        return 0
    largest = max(sizes)
    per_token = activations / max(1, profile_tokens)
    return int(sum(sizes) * vocab * 4 + largest * (vocab * dtype_bytes + per_token) + len(sizes) * GRAPH_OVERHEAD_BYTES)
