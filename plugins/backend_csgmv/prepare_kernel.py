"""csgmv's per-step grouping in one launch: :func:`group_tiles_kernel`.

``group_by_slot`` followed by ``build_tiles`` is about thirty small tensor operations (each a kernel
launch, or a node of the decode graph): about 100 us per step on an H100 whatever the step's size,
which is most of a small decode step's LoRA cost. For steps of up to :data:`MAX_FUSED_TOKENS`
tokens one program does all of it: per-slot counts, their prefix sum, each token's stable position
(its slot's start plus the tokens of that slot before it), the permutation, and the tile table.
The program walks the tokens in chunks (each chunk's positions follow from the next free position of
every group and the earlier tokens of the same group inside the chunk), so its work is linear in
the step's tokens times the pool's slots. Larger steps and pools keep the tensor operations (their
cost is small beside such a step's GEMMs).

The results are those of ``group_by_slot`` and ``build_tiles`` exactly (tests compare them under the
Triton interpreter and on the GPU); every count lives in int32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraserve.contract import LoRABatchInfo

#: steps of more tokens use the tensor operations (the fused kernel's work grows as tokens squared)
MAX_FUSED_TOKENS = 1024
#: pools of this many slots or more (the null slot included) use the tensor operations
MAX_FUSED_SLOTS = 256


@triton.jit
def _keys(token_slot_ptr, ranks_ptr, t, T, num_slots):
    """Group of each token ``t``: its slot when the slot's rank is > 0, ``num_slots`` for rank-0
    slots (placed last), -1 past the step's tokens (matches nothing)."""
    inside = t < T
    slot = tl.load(token_slot_ptr + t, mask=inside, other=0)
    rank = tl.load(ranks_ptr + slot, mask=inside, other=0)
    return tl.where(inside, tl.where(rank > 0, slot, num_slots), -1)


@triton.jit(do_not_specialize=["T", "num_slots", "block", "max_tiles"])
def group_tiles_kernel(
    token_slot_ptr,
    ranks_ptr,
    perm_ptr,
    counts_ptr,
    starts_ptr,
    tiles_ptr,
    T,
    num_slots,
    block,
    max_tiles,
    BLOCK_S: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """One program. Writes ``perm[T]`` (token row at each position: slot-grouped, stable, rank-0
    tokens last), ``counts`` / ``starts`` ``[num_slots]`` (tokens of each slot of rank > 0 and its
    first position) and ``tiles[3, max_tiles]`` (slot, start, end; empty tiles all zero).
    ``BLOCK_S`` is a power of two above ``num_slots``."""
    s_idx = tl.arange(0, BLOCK_S)
    counts = tl.zeros([BLOCK_S], dtype=tl.int32)
    for t0 in range(0, T, CHUNK):
        key = _keys(token_slot_ptr, ranks_ptr, t0 + tl.arange(0, CHUNK), T, num_slots)
        counts += tl.sum((s_idx[:, None] == key[None, :]).to(tl.int32), axis=1)
    starts = tl.cumsum(counts, axis=0) - counts
    nxt = starts  # next free position of each group, advanced chunk by chunk (stable order)
    c = tl.arange(0, CHUNK)
    for t0 in range(0, T, CHUNK):
        key = _keys(token_slot_ptr, ranks_ptr, t0 + c, T, num_slots)
        onehot = s_idx[None, :] == key[:, None]  # [CHUNK, BLOCK_S]
        pos = tl.sum(tl.where(onehot, nxt[None, :], 0), axis=1)
        pos += tl.sum(((key[None, :] == key[:, None]) & (c[None, :] < c[:, None])).to(tl.int32), axis=1)
        tl.store(perm_ptr + pos, t0 + c, mask=t0 + c < T)
        nxt += tl.sum(onehot.to(tl.int32), axis=0)
    real = s_idx < num_slots
    tl.store(counts_ptr + s_idx, counts, mask=real)
    tl.store(starts_ptr + s_idx, starts, mask=real)
    nblk = tl.where(real, (counts + block - 1) // block, 0)
    cum = tl.cumsum(nblk, axis=0)
    before = cum - nblk  # tiles of earlier slots
    for i0 in range(0, max_tiles, CHUNK):
        tid = i0 + tl.arange(0, CHUNK)
        g = tl.sum(((cum[None, :] <= tid[:, None]) & real[None, :]).to(tl.int32), axis=1)
        valid = g < num_slots
        pick = s_idx[None, :] == g[:, None]
        first = tl.sum(tl.where(pick, starts[None, :], 0), axis=1)
        start = first + (tid - tl.sum(tl.where(pick, before[None, :], 0), axis=1)) * block
        end = tl.minimum(start + block, first + tl.sum(tl.where(pick, counts[None, :], 0), axis=1))
        mask = tid < max_tiles
        tl.store(tiles_ptr + tid, tl.where(valid, g, 0), mask=mask)
        tl.store(tiles_ptr + max_tiles + tid, tl.where(valid, start, 0), mask=mask)
        tl.store(tiles_ptr + 2 * max_tiles + tid, tl.where(valid, end, 0), mask=mask)


def can_fuse(num_tokens: int, num_slots: int) -> bool:
    """Whether :func:`group_and_tile` takes a step of this size."""
    return 0 < num_tokens <= MAX_FUSED_TOKENS and num_slots < MAX_FUSED_SLOTS


def group_and_tile(
    batch: LoRABatchInfo, block: int, max_tiles: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``group_by_slot(batch)`` and ``build_tiles`` over its groups in one launch: returns ``perm``
    (int32 ``[T]``), ``counts`` and ``starts`` (int32 ``[num_slots]``) and ``tiles`` (int32
    ``[3, max_tiles]``). Needs :func:`can_fuse`."""
    n_slots, device = batch.ranks.numel(), batch.ranks.device
    perm = torch.empty(batch.num_tokens, dtype=torch.int32, device=device)
    counts = torch.empty(n_slots, dtype=torch.int32, device=device)
    starts = torch.empty(n_slots, dtype=torch.int32, device=device)
    tiles = torch.empty(3, max_tiles, dtype=torch.int32, device=device)
    block_s = triton.next_power_of_2(n_slots + 1)
    group_tiles_kernel[(1,)](
        batch.token_slot,
        batch.ranks,
        perm,
        counts,
        starts,
        tiles,
        batch.num_tokens,
        n_slots,
        block,
        max_tiles,
        BLOCK_S=block_s,
        CHUNK=max(16, min(64, 4096 // block_s)),  # at most 4,096 one-hot entries per chunk
    )
    return perm, counts, starts, tiles
