"""``TorchLoRABackend``: the reference implementation of the LoRA backend contract.

Plain PyTorch, float32 accumulation, one small matmul pair per (slot, slice). It is the CPU
default and the oracle every kernel backend is tested against, so it favours obviousness over
speed: the only optimisation is grouping each slot's tokens once per step in :meth:`prepare`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loraserve.contract import LoRABackend, LoRABatchInfo


class TorchLoRABackend(LoRABackend):
    name = "torch"
    supports_embedding = True
    supports_dora = True

    def prepare(self, batch: LoRABatchInfo) -> None:
        super().prepare(batch)
        rows: dict[int, list[int]] = {}
        for seg, slot in enumerate(batch.seg_slot_host):
            if batch.ranks_host[slot] > 0:
                start, end = batch.seg_indptr_host[seg], batch.seg_indptr_host[seg + 1]
                rows.setdefault(slot, []).extend(range(start, end))
        # (slot, rank, scaling, token rows) for every slot that has tokens and a non-zero rank
        self._groups = [
            (
                slot,
                batch.ranks_host[slot],
                batch.scalings_host[slot],
                torch.tensor(idx, dtype=torch.long, device=batch.seg_indptr.device),
            )
            for slot, idx in rows.items()
            if idx
        ]

    def run_lora(
        self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, base_out: torch.Tensor, output_offsets: Sequence[int]
    ) -> None:
        batch, n_slices = self.checked_batch(x, A, B, base_out, output_offsets)
        R = batch.max_rank
        for slot, rank, scaling, idx in self._groups:
            xs = x.index_select(0, idx).float()
            for i in range(n_slices):
                lo, hi = output_offsets[i], output_offsets[i + 1]
                shrunk = xs @ A[slot, i * R : i * R + rank].float().T
                delta = (shrunk @ B[slot, lo:hi, :rank].float().T) * scaling
                cols = base_out[:, lo:hi]
                cols[idx] = (cols[idx].float() + delta).to(base_out.dtype)

    def run_lora_embedding(
        self, input_ids: torch.Tensor, A: torch.Tensor, B: torch.Tensor, base_out: torch.Tensor
    ) -> None:
        batch = self.batch
        if batch is None:
            raise RuntimeError("prepare() must be called before run_lora_embedding()")
        for slot, rank, scaling, idx in self._groups:
            shrunk = A[slot, :rank].float()[:, input_ids[idx]].T
            delta = (shrunk @ B[slot, :, :rank].float().T) * scaling
            base_out[idx] = (base_out[idx].float() + delta).to(base_out.dtype)
