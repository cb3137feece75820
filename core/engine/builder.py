"""Building an engine's parts from settings: model, tokenizer, KV cache, LoRA pools, scheduler.

Kept apart from ``engine.py`` so the engine reads as the step loop and its API, and the sizing
decisions (how many KV tokens, which LoRA rank and modules) sit in one place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from loraserve.errors import ConfigError
from loraserve.runner.attention import PagedSDPAAttention
from loraserve.sched.kv_cache import KVCache
from loraserve.model_loader import load_model, load_tokenizer, resolve_model_source
from loraserve.runner.model_runner import ModelRunner
from loraserve.models.dtypes import runs_triton, to_torch_device, to_torch_dtype
from loraserve.runner.sampler import Sampler
from loraserve.sched.scheduler import Scheduler
from loraserve.lora.targets import LAYER_MODULES, SUPPORTED_MODULES
from loraserve.settings import Settings

if TYPE_CHECKING:
    from loraserve.lora.policy import AdapterSourcePolicy

logger = logging.getLogger("loraserve.engine.engine")

BLOCK_SIZE = 16
CPU_KV_BUDGET_BYTES = 1 << 30
CPU_MAX_KV_TOKENS = 32768
DEFAULT_MAX_LORA_RANK = 64
CUDA_ACTIVATION_RESERVE_BYTES = 2 << 30


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
    eos_token_ids: set[int]


def build_components(settings: Settings, plugins: Any, run_in_engine: Callable, tp_rank: int = 0) -> Components:
    """Every part of one engine, or of rank ``tp_rank``'s shard with ``--tp-size > 1`` (the process
    group must be initialised; every rank calls this at the same time, since the sizing below and
    the CUDA-graph capture run collectives)."""
    device = to_torch_device(settings.resolved_device())
    tp = None
    if settings.tp_size > 1:
        from loraserve.distributed import TensorParallel

        tp = TensorParallel(tp_rank, settings.tp_size)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
    dtype = to_torch_dtype(settings.resolved_dtype(), device)
    backend_name = settings.resolved_backend()
    check_plugin_choices(settings, plugins)
    source = resolve_model_source(settings)
    model, config = load_model(settings, plugins, device, dtype, source=source, tp=tp)
    try:
        tokenizer = load_tokenizer(settings, source)
    except ConfigError as exc:
        if settings.tokenizer_path is not None:
            raise
        tokenizer = None
        logger.warning("%s; serving without a tokenizer: requests must send input_ids", exc)
    context_len = settings.context_length or getattr(config, "max_position_embeddings", None) or 4096

    lora = None
    if settings.lora_enabled:
        from loraserve.lora.manager import LoRAManager
        from loraserve.lora.policy import AdapterSourcePolicy

        policy = AdapterSourcePolicy.from_settings(settings)
        max_rank, targets = infer_lora_limits(settings, plugins, policy)
        backend = plugins.backends.create(backend_name, settings, device)
        lora = LoRAManager(settings, plugins, model, backend, max_rank, targets, device, dtype, run_in_engine,
                           policy=policy)
        logger.info("LoRA: backend %s, %d slots, max rank %d, modules %s, LoRA slot pool %.1f MiB on %s",
                    backend_name, settings.max_loras_per_batch, max_rank, ",".join(targets), lora.pool.nbytes / 2**20,
                    device.type)
        if settings.enable_lora_overlap_loading:
            if device.type == "cuda":
                from loraserve.lora.overlap import CudaStreamCopies

                lora.copy_engine, lora.pin_host = CudaStreamCopies(device), True
                logger.info("LoRA overlap loading: copies on a side stream, page-locked host copies of at most "
                            "%d adapters", settings.host_cache_capacity)
            else:
                logger.info("LoRA overlap loading has no effect on %s: adapters are copied synchronously",
                            device.type)

    kv_tokens = settings.max_total_tokens or kv_budget_tokens(model, device, dtype, settings.mem_fraction_static)
    if tp is not None:  # every rank must hold the same blocks: the smallest budget wins
        kv_tokens = min_over_ranks(kv_tokens, device)
    num_blocks = max(1, kv_tokens // BLOCK_SIZE)
    kv = KVCache(model.num_layers, model.num_kv_heads, model.head_dim, num_blocks, BLOCK_SIZE, dtype, device)
    logger.info("KV cache: %d tokens (%d blocks of %d)", num_blocks * BLOCK_SIZE, num_blocks, BLOCK_SIZE)
    cuda = device.type == "cuda"
    scheduler = Scheduler(kv, max_running=settings.max_running_requests or (256 if cuda else 64),
                          step_tokens=settings.max_prefill_tokens,
                          chunk_size=settings.chunked_prefill_size or (8192 if cuda else 512),
                          can_join=lora.can_join if lora is not None else None)
    max_running = scheduler.max_running
    attention = make_attention(settings, kv, model, device, max_running, context_len)
    runner = ModelRunner(model, kv, device, prepare_lora=lora.prepare if lora is not None else None,
                         attention=attention)
    if lora is not None:
        lora.running = lambda: scheduler.running
        lora.waiting = lambda: scheduler.waiting
    if device.type == "cuda" and not settings.disable_cuda_graph:
        why_not = None
        if settings.resolved_attention_backend() != "triton":
            why_not = "--attention-backend torch_native loops over sequences on the host"
        elif lora is not None and not lora.graph_capturable:
            why_not = (f"LoRA backend {backend_name!r} (or LoRA on embed_tokens/lm_head) reads host data; "
                       "use --lora-backend csgmv or triton")
        if why_not is None:
            from loraserve.runner.cuda_graph import DEFAULT_MAX_BS, DecodeGraphs

            max_bs = min(settings.cuda_graph_max_bs or min(max_running, DEFAULT_MAX_BS), max_running)
            if lora is not None:
                lora.init_graph_buffers(max_bs)
            runner.graphs = DecodeGraphs(model, attention, lora, device, max_bs)
            runner.graphs.capture()
        else:
            logger.warning("decode steps run without CUDA graphs: %s (--disable-cuda-graph silences this)", why_not)
    return Components(device=device, dtype=dtype, model=model, config=config, tokenizer=tokenizer,
                      model_name=settings.served_model_name or source.name, context_len=context_len, kv=kv,
                      scheduler=scheduler, runner=runner, sampler=Sampler(seed=settings.random_seed), lora=lora,
                      backend_name=backend_name, eos_token_ids=eos_ids(config, tokenizer, source))


def check_plugin_choices(settings: Settings, plugins: Any) -> None:
    """Raise a ConfigError listing the registered names when the backend or eviction policy is unknown."""
    plugins.backends.get(settings.resolved_backend())
    plugins.eviction_policies.get(settings.lora_eviction_policy)


def min_over_ranks(value: int, device: torch.device) -> int:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def make_attention(settings: Settings, kv: KVCache, model: torch.nn.Module, device: torch.device, max_seqs: int,
                   context_len: int) -> Any:
    """The attention implementation over the paged cache (``--attention-backend``)."""
    window = getattr(model, "sliding_window", None)
    if settings.resolved_attention_backend() == "torch_native":
        return PagedSDPAAttention(kv, sliding_window=window)
    if not runs_triton(device):
        raise ConfigError(f"--attention-backend triton runs Triton kernels and needs a CUDA device, not {device.type!r}; "
                          "use --attention-backend torch_native (tests may set TRITON_INTERPRET=1)")
    from loraserve.runner.attention_triton import PagedTritonAttention

    return PagedTritonAttention(kv, sliding_window=window, max_seqs=max_seqs,
                                max_blocks_per_seq=-(-context_len // kv.block_size))


def kv_budget_tokens(model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                     mem_fraction_static: float | None = None) -> int:
    """KV-cache tokens that fit the memory budget.

    On CUDA with ``--mem-fraction-static f`` (as SGLang): weights, LoRA slots and the KV cache
    together take ``f`` of the device's memory, so the cache gets ``f * total`` minus what is already
    allocated; the rest is left to activations, CUDA graphs and the allocator. Without it: free
    memory minus a 2 GiB reserve. On CPU: 1 GiB, at most 32768 tokens.
    """
    per_token = KVCache.bytes_per_token(model.num_layers, model.num_kv_heads, model.head_dim, dtype)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        if mem_fraction_static is not None:
            used = total - free
            budget = int(total * mem_fraction_static) - used
            if budget < BLOCK_SIZE * per_token:
                raise ConfigError(
                    f"--mem-fraction-static {mem_fraction_static} leaves no room for the KV cache: "
                    f"{mem_fraction_static} x {total / 2**30:.1f} GiB = {total * mem_fraction_static / 2**30:.1f} GiB, "
                    f"but {used / 2**30:.1f} GiB are already in use (weights, LoRA slots); raise it (at most 0.95) "
                    "or give --max-total-tokens")
        else:
            budget = free - CUDA_ACTIVATION_RESERVE_BYTES
        tokens = budget // per_token
    else:
        budget = CPU_KV_BUDGET_BYTES
        tokens = min(budget // per_token, CPU_MAX_KV_TOKENS)
    if tokens < BLOCK_SIZE:
        raise ConfigError(f"no memory left for the KV cache ({budget / 2**20:.0f} MiB); use a smaller model or "
                          "--max-total-tokens")
    return int(tokens)


def infer_lora_limits(settings: Settings, plugins: Any,
                      policy: AdapterSourcePolicy | None = None) -> tuple[int, list[str]]:
    """--max-lora-rank and --lora-target-modules, inferred from --lora-paths when not given (as SGLang);
    ``policy`` (an AdapterSourcePolicy) is asked before an adapter's config is read."""
    ranks, modules = [], set()
    if settings.lora_paths and (settings.max_lora_rank is None or settings.lora_target_modules is None):
        loaders = [plugins.loaders.create(r.name) for r in plugins.loaders]
        for spec in settings.lora_paths:
            if policy is not None:
                policy.check_source(spec.lora_path, runtime=False)
            loader = next((ld for ld in loaders if ld.can_load(spec.lora_path)), None)
            if loader is None:
                raise ConfigError(f"--lora-paths {spec.lora_name}={spec.lora_path}: no adapter loader can read "
                                  "it; give a PEFT adapter directory")
            summary = loader.peek(spec.lora_path, policy=policy)
            ranks.append(summary.rank)
            modules |= set(summary.target_modules)
    max_rank = settings.max_lora_rank or max(ranks, default=DEFAULT_MAX_LORA_RANK)
    if settings.lora_target_modules is not None:
        targets = list(settings.lora_target_modules)
    elif modules:
        targets = [m for m in SUPPORTED_MODULES if m in modules]
    else:
        targets = list(LAYER_MODULES)
    return max_rank, targets


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
