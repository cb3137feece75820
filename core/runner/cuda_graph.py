"""Decode steps captured in CUDA graphs: one graph per padded batch size, replayed every step.

A decode step (every request feeds one token) of ``n`` requests runs the graph of the smallest
captured size ``b >= n``. Everything the graph reads lives in static buffers that are refilled
before each replay, never reallocated: the token ids and positions, the attention metadata (block
tables, context lengths, cache slots to write; :meth:`PagedTritonAttention.begin_graph_step`) and,
with LoRA, the batch info (slot of each row, rank and scaling of each slot;
:meth:`LoRAManager.prepare_graph_step`). The ``b - n`` padding rows are inert: their sequences have
no context and write no key or value (cache slot -1), and their LoRA slot is a null slot of rank 0,
which the kernels skip. Adapter weights live in the pool's fixed buffers,
so loading or evicting an adapter changes what a graph reads, never where.

Prefill and mixed steps, and decode batches above ``--cuda-graph-max-bs``, run eagerly.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

logger = logging.getLogger("loraserve.engine.engine")

DEFAULT_MAX_BS = 256


def capture_sizes(max_bs: int) -> list[int]:
    """Batch sizes to capture: fine steps where decode batches usually are, coarser above."""
    sizes = [1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256]
    sizes += list(range(256 + 64, max_bs + 1, 64))
    return sorted({s for s in sizes if s < max_bs} | {max_bs})


class DecodeGraphs:
    """Captures and replays decode steps of ``model`` (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, attention: Any, lora: Any, device: torch.device, max_bs: int):
        self.model, self.attention, self.lora, self.device = model, attention, lora, device
        self.sizes = capture_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        # row 0: token ids, row 1: positions; refilled by one copy from a pinned stage before each
        # replay. Two stages, used alternately: the engine waits for step N-1's tokens before it
        # prepares step N+1, so the stage step N-1 copied from is free again (overlapped loop)
        self._inputs = torch.zeros(2, self.max_bs, dtype=torch.long, device=device)
        self.ids, self.pos = self._inputs[0], self._inputs[1]
        pin = device.type == "cuda"
        self._stages = [torch.zeros(2, self.max_bs, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._turn = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.replays = 0

    def _forward(self, b: int, info: Any) -> torch.Tensor:
        if info is not None:
            self.lora.backend.prepare(info)
        hidden = self.model(self.ids[:b], self.pos[:b], self.attention)
        return self.model.compute_logits(hidden).float()

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for b in reversed(self.sizes):  # largest first: smaller graphs reuse its pool memory
            self.attention.begin_graph_step([], b)
            info = self.lora.begin_graph_capture(b) if self.lora is not None else None
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile kernels, pick GEMM algorithms, outside the capture
                    self._forward(b, info)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.logits[b] = self._forward(b, info)
            self.graphs[b] = graph
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured %d CUDA graphs for decode batches of %s requests in %.1f s",
            len(self.sizes),
            ",".join(map(str, self.sizes)),
            time.perf_counter() - t0,
        )

    def can_run(self, chunks: list) -> bool:
        if not (0 < len(chunks) <= self.max_bs and all(c.num_tokens == 1 and c.samples for c in chunks)):
            return False
        return self.lora is None or self.lora.graph_can_serve(chunks)

    def run(self, chunks: list, resolve=None) -> torch.Tensor:
        """Replay the graph for this decode step; returns ``float32 [len(chunks), vocab]`` logits.
        ``resolve`` replaces placeholder token ids on the device (see ``ModelRunner.forward``)."""
        n = len(chunks)
        b = next(s for s in self.sizes if s >= n)
        stage, self._turn = self._stages[self._turn], 1 - self._turn
        stage[:, n:b] = 0
        stage[0, :n] = torch.tensor([c.request.token_slice(c.start, c.start + 1)[0] for c in chunks])
        stage[1, :n] = torch.tensor([c.start for c in chunks])
        self._inputs[:, :b].copy_(stage[:, :b], non_blocking=True)
        if resolve is not None:
            self.ids[:b] = resolve(self.ids[:b])
        self.attention.begin_graph_step([(c.request.blocks, c.start, 1, c.table_row) for c in chunks], b)
        if self.lora is not None:
            self.lora.prepare_graph_step(chunks, b)
        self.graphs[b].replay()
        self.replays += 1
        return self.logits[b][:n]
