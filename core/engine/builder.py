"""Building an engine's parts from settings: model, tokenizer, KV cache, LoRA pools, scheduler.

Kept apart from ``engine.py`` so the engine reads as the step loop and its API. The sizing
decisions sit here (how many KV tokens) and in :mod:`~loraserve.engine.lora_builder` (which LoRA
rank and modules).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from loraserve.contract import AttentionSpec
from loraserve.engine.kv_sizing import BLOCK_SIZE, kv_budget_tokens
from loraserve.engine.lora_builder import build_lora
from loraserve.errors import ConfigError
from loraserve.model_loader import load_model, load_tokenizer, resolve_model_source
from loraserve.models.dtypes import to_torch_device, to_torch_dtype
from loraserve.runner.model_runner import ModelRunner
from loraserve.runner.sampler import Sampler
from loraserve.runner.warmup_plan import StepLimits
from loraserve.sched.kv_cache import KVCache
from loraserve.sched.scheduler import Scheduler
from loraserve.settings import Settings

if TYPE_CHECKING:
    from loraserve.lora.manager import LoRAManager
    from loraserve.runner.cuda_graph import DecodeGraphs

logger = logging.getLogger("loraserve.engine.engine")


@dataclass
class Components:
    device: torch.device
    dtype: torch.dtype
    model: torch.nn.Module
    config: Any
    tokenizer: Any
    model_name: str
    context_len: int
    kv: KVCache
    scheduler: Scheduler
    runner: ModelRunner
    sampler: Sampler
    lora: Any
    backend_name: str
    attention_name: str
    eos_token_ids: set[int]


def build_components(
    settings: Settings,
    plugins: Any,
    run_in_engine: Callable,
    tp_rank: int = 0,
    *,
    send_step: Callable[[list], None] | None = None,
    mirror_lora: Callable[[tuple], None] | None = None,
) -> Components:
    """Every part of one engine, or of rank ``tp_rank``'s shard with ``--tp-size > 1`` (the process
    group must be initialised; every rank calls this at the same time: the sizing, the CUDA-graph
    capture and the warm-up run collectives). On rank 0 of several, ``send_step`` and ``mirror_lora``
    (the :class:`~loraserve.engine.tp.TPDriver`'s) hand every step and LoRA slot decision to the others."""
    device, tp = device_and_tp(settings, tp_rank)
    dtype = to_torch_dtype(settings.resolved_dtype(), device)
    backend_name, attention_name = choose_plugins(settings, plugins, device.type)
    source = resolve_model_source(settings)
    model, config = load_model(settings, plugins, device, dtype, source=source, tp=tp)
    tokenizer = load_tokenizer_or_none(settings, source)
    context_len = settings.context_length or getattr(config, "max_position_embeddings", None) or 4096
    # The scheduler asks the LoRA manager whether a request may join a step, and the manager reads
    # the scheduler's queues. The manager comes first (its slots take memory before the KV cache is
    # sized from what is left), so it gets the queues as callables it calls only once both exist.
    lora = build_lora(
        settings,
        plugins,
        model,
        backend_name,
        device,
        dtype,
        run_in_engine,
        mirror=mirror_lora,
        running=lambda: scheduler.running,
        waiting=lambda: scheduler.waiting,
    )
    limits = step_limits(settings, device, context_len)
    kv = build_kv_cache(settings, model, device, dtype, tp, (plugins, attention_name, backend_name, lora, limits))
    scheduler = build_scheduler(settings, kv, device, lora)
    max_running = scheduler.max_running
    runner = build_runner(
        settings, plugins, attention_name, backend_name, model, kv, lora, device, max_running, context_len, send_step
    )
    warm_up_unless_skipped(settings, model, kv, runner, device, limits, lora)
    return Components(
        device=device,
        dtype=dtype,
        model=model,
        config=config,
        tokenizer=tokenizer,
        model_name=settings.served_model_name or source.name,
        context_len=context_len,
        kv=kv,
        scheduler=scheduler,
        runner=runner,
        sampler=Sampler(seed=settings.random_seed),
        lora=lora,
        backend_name=backend_name,
        attention_name=attention_name,
        eos_token_ids=eos_ids(config, tokenizer, source),
    )


def device_and_tp(settings: Settings, tp_rank: int) -> tuple[torch.device, Any]:
    """The device this rank runs on, and its :class:`~loraserve.distributed.TensorParallel` (None
    with ``--tp-size 1``)."""
    device = to_torch_device(settings.resolved_device())
    tp = None
    if settings.tp_size > 1:
        from loraserve.distributed import TensorParallel

        tp = TensorParallel(tp_rank, settings.tp_size)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
    return device, tp


def build_runner(
    settings: Settings,
    plugins: Any,
    attention_name: str,
    backend_name: str,
    model: torch.nn.Module,
    kv: KVCache,
    lora: LoRAManager | None,
    device: torch.device,
    max_running: int,
    context_len: int,
    send_step: Callable[[list], None] | None,
) -> ModelRunner:
    """The model runner, with the attention backend ``attention_name`` over the KV cache (for up to
    ``max_running`` sequences of up to ``context_len`` tokens) and its decode graphs, if any;
    ``send_step`` (tensor parallelism) sees every step first."""
    attention = plugins.attention_backends.create(
        attention_name,
        AttentionSpec(
            kv=kv,
            device=device,
            sliding_window=getattr(model, "sliding_window", None),
            max_seqs=max_running,
            context_len=context_len,
        ),
    )
    graphs = build_decode_graphs(settings, model, attention, lora, device, max_running, backend_name)
    return ModelRunner(
        model,
        kv,
        device,
        prepare_lora=lora.prepare if lora is not None else None,
        attention=attention,
        graphs=graphs,
        before_step=send_step,
    )


def load_tokenizer_or_none(settings: Settings, source: Any) -> Any:
    """The model's tokenizer; None (requests must send input_ids) when the model has none and no
    ``--tokenizer-path`` was given."""
    try:
        return load_tokenizer(settings, source)
    except ConfigError as exc:
        if settings.tokenizer_path is not None:
            raise
        logger.warning("%s; serving without a tokenizer: requests must send input_ids", exc)
        return None


def build_kv_cache(
    settings: Settings,
    model: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    tp: Any,
    profile: tuple | None = None,
) -> KVCache:
    """The paged KV cache, sized from ``--max-total-tokens`` or the memory left (every rank of ``tp``
    the same). On CUDA the memory left is measured by a profile run with ``profile``, the plugin
    manager, the attention and LoRA backends' names, the LoRA manager and the step limits
    (:func:`measure_headroom`)."""
    kv_tokens = settings.max_total_tokens
    if kv_tokens is None:
        activations = graphs = 0
        if device.type == "cuda" and profile is not None:
            activations, graphs = measure_headroom(settings, model, device, dtype, *profile)
        hint = f"(--max-prefill-tokens {settings.max_prefill_tokens}) "
        kv_tokens = kv_budget_tokens(model, device, dtype, settings.mem_fraction_static, activations, graphs, hint)
    if tp is not None:  # every rank must hold the same blocks: the smallest budget wins
        kv_tokens = min_over_ranks(kv_tokens, device)
    num_blocks = max(1, kv_tokens // BLOCK_SIZE)
    kv = KVCache(
        model.num_layers,
        model.num_kv_heads,
        model.head_dim,
        num_blocks,
        BLOCK_SIZE,
        dtype,
        device,
        prefix_caching=not settings.disable_radix_cache,
    )
    logger.info(
        "KV cache: %d tokens (%d blocks of %d)%s",
        num_blocks * BLOCK_SIZE,
        num_blocks,
        BLOCK_SIZE,
        "" if settings.disable_radix_cache else "; prefix cache on",
    )
    return kv


def warm_up_unless_skipped(
    settings: Settings,
    model: torch.nn.Module,
    kv: KVCache,
    runner: ModelRunner,
    device: torch.device,
    limits: StepLimits,
    lora: LoRAManager | None,
) -> None:
    """On CUDA, unless ``--skip-server-warmup``: compile every kernel variant a step can need
    (:func:`~loraserve.runner.warmup.warm_up`, with the limits of the KV cache built)."""
    if device.type == "cuda" and not settings.skip_server_warmup:
        from loraserve.runner.warmup import warm_up

        warm_up(model, kv, runner.attention, device, limits.within(kv.allocator.capacity_tokens), lora)


def scheduler_limits(settings: Settings, device: torch.device) -> tuple[int, int, int]:
    """``(max_running, step_tokens, chunk_size)`` of the scheduler, from the flags or the device's defaults."""
    cuda = device.type == "cuda"
    return (
        settings.max_running_requests or (256 if cuda else 64),
        settings.max_prefill_tokens,
        settings.chunked_prefill_size or (8192 if cuda else 512),
    )


def step_limits(settings: Settings, device: torch.device, context_len: int) -> StepLimits:
    """The largest steps the scheduler may run (a chunk is never longer than the context)."""
    max_running, step_tokens, chunk = scheduler_limits(settings, device)
    return StepLimits(max_running, step_tokens, min(chunk, context_len))


def measure_headroom(
    settings: Settings,
    model: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    plugins: Any,
    attention_name: str,
    backend_name: str,
    lora: LoRAManager | None,
    limits: StepLimits,
) -> tuple[int, int]:
    """``(activations, graphs)``: the profile run's peak and the decode graphs' estimate, in bytes
    (:mod:`~loraserve.engine.kv_sizing`; CUDA only)."""
    from loraserve.engine.kv_sizing import graph_memory_estimate, profile_step
    from loraserve.runner.cuda_graph import capture_sizes

    peak, tokens, capturable = profile_step(model, plugins, attention_name, lora, device, dtype, limits)
    max_bs, _ = graph_batch_size(settings, device, capturable, attention_name, lora, limits.max_running, backend_name)
    if max_bs is None:
        return peak, 0
    sizes = capture_sizes(max_bs)
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    return peak, graph_memory_estimate(sizes, model.vocab_size, dtype_bytes, peak, tokens)


def build_scheduler(settings: Settings, kv: KVCache, device: torch.device, lora: LoRAManager | None) -> Scheduler:
    """The scheduler; the LoRA manager, if any, answers whether a request may join a step."""
    max_running, step_tokens, chunk_size = scheduler_limits(settings, device)
    return Scheduler(
        kv,
        max_running=max_running,
        step_tokens=step_tokens,
        chunk_size=chunk_size,
        can_join=lora.can_join if lora is not None else None,
    )


def build_decode_graphs(
    settings: Settings,
    model: torch.nn.Module,
    attention: Any,
    lora: LoRAManager | None,
    device: torch.device,
    max_running: int,
    backend_name: str,
) -> DecodeGraphs | None:
    """Decode steps captured in CUDA graphs (:class:`~loraserve.runner.cuda_graph.DecodeGraphs`), or
    None: not on CUDA, ``--disable-cuda-graph``, or a step that reads host data (logged)."""
    max_bs, why_not = graph_batch_size(
        settings, device, attention.graph_capturable, attention.name, lora, max_running, backend_name
    )
    if why_not is not None:
        logger.warning("decode steps run without CUDA graphs: %s (--disable-cuda-graph silences this)", why_not)
    if max_bs is None:
        return None
    from loraserve.runner.cuda_graph import DecodeGraphs

    if lora is not None:
        lora.init_graph_buffers(max_bs)
    free_before = torch.cuda.mem_get_info(device)[0]
    graphs = DecodeGraphs(model, attention, lora, device, max_bs)
    graphs.capture()
    logger.info("CUDA graphs hold %.2f GiB", (free_before - torch.cuda.mem_get_info(device)[0]) / 2**30)
    return graphs


def graph_batch_size(
    settings: Settings,
    device: torch.device,
    attention_capturable: bool,
    attention_name: str,
    lora: LoRAManager | None,
    max_running: int,
    backend_name: str,
) -> tuple[int | None, str | None]:
    """The largest decode batch captured in a CUDA graph, or None; and why a step cannot be captured
    (None when it can, or graphs are off: not on CUDA, or ``--disable-cuda-graph``)."""
    if device.type != "cuda" or settings.disable_cuda_graph:
        return None, None
    if not attention_capturable:
        return None, f"attention backend {attention_name!r} cannot run in CUDA graphs (use --attention-backend triton)"
    if lora is not None and not lora.graph_capturable:
        return None, (
            f"LoRA backend {backend_name!r} (or LoRA on embed_tokens/lm_head) reads host data; "
            "use --lora-backend csgmv or triton"
        )
    from loraserve.runner.cuda_graph import DEFAULT_MAX_BS

    return min(settings.cuda_graph_max_bs or min(max_running, DEFAULT_MAX_BS), max_running), None


def choose_plugins(settings: Settings, plugins: Any, device_type: str) -> tuple[str, str]:
    """The LoRA and attention backends' names: the flags', else the registered one with the highest
    priority on the device. Raises a ConfigError listing the registered names when a flag names an
    unknown backend or eviction policy."""
    backend = settings.lora_backend or plugins.backends.default_for(device_type)
    attention = settings.attention_backend or plugins.attention_backends.default_for(device_type)
    plugins.backends.get(backend)
    plugins.attention_backends.get(attention)
    plugins.eviction_policies.get(settings.lora_eviction_policy)
    return backend, attention


def min_over_ranks(value: int, device: torch.device) -> int:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def eos_ids(config: Any, tokenizer: Any, source: Any) -> set[int]:
    """EOS ids from generation_config.json (as transformers' generate uses), the config and the tokenizer."""
    ids: set[int] = set()
    candidates = [getattr(config, "eos_token_id", None)]
    gen_path = source.model_dir / "generation_config.json"
    if gen_path.is_file():
        import json

        candidates.append(json.loads(gen_path.read_text()).get("eos_token_id"))
    if tokenizer is not None:
        candidates.append(tokenizer.eos_token_id)
    for c in candidates:
        if isinstance(c, int):
            ids.add(c)
        elif isinstance(c, (list, tuple)):
            ids.update(int(x) for x in c)
    return ids
