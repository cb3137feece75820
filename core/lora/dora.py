"""DoRA: the per-output-feature scale of a DoRA adapter, computed against the base weights, and
its application to the rows of DoRA slots.

PEFT's DoRA layer (``peft.tuners.lora.dora.DoraLinearLayer``) outputs
``base(x) + (g - 1) * (x @ W^T) + g * s * (x @ A^T) @ B^T`` with ``g = m / ||W + s * B @ A||``, the
norm taken over the input dimension of each output row and treated as a constant (detached); the
bias is outside the scaled part. ``g`` depends only on the weights, so :func:`with_scales` computes it
once per fused projection when the engine loads the adapter (in float32; slices of a fused
projection without DoRA get 1). At serving time the backend adds the delta into ``out`` as for any
LoRA; then ``backend.apply_dora`` (a torch default in :class:`~loraserve.contract.LoRABackend`, one
Triton kernel in the Triton backends) rewrites the rows of DoRA slots as
``out + (g - 1) * (out - bias)``, which equals PEFT's output since ``out - bias`` is
``x @ W^T + delta``. Rows of other slots are never written. Eager steps run that pass only when
they have DoRA rows; captured decode steps run it with ``--enable-dora-cuda-graph`` (otherwise a
decode step with DoRA rows runs eagerly). The scales live in the pool's ``dora_scale`` buffers and
the per-slot ``dora_flags`` (:class:`~loraserve.lora.pools.GpuAdapterPool`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from loraserve.errors import UserError
from loraserve.lora.adapter import BaseModelShape, LoRAAdapter
from loraserve.lora.targets import FUSED_MODULES


@torch.no_grad()
def with_scales(adapter: LoRAAdapter, module_of: Callable[[int, str], Any]) -> LoRAAdapter:
    """``adapter`` with :attr:`~LoRAAdapter.dora_scales` filled (itself when it is not DoRA).

    :param module_of: ``(layer, fused name) -> layer``, the base model's projection (its ``weight``,
        read only, and its shard layout with tensor parallelism).

    With tensor parallelism each rank computes the scales of its own output rows, from its shard of
    the base weight and the matching part of A and B. A column-parallel projection holds whole
    input rows, so its norms are exact here; a row-parallel one holds a slice of every row, so this
    rank's squared norms are partial sums, kept in :attr:`~LoRAAdapter.dora_partial` until
    :func:`finish_scales` adds the ranks' parts (a collective, run when a slot is filled).
    """
    if not adapter.is_dora:
        return adapter
    scales, partial = {}, {}
    for (layer, fused), magnitude in adapter.magnitudes.items():
        A, B = adapter.weights[(layer, fused)]
        module = module_of(layer, fused)
        spec = getattr(module, "shard_spec", None)
        if spec is not None and spec[0] == "column":  # this rank's rows of every slice
            B, magnitude = module.shard_of(B, "weight"), module.shard_of(magnitude, "bias")
        elif spec is not None and spec[0] == "row":  # this rank's input columns
            A = module.shard_of(A, "weight")
        r = A.shape[0] // len(FUSED_MODULES[fused])
        squared = _squared_norms(module.weight, A, B, adapter.scaling, module.output_offsets, r)
        if spec is not None and spec[0] == "row":
            partial[(layer, fused)] = (magnitude, squared)
        else:
            scales[(layer, fused)] = _scale(magnitude, squared)
    return dataclasses.replace(adapter, dora_scales=scales, dora_partial=partial)


def _squared_norms(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, offsets, r: int) -> torch.Tensor:
    """Float32 squared norm of each row of ``W + scaling * B @ A`` (slice ``i``'s B rows meet only
    its A rows ``i*r:(i+1)*r``), on the host."""
    A32, B32 = A.to(W.device, torch.float32), B.to(W.device, torch.float32)
    out = torch.empty(offsets[-1], dtype=torch.float32, device=W.device)
    for i, (lo, hi) in enumerate(zip(offsets, offsets[1:])):
        merged = W[lo:hi].float() + scaling * (B32[lo:hi] @ A32[i * r : (i + 1) * r])
        out[lo:hi] = merged.square().sum(dim=1)
    return out.cpu()


def _scale(magnitude: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
    scale = magnitude / squared.sqrt()
    return torch.where(torch.isnan(magnitude), torch.ones_like(scale), scale)


@torch.no_grad()
def finish_scales(adapter: Any, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> Any:
    """``adapter`` with the scales of its row-parallel projections completed: the ranks' partial
    squared norms summed by ``all_reduce`` (one collective for all of them) into scales. Every rank
    must call it for the same adapters in the same order (tensor parallelism calls it for each slot
    fill, which every rank replays in order); itself when nothing is partial."""
    partial = getattr(adapter, "dora_partial", None)
    if not partial:
        return adapter
    if all_reduce is None:
        raise RuntimeError("partial DoRA norms need the tensor-parallel group's all-reduce")
    keys = sorted(partial)
    total = all_reduce(torch.cat([partial[k][1] for k in keys]))
    scales, offset = dict(adapter.dora_scales), 0
    for key in keys:
        magnitude, squared = partial[key]
        scales[key] = _scale(magnitude, total[offset : offset + squared.numel()])
        offset += squared.numel()
    return dataclasses.replace(adapter, dora_scales=scales, dora_partial={})


def dora_refusal(backend: Any) -> str | None:
    """Why this engine cannot serve DoRA adapters, or None."""
    if not getattr(backend, "supports_dora", False):
        return (
            f"LoRA backend {backend.name!r} does not support DoRA; serve it with --lora-backend csgmv, triton or torch"
        )
    return None


class DoraScales:
    """An engine's side of DoRA: why it cannot serve DoRA adapters (None when it can), the base
    weights it computes their scales against (``model.lora_targets()``, read only), and with tensor
    parallelism the collective that completes row-parallel scales (:meth:`finish`)."""

    def __init__(self, model: torch.nn.Module, backend: Any, shape: BaseModelShape):
        self.refusal = dora_refusal(backend)
        self.shape = shape
        self._layers = {(layer, name): module for layer, name, module in model.lora_targets()}
        self._tp = next((m.tp for m in self._layers.values() if getattr(m, "parallel", None)), None)

    def with_scales(self, adapter: LoRAAdapter) -> LoRAAdapter:
        """``adapter`` ready to serve: with its DoRA scales (:func:`with_scales`), or UserError when
        it is a DoRA adapter this engine cannot serve; a plain LoRA adapter is returned as is."""
        if not adapter.is_dora:
            return adapter
        if self.refusal:
            raise UserError(f"adapter {adapter.name!r} is a DoRA adapter: {self.refusal}")
        return with_scales(adapter, lambda layer, fused: self._layers[(layer, fused)])

    def finish(self, adapter: Any) -> Any:
        """:func:`finish_scales` over this rank's tensor-parallel group (the reduction runs on the
        model's device, then the scales come back to the host)."""
        if adapter is None or not getattr(adapter, "dora_partial", None):
            return adapter
        tp, device = self._tp, next(iter(self._layers.values())).weight.device

        def all_reduce(x: torch.Tensor) -> torch.Tensor:
            return tp.all_reduce(x.to(device)).cpu()

        return finish_scales(adapter, all_reduce if tp is not None else None)
