"""Triton kernels shared by both GPU LoRA backends: one shrink and one expand kernel over a tile table.

A *tile* is up to ``BLOCK_M`` consecutive positions of one adapter slot: ``tiles[0, t]`` is its
slot, ``tiles[1, t]`` / ``tiles[2, t]`` its first and past-the-end position. backend_triton (SGMV)
cuts each request's segment into tiles; backend_csgmv first permutes the tokens so that each slot's
tokens are contiguous (``perm[pos]`` is the token row at position ``pos``) and cuts every slot's
run into chunks. Both hand the kernels the same kind of table, so the arithmetic lives here once.

- :func:`lora_shrink_kernel` writes ``h[pos, split, s*R + j] = sum_k x[row, k] * A[slot, s*R + j, k]``
  for ``j < rank[slot]`` over one split of ``k`` (all slices in one launch; the splits' partial
  sums are added by the expand, so no memset and no atomics are needed).
- :func:`lora_expand_kernel` adds ``scaling[slot] * sum_{j < rank} h[pos, s*R + j] * B[slot, n, j]``
  into ``out[row, n]`` for up to three slices of unequal widths in one launch; each program loops
  over a group of column blocks of one slice, so at low rank it still moves enough bytes of ``B``.

Both read the slot's rank on the device and loop only up to it, in blocks of ``BLOCK_R``. The
shrink never reads A's rows past the rank (masked loads). The expand, when the length of B's rows
is known at compile time (``R`` a multiple of ``BLOCK_R``, or ``R < BLOCK_R``), reads B's columns
up to the end of the rank's last ``BLOCK_R``-wide block (16 or 32 columns: one or two 32-byte
sectors per row) with masks that do not depend on the data, so the loads vectorise, and discards
the columns past the rank with a select, never a product, so NaN in the padding cannot leak.
Programs of empty or rank-0 tiles do no loads and no stores, so those rows stay bit-identical.
Accumulation is float32; float32 inputs use IEEE float32 products (never tf32); for 16-bit inputs
the float32 intermediate is split into a high and a low 16-bit part before the expand's
tensor-core product, which keeps it within about 2^-16 relative of a float32 product. Grids
depend only on host integers (tokens, segments, slots, shapes), never on data read back from the
device.
"""

from __future__ import annotations

import triton
import triton.language as tl


