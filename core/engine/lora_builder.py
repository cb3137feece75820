"""Building an engine's LoRA manager from settings: the rank and target modules (inferred from
``--lora-paths`` when not given, as SGLang), the LoRA backend, and the copy engine for overlap
loading. Part of :mod:`~loraserve.engine.builder`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from loraserve.errors import ConfigError
from loraserve.lora.targets import LAYER_MODULES, SUPPORTED_MODULES
from loraserve.settings import Settings

if TYPE_CHECKING:
    from loraserve.lora.manager import LoRAManager
    from loraserve.lora.policy import AdapterSourcePolicy

logger = logging.getLogger("loraserve.engine.engine")

DEFAULT_MAX_LORA_RANK = 64


def build_lora(
    settings: Settings,
    plugins: Any,
    model: torch.nn.Module,
    backend_name: str,
    device: torch.device,
    dtype: torch.dtype,
    run_in_engine: Callable,
    *,
    mirror: Callable[[tuple], None] | None,
    running: Callable[[], list],
    waiting: Callable[[], Any],
) -> LoRAManager | None:
    """The LoRA manager and its GPU slot pool (None without LoRA); ``mirror``, ``running`` and
    ``waiting`` go to its slot admission."""
    if not settings.lora_enabled:
        return None
    from loraserve.lora.manager import LoRAManager
    from loraserve.lora.policy import AdapterSourcePolicy

    policy = AdapterSourcePolicy.from_settings(settings)
    max_rank, targets = infer_lora_limits(settings, plugins, policy)
    backend = plugins.backends.create(backend_name, settings, device)
    copy_engine = None
    if settings.enable_lora_overlap_loading and device.type == "cuda":
        from loraserve.lora.overlap import CudaStreamCopies

        copy_engine = CudaStreamCopies(device)
    lora = LoRAManager(
        settings,
        plugins,
        model,
        backend,
        max_rank,
        targets,
        device,
        dtype,
        run_in_engine,
        policy=policy,
        running=running,
        waiting=waiting,
        copy_engine=copy_engine,
        pin_host=copy_engine is not None,
        mirror=mirror,
    )
    log_lora_setup(settings, lora, backend_name, device, overlapped=copy_engine is not None)
    return lora


def log_lora_setup(
    settings: Settings, lora: LoRAManager, backend_name: str, device: torch.device, *, overlapped: bool
) -> None:
    """Log the LoRA backend, slots, rank, modules and pool size, and whether copies overlap steps."""
    logger.info(
        "LoRA: backend %s, %d slots, max rank %d, modules %s, LoRA slot pool %.1f MiB on %s",
        backend_name,
        settings.max_loras_per_batch,
        lora.max_rank,
        ",".join(lora.target_modules),
        lora.pool.nbytes / 2**20,
        device.type,
    )
    if overlapped:
        logger.info(
            "LoRA overlap loading: copies on a side stream, page-locked host copies of at most %d adapters",
            settings.host_cache_capacity,
        )
    elif settings.enable_lora_overlap_loading:
        logger.info("LoRA overlap loading has no effect on %s: adapters are copied synchronously", device.type)


def infer_lora_limits(
    settings: Settings, plugins: Any, policy: AdapterSourcePolicy | None = None
) -> tuple[int, list[str]]:
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
                raise ConfigError(
                    f"--lora-paths {spec.lora_name}={spec.lora_path}: no adapter loader can read "
                    "it; give a PEFT adapter directory"
                )
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
