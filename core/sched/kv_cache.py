"""The paged KV cache: a block allocator and the per-layer key/value tensors it indexes.

Keys and values of every layer live in one flat tensor per layer, ``[num_blocks * block_size,
num_kv_heads, head_dim]``; a request owns a list of blocks (its block table) and its token ``i``
lives in slot ``blocks[i // block_size] * block_size + i % block_size``. The allocator hands out
whole blocks and takes them back when a request finishes, is aborted or is preempted; the same
block lists live on the device as rows of the :class:`~loraserve.sched.block_table.BlockTable`.
With prefix caching, full blocks stay cached after their requests let go and are shared by later
requests with the same prefix (:mod:`loraserve.sched.prefix_cache`), so a block may have several
holders.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch

from loraserve.errors import ConfigError
from loraserve.sched.block_table import BlockTable
from loraserve.sched.prefix_cache import PrefixCache


class OutOfBlocks(Exception):
    """Raised by :meth:`BlockAllocator.allocate` when too few blocks are free (the caller waits)."""


class BlockAllocator:
    """Hands out KV-cache blocks and counts their holders.

    Every block is free, held (by one or more requests: a cached prefix is shared), or cached with
    no holder (evictable, when a :class:`~loraserve.sched.prefix_cache.PrefixCache` is given): those
    count as available, and :meth:`allocate` evicts them, least recently used first, once the free
    list is empty."""

    def __init__(self, num_blocks: int, block_size: int, prefix_cache: PrefixCache | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ConfigError(
                f"the KV cache needs at least one block of at least one token (got {num_blocks} blocks of {block_size})"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._refs: dict[int, int] = {}  # held block -> number of holders

    @property
    def num_free(self) -> int:
        """Blocks a request may get: free ones and cached ones nobody holds."""
        cached = self.prefix_cache.num_evictable if self.prefix_cache is not None else 0
        return len(self._free) + cached

    @property
    def num_held(self) -> int:
        return len(self._refs)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def is_held(self, block: int) -> bool:
        return block in self._refs

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks for one holder; raises :class:`OutOfBlocks` (taking none) if too few are
        available."""
        if n > self.num_free:
            raise OutOfBlocks(f"{n} blocks wanted, {self.num_free} available")
        if n > len(self._free):
            self._free.extend(reversed(self.prefix_cache.evict(n - len(self._free))))
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """One more holder for each of ``blocks`` (cached blocks a request found)."""
        for b in blocks:
            n = self._refs.get(b, 0)
            if n == 0:
                if self.prefix_cache is None or not self.prefix_cache.is_cached(b):
                    raise RuntimeError(f"block {b} shared while neither held nor cached")
                self.prefix_cache.on_shared(b)
            self._refs[b] = n + 1

    def release(self, blocks: list[int]) -> None:
        """One holder fewer for each of ``blocks``; a block nobody holds is free, or evictable when
        cached. Later blocks of a request are released first, so they are evicted first."""
        for b in reversed(blocks):
            n = self._refs.get(b, 0)
            if n <= 0:
                raise RuntimeError(f"block {b} released more often than it was taken")
            if n > 1:
                self._refs[b] = n - 1
                continue
            del self._refs[b]
            if self.prefix_cache is None or not self.prefix_cache.on_released(b):
                self._free.append(b)

    def flush_cache(self) -> None:
        """Forget every cached prefix; blocks nobody holds become free."""
        if self.prefix_cache is not None:
            self._free.extend(self.prefix_cache.flush())

    def check_integrity(self, holders: Iterable[list[int]] | None = None) -> None:
        """Raise if a block is lost, free twice, or both free and held or cached; with ``holders``
        (every holder's block list), also unless each held block's count equals its holders."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise RuntimeError("a block appears twice in the free list")
        if free & self._refs.keys():
            raise RuntimeError(f"blocks both free and held: {sorted(free & self._refs.keys())[:10]}")
        cached_unheld: set[int] = set()
        if self.prefix_cache is not None:
            self.prefix_cache.check_integrity(self._refs)
            cached_unheld = {b for b in range(self.num_blocks) if self.prefix_cache.is_cached(b)} - self._refs.keys()
            if free & cached_unheld:
                raise RuntimeError(f"blocks both free and cached: {sorted(free & cached_unheld)[:10]}")
        if len(free) + len(self._refs) + len(cached_unheld) != self.num_blocks:
            lost = set(range(self.num_blocks)) - free - self._refs.keys() - cached_unheld
            raise RuntimeError(f"{len(lost)} blocks are neither free, held nor cached: {sorted(lost)[:10]}")
        if holders is not None:
            counts = Counter(b for blocks in holders for b in blocks)
            if counts != Counter(self._refs):
                wrong = sorted(b for b in counts.keys() | self._refs.keys() if counts[b] != self._refs.get(b, 0))
                raise RuntimeError(f"blocks whose holder count is wrong: {wrong[:10]}")


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
        prefix_caching: bool = False,
    ):
        prefix_cache = PrefixCache(block_size) if prefix_caching else None
        self.allocator = BlockAllocator(num_blocks, block_size, prefix_cache)
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
