"""Attention over the paged KV cache with PyTorch SDPA (the CPU path, and the CUDA fallback).

The interface is :class:`loraserve.contract.AttentionBackend`; the built-in plugin ``attention_torch``
registers this class as ``torch_native``.

The model calls :meth:`PagedSDPAAttention.attention` once per layer with the step's new queries,
keys and values (RoPE applied). The keys and values are written into the cache slots of their
tokens, then each sequence attends over its whole cached context: causal within the new tokens,
everything before them, and at most ``sliding_window`` keys back when the model has a window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraserve.contract import AttentionBackend
from loraserve.sched.kv_cache import KVCache


@dataclass
class _Seq:
    q_start: int
    q_len: int
    ctx_len: int
    ctx_slots: torch.Tensor
    mask: torch.Tensor | None  # bool [q_len, ctx_len], True = attend; None = attend to all


class PagedSDPAAttention(AttentionBackend):
    """Per-step attention metadata plus the per-layer attention call (``--attention-backend
    torch_native``); loops over sequences on the host, so it never runs in a CUDA graph."""

    name = "torch_native"

    def __init__(self, kv: KVCache, sliding_window: int | None = None):
        super().__init__(kv, sliding_window)
        self._seqs: list[_Seq] = []
        self._write_slots: torch.Tensor | None = None

    def begin_step(self, seqs: list[tuple]) -> None:
        """Set up a step. ``seqs`` holds ``(blocks, start, num_new_tokens[, table_row])`` per
        sequence, in the order their tokens are packed in the step; this backend reads the host
        ``blocks`` (it loops on the host anyway) and ignores the device block table."""
        self._seqs, writes, q_start = [], [], 0
        device = self.kv.k[0].device
        for blocks, start, n, *_ in seqs:
            ctx = start + n
            slots = self.kv.slots(blocks, 0, ctx)
            writes.append(slots[start:])
            q_pos = torch.arange(start, ctx, device=device)[:, None]
            k_pos = torch.arange(ctx, device=device)[None, :]
            allowed = k_pos <= q_pos
            if self.sliding_window is not None:
                allowed &= k_pos > q_pos - self.sliding_window
            mask = None if bool(allowed.all()) else allowed
            self._seqs.append(_Seq(q_start, n, ctx, slots, mask))
            q_start += n
        self._write_slots = torch.cat(writes) if writes else None

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.kv.k[layer_idx], self.kv.v[layer_idx]
        k_cache[self._write_slots] = k.to(k_cache.dtype)
        v_cache[self._write_slots] = v.to(v_cache.dtype)
        out = torch.empty_like(q)
        for s in self._seqs:
            qs = q[s.q_start : s.q_start + s.q_len].transpose(0, 1)  # [H, q, D]
            ks = k_cache[s.ctx_slots].transpose(0, 1)  # [Hkv, ctx, D]
            vs = v_cache[s.ctx_slots].transpose(0, 1)
            o = F.scaled_dot_product_attention(
                qs.unsqueeze(0),
                ks.unsqueeze(0),
                vs.unsqueeze(0),
                attn_mask=s.mask,
                enable_gqa=qs.shape[0] != ks.shape[0],
            )
            out[s.q_start : s.q_start + s.q_len] = o.squeeze(0).transpose(0, 1)
        return out
