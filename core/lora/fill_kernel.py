"""A slot fill from the GPU store in one launch: :class:`StoreFill`.

A fill copies an adapter's rank rows of every targeted projection from the store's pages into a slot:
per projection, the rows of each ``A`` slice and the columns of ``B``. Those are strided views on both
sides (the store's rows are a window of its pages; the slot's are the first ``r`` of ``R``), so
``torch._foreach_copy_`` falls back to one copy kernel per projection and side, each launched from the
host: about 64 launches for a Llama-3.2-1B adapter on q/k/v/o, over 200 for an 8B one on every
projection. Here one Triton program copies them all. Its table, one row per region (an ``A`` slice or
a ``B`` of one projection), holds byte addresses and strides fixed for the life of the buffers (they
are allocated once); a fill passes only the adapter's first store row, the slot and the rank, so it
costs one launch and nothing else from the host.

It runs where Triton does (CUDA, or the interpreter in tests), once
:func:`~loraserve.kernel_checks.one_launch_ok` has compared it with the torch copies on this device;
otherwise fills keep the torch copies.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # without Triton, fills keep the torch copies
    triton = None

#: int64 fields per region: source base, source step per store row (bytes), destination base,
#: destination step per slot (bytes), rows (0: the rank), columns (0: the rank), source and
#: destination row strides (elements)
FIELDS = 8
BLOCK = 1024
MAX_PROGRAMS_PER_REGION = 64


def _jit(fn):
    # the fill's row, slot and rank change from call to call: not specialised on, so nothing recompiles
    return triton.jit(fn, do_not_specialize=["lo", "slot", "rank"]) if triton is not None else fn


@_jit
def copy_regions_kernel(table_ptr, lo, slot, rank, BLOCK: tl.constexpr, DTYPE: tl.constexpr):
    """Program ``(i, j)`` copies blocks ``j, j + G, ...`` of region ``i``'s ``rows x cols`` elements."""
    i = tl.program_id(0)
    first = (tl.program_id(1) * BLOCK).to(tl.int64)  # (loop bounds and step all int64)
    step = (tl.num_programs(1) * BLOCK).to(tl.int64)
    row = table_ptr + i * 8
    src_base = tl.load(row)
    src_step = tl.load(row + 1)
    dst_base = tl.load(row + 2)
    dst_step = tl.load(row + 3)
    rows = tl.load(row + 4)
    cols = tl.load(row + 5)
    src_stride = tl.load(row + 6)
    dst_stride = tl.load(row + 7)
    rows = tl.where(rows == 0, rank.to(tl.int64), rows)
    cols = tl.where(cols == 0, rank.to(tl.int64), cols)
    src = (src_base + lo.to(tl.int64) * src_step).to(tl.pointer_type(DTYPE), bitcast=True)
    dst = (dst_base + slot.to(tl.int64) * dst_step).to(tl.pointer_type(DTYPE), bitcast=True)
    n = rows * cols
    for e0 in range(first, n, step):
        e = e0 + tl.arange(0, BLOCK)
        inside = e < n
        r = e // cols
        c = e - r * cols
        tl.store(dst + r * dst_stride + c, tl.load(src + r * src_stride + c, mask=inside), mask=inside)


def _tl_dtype(dtype: torch.dtype) -> Any:
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(dtype)


