"""``EinsumLoRABackend``: every token gathers its own slot's weights; one einsum per slice."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loraserve.contract import LoRABackend, check_run_lora_args


class EinsumLoRABackend(LoRABackend):
    name = "einsum"

    def run_lora(
        self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, base_out: torch.Tensor, output_offsets: Sequence[int]
    ) -> None:
        batch = self.batch
        n_slices = check_run_lora_args(x, A, B, base_out, output_offsets, batch.max_rank)
        R = batch.max_rank
        slots = batch.token_slot.long()
        ranks = batch.ranks.long()[slots]
        # select (never multiply: the pool's entries past a slot's rank are unspecified, NaN included)
        # so no token uses padding beyond its own slot's rank
        keep = torch.arange(R, device=x.device)[None, :] < ranks[:, None]  # [T, R]
        scale = batch.scalings[slots][:, None]
        xf = x.float()
        for i in range(n_slices):
            lo, hi = output_offsets[i], output_offsets[i + 1]
            a = torch.where(keep[:, :, None], A[slots, i * R : (i + 1) * R].float(), 0.0)  # [T, R, in]
            b = torch.where(keep[:, None, :], B[slots, lo:hi].float(), 0.0)  # [T, out_i, R]
            shrunk = torch.einsum("ti,tri->tr", xf, a)
            delta = torch.einsum("tr,tor->to", shrunk, b) * scale
            rows = ranks > 0
            base_out[rows, lo:hi] = (base_out[rows, lo:hi].float() + delta[rows]).to(base_out.dtype)
