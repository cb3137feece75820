"""The GPU store: adapters kept on the GPU beyond the batch's slots, in memory proportional to their
ranks (``--lora-gpu-store-gib``).

The slot pool (:class:`~loraserve.lora.pools.GpuAdapterPool`) pads every slot to ``--max-lora-rank``
and has ``--max-loras-per-batch`` slots: the adapters one batch can use. The store sits between it
and the host cache: a byte budget split into *pages* of ``page_rank`` rank rows of every targeted
projection (``A`` rows of every slice, ``B`` columns), so an adapter of rank ``r`` holds
``ceil(r / page_rank)`` pages whatever the maximum rank is, and many small adapters fit where one
large one would. Filling a slot from the store is a device-to-device copy of the adapter's rows instead
of a host-to-device copy: one Triton launch for every projection where Triton runs and the kernel
passed its check on the device (:mod:`~loraserve.lora.fill_kernel`), else one batched torch copy. The
host cache may drop an adapter the store holds.

Tensor parallelism: each rank's store holds that rank's part of each adapter, as its slots do; only
rank 0 has a store (the other ranks fill their slots from host memory, as they are told to), and
DoRA adapters skip it there, since their row-parallel scales need a collective at every fill on every
rank (see :mod:`~loraserve.lora.dora`).

Layout: per projection ``A [slices, pages * page_rank, in]`` and ``B [out, pages * page_rank]``; an
adapter's pages are one contiguous run, so its rows of each projection are one strided block. Rows
past a projection's own rank (a module the adapter does not target, or of a lower rank) are zero in
the store, so the slot's rows up to the adapter's rank hold exactly its delta. Fragmentation (free
pages in several runs too short for an adapter) is handled by compaction: runs are moved down to
close the gaps, which is always safe since no LoRA kernel reads the store (only slot fills do,
ordered on the same stream). Eviction picks victims
by the engine's eviction policy (LRU, FIFO or a plugin's); pinned adapters are never evicted. Slots
hold copies, so evicting a stored adapter never touches a slot.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from loraserve.contract import EvictionPolicy
from loraserve.errors import ConfigError, UserError

#: rank rows per page: ranks 8, 16, 32 and 64 fill their pages exactly
DEFAULT_PAGE_RANK = 8
#: the most GPU memory a compaction's gather holds at once (per page buffer, a chunk of its rows)
COMPACT_CHUNK_BYTES = 64 << 20


@dataclass
class StoredAdapter:
    """An adapter held by the store: what a slot needs to serve it (rank, scaling, DoRA scales on
    the device) and where its rows are (``start`` page, ``pages`` pages)."""

    name: str
    source: str
    rank: int
    scaling: float
    start: int
    pages: int
    dora_scales: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)


def check_room(nbytes: int, device: torch.device) -> None:
    """ConfigError when ``nbytes`` are more than the device has free (CUDA) or than the machine's
    memory (CPU), instead of an out-of-memory error from deep inside the allocation."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        where = "free GPU memory"
    elif device.type == "cpu" and hasattr(os, "sysconf"):
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        where = "this machine's memory"
    else:
        return
    if nbytes > 0.9 * free:
        raise ConfigError(
            f"--lora-gpu-store-gib asks for {nbytes / 2**30:.2f} GiB, more than 90% of the "
            f"{free / 2**30:.2f} GiB of {where}; give less (the model and the KV cache need room too)"
        )


