"""The paged KV cache: a block allocator and the per-layer key/value tensors it indexes.

Keys and values of every layer live in one flat tensor per layer, ``[num_blocks * block_size,
num_kv_heads, head_dim]``; a request owns a list of blocks (its block table) and its token ``i``
lives in slot ``blocks[i // block_size] * block_size + i % block_size``. The allocator hands out
whole blocks and takes them back when a request finishes, is aborted or is preempted; the same
block lists live on the device as rows of the :class:`~loraserve.sched.block_table.BlockTable`.
"""

from __future__ import annotations

import torch

from loraserve.errors import ConfigError
from loraserve.sched.block_table import BlockTable


class OutOfBlocks(Exception):
    """Raised by :meth:`BlockAllocator.allocate` when too few blocks are free (the caller waits)."""


class BlockAllocator:
    """Hands out KV-cache blocks. Every block is either free or owned by exactly one request."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ConfigError(
                f"the KV cache needs at least one block of at least one token (got {num_blocks} blocks of {block_size})"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._owner: dict[int, object] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int, owner: object) -> list[int]:
        """Take ``n`` blocks for ``owner``; raises :class:`OutOfBlocks` (taking none) if too few are free."""
        if n > len(self._free):
            raise OutOfBlocks(f"{n} blocks wanted, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._owner[b] = owner
        return blocks

    def free(self, blocks: list[int], owner: object) -> None:
        for b in blocks:
            if self._owner.get(b, None) is not owner:
                raise RuntimeError(f"block {b} freed by a request that does not own it")
            del self._owner[b]
            self._free.append(b)

    def check_integrity(self) -> None:
        """Raise if a block is lost, owned twice, or both free and owned."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise RuntimeError("a block appears twice in the free list")
        if free & self._owner.keys():
            raise RuntimeError(f"blocks both free and owned: {sorted(free & self._owner.keys())[:10]}")
        if len(free) + len(self._owner) != self.num_blocks:
            lost = set(range(self.num_blocks)) - free - self._owner.keys()
            raise RuntimeError(f"{len(lost)} blocks are neither free nor owned: {sorted(lost)[:10]}")


class KVCache:
    """Per-layer key and value tensors indexed by slot, the allocator for their blocks, and the
    device-resident :class:`~loraserve.sched.block_table.BlockTable` of the requests' block lists
    (the scheduler records every block a request gains there)."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.allocator = BlockAllocator(num_blocks, block_size)
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        # never read before written (attention reads only slots its tokens wrote), so no zeroing
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # a holder owns at least one block, and at most every block
        self.block_table = BlockTable(device, max_rows=num_blocks, max_width=num_blocks)

    @property
    def block_size(self) -> int:
        return self.allocator.block_size

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def slots(self, blocks: list[int], start: int, end: int) -> torch.Tensor:
        """Cache slots (int64, on the cache's device) of token positions ``start:end`` of a request
        owning ``blocks``."""
        bs = self.block_size
        first, last = start // bs, -(-end // bs)
        table = torch.tensor(blocks[first:last], dtype=torch.long)
        flat = (table[:, None] * bs + torch.arange(bs)).flatten()
        return flat[start - first * bs : end - first * bs].to(self.k[0].device)
