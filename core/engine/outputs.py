"""Turning sampled tokens into text, finish decisions and the outputs the API returns.

``OutputBuilder`` keeps each request's incremental detokenizer (``tokenizers``' ``DecodeStream``),
checks the finish conditions after every token (length, EOS, stop token ids, stop strings,
context length), and builds the streaming deltas and the final SGLang-style result dict.
Text that could still turn into a stop string is held back from the stream until it is decided.
"""

from __future__ import annotations

import time
from typing import Any

from loraserve.engine.stop import StopChecker, finish_reason
from loraserve.sched.request import Request, RequestOutput


class _TextState:
    """Incremental decoding and stop-string state of one request."""

    def __init__(self, tokenizer: Any, request: Request):
        self.stop = StopChecker.from_params(request.params)
        self.stream = None
        if tokenizer is not None and getattr(tokenizer, "is_fast", False):
            from tokenizers.decoders import DecodeStream

            self.stream = DecodeStream(skip_special_tokens=request.params.skip_special_tokens)
        self.text = ""
        self.stream_len = 0
        self.matched: str | None = None


class OutputBuilder:
    """Finish decisions and outputs of one engine's requests. With ``detokenize=False`` (an engine
    whose HTTP server runs in another process) no text is decoded and no stop string checked: the
    deltas carry token ids only, and the other process follows them with :meth:`follow`."""

    def __init__(self, tokenizer: Any, eos_token_ids: set[int], detokenize: bool = True):
        self.tokenizer = tokenizer if detokenize else None
        self.eos_token_ids = eos_token_ids

    def _state(self, r: Request) -> _TextState:
        if r.detok is None:
            r.detok = _TextState(self.tokenizer, r)
        return r.detok

    def _decode_next(self, r: Request, state: _TextState, token: int) -> None:
        if self.tokenizer is None:
            return
        if state.stream is not None:
            piece = state.stream.step(self.tokenizer.backend_tokenizer, token)
            if piece:
                state.text += piece
        else:
            state.text = self.tokenizer.decode(r.output_ids, skip_special_tokens=r.params.skip_special_tokens)

    def append(
        self,
        r: Request,
        token: int,
        logprob: float | None,
        top_logprobs: list[tuple[int, float]] | None,
        context_len: int,
    ) -> str | None:
        """Record a token sampled for ``r`` (with its logprob and top logprobs when asked for) and
        decode it; returns a finish reason or None. (Penalty histories are updated on the device
        when the token is sampled, not here.)"""
        r.output_ids.append(token)
        if r.params.return_logprob or r.params.top_logprobs_num:
            r.logprobs.append(float(logprob))
            if r.params.top_logprobs_num:
                r.top_logprobs.append(top_logprobs)
        if r.first_token_time is None:
            r.first_token_time = time.perf_counter()
        return self.advance(r, token, context_len)

    def advance(self, r: Request, token: int, context_len: int) -> str | None:
        """Account for the token just appended to ``r.output_ids``; returns a finish reason or None."""
        state = self._state(r)
        self._decode_next(r, state, token)
        reason = finish_reason(token, len(r.output_ids), r.params, self.eos_token_ids)
        check = state.stop.check(state.text)
        if check.stopped:
            state.matched, state.text, state.stream_len = check.matched, check.text, len(check.text)
            return "stop"
        state.stream_len = check.stream_len
        if reason is None and r.num_read >= context_len:
            reason = "length"
        if reason == "stop" and state.matched is None:
            state.matched = token
        return reason

    def follow(self, r: Request, token: int) -> bool:
        """Decode the token just appended to ``r.output_ids`` by an engine elsewhere, which decides
        length and stop-token finishes itself; returns True when a stop string matched (the text is
        then cut as :meth:`advance` cuts it, and the request should finish with ``"stop"``)."""
        state = self._state(r)
        self._decode_next(r, state, token)
        check = state.stop.check(state.text)
        if check.stopped:
            state.matched, state.text, state.stream_len = check.matched, check.text, len(check.text)
            return True
        state.stream_len = check.stream_len
        return False

    def finished_elsewhere(self, r: Request, matched: int | str | None) -> None:
        """Record the stop token id (or EOS id) that ended ``r`` in an engine elsewhere, for its
        ``meta_info``; the final delta then releases any text held back for a stop string."""
        state = self._state(r)
        if r.finish_reason == "stop" and state.matched is None:
            state.matched = matched

    def delta(self, r: Request, finished: bool) -> RequestOutput:
        """New text/tokens/logprobs since the previous delta of ``r``."""
        state = self._state(r)
        end = len(state.text) if finished else state.stream_len
        text = state.text[r.emitted_chars : end]
        r.emitted_chars = max(r.emitted_chars, end)
        tokens = r.output_ids[r.emitted_tokens :]
        r.emitted_tokens = len(r.output_ids)
        logprobs = r.logprobs[r.emitted_logprobs :]
        tops = r.top_logprobs[r.emitted_logprobs :] if r.top_logprobs else []
        r.emitted_logprobs = len(r.logprobs)
        meta = self.meta(r) if finished else {}
        return RequestOutput(r.request_id, text, tokens, finished, r.finish_reason, logprobs, tops, meta)

    def meta(self, r: Request) -> dict:
        state = self._state(r)
        reason: dict[str, Any] | None = None
        if r.finish_reason is not None:
            reason = {"type": r.finish_reason}
            if r.finish_reason == "stop" and state.matched is not None:
                reason["matched"] = state.matched
            if r.error:
                reason["message"] = r.error
        meta = {
            "id": r.request_id,
            "prompt_tokens": len(r.prompt_ids),
            "completion_tokens": len(r.output_ids),
            "cached_tokens": r.cached_tokens or 0,
            "finish_reason": reason,
            "lora_path": r.adapter,
        }
        if r.first_token_time is not None:
            meta["ttft_s"] = r.first_token_time - r.arrival_time
        if r.finish_time is not None:
            meta["e2e_latency_s"] = r.finish_time - r.arrival_time
        if r.params.return_logprob or r.params.top_logprobs_num:
            meta["output_token_logprobs"] = [[lp, tok] for lp, tok in zip(r.logprobs, r.output_ids)]
            if r.params.top_logprobs_num:
                meta["output_top_logprobs"] = [[[lp, tok] for tok, lp in row] for row in r.top_logprobs]
        return meta

    def final(self, r: Request) -> dict:
        """The SGLang-style result of a finished request."""
        return {"text": self._state(r).text, "output_ids": list(r.output_ids), "meta_info": self.meta(r)}
