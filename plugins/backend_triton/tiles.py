"""How a step's tokens are cut into tiles for the tiled LoRA kernels: :func:`build_tiles` (on the
device, so capturable), :class:`TilePlan` (what every layer's launches read), SGMV's per-segment
tiles and their height.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.contract import LoRABatchInfo
from loraserve.plugins.backend_triton.launch import tile_count


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
    """How one step's tokens are cut into tiles (built in ``prepare``, read by every layer)."""

    tiles: torch.Tensor  # int32 [3, num_tiles]
    perm: torch.Tensor | None  # int32 [num_tokens]: token row at each position (None: identity)
    num_tiles: int
    block_m: int
    groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # build_tiles' starts, lens, slots
    group_bound: int  # host bound on the groups of length > 0

    def retiled(self, block_m: int, num_tokens: int) -> TilePlan:
        """The same positions cut into tiles of ``block_m`` (another kernel's tile height: the shrink
        writes ``h`` by position, so the expand may read it with the tiles of this plan)."""
        if block_m == self.block_m:
            return self
        max_tiles = tile_count(num_tokens, block_m, self.group_bound)
        tiles = build_tiles(*self.groups, block_m, max_tiles)
        return TilePlan(tiles, self.perm, max_tiles, block_m, self.groups, self.group_bound)


def sgmv_block_m(num_tokens: int, num_segments: int) -> int:
    """Tile height from the mean segment length: 16 for decode, 32 for prefill (measured on an H100:
    64 and 128 were slower for every prefill case of the benchmark)."""
    return 16 if num_tokens <= 16 * max(1, num_segments) else 32


def segment_tile_count(num_tokens: int, num_segments: int, block_m: int) -> int:
    """Tiles of :func:`segment_tiles`."""
    return tile_count(num_tokens, block_m, num_segments)


def segment_tiles(batch: LoRABatchInfo, block_m: int) -> TilePlan:
    """Each segment of a slot of rank > 0 cut into tiles of ``block_m`` tokens, no permutation."""
    indptr = batch.seg_indptr.long()
    slots = batch.seg_slot.long()
    lens = (indptr[1:] - indptr[:-1]) * (batch.ranks.long()[slots] > 0)
    max_tiles = segment_tile_count(batch.num_tokens, batch.num_segments, block_m)
    groups = (indptr[:-1], lens, slots)
    tiles = build_tiles(*groups, block_m, max_tiles)
    return TilePlan(tiles, None, max_tiles, block_m, groups, batch.num_segments)
