"""A catalogue of hostile and malformed requests, one table over every endpoint, as a fuzzer would send
them: wrong types for every field, out-of-range and boundary numbers, control characters, lone
surrogates and homoglyphs in strings, empty and mixed-type lists, duplicate and unknown keys, null
where a value is needed, broken bodies (truncated, trailing garbage, BOM, bytes that are not UTF-8,
other encodings), nesting at and past the limit, adapter sources that traverse paths or hold broken
files, adapter POSTs without JSON, model names with ':' in odd places, wrong methods and unknown
paths.

Each case asserts the exact 4xx status, the error format of its route (native ``{"error": {message,
type, code}}``, OpenAI's ``{"error": {message, type, param, code}}`` under ``/v1/``, SGLang's
``{"success": false, "error_message", "loaded_adapters"}`` from the adapter routes) and a substring of
the message naming the field or limit. After every case the server must still be whole: the same
greedy /generate batch (base model and an adapter) answers what it answered before the catalogue
(checked once against the Python API), /metrics parses, and the engine holds no request, no KV block
and no extra adapter.

Cases the server gets wrong stay in the table with the right expectation, marked strict xfail with
the reason: fixing the server turns them into failures that ask for the mark to go.

This file does not repeat the cases of test_http_errors.py, test_http_bounds.py and
test_adapter_policy.py.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from http_fixtures import GREEDY, RunningServer, assets, make_engine, wait_until
from prometheus_client.parser import text_string_to_metric_families

ADAPTERS = ("alpha", "beta")
VOCAB = 49152  # the SmolLM2 tokenizer's size, the tiny model's vocabulary
KV_TOKENS = 384
MAX_MESSAGE_CHARS = 4000  # loraserve.http.errors.MAX_MESSAGE_CHARS, plus the "... (N more characters)" tail
ADAPTER_ROUTES = ("/load_lora_adapter", "/unload_lora_adapter", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")
MODEL_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models/")
TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
}
# the greedy batch that must answer the same after every case: the base model and an adapter
REFERENCE = {
    "text": ["The catalogue reference", "The catalogue reference"],
    "sampling_params": GREEDY,
    "lora_path": [None, "alpha"],
}
# placeholders in payloads and expected messages, filled in by the fixture
GAMMA, BAD = "@GAMMA@", "@BAD@"
UP = "../" * 12  # from any working directory, as many levels up as reach the root


@dataclass(frozen=True)
class Raw:
    """A body sent as exactly these bytes, with this Content-Type (None: no Content-Type header)."""

    body: bytes
    content_type: str | None = "application/json"


@dataclass(frozen=True)
class Body:
    """A JSON body sent with this Content-Type (None: no Content-Type header)."""

    data: Any
    content_type: str | None


def nested(depth: int) -> str:
    """A JSON array nested ``depth`` levels deep."""
    return "[" * depth + "]" * depth


def case(name: str, method: str, path: str, payload: Any, status: int, wanted: str, bug: str | None = None):
    """One row: ``payload`` is None (no body), a JSON value, :class:`Raw` bytes or a :class:`Body`;
    ``bug`` marks a case the server gets wrong (strict xfail, with the reason)."""
    marks = [pytest.mark.xfail(strict=True, reason=f"BUG: {bug}")] if bug else []
    return pytest.param(method, path, payload, status, wanted, id=name, marks=marks)


G, C, CH = "/generate", "/v1/completions", "/v1/chat/completions"
M = {"model": "tiny", "prompt": "x", "max_tokens": 1}
MSG = [{"role": "user", "content": "hi"}]
H = {"model": "tiny", "messages": MSG, "max_tokens": 1}


def sp(**params) -> dict:
    return {"text": "x", "sampling_params": {"max_new_tokens": 1, **params}}


CATALOGUE = [
    # -- POST /generate: text and input_ids ------------------------------------------------------------
    case("gen-text-mixed-list", "POST", G, {"text": ["a", 1]}, 400, "'text' must be a string or a non-empty list"),
    case("gen-text-empty-list", "POST", G, {"text": []}, 400, "'text' must be a string or a non-empty list"),
    case("gen-text-object", "POST", G, {"text": {"prompt": "x"}}, 400, "'text' must be a string"),
    case("gen-text-empty-string", "POST", G, {"text": ""}, 400, "the prompt is empty"),
    case("gen-text-null", "POST", G, {"text": None}, 400, "give exactly one of 'text'"),
    case("gen-text-and-input-ids", "POST", G, {"text": "x", "input_ids": [1]}, 400, "give exactly one of 'text'"),
    case(
        "gen-ids-negative",
        "POST",
        G,
        {"input_ids": [5, -1]},
        400,
        f"input_ids contain -1, outside the vocabulary [0, {VOCAB})",
    ),
    case("gen-ids-vocab-size", "POST", G, {"input_ids": [VOCAB]}, 400, f"input_ids contain {VOCAB}, outside"),
    case(
        "gen-ids-20-digits",
        "POST",
        G,
        {"input_ids": [99999999999999999999]},
        400,
        "input_ids contain 99999999999999999999",
    ),
    case(
        "gen-ids-batch-out-of-vocab", "POST", G, {"input_ids": [[1], [70000]]}, 400, "input 1: input_ids contain 70000"
    ),
    case("gen-ids-float", "POST", G, {"input_ids": [1.0]}, 400, "'input_ids' must be a non-empty list of token ids"),
    case("gen-ids-bool", "POST", G, {"input_ids": [True, False]}, 400, "'input_ids' must be a non-empty list"),
    case("gen-ids-string", "POST", G, {"input_ids": "1 2 3"}, 400, "'input_ids' must be a non-empty list"),
    case("gen-ids-mixed-nesting", "POST", G, {"input_ids": [[1], 2]}, 400, "'input_ids' must be a non-empty list"),
    case("gen-ids-empty-inner", "POST", G, {"input_ids": [[1], []]}, 400, "'input_ids' must be a non-empty list"),
    # -- POST /generate: sampling parameters -------------------------------------------------------------
    case(
        "gen-sp-string",
        "POST",
        G,
        {"text": "x", "sampling_params": "greedy"},
        400,
        "sampling_params must be a JSON object",
    ),
    case(
        "gen-sp-list-too-short",
        "POST",
        G,
        {"text": ["a", "b"], "sampling_params": [{}]},
        400,
        "the batch has 2 inputs but sampling_params has 1 entries",
    ),
    case(
        "gen-sp-list-with-int",
        "POST",
        G,
        {"text": ["a", "b"], "sampling_params": [{}, 5]},
        400,
        "sampling_params must be a JSON object (or a list of them, one per input), got 5",
    ),
    case("gen-sp-empty-list", "POST", G, {"text": "x", "sampling_params": []}, 400, "sampling_params has 0 entries"),
    case(
        "gen-max-new-tokens-bool",
        "POST",
        G,
        sp(max_new_tokens=True),
        400,
        "max_new_tokens must be an integer, got bool True",
    ),
    case(
        "gen-max-new-tokens-negative",
        "POST",
        G,
        sp(max_new_tokens=-1),
        400,
        "max_new_tokens=-1 is invalid; allowed: an integer >= 0",
    ),
    case(
        "gen-max-new-tokens-20-digits",
        "POST",
        G,
        sp(max_new_tokens=99999999999999999999),
        400,
        "max_new_tokens is 99999999999999999999: together more than the model's context length of 512",
    ),
    case(
        "gen-temperature-overflow",
        "POST",
        G,
        Raw(b'{"text": "x", "sampling_params": {"temperature": 1e309}}'),
        400,
        "temperature=inf is invalid; allowed: a finite number",
    ),
    case(
        "gen-top-p-minus-zero",
        "POST",
        G,
        Raw(b'{"text": "x", "sampling_params": {"top_p": -0.0}}'),
        400,
        "top_p=-0.0 is invalid; allowed: 0 < top_p <= 1",
    ),
    case(
        "gen-n-minus-zero",
        "POST",
        G,
        Raw(b'{"text": "x", "sampling_params": {"n": -0}}'),
        400,
        "n=0 is invalid; send an integer from 1 to 256",
    ),
    case("gen-n-float", "POST", G, sp(n=2.0), 400, "n=2.0 is invalid"),
    case(
        "gen-n-over-limit",
        "POST",
        G,
        sp(n=257),
        400,
        "n=257 is invalid; send an integer from 1 to 256 (--max-sequences-per-request)",
    ),
    case("gen-top-k-float", "POST", G, sp(top_k=1.5), 400, "top_k must be an integer, got float 1.5"),
    case("gen-top-k-below-minus-one", "POST", G, sp(top_k=-2), 400, "top_k=-2 is invalid"),
    case("gen-min-p-1e308", "POST", G, sp(min_p=1e308), 400, "min_p=1e+308 is invalid; allowed: 0 <= min_p <= 1"),
    case(
        "gen-repetition-penalty-zero",
        "POST",
        G,
        sp(repetition_penalty=0),
        400,
        "repetition_penalty=0.0 is invalid; allowed: > 0",
    ),
    case(
        "gen-presence-penalty-range",
        "POST",
        G,
        sp(presence_penalty=-3),
        400,
        "presence_penalty=-3.0 is invalid; allowed: -2 <= value <= 2",
    ),
    case(
        "gen-seed-2-pow-64",
        "POST",
        G,
        sp(seed=2**64),
        400,
        "seed=18446744073709551616 is invalid; allowed: null or an integer in [0, 2**64)",
    ),
    case("gen-seed-string", "POST", G, sp(seed="1"), 400, "seed must be an integer or null, got str '1'"),
    case("gen-stop-mixed-list", "POST", G, sp(stop=["a", 1]), 400, "stop must be a string, a list of strings or null"),
    case("gen-stop-empty-string", "POST", G, sp(stop=""), 400, "stop=[''] is invalid; allowed: non-empty strings"),
    case(
        "gen-stop-token-ids-string",
        "POST",
        G,
        sp(stop_token_ids="5"),
        400,
        "stop_token_ids must be a list of integers or null",
    ),
    case(
        "gen-stop-token-ids-bool",
        "POST",
        G,
        sp(stop_token_ids=[True]),
        400,
        "stop_token_ids must be a list of integers or null",
    ),
    case(
        "gen-stop-token-ids-vocab-size",
        "POST",
        G,
        sp(stop_token_ids=[VOCAB]),
        400,
        f"stop_token_ids=[{VOCAB}] is invalid; allowed: token ids >= 0 and < vocab size {VOCAB}",
    ),
    case("gen-ignore-eos-string", "POST", G, sp(ignore_eos="yes"), 400, "ignore_eos must be true or false, got str"),
    case(
        "gen-skip-special-tokens-int",
        "POST",
        G,
        sp(skip_special_tokens=0),
        400,
        "skip_special_tokens must be true or false, got int 0",
    ),
    case(
        "gen-sp-top-logprobs-num-21",
        "POST",
        G,
        sp(top_logprobs_num=21),
        400,
        "top_logprobs_num=21 is invalid; allowed: 0 <= top_logprobs_num <= 20",
    ),
    case(
        "gen-unknown-sampling-parameter", "POST", G, sp(max_tokens=5), 400, "unknown sampling parameter(s) max_tokens"
    ),
    # -- POST /generate: the other fields --------------------------------------------------------------
    case(
        "gen-return-logprob-int",
        "POST",
        G,
        {"text": "x", "return_logprob": 1},
        400,
        "return_logprob must be true or false (or a list of them, one per input), got 1",
    ),
    case(
        "gen-top-logprobs-num-string",
        "POST",
        G,
        {"text": "x", "top_logprobs_num": "3"},
        400,
        "top_logprobs_num must be an integer (or a list of them, one per input), got '3'",
    ),
    case(
        "gen-top-logprobs-num-list-mismatch",
        "POST",
        G,
        {"text": ["a", "b", "c"], "top_logprobs_num": [1, 2]},
        400,
        "the batch has 3 inputs but top_logprobs_num has 2 entries",
    ),
    case("gen-stream-null", "POST", G, {"text": "x", "stream": None}, 400, "stream must be true or false, got None"),
    case("gen-stream-int", "POST", G, {"text": "x", "stream": 1}, 400, "stream must be true or false, got 1"),
    case(
        "gen-unknown-field-typo",
        "POST",
        G,
        {"text": "x", "sampling_param": {}},
        400,
        "unknown field(s) sampling_param; allowed fields: text, input_ids",
    ),
    case("gen-empty-key", "POST", G, {"text": "x", "": 1}, 400, 'unknown field(s) [""]'),
    # -- POST /generate: adapters ----------------------------------------------------------------------
    case(
        "gen-lora-path-int",
        "POST",
        G,
        {"text": "x", "lora_path": 5},
        400,
        "lora_path must be an adapter name or null (or a list of them, one per input), got 5",
    ),
    case(
        "gen-lora-path-empty-list",
        "POST",
        G,
        {"text": "x", "lora_path": []},
        400,
        "the batch has 1 inputs but lora_path has 0 entries",
    ),
    case(
        "gen-lora-path-list-with-int",
        "POST",
        G,
        {"text": ["a", "b"], "lora_path": ["alpha", 5]},
        400,
        "lora_path must be an adapter name or null",
    ),
    case("gen-lora-path-empty-string", "POST", G, {"text": "x", "lora_path": ""}, 404, "unknown adapter ''"),
    case("gen-lora-path-nul", "POST", G, {"text": "x", "lora_path": "alpha\x00"}, 404, "unknown adapter 'alpha\\x00'"),
    case(
        "gen-lora-path-homoglyph",
        "POST",
        G,
        {"text": "x", "lora_path": "\u0430lpha"},
        404,
        "unknown adapter '\\u0430lpha'",
    ),
    case(
        "gen-lora-path-uppercase",
        "POST",
        G,
        {"text": "x", "lora_path": "ALPHA"},
        404,
        "unknown adapter 'ALPHA'; loaded adapters: alpha, beta",
    ),
    case(
        "gen-lora-path-model-syntax",
        "POST",
        G,
        {"text": "x", "lora_path": "tiny:alpha"},
        404,
        "unknown adapter 'tiny:alpha'",
    ),
    case(
        "gen-lora-path-5000-chars", "POST", G, {"text": "x", "lora_path": "y" * 5000}, 404, "unknown adapter 'yyyyyyyy"
    ),
    case(
        "gen-lora-path-surrogate",
        "POST",
        G,
        Raw(b'{"text": "x", "lora_path": "\\udc80"}'),
        400,
        "lone surrogate U+DC80 at lora_path",
    ),
    case(
        "gen-lora-path-batch-one-unknown",
        "POST",
        G,
        {"text": ["a", "b"], "lora_path": ["alpha", "ghost"], "stream": True},
        404,
        "unknown adapter 'ghost'",
    ),
    # -- POST /generate: the body itself ---------------------------------------------------------------
    case("gen-duplicate-key-last-wins", "POST", G, Raw(b'{"text": "x", "text": 5}'), 400, "'text' must be a string"),
    case("gen-nesting-64-parses", "POST", G, Raw(f'{{"text": {nested(63)}}}'.encode()), 400, "'text' must be a string"),
    case(
        "gen-nesting-65-refused",
        "POST",
        G,
        Raw(f'{{"text": {nested(64)}}}'.encode()),
        400,
        "more than 64 levels deep (under text[0]",
    ),
    case("gen-trailing-garbage", "POST", G, Raw(b'{"text": "x"} garbage'), 400, "not valid JSON (Extra data"),
    case("gen-overlong-utf8", "POST", G, Raw(b'{"text": "\xc0\xaf"}'), 400, "the request body is not UTF-8 text"),
    case("gen-bom-only", "POST", G, Raw(b"\xef\xbb\xbf"), 400, "not valid JSON"),
    case("gen-body-null", "POST", G, Raw(b"null"), 400, "the request body must be a JSON object"),
    case(
        "gen-utf16-body",
        "POST",
        G,
        Raw('{"text": "x", "sampling_params": {"max_new_tokens": 1}}'.encode("utf-16")),
        400,
        "not UTF-8",
    ),
    # -- POST /v1/completions ----------------------------------------------------------------------------
    case("cmpl-prompt-null", "POST", C, {**M, "prompt": None}, 400, "prompt must be a string, a list of strings"),
    case("cmpl-prompt-object", "POST", C, {**M, "prompt": {"text": "x"}}, 400, "prompt must be a string"),
    case("cmpl-prompt-empty-list", "POST", C, {**M, "prompt": []}, 400, "(none empty), got '[]'"),
    case("cmpl-prompt-mixed-list", "POST", C, {**M, "prompt": [1, "a"]}, 400, "prompt must be a string"),
    case("cmpl-prompt-bool-ids", "POST", C, {**M, "prompt": [True]}, 400, "prompt must be a string"),
    case("cmpl-prompt-float-ids", "POST", C, {**M, "prompt": [[1.0]]}, 400, "prompt must be a string"),
    case("cmpl-prompt-empty-string", "POST", C, {**M, "prompt": ""}, 400, "the prompt is empty"),
    case("cmpl-prompt-out-of-vocab", "POST", C, {**M, "prompt": [VOCAB]}, 400, "prompt contain"),
    case(
        "cmpl-prompt-nesting-65",
        "POST",
        C,
        Raw(f'{{"model": "tiny", "prompt": {nested(64)}}}'.encode()),
        400,
        "more than 64 levels deep (under prompt[0]",
    ),
    case("cmpl-model-null", "POST", C, {**M, "model": None}, 400, "model: Input should be a valid string (got None)"),
    case("cmpl-model-list", "POST", C, {**M, "model": ["tiny"]}, 400, "model: Input should be a valid string"),
    case("cmpl-model-empty", "POST", C, {**M, "model": ""}, 404, "the model '' does not exist"),
    case("cmpl-model-base-colon", "POST", C, {**M, "model": "tiny:"}, 404, "the model 'tiny:' does not exist"),
    case("cmpl-model-colon-adapter", "POST", C, {**M, "model": ":alpha"}, 404, "the model ':alpha' does not exist"),
    case(
        "cmpl-model-base-unknown",
        "POST",
        C,
        {**M, "model": "tiny:unknown"},
        404,
        "the model 'tiny:unknown' does not exist; use 'tiny' for the base model",
    ),
    case("cmpl-model-other-base", "POST", C, {**M, "model": "other:alpha"}, 404, "the model 'other:alpha' does not"),
    case("cmpl-model-two-colons", "POST", C, {**M, "model": "tiny:alpha:beta"}, 404, "'tiny:alpha:beta' does not"),
    case("cmpl-model-nul", "POST", C, {**M, "model": "tiny\x00"}, 404, "the model 'tiny\\x00' does not exist"),
    case("cmpl-model-10000-chars", "POST", C, {**M, "model": "m" * 10_000}, 404, "more characters)"),
    case(
        "cmpl-model-surrogate",
        "POST",
        C,
        Raw(b'{"model": "tiny\\ud800", "prompt": "x"}'),
        400,
        "lone surrogate U+D800 at model",
    ),
    case(
        "cmpl-max-tokens-string",
        "POST",
        C,
        {**M, "max_tokens": "5"},
        400,
        "max_tokens: Input should be a valid integer (got '5')",
    ),
    case(
        "cmpl-max-tokens-exponent",
        "POST",
        C,
        Raw(b'{"model": "tiny", "prompt": "x", "max_tokens": 1e2}'),
        400,
        "max_tokens: Input should be a valid integer (got 100.0)",
    ),
    case("cmpl-max-tokens-negative", "POST", C, {**M, "max_tokens": -1}, 400, "max_tokens=-1 is invalid"),
    case(
        "cmpl-max-tokens-20-digits",
        "POST",
        C,
        {**M, "max_tokens": 99999999999999999999},
        400,
        "max_tokens is 99999999999999999999: together more than the model's context length",
    ),
    case(
        "cmpl-max-tokens-minus-infinity",
        "POST",
        C,
        Raw(b'{"model": "tiny", "prompt": "x", "max_tokens": -Infinity}'),
        400,
        "-Infinity at max_tokens",
    ),
    case(
        "cmpl-temperature-bool",
        "POST",
        C,
        {**M, "temperature": True},
        400,
        "temperature: Input should be a valid number (got True)",
    ),
    case("cmpl-temperature-negative", "POST", C, {**M, "temperature": -0.5}, 400, "temperature=-0.5 is invalid"),
    case("cmpl-top-p-1e308", "POST", C, {**M, "top_p": 1e308}, 400, "top_p=1e+308 is invalid"),
    case("cmpl-n-negative", "POST", C, {**M, "n": -1}, 400, "n=-1 is invalid"),
    case("cmpl-n-bool", "POST", C, {**M, "n": True}, 400, "n: Input should be a valid integer (got True)"),
    case("cmpl-seed-negative", "POST", C, {**M, "seed": -1}, 400, "seed=-1 is invalid"),
    case("cmpl-seed-float", "POST", C, {**M, "seed": 1.5}, 400, "seed: Input should be a valid integer"),
    case(
        "cmpl-stop-mixed-list", "POST", C, {**M, "stop": [1, "a"]}, 400, "stop: must be a string or a list of strings"
    ),
    case("cmpl-stop-empty-string", "POST", C, {**M, "stop": ""}, 400, "stop=[''] is invalid"),
    case(
        "cmpl-stop-token-ids-float",
        "POST",
        C,
        {**M, "stop_token_ids": [1.5]},
        400,
        "stop_token_ids[0]: Input should be a valid integer",
    ),
    case(
        "cmpl-logprobs-bool",
        "POST",
        C,
        {**M, "logprobs": True},
        400,
        "logprobs: Input should be a valid integer (got True)",
    ),
    case(
        "cmpl-logprobs-negative",
        "POST",
        C,
        {**M, "logprobs": -1},
        400,
        "logprobs=-1 is invalid; allowed: 0 <= logprobs <= 20",
    ),
    case("cmpl-echo-with-logprobs", "POST", C, {**M, "echo": True, "logprobs": 1}, 400, "echo together with logprobs"),
    case("cmpl-best-of", "POST", C, {**M, "best_of": 3}, 400, "best_of=3 is not supported"),
    case("cmpl-suffix", "POST", C, {**M, "suffix": "x"}, 400, "suffix (insertion) is not supported"),
    case("cmpl-logit-bias", "POST", C, {**M, "logit_bias": {"1": 5}}, 400, "logit_bias is not supported"),
    case("cmpl-stream-string", "POST", C, {**M, "stream": "true"}, 400, "stream: Input should be a valid boolean"),
    case(
        "cmpl-stream-options-without-stream",
        "POST",
        C,
        {**M, "stream_options": {"include_usage": True}},
        400,
        "stream_options is only allowed with stream=true",
    ),
    case(
        "cmpl-stream-options-unknown-key",
        "POST",
        C,
        {**M, "stream": True, "stream_options": {"bogus": 1}},
        400,
        "unknown field 'stream_options.bogus'",
    ),
    case("cmpl-user-int", "POST", C, {**M, "user": 5}, 400, "user: Input should be a valid string"),
    case(
        "cmpl-user-surrogate",
        "POST",
        C,
        Raw(b'{"model": "tiny", "prompt": "x", "user": "me\\udfff"}'),
        400,
        "lone surrogate U+DFFF at user",
    ),
    case(
        "cmpl-chat-only-field",
        "POST",
        C,
        {**M, "max_completion_tokens": 1},
        400,
        "unknown field 'max_completion_tokens'; remove it",
    ),
    case(
        "cmpl-257-prompts",
        "POST",
        C,
        {**M, "prompt": ["p"] * 257},
        413,
        "257 sequences (257 input(s) x n), more than the 256 allowed per request (--max-sequences-per-request)",
    ),
    case(
        "cmpl-duplicate-key-last-wins",
        "POST",
        C,
        Raw(b'{"model": "tiny", "prompt": "x", "max_tokens": 1, "max_tokens": "x"}'),
        400,
        "max_tokens: Input should be a valid integer (got 'x')",
    ),
    case(
        "cmpl-bom-then-truncated", "POST", C, Raw(b'\xef\xbb\xbf{"model": "tiny", "prompt": "x"'), 400, "not valid JSON"
    ),
    case(
        "cmpl-latin1-body",
        "POST",
        C,
        Raw('{"model": "tiny", "prompt": "caf\u00e9"}'.encode("latin-1")),
        400,
        "the request body is not UTF-8 text",
    ),
    case(
        "cmpl-form-body",
        "POST",
        C,
        Raw(b"model=tiny&prompt=x", "application/x-www-form-urlencoded"),
        400,
        "not valid JSON",
    ),
    case("cmpl-empty-key", "POST", C, {**M, "": 1}, 400, "unknown field '[\"\"]'"),
    # -- POST /v1/chat/completions -------------------------------------------------------------------------
    case(
        "chat-messages-null",
        "POST",
        CH,
        {**H, "messages": None},
        400,
        "messages: Input should be a valid list (got None)",
    ),
    case("chat-messages-string", "POST", CH, {**H, "messages": "hi"}, 400, "messages: Input should be a valid list"),
    case("chat-messages-object", "POST", CH, {**H, "messages": MSG[0]}, 400, "messages: Input should be a valid list"),
    case(
        "chat-message-null",
        "POST",
        CH,
        {**H, "messages": [None]},
        400,
        "messages[0]: Input should be a valid dictionary",
    ),
    case(
        "chat-message-missing-role",
        "POST",
        CH,
        {**H, "messages": [{"content": "x"}]},
        400,
        "messages[0].role is required",
    ),
    case(
        "chat-role-int",
        "POST",
        CH,
        {**H, "messages": [{"role": 5, "content": "x"}]},
        400,
        "messages[0].role: Input should be a valid string (got 5)",
    ),
    case(
        "chat-role-uppercase",
        "POST",
        CH,
        {**H, "messages": [{"role": "USER", "content": "x"}]},
        400,
        "unknown role 'USER'; use one of system, developer, user, assistant, tool",
    ),
    case("chat-role-empty", "POST", CH, {**H, "messages": [{"role": "", "content": "x"}]}, 400, "unknown role ''"),
    case(
        "chat-role-surrogate",
        "POST",
        CH,
        Raw(b'{"model": "tiny", "messages": [{"role": "user\\ud800", "content": "x"}]}'),
        400,
        "lone surrogate U+D800 at messages[0].role",
    ),
    case(
        "chat-content-int",
        "POST",
        CH,
        {**H, "messages": [{"role": "user", "content": 5}]},
        400,
        "messages[0].content: content must be a string or a list of text parts, got int",
    ),
    case(
        "chat-content-object",
        "POST",
        CH,
        {**H, "messages": [{"role": "user", "content": {"a": 1}}]},
        400,
        "content must be a string or a list of text parts, got dict",
    ),
    case(
        "chat-content-part-without-text",
        "POST",
        CH,
        {**H, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
        400,
        "messages[0].content: content parts must be {'type': 'text', 'text': ...}",
    ),
    case(
        "chat-content-part-int",
        "POST",
        CH,
        {**H, "messages": [{"role": "user", "content": [5]}]},
        400,
        "a 'int' part is not supported",
    ),
    case(
        "chat-message-unknown-key",
        "POST",
        CH,
        {**H, "messages": [MSG[0], {"role": "user", "content": "x", "extra": 1}]},
        400,
        "unknown field 'messages[1].extra'",
    ),
    case(
        "chat-name-int",
        "POST",
        CH,
        {**H, "messages": [{"role": "user", "content": "x", "name": 5}]},
        400,
        "messages[0].name: Input should be a valid string",
    ),
    case("chat-logprobs-int", "POST", CH, {**H, "logprobs": 1}, 400, "logprobs: Input should be a valid boolean"),
    case(
        "chat-top-logprobs-21",
        "POST",
        CH,
        {**H, "logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs=21 is invalid; allowed: 0 <= top_logprobs <= 20",
    ),
    case(
        "chat-top-logprobs-float",
        "POST",
        CH,
        {**H, "logprobs": True, "top_logprobs": 1.5},
        400,
        "top_logprobs: Input should be a valid integer",
    ),
    case(
        "chat-max-completion-tokens-string",
        "POST",
        CH,
        {"model": "tiny", "messages": MSG, "max_completion_tokens": "1"},
        400,
        "max_completion_tokens: Input should be a valid integer (got '1')",
    ),
    case(
        "chat-max-completion-tokens-negative",
        "POST",
        CH,
        {"model": "tiny", "messages": MSG, "max_completion_tokens": -1},
        400,
        "max_completion_tokens=-1",
    ),
    case(
        "chat-both-max-fields",
        "POST",
        CH,
        {**H, "max_completion_tokens": 2},
        400,
        "give max_completion_tokens or max_tokens (deprecated), not both",
    ),
    case("chat-n-20-digits", "POST", CH, {**H, "n": 99999999999999999999}, 400, "n=99999999999999999999 is invalid"),
    case(
        "chat-stop-65-strings", "POST", CH, {**H, "stop": ["s"] * 65}, 400, "stop has 65 strings; allowed: at most 64"
    ),
    case(
        "chat-stop-1001-chars",
        "POST",
        CH,
        {**H, "stop": "s" * 1001},
        400,
        "stop has a string of 1001 characters; allowed: at most 1000",
    ),
    case(
        "chat-response-format-string",
        "POST",
        CH,
        {**H, "response_format": "text"},
        400,
        "response_format: Input should be a valid dictionary",
    ),
    case(
        "chat-response-format-json",
        "POST",
        CH,
        {**H, "response_format": {"type": "json_object"}},
        400,
        "response_format 'json_object' is not supported",
    ),
    case("chat-tool-choice-auto", "POST", CH, {**H, "tool_choice": "auto"}, 400, "tool_choice is not supported"),
    case("chat-tools-object", "POST", CH, {**H, "tools": {}}, 400, "tools: Input should be a valid list"),
    case(
        "chat-include-usage-string",
        "POST",
        CH,
        {**H, "stream": True, "stream_options": {"include_usage": "yes"}},
        400,
        "stream_options.include_usage: Input should be a valid boolean",
    ),
    case("chat-prompt-field", "POST", CH, {**H, "prompt": "x"}, 400, "unknown field 'prompt'; remove it"),
    case("chat-model-base-colon", "POST", CH, {**H, "model": "tiny:"}, 404, "the model 'tiny:' does not exist"),
    case("chat-model-colon-adapter", "POST", CH, {**H, "model": ":beta"}, 404, "the model ':beta' does not exist"),
    case(
        "chat-model-base-unknown",
        "POST",
        CH,
        {**H, "model": "tiny:ghost", "stream": True},
        404,
        "the model 'tiny:ghost' does not exist",
    ),
    case(
        "chat-many-messages-over-prompt-chars",
        "POST",
        CH,
        {**H, "messages": [{"role": "user", "content": "z" * 500}] * 40},
        413,
        "more than the 16384 allowed (--max-prompt-chars",
    ),
    case(
        "chat-stop-lone-high-surrogate",
        "POST",
        CH,
        Raw(b'{"model": "tiny", "messages": [], "stop": ["ok", "\\ud83d"]}'),
        400,
        "lone surrogate U+D83D at stop[1]",
    ),
    case(
        "chat-truncated-body",
        "POST",
        CH,
        Raw(b'{"model": "tiny", "messages": [{"role": "user", "content": "x"'),
        400,
        "not valid JSON",
    ),
    case(
        "chat-trailing-comma",
        "POST",
        CH,
        Raw(b'{"model": "tiny", "messages": [],}'),
        400,
        "not valid JSON (Expecting property name enclosed in double quotes",
    ),
    case(
        "chat-trailing-nul",
        "POST",
        CH,
        Raw(b'{"model": "tiny", "messages": []}\x00'),
        400,
        "not valid JSON (Extra data",
    ),
    # -- POST /load_lora_adapter and /v1/load_lora_adapter ------------------------------------------------------
    case(
        "load-path-relative-traversal",
        "POST",
        "/load_lora_adapter",
        {"lora_name": "t1", "lora_path": UP + "etc"},
        400,
        f"no adapter loader can read '{UP}etc'",
    ),
    case(
        "v1load-path-missing",
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "t0", "lora_path": f"{BAD}/nothing-here"},
        404,
        "no adapter loader can read '@BAD@/nothing-here'",
    ),
    case(
        "v1load-path-etc-passwd",
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "t2", "lora_path": "/etc/passwd"},
        400,
        "no adapter loader can read '/etc/passwd'",
    ),
    case(
        "load-path-deep-traversal",
        "POST",
        "/load_lora_adapter",
        {"lora_name": "t3", "lora_path": f"{GAMMA}/../../../../../../../../etc/shadow"},
        400,
        "no adapter loader can read",
    ),
    case(
        "v1load-path-a-file",
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "t4", "lora_path": f"{GAMMA}/adapter_config.json"},
        400,
        "no adapter loader can read '@GAMMA@/adapter_config.json'",
    ),
    case(
        "load-path-dev-zero",
        "POST",
        "/load_lora_adapter",
        {"lora_name": "t5", "lora_path": "/dev/zero"},
        400,
        "no adapter loader can read '/dev/zero'",
    ),
    case(
        "v1load-path-root",
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "t6", "lora_path": "/"},
        400,
        "no adapter loader can read '/'",
    ),
    case(
        "load-path-blank",
        "POST",
        "/load_lora_adapter",
        {"lora_name": "t7", "lora_path": "   "},
        400,
        "adapter source '   ' is empty or not a string",
    ),
    case(
        "v1load-path-nul",
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "t8", "lora_path": f"{GAMMA}\x00"},
        400,
        "holds control characters or undecodable text",
    ),
    case(
        "load-path-5000-chars",
        "POST",
        "/load_lora_adapter",
        {"lora_name": "t9", "lora_path": "/" + "p" * 4999},
        400,
        "(5000 characters) holds control characters or undecodable text, or is longer than 4096 characters",
    ),
    case(
        "load-path-int",
        "POST",
        "/load_lora_adapter",
        {"lora_name": "t10", "lora_path": 5},
        400,
        "lora_path: Input should be a valid string (got 5)",
    ),
    case(
        "v1load-path-list",
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "t11", "lora_path": [GAMMA]},
        400,
        "lora_path: Input should be a valid string",
    ),
    case(
        "load-path-null",
        "POST",
        "/load_lora_adapter",
        {"lora_name": "t12", "lora_path": None},
        400,
        "lora_path: Input should be a valid string (got None)",
    ),
    case(
        "v1load-path-hub-id",
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "t13", "lora_path": "some-org/adapter"},
        403,
        "is a Hugging Face hub id",
    ),
    case(
        "load-name-null",
        "POST",
        "/load_lora_adapter",
        {"lora_name": None, "lora_path": GAMMA},
        400,
        "lora_name: Input should be a valid string (got None)",
    ),
    case(
        "v1load-name-257-chars",
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "n" * 257, "lora_path": GAMMA},
        400,
        "(257 characters); an adapter name is 1 to 256 characters",
    ),
    case(
        "load-name-del-char",
        "POST",
        "/load_lora_adapter",
        {"lora_name": "a\x7fb", "lora_path": GAMMA},
        400,
        "invalid adapter name 'a\\x7fb'",
    ),
    case(
        "v1load-name-emoji-pair",
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "\U0001f600", "lora_path": GAMMA},
        400,
        "invalid adapter name '\\U0001f600'",
    ),
    case(
        "v1load-name-rtl-override",
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "\u202eevil", "lora_path": GAMMA},
        400,
        "invalid adapter name '\\u202eevil'",
    ),
    case(
        "load-name-surrogate",
        "POST",
        "/load_lora_adapter",
        Raw(b'{"lora_name": "ok\\ud800", "lora_path": "/x"}'),
        400,
        "lone surrogate U+D800 at lora_name",
    ),
    case(
        "load-name-already-loaded",
        "POST",
        "/load_lora_adapter",
        {"lora_name": "alpha", "lora_path": GAMMA},
        409,
        "an adapter named 'alpha' is already loaded",
    ),
    case(
        "load-name-duplicate-key",
        "POST",
        "/load_lora_adapter",
        Raw(b'{"lora_name": "ok", "lora_name": 7, "lora_path": "/x"}'),
        400,
        "lora_name: Input should be a valid string (got 7)",
    ),
    case(
        "load-pinned-string",
        "POST",
        "/load_lora_adapter",
        {"lora_name": "t14", "lora_path": GAMMA, "pinned": "yes"},
        400,
        "pinned: Input should be a valid boolean (got 'yes')",
    ),
    case(
        "v1load-pinned-int",
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "t15", "lora_path": GAMMA, "pinned": 1},
        400,
        "pinned: Input should be a valid boolean (got 1)",
    ),
    case(
        "load-unknown-field",
        "POST",
        "/load_lora_adapter",
        {"lora_name": "t16", "lora_path": GAMMA, "pin": True},
        400,
        "unknown field 'pin'; remove it; allowed fields: lora_name, lora_path, pinned",
    ),
    case(
        "v1load-body-list",
        "POST",
        "/v1/load_lora_adapter",
        [{"lora_name": "t17", "lora_path": GAMMA}],
        400,
        "the request body must be a JSON object",
    ),
    case(
        "v1load-trailing-comma",
        "POST",
        "/v1/load_lora_adapter",
        Raw(b'{"lora_name": "t18", "lora_path": "/x",}'),
        400,
        "not valid JSON",
    ),
    case(
        "load-nesting-65",
        "POST",
        "/load_lora_adapter",
        Raw(f'{{"lora_name": {nested(64)}}}'.encode()),
        400,
        "more than 64 levels deep (under lora_name[0]",
    ),
    case(
        "load-content-type-jsonx",
        "POST",
        "/load_lora_adapter",
        Body({"lora_name": "t19", "lora_path": GAMMA}, "application/jsonx"),
        415,
        "Content-Type 'application/jsonx'; send the header 'Content-Type: application/json'",
    ),
    case(
        "v1load-content-type-text-json",
        "POST",
        "/v1/load_lora_adapter",
        Body({"lora_name": "t20", "lora_path": GAMMA}, "text/json"),
        415,
        "Content-Type 'text/json'",
    ),
    case(
        "load-content-type-empty",
        "POST",
        "/load_lora_adapter",
        Body({"lora_name": "t21", "lora_path": GAMMA}, ""),
        415,
        "Content-Type ''",
    ),
    case(
        "v1load-content-type-json-seq",
        "POST",
        "/v1/load_lora_adapter",
        Body({"lora_name": "t22", "lora_path": GAMMA}, "application/json-seq"),
        415,
        "Content-Type: application/json",
    ),
    # broken adapter directories (made by the fixture under @BAD@)
    case(
        "load-config-not-json",
        "POST",
        "/load_lora_adapter",
        {"lora_name": "b1", "lora_path": f"{BAD}/config-junk"},
        400,
        "adapter_config.json is not valid JSON",
    ),
    case(
        "v1load-config-nested-100000",
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "b2", "lora_path": f"{BAD}/config-deep"},
        400,
        "could not load adapter 'b2' from",
    ),
    case(
        "load-config-rank-over-max",
        "POST",
        "/load_lora_adapter",
        {"lora_name": "b3", "lora_path": f"{BAD}/config-rank-64"},
        400,
        "rank 64 (r = 64",
    ),
    case(
        "v1load-config-rank-string",
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "b4", "lora_path": f"{BAD}/config-rank-string"},
        400,
        "r = '3' is invalid; expected a positive",
    ),
    case(
        "load-config-not-lora",
        "POST",
        "/load_lora_adapter",
        {"lora_name": "b5", "lora_path": f"{BAD}/config-ia3"},
        400,
        "peft_type = 'IA3'; only LoRA adapters",
    ),
    case(
        "v1load-config-alpha-nan",
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "b6", "lora_path": f"{BAD}/config-alpha-nan"},
        400,
        "scaling must be finite",
    ),
    case(
        "load-config-unknown-module",
        "POST",
        "/load_lora_adapter",
        {"lora_name": "b7", "lora_path": f"{BAD}/config-foo-proj"},
        400,
        "'foo_proj', which loraserve does not support",
    ),
    case(
        "v1load-weights-empty-file",
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "b8", "lora_path": f"{BAD}/weights-empty"},
        400,
        "is not a readable safetensors file",
    ),
    case(
        "load-weights-missing",
        "POST",
        "/load_lora_adapter",
        {"lora_name": "b9", "lora_path": f"{BAD}/weights-missing"},
        400,
        "holds neither adapter_model.safetensors nor adapter_model.bin",
    ),
    # -- POST /unload_lora_adapter and /v1/unload_lora_adapter ------------------------------------------------
    case(
        "unload-name-int",
        "POST",
        "/unload_lora_adapter",
        {"lora_name": 5},
        400,
        "lora_name: Input should be a valid string (got 5)",
    ),
    case(
        "v1unload-name-null",
        "POST",
        "/v1/unload_lora_adapter",
        {"lora_name": None},
        400,
        "lora_name: Input should be a valid string (got None)",
    ),
    case(
        "unload-name-list",
        "POST",
        "/unload_lora_adapter",
        {"lora_name": ["alpha"]},
        400,
        "lora_name: Input should be a valid string (got ['alpha'])",
    ),
    case("v1unload-name-missing", "POST", "/v1/unload_lora_adapter", {}, 400, "lora_name is required; add it"),
    case(
        "unload-unknown-field",
        "POST",
        "/unload_lora_adapter",
        {"lora_name": "alpha", "force": True},
        400,
        "unknown field 'force'; remove it; allowed fields: lora_name",
    ),
    case(
        "v1unload-name-base",
        "POST",
        "/v1/unload_lora_adapter",
        {"lora_name": "base"},
        400,
        "invalid adapter name 'base'",
    ),
    case(
        "unload-name-model-syntax",
        "POST",
        "/unload_lora_adapter",
        {"lora_name": "tiny:alpha"},
        400,
        "invalid adapter name 'tiny:alpha'",
    ),
    case(
        "v1unload-name-trailing-newline",
        "POST",
        "/v1/unload_lora_adapter",
        {"lora_name": "alpha\n"},
        400,
        "invalid adapter name 'alpha\\n'",
    ),
    case("unload-name-empty", "POST", "/unload_lora_adapter", {"lora_name": ""}, 400, "invalid adapter name ''"),
    case(
        "v1unload-name-other-case",
        "POST",
        "/v1/unload_lora_adapter",
        {"lora_name": "ALPHA"},
        404,
        "no adapter named 'ALPHA' is loaded; loaded adapters: alpha, beta",
    ),
    case(
        "unload-name-5000-chars",
        "POST",
        "/unload_lora_adapter",
        {"lora_name": "u" * 5000},
        400,
        "(5000 characters); an adapter name is 1 to 256 characters",
    ),
    case(
        "unload-name-surrogate",
        "POST",
        "/unload_lora_adapter",
        Raw(b'{"lora_name": "\\udfff"}'),
        400,
        "lone surrogate U+DFFF at lora_name",
    ),
    case("unload-body-string", "POST", "/unload_lora_adapter", "alpha", 400, "the request body must be a JSON object"),
    case(
        "v1unload-no-content-type",
        "POST",
        "/v1/unload_lora_adapter",
        Body({"lora_name": "alpha"}, None),
        415,
        "the request has no Content-Type; send the header 'Content-Type: application/json'",
    ),
    case(
        "unload-content-type-x-json",
        "POST",
        "/unload_lora_adapter",
        Body({"lora_name": "alpha"}, "application/x-json"),
        415,
        "Content-Type 'application/x-json'",
    ),
    case(
        "unload-single-quotes",
        "POST",
        "/unload_lora_adapter",
        Raw(b"{'lora_name': 'alpha'}"),
        400,
        "not valid JSON (Expecting property name enclosed in double quotes",
    ),
    # -- methods and paths ---------------------------------------------------------------------------------
    case("put-generate", "PUT", G, {"text": "x"}, 405, "/generate does not accept PUT; use POST"),
    case("delete-completions", "DELETE", C, None, 405, "/v1/completions does not accept DELETE; use POST"),
    case("get-chat-completions", "GET", CH, None, 405, "/v1/chat/completions does not accept GET; use POST"),
    case("get-load-lora-adapter", "GET", "/load_lora_adapter", None, 405, "does not accept GET; use POST"),
    case("patch-v1-load-lora-adapter", "PATCH", "/v1/load_lora_adapter", None, 405, "does not accept PATCH; use POST"),
    case(
        "put-v1-unload-lora-adapter",
        "PUT",
        "/v1/unload_lora_adapter",
        {"lora_name": "alpha"},
        405,
        "does not accept PUT; use POST",
    ),
    case("get-unload-lora-adapter", "GET", "/unload_lora_adapter", None, 405, "does not accept GET; use POST"),
    case("post-health", "POST", "/health", None, 405, "/health does not accept POST; use GET, HEAD"),
    case(
        "get-health-traversal",
        "GET",
        "/health/%2e%2e/%2e%2e/etc/passwd",
        None,
        404,
        "there is no endpoint GET /health/../../etc/passwd",
    ),
    case("put-health-generate", "PUT", "/health_generate", None, 405, "/health_generate does not accept PUT"),
    case("post-health-generate-with-body", "POST", "/health_generate", {"text": "x"}, 405, "use GET"),
    case("post-get-model-info", "POST", "/get_model_info", {}, 405, "/get_model_info does not accept POST; use GET"),
    case(
        "get-model-info-suffix",
        "GET",
        "/get_model_info.json",
        None,
        404,
        "there is no endpoint GET /get_model_info.json",
    ),
    case("delete-get-server-info", "DELETE", "/get_server_info", None, 405, "/get_server_info does not accept DELETE"),
    case("get-server-info-nul", "GET", "/get_server_info%00", None, 404, "there is no endpoint GET /get_server_info"),
    case("post-metrics", "POST", "/metrics", None, 405, "/metrics does not accept POST; use GET"),
    case(
        "get-metrics-traversal",
        "GET",
        "/metrics%2F..%2Fget_server_info",
        None,
        404,
        "there is no endpoint GET /metrics/../get_server_info",
    ),
    case("post-v1-models", "POST", "/v1/models", {"model": "tiny"}, 405, "/v1/models does not accept POST; use GET"),
    case("delete-v1-models", "DELETE", "/v1/models", None, 405, "/v1/models does not accept DELETE"),
    case("get-v1-model-unknown", "GET", "/v1/models/ghost", None, 404, "the model 'ghost' does not exist"),
    case("get-v1-model-base-colon", "GET", "/v1/models/tiny%3A", None, 404, "the model 'tiny:' does not exist"),
    case("get-v1-model-colon-adapter", "GET", "/v1/models/%3Aalpha", None, 404, "the model ':alpha' does not exist"),
    case("get-v1-model-nul", "GET", "/v1/models/%00", None, 404, "the model '\\x00' does not exist"),
    case("get-v1-model-encoded-surrogate", "GET", "/v1/models/%ED%A0%80", None, 404, "does not exist"),
    case(
        "get-v1-model-traversal",
        "GET",
        "/v1/models/alpha%2F..%2Fbeta",
        None,
        404,
        "the model 'alpha/../beta' does not exist",
    ),
    case("get-v1-model-5000-chars", "GET", "/v1/models/" + "q" * 5000, None, 404, "more characters)"),
    case("delete-v1-model", "DELETE", "/v1/models/alpha", None, 405, "/v1/models/alpha does not accept DELETE"),
    case(
        "get-unknown-v2-path",
        "GET",
        "/v2/models",
        None,
        404,
        "there is no endpoint GET /v2/models; see /flush_cache, /generate",
    ),
    case("get-unknown-uppercase-v1", "GET", "/V1/models", None, 404, "there is no endpoint GET /V1/models"),
    case(
        "post-unknown-v1-path",
        "POST",
        "/v1/embeddings",
        {"model": "tiny", "input": "x"},
        404,
        "there is no endpoint POST /v1/embeddings",
    ),
    case(
        "post-generate-subpath",
        "POST",
        "/generate/stream",
        {"text": "x"},
        404,
        "there is no endpoint POST /generate/stream",
    ),
]


# -- the server ------------------------------------------------------------------------------------------


def write_bad_adapters(root: Path) -> None:
    """Copies of the gamma adapter, each broken in one way, under ``root``."""
    gamma = Path(assets().adapters["gamma"])
    config = json.loads((gamma / "adapter_config.json").read_text())

    def variant(name: str, config_text: str | None = None) -> Path:
        out = root / name
        shutil.copytree(gamma, out)
        if config_text is not None:
            (out / "adapter_config.json").write_text(config_text)
        return out

    variant("config-junk", "{not json")
    variant("config-deep", "[" * 100_000)
    variant("config-rank-64", json.dumps({**config, "r": 64}))
    variant("config-rank-string", json.dumps({**config, "r": "3"}))
    variant("config-ia3", json.dumps({**config, "peft_type": "IA3"}))
    variant("config-alpha-nan", json.dumps({**config, "lora_alpha": float("nan")}))
    variant("config-foo-proj", json.dumps({**config, "target_modules": ["foo_proj"]}))
    for weights in variant("weights-empty").glob("*.safetensors"):
        weights.write_bytes(b"")
    for weights in variant("weights-missing").glob("*.safetensors"):
        weights.unlink()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    bad = tmp_path_factory.mktemp("bad-adapters")
    write_bad_adapters(bad)
    engine = make_engine(adapters=list(ADAPTERS), max_total_tokens=KV_TOKENS)
    server = RunningServer(engine)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            res = client.post("/generate", json=REFERENCE)
            assert res.status_code == 200, res.text
            reference = [(r["output_ids"], r["text"]) for r in res.json()]
            oracle = engine.generate(REFERENCE["text"], GREEDY, REFERENCE["lora_path"])
            assert reference == [(r["output_ids"], r["text"]) for r in oracle]
            assert reference[0] != reference[1]  # the adapter changes the output: a lost adapter would show
            places = {GAMMA: assets().adapters["gamma"], BAD: str(bad)}
            yield client, engine, reference, places
    finally:
        server.stop()


def fill(value: Any, places: dict[str, str]) -> Any:
    """``value`` with the placeholders replaced, in every string it holds."""
    if isinstance(value, str):
        for key, real in places.items():
            value = value.replace(key, real)
        return value
    if isinstance(value, list):
        return [fill(v, places) for v in value]
    if isinstance(value, dict):
        return {fill(k, places): fill(v, places) for k, v in value.items()}
    return value


def send(client: httpx.Client, method: str, path: str, payload: Any, places: dict[str, str]) -> httpx.Response:
    if payload is None:
        return client.request(method, path)
    if isinstance(payload, Raw):
        body, content_type = payload.body, payload.content_type
    elif isinstance(payload, Body):
        body, content_type = json.dumps(fill(payload.data, places)).encode(), payload.content_type
    else:
        body, content_type = json.dumps(fill(payload, places)).encode(), "application/json"
    headers = {} if content_type is None else {"Content-Type": content_type}
    return client.request(method, path, content=body, headers=headers)


def message_of(res: httpx.Response, path: str, status: int) -> str:
    """The error message, after checking the status and the error format of the route."""
    assert res.status_code == status, res.text[:2000]
    assert res.headers["content-type"].startswith("application/json")
    data = res.json()
    if path in ADAPTER_ROUTES and status != 405:  # a 405 never reaches the route: the native format
        assert set(data) == {"success", "error_message", "loaded_adapters"}, data
        assert data["success"] is False and set(data["loaded_adapters"]) == set(ADAPTERS)
        message = data["error_message"]
    elif path.startswith("/v1/") and path not in ADAPTER_ROUTES:
        err = data["error"]
        assert set(data) == {"error"} and set(err) == {"message", "type", "param", "code"}, data
        assert err["type"] == TYPES[status]
        named_model = status == 404 and path.startswith(MODEL_ROUTES)
        assert err["code"] == ("model_not_found" if named_model else None)
        if named_model:
            assert err["param"] == "model"
        assert err["param"] is None or err["param"] in err["message"]
        message = err["message"]
    else:
        err = data["error"]
        assert set(data) == {"error"} and set(err) == {"message", "type", "code"}, data
        assert err["code"] == status and err["type"] == TYPES[status]
        message = err["message"]
    assert isinstance(message, str) and message
    assert len(message) <= MAX_MESSAGE_CHARS + 40
    return message


# The checks after each case go on fresh connections: the server's accepted sockets lack TCP_NODELAY
# (bind_socket makes its socket with proto 0, so asyncio does not set it), and each JSON answer on a
# kept-alive connection waits ~40 ms for a delayed ACK. The hostile requests keep theirs alive, so a
# connection that carried an error answer is reused by the next case.
FRESH = {"Connection": "close"}


def still_whole(client: httpx.Client, engine, reference: list) -> None:
    """The reference batch answers as before, /metrics parses, and the engine holds nothing."""
    res = client.post("/generate", json=REFERENCE, headers=FRESH)
    assert res.status_code == 200, res.text
    assert [(r["output_ids"], r["text"]) for r in res.json()] == reference
    metrics = client.get("/metrics", headers=FRESH)
    assert metrics.status_code == 200
    names = {family.name for family in text_string_to_metric_families(metrics.text)}
    assert names, "no metric families"
    alloc = engine.kv.allocator
    assert wait_until(
        lambda: (
            alloc.num_free == alloc.num_blocks
            and not engine.scheduler.running
            and not engine.scheduler.waiting
            and engine.intake.pending == 0
        ),
        timeout=10,
    )
    lora = engine.lora
    assert sorted(lora.registry.names()) == sorted(ADAPTERS) and lora.registry.pending() == []
    assert all(ref.in_flight == 0 for ref in lora.registry.refs())


@pytest.mark.parametrize("method, path, payload, status, wanted", CATALOGUE)
def test_hostile_input_gets_its_4xx_and_the_server_stays_whole(served, method, path, payload, status, wanted):
    client, engine, reference, places = served
    res = send(client, method, path, payload, places)
    message = message_of(res, path, status)
    wanted = fill(wanted, places)
    assert wanted in message, message[:2000]
    still_whole(client, engine, reference)


ENDPOINTS = (
    G,
    C,
    CH,
    "/load_lora_adapter",
    "/unload_lora_adapter",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/health",
    "/health_generate",
    "/get_model_info",
    "/get_server_info",
    "/metrics",
    "/v1/models",
    "/v1/models/{id}",
)


def endpoint_of(path: str) -> str | None:
    """The endpoint a case's path aims at (its path with something appended counts), or None."""
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    for endpoint in sorted(ENDPOINTS, key=len, reverse=True):
        if path == endpoint or any(path.startswith(endpoint + c) for c in "/%."):
            return endpoint
    return None


def test_the_catalogue_covers_every_endpoint_with_distinct_cases():
    rows = [p.values for p in CATALOGUE]
    assert len(rows) >= 60
    assert len({p.id for p in CATALOGUE}) == len(CATALOGUE)
    assert len({(method, path, repr(payload)) for method, path, payload, *_ in rows}) == len(rows)
    for endpoint in ENDPOINTS:
        assert sum(endpoint_of(path) == endpoint for _, path, *_ in rows) >= 2, endpoint
    assert sum(endpoint_of(path) is None for _, path, *_ in rows) >= 2  # unknown paths
    assert {method for method, *_ in rows} >= {"GET", "POST", "PUT", "DELETE", "PATCH"}
