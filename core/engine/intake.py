"""The engine's intake: the bounds on what other threads may hand it, checked before any work is done.

:func:`split_batch` checks the shape of a Python-API batch (one value or one per input),
:func:`check_sampling_params` the sampling parameters, :func:`check_token_ids` and
:func:`check_fits` a request's tokens against the vocabulary, the context length and the KV cache.
:class:`Intake` refuses a text prompt longer than ``--max-prompt-chars`` before tokenizing it
(:class:`~loraserve.errors.TooLarge`), tokenizes under a lock (a Hugging Face fast tokenizer may
raise "Already borrowed" when two threads encode at once, and the HTTP server tokenizes in worker
threads; chat templates render there too, and token ids turn back into text), and keeps the
waiting queue within ``--max-queued-requests``: :meth:`Intake.reserve` counts requests handed to
the engine thread but not yet in the scheduler's waiting queue, so two submitters racing cannot
both squeeze past the bound (:class:`~loraserve.errors.QueueFull`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from loraserve.errors import QueueFull, TooLarge, UserError
from loraserve.lora.composition import composed_lora_path
from loraserve.sched.sampling_params import SamplingParams

PROMPT_CHARS_PER_TOKEN = 32  # default --max-prompt-chars: this many characters per context token


def split_batch(prompt: Any, sampling_params: Any, adapters: Any, input_ids: Any) -> tuple[list[tuple], bool]:
    """SGLang's ``Engine.generate`` arguments as ``(prompt, input_ids, params, adapter)`` per input, and
    whether a single input was given (not a list); UserError when they do not line up."""
    if (prompt is None) == (input_ids is None):
        raise UserError("give exactly one of 'text' and 'input_ids'")
    single = isinstance(prompt, str) if prompt is not None else bool(input_ids) and isinstance(input_ids[0], int)
    items = (
        [prompt] if isinstance(prompt, str) else prompt if prompt is not None else [input_ids] if single else input_ids
    )
    if not isinstance(items, list) or not items:
        raise UserError("'text' must be a string or a non-empty list of strings")
    n = len(items)
    params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * n
    adapters = composed_lora_path(adapters)  # weighted compositions as their spelling
    adapters = adapters if isinstance(adapters, list) else [adapters] * n
    if len(params) != n or len(adapters) != n:
        raise UserError(
            f"the batch has {n} inputs but {len(params)} sampling_params and {len(adapters)} "
            "lora_path entries; give one of each per input, or a single value for all"
        )
    if prompt is not None:
        return [(item, None, p, a) for item, p, a in zip(items, params, adapters)], single
    return [(None, item, p, a) for item, p, a in zip(items, params, adapters)], single


def check_sampling_params(params: SamplingParams | dict | None, vocab_size: int) -> SamplingParams:
    """``params`` (SGLang's dict, or parsed) checked: valid for the vocabulary, and ``n`` 1."""
    if isinstance(params, dict) or params is None:
        params = SamplingParams.from_dict(params or {})
    params.validate(vocab_size=vocab_size)
    if params.n != 1:
        raise UserError(f"n={params.n} is not supported yet; send n=1 (repeat the prompt for several samples)")
    return params


def check_token_ids(ids: list, vocab_size: int) -> None:
    """UserError unless ``ids`` is a non-empty list of token ids in ``[0, vocab_size)``."""
    if not ids:
        raise UserError("the prompt is empty; send at least one token")
    bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise UserError(f"input_ids contain {bad[0]!r}, outside the vocabulary [0, {vocab_size})")


def check_fits(prompt_len: int, max_new_tokens: int, context_len: int, capacity: int) -> None:
    """UserError unless the prompt plus ``max_new_tokens`` fit the context and a KV cache of ``capacity`` tokens."""
    if prompt_len + max_new_tokens > context_len:
        raise UserError(
            f"the prompt has {prompt_len} tokens and max_new_tokens is {max_new_tokens}: together "
            f"more than the model's context length of {context_len} tokens; shorten the "
            "prompt or lower max_new_tokens"
        )
    if prompt_len + max_new_tokens > capacity:
        raise UserError(
            f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) can never fit "
            f"in the KV cache of {capacity} tokens; shorten the prompt, lower max_new_tokens or "
            "start the server with a larger --max-total-tokens"
        )


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
            raise TooLarge(
                f"the prompt text is {len(text)} characters long, more than the {self.max_prompt_chars} "
                "allowed (--max-prompt-chars; by default 32 x the context length); shorten it"
            )
        if self.tokenizer is None:
            raise UserError("this model has no tokenizer (dummy weights?); send 'input_ids' instead of text")
        with self._encode_lock:
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def prompt_ids(self, prompt: str | None, input_ids: Sequence[int] | None, vocab_size: int) -> list[int]:
        """The token ids of a request's prompt: ``input_ids`` checked against the vocabulary, else the
        text ``prompt`` tokenized (TooLarge before tokenizing a huge one)."""
        if input_ids is None:
            if prompt is None:
                raise UserError("give either 'text' (a prompt) or 'input_ids'")
            if not isinstance(prompt, str):
                raise UserError(f"the prompt must be a string, got {type(prompt).__name__}")
            input_ids = self.tokenize(prompt)
        ids = list(input_ids)
        check_token_ids(ids, vocab_size)
        return ids

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        """The prompt ids of a chat: the template rendered with the generation prompt, then tokenized
        without special tokens (the template holds them); TooLarge before tokenizing a huge text."""
        if self.tokenizer is None:
            raise UserError(
                "this model has no tokenizer, which chat needs; start the server with --tokenizer-path, "
                "or use /v1/completions with token-id prompts"
            )
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(
                "the model's tokenizer has no chat template; use /v1/completions, or start the server "
                "with a --tokenizer-path that has one"
            )
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja's TemplateError, raise_exception() in the template, ...
            raise UserError(
                f"the chat template rejected the messages ({exc}); fix the message roles or order"
            ) from None
        return self.tokenize(text, add_special_tokens=False)

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``token_ids``; UserError when the model has no tokenizer."""
        if self.tokenizer is None:
            raise UserError("this model has no tokenizer (dummy weights?), so token ids cannot be turned into text")
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def reserve(self, count: int, waiting: int) -> None:
        """Hold room for ``count`` requests next to ``waiting`` queued ones, or raise QueueFull
        (TooLarge when ``count`` alone is more than the queue holds)."""
        if count > self.max_queued:
            raise TooLarge(
                f"this request has {count} sequences but the queue holds at most {self.max_queued} "
                "(--max-queued-requests); split it into smaller requests"
            )
        with self._lock:
            queued = waiting + self.pending
            if queued + count > self.max_queued:
                raise QueueFull(
                    f"the server is busy: {queued} requests are queued and this one adds {count}, more "
                    f"than --max-queued-requests={self.max_queued}; retry in a moment"
                )
            self.pending += count

    def release(self, count: int) -> None:
        """Give back room reserved for ``count`` requests (they joined the waiting queue, or never will)."""
        with self._lock:
            self.pending -= count
