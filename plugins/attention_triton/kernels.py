"""The Triton kernels of the paged attention backend and the host helpers that size their launches.

See :mod:`loraserve.plugins.attention_triton.attention` for what each kernel does and the metadata
layout they read.
"""

from __future__ import annotations

import array
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Metadata rows: decode ``[ctx_len, q_row, write_slot, block table...]``, prefill ``[ctx_len, q_start,
# q_len, block table...]``. One row per sequence keeps a whole step in one int32 buffer (one copy).
META = 3
_TABLE_COL = tl.constexpr(META)  # kernels may read only constexpr globals


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


# Host integers that change from step to step are not specialised on (a new batch compiles nothing
# new): the metadata row stride (3 + the longest block table of the step), the slot stride (1 in an
# eager step, the graph buffer's row width in a captured one), and the 16-byte alignment of the
# metadata pointers, which are views at a step-dependent offset into one int32 buffer. They only
# address scalar and block-table loads, which do not vectorise anyway; q, k, v, the cache and the
# output keep their specialisation.
@triton.jit(do_not_specialize=["stride_slot"], do_not_specialize_on_alignment=["slots_ptr"])
def write_kv_kernel(
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    slots_ptr,
    stride_slot,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cs,
    stride_ch,
    HKV: tl.constexpr,
    D: tl.constexpr,
    HKV_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t * stride_slot)
    if slot >= 0:  # padding rows of a graph batch have slot -1: they must not touch the cache
        h = tl.arange(0, HKV_PAD)[:, None]
        d = tl.arange(0, D_PAD)[None, :]
        mask = (h < HKV) & (d < D)
        dst = slot.to(tl.int64) * stride_cs + h * stride_ch + d
        k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + h * stride_kh + d, mask=mask)
        tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
        v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + h * stride_vh + d, mask=mask)
        tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["window", "stride_meta"], do_not_specialize_on_alignment=["meta_ptr"])
