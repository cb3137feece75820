"""Fused Triton kernels for the decoder's elementwise work: RMSNorm (optionally after the residual
add), SiLU-and-mul, and rotary embedding of q and k in one launch. This module holds the Python
side (checks, launch parameters, the eager fallback); the kernels are in
:mod:`loraserve.models.fused_kernels`.

Eager PyTorch runs each of these as several small kernels (about six per RMSNorm); in a decode step
they cost more than a third of the GEMM time. Each kernel reproduces the eager code's rounding step
by step: every value eager PyTorch stores in the model dtype is rounded to that dtype here too, and
what it computes in float32 is computed in float32 with the same operations (CUDA's expf and rsqrtf
on the GPU, IEEE division, no fused multiply-adds). What is not reproduced is the order in which
RMSNorm adds its squares (a tree here, torch's own order there): where the float32 sums differ in
their last bit, a normed element can differ by an ulp. Under the interpreter, numpy's float32 exp
also differs from torch's CPU exp in its last bit now and then.

:func:`use_fused` says whether a tensor takes the fused path, from ``LORASERVE_FUSED_OPS``, read at
every call so that a test or a debugging session can compare both paths in one process: unset (or
``auto``), CUDA tensors take it; ``1`` also sends CPU tensors through Triton's interpreter when
``TRITON_INTERPRET=1`` (tests/test_fused_ops.py does; the interpreter costs ~10 ms a launch, so the
rest of the CPU test suite keeps the eager code); ``0`` keeps the eager code everywhere. Grids come
from tensor shapes only, never from device data, so every launch can be captured in a CUDA graph.

A projection's LoRA expand may be left to the kernel that consumes the projection's output
(``lora=``, a :class:`~loraserve.contract.LoRAEpilogue`): :func:`rms_norm` adds it to ``x``
(o_proj, down_proj) and :func:`silu_and_mul` to gate and up (gate_up_proj) before their own work,
so the output is read and written once and the expand needs no launch of its own; tokens without
an adapter load nothing of it and come out bit-identical to ``lora=None``.
"""

from __future__ import annotations

import os

import torch

from loraserve.contract import LoRAEpilogue
from loraserve.models.dtypes import check_rows, triton_interpreter_on
from loraserve.models.epilogue import apply_epilogue, rms_norm_eager, silu_and_mul_eager
from loraserve.models.fused_kernels import (  # triton is None on a platform without Triton wheels
    INTERPRETED,
    rms_norm_kernel,
    rotary_kernel,
    silu_and_mul_kernel,
    triton,
)

