"""Launch parameters and launchers of the shrink and expand kernels (host side).

:func:`shrink_config` and :func:`expand_config` choose block sizes, split-k and warps from host
integers only (tiles, shapes, ranks, the device's multiprocessor count); :func:`launch_shrink` and
:func:`launch_expand` turn them into grids and call the kernels of
:mod:`loraserve.plugins.backend_triton.kernels`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton

from loraserve.plugins.backend_triton.kernels import dora_scale_kernel, lora_expand_kernel, lora_shrink_kernel


@dataclass(frozen=True)
class ShrinkConfig:
    block_r: int
    block_k: int
    split: int
    k_per_split: int
    num_warps: int
    num_stages: int | None = None


@dataclass(frozen=True)
class ExpandConfig:
    block_n: int
    block_r: int
    group_n: int
    num_warps: int
    num_stages: int | None = None


def tile_count(num_tokens: int, block_m: int, group_bound: int) -> int:
    """Tiles of ``block_m`` over ``num_tokens`` positions in at most ``group_bound`` groups: each tile
    holds at least one token, and each group adds at most one partial tile."""
    return min(num_tokens, -(-num_tokens // block_m) + group_bound)  # not triton.cdiv: ~6 us a call


def shrink_config(
    block_m: int, R: int, K: int, n_slices: int, num_tiles: int, n_sms: int, **override: Any
) -> ShrinkConfig:
    """Block of stacked rank rows (all slices), k block and split-k of the shrink. Splitting ``k``
    fills the device when there are few tiles (decode): each split writes its own partial sums,
    which the expand adds up."""
    block_r = override.get("block_r") or min(64, max(16, triton.next_power_of_2(n_slices * R)))
    block_k = override.get("block_k") or (64 if block_m >= 64 else 256 if block_r <= 32 else 128)
    block_k = min(block_k, max(16, triton.next_power_of_2(K)))
    programs = num_tiles * triton.cdiv(n_slices * R, block_r)
    split = override.get("split")
    if split is None:
        split = 1
        while programs * split < 4 * n_sms and K >= split * 2 * max(512, block_k):
            split *= 2
    k_per_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    split = triton.cdiv(K, k_per_split)
    num_warps = override.get("num_warps") or (8 if block_m * block_r >= 8192 else 4)
    return ShrinkConfig(block_r, block_k, split, k_per_split, num_warps, override.get("num_stages"))


def expand_config(
    block_m: int, R: int, num_tiles: int = 1, width: int = 4096, n_sms: int = 132, **override: Any
) -> ExpandConfig:
    """Column block, rank block and column blocks per program of the expand.

    At low rank one column block holds only a few KB of ``B``, too little to cover the memory
    latency, so each program loops over ``group_n`` blocks of one slice, as many as keep at least
    about four programs per multiprocessor (host integers only: tiles, output width, SMs).
    """
    block_r = override.get("block_r") or (32 if R >= 64 else 16)
    if override.get("block_n"):
        block_n = override["block_n"]
    elif block_m <= 16:
        block_n = 128
    else:
        block_n = 128 if block_m <= 64 else 64
    group_n = override.get("group_n")
    if group_n is None:
        # measured on an H100 (lora_kernels_sweep_*.json): at rank <= 16 groups of 4-8 blocks cut the
        # decode expand by up to 20% and groups of 2 the prefill expand by ~5%; at rank 128 one
        # block (32 rank columns per step) already moves enough, and groups only cost parallelism.
        group_n = 1
        if block_m > 16:
            group_n = 2 if R <= 16 else 1
        else:
            blocks = num_tiles * triton.cdiv(width, block_n)
            cap = 8 if R <= 16 else 4 if R <= 32 else 1
            while group_n < cap and blocks // (2 * group_n) >= 4 * n_sms:
                group_n *= 2
    num_warps = override.get("num_warps") or (8 if block_m * block_n >= 16384 else 4)
    return ExpandConfig(block_n, block_r, group_n, num_warps, override.get("num_stages"))


# -- launchers (host side: every grid and block size comes from host integers) ---------------------


def launch_shrink(
    x,
    A,
    h,
    tiles,
    perm,
    ranks,
    *,
    R: int,
    num_tiles: int,
    n_slices: int,
    block_m: int,
    block_r: int,
    block_k: int,
    split: int,
    k_per_split: int,
    use_perm: bool,
    num_warps: int = 4,
    num_stages: int | None = None,
) -> None:
    """``h[pos, split, s*R + j]`` (``h`` is ``[tokens, split, slices * R]``) for every tile and block
    of ``block_r`` stacked rank rows of all slices, in one launch."""
    K = x.shape[1]
    extra = {} if num_stages is None else {"num_stages": num_stages}
    lora_shrink_kernel[(num_tiles, triton.cdiv(n_slices * R, block_r), split)](
        x,
        A,
        h,
        tiles,
        perm,
        ranks,
        K,
        R,
        n_slices * R,
        num_tiles,
        k_per_split,
        x.stride(0),
        x.stride(1),
        A.stride(0),
        A.stride(1),
        A.stride(2),
        h.stride(1),
        h.stride(0),
        BLOCK_M=block_m,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        USE_PERM=use_perm,
        EVEN_K=K % block_k == 0 and k_per_split % block_k == 0,
        IEEE=x.dtype == torch.float32,
        num_warps=num_warps,
        **extra,
    )


# size: it mirrors lora_expand_kernel's argument list one a line; splitting would scatter that list
def launch_expand(
    h,
    B,
    out,
    tiles,
    perm,
    ranks,
    scalings,
    *,
    R: int,
    num_tiles: int,
    split: int,
    widths: tuple[int, ...],
    block_m: int,
    block_n: int,
    block_r: int,
    use_perm: bool,
    stride_hs: int,
    stride_ht: int,
    stride_hslot: int = 0,
    group_n: int = 1,
    num_warps: int = 4,
    num_stages: int | None = None,
    h_by_row: bool = False,
) -> None:
    """Add the expand of up to three slices (``widths``, laid side by side in ``B`` and ``out``); each
    program covers ``group_n`` column blocks of ``block_n`` of one slice. ``h_by_row``: ``h`` is
    indexed by token row (the base GEMM's extra columns) rather than by tile position."""
    if not 1 <= len(widths) <= 3:
        raise ValueError(f"one expand launch covers 1 to 3 slices, not {len(widths)}")
    w = list(widths) + [0] * (3 - len(widths))
    nb = [triton.cdiv(v, block_n) for v in w]
    ng = [triton.cdiv(v, group_n) for v in nb]
    if R % block_r == 0:
        r_small = 0
    elif R < block_r and B.stride(1) == R and B.stride(2) == 1:
        r_small = R
    else:
        r_small = -1
    extra = {} if num_stages is None else {"num_stages": num_stages}
    lora_expand_kernel[(num_tiles, sum(ng))](
        h,
        B,
        out,
        tiles,
        perm,
        ranks,
        scalings,
        R,
        num_tiles,
        w[0],
        w[1],
        w[2],
        nb[0],
        nb[1],
        nb[2],
        ng[0],
        ng[1],
        group_n,
        stride_hs,
        stride_ht,
        stride_hslot,
        B.stride(0),
        B.stride(1),
        B.stride(2),
        out.stride(0),
        out.stride(1),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
        SPLIT_K=split,
        USE_PERM=use_perm,
        EVEN_N=all(v % block_n == 0 for v in w),
        R_SMALL=r_small,
        SPLIT_H=0 if B.dtype == torch.float32 else 1 if h.dtype == torch.float32 else 2,
        ONE_R_BLOCK=R <= block_r and r_small >= 0,
        H_BY_ROW=h_by_row,
        num_warps=num_warps,
        **extra,
    )


DORA_BLOCK_N = 1024


def launch_dora_scale(
    out: torch.Tensor, bias: torch.Tensor | None, scales: torch.Tensor, flags: torch.Tensor, token_slot: torch.Tensor
) -> None:
    """One :func:`~loraserve.plugins.backend_triton.kernels.dora_scale_kernel` over ``out``'s rows."""
    num_tokens, n = out.shape
    if num_tokens == 0:
        return
    dora_scale_kernel[(num_tokens, triton.cdiv(n, DORA_BLOCK_N))](
        out,
        bias if bias is not None else out,
        scales,
        flags,
        token_slot,
        n,
        out.stride(0),
        scales.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_N=DORA_BLOCK_N,
    )


def apply_dora_kernel(
    backend: Any, base_out: torch.Tensor, bias: torch.Tensor | None, scales: torch.Tensor, flags: torch.Tensor
) -> None:
    """``LoRABackend.apply_dora`` in one :func:`launch_dora_scale` (the Triton backends' method): rows
    of other slots are not touched."""
    if backend.batch is None:
        raise RuntimeError("prepare() must be called before apply_dora()")
    if base_out.stride(1) != 1 or scales.stride(1) != 1 or scales.dtype != torch.float32:
        raise ValueError("apply_dora needs row-major base_out and float32 row-major scales")
    launch_dora_scale(base_out, bias, scales, flags, backend.batch.token_slot)
