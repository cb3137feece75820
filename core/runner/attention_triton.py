"""Attention over the paged KV cache with Triton kernels (the CUDA path): a drop-in for PagedSDPAAttention.

It owns four kernels and the per-step metadata they read. :func:`_write_kv_kernel` stores the step's
new keys and values into their cache slots (a slot of -1 writes nothing). Sequences that feed one
token (decode) go to :func:`_decode_kernel`, flash-decoding: one program per (sequence, kv head,
split) serves every query head of that kv head, walks its share of the context through the block
table, and leaves a partial output and its log-sum-exp; :func:`_combine_kernel` merges the splits
(with one split the decode kernel writes the output itself). Sequences that feed several tokens
(prefill, or extend over a cached prefix) go to :func:`_prefill_kernel`, flash attention over query
blocks of ``BLOCK_M`` tokens and one head, reading keys and values through the block table, causal
and optionally windowed. Everything accumulates in float32; float32 inputs use IEEE products, never
tf32. Every grid comes from host integers (sequences, tokens, query blocks, splits chosen from the
batch size), never from data read back from the device, so a decode step can be captured in a CUDA
graph (:meth:`PagedTritonAttention.begin_graph_step`).
"""

from __future__ import annotations

import array
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from loraserve.sched.kv_cache import KVCache

# Metadata rows: decode ``[ctx_len, q_row, write_slot, block table...]``, prefill ``[ctx_len, q_start,
# q_len, block table...]``. One row per sequence keeps a whole step in one int32 buffer (one copy).
_META = 3
_TABLE_COL = tl.constexpr(_META)  # kernels may read only constexpr globals


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr, stride_slot,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
                     HKV: tl.constexpr, D: tl.constexpr, HKV_PAD: tl.constexpr, D_PAD: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t * stride_slot)
    if slot >= 0:  # padding rows of a graph batch have slot -1: they must not touch the cache
        h = tl.arange(0, HKV_PAD)[:, None]
        d = tl.arange(0, D_PAD)[None, :]
        mask = (h < HKV) & (d < D)
        dst = slot.to(tl.int64) * stride_cs + h * stride_ch + d
        k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + h * stride_kh + d, mask=mask)
        tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
        v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + h * stride_vh + d, mask=mask)
        tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["window"])
