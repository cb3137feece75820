"""A request as the engine tracks it, and the output events it produces.

A request's tokens are ``prompt_ids + output_ids``; ``num_computed`` of them already have keys and
values in the KV cache. Each step feeds the next uncomputed tokens (a prefill chunk, or the one
token sampled last step); when a step reaches the end of the known tokens, the next token is
sampled. Prefill, chunked prefill, decode and recompute after preemption are all this one rule.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """What one step produced for one request (a streaming delta), or its final state."""

    request_id: str
    text: str  # new text since the previous output
    token_ids: list[int]  # new token ids since the previous output
    finished: bool
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: Any  # loraserve.sched.sampling_params.SamplingParams
    adapter: str | None = None
    adapter_ref: Any = None  # the LoRA manager's reference (name, version) while the request lives
    output_ids: list[int] = field(default_factory=list)
    #: placeholders of tokens sampled on the device but not read back yet (overlap), oldest first
    pending: list[int] = field(default_factory=list)
    #: the last token it may produce (by length) is pending: it runs no further step
    final_token_pending: bool = False
    #: the number of the last step it was launched in (the engine defers freeing blocks of a
    #: request that finishes while that step may still run)
    last_step: int = -1
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    #: its row in the KV cache's device block table while it holds blocks, else -1
    table_row: int = -1
    status: Status = Status.WAITING
    finish_reason: str | None = None
    error: str | None = None
    #: HTTP status of a request finished with an error that is not an engine fault (None: a 500)
    error_status: int | None = None
    generator: torch.Generator | None = None
    history: Any = None  # loraserve.sched.sampling_params.TokenHistory when the request has penalties
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    sink: Callable[[RequestOutput], None] | None = None
    detok: Any = None  # incremental detokenizer state
    text: str = ""  # full decoded text (before stop-string trimming)
    emitted_chars: int = 0
    emitted_tokens: int = 0
    emitted_logprobs: int = 0
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    join_refusals: int = 0  # steps in which the scheduler's can_join refused it
    copy_wait_start: float | None = None  # when it first waited for its adapter's copy (overlap loading)
    #: prompt tokens found in the prefix cache when it first joined (None: not looked up)
    cached_tokens: int | None = None
    # the scheduler's prefix-cache state: when it was queued, the block keys it looks up, whose
    # keys and values its blocks hold, the last of its blocks in the cache and how many are there
    enqueued_step: int = 0
    prefix_keys: list | None = None
    prefix_owner: Any = None
    prefix_node: Any = None
    num_cached_blocks: int = 0
    prefix_cache_off: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + len(self.pending)

    @property
    def num_read(self) -> int:
        """Tokens the host knows the ids of (prompt and read-back output)."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Known tokens whose keys and values are not in the cache yet."""
        return self.num_tokens - self.num_computed

    def token_slice(self, start: int, end: int) -> list[int]:
        """Token ids of positions ``start:end``; pending tokens appear as their placeholders."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        out = (self.prompt_ids[start:] if start < n else []) + self.output_ids[max(0, start - n) : end - n]
        m = n + len(self.output_ids)
        if end > m:
            out += self.pending[max(0, start - m) : end - m]
        return out

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
