"""The LoRA expand left to the kernel that consumes a projection's output: what it is and its eager form.

A projection's LoRA expand (``scaling * h @ B^T``, ``h`` the shrink's output) may be left to the
kernel that consumes the projection's output, described by a :class:`LoRAEpilogue`:
:func:`~loraserve.models.fused.rms_norm` adds it to ``x`` (o_proj, down_proj) and
:func:`~loraserve.models.fused.silu_and_mul` to gate and up (gate_up_proj) before their own work.
The delta is summed in float32 and added as the in-place expand kernel adds it,
``base.to(float32) + acc * scaling`` rounded to the dtype once; :meth:`LoRAEpilogue.apply_` does the
same eagerly, in another summation order. Where the kernels are not used, :func:`apply_epilogue`
and then the eager op (:func:`rms_norm_eager`, :func:`silu_and_mul_eager`) compute the same; the
fused functions do so themselves when ``use_fused`` says no. This module needs no Triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraserve.contract import LoRAEpilogue


def apply_epilogue(out: torch.Tensor, lora: LoRAEpilogue) -> torch.Tensor:
    """A new contiguous copy of ``out`` with ``lora``'s delta added (:meth:`LoRAEpilogue.apply_`):
    the eager path, followed by :func:`rms_norm_eager` or :func:`silu_and_mul_eager`."""
    y = out.clone(memory_format=torch.contiguous_format)
    lora.apply_(y)
    return y


def rms_norm_eager(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """What :func:`rms_norm` computes, in eager PyTorch, as ``layers.RMSNorm.forward`` does."""
    h = x if residual is None else residual + x
    f = h.to(torch.float32)
    out = weight * (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return out if residual is None else (out, h)


def silu_and_mul_eager(gate_up: torch.Tensor, intermediate: int) -> torch.Tensor:
    """What :func:`silu_and_mul` computes, in eager PyTorch, as the Llama MLP does."""
    gate, up = gate_up.split(intermediate, dim=-1)
    return F.silu(gate) * up
