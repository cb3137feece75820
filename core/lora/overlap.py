"""Overlap loading: copy engines that fill GPU adapter slots while the GPU keeps computing.

A *copy engine* turns "fill slot s with adapter a" into work that completes on its own time:

- :class:`CudaStreamCopies` issues the host-to-device copies on a dedicated load stream. Before
  the copies it makes the load stream wait for an event recorded on the compute stream, so a slot
  is never overwritten while an already-enqueued step may still read it; after them it records a
  completion event, which :meth:`done` queries without blocking. Once done, :meth:`wait` orders
  the compute stream after the copy (a device-side wait, no host synchronisation).
- Tests use their own engine with the same three methods to control when copies complete.

Slot admission (:mod:`loraserve.lora.admission`) admits a request into a batch only once its
adapter's copy is done, and keeps scheduling everything else meanwhile. :func:`pinned_copy` gives
the page-locked host copy of an adapter that makes the copies truly asynchronous.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch


class CudaStreamCopies:
    """Copies on their own CUDA stream, one completion event per slot fill."""

    asynchronous = True

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def submit(self, fill: Callable[[], int]) -> dict:
        """Run ``fill`` (which enqueues the copies on the current stream and returns the bytes it
        copies) on the load stream, after everything already enqueued on the compute stream."""
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            start.record(self.stream)
            nbytes = fill()
            end.record(self.stream)
        return {"start": start, "end": end, "bytes": nbytes}

    def done(self, handle: dict) -> bool:
        return handle["end"].query()

    def wait(self, handle: dict) -> float:
        """Order the compute stream after the copy; returns the copy's duration in seconds."""
        torch.cuda.current_stream(self.device).wait_event(handle["end"])
        return handle["start"].elapsed_time(handle["end"]) / 1e3


def pinned_copy(adapter: Any, dtype: torch.dtype) -> Any:
    """The adapter with every tensor in ``dtype``, contiguous, in one page-locked host buffer.

    One allocation per adapter (the caching host allocator rounds every allocation up to a power
    of two, so many small ones would waste more) whose views replace the adapter's tensors."""
    tensors = adapter.tensors()
    total = sum(t.numel() for t in tensors)
    flat = torch.empty(total, dtype=dtype, pin_memory=True)
    offset = 0

    def place(t: torch.Tensor) -> torch.Tensor:
        nonlocal offset
        view = flat[offset : offset + t.numel()].view(t.shape)
        view.copy_(t)
        offset += t.numel()
        return view

    weights = {key: (place(A), place(B)) for key, (A, B) in adapter.weights.items()}
    extra = {
        name: (place(pair[0]), place(pair[1]))
        for name in ("embed_tokens", "lm_head")
        if (pair := getattr(adapter, name)) is not None
    }
    return dataclasses.replace(adapter, weights=weights, **extra)
