"""Attention over the paged KV cache with Triton kernels (the CUDA path), an ``AttentionBackend``.

It owns four kernels and the per-step metadata they read. :func:`write_kv_kernel` stores the step's
new keys and values into their cache slots (a slot of -1 writes nothing). Sequences that feed one
token (decode) go to :func:`decode_kernel`, flash-decoding: one program per (sequence, kv head,
split) serves every query head of that kv head, walks its share of the context through the block
table, and leaves a partial output and its log-sum-exp; :func:`combine_kernel` merges the splits
(with one split the decode kernel writes the output itself). Sequences that feed several tokens
(prefill, or extend over a cached prefix) go to :func:`prefill_kernel`, flash attention over query
blocks of ``BLOCK_M`` tokens and one head, reading keys and values through the block table, causal
and optionally windowed. Everything accumulates in float32; float32 inputs use IEEE products, never
tf32. Every grid comes from host integers (sequences, tokens, query blocks, splits chosen from the
batch size), never from data read back from the device, so a decode step can be captured in a CUDA
graph (:meth:`PagedTritonAttention.begin_graph_step`).
"""

from __future__ import annotations

import torch

from loraserve.contract import AttentionBackend
from loraserve.plugins.attention_triton.kernels import (
    Step,
    combine_kernel,
    decode_kernel,
    next_pow2,
    pick_tiles,
    prefill_kernel,
    write_kv_kernel,
)
from loraserve.plugins.attention_triton.metadata import StepMetadata
from loraserve.sched.kv_cache import KVCache