_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def use_fused(t: torch.Tensor) -> bool:
    """Whether ops on ``t`` take the fused kernels. ``LORASERVE_FUSED_OPS``: unset or ``auto``, on
    CUDA; ``1``, on CUDA and, under Triton's interpreter (``TRITON_INTERPRET=1`` when this module was
    imported and now), on CPU; ``0``, never. CUDA needs the kernels compiled, not interpreted."""
    mode = os.environ.get("LORASERVE_FUSED_OPS", "auto").strip().lower()
    if mode not in _ON + _OFF + ("auto", ""):
        raise ValueError(f"LORASERVE_FUSED_OPS={mode!r}; use 1 (also on CPU under the interpreter), 0 or auto")
    if triton is None or mode in _OFF:
        return False
    if t.is_cuda:
        return not INTERPRETED  # interpreted kernels on CUDA tensors would copy through the host
    return mode in _ON and t.device.type == "cpu" and INTERPRETED and triton_interpreter_on()


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _rows_per_program(t: torch.Tensor, n_rows: int, row_elems: int, on_gpu: int) -> int:
    """Rows per program: ``on_gpu`` on the GPU; under the interpreter, which runs programs one by one
    in Python, enough rows for about 16K elements per program."""
    if t.is_cuda:
        return on_gpu
    return max(1, min(_pow2(n_rows), 16384 // _pow2(row_elems)))


def _lora_launch(
    lora: LoRAEpilogue | None, like: torch.Tensor, block_r: int | None, gpu_block_r: int
) -> tuple[tuple, dict]:
    """The kernels' LoRA arguments: pointers and h's row stride, and the constexprs."""
    if lora is None:  # placeholders the kernel never reads
        return (like,) * 5 + (0,), dict(HAS_LORA=False, R=1, BLOCK_R=1, EVEN_R=True)
    if block_r is None:
        block_r = min(_pow2(lora.R), gpu_block_r if like.is_cuda else 16)
    _check_block("block_r", block_r)
    return (
        (lora.h, lora.B, lora.token_slot, lora.ranks, lora.scalings, lora.h.stride(0)),
        dict(HAS_LORA=True, R=lora.R, BLOCK_R=block_r, EVEN_R=lora.R % block_r == 0),
    )


def _check_block(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1 or value & (value - 1)):
        raise ValueError(f"{name} is {value!r}; it must be a power of two")


def _check_rms_norm_args(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    check_rows("x", x, 2)
    N = x.shape[1]
    if weight.shape != (N,) or weight.dtype != x.dtype or not weight.is_contiguous():
        raise ValueError(
            f"weight must be a contiguous [{N}] {x.dtype} tensor, got {tuple(weight.shape)} {weight.dtype}"
        )
    if residual is not None:
        check_rows("residual", residual, 2)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}"
            )


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    lora: LoRAEpilogue | None = None,
    *,
    block_r: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x`` ``[T, hidden]`` (rows may be strided), computed as ``RMSNorm.forward`` does.

    With ``residual`` (same shape and dtype) it first forms ``h = residual + x`` rounded to the dtype,
    exactly as eager ``residual + x``, and returns ``(norm(h), h)``: ``h`` is the new residual stream.
    Both outputs are new contiguous tensors.

    With ``lora`` (``n_slices=1``, ``out_total == hidden``), ``x`` is first replaced by ``x`` with
    the LoRA delta added, as :func:`apply_epilogue` adds it; ``x`` itself is not written. Where
    :func:`use_fused` says no, that runs eagerly (:func:`apply_epilogue`, :func:`rms_norm_eager`);
    without ``lora`` this always launches the kernel, the caller having asked :func:`use_fused`.
    ``block_r`` (ranks per step of the LoRA loop) and ``num_warps`` tune the kernel.
    """
    _check_rms_norm_args(x, weight, residual)
    T, N = x.shape
    if lora is not None:
        lora.check_output("x", x, 1)
        if not use_fused(x):
            return rms_norm_eager(apply_epilogue(x, lora), weight, eps, residual)
    out = torch.empty((T, N), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    if T > 0:
        block = _pow2(N)
        rows = _rows_per_program(x, T, N, 1)
        lora_args, lora_consts = _lora_launch(lora, x, block_r, 8)
        if num_warps is None:  # with LoRA a B tile [block, block_r] sits beside the row: more warps
            held = block * (2 if lora is not None else 1)
            num_warps = 4 if held <= 1024 else 8 if held <= 4096 else 16
        rms_norm_kernel[(triton.cdiv(T, rows),)](
            x,
            residual if residual is not None else x,
            weight,
            out,
            res_out,
            T,
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            float(eps),
            *lora_args,
            N=N,
            BLOCK_N=block,
            ROWS=rows,
            HAS_RESIDUAL=residual is not None,
            CUDA_MATH=x.is_cuda,
            **lora_consts,
            num_warps=num_warps,
            enable_fp_fusion=False,
            enable_reflect_ftz=False,
        )
    return (out, res_out) if residual is not None else out


def silu_and_mul(
    gate_up: torch.Tensor,
    intermediate: int,
    lora: LoRAEpilogue | None = None,
    *,
    block_n: int | None = None,
    block_r: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """``silu(gate) * up`` ``[T, intermediate]`` from ``gate_up`` ``[T, 2 * intermediate]`` (gate
    first; rows may be strided), rounded as eager ``F.silu(gate) * up``.

    With ``lora`` (``n_slices=2``: slice 0 gate's, slice 1 up's), gate and up each first get their
    slice's delta, as :func:`apply_epilogue` adds it; ``gate_up`` itself is not written. Where
    :func:`use_fused` says no, that runs eagerly (:func:`apply_epilogue`, :func:`silu_and_mul_eager`);
    without ``lora`` this always launches the kernel. ``block_n`` (columns per program),
    ``block_r`` (ranks per step of the LoRA loop) and ``num_warps`` tune the kernel."""
    check_rows("gate_up", gate_up, 2)
    T = gate_up.shape[0]
    if intermediate < 1 or gate_up.shape[1] != 2 * intermediate:
        raise ValueError(f"gate_up has shape {tuple(gate_up.shape)}; expected [T, 2 * {intermediate}]")
    _check_block("block_n", block_n)
    if lora is not None:
        lora.check_output("gate_up", gate_up, 2)
        if not use_fused(gate_up):
            return silu_and_mul_eager(apply_epilogue(gate_up, lora), intermediate)
    out = torch.empty((T, intermediate), dtype=gate_up.dtype, device=gate_up.device)
    if T > 0:
        if block_n is None:  # with LoRA, two B tiles [block, block_r] per step: narrower blocks on the GPU
            block_n = min(_pow2(intermediate), (128 if lora else 1024) if gate_up.is_cuda else 4096)
        rows = _rows_per_program(gate_up, T, block_n, 1)
        lora_args, lora_consts = _lora_launch(lora, gate_up, block_r, 8)  # 8: lora_epilogue_sweep_*.json
        grid = (triton.cdiv(T, rows), triton.cdiv(intermediate, block_n))
        silu_and_mul_kernel[grid](
            gate_up,
            out,
            T,
            gate_up.stride(0),
            *lora_args,
            I=intermediate,
            BLOCK=block_n,
            ROWS=rows,
            CUDA_MATH=gate_up.is_cuda,
            **lora_consts,
            num_warps=num_warps,
            enable_fp_fusion=False,
            enable_reflect_ftz=False,
        )
    return out


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q ``[T, heads, head_dim]`` and k ``[T, kv_heads, head_dim]`` (views with any token and
    head strides, contiguous last dim) by ``cos``/``sin`` ``[T, head_dim]``, NeoX half rotation, as
    :func:`~loraserve.models.layers.apply_rotary` rounds it. Returns new contiguous q and k."""
    check_rows("q", q, 3)
    check_rows("k", k, 3)
    T, HQ, D = q.shape
    HK = k.shape[1]
    if k.shape[0] != T or k.shape[2] != D or k.dtype != q.dtype or D % 2:
        raise ValueError(
            f"k {tuple(k.shape)} {k.dtype} must match q {tuple(q.shape)} {q.dtype} in tokens, head_dim (even) and dtype"
        )
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (T, D) or t.dtype != q.dtype or t.stride(-1) != 1:
            raise ValueError(
                f"{name} must be [{T}, {D}] {q.dtype} with a contiguous last dim, got "
                f"{tuple(t.shape)} {t.dtype} strides {t.stride()}"
            )
    if cos.stride(0) != sin.stride(0):
        raise ValueError(f"cos and sin must share a row stride, got {cos.stride(0)} and {sin.stride(0)}")
    q_out = torch.empty((T, HQ, D), dtype=q.dtype, device=q.device)
    k_out = torch.empty((T, HK, D), dtype=k.dtype, device=k.device)
    if T > 0:
        half = D // 2
        n_rows = T * (HQ + HK)
        rows = _rows_per_program(q, n_rows, half, max(1, 1024 // _pow2(half)))
        rotary_kernel[(triton.cdiv(n_rows, rows),)](
            q,
            k,
            q_out,
            k_out,
            cos,
            sin,
            n_rows,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            cos.stride(0),
            HQ=HQ,
            HK=HK,
            HALF=half,
            HALF_PAD=_pow2(half),
            ROWS=rows,
            num_warps=4,
            enable_fp_fusion=False,
            enable_reflect_ftz=False,
        )
    return q_out, k_out
