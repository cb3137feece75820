"""The static LoRA batch-info buffers of decode steps captured in CUDA graphs.

A captured step reads its batch info from fixed device addresses, so every replay refills the same
buffers: :class:`GraphBatchInfoBuffers` owns them, hands out the batch info (views of them) that a
capture bakes in, and refills them with one host-to-device copy per step.
"""

from __future__ import annotations

import torch

from loraserve.contract import LoRABatchInfo


class GraphBatchInfoBuffers:
    """Static batch-info buffers for decode steps of up to ``max_tokens`` requests (one token
    each) over ``num_slots`` slots, in one int32 device buffer ``[rank of each slot | scaling of
    each slot (float32 bits) | slot of each row]`` refilled by one copy per step. Slot ``num_slots``
    is a null slot of rank 0 for the padding rows of a captured batch: the kernels skip rank-0 rows
    without touching the pools, so it needs no A/B of its own."""

    def __init__(self, num_slots: int, max_rank: int, max_tokens: int, device: torch.device):
        n = self.num_slots = num_slots
        self.max_rank = max_rank
        self.meta = torch.zeros(2 * (n + 1) + max_tokens, dtype=torch.int32, device=device)
        self.meta[2 * (n + 1) :] = n
        # pinned, so the copy is asynchronous; rewritten only after the previous step's sampling
        # has synchronised with the device
        self.stage = torch.empty_like(self.meta, device="cpu", pin_memory=device.type == "cuda")
        self.indptr = torch.arange(max_tokens + 1, dtype=torch.int32, device=device)

    def capture_info(self, num_tokens: int) -> LoRABatchInfo:
        """The batch info of a captured decode step of ``num_tokens`` rows: views of the static
        buffers, refilled by :meth:`fill` before every replay."""
        n = self.num_slots
        slots = self.meta[2 * (n + 1) : 2 * (n + 1) + num_tokens]
        return LoRABatchInfo(
            num_tokens=num_tokens,
            num_segments=num_tokens,
            seg_indptr=self.indptr[: num_tokens + 1],
            seg_slot=slots,
            token_slot=slots,
            ranks=self.meta[: n + 1],
            scalings=self.meta[n + 1 : 2 * (n + 1)].view(torch.float32),
            max_rank=self.max_rank,
            seg_indptr_host=list(range(num_tokens + 1)),
            seg_slot_host=[n] * num_tokens,
            ranks_host=[0] * (n + 1),
            scalings_host=[0.0] * (n + 1),
        )

    def fill(self, seg_slot: list[int], ranks: list[int], scalings: list[float], num_tokens: int) -> None:
        """Fill the buffers for a decode step whose rows use ``seg_slot``, padded to ``num_tokens``
        rows with the null slot: one host-to-device copy of the slots, ranks and scalings."""
        n = self.num_slots
        end = 2 * (n + 1) + num_tokens
        stage = self.stage
        stage[: n + 1] = torch.tensor(ranks + [0], dtype=torch.int32)
        stage[n + 1 : 2 * (n + 1)] = torch.tensor(scalings + [0.0], dtype=torch.float32).view(torch.int32)
        stage[2 * (n + 1) : end] = torch.tensor(seg_slot + [n] * (num_tokens - len(seg_slot)), dtype=torch.int32)
        self.meta[:end].copy_(stage[:end], non_blocking=True)
