"""``LoRABatchInfo``: which adapter slot each token of a step uses, built once per step.

The LoRA manager fills one of these per forward pass and every LoRA layer of the model reads it.
Tokens are laid out as the scheduler packed them: each request's tokens are contiguous (one
*segment* per request). Tensors live on the compute device; ``num_tokens`` and ``num_segments``
are host integers the scheduler already knows, so no backend needs to read the device to size a
launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoRABatchInfo:
    """Per-step LoRA routing shared by every layer.

    :ivar num_tokens: tokens in this step (rows of every activation).
    :ivar num_segments: requests in this step.
    :ivar seg_indptr: ``int32 [num_segments + 1]``; segment ``i`` is tokens
        ``seg_indptr[i]:seg_indptr[i+1]``.
    :ivar seg_slot: ``int32 [num_segments]``; GPU-pool slot of each segment's adapter.
    :ivar token_slot: ``int32 [num_tokens]``; slot of each token (``seg_slot`` expanded).
    :ivar ranks: ``int32 [num_slots]``; rank of the adapter in each slot, 0 for the base model or an
        empty slot (tokens of such slots are left untouched).
    :ivar scalings: ``float32 [num_slots]``; LoRA scaling of each slot.
    :ivar max_rank: the pool's rank capacity (second dimension of the A buffers per slice).
    :ivar seg_indptr_host, seg_slot_host: host copies of the same data, for backends that loop on
        the host (the torch reference backend). Never read by kernel backends.
    """

    num_tokens: int
    num_segments: int
    seg_indptr: torch.Tensor
    seg_slot: torch.Tensor
    token_slot: torch.Tensor
    ranks: torch.Tensor
    scalings: torch.Tensor
    max_rank: int
    seg_indptr_host: list[int]
    seg_slot_host: list[int]
    ranks_host: list[int]
    scalings_host: list[float]

    @classmethod
    def build(cls, seg_lens: list[int], seg_slot: list[int], ranks: list[int], scalings: list[float],
              max_rank: int, device: torch.device | str = "cpu") -> "LoRABatchInfo":
        """Build from host lists (one entry per segment, one per slot)."""
        if len(seg_lens) != len(seg_slot):
            raise ValueError(f"seg_lens has {len(seg_lens)} entries but seg_slot has {len(seg_slot)}")
        if len(ranks) != len(scalings):
            raise ValueError(f"ranks has {len(ranks)} slots but scalings has {len(scalings)}")
        for s in seg_slot:
            if not 0 <= s < len(ranks):
                raise ValueError(f"segment slot {s} is outside the pool's {len(ranks)} slots")
        if any(r < 0 or r > max_rank for r in ranks):
            raise ValueError(f"slot ranks {ranks} must lie in [0, max_rank={max_rank}]")
        indptr = [0]
        for n in seg_lens:
            if n < 0:
                raise ValueError(f"segment length {n} is negative")
            indptr.append(indptr[-1] + n)
        token_slot = [s for s, n in zip(seg_slot, seg_lens) for _ in range(n)]
        i32 = dict(dtype=torch.int32, device=device)
        return cls(
            num_tokens=indptr[-1], num_segments=len(seg_lens),
            seg_indptr=torch.tensor(indptr, **i32), seg_slot=torch.tensor(seg_slot, **i32),
            token_slot=torch.tensor(token_slot, **i32), ranks=torch.tensor(ranks, **i32),
            scalings=torch.tensor(scalings, dtype=torch.float32, device=device), max_rank=max_rank,
            seg_indptr_host=indptr, seg_slot_host=list(seg_slot), ranks_host=list(ranks),
            scalings_host=[float(s) for s in scalings],
        )