def _decode_kernel(q_ptr, kc_ptr, vc_ptr, meta_ptr, stride_meta, out_ptr, part_o_ptr, part_lse_ptr,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_cs, stride_ch, scale_log2, window,
                   G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                   BS: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    meta = meta_ptr + seq * stride_meta
    ctx = tl.load(meta)
    row = tl.load(meta + 1)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx - window, 0)
    # Splits own whole tiles of BLOCK_N keys; a short context leaves the later splits empty.
    per_split = tl.cdiv(tl.cdiv(ctx - lo, BLOCK_N), NUM_SPLITS) * BLOCK_N
    s_lo = lo + split * per_split
    s_hi = tl.minimum(s_lo + per_split, ctx)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    heads = kvh * G + g
    d_mask = d < D
    q_mask = (g < G)[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + row.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
    q = q.to(kc_ptr.dtype.element_ty)

    # A finite floor rather than -inf keeps exp2(m - m_new) defined while every key so far is masked.
    m = tl.full([G_PAD], -1.0e30, tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for start in range(s_lo, s_hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        p_mask = pos < s_hi
        blk = tl.load(meta + _TABLE_COL + pos // BS, mask=p_mask, other=0)
        off = (blk.to(tl.int64) * BS + pos % BS)[:, None] * stride_cs + kvh * stride_ch + d[None, :]
        kv_mask = p_mask[:, None] & d_mask[None, :]
        k = tl.load(kc_ptr + off, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * scale_log2
        s = tl.where(p_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(vc_ptr + off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m = m_new

    o = acc / tl.where(l > 0, l, 1.0)[:, None]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + row.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        # partials are [seq, head, split, D] and [seq, head, split]; lse is in log2 units
        num_heads = tl.num_programs(1) * G
        part = (seq * num_heads + heads) * NUM_SPLITS + split
        tl.store(part_o_ptr + part.to(tl.int64)[:, None] * D + d[None, :], o, mask=q_mask)
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=g < G)


@triton.jit
def _combine_kernel(part_o_ptr, part_lse_ptr, out_ptr, meta_ptr, stride_meta, stride_ot, stride_oh,
                    D: tl.constexpr, D_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(meta_ptr + seq * stride_meta + 1)
    part = (seq * tl.num_programs(1) + head) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    lse = tl.load(part_lse_ptr + part)
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # a padding sequence (no context): every weight is 0
    w = tl.exp2(lse - m)
    d = tl.arange(0, D_PAD)
    o = tl.load(part_o_ptr + part.to(tl.int64)[:, None] * D + d[None, :], mask=d[None, :] < D, other=0.0)
    total = tl.sum(w, axis=0)
    res = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row.to(tl.int64) * stride_ot + head * stride_oh + d, res.to(out_ptr.dtype.element_ty),
             mask=d < D)


@triton.jit(do_not_specialize=["window"])
def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, out_ptr, meta_ptr, stride_meta, qblocks_ptr,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_cs, stride_ch, scale_log2, window,
                    G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    kvh = head // G
    seq = tl.load(qblocks_ptr + 2 * pid)
    m0 = tl.load(qblocks_ptr + 2 * pid + 1)
    meta = meta_ptr + seq * stride_meta
    ctx = tl.load(meta)
    q_start = tl.load(meta + 1)
    q_len = tl.load(meta + 2)
    prefix = ctx - q_len

    i = m0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D_PAD)
    d_mask = d < D
    row_mask = i < q_len
    q_pos = prefix + i
    rows = (q_start + i).to(tl.int64)
    q_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + d[None, :], mask=q_mask, other=0.0)
    q = q.to(kc_ptr.dtype.element_ty)

    hi = tl.minimum(ctx, prefix + m0 + BLOCK_M)  # causal: no key past this block's last query
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(prefix + m0 - window + 1, 0)
    m = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        p_mask = pos < hi
        blk = tl.load(meta + _TABLE_COL + pos // BS, mask=p_mask, other=0)
        off = (blk.to(tl.int64) * BS + pos % BS)[:, None] * stride_cs + kvh * stride_ch + d[None, :]
        kv_mask = p_mask[:, None] & d_mask[None, :]
        k = tl.load(kc_ptr + off, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * scale_log2
        allowed = p_mask[None, :] & (pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            allowed = allowed & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(vc_ptr + off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m = m_new

    o = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=q_mask)


class _Step:
    """One step's metadata on the device, and the host integers its launches need."""

    def __init__(self, num_tokens: int, slots: torch.Tensor | None, slot_stride: int,
                 dec_meta: torch.Tensor | None, num_splits: int,
                 pf_meta: torch.Tensor | None, qblocks: torch.Tensor | None):
        self.num_tokens, self.slots, self.slot_stride = num_tokens, slots, slot_stride
        self.dec_meta, self.num_splits = dec_meta, num_splits
        self.num_decode = 0 if dec_meta is None else dec_meta.shape[0]
        self.pf_meta, self.qblocks = pf_meta, qblocks
        self.num_qblocks = 0 if qblocks is None else qblocks.shape[0]


class _Tiles(NamedTuple):
    block_m: int
    prefill_n: int
    prefill_warps: int
    prefill_stages: dict
    decode_n: int
    decode_warps: int


def _tiles(dtype: torch.dtype, d_pad: int) -> _Tiles:
    """Tile sizes that compile for sm_90 without register spills (checked with ptxas). Float32 takes
    IEEE products on CUDA cores, which hold far more in registers than tensor-core tiles: smaller tiles."""
    if dtype == torch.float32:
        return _Tiles(32, 32 if d_pad <= 128 else 16, 8, {"num_stages": 2}, 32, 8)
    return _Tiles(64, 64 if d_pad <= 128 else 32, 4, {}, 64 if d_pad <= 128 else 32, 4)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _rows(buf: array.array, rows: list[tuple[int, int, int, list[int]]], width: int) -> None:
    """Append ``rows`` (three integers and a block table each) to ``buf``, tables zero-padded to ``width``."""
    zeros = array.array("i", bytes(4 * width))
    for a, b, c, table in rows:
        buf.extend((a, b, c))
        buf.extend(table)
        buf.extend(zeros[:width - len(table)])


class PagedTritonAttention:
    """Per-step attention metadata plus the per-layer attention call, on Triton kernels.

    The interface of :class:`~loraserve.runner.attention.PagedSDPAAttention`: :meth:`begin_step` once per
    step with ``(blocks, start, num_new_tokens)`` per sequence in packing order, then
    :meth:`attention` once per layer. ``begin_step`` builds all the step's metadata (cache slots to
    write, block tables, context lengths, query rows) in one host buffer and copies it to the device
    once; nothing is ever read back.

    CUDA graphs (decode steps only). Construct with ``max_seqs`` (the largest padded batch) and
    ``max_blocks_per_seq`` (the longest block table a sequence may need, e.g. ``cdiv(max_model_len,
    block_size)``); that allocates one persistent int32 buffer ``[max_seqs, 3 + max_blocks_per_seq]``.
    For a padded batch size ``b``:

    1. ``attn.begin_graph_step(seqs, b)`` with ``len(seqs) <= b`` decode sequences (``num_new_tokens``
       1 each) copies their metadata into rows ``0..b-1`` of that buffer; rows ``len(seqs)..b-1`` are
       padding: context length 0 and write slot -1, so they read and write no cache and output zeros.
    2. Run the model eagerly once on ``b`` token rows (this compiles the kernels, which must not
       happen under capture), then capture ``model(ids[:b], pos[:b], attn)`` in a CUDA graph. Every
       launch's grid depends only on ``b`` and the fixed shapes: ``b`` write programs, ``(b,
       num_kv_heads, splits_for(b))`` decode programs, ``(b, num_heads)`` combine programs.
    3. Before each replay call ``attn.begin_graph_step(new_seqs, b)`` with the same ``b``, on the
       stream the graph replays on: it rewrites the same buffer in place (one host-to-device copy,
       ordered after the previous replay), so the replay reads the new sequences.

    Eager :meth:`begin_step` calls in between never touch that buffer. Output rows
    ``len(seqs)..b-1`` (the padding) are zeros.

    :param kv: the paged cache (its tensors must be contiguous).
    :param sliding_window: keys more than this many positions back are not attended to.
    :param max_seqs: rows of the CUDA-graph metadata buffer (None: no graph support).
    :param max_blocks_per_seq: block-table width of that buffer (required with ``max_seqs``).
    :param num_splits: decode splits per sequence, a power of two up to 64 (None: chosen from the
        batch size and the GPU's multiprocessor count, 1 on CPU).
    :param scale: softmax scale (default ``head_dim ** -0.5``, as SDPA and the model use).
    """

    def __init__(self, kv: KVCache, sliding_window: int | None = None, *, max_seqs: int | None = None,
                 max_blocks_per_seq: int | None = None, num_splits: int | None = None,
                 scale: float | None = None):
        cache = kv.k[0]
        self.kv = kv
        self.num_kv_heads, self.head_dim = cache.shape[1], cache.shape[2]
        if not 1 <= self.head_dim <= 256:
            raise ValueError(f"head_dim {self.head_dim} is not supported by the Triton attention kernels (1 to 256)")
        if not cache.is_contiguous():
            raise ValueError(f"the KV cache must be contiguous (strides {cache.stride()})")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1 or None, not {sliding_window}")
        if num_splits is not None and (num_splits < 1 or num_splits > 64 or num_splits & (num_splits - 1)):
            raise ValueError(f"num_splits must be a power of two from 1 to 64, not {num_splits}")
        self.sliding_window = sliding_window
        self.num_splits = num_splits
        self.scale = self.head_dim ** -0.5 if scale is None else scale
        self.device = cache.device
        self._d_pad = max(16, _next_pow2(self.head_dim))
        self._tiles = _tiles(cache.dtype, self._d_pad)
        self._sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                     if self.device.type == "cuda" else 0)
        self._step: _Step | None = None
        self._graph_meta: torch.Tensor | None = None
        if (max_seqs is None) != (max_blocks_per_seq is None):
            raise ValueError(f"max_seqs ({max_seqs}) and max_blocks_per_seq ({max_blocks_per_seq}) "
                             "go together: give both for CUDA-graph support, or neither")
        if max_seqs is not None:
            if max_seqs < 1 or max_blocks_per_seq < 1:
                raise ValueError(f"max_seqs ({max_seqs}) and max_blocks_per_seq ({max_blocks_per_seq}) "
                                 "must be at least 1")
            with torch.inference_mode(False):  # an inference tensor could not be refilled outside inference mode
                self._graph_meta = torch.zeros((max_seqs, _META + max_blocks_per_seq), dtype=torch.int32,
                                               device=self.device)

    def splits_for(self, num_decode: int) -> int:
        """Decode splits for a batch of ``num_decode`` sequences: enough programs to fill the GPU a
        few times over (long contexts keep every split busy; short ones leave later splits empty)."""
        if self.num_splits is not None:
            return self.num_splits
        if not self._sms:
            return 1
        want = -(-8 * self._sms // max(1, num_decode * self.num_kv_heads))
        return min(16, _next_pow2(want)) if want > 1 else 1

    def begin_step(self, seqs: list[tuple[list[int], int, int]]) -> None:
        """Set up a step. ``seqs`` holds ``(blocks, start, num_new_tokens)`` per sequence, in the
        order their tokens are packed in the step."""
        bs = self.kv.block_size
        slots: list[int] = []
        dec: list[tuple[int, int, int, list[int]]] = []
        pf: list[tuple[int, int, int, list[int]]] = []
        qblocks: list[int] = []
        row = 0
        for i, (blocks, start, n) in enumerate(seqs):
            if n < 1:
                continue
            table = self._table(i, blocks, start + n)
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, start + n))
            if n == 1:
                dec.append((start + 1, row, slots[-1], table))
            else:
                for m0 in range(0, n, self._tiles.block_m):
                    qblocks += (len(pf), m0)
                pf.append((start + n, row, n, table))
            row += n
        w_dec = _META + max((len(r[3]) for r in dec), default=0)
        w_pf = _META + max((len(r[3]) for r in pf), default=0)
        buf = array.array("i", slots)
        _rows(buf, dec, w_dec - _META)
        _rows(buf, pf, w_pf - _META)
        buf.extend(qblocks)
        if not buf:
            self._step = _Step(0, None, 1, None, 1, None, None)
            return
        meta = torch.frombuffer(buf, dtype=torch.int32).to(self.device, copy=True, non_blocking=True)
        parts = meta.split([row, len(dec) * w_dec, len(pf) * w_pf, len(qblocks)])
        self._step = _Step(row, parts[0], 1, parts[1].view(len(dec), w_dec) if dec else None,
                           self.splits_for(len(dec)), parts[2].view(len(pf), w_pf) if pf else None,
                           parts[3].view(-1, 2) if pf else None)

    def begin_graph_step(self, seqs: list[tuple[list[int], int, int]], batch_size: int) -> None:
        """Set up a decode step of ``seqs`` padded to ``batch_size`` in the persistent metadata buffer
        (see the class docstring); the step then runs on ``batch_size`` token rows."""
        if self._graph_meta is None:
            raise ValueError("begin_graph_step needs the attention built with max_seqs and max_blocks_per_seq")
        max_seqs, width = self._graph_meta.shape
        if not len(seqs) <= batch_size <= max_seqs or batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be at least 1, at least the {len(seqs)} sequences "
                             f"given, and at most max_seqs ({max_seqs})")
        bs = self.kv.block_size
        rows: list[tuple[int, int, int, list[int]]] = []
        for i, (blocks, start, n) in enumerate(seqs):
            if n != 1:
                raise ValueError(f"sequence {i} feeds {n} tokens; a graph step is decode only (1 token each)")
            table = self._table(i, blocks, start + 1)
            if len(table) > width - _META:
                raise ValueError(f"sequence {i} needs {len(table)} blocks, more than max_blocks_per_seq "
                                 f"({width - _META})")
            rows.append((start + 1, i, blocks[start // bs] * bs + start % bs, table))
        rows += [(0, i, -1, []) for i in range(len(seqs), batch_size)]
        # only the columns this batch uses are copied (a 128K-token context gives rows of 8K blocks):
        # a kernel reads no entry of a block table past its own context
        used = _META + max(len(r[3]) for r in rows)
        buf = array.array("i")
        _rows(buf, rows, used - _META)
        static = self._graph_meta[:batch_size]
        static[:, :used].copy_(torch.frombuffer(buf, dtype=torch.int32).view(batch_size, used), non_blocking=True)
        self._step = _Step(batch_size, static[:, 2], width, static, self.splits_for(batch_size), None, None)

    def _table(self, i: int, blocks: list[int], ctx: int) -> list[int]:
        need = -(-ctx // self.kv.block_size)
        if len(blocks) < need:
            raise ValueError(f"sequence {i} has {len(blocks)} blocks but {ctx} tokens need {need}")
        return blocks[:need]

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write ``k``/``v`` into the cache, then attend: q ``[T, H, D]`` -> ``[T, H, D]`` in q's dtype."""
        st = self._step
        if st is None:
            raise RuntimeError("attention() called before begin_step()")
        T, H, D = q.shape
        hkv = self.num_kv_heads
        if T != st.num_tokens or D != self.head_dim or H % hkv:
            raise ValueError(f"q {tuple(q.shape)} does not fit the step ({st.num_tokens} tokens) and the cache "
                             f"(head_dim {self.head_dim}, heads a multiple of {hkv} kv heads)")
        if k.shape != (T, hkv, D) or v.shape != (T, hkv, D):
            raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be {(T, hkv, D)}")
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        kc, vc = self.kv.k[layer_idx], self.kv.v[layer_idx]
        out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
        if T == 0:
            return out
        d_pad, g, tiles = self._d_pad, H // hkv, self._tiles
        ieee = kc.dtype == torch.float32  # the products run in the cache's dtype
        window = self.sliding_window or 0
        scale_log2 = self.scale * 1.4426950408889634  # the kernels use exp2
        _write_kv_kernel[(T,)](
            k, v, kc, vc, st.slots, st.slot_stride, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            kc.stride(0), kc.stride(1), HKV=hkv, D=D, HKV_PAD=_next_pow2(hkv), D_PAD=d_pad)
        if st.num_decode:
            n, splits = st.num_decode, st.num_splits
            if splits > 1:
                part_o = torch.empty((n, H, splits, D), dtype=torch.float32, device=q.device)
                part_lse = torch.empty((n, H, splits), dtype=torch.float32, device=q.device)
            else:
                part_o = part_lse = out  # not read: one split writes the output itself
            _decode_kernel[(n, hkv, splits)](
                q, kc, vc, st.dec_meta, st.dec_meta.stride(0), out, part_o, part_lse,
                q.stride(0), q.stride(1), out.stride(0), out.stride(1), kc.stride(0), kc.stride(1),
                scale_log2, window, G=g, G_PAD=max(16, _next_pow2(g)), D=D, D_PAD=d_pad,
                BS=self.kv.block_size, BLOCK_N=tiles.decode_n, NUM_SPLITS=splits,
                HAS_WINDOW=self.sliding_window is not None, IEEE=ieee, num_warps=tiles.decode_warps)
            if splits > 1:
                _combine_kernel[(n, H)](
                    part_o, part_lse, out, st.dec_meta, st.dec_meta.stride(0), out.stride(0), out.stride(1),
                    D=D, D_PAD=d_pad, NUM_SPLITS=splits, num_warps=4)
        if st.num_qblocks:
            _prefill_kernel[(st.num_qblocks, H)](
                q, kc, vc, out, st.pf_meta, st.pf_meta.stride(0), st.qblocks,
                q.stride(0), q.stride(1), out.stride(0), out.stride(1), kc.stride(0), kc.stride(1),
                scale_log2, window, G=g, D=D, D_PAD=d_pad, BS=self.kv.block_size,
                BLOCK_M=tiles.block_m, BLOCK_N=tiles.prefill_n, HAS_WINDOW=self.sliding_window is not None,
                IEEE=ieee, num_warps=tiles.prefill_warps, **tiles.prefill_stages)
        return out
