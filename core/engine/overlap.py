"""What lets the engine loop overlap: step N runs on the GPU while the host prepares step N+1 and
reads step N-1's tokens.

- :class:`FutureTokens` keeps each step's sampled tokens in a device ring. A request's token that
  the host has not read yet is a *placeholder*, ``-(k + 1)`` for ring index ``k``; the model runner
  replaces placeholders by their tokens on the device (:meth:`FutureTokens.resolve`), so the next
  step feeds a token the host has never seen, with no round trip.
- :class:`TokenReadback` starts one asynchronous device-to-host copy per step (tokens and, when
  asked, their log-probabilities) into page-locked memory, with an event; :meth:`Readback.wait`
  blocks on that event only when the host needs the values, one step later.
- :class:`LaunchedStep` is what the engine remembers of a step between launching it and reading
  its outputs.

Ordering contract (what makes two buffers enough): the engine launches step N+1 only after it has
waited for step N-1's readback, so a host staging buffer used by step N-1 is free again when step
N+1 is prepared. Everything on the device runs in one stream order, so a KV block or ring entry
that the host hands to a later step is written only after the earlier steps that read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from loraserve.sched.request import Request
from loraserve.sched.scheduler import ScheduledChunk


class FutureTokens:
    """A device ring of sampled tokens, addressed by placeholders (see the module docstring).

    A placeholder must be resolved within the next two steps (the engine reads every step's tokens
    one step later, then replaces the placeholders on the host), so ``capacity`` of at least twice
    the rows one step can sample is enough."""

    def __init__(self, capacity: int, device: torch.device):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self.capacity = capacity
        self.tokens = torch.zeros(capacity, dtype=torch.long, device=device)
        self._next = 0

    def put(self, token_ids: torch.Tensor) -> list[int]:
        """Store a step's sampled tokens (on the device, no synchronisation); returns their placeholders."""
        n = token_ids.numel()
        if n > self.capacity:
            raise ValueError(f"{n} tokens do not fit a ring of {self.capacity}")
        if self._next + n > self.capacity:
            self._next = 0
        base = self._next
        self.tokens[base : base + n].copy_(token_ids, non_blocking=True)
        self._next += n
        return [-(base + i + 1) for i in range(n)]

    def resolve(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` (int64, on the device) with every placeholder replaced by its token."""
        index = (-ids - 1).clamp_(0, self.capacity - 1)
        return torch.where(ids < 0, self.tokens[index], ids)


class Readback:
    """One step's tokens on their way to the host. :meth:`wait` returns ``(tokens, logprobs)``
    (logprobs None when the step asked for none), blocking until the copy landed."""

    def __init__(self, host: torch.Tensor, n: int, with_logprobs: bool, event: Any):
        self._host, self._n, self._with_logprobs, self._event = host, n, with_logprobs, event

    def wait(self) -> tuple[list[int], list[float] | None]:
        if self._event is not None:
            self._event.synchronize()
        n = self._n
        values = self._host[: 2 * n if self._with_logprobs else n].tolist()
        tokens = [int(t) for t in values[:n]]
        return tokens, (values[n:] if self._with_logprobs else None)


class TokenReadback:
    """Starts each step's one asynchronous copy of its sampled tokens (and log-probabilities) into
    one of two page-locked buffers, used alternately (the module's ordering contract)."""

    def __init__(self, max_rows: int, device: torch.device):
        self.device = device
        self._pin = device.type == "cuda"
        self._buffers = [self._buffer(max_rows) for _ in range(2)]
        self._turn = 0

    def _buffer(self, rows: int) -> torch.Tensor:
        # float64 holds every token id exactly and every float32 log-probability: one copy for both
        return torch.empty(2 * max(rows, 1), dtype=torch.float64, pin_memory=self._pin)

    def start(self, token_ids: torch.Tensor, logprobs: torch.Tensor | None) -> Readback:
        n = token_ids.numel()
        turn, self._turn = self._turn, 1 - self._turn
        if 2 * n > self._buffers[turn].numel():
            self._buffers[turn] = self._buffer(n)
        host = self._buffers[turn]
        packed = token_ids.double() if logprobs is None else torch.cat([token_ids.double(), logprobs.double()])
        host[: packed.numel()].copy_(packed, non_blocking=True)
        event = None
        if self._pin:
            event = torch.cuda.Event()
            event.record()
        return Readback(host, n, logprobs is not None, event)


@dataclass(eq=False)
class LaunchedStep:
    """A step between its launch and the reading of its outputs.

    :ivar number: the engine's step number (``Request.last_step`` of its requests).
    :ivar sampled: the requests that sampled a token, in row order.
    :ivar readback: their tokens on the way to the host (None when nothing sampled).
    :ivar top_logprobs: per sampled row, the top log-probabilities (read synchronously, only when asked).
    :ivar free_after: requests that finished while this step could still read their KV blocks:
        their blocks are freed once its outputs are read.
    """

    number: int
    kind: str
    plan: list[ScheduledChunk]
    sampled: list[Request]
    started: float
    readback: Readback | None = None
    top_logprobs: list | None = None
    free_after: list[Request] = field(default_factory=list)
    gpu_events: tuple[Any, Any] | None = None
    #: tensor parallelism: the sampled tokens went to the other ranks
    shared: bool = False
