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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraserve.models.dtypes import check_rows

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LoRAEpilogue:
    """A LoRA expand left to the kernel that consumes a projection's output (see module docstring).

    For a token ``t`` of slot ``k = token_slot[t] >= 0`` with ``ranks[k] > 0``, column ``n`` of
    output slice ``s`` gets ``scalings[k] * sum_{j < ranks[k]} h[t, k*S*R + s*R + j] * B[k, n, j]``
    (``S = n_slices``, ``n`` counted over the whole output); other tokens get nothing. Columns past a
    slot's rank are never let into the sum, whatever h and B hold there. Slots must be -1, below
    ``num_slots`` or a null slot past B's whose rank is 0 (``ranks`` and ``scalings`` may be longer
    than B's slot count for that); that is device data and is not checked.

    :ivar h: ``[T, C]``, ``C >= num_slots * n_slices * R``, float32, bfloat16 or float16; any row
        stride (typically a column view of the base GEMM's output), contiguous last dim.
    :ivar B: ``[num_slots, out_total, R]``, contiguous, the output's dtype.
    :ivar token_slot: ``int32 [T]``, each token's slot or -1.
    :ivar ranks: ``int32 [num_slots]``, each slot's rank (``<= R``; 0: no adapter).
    :ivar scalings: ``float32 [num_slots]``.
    :ivar n_slices: 1 (o_proj, down_proj) or 2 (gate_up_proj: gate, then up, each ``out_total / 2``).
    :ivar R: the pool's largest rank, the length of B's rows.
    """

    h: torch.Tensor
    B: torch.Tensor
    token_slot: torch.Tensor
    ranks: torch.Tensor
    scalings: torch.Tensor
    n_slices: int
    R: int

    def __post_init__(self) -> None:
        S, R = self.n_slices, self.R
        if S not in (1, 2):
            raise ValueError(f"n_slices is {S!r}; the epilogue takes 1 (one output slice) or 2 (gate and up)")
        if not isinstance(R, int) or R < 1:
            raise ValueError(f"R is {R!r}; it must be an int >= 1")
        B = self.B
        if B.dim() != 3 or B.shape[2] != R or not B.is_contiguous() or B.dtype not in _FLOATS:
            raise ValueError(f"B must be a contiguous [num_slots, out_total, {R}] float32, bfloat16 or float16 "
                             f"tensor, got {tuple(B.shape)} {B.dtype} strides {B.stride()}")
        num_slots, out_total = B.shape[:2]
        if out_total % S:
            raise ValueError(f"B's out_total {out_total} does not split into {S} equal slices")
        check_rows("h", self.h, 2)
        T, cols = self.h.shape
        if cols < num_slots * S * R:
            raise ValueError(f"h has {cols} columns; {num_slots} slots of {S} slices of rank {R} need "
                             f"{num_slots * S * R}")
        # ranks and scalings may go on past B's slots: a captured decode step's batch has a null
        # slot of rank 0 there for its padding rows, which no kernel reads B for
        for name, t, shape, dtype in (("token_slot", self.token_slot, (T,), torch.int32),
                                      ("ranks", self.ranks, (num_slots,), torch.int32),
                                      ("scalings", self.scalings, (num_slots,), torch.float32)):
            ok = t.dim() == 1 and (t.shape[0] == shape[0] if name == "token_slot" else t.shape[0] >= shape[0])
            if not ok or t.dtype != dtype or not t.is_contiguous():
                at_least = "" if name == "token_slot" else "at least "
                raise ValueError(f"{name} must be a contiguous 1-d {dtype} tensor of {at_least}{shape[0]} entries, "
                                 f"got {tuple(t.shape)} {t.dtype} strides {t.stride()}")
        for name in ("h", "token_slot", "ranks", "scalings"):
            if getattr(self, name).device != B.device:
                raise ValueError(f"{name} is on {getattr(self, name).device}, B on {B.device}")

    def check_output(self, name: str, out: torch.Tensor, n_slices: int) -> None:
        """Refuse an output ``out`` that this epilogue does not fit (a ValueError naming ``name``)."""
        want = (self.token_slot.shape[0], self.B.shape[1])
        if out.dim() != 2 or tuple(out.shape) != want or out.dtype != self.B.dtype or out.device != self.B.device:
            raise ValueError(f"{name} is {tuple(out.shape)} {out.dtype} on {out.device}; the LoRA epilogue "
                             f"needs {list(want)} {self.B.dtype} on {self.B.device}")
        if self.n_slices != n_slices:
            raise ValueError(f"the LoRA epilogue has n_slices={self.n_slices}; {name} needs {n_slices}")

    def _active(self) -> torch.Tensor:
        """``bool [T]``: whether each token gets a delta (a slot, and a rank above 0)."""
        slot = self.token_slot.long()
        return (slot >= 0) & (self.ranks[slot.clamp(min=0)] > 0)

    def delta(self) -> torch.Tensor:
        """The delta, ``float32 [T, out_total]``, eagerly: one float32 GEMM per slot and slice over
        the rows of that slot (the loop bound is a shape, so nothing is read back from the device)."""
        num_slots, out_total, R = self.B.shape
        S, width = self.n_slices, out_total // self.n_slices
        delta = torch.zeros((self.h.shape[0], out_total), dtype=torch.float32, device=self.B.device)
        j = torch.arange(R, device=self.B.device)
        active = self._active()
        for k in range(num_slots):
            keep = j < self.ranks[k]
            rows = active & (self.token_slot == k)
            B_k = torch.where(keep, self.B[k].float(), 0.0)  # a select: past the rank B may hold NaN
            for s in range(S):
                h = self.h[:, (k * S + s) * R:(k * S + s + 1) * R].float()
                h = torch.where(rows[:, None] & keep[None, :], h, 0.0)
                part = (h @ B_k[s * width:(s + 1) * width].T) * self.scalings[k]
                delta[:, s * width:(s + 1) * width] = torch.where(rows[:, None], part,
                                                                  delta[:, s * width:(s + 1) * width])
        return delta

    def apply_(self, out: torch.Tensor) -> None:
        """Add the delta into ``out`` ``[T, out_total]`` in place, rounded as the in-place expand
        kernel rounds it (``out.float() + delta``, cast once); rows without LoRA are left untouched."""
        self.check_output("out", out, self.n_slices)
        new = (out.float() + self.delta()).to(out.dtype)
        out.copy_(torch.where(self._active()[:, None], new, out))


def apply_epilogue(out: torch.Tensor, lora: LoRAEpilogue) -> torch.Tensor:
    """A new contiguous copy of ``out`` with ``lora``'s delta added (:meth:`LoRAEpilogue.apply_`):
    the eager path, followed by :func:`rms_norm_eager` or :func:`silu_and_mul_eager`."""
    y = out.clone(memory_format=torch.contiguous_format)
    lora.apply_(y)
    return y


def rms_norm_eager(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """What :func:`rms_norm` computes, in eager PyTorch, as ``layers.RMSNorm.forward`` does."""
    h = x if residual is None else residual + x
    f = h.to(torch.float32)
    out = weight * (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return out if residual is None else (out, h)


def silu_and_mul_eager(gate_up: torch.Tensor, intermediate: int) -> torch.Tensor:
    """What :func:`silu_and_mul` computes, in eager PyTorch, as the Llama MLP does."""
    gate, up = gate_up.split(intermediate, dim=-1)
    return F.silu(gate) * up
