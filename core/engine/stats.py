"""The engine's state and settings as plain data, for ``/metrics`` and ``/get_server_info``.

:func:`take_stats` builds the :class:`EngineStats` snapshot (queue lengths, KV-cache blocks, step
counts and, with LoRA, slots, the host cache, counters, which memory tier holds each adapter, which
version and weights (identity) each name serves, and vLLM's ``lora_requests_info``); run it on the
engine thread between steps (``Engine.stats`` does), so the numbers belong together. Adapter names
in it are only names of registered adapters or of admitted requests, so metric label values stay
bounded. :func:`effective_settings` tells the
settings as the built engine runs them.
"""

from __future__ import annotations

import time
from typing import Any

from loraserve.contract import EngineStats


def take_stats(
    scheduler: Any,
    allocator: Any,
    lora: Any,
    step_stats: dict[str, list],
    max_loras_per_batch: int,
    step_timing: dict[str, list] | None = None,
) -> EngineStats:
    """The snapshot of one engine: its scheduler, KV allocator, LoRA manager (None without LoRA),
    ``{kind: [steps, seconds]}`` and ``{kind: [host_s, gpu_s, gpu_steps]}``."""
    snap: EngineStats = {
        "waiting": len(scheduler.waiting),
        "running": len(scheduler.running),
        "kv_blocks_total": allocator.num_blocks,
        "kv_blocks_free": allocator.num_free,
        "steps": {k: list(v) for k, v in step_stats.items()},
    }
    cache = allocator.prefix_cache
    if cache is not None:
        snap["prefix_cache"] = {
            "cached_blocks": cache.num_cached,
            "evictable_blocks": cache.num_evictable,
            "queried_tokens": cache.queried_tokens,
            "hit_tokens": cache.hit_tokens,
            "evicted_blocks": cache.evicted_blocks,
        }
    if step_timing is not None:
        snap["step_timing"] = {k: {"host_s": v[0], "gpu_s": v[1], "gpu_steps": v[2]} for k, v in step_timing.items()}
    if lora is not None:
        snap.update(
            lora_slots_total=lora.pool.num_slots,
            lora_slots_in_use=len(lora.pool.resident()),
            lora_host_cached=len(lora.host),
            lora_adapters=len(lora.registry.names()),
            lora_copies_in_flight=lora.copies_in_flight,
            lora_counters=dict(lora.metrics),
            lora_residency=residency(lora),
            lora_adapter_info=[
                (ref.name, ref.version, f"blake2b:{ref.identity}")
                for ref in sorted(lora.registry.refs(), key=lambda r: r.name)
            ],
            lora_requests_info=lora_requests_info(scheduler, max_loras_per_batch),
        )
        if getattr(lora, "store", None) is not None:
            snap["lora_store"] = lora.store.stats()
    return snap


def residency(lora: Any) -> list[tuple[str, int, bool, bool, bool]]:
    """``(adapter, rank, pinned, in a GPU slot, in the host cache)`` of each registered adapter.

    Only registered adapters are listed: an adapter being unloaded leaves the list at once (its
    weights may stay in memory until its last request finishes), and the base model's slot key is
    no adapter. A slot whose copy is still in flight (overlap loading) counts as GPU-resident: the
    adapter needs no further copy."""
    gpu, host = set(lora.pool.resident()), set(lora.host.keys())
    return [
        (ref.name, ref.rank, ref.pinned, ref.key in gpu, ref.key in host)
        for ref in sorted(lora.registry.refs(), key=lambda r: r.name)
    ]


def lora_requests_info(scheduler: Any, max_loras_per_batch: int) -> dict[str, Any]:
    """vLLM's ``lora_requests_info``: the adapters of running and of waiting requests, the adapters
    a batch may hold, and when this was seen (unix seconds)."""

    def names(requests: Any) -> str:
        return ",".join(sorted({r.adapter for r in requests if r.adapter}))

    return {
        "running": names(scheduler.running),
        "waiting": names(scheduler.waiting),
        "max_lora": max_loras_per_batch,
        "time": time.time(),
    }


def effective_settings(
    settings: Any,
    *,
    device: Any,
    dtype: Any,
    model_name: str,
    context_len: int,
    kv_tokens: int,
    max_prompt_chars: int,
    scheduler: Any,
    runner: Any,
    lora: Any,
    backend_name: str,
    attention_name: str,
) -> dict[str, Any]:
    """``settings`` as JSON with every ``auto``/unset input replaced by what the engine chose (device,
    dtype, backends, KV-cache tokens, batch limits, LoRA limits); the API key redacted."""
    info = settings.model_dump(mode="json")
    if info.get("api_key"):
        info["api_key"] = "<set>"  # never echo the secret
    graphs = getattr(runner, "graphs", None)
    info.update(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        attention_backend=attention_name,
        served_model_name=model_name,
        context_length=context_len,
        max_total_tokens=kv_tokens,
        max_prompt_chars=max_prompt_chars,
        max_running_requests=scheduler.max_running,
        chunked_prefill_size=scheduler.chunk_size,
        cuda_graph_max_bs=max(graphs.sizes) if graphs is not None else None,
        disable_cuda_graph=graphs is None,
        enable_lora=lora is not None,
        lora_backend=backend_name if lora is not None else None,
    )
    if lora is not None:
        info.update(
            max_lora_rank=lora.max_rank,
            lora_target_modules=list(lora.target_modules),
            max_loaded_loras=lora.host.capacity,
        )
    return info
