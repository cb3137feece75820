"""How a step's tokens are cut into tiles for the tiled LoRA kernels: :func:`build_tiles` (on the
device, so capturable), :class:`TilePlan` (what every layer's launches read), SGMV's per-segment
tiles and their height.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from loraserve.contract import LoRABatchInfo
from loraserve.plugins.backend_triton.launch import tile_count
from loraserve.plugins.backend_triton.tile_kernel import can_fuse_segments, segment_tiles_fused

Groups = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # build_tiles' starts, lens, slots


def build_tiles(
    starts: torch.Tensor, lens: torch.Tensor, slots: torch.Tensor, block: int, max_tiles: int
) -> torch.Tensor:
    """Cut groups of consecutive positions into tiles of at most ``block``, on the device.

    Group ``g`` covers positions ``starts[g] : starts[g] + lens[g]`` of slot ``slots[g]`` (a group of
    length 0 gets no tile). Returns ``int32 [3, max_tiles]``: slot, first position and past-the-end
    position of each tile; tiles past the real count are empty (``start == end == 0``).
    ``max_tiles`` must bound the real count; callers derive it from host integers.
    """
    n_groups = lens.numel()
    nblk = (lens + block - 1) // block
    cum = torch.cumsum(nblk, 0)
    tid = torch.arange(max_tiles, device=lens.device, dtype=cum.dtype)
    group = torch.searchsorted(cum, tid, right=True)
    valid = group < n_groups
    g = group.clamp(max=n_groups - 1)
    start = starts[g] + (tid - (cum[g] - nblk[g])) * block
    end = torch.minimum(start + block, starts[g] + lens[g])
    zero = torch.zeros_like(start)
    return (
        torch.stack(
            [torch.where(valid, slots[g], zero), torch.where(valid, start, zero), torch.where(valid, end, zero)]
        )
        .to(torch.int32)
        .contiguous()
    )


@dataclass(frozen=True)
class TilePlan:
    """How one step's tokens are cut into tiles (built in ``prepare``, read by every layer).

    ``groups`` are the tiles' groups, or a function that builds them: only :meth:`retiled` (another
    tile height) reads them, so a plan whose tiles came from one launch leaves them unbuilt (their
    tensor operations are the launches it saves) until a step asks for another height.
    """

    tiles: torch.Tensor  # int32 [3, num_tiles]
    perm: torch.Tensor | None  # int32 [num_tokens]: token row at each position (None: identity)
    num_tiles: int
    block_m: int
    groups: Groups | Callable[[], Groups]  # build_tiles' starts, lens, slots (or a function returning them)
    group_bound: int  # host bound on the groups of length > 0

    def retiled(self, block_m: int, num_tokens: int) -> TilePlan:
        """The same positions cut into tiles of ``block_m`` (another kernel's tile height: the shrink
        writes ``h`` by position, so the expand may read it with the tiles of this plan)."""
        if block_m == self.block_m:
            return self
        max_tiles = tile_count(num_tokens, block_m, self.group_bound)
        groups = self.groups() if callable(self.groups) else self.groups
        tiles = build_tiles(*groups, block_m, max_tiles)
        return TilePlan(tiles, self.perm, max_tiles, block_m, groups, self.group_bound)


def sgmv_block_m(num_tokens: int, num_segments: int) -> int:
    """Tile height from the mean segment length: 16 for decode, 32 for prefill (measured on an H100:
    64 and 128 were slower for every prefill case of the benchmark)."""
    return 16 if num_tokens <= 16 * max(1, num_segments) else 32


def segment_tile_count(num_tokens: int, num_segments: int, block_m: int) -> int:
    """Tiles of :func:`segment_tiles`."""
    return tile_count(num_tokens, block_m, num_segments)


def segment_groups(batch: LoRABatchInfo) -> Groups:
    """The step's segments as :func:`build_tiles` groups: segments of rank-0 slots have length 0."""
    indptr = batch.seg_indptr.long()
    slots = batch.seg_slot.long()
    lens = (indptr[1:] - indptr[:-1]) * (batch.ranks.long()[slots] > 0)
    return indptr[:-1], lens, slots


def segment_tiles(batch: LoRABatchInfo, block_m: int, one_launch: bool = True) -> TilePlan:
    """Each segment of a slot of rank > 0 cut into tiles of ``block_m`` tokens, no permutation: one
    launch for steps of up to 4,096 segments (``tile_kernel.py``; the groups built only if a plan
    retiles) when ``one_launch`` (the backend's device passed the kernel's check: ``selfcheck.py``),
    :func:`build_tiles` over :func:`segment_groups` otherwise."""
    max_tiles = segment_tile_count(batch.num_tokens, batch.num_segments, block_m)
    if one_launch and can_fuse_segments(batch.num_segments):
        tiles = segment_tiles_fused(batch, block_m, max_tiles)
        return TilePlan(tiles, None, max_tiles, block_m, partial(segment_groups, batch), batch.num_segments)
    groups = segment_groups(batch)
    tiles = build_tiles(*groups, block_m, max_tiles)
    return TilePlan(tiles, None, max_tiles, block_m, groups, batch.num_segments)