class PagedTritonAttention(AttentionBackend):
    """Per-step attention metadata plus the per-layer attention call, on Triton kernels.

    The :class:`~loraserve.contract.AttentionBackend` lifecycle: :meth:`begin_step` once per
    step with ``(blocks, start, num_new_tokens, table_row)`` per sequence in packing order, then
    :meth:`attention` once per layer. ``begin_step`` flushes the KV cache's device block table, packs
    the step's host integers (cache slots to write, context lengths, query rows: O(batch + new
    tokens)) into one page-locked buffer, copies it to the device once, and gathers the block-table
    rows of the step's sequences on the device
    (:class:`~loraserve.plugins.attention_triton.metadata.StepMetadata`); nothing is ever read back.
    Every device write is ordered on the current stream, so the host may free and reallocate KV
    blocks and table rows while a launched step still runs: that step reads what it was launched with.

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
       stream the graph replays on: it rewrites the same buffer in place (one host-to-device copy
       and a gather of the block-table rows, outside the graph, ordered after the previous replay),
       so the replay reads the new sequences.

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

    name = "triton"
    graph_capturable = True

    def __init__(
        self,
        kv: KVCache,
        sliding_window: int | None = None,
        *,
        max_seqs: int | None = None,
        max_blocks_per_seq: int | None = None,
        num_splits: int | None = None,
        scale: float | None = None,
    ):
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
        self.scale = self.head_dim**-0.5 if scale is None else scale
        self.scale_log2 = self.scale * 1.4426950408889634  # the kernels use exp2
        self.device = cache.device
        self._d_pad = max(16, next_pow2(self.head_dim))
        self._tiles = pick_tiles(cache.dtype, self._d_pad)
        self._sms = (
            torch.cuda.get_device_properties(self.device).multi_processor_count if self.device.type == "cuda" else 0
        )
        self._step: Step | None = None
        if (max_seqs is None) != (max_blocks_per_seq is None):
            raise ValueError(
                f"max_seqs ({max_seqs}) and max_blocks_per_seq ({max_blocks_per_seq}) "
                "go together: give both for CUDA-graph support, or neither"
            )
        if max_seqs is not None:
            if max_seqs < 1 or max_blocks_per_seq < 1:
                raise ValueError(
                    f"max_seqs ({max_seqs}) and max_blocks_per_seq ({max_blocks_per_seq}) must be at least 1"
                )
        self._meta = StepMetadata(kv, self._tiles.block_m, self.splits_for, max_seqs, max_blocks_per_seq)
        #: the persistent metadata of CUDA-graph steps (None without graph support)
        self._graph_meta = self._meta.graph_meta

    def splits_for(self, num_decode: int) -> int:
        """Decode splits for a batch of ``num_decode`` sequences: enough programs to fill the GPU a
        few times over (long contexts keep every split busy; short ones leave later splits empty)."""
        if self.num_splits is not None:
            return self.num_splits
        if not self._sms:
            return 1
        want = -(-8 * self._sms // max(1, num_decode * self.num_kv_heads))
        return min(16, next_pow2(want)) if want > 1 else 1

    def begin_step(self, seqs: list[tuple]) -> None:
        """Set up a step. ``seqs`` holds ``(blocks, start, num_new_tokens, table_row)`` per sequence,
        in the order their tokens are packed in the step (``table_row`` -1 or left out: the block
        table is packed from ``blocks`` on the host)."""
        self._step = self._meta.eager(seqs)

    def begin_graph_step(self, seqs: list[tuple], batch_size: int) -> None:
        """Set up a decode step of ``seqs`` padded to ``batch_size`` in the persistent metadata buffer
        (see the class docstring); the step then runs on ``batch_size`` token rows."""
        self._step = self._meta.graph(seqs, batch_size)

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write ``k``/``v`` into the cache, then attend: q ``[T, H, D]`` -> ``[T, H, D]`` in q's dtype."""
        st = self._step
        if st is None:
            raise RuntimeError("attention() called before begin_step()")
        T, H, D = q.shape
        hkv = self.num_kv_heads
        if T != st.num_tokens or D != self.head_dim or H % hkv:
            raise ValueError(
                f"q {tuple(q.shape)} does not fit the step ({st.num_tokens} tokens) and the cache "
                f"(head_dim {self.head_dim}, heads a multiple of {hkv} kv heads)"
            )
        if k.shape != (T, hkv, D) or v.shape != (T, hkv, D):
            raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be {(T, hkv, D)}")
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        kc, vc = self.kv.k[layer_idx], self.kv.v[layer_idx]
        out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
        if T == 0:
            return out
        self._write_kv(st, k, v, kc, vc)
        if st.num_decode:
            self._decode(st, q, kc, vc, out)
        if st.num_qblocks:
            self._prefill(st, q, kc, vc, out)
        return out

    def _write_kv(self, st: Step, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> None:
        T, hkv, D = k.shape
        write_kv_kernel[(T,)](
            k,
            v,
            kc,
            vc,
            st.slots,
            st.slot_stride,
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            kc.stride(0),
            kc.stride(1),
            HKV=hkv,
            D=D,
            HKV_PAD=next_pow2(hkv),
            D_PAD=self._d_pad,
        )

    def _decode(self, st: Step, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, out: torch.Tensor) -> None:
        """Flash-decoding of the step's one-token sequences, then the merge of their splits."""
        _, H, D = q.shape
        hkv, d_pad, tiles = self.num_kv_heads, self._d_pad, self._tiles
        g = H // hkv
        n, splits = st.num_decode, st.num_splits
        if splits > 1:
            part_o = torch.empty((n, H, splits, D), dtype=torch.float32, device=q.device)
            part_lse = torch.empty((n, H, splits), dtype=torch.float32, device=q.device)
        else:
            part_o = part_lse = out  # not read: one split writes the output itself
        decode_kernel[(n, hkv, splits)](
            q,
            kc,
            vc,
            st.dec_meta,
            st.dec_meta.stride(0),
            out,
            part_o,
            part_lse,
            q.stride(0),
            q.stride(1),
            out.stride(0),
            out.stride(1),
            kc.stride(0),
            kc.stride(1),
            self.scale_log2,
            self.sliding_window or 0,
            G=g,
            G_PAD=max(16, next_pow2(g)),
            D=D,
            D_PAD=d_pad,
            BS=self.kv.block_size,
            BLOCK_N=tiles.decode_n,
            NUM_SPLITS=splits,
            HAS_WINDOW=self.sliding_window is not None,
            IEEE=kc.dtype == torch.float32,  # the products run in the cache's dtype
            num_warps=tiles.decode_warps,
        )
        if splits > 1:
            combine_kernel[(n, H)](
                part_o,
                part_lse,
                out,
                st.dec_meta,
                st.dec_meta.stride(0),
                out.stride(0),
                out.stride(1),
                D=D,
                D_PAD=d_pad,
                NUM_SPLITS=splits,
                num_warps=4,
            )

    def _prefill(self, st: Step, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, out: torch.Tensor) -> None:
        """Flash attention over the query blocks of the step's multi-token sequences."""
        _, H, D = q.shape
        tiles = self._tiles
        prefill_kernel[(st.num_qblocks, H)](
            q,
            kc,
            vc,
            out,
            st.pf_meta,
            st.pf_meta.stride(0),
            st.qblocks,
            q.stride(0),
            q.stride(1),
            out.stride(0),
            out.stride(1),
            kc.stride(0),
            kc.stride(1),
            self.scale_log2,
            self.sliding_window or 0,
            G=H // self.num_kv_heads,
            D=D,
            D_PAD=self._d_pad,
            BS=self.kv.block_size,
            BLOCK_M=tiles.block_m,
            BLOCK_N=tiles.prefill_n,
            HAS_WINDOW=self.sliding_window is not None,
            IEEE=kc.dtype == torch.float32,  # the products run in the cache's dtype
            num_warps=tiles.prefill_warps,
            **tiles.prefill_stages,
        )
