"""The model runner: turns a scheduled step into one forward pass and the logits to sample from.

It packs the step's token chunks into one flat batch (each request's tokens contiguous, in plan
order), sets up the attention metadata over the paged KV cache and, when LoRA is on, the step's
:class:`~loraserve.contract.LoRABatchInfo`, runs the model, and returns float32 logits for
the last token of every chunk that samples.
"""

from __future__ import annotations

import array
from collections.abc import Callable
from typing import Any

import torch

from loraserve.runner.attention import PagedSDPAAttention
from loraserve.sched.kv_cache import KVCache
from loraserve.sched.scheduler import ScheduledChunk
from loraserve.staging import HostStaging


class ModelRunner:
    """Runs forward steps of ``model`` over ``kv``.

    :param prepare_lora: optional ``prepare_lora(chunks)`` called once per step before the
        forward pass (the LoRA manager builds the batch info and hands it to the backend).
    :param graphs: optional decode steps captured in CUDA graphs
        (:class:`~loraserve.runner.cuda_graph.DecodeGraphs`, already captured; None: always eager).
    :param before_step: optional ``before_step(chunks)`` called first in every step (tensor
        parallelism: hands the step to the other ranks).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kv: KVCache,
        device: torch.device,
        prepare_lora: Callable[[list[ScheduledChunk]], None] | None = None,
        attention: Any = None,
        graphs: Any = None,
        before_step: Callable[[list[ScheduledChunk]], None] | None = None,
    ):
        self.model = model
        self.kv = kv
        self.device = device
        self.prepare_lora = prepare_lora
        self.attention = attention or PagedSDPAAttention(kv, sliding_window=getattr(model, "sliding_window", None))
        self.graphs = graphs
        self.before_step = before_step
        # the step's token ids, positions and sampled rows go up from page-locked memory: a copy
        # from pageable memory of a prefill's size (~0.5 MB at 64 x 512 tokens) makes the driver
        # wait for the steps still running, so the launch of the next step would wait for the device
        self._staging = HostStaging(device, capacity=4096)

    def drop_graphs(self) -> None:
        """Forget the captured graphs (before the process group is destroyed); later steps run eagerly."""
        self.graphs = None

    @torch.inference_mode()
    def forward(
        self, chunks: list[ScheduledChunk], resolve: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Enqueue one step; returns ``float32 [num_sampling_chunks, vocab]`` logits in plan order.

        ``resolve`` replaces the placeholders of tokens not read back yet (negative ids; see
        :class:`~loraserve.engine.overlap.FutureTokens`) by their tokens, on the device. Nothing
        here waits for the device: every host-to-device copy is asynchronous."""
        if self.before_step is not None:
            self.before_step(chunks)
        if self.graphs is not None and self.graphs.can_run(chunks):
            return self.graphs.run(chunks, resolve)
        ids: list[int] = []
        positions: list[int] = []
        last_rows: list[int] = []
        for chunk in chunks:
            ids.extend(chunk.request.token_slice(chunk.start, chunk.start + chunk.num_tokens))
            positions.extend(range(chunk.start, chunk.start + chunk.num_tokens))
            if chunk.samples:
                last_rows.append(len(ids) - 1)
        # one asynchronous copy from page-locked memory (int32 there, long here)
        packed = self._staging.upload(array.array("i", ids + positions + last_rows)).long()
        input_ids, pos, rows = packed.split([len(ids), len(positions), len(last_rows)])
        if resolve is not None:
            input_ids = resolve(input_ids)
        self.attention.begin_step([(c.request.blocks, c.start, c.num_tokens, c.table_row) for c in chunks])
        if self.prepare_lora is not None:
            self.prepare_lora(chunks)
        hidden = self.model(input_ids, pos, self.attention)
        if not last_rows:
            return torch.empty(0, 0, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows)).float()
