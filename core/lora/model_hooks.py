"""LoRA's side of the model: the GPU slot pool shaped to the model's targeted layers, and the hooks
on those layers that add each step's LoRA delta.

:func:`make_pool` sizes the pool from the layers the model offers (local sizes under tensor
parallelism) and the target modules; :class:`LoRAModelHooks` attaches one hook per targeted layer
(and to ``embed_tokens`` / ``lm_head`` when targeted) and holds the per-step state those hooks
read, which the :class:`~loraserve.lora.manager.LoRAManager` sets before each step.
"""

from __future__ import annotations

from typing import Any

import torch

from loraserve.contract import LoRABatchInfo
from loraserve.errors import ConfigError, UserError
from loraserve.lora.adapter import BaseModelShape
from loraserve.lora.pools import GpuAdapterPool
from loraserve.lora.targets import EMBEDDING_MODULES, FUSED_MODULES


def make_pool(
    model: torch.nn.Module,
    settings: Any,
    plugins: Any,
    backend: Any,
    shape: BaseModelShape,
    max_rank: int,
    target_modules: list[str],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[GpuAdapterPool, dict]:
    """The GPU slot pool for the targeted modules of ``model``, and the modules whose base GEMM
    may do the shrink (``{name: (in_dim, output offsets)}``)."""
    # local sizes under tensor parallelism; ``shard`` tells the pool how to cut full adapters
    modules, layers, shard = {}, {}, {}
    for layer, name, module in model.lora_targets():
        if any(m in target_modules for m in FUSED_MODULES[name]):
            modules[name] = (module.input_size, tuple(module.output_offsets))
            layers[(layer, name)] = module
            if getattr(module, "shard_spec", None) is not None:
                shard[name] = module.shard_spec
    extra = {}
    tp_size = getattr(getattr(model, "tp", None), "size", 1)
    if tp_size > 1 and any(m in target_modules for m in EMBEDDING_MODULES):
        raise ConfigError(
            f"LoRA on embed_tokens/lm_head is not supported with --tp-size {tp_size} > 1 (they are "
            "vocab-parallel); drop them from --lora-target-modules or use --tp-size 1"
        )
    if "embed_tokens" in target_modules or "lm_head" in target_modules:
        if not backend.supports_embedding:
            raise UserError(
                f"LoRA backend {backend.name!r} does not support LoRA on embed_tokens/lm_head; "
                "use --lora-backend torch or drop them from --lora-target-modules"
            )
        if "embed_tokens" in target_modules:
            extra["embed_tokens"] = (shape.vocab_size, shape.hidden_size)
        if "lm_head" in target_modules:
            extra["lm_head"] = (shape.hidden_size, shape.vocab_size)
    # a backend that can take the shrink from the base GEMM gets each layer's A buffer as rows
    # appended to that layer's weight (one allocation; the GEMM then reads x once for both)
    a_storage = None
    if getattr(backend, "supports_shrink_in_gemm", False):
        a_storage = lambda layer, name, rows: layers[(layer, name)].append_rows(rows)  # noqa: E731
    dora = bool(getattr(backend, "supports_dora", False))
    pool = GpuAdapterPool(
        settings.max_loras_per_batch,
        max_rank,
        shape.num_layers,
        modules,
        extra,
        dtype,
        device,
        plugins.eviction_policies.create(settings.lora_eviction_policy),
        a_storage=a_storage,
        shard=shard,
        dora=dora,
    )
    return pool, modules if a_storage is not None else {}


class LoRAModelHooks:
    """The LoRA hooks attached to ``model``'s targeted layers on construction, and the per-step
    state they read (engine thread): ``active`` (some request of the step has a LoRA delta),
    ``shrink_in_gemm_now`` (per fused module, whether its base GEMM does the shrink this step) and
    ``logits_info`` (the batch info of the sampled rows, for LoRA on lm_head) and ``dora`` (whether
    DoRA's scaling pass runs, see :mod:`~loraserve.lora.dora`). :meth:`begin_step`
    and :meth:`set_logits_info` change that state; nothing else does."""

    def __init__(
        self,
        model: torch.nn.Module,
        backend: Any,
        pool: GpuAdapterPool,
        max_rank: int,
        shrink_in_gemm_modules: dict,
        vocab_size: int,
    ):
        self.backend, self.pool, self.max_rank = backend, pool, max_rank
        #: the fused modules whose base GEMM may do the shrink: ``{name: (in_dim, output offsets)}``
        self.shrink_in_gemm_modules = shrink_in_gemm_modules
        self.active = False
        self.logits_info: LoRABatchInfo | None = None
        #: whether this step scales the rows of DoRA slots (``backend.apply_dora`` after each delta)
        self.dora = False
        self.shrink_in_gemm_now: dict[str, bool] = {}
        self._install(model, vocab_size)

    # -- per-step state (engine thread) -----------------------------------------------------------

    def begin_step(self, active: bool, num_tokens: int, dora: bool = False) -> None:
        """Set the hooks up for a step of ``num_tokens`` rows: on when ``active``, the shrink-in-GEMM
        choice made for this step, whether the rows of DoRA slots are scaled (``dora``: the step has
        some, or a decode step is captured for any), and no sampled-rows batch info
        (:meth:`set_logits_info` sets it)."""
        self.active, self.logits_info, self.shrink_in_gemm_now = active, None, {}
        self.dora = dora and active and self.pool.dora_flags is not None
        if active:
            self.shrink_in_gemm_now = self._shrink_in_gemm_decisions(num_tokens)

    def set_logits_info(self, info: LoRABatchInfo | None) -> None:
        """The batch info the lm_head hook switches the backend to (one row per sampled chunk)."""
        self.logits_info = info

    def _shrink_in_gemm_decisions(self, num_tokens: int) -> dict[str, bool]:
        """Per fused module, whether its base GEMM does the shrink this step. From host integers only
        (tokens, shapes), so a captured step replays the same choice."""
        return {
            name: self.backend.wants_shrink_in_gemm(
                num_tokens, in_dim, offs[-1], len(offs) - 1, self.max_rank, self.pool.num_slots
            )
            for name, (in_dim, offs) in self.shrink_in_gemm_modules.items()
        }

    # -- the hooks ----------------------------------------------------------------------------------

    def _install(self, model: torch.nn.Module, vocab_size: int) -> None:
        pool = self.pool
        for layer, name, module in model.lora_targets():
            if (layer, name) in pool.A:
                in_gemm = (
                    (lambda name=name: self.shrink_in_gemm_now.get(name, False))
                    if name in self.shrink_in_gemm_modules
                    else None
                )
                hook = self._linear_hook(
                    pool.A[(layer, name)],
                    pool.B[(layer, name)],
                    pool.offsets[name],
                    pool.dora_scale.get((layer, name)),
                    module.added_bias,
                )
                module.attach_lora(hook, shrink_in_gemm=in_gemm)
        if (-1, "lm_head") in pool.A:
            A, B, vocab = pool.A[(-1, "lm_head")], pool.B[(-1, "lm_head")], vocab_size

            def lm_head_hook(x, out, A=A, B=B, vocab=vocab):
                # logits are computed for the sampled rows only (one per sampling chunk), after every
                # layer ran: switch the backend to that step's one-token-per-request batch info
                if self.logits_info is not None:
                    self.backend.prepare(self.logits_info)
                    self.backend.run_lora(x, A, B, out, (0, vocab))

            model.lm_head.attach_lora(lm_head_hook)
        if (-1, "embed_tokens") in pool.A:
            A, B = pool.A[(-1, "embed_tokens")], pool.B[(-1, "embed_tokens")]

            def embed_hook(input_ids, out, A=A, B=B):
                if self.active:
                    self.backend.run_lora_embedding(input_ids, A, B, out)

            model.model.embed_tokens.attach_lora(embed_hook)

    def _linear_hook(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        offsets: tuple[int, ...],
        dora_scale: torch.Tensor | None,
        bias: torch.Tensor | None,
    ):
        def hook(x, out, shrunk=None, defer=False):
            """Add the delta into ``out``; with ``defer`` (the layer's consumer can add it) the
            backend may instead return a LoRAEpilogue for that consumer, which is returned. Rows of
            DoRA slots are then scaled (never deferred: the scale needs the summed output)."""
            dora = self.dora and dora_scale is not None
            if shrunk is not None:  # the base GEMM did the shrink (only on steps where shrink_in_gemm_now says so)
                if defer and not dora:
                    epilogue = self.backend.expand_epilogue(B, offsets, shrunk)
                    if epilogue is not None:
                        return epilogue
                self.backend.run_lora(x, A, B, out, offsets, shrunk=shrunk)
            elif self.active:
                self.backend.run_lora(x, A, B, out, offsets)
            if dora:
                self.backend.apply_dora(out, bias, dora_scale, self.pool.dora_flags)
            return None

        return hook
