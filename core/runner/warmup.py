"""Synthetic steps run before the engine serves: the warm-up, and the profile run's step.

:class:`ScratchSteps` runs a :class:`~loraserve.runner.warmup_plan.StepShape` eagerly through the
model, as the model runner runs a scheduled step, on scratch KV blocks and, for a shape with LoRA,
with a batch info of its own in which every row uses slot 0 at the pool's full rank. The pool's
buffers are only read, and at start-up they hold zeros, so no request, adapter, scheduler or pool
state is touched. :func:`warm_up` runs every shape of :func:`~loraserve.runner.warmup_plan.plan_warmup`
so that every Triton kernel variant a step can need is compiled (or loaded from Triton's on-disk
cache) before the engine reports ready, and logs how long that took; :func:`compiled_variants`
counts the variants compiled so far (the GPU tests check that serving compiles none).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from loraserve.contract import LoRABatchInfo
from loraserve.runner.model_runner import ModelRunner
from loraserve.runner.sampler import Sampler
from loraserve.runner.warmup_plan import LoRAKey, StepLimits, StepShape, coarse_lora_key, plan_warmup
from loraserve.sched.kv_cache import KVCache
from loraserve.sched.request import Request
from loraserve.sched.sampling_params import SamplingParams, TokenHistory
from loraserve.sched.scheduler import ScheduledChunk

logger = logging.getLogger("loraserve.engine.engine")

#: sampling parameters that take every path of the sampler (penalties, warping, log-probabilities)
HEAVIEST_SAMPLING = dict(
    temperature=0.7,
    top_k=50,
    top_p=0.9,
    min_p=0.05,
    repetition_penalty=1.1,
    frequency_penalty=0.1,
    presence_penalty=0.1,
    return_logprob=True,
    top_logprobs_num=5,
)


class ScratchSteps:
    """Runs synthetic steps of ``model`` over ``blocks`` of ``kv`` (shared by every sequence of a
    step: the keys written are thrown away) with ``attention``.

    :param lora: the engine's :class:`~loraserve.lora.manager.LoRAManager`, or None; a shape with
        LoRA sets its hooks up and hands its backend a batch info of the step's own.

    :meth:`sample` uses a sampler of its own, so the engine's random state is left as it was.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kv: KVCache,
        blocks: Sequence[int],
        attention: Any,
        device: torch.device,
        lora: Any = None,
    ):
        if not blocks:
            raise ValueError("scratch steps need at least one KV block")
        self.kv, self.blocks, self.device, self.lora = kv, list(blocks), device, lora
        self.sampler = Sampler(seed=0)
        self.vocab_size = getattr(model, "vocab_size", None) or model.config.vocab_size
        self._lora_on, self._dora = False, False
        prepare = self._prepare_lora if lora is not None else None
        self.runner = ModelRunner(model, kv, device, prepare_lora=prepare, attention=attention)

    def chunks(self, shape: StepShape) -> list[ScheduledChunk]:
        """The step's chunks: one sequence per segment, from position 0, on the scratch blocks."""
        bs, blocks = self.kv.block_size, self.blocks
        out = []
        for i, n in enumerate(shape.seg_lens):
            table = [blocks[j % len(blocks)] for j in range(-(-n // bs))]
            request = Request(request_id=f"warmup-{i}", prompt_ids=[0] * n, params=None, blocks=table)
            out.append(ScheduledChunk(request, 0, n))
        return out

    def run(self, shape: StepShape, dora: bool = False) -> torch.Tensor:
        """One eager forward of ``shape``; returns its float32 logits, one row per sequence. With
        ``dora`` (and LoRA) the step also runs DoRA's scaling pass (on no rows: every slot is plain)."""
        self._lora_on, self._dora = shape.lora, dora
        try:
            return self.runner.forward(self.chunks(shape))
        finally:
            if self.lora is not None:
                self.lora.hooks.begin_step(False, 0)  # leave the hooks as a step without LoRA does

    def sample(self, logits: torch.Tensor) -> Any:
        """Sample ``logits`` with every row on the sampler's heaviest path (penalties, top-k, top-p,
        min-p and log-probabilities), as a batch of that many requests could."""
        params = [SamplingParams(**HEAVIEST_SAMPLING)] * logits.shape[0]
        histories = [TokenHistory([0, 1], self.vocab_size, self.device) for _ in params]
        return self.sampler.sample(logits, params, histories)

    def _prepare_lora(self, chunks: list[ScheduledChunk]) -> None:
        lora = self.lora
        num_tokens = sum(c.num_tokens for c in chunks)
        lora.hooks.begin_step(self._lora_on, num_tokens, dora=self._dora)
        if not self._lora_on:
            return
        slots, rank = lora.pool.num_slots, lora.max_rank
        ranks, scalings = [rank] + [0] * (slots - 1), [1.0] * slots  # slot 0 at full rank: every row active
        info = LoRABatchInfo.build(
            [c.num_tokens for c in chunks], [0] * len(chunks), ranks, scalings, rank, self.device
        )
        lora.backend.prepare(info)
        if (-1, "lm_head") in lora.pool.A:
            rows = sum(c.samples for c in chunks)
            lora.hooks.set_logits_info(LoRABatchInfo.build([1] * rows, [0] * rows, ranks, scalings, rank, self.device))


def lora_variant_key(lora: Any) -> LoRAKey | None:
    """The LoRA backend's variant key over the engine's pool (``variant_keys``), a coarse one for a
    backend that states none, or None without LoRA."""
    if lora is None:
        return None
    make = getattr(lora.backend, "variant_keys", None)
    if make is None:
        return coarse_lora_key
    pool, in_gemm = lora.pool, lora.hooks.shrink_in_gemm_modules
    projections = [
        (pool.in_dims[name], offs[-1], len(offs) - 1, name in in_gemm) for name, offs in sorted(pool.offsets.items())
    ]
    return make(pool.num_slots, lora.max_rank, projections)


def warm_up(
    model: torch.nn.Module,
    kv: KVCache,
    attention: Any,
    device: torch.device,
    limits: StepLimits,
    lora: Any = None,
) -> list[StepShape]:
    """Run every step of the warm-up plan (and the sampler once) on scratch KV blocks taken from
    ``kv``'s allocator and given back; returns the shapes run. Logs the steps, the time and the
    Triton kernel variants compiled or loaded."""
    t0 = time.perf_counter()
    before = sum(compiled_variants().values())
    shapes = plan_warmup(limits, getattr(attention, "splits_for", None), lora_variant_key(lora))
    planned = time.perf_counter() - t0
    longest = max(max(s.seg_lens) for s in shapes)
    blocks = kv.allocator.allocate(min(kv.allocator.num_free, -(-longest // kv.block_size)))
    try:
        steps = ScratchSteps(model, kv, blocks, attention, device, lora)
        with torch.inference_mode():
            for shape in shapes:
                logits = steps.run(shape)
            dora = [s for s in shapes if s.lora] if lora is not None and lora.pool.dora_flags is not None else []
            if dora:  # DoRA's scaling kernel, once: it specialises on the projections, not on the step
                steps.run(min(dora, key=lambda s: s.num_tokens), dora=True)
            steps.sample(logits)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        kv.allocator.release(blocks)
    logger.info(
        "warm-up: %d steps (%d with LoRA, up to %d tokens) in %.1f s (plan %.2f s); %d Triton kernel "
        "variants compiled or loaded from the cache (--skip-server-warmup skips this)",
        len(shapes),
        sum(s.lora for s in shapes),
        max(s.num_tokens for s in shapes),
        time.perf_counter() - t0,
        planned,
        sum(compiled_variants().values()) - before,
    )
    return shapes


def compiled_variants() -> dict[str, int]:
    """``{kernel: variants}``: how many compiled variants each Triton kernel of the loaded
    ``loraserve`` modules holds now (all devices; 0 without Triton or under its interpreter)."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return {}
    counts = {}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "loraserve" or name.startswith("loraserve.")):
            continue
        for attr, obj in list(vars(module).items()):
            if isinstance(obj, JITFunction) and getattr(obj, "__module__", name) == name:
                counts[f"{name}.{attr}"] = _variants(obj)
    return counts


def _variants(fn: Any) -> int:
    """Compiled variants of one JITFunction: ``device_caches`` (Triton >= 3.0: per device a tuple
    starting with the kernel cache) or ``cache`` (older: per device a dict)."""
    caches = getattr(fn, "device_caches", None)
    if caches is not None:
        return sum(len(entry[0]) for entry in list(caches.values()) if isinstance(entry, tuple) and entry)
    cache = getattr(fn, "cache", None)
    if isinstance(cache, dict):
        return sum(len(v) for v in cache.values() if isinstance(v, dict))
    return 0
