"""SGMV's per-segment tile table in one launch: :func:`segment_tiles_kernel`.

``segment_tiles`` built its table with about ten small tensor operations (segment lengths, rank-0
segments zeroed, tiles per segment, their prefix sum, a search of every tile's segment, gathers;
each a kernel launch, or a node of the decode graph): about 60 us per step on an H100 whatever the
step's size, paid by every SGMV step and by csgmv's long-segment steps. For steps of up to
:data:`MAX_FUSED_SEGMENTS` segments one program does all of it. It walks the segments in chunks,
carrying the tiles of the earlier chunks: a chunk's segments own the tiles
``[carry, carry + its tiles)``, and each of those finds its segment (the one whose
``[cum - tiles, cum)`` holds it) among the chunk's segments only, so the work is linear in the
step's segments plus tiles. Tiles past the real count are then written empty. Larger steps keep the
tensor operations (their cost is small beside such a step's GEMMs).

The table is that of ``build_tiles`` over the segments exactly (tests compare them under the Triton
interpreter and on the GPU); every count lives in int32. Segment count, tile height and tile count
are runtime arguments, so a new batch size compiles nothing new.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraserve.contract import LoRABatchInfo

#: steps of more segments use the tensor operations (one program walks every segment)
MAX_FUSED_SEGMENTS = 4096


@triton.jit(do_not_specialize=["num_segments", "block", "max_tiles"])
def segment_tiles_kernel(
    seg_indptr_ptr,
    seg_slot_ptr,
    ranks_ptr,
    tiles_ptr,
    num_segments,
    block,
    max_tiles,
    CHUNK: tl.constexpr,
):
    """One program. Writes ``tiles[3, max_tiles]`` (slot, start, end of each tile; empty tiles all
    zero): each segment of a slot of rank > 0 cut into tiles of ``block`` tokens, in segment order."""
    c = tl.arange(0, CHUNK)
    carry = num_segments * 0  # tiles of the segments walked so far (an int32 the loops carry)
    for s0 in range(0, num_segments, CHUNK):
        seg = s0 + c
        inside = seg < num_segments
        first = tl.load(seg_indptr_ptr + seg, mask=inside, other=0)
        stop = tl.load(seg_indptr_ptr + seg + 1, mask=inside, other=0)
        slot = tl.load(seg_slot_ptr + seg, mask=inside, other=0)
        rank = tl.load(ranks_ptr + slot, mask=inside, other=0)
        nblk = (tl.where(rank > 0, stop - first, 0) + block - 1) // block  # 0 past the step's segments
        cum = carry + tl.cumsum(nblk, axis=0)
        before = cum - nblk  # tiles of earlier segments
        owned = carry + tl.sum(nblk, axis=0)  # the chunk's segments own tiles carry .. owned - 1
        for i0 in range(carry, owned, CHUNK):
            tid = i0 + c
            pick = (before[None, :] <= tid[:, None]) & (tid[:, None] < cum[None, :])  # [tile, segment]
            start = tl.sum(tl.where(pick, first[None, :], 0), axis=1)
            start += (tid - tl.sum(tl.where(pick, before[None, :], 0), axis=1)) * block
            end = tl.minimum(start + block, tl.sum(tl.where(pick, stop[None, :], 0), axis=1))
            mask = (tid < owned) & (tid < max_tiles)
            tl.store(tiles_ptr + tid, tl.sum(tl.where(pick, slot[None, :], 0), axis=1), mask=mask)
            tl.store(tiles_ptr + max_tiles + tid, start, mask=mask)
            tl.store(tiles_ptr + 2 * max_tiles + tid, end, mask=mask)
        carry = owned
    zero = tl.zeros([CHUNK], dtype=tl.int32)
    for i0 in range(carry, max_tiles, CHUNK):
        tid = i0 + c
        mask = tid < max_tiles
        tl.store(tiles_ptr + tid, zero, mask=mask)
        tl.store(tiles_ptr + max_tiles + tid, zero, mask=mask)
        tl.store(tiles_ptr + 2 * max_tiles + tid, zero, mask=mask)


def can_fuse_segments(num_segments: int) -> bool:
    """Whether :func:`segment_tiles_fused` takes a step of this many segments."""
    return 0 < num_segments <= MAX_FUSED_SEGMENTS


def segment_tiles_fused(batch: LoRABatchInfo, block_m: int, max_tiles: int) -> torch.Tensor:
    """``build_tiles`` over the step's segments (rank-0 segments of length 0) in one launch: returns
    ``tiles`` (int32 ``[3, max_tiles]``). Needs :func:`can_fuse_segments`; ``max_tiles`` must bound
    the real count (``segment_tile_count``)."""
    tiles = torch.empty(3, max_tiles, dtype=torch.int32, device=batch.ranks.device)
    segment_tiles_kernel[(1,)](
        batch.seg_indptr,
        batch.seg_slot,
        batch.ranks,
        tiles,
        batch.num_segments,
        block_m,
        max_tiles,
        CHUNK=64,  # 4,096 tile-segment pairs per step of the inner loop
    )
    return tiles


def check_segment_tiles(device: torch.device) -> str | None:
    """:func:`segment_tiles_fused` against ``build_tiles`` over the segments on a few random steps
    (:func:`~loraserve.plugins.backend_triton.selfcheck.one_launch_ok`): None if equal."""
    from loraserve.plugins.backend_triton.selfcheck import first_difference, random_steps
    from loraserve.plugins.backend_triton.tiles import build_tiles, segment_groups, segment_tile_count

    for batch in random_steps(device, seed=1):
        for block in (16, 32):
            max_tiles = segment_tile_count(batch.num_tokens, batch.num_segments, block)
            got = segment_tiles_fused(batch, block, max_tiles)
            want = build_tiles(*segment_groups(batch), block, max_tiles)
            problem = first_difference(f"{batch.num_segments} segments, tiles of {block}", [got], [want])
            if problem:
                return problem
    return None