def decode_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    meta_ptr,
    stride_meta,
    out_ptr,
    part_o_ptr,
    part_lse_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cs,
    stride_ch,
    scale_log2,
    window,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    IEEE: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    meta = meta_ptr + seq * stride_meta
    ctx = tl.load(meta)
    row = tl.load(meta + 1)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx - window, 0)
    # Splits own whole tiles of BLOCK_N keys; a short context leaves the later splits empty.
    per_split = tl.cdiv(tl.cdiv(ctx - lo, BLOCK_N), NUM_SPLITS) * BLOCK_N
    s_lo = lo + split * per_split
    s_hi = tl.minimum(s_lo + per_split, ctx)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    heads = kvh * G + g
    d_mask = d < D
    q_mask = (g < G)[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + row.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
    q = q.to(kc_ptr.dtype.element_ty)

    # A finite floor rather than -inf keeps exp2(m - m_new) defined while every key so far is masked.
    m = tl.full([G_PAD], -1.0e30, tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for start in range(s_lo, s_hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        p_mask = pos < s_hi
        blk = tl.load(meta + _TABLE_COL + pos // BS, mask=p_mask, other=0)
        off = (blk.to(tl.int64) * BS + pos % BS)[:, None] * stride_cs + kvh * stride_ch + d[None, :]
        kv_mask = p_mask[:, None] & d_mask[None, :]
        k = tl.load(kc_ptr + off, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * scale_log2
        s = tl.where(p_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(vc_ptr + off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m = m_new

    o = acc / tl.where(l > 0, l, 1.0)[:, None]
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + row.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=q_mask,
        )
    else:
        # partials are [seq, head, split, D] and [seq, head, split]; lse is in log2 units
        num_heads = tl.num_programs(1) * G
        part = (seq * num_heads + heads) * NUM_SPLITS + split
        tl.store(part_o_ptr + part.to(tl.int64)[:, None] * D + d[None, :], o, mask=q_mask)
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=g < G)


@triton.jit(do_not_specialize=["stride_meta"], do_not_specialize_on_alignment=["meta_ptr"])
def combine_kernel(
    part_o_ptr,
    part_lse_ptr,
    out_ptr,
    meta_ptr,
    stride_meta,
    stride_ot,
    stride_oh,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(meta_ptr + seq * stride_meta + 1)
    part = (seq * tl.num_programs(1) + head) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    lse = tl.load(part_lse_ptr + part)
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # a padding sequence (no context): every weight is 0
    w = tl.exp2(lse - m)
    d = tl.arange(0, D_PAD)
    o = tl.load(part_o_ptr + part.to(tl.int64)[:, None] * D + d[None, :], mask=d[None, :] < D, other=0.0)
    total = tl.sum(w, axis=0)
    res = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr + row.to(tl.int64) * stride_ot + head * stride_oh + d, res.to(out_ptr.dtype.element_ty), mask=d < D
    )


@triton.jit(do_not_specialize=["window", "stride_meta"], do_not_specialize_on_alignment=["meta_ptr", "qblocks_ptr"])
def prefill_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    out_ptr,
    meta_ptr,
    stride_meta,
    qblocks_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cs,
    stride_ch,
    scale_log2,
    window,
    G: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    kvh = head // G
    seq = tl.load(qblocks_ptr + 2 * pid)
    m0 = tl.load(qblocks_ptr + 2 * pid + 1)
    meta = meta_ptr + seq * stride_meta
    ctx = tl.load(meta)
    q_start = tl.load(meta + 1)
    q_len = tl.load(meta + 2)
    prefix = ctx - q_len

    i = m0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D_PAD)
    d_mask = d < D
    row_mask = i < q_len
    q_pos = prefix + i
    rows = (q_start + i).to(tl.int64)
    q_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + d[None, :], mask=q_mask, other=0.0)
    q = q.to(kc_ptr.dtype.element_ty)

    hi = tl.minimum(ctx, prefix + m0 + BLOCK_M)  # causal: no key past this block's last query
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(prefix + m0 - window + 1, 0)
    m = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        p_mask = pos < hi
        blk = tl.load(meta + _TABLE_COL + pos // BS, mask=p_mask, other=0)
        off = (blk.to(tl.int64) * BS + pos % BS)[:, None] * stride_cs + kvh * stride_ch + d[None, :]
        kv_mask = p_mask[:, None] & d_mask[None, :]
        k = tl.load(kc_ptr + off, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * scale_log2
        allowed = p_mask[None, :] & (pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            allowed = allowed & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(vc_ptr + off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m = m_new

    o = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_ot + head * stride_oh + d[None, :], o.to(out_ptr.dtype.element_ty), mask=q_mask
    )


class Step:
    """One step's metadata on the device, and the host integers its launches need."""

    def __init__(
        self,
        num_tokens: int,
        slots: torch.Tensor | None,
        slot_stride: int,
        dec_meta: torch.Tensor | None,
        num_splits: int,
        pf_meta: torch.Tensor | None,
        qblocks: torch.Tensor | None,
    ):
        self.num_tokens, self.slots, self.slot_stride = num_tokens, slots, slot_stride
        self.dec_meta, self.num_splits = dec_meta, num_splits
        self.num_decode = 0 if dec_meta is None else dec_meta.shape[0]
        self.pf_meta, self.qblocks = pf_meta, qblocks
        self.num_qblocks = 0 if qblocks is None else qblocks.shape[0]


class _Tiles(NamedTuple):
    block_m: int
    prefill_n: int
    prefill_warps: int
    prefill_stages: dict
    decode_n: int
    decode_warps: int


def pick_tiles(dtype: torch.dtype, d_pad: int) -> _Tiles:
    """Tile sizes that compile for sm_90 without register spills (checked with ptxas). Float32 takes
    IEEE products on CUDA cores, which hold far more in registers than tensor-core tiles: smaller tiles."""
    if dtype == torch.float32:
        return _Tiles(32, 32 if d_pad <= 128 else 16, 8, {"num_stages": 2}, 32, 8)
    return _Tiles(64, 64 if d_pad <= 128 else 32, 4, {}, 64 if d_pad <= 128 else 32, 4)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pack_rows(buf: array.array, rows: list[tuple[int, int, int, list[int]]], width: int) -> None:
    """Append ``rows`` (three integers and a block table each) to ``buf``, tables zero-padded to ``width``."""
    zeros = array.array("i", bytes(4 * width))
    for a, b, c, table in rows:
        buf.extend((a, b, c))
        buf.extend(table)
        buf.extend(zeros[: width - len(table)])