# Host integers that change from step to step (tile counts, block counts) are not specialised on, so
# a new batch size compiles nothing new; shapes and strides stay specialised, which is what lets
# Triton prove 16-byte alignment and vectorise the loads. The shrink's h row stride (split * slices *
# R, the split chosen from the tile count) is not specialised either: it only addresses the shrink's
# small float32 store. In the expand it varies with SPLIT_K, a constexpr anyway. The constexprs that
# still vary per step (BLOCK_M, USE_PERM, SPLIT_K, H_BY_ROW) are covered by the engine's warm-up.
@triton.jit(do_not_specialize=["num_tiles", "stride_ht"])
def lora_shrink_kernel(
    x_ptr,
    a_ptr,
    h_ptr,
    tiles_ptr,
    perm_ptr,
    ranks_ptr,
    K,
    R,
    SR,
    num_tiles,
    k_per_split,
    stride_xt,
    stride_xk,
    stride_as,
    stride_ar,
    stride_ak,
    stride_hs,
    stride_ht,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PERM: tl.constexpr,
    EVEN_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    # The slices' A rows are stacked (row s*R + j is rank j of slice s), so one program takes
    # BLOCK_R consecutive stacked rows of every slice at once and reads its x tile once for all of
    # them; rows j >= rank of each slice are masked (never loaded, never stored).
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)

    slot = tl.load(tiles_ptr + pid_t)
    start = tl.load(tiles_ptr + num_tiles + pid_t)
    end = tl.load(tiles_ptr + 2 * num_tiles + pid_t)
    rank = tl.load(ranks_ptr + slot)

    jr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # stacked row: slice jr // R, rank jr % R
    r_mask = (jr < SR) & (jr % R < rank)
    active = (tl.sum(r_mask.to(tl.int32), axis=0) > 0) & (start < end)
    end = tl.where(active, end, start)  # fold ``active`` into the row mask: inactive programs touch nothing
    pos = start + tl.arange(0, BLOCK_M)
    m_mask = pos < end
    if USE_PERM:
        rows = tl.load(perm_ptr + pos, mask=m_mask, other=0)
    else:
        rows = pos

    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    k_hi = tl.where(active, k_hi, k_lo)  # inactive programs run no iteration at all

    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xt
    a_rows = a_ptr + slot.to(tl.int64) * stride_as + jr.to(tl.int64)[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:  # every k block is full: the masks are constant along k, so loads vectorise
            xt = tl.load(x_rows + k[None, :] * stride_xk, mask=m_mask[:, None], other=0.0)
            at = tl.load(a_rows + k[:, None] * stride_ak, mask=r_mask[None, :], other=0.0)
        else:
            k_mask = k < k_hi
            xt = tl.load(x_rows + k[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_rows + k[:, None] * stride_ak, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(xt, at, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, at, acc)

    h_ptrs = h_ptr + pos.to(tl.int64)[:, None] * stride_ht + pid_k * stride_hs + jr[None, :]
    tl.store(h_ptrs, acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit(do_not_specialize=["num_tiles", "NB0", "NB1", "NB2", "NG0", "NG1", "GROUP_N"])
def lora_expand_kernel(
    h_ptr,
    b_ptr,
    out_ptr,
    tiles_ptr,
    perm_ptr,
    ranks_ptr,
    scalings_ptr,
    R,
    num_tiles,
    N0,
    N1,
    N2,
    NB0,
    NB1,
    NB2,
    NG0,
    NG1,
    GROUP_N,
    stride_hs,
    stride_ht,
    stride_hslot,
    stride_bs,
    stride_bn,
    stride_br,
    stride_ot,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SPLIT_K: tl.constexpr,
    USE_PERM: tl.constexpr,
    EVEN_N: tl.constexpr,
    R_SMALL: tl.constexpr,
    SPLIT_H: tl.constexpr,
    ONE_R_BLOCK: tl.constexpr,
    H_BY_ROW: tl.constexpr,
):
    # R_SMALL: 0 when R is a multiple of BLOCK_R; R itself when R < BLOCK_R and B's rows are
    # contiguous; -1 otherwise. In the first two cases the bound of B's row is known at compile time,
    # so the loads need no mask that depends on the data and vectorise; lanes past the rank are then
    # zeroed with a select (never a product: unwritten h and B's padding may hold NaN).
    # H_BY_ROW: h is indexed by token row (it came out of the base GEMM over [W; A], see
    # TiledLoRABackend.run_lora) instead of by position in the tile table.
    # SPLIT_H: 1 splits a float32 h into two 16-bit parts for B's 16-bit tensor-core product, 0 multiplies
    # in IEEE float32 (float32 B), 2 multiplies h as it is (h is already 16-bit, as B).
    # Each program takes a group of up to GROUP_N column blocks of one slice: at low rank one
    # block moves only a few KB of B, too little to cover the memory latency, so the loop over
    # the group keeps several blocks' loads in flight and loads h (and splits it) once.
    pid_t = tl.program_id(0)
    pid_g = tl.program_id(1)

    slot = tl.load(tiles_ptr + pid_t)
    start = tl.load(tiles_ptr + num_tiles + pid_t)
    end = tl.load(tiles_ptr + 2 * num_tiles + pid_t)
    rank = tl.load(ranks_ptr + slot)
    scaling = tl.load(scalings_ptr + slot)

    # which of the (up to three) slices this group of column blocks belongs to
    s = (pid_g >= NG0).to(tl.int32) + (pid_g >= NG0 + NG1).to(tl.int32)
    first_group = tl.where(s == 0, 0, tl.where(s == 1, NG0, NG0 + NG1))
    col0 = tl.where(s == 0, 0, tl.where(s == 1, N0, N0 + N1))
    width = tl.where(s == 0, N0, tl.where(s == 1, N1, N2))
    n_blocks = tl.where(s == 0, NB0, tl.where(s == 1, NB1, NB2))
    blk0 = (pid_g - first_group) * GROUP_N
    blk1 = tl.minimum(blk0 + GROUP_N, n_blocks)

    active = (rank > 0) & (start < end)
    end = tl.where(active, end, start)  # fold ``active`` into the row mask: inactive programs touch nothing
    blk1 = tl.where(active, blk1, blk0)  # inactive programs run no iteration at all
    r_end = tl.where(active, rank, 0)
    pos = start + tl.arange(0, BLOCK_M)
    m_mask = pos < end
    if USE_PERM:
        rows = tl.load(perm_ptr + pos, mask=m_mask, other=0)
    else:
        rows = pos

    if H_BY_ROW:
        h_idx = rows
    else:
        h_idx = pos
    h_rows = h_ptr + h_idx.to(tl.int64)[:, None] * stride_ht + slot.to(tl.int64) * stride_hslot + s * R
    b_slot = b_ptr + slot.to(tl.int64) * stride_bs
    o_rows = out_ptr + rows.to(tl.int64)[:, None] * stride_ot

    if ONE_R_BLOCK:  # R <= BLOCK_R: h is one block, loaded and split once for the whole group
        r = tl.arange(0, BLOCK_R)
        keep = r < rank
        in_row = r < R
        hv = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for sp in tl.static_range(SPLIT_K):
            hv += tl.load(h_rows + sp * stride_hs + r[None, :], mask=m_mask[:, None] & in_row[None, :], other=0.0).to(
                tl.float32
            )
        hv = tl.where(keep[None, :], hv, 0.0)
        if SPLIT_H == 1:
            hi1 = hv.to(b_ptr.dtype.element_ty)
            lo1 = (hv - hi1.to(tl.float32)).to(b_ptr.dtype.element_ty)
        elif SPLIT_H == 2:
            hi1 = hv.to(b_ptr.dtype.element_ty)  # exact: h was 16-bit

    for blk in range(blk0, blk1):
        n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < width
        if R_SMALL > 0:  # B's rows are R_SMALL long and contiguous: a compile-time stride proves the alignment
            b_cols = b_slot + (col0 + n).to(tl.int64)[None, :] * R_SMALL
        else:
            b_cols = b_slot + (col0 + n).to(tl.int64)[None, :] * stride_bn
        o_ptrs = o_rows + (col0 + n)[None, :] * stride_on
        if EVEN_N:
            o_mask = m_mask[:, None]
        else:
            o_mask = m_mask[:, None] & n_mask[None, :]
        base = tl.load(o_ptrs, mask=o_mask, other=0.0)  # issued before the rank loop: its latency overlaps B's

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if ONE_R_BLOCK:
            r = tl.arange(0, BLOCK_R)
            keep = r < rank
            if R_SMALL == 0:
                if EVEN_N:
                    bt = tl.load(b_cols + r[:, None] * stride_br)
                else:
                    bt = tl.load(b_cols + r[:, None] * stride_br, mask=n_mask[None, :], other=0.0)
            else:
                bt = tl.load(b_cols + r[:, None] * stride_br, mask=(r < R)[:, None] & n_mask[None, :], other=0.0)
            bt = tl.where(keep[:, None], bt, 0.0)
            if SPLIT_H == 1:
                acc = tl.dot(hi1, bt, acc)
                acc = tl.dot(lo1, bt, acc)
            elif SPLIT_H == 2:
                acc = tl.dot(hi1, bt, acc)
            else:
                acc = tl.dot(hv, bt.to(tl.float32), acc, input_precision="ieee")
        else:
            for r0 in range(0, r_end, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                keep = r < rank
                hv = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                if R_SMALL == 0:
                    for sp in tl.static_range(SPLIT_K):
                        hv += tl.load(h_rows + sp * stride_hs + r[None, :], mask=m_mask[:, None], other=0.0).to(
                            tl.float32
                        )
                    if EVEN_N:
                        bt = tl.load(b_cols + r[:, None] * stride_br)
                    else:
                        bt = tl.load(b_cols + r[:, None] * stride_br, mask=n_mask[None, :], other=0.0)
                else:
                    for sp in tl.static_range(SPLIT_K):
                        hv += tl.load(
                            h_rows + sp * stride_hs + r[None, :], mask=m_mask[:, None] & keep[None, :], other=0.0
                        ).to(tl.float32)
                    bt = tl.load(b_cols + r[:, None] * stride_br, mask=keep[:, None] & n_mask[None, :], other=0.0)
                hv = tl.where(keep[None, :], hv, 0.0)
                bt = tl.where(keep[:, None], bt, 0.0)
                if SPLIT_H == 1:
                    hi = hv.to(bt.dtype)
                    lo = (hv - hi.to(tl.float32)).to(bt.dtype)
                    acc = tl.dot(hi, bt, acc)
                    acc = tl.dot(lo, bt, acc)
                elif SPLIT_H == 2:
                    acc = tl.dot(hv.to(bt.dtype), bt, acc)
                else:
                    acc = tl.dot(hv, bt.to(tl.float32), acc, input_precision="ieee")

        result = base.to(tl.float32) + acc * scaling
        tl.store(o_ptrs, result.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def dora_scale_kernel(
    out_ptr,
    bias_ptr,
    scale_ptr,
    flags_ptr,
    token_slot_ptr,
    N,
    stride_ot,
    stride_ss,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """DoRA's per-output-feature scale on the rows of DoRA slots (see ``LoRABackend.apply_dora``):
    ``out[t] += (scale[s] - 1) * (out[t] - bias)`` with ``s = token_slot[t]``, in float32, where
    ``flags[s] != 0``; rows of other slots are neither read nor written. Grid: (tokens, N blocks)."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(token_slot_ptr + row)
    limit = tl.where(tl.load(flags_ptr + slot) != 0, N, 0)  # no column of a row of another slot
    mask = cols < limit
    out = tl.load(out_ptr + row * stride_ot + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(scale_ptr + slot * stride_ss + cols, mask=mask, other=1.0)
    plain = out
    if HAS_BIAS:
        plain = out - tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_ot + cols, (out + (g - 1.0) * plain).to(out_ptr.dtype.element_ty), mask=mask)
