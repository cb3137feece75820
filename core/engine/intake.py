"""The engine's intake: the bounds on what other threads may hand it, checked before any work is done.

:class:`Intake` refuses a text prompt longer than ``--max-prompt-chars`` before tokenizing it
(:class:`~loraserve.errors.TooLarge`), tokenizes under a lock (a Hugging Face fast tokenizer may
raise "Already borrowed" when two threads encode at once, and the HTTP server tokenizes in worker
threads), and keeps the waiting queue within ``--max-queued-requests``: :meth:`Intake.reserve`
counts requests handed to the engine thread but not yet in the scheduler's waiting queue, so two
submitters racing cannot both squeeze past the bound (:class:`~loraserve.errors.QueueFull`).
"""

from __future__ import annotations

import threading
from typing import Any

from loraserve.errors import QueueFull, TooLarge, UserError

PROMPT_CHARS_PER_TOKEN = 32  # default --max-prompt-chars: this many characters per context token


class Intake:
    """Bounds and tokenization for one engine. ``max_prompt_chars`` None means the default above."""

    def __init__(self, tokenizer: Any, context_len: int, max_queued: int, max_prompt_chars: int | None = None):
        self.tokenizer = tokenizer
        self.max_queued = max_queued
        self.max_prompt_chars = max_prompt_chars or PROMPT_CHARS_PER_TOKEN * context_len
        self.pending = 0  # requests reserved but not yet in the waiting queue
        self._lock = threading.Lock()
        self._encode_lock = threading.Lock()

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The token ids of ``text``; TooLarge (not tokenized) when it has more than ``max_prompt_chars``."""
        if len(text) > self.max_prompt_chars:
            raise TooLarge(f"the prompt text is {len(text)} characters long, more than the {self.max_prompt_chars} "
                           "allowed (--max-prompt-chars; by default 32 x the context length); shorten it")
        if self.tokenizer is None:
            raise UserError("this model has no tokenizer (dummy weights?); send 'input_ids' instead of text")
        with self._encode_lock:
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def reserve(self, count: int, waiting: int) -> None:
        """Hold room for ``count`` requests next to ``waiting`` queued ones, or raise QueueFull
        (TooLarge when ``count`` alone is more than the queue holds)."""
        if count > self.max_queued:
            raise TooLarge(f"this request has {count} sequences but the queue holds at most {self.max_queued} "
                           "(--max-queued-requests); split it into smaller requests")
        with self._lock:
            queued = waiting + self.pending
            if queued + count > self.max_queued:
                raise QueueFull(f"the server is busy: {queued} requests are queued and this one adds {count}, more "
                                f"than --max-queued-requests={self.max_queued}; retry in a moment")
            self.pending += count

    def release(self, count: int) -> None:
        """Give back room reserved for ``count`` requests (they joined the waiting queue, or never will)."""
        with self._lock:
            self.pending -= count