class StoreFill:
    """The region table of ``store`` (a :class:`~loraserve.lora.gpu_store.GpuAdapterStore`) and its
    slot pool, on their device; :meth:`fill` copies a stored adapter's rows into a slot in one launch.
    :meth:`supported` says whether the buffers' layout and dtype allow it."""

    def __init__(self, store: Any):
        pool = store.pool
        self.dtype = store.dtype
        es = torch.empty((), dtype=store.dtype).element_size()
        regions, widest = [], 1
        for key, A_buf in pool.A.items():
            A_st, B_st, B_buf = store.A[key], store.B[key], pool.B[key]
            slices, R = A_st.shape[0], pool.max_rank
            for i in range(slices):  # A slice i: store rows lo.. of slice i -> slot rows i*R..
                regions.append([
                    A_st.data_ptr() + i * A_st.stride(0) * es, A_st.stride(1) * es,
                    A_buf.data_ptr() + i * R * A_buf.stride(1) * es, A_buf.stride(0) * es,
                    0, A_st.shape[2], A_st.stride(1), A_buf.stride(1),
                ])  # fmt: skip
            # B: columns lo.. of every output row -> the slot's first columns
            regions.append([
                B_st.data_ptr(), B_st.stride(1) * es, B_buf.data_ptr(), B_buf.stride(0) * es,
                B_st.shape[0], 0, B_st.stride(0), B_buf.stride(1),
            ])  # fmt: skip
            widest = max(widest, A_st.shape[2], B_st.shape[0])
        self.num_regions, self.widest = len(regions), widest
        self.table = torch.tensor(regions, dtype=torch.int64).to(store.device)

    @staticmethod
    def supported(store: Any) -> bool:
        """Triton is there, the dtype is one the kernel takes, and every buffer's rows are contiguous."""
        if triton is None or _tl_dtype(store.dtype) is None or not store.A:
            return False
        pool = store.pool
        return all(t.stride(-1) == 1 for key in pool.A for t in (pool.A[key], pool.B[key], store.A[key], store.B[key]))

    def fill(self, lo: int, slot: int, rank: int) -> None:
        """Copy the rows ``lo .. lo + rank`` of every projection into ``slot`` (on the current stream)."""
        if rank <= 0 or not self.num_regions:
            return
        programs = min(MAX_PROGRAMS_PER_REGION, triton.cdiv(rank * self.widest, BLOCK))
        copy_regions_kernel[(self.num_regions, programs)](
            self.table, lo, slot, rank, BLOCK=BLOCK, DTYPE=_tl_dtype(self.dtype)
        )


def check_fill(device: torch.device, dtype: torch.dtype) -> str | None:
    """The kernel against the torch copies on a small random store and pool on ``device``: slots filled
    both ways from stores rows at several offsets and ranks must hold the same rows (None), else
    what differed (for :func:`~loraserve.kernel_checks.one_launch_ok`)."""
    from loraserve.lora.eviction import OrderedEvictionPolicy
    from loraserve.lora.gpu_store import GpuAdapterStore, StoredAdapter
    from loraserve.lora.pools import GpuAdapterPool

    modules = {"qkv_proj": (40, (0, 24, 32, 40)), "o_proj": (24, (0, 40))}
    pool = GpuAdapterPool(3, 16, 2, modules, {}, dtype, device, OrderedEvictionPolicy())
    store = GpuAdapterStore(pool, 1 << 20, OrderedEvictionPolicy(), page_rank=8, one_launch=False)  # 1 MiB
    gen = torch.Generator().manual_seed(0)
    for t in (*store.A.values(), *store.B.values()):
        t.copy_(torch.randn(t.shape, generator=gen).to(dtype))
    kernel = StoreFill(store)
    for start, rank in ((0, 16), (1, 3), (store.num_pages - 1, 8), (2, 1)):
        entry = StoredAdapter("check", "check", rank, 1.0, start, -(-rank // 8))
        store.fill_slot(0, entry)  # the torch copies (this store has no kernel)
        kernel.fill(start * store.page_rank, 1, rank)
        for key, A_buf in pool.A.items():
            n = store.A[key].shape[0]
            got, want = A_buf[1].view(n, 16, -1)[:, :rank], A_buf[0].view(n, 16, -1)[:, :rank]
            if not torch.equal(got, want) or not torch.equal(pool.B[key][1][:, :rank], pool.B[key][0][:, :rank]):
                return f"slot rows of {key} differ from the torch copies (store row {start * 8}, rank {rank})"
    return None
