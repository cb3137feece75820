"""``ChunkedSgmvLoRABackend``: chunked SGMV, tokens permuted so each slot's tokens are contiguous.

``prepare`` computes on the device (no sort, no value read back to the host, so it can be captured
in a CUDA graph; one launch for steps of up to 1,024 tokens, ``prepare_kernel.py``) a stable
permutation that groups the step's tokens by adapter slot (tokens of rank-0 slots, the base model,
are left out) and cuts each slot's run into chunks of at most ``chunk`` tokens. Every layer then
runs the shared kernels of backend_triton over those chunks: one shrink launch for all chunks and
slices, one expand launch for all chunks and (up to three) slices. An adapter shared by many
requests is read once per chunk instead of once per request, which is what makes it faster than
SGMV when many requests share few adapters.

The chunk size follows the step's shape (16 for decode, 32 for prefill) and never exceeds
``--max-lora-chunk-size``. When the step's segments are long (mean at least ``PREFILL_SEGMENT``
tokens, decided from host integers), each segment is already a contiguous run of one slot that
fills whole tiles, so grouping gains nothing: the step then uses backend_triton's per-segment
tiles (no permutation), so csgmv is never slower than SGMV at prefill.
"""

from __future__ import annotations

from typing import Any

import torch

from loraserve.contract import LoRABatchInfo
from loraserve.kernel_checks import one_launch_ok
from loraserve.plugins.backend_csgmv import CHUNK_SIZES
from loraserve.plugins.backend_csgmv.prepare_kernel import can_fuse, group_and_tile
from loraserve.plugins.backend_triton.backend import TiledLoRABackend
from loraserve.plugins.backend_triton.launch import tile_count
from loraserve.plugins.backend_triton.selfcheck import first_difference, random_steps
from loraserve.plugins.backend_triton.tiles import (
    TilePlan,
    build_tiles,
    segment_tile_count,
    segment_tiles,
    sgmv_block_m,
)

PREFILL_SEGMENT = 128  # mean tokens per segment from which per-segment tiles are used


def chunk_size(num_tokens: int, num_segments: int, max_chunk: int) -> int:
    """Chunk height for a step: 16 for decode-like steps, 32 for prefill (measured on an H100:
    larger chunks were slower for every case of the benchmark), never above ``max_chunk``."""
    return min(max_chunk, 16 if num_tokens < 32 * max(1, num_segments) else 32)


def group_by_slot(batch: LoRABatchInfo) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable permutation of the step's tokens by slot, without sorting and without a host round trip.

    Works per segment (a request's tokens share a slot): a segment's place inside its slot's run is
    the number of tokens of earlier segments of that slot, a prefix sum over segments. Returns
    ``perm`` (``int32 [T]``: token row at each position; tokens of rank-0 slots come last),
    ``counts`` and ``starts`` (``int64 [num_slots]``: tokens of each slot and its first position;
    rank-0 slots count 0).
    """
    n_slots, device = batch.ranks.numel(), batch.ranks.device
    indptr = batch.seg_indptr.long()
    slot = batch.seg_slot.long()
    lens = indptr[1:] - indptr[:-1]
    key = torch.where(batch.ranks.long()[slot] > 0, slot, torch.full_like(slot, n_slots))
    onehot = torch.arange(n_slots + 1, device=device)[:, None] == key[None, :]  # [slots + 1, segments]
    contrib = onehot * lens[None, :]
    cum = torch.cumsum(contrib, 1)  # along the contiguous dimension
    counts = cum[:, -1]
    seg_offset = (cum - contrib).gather(0, key[None, :])[0]  # tokens of earlier segments of the same slot
    starts = torch.cumsum(counts, 0) - counts
    tok = torch.arange(batch.num_tokens, device=device)
    seg = torch.searchsorted(indptr[1:], tok, right=True)
    pos = starts[key[seg]] + seg_offset[seg] + (tok - indptr[seg])
    perm = torch.empty_like(tok).scatter_(0, pos, tok)
    return perm.to(torch.int32), counts[:n_slots], starts[:n_slots]


def check_group_and_tile(device: torch.device) -> str | None:
    """:func:`group_and_tile` against :func:`group_by_slot` and ``build_tiles`` on a few random steps
    (``backend_triton/selfcheck.py``): None if equal."""
    for batch in random_steps(device, seed=2):
        n_slots = batch.ranks.numel()
        if not can_fuse(batch.num_tokens, n_slots):
            continue
        slots = torch.arange(n_slots, device=device)
        for chunk in (16, 32):
            max_tiles = tile_count(batch.num_tokens, chunk, min(n_slots, batch.num_segments))
            perm, counts, starts = group_by_slot(batch)
            want = (perm, counts, starts, build_tiles(starts, counts, slots, chunk, max_tiles))
            got = group_and_tile(batch, chunk, max_tiles)
            problem = first_difference(f"{batch.num_tokens} tokens, {n_slots} slots, chunks of {chunk}", got, want)
            if problem:
                return problem
    return None


class ChunkedSgmvLoRABackend(TiledLoRABackend):
    """Chunked SGMV over slot-sorted tokens; ``max_chunk`` is ``--max-lora-chunk-size``."""

    name = "csgmv"

    def __init__(
        self, device: torch.device | str = "cuda", max_chunk: int = 16, tuning: dict | None = None, plans: Any = None
    ):
        if max_chunk not in CHUNK_SIZES:
            raise ValueError(f"max_chunk must be one of {', '.join(map(str, CHUNK_SIZES))}, not {max_chunk}")
        super().__init__(device, tuning, plans)
        self.max_chunk = max_chunk
        self._slot_ids: dict[int, torch.Tensor] = {}  # torch.arange(slots) on the device, made once
        # grouping and tiles in one launch, once this device ran it right (backend_triton/selfcheck.py)
        self.one_launch_groups = one_launch_ok("csgmv grouping", self.device, check_group_and_tile)

    def tile_shape(self, num_tokens: int, num_segments: int, num_slots: int) -> tuple[int, int, bool]:
        if "block_m" not in self.tuning and num_tokens >= PREFILL_SEGMENT * max(1, num_segments):
            block_m = sgmv_block_m(num_tokens, num_segments)
            return block_m, segment_tile_count(num_tokens, num_segments, block_m), False
        chunk = self.tuning.get("block_m") or chunk_size(num_tokens, num_segments, self.max_chunk)
        # each chunk holds at least one token; each slot present adds at most one partial chunk
        return chunk, tile_count(num_tokens, chunk, min(num_slots, num_segments)), True

    def _plan_tiles(self, batch: LoRABatchInfo) -> TilePlan:
        n_slots = batch.ranks.numel()
        chunk, max_tiles, use_perm = self.tile_shape(batch.num_tokens, batch.num_segments, n_slots)
        if not use_perm:
            return segment_tiles(batch, chunk, self.one_launch_tiles)
        slots = self._slot_ids.get(n_slots)
        if slots is None:
            slots = self._slot_ids[n_slots] = torch.arange(n_slots, device=batch.ranks.device)
        if self.one_launch_groups and can_fuse(batch.num_tokens, n_slots):
            perm, counts, starts, tiles = group_and_tile(batch, chunk, max_tiles)
            return TilePlan(tiles, perm, max_tiles, chunk, (starts, counts, slots), min(n_slots, batch.num_segments))
        perm, counts, starts = group_by_slot(batch)
        groups = (starts, counts, slots)
        tiles = build_tiles(*groups, chunk, max_tiles)
        return TilePlan(tiles, perm, max_tiles, chunk, groups, min(n_slots, batch.num_segments))
