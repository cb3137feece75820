"""The ``LoRABackend`` contract every kernel backend plugin implements.

A backend adds each token's own adapter delta on top of the shared base projection::

    base_out[t, off[i]:off[i+1]] += scaling[slot] * (x[t] @ A[slot, i*R : i*R + r].T) @ B[slot, off[i]:off[i+1], :r].T

for every slice ``i`` of the projection (1 for plain layers, 3 for fused q/k/v, 2 for fused
gate/up), where ``slot`` is the token's slot, ``r = ranks[slot]`` and ``R`` is the pool's rank
capacity. ``backend_torch`` defines the expected numbers.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from loraserve.lora.batch_info import LoRABatchInfo


class LoRABackend:
    """Base class of LoRA kernel backends.

    Contract:

    - :meth:`prepare` is called once per forward step, before any layer runs, with that step's
      :class:`LoRABatchInfo`. It may derive and cache whatever the kernels need (permutations,
      chunk tables) but must not read device data back to the host, so a decode step stays
      capturable in a CUDA graph.
    - :meth:`run_lora` is called per LoRA layer and adds the delta into ``base_out`` **in place**.
      It may not modify ``x``, ``A`` or ``B``. Rows whose slot has rank 0 must be left bit-identical.
      Arithmetic accumulates in float32 whatever the input dtype.
    - Both are always safe to call with ``num_tokens == 1``.
    - A backend with ``supports_fused_shrink`` also accepts ``shrunk``: ``x @ A[slot].T`` for *every*
      slot, computed by the caller (the base GEMM over the weight with the pool's A rows appended,
      so the shrink shares the GEMM's read of ``x``): ``[num_tokens, num_slots * num_slices * R]``,
      row stride free, column stride 1, slot ``s``'s columns at ``s * num_slices * R``. The backend
      then only runs the expand, taking each token's own slot's columns.

    Tensors: ``x`` is ``[num_tokens, in_dim]``; ``A`` is ``[num_slots, num_slices * R, in_dim]``;
    ``B`` is ``[num_slots, out_dim, R]``; ``base_out`` is ``[num_tokens, out_dim]``;
    ``output_offsets`` is a host tuple of ``num_slices + 1`` increasing ints ending at ``out_dim``.
    """

    name = "abstract"
    #: whether :meth:`run_lora_embedding` is implemented (LoRA on embed_tokens / lm_head)
    supports_embedding = False
    #: whether :meth:`run_lora` accepts ``shrunk`` (the shrink done by the base GEMM)
    supports_fused_shrink = False
    #: whether ``prepare`` + ``run_lora`` read only device tensors (and the batch's host integers),
    #: so the engine may capture decode steps in CUDA graphs and replay them with new buffer contents
    graph_capturable = False

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.batch: LoRABatchInfo | None = None

    def prepare(self, batch: LoRABatchInfo) -> None:
        self.batch = batch

    def run_lora(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, base_out: torch.Tensor,
                 output_offsets: Sequence[int], shrunk: torch.Tensor | None = None) -> None:
        raise NotImplementedError

    def fuse_shrink(self, num_tokens: int, in_dim: int, out_dim: int, n_slices: int, max_rank: int,
                    num_slots: int) -> bool:
        """Whether a step of ``num_tokens`` should do a projection's shrink inside its base GEMM
        (only asked of backends with ``supports_fused_shrink``; host integers only)."""
        return False

    def checked_batch(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, base_out: torch.Tensor,
                      output_offsets: Sequence[int], shrunk: torch.Tensor | None = None) -> tuple[LoRABatchInfo, int]:
        """The step's batch info and the number of slices, after the checks every backend shares."""
        if self.batch is None:
            raise RuntimeError("prepare() must be called before run_lora()")
        n_slices = check_run_lora_args(x, A, B, base_out, output_offsets, self.batch.max_rank)
        if shrunk is not None:
            if not self.supports_fused_shrink:
                raise ValueError(f"LoRA backend {self.name!r} does not take a precomputed shrink")
            width = A.shape[0] * A.shape[1]
            if shrunk.dim() != 2 or shrunk.shape != (x.shape[0], width) or shrunk.stride(1) != 1:
                raise ValueError(f"shrunk has shape {tuple(shrunk.shape)} and strides {shrunk.stride()}, expected "
                                 f"({x.shape[0]}, {width}) with column stride 1")
            if shrunk.dtype != x.dtype:
                raise ValueError(f"shrunk has dtype {shrunk.dtype}, expected {x.dtype}")
        return self.batch, n_slices

    def expand_epilogue(self, B: torch.Tensor, output_offsets: Sequence[int], shrunk: torch.Tensor) -> Any:
        """Optionally leave this step's expand to the kernel that consumes the projection's output.

        Called instead of ``run_lora(..., shrunk=shrunk)`` for projections whose consumer can add the
        delta itself (o_proj and down_proj into the next RMSNorm, gate_up_proj into SiLU-and-mul).
        Return a :class:`~loraserve.models.epilogue.LoRAEpilogue` to take that path, or None (the
        default) to have ``run_lora`` add the delta in place as usual. Decide from host integers only
        (a decode step may be captured in a CUDA graph)."""
        return None

    def run_lora_embedding(self, input_ids: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                           base_out: torch.Tensor) -> None:
        """Add ``scaling * A[slot][:, input_ids].T @ B[slot].T`` for LoRA on the embedding.

        ``A`` is ``[num_slots, R, vocab]`` and ``B`` is ``[num_slots, hidden, R]`` (PEFT layout).
        """
        raise NotImplementedError(f"LoRA backend {self.name!r} does not support LoRA on embeddings")


def check_run_lora_args(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, base_out: torch.Tensor,
                        output_offsets: Sequence[int], max_rank: int) -> int:
    """Validate shapes shared by every backend; returns the number of slices."""
    n_slices = len(output_offsets) - 1
    if n_slices < 1 or output_offsets[0] != 0 or any(b <= a for a, b in zip(output_offsets, output_offsets[1:])):
        raise ValueError(f"output_offsets {tuple(output_offsets)} must start at 0 and increase")
    if base_out.shape != (x.shape[0], output_offsets[-1]):
        raise ValueError(f"base_out has shape {tuple(base_out.shape)}, expected ({x.shape[0]}, {output_offsets[-1]})")
    if A.dim() != 3 or A.shape[1] != n_slices * max_rank or A.shape[2] != x.shape[1]:
        raise ValueError(f"A has shape {tuple(A.shape)}, expected (slots, {n_slices}*{max_rank}, {x.shape[1]})")
    if B.dim() != 3 or B.shape[1] != output_offsets[-1] or B.shape[2] != max_rank or B.shape[0] != A.shape[0]:
        raise ValueError(f"B has shape {tuple(B.shape)}, expected ({A.shape[0]}, {output_offsets[-1]}, {max_rank})")
    return n_slices