class GpuAdapterStore:
    """Adapters on the GPU in rank-row pages (see the module docstring).

    :param pool: the slot pool it fills (its projections, shapes, dtype and device).
    :param capacity_bytes: the byte budget for the pages.
    :param policy: the eviction policy instance that orders this store's victims.
    :param one_launch: fill slots with the one-launch kernel where it runs and passed its check
        (:mod:`~loraserve.lora.fill_kernel`); False keeps the torch copies.
    """

    def __init__(
        self,
        pool: Any,
        capacity_bytes: int,
        policy: EvictionPolicy,
        page_rank: int = DEFAULT_PAGE_RANK,
        one_launch: bool = True,
    ):
        self.pool, self.policy = pool, policy
        self.page_rank = P = max(1, min(page_rank, pool.max_rank))
        some = next(iter(pool.A.values()))
        self.dtype, self.device = some.dtype, some.device
        per_row = sum(self._slices(key) * a.shape[-1] + pool.B[key].shape[1] for key, a in pool.A.items())
        self.page_bytes = per_row * P * some.element_size()
        self.num_pages = int(capacity_bytes // self.page_bytes) if self.page_bytes else 0
        need = -(-pool.max_rank // P)
        if self.num_pages < need:
            raise ConfigError(
                f"--lora-gpu-store-gib holds {self.num_pages} pages of {self.page_bytes / 2**20:.1f} MiB, fewer "
                f"than the {need} one adapter of rank {pool.max_rank} (--max-lora-rank) needs: give at least "
                f"{need * self.page_bytes / 2**30:.3f} GiB, or 0 to turn the store off"
            )
        check_room(self.num_pages * self.page_bytes, self.device)
        rows = self.num_pages * P
        self.A = {key: torch.zeros(self._slices(key), rows, a.shape[-1], dtype=self.dtype, device=self.device)
                  for key, a in pool.A.items()}  # fmt: skip
        self.B = {key: torch.zeros(b.shape[1], rows, dtype=self.dtype, device=self.device) for key, b in pool.B.items()}
        self.entries: dict[Hashable, StoredAdapter] = {}
        self.owner: list[Hashable | None] = [None] * self.num_pages
        self.metrics = {"store_puts": 0, "store_hits": 0, "store_evictions": 0, "compactions": 0, "pages_moved": 0}
        self.metrics["store_prefetches"] = 0
        # fills in one launch where a checked kernel can (else None: the torch copies)
        self._fill = self._one_launch_fill() if one_launch else None

    def _one_launch_fill(self):
        """The one-launch fill (:mod:`~loraserve.lora.fill_kernel`) when Triton runs on this device, the
        layout allows it and the kernel passed its check here (:func:`~loraserve.kernel_checks.one_launch_ok`)."""
        from loraserve.kernel_checks import one_launch_ok
        from loraserve.lora.fill_kernel import StoreFill, check_fill
        from loraserve.models.dtypes import runs_triton

        if not runs_triton(self.device) or not StoreFill.supported(self):
            return None
        if not one_launch_ok(f"GPU store fill ({self.dtype})", self.device, lambda d: check_fill(d, self.dtype)):
            return None
        return StoreFill(self)

    def _slices(self, key: tuple[int, str]) -> int:
        layer, name = key
        return 1 if layer < 0 else len(self.pool.offsets[name]) - 1

    # -- what the slots ask -----------------------------------------------------------------------

    def get(self, key: Hashable) -> StoredAdapter | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.policy.touch(key)
            self.metrics["store_hits"] += 1
        return entry

    def put(self, key: Hashable, adapter: Any, protected: set, non_blocking: bool = False) -> StoredAdapter:
        """Copy ``adapter`` (host tensors) into pages, evicting unprotected, unpinned adapters by policy
        (and compacting) until a run of its pages is free; returns its entry."""
        if key in self.entries:
            return self.get(key)
        pages = -(-adapter.rank // self.page_rank)
        start = self._allocate(pages, protected | self.pool.pinned)
        entry = StoredAdapter(adapter.name, adapter.source, adapter.rank, float(adapter.scaling), start, pages)
        lo = start * self.page_rank
        for key_ in self.A:
            self._write_rows(key_, adapter, lo, lo + adapter.rank, non_blocking)
        for key_, scale in (getattr(adapter, "dora_scales", None) or {}).items():
            entry.dora_scales[key_] = scale.to(self.device, non_blocking=non_blocking)
        for p in range(start, start + pages):
            self.owner[p] = key
        self.entries[key] = entry
        self.policy.insert(key)
        self.metrics["store_puts"] += 1
        return entry

    def _write_rows(self, key: tuple[int, str], adapter: Any, lo: int, hi: int, non_blocking: bool) -> None:
        A_store, B_store = self.A[key], self.B[key]
        w = self.pool._weights_for(adapter, *key)
        if w is None:
            A_store[:, lo:hi].zero_()
            B_store[:, lo:hi].zero_()
            return
        A, B = w
        n = A_store.shape[0]
        r = A.shape[0] // n
        # this rank's part (tensor parallelism: see GpuAdapterPool.write); the whole tensors otherwise
        A, B_rows = self.pool._local_parts(key[1], A, B) if key[0] >= 0 else (A, [(0, B.shape[0], B)])
        A_store[:, lo : lo + r].copy_(A.reshape(n, r, -1), non_blocking=non_blocking)
        for b_lo, b_hi, rows in B_rows:
            B_store[b_lo:b_hi, lo : lo + r].copy_(rows, non_blocking=non_blocking)
        if lo + r < hi:
            A_store[:, lo + r : hi].zero_()
            B_store[:, lo + r : hi].zero_()

    def fill_slot(self, slot: int, entry: StoredAdapter) -> int:
        """Copy ``entry``'s rows into ``slot`` (device to device, on the current stream); returns the
        bytes copied. Rows past its rank are left as they are: the kernels never read them."""
        pool, r = self.pool, entry.rank
        lo = entry.start * self.page_rank
        if self._fill is not None:
            self._fill.fill(lo, slot, r)
            pool.write_dora(slot, entry.dora_scales)
            return r * self.page_bytes // self.page_rank
        dst, src = [], []
        for key, A_buf in pool.A.items():
            dst += [A_buf[slot].view(self.A[key].shape[0], pool.max_rank, -1)[:, :r], pool.B[key][slot][:, :r]]
            src += [self.A[key][:, lo : lo + r], self.B[key][:, lo : lo + r]]
        # one call for every projection's A and B (each its own launch before: ~7 ms of host time per
        # fill of a Llama-3-8B adapter on an H100, whatever its rank)
        torch._foreach_copy_(dst, src)
        pool.write_dora(slot, entry.dora_scales)
        return sum(t.numel() * t.element_size() for t in dst)

    def remove(self, key: Hashable) -> None:
        entry = self.entries.pop(key, None)
        if entry is None:
            return
        self.policy.remove(key)
        for p in range(entry.start, entry.start + entry.pages):
            self.owner[p] = None

    # -- pages ------------------------------------------------------------------------------------

    def _allocate(self, pages: int, protected: set) -> int:
        while True:
            start = self._free_run(pages)
            if start is not None:
                return start
            if self.owner.count(None) >= pages:
                self.compact()
                continue
            victim = self.policy.victim([k for k in self.entries if k not in protected])
            if victim is None:
                raise UserError(
                    f"the GPU adapter store ({self.num_pages} pages of rank {self.page_rank}) has no room for "
                    f"{pages} more pages and every adapter in it is pinned or in use; raise --lora-gpu-store-gib"
                )
            self.remove(victim)
            self.metrics["store_evictions"] += 1

    def _free_runs(self):
        """``(first page, length)`` of every run of free pages, in page order."""
        start = None
        for p, key in enumerate([*self.owner, 0]):  # (a sentinel owner ends the last run)
            if key is None and start is None:
                start = p
            elif key is not None and start is not None:
                yield start, p - start
                start = None

    def _free_run(self, pages: int) -> int | None:
        """The first page of the first run of at least ``pages`` free pages, or None."""
        return next((start for start, n in self._free_runs() if n >= pages), None)

    def compact(self) -> None:
        """Move every adapter's run down, in page order, so the free pages form one run at the end.

        Rows move by one gather per page buffer (the kept rows in their new order, into a temporary
        of at most :data:`COMPACT_CHUNK_BYTES`, then written back from the first row; a larger buffer
        takes a few chunks), whatever the number of adapters moved: two launches per buffer and chunk,
        where moving run by run took two per buffer and adapter (190-380 ms of host time on the engine
        thread per compaction of a Llama-3.2-1B store of 4-8 GiB: ``sim_store.py --time-compaction``)."""
        cursor, P = 0, self.page_rank
        rows: list[int] = []  # the old row of each row of the compacted layout
        moved = 0
        for entry in sorted(self.entries.values(), key=lambda e: e.start):
            rows.extend(range(entry.start * P, (entry.start + entry.pages) * P))
            if entry.start != cursor:
                moved += entry.pages
                key = self.owner[entry.start]
                for p in range(entry.start, entry.start + entry.pages):
                    self.owner[p] = None
                for p in range(cursor, cursor + entry.pages):
                    self.owner[p] = key
                entry.start = cursor
            cursor += entry.pages
        if moved:
            index = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
            for store in (*self.A.values(), *self.B.values()):
                # rows are dimension 1 of both: A [slices, rows, in], B [out, rows]. In chunks of rows, in
                # order, so the temporary stays under COMPACT_CHUNK_BYTES: every row moves down (rows[i] >= i),
                # so a chunk's writes land below the rows any later chunk reads
                per_row = store.numel() // store.shape[1] * store.element_size()
                step = max(1, COMPACT_CHUNK_BYTES // max(1, per_row))
                for lo in range(0, len(rows), step):
                    n = min(step, len(rows) - lo)
                    store.narrow(1, lo, n).copy_(store.index_select(1, index[lo : lo + n]))
        self.metrics["pages_moved"] += moved
        self.metrics["compactions"] += 1

    # -- what operators and tests read --------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Pages and bytes used and free, resident adapters and their ranks, and fragmentation: the
        share of free pages outside the largest free run (0: one run)."""
        free = self.owner.count(None)
        largest = max((n for _, n in self._free_runs()), default=0)
        used_rows = sum(e.pages for e in self.entries.values()) * self.page_rank
        return {
            "pages": self.num_pages,
            "page_rank": self.page_rank,
            "page_bytes": self.page_bytes,
            "bytes_used": (self.num_pages - free) * self.page_bytes,
            "bytes_free": free * self.page_bytes,
            "resident": len(self.entries),
            "ranks": sorted(e.rank for e in self.entries.values()),
            "fragmentation": 0.0 if free == 0 else 1.0 - largest / free,
            "padding_rows": used_rows - sum(e.rank for e in self.entries.values()),
            **self.metrics,
        }

    def check_integrity(self) -> None:
        """Raise unless every entry owns exactly its run of pages, runs are disjoint and in range."""
        owned: dict[Hashable, list[int]] = {}
        for p, key in enumerate(self.owner):
            if key is not None:
                owned.setdefault(key, []).append(p)
        if set(owned) != set(self.entries):
            raise RuntimeError(f"pages owned by {sorted(owned)} but the store holds {sorted(self.entries)}")
        for key, entry in self.entries.items():
            expected = list(range(entry.start, entry.start + entry.pages))
            if owned[key] != expected or entry.pages != -(-entry.rank // self.page_rank):
                raise RuntimeError(f"adapter {key} owns pages {owned[key]}, its entry says {expected}")
