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
def with_scales(
    adapter: LoRAAdapter, shape: BaseModelShape, base_weight: Callable[[int, str], torch.Tensor]
) -> LoRAAdapter:
    """``adapter`` with :attr:`~LoRAAdapter.dora_scales` filled (itself when it is not DoRA).

    :param base_weight: ``(layer, fused name) -> [out_total, in]``, the base model's full (unsharded)
        weight of that projection, on any device.
    """
    if not adapter.is_dora:
        return adapter
    scales = {}
    for (layer, fused), magnitude in adapter.magnitudes.items():
        A, B = adapter.weights[(layer, fused)]
        W = base_weight(layer, fused)
        offsets = shape.output_offsets(fused)
        r = A.shape[0] // len(FUSED_MODULES[fused])
        A32, B32 = A.to(W.device, torch.float32), B.to(W.device, torch.float32)
        norms = torch.empty(offsets[-1], dtype=torch.float32, device=W.device)
        for i, (lo, hi) in enumerate(zip(offsets, offsets[1:])):  # slice i's B rows meet only its A rows
            merged = W[lo:hi].float() + adapter.scaling * (B32[lo:hi] @ A32[i * r : (i + 1) * r])
            norms[lo:hi] = torch.linalg.norm(merged, dim=1)
        scale = magnitude / norms.cpu()
        scales[(layer, fused)] = torch.where(torch.isnan(magnitude), torch.ones_like(scale), scale)
    return dataclasses.replace(adapter, dora_scales=scales)


def dora_refusal(backend: Any, tensor_parallel: bool) -> str | None:
    """Why this engine cannot serve DoRA adapters, or None."""
    if tensor_parallel:
        return "DoRA adapters are not supported with --tp-size > 1 yet; serve it with --tp-size 1"
    if not getattr(backend, "supports_dora", False):
        return (
            f"LoRA backend {backend.name!r} does not support DoRA; serve it with --lora-backend csgmv, triton or torch"
        )
    return None


class DoraScales:
    """An engine's side of DoRA: why it cannot serve DoRA adapters (None when it can) and the base
    weights it computes their scales against (``model.lora_targets()``, read only)."""

    def __init__(self, model: torch.nn.Module, backend: Any, shape: BaseModelShape, tensor_parallel: bool):
        self.refusal = dora_refusal(backend, tensor_parallel)
        self.shape = shape
        self._layers = {(layer, name): module for layer, name, module in model.lora_targets()}

    def with_scales(self, adapter: LoRAAdapter) -> LoRAAdapter:
        """``adapter`` ready to serve: with its DoRA scales (:func:`with_scales`), or UserError when
        it is a DoRA adapter this engine cannot serve; a plain LoRA adapter is returned as is."""
        if not adapter.is_dora:
            return adapter
        if self.refusal:
            raise UserError(f"adapter {adapter.name!r} is a DoRA adapter: {self.refusal}")
        return with_scales(adapter, self.shape, lambda layer, fused: self._layers[(layer, fused)].weight)
