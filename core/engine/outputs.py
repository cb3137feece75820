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
    def __init__(self, tokenizer: Any, eos_token_ids: set[int]):
        self.tokenizer = tokenizer
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

    def append(self, r: Request, result: Any, i: int, context_len: int) -> str | None:
        """Record the token sampled for ``r`` (row ``i`` of the sampler's ``result``: its id, and its
        logprobs when asked for) and decode it; returns a finish reason or None."""
        token = int(result.token_ids[i])
        r.output_ids.append(token)
        if r.history is not None:
            r.history.append(token)
        if r.params.return_logprob or r.params.top_logprobs_num:
            r.logprobs.append(float(result.logprobs[i]))
            if r.params.top_logprobs_num:
                r.top_logprobs.append(result.top_logprobs[i])
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
        if reason is None and r.num_tokens >= context_len:
            reason = "length"
        if reason == "stop" and state.matched is None:
            state.matched = token
        return reason

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
