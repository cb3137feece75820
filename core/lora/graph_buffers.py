"""The static LoRA batch-info buffers of decode steps captured in CUDA graphs.

A captured step reads its batch info from fixed device addresses, so every replay refills the same
buffers: :class:`GraphBatchInfoBuffers` owns them, hands out the batch info (views of them) that a
capture bakes in, and refills them with one host-to-device copy per step.
"""

from __future__ import annotations

import array

import torch

from loraserve.contract import LoRABatchInfo
from loraserve.staging import HostStaging


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
        # two page-locked stages used alternately, so the copy is asynchronous and a stage is
        # rewritten only after its copy ran: the engine prepares step N+1 only after step N-1
        # completed (the overlapped loop's contract; see HostStaging)
        self.staging = HostStaging(device, capacity=self.meta.numel())
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
        rows with the null slot: one host-to-device copy of the slots, ranks and scalings (once per
        step, on the stream the graph replays on)."""
        n = self.num_slots
        if len(ranks) != n or len(scalings) != n or not len(seg_slot) <= num_tokens <= self.meta.numel() - 2 * (n + 1):
            raise ValueError(
                f"{len(ranks)} ranks and {len(scalings)} scalings for {n} slots, and {len(seg_slot)} rows "
                f"padded to {num_tokens}, do not fit these buffers"
            )
        packed = array.array("i", ranks)
        packed.append(0)
        packed.frombytes(array.array("f", [*scalings, 0.0]).tobytes())
        packed.extend(seg_slot)
        packed.extend([n] * (num_tokens - len(seg_slot)))
        self.staging.upload(packed, out=self.meta)
