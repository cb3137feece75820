"""The native API routes, compatible with SGLang's HTTP server.

``POST /generate`` takes ``text`` (a string or a list) or ``input_ids`` (a list, or a list of
lists), ``sampling_params`` (one object, or a list aligned with the batch), ``lora_path`` (one
adapter name, or a list aligned with the batch, ``null`` meaning the base model),
``return_logprob``/``top_logprobs_num`` and ``stream``. It answers one SGLang-style result
(``text``, ``output_ids``, ``meta_info``) per input, a list for a batch; ``n > 1`` in the sampling
parameters gives ``n`` results per input, at most ``--max-sequences-per-request`` in all (413 beyond).
Streams are server-sent events carrying the text and token ids so far (as SGLang streams them), with
``index`` for a batch, ending with ``data: [DONE]``. ``meta_info.cached_tokens`` counts the prompt
tokens found in the prefix cache. ``/flush_cache`` (GET or POST, as SGLang) empties the prefix cache.
Adapters are loaded with ``POST /load_lora_adapter`` and unloaded with ``POST /unload_lora_adapter``
(also under ``/v1/``, as vLLM names them), answering ``{success, error_message, loaded_adapters}``;
those routes live in :mod:`.adapters`. The routes use only the engine's
:class:`~loraserve.contract.EngineClient` surface.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from loraserve import __version__
from loraserve.contract import EngineClient
from loraserve.errors import UserError
from loraserve.http.errors import APIError, ClientDisconnected, api_error_of, error_body, read_json
from loraserve.http.openapi import document_models, errors, request_body
from loraserve.http.serving import EventStream, Generations, Item, check_sequences, fan_out, samples_of, sse
from loraserve.lora.composition import composed_lora_path
from loraserve.plugins.frontend_native.adapters import add_adapter_routes, loaded_adapters
from loraserve.plugins.frontend_native.schema import GENERATE_OK, GenerateBody, GenerateResult
from loraserve.safe_json import field_path, json_type

GENERATE_FIELDS = ("text", "input_ids", "sampling_params", "lora_path", "stream", "return_logprob", "top_logprobs_num")
HEALTH_TIMEOUT_S = 20.0


def _is_ids(value: Any) -> bool:
    return (
        isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _per_input(body: dict, key: str, n: int, check, what: str) -> list:
    """``body[key]`` as one value per input: a single value is shared, a list must have ``n`` entries."""
    value = body.get(key)
    if isinstance(value, list) and key != "input_ids":
        if len(value) != n:
            raise UserError(
                f"the batch has {n} inputs but {key} has {len(value)} entries; give one per input, or "
                "a single value for all"
            )
        values = value
    else:
        values = [value] * n
    for v in values:
        if v is not None and not check(v):
            raise UserError(f"{key} must be {what} (or a list of them, one per input), got {v!r}")
    return values


def parse_generate(body: Any, max_sequences: int) -> tuple[list[Item], bool, bool]:
    """The inputs of a /generate body, whether it asked for a single result, and whether to stream;
    TooLarge when they ask for more than ``max_sequences`` sequences (inputs x n)."""
    if not isinstance(body, dict):
        raise UserError(f"the request body must be a JSON object, got a JSON {json_type(body)}")
    unknown = sorted(field_path((k,)) for k in body if k not in GENERATE_FIELDS)
    if unknown:
        raise UserError(f"unknown field(s) {', '.join(unknown)}; allowed fields: {', '.join(GENERATE_FIELDS)}")
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise UserError("give exactly one of 'text' (a prompt, or a list of prompts) and 'input_ids'")
    if text is not None:
        if isinstance(text, str):
            prompts, single = [text], True
        elif isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            prompts, single = list(text), False
        else:
            raise UserError("'text' must be a string or a non-empty list of strings")
        inputs = [(p, None) for p in prompts]
    else:
        if _is_ids(ids):
            inputs, single = [(None, ids)], True
        elif isinstance(ids, list) and ids and all(_is_ids(x) for x in ids):
            inputs, single = [(None, x) for x in ids], False
        else:
            raise UserError("'input_ids' must be a non-empty list of token ids, or a non-empty list of such lists")
    n = len(inputs)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise UserError(f"stream must be true or false, got {stream!r}")
    params = _per_input(body, "sampling_params", n, lambda v: isinstance(v, dict), "a JSON object")
    body = {**body, "lora_path": composed_lora_path(body.get("lora_path"))}  # compositions as their spelling
    adapters = _per_input(body, "lora_path", n, lambda v: isinstance(v, str), "an adapter name or null")
    logprob = _per_input(body, "return_logprob", n, lambda v: isinstance(v, bool), "true or false")
    tops = _per_input(
        body, "top_logprobs_num", n, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"
    )
    check_sequences(n, sum(samples_of(p or {}, max_sequences) for p in params), max_sequences)
    items = []
    for (prompt, token_ids), p, adapter, lp, top in zip(inputs, params, adapters, logprob, tops):
        p = dict(p or {})
        if lp is not None:
            p["return_logprob"] = lp
        if top is not None:
            p["top_logprobs_num"] = top
        copies = fan_out(p, max_sequences)
        single = single and len(copies) == 1
        items += [Item(prompt, token_ids, c, adapter) for c in copies]
    return items, single, stream


def _partial(r: Any, text: str, ids: list[int], logprobs: list[float]) -> dict:
    meta = {
        "id": r.request_id,
        "prompt_tokens": len(r.prompt_ids),
        "completion_tokens": len(ids),
        "cached_tokens": r.cached_tokens or 0,
        "finish_reason": None,
        "lora_path": r.adapter,
    }
    if r.params.return_logprob or r.params.top_logprobs_num:
        meta["output_token_logprobs"] = [[lp, t] for lp, t in zip(logprobs, ids)]
    return {"text": text, "output_ids": list(ids), "meta_info": meta}


def add_routes(app: FastAPI, engine: EngineClient, settings: Any) -> None:
    document_models(app, GenerateResult)
    _add_generate_route(app, engine, settings)
    add_adapter_routes(app, engine, settings)
    _add_health_routes(app, engine)
    _add_info_routes(app, engine, settings)
    _add_cache_routes(app, engine, settings)


def _add_generate_route(app: FastAPI, engine: EngineClient, settings: Any) -> None:
    gens: Generations = app.state.generations

    @app.post(
        "/generate",
        openapi_extra=request_body(app, GenerateBody),
        responses=errors(400, 404, 413, 429, 499, 503, ok=GENERATE_OK),
    )
    async def generate(request: Request) -> Any:
        items, single, stream = parse_generate(await read_json(request), settings.max_sequences_per_request)
        requests = await gens.build(items)
        try:
            if stream:
                return EventStream(_stream_events(await gens.open_stream(request, requests), requests, single))
            await gens.complete(request, requests)
        except ClientDisconnected:
            return Response(status_code=499)
        for r in requests:
            gens.outcome(r)
        results = [engine.final_output(r) for r in requests]
        return results[0] if single else results

    async def _stream_events(events, requests: list, single: bool):
        acc = [("", [], []) for _ in requests]
        try:
            async for index, out in events:
                r = requests[index]
                text, ids, lps = acc[index]
                acc[index] = text, ids, lps = text + out.text, ids + out.token_ids, lps + out.logprobs
                if out.finished:
                    try:
                        gens.outcome(r)
                    except APIError as exc:
                        yield sse(_error_event(exc, None if single else index))
                        continue
                    chunk = engine.final_output(r)
                else:
                    chunk = _partial(r, text, ids, lps)
                if not single:
                    chunk["index"] = index
                yield sse(chunk)
        except Exception as exc:  # headers are sent: report in-band
            yield sse(_error_event(api_error_of(exc), None))
        finally:
            await events.aclose()  # aborts unfinished requests when the client went away
        yield sse("[DONE]")


def _add_health_routes(app: FastAPI, engine: EngineClient) -> None:
    gens: Generations = app.state.generations

    @app.api_route(
        "/health",
        methods=["GET", "HEAD"],
        response_class=PlainTextResponse,
        responses=errors(503, ok={"description": "The server is up (an empty body)."}),
    )
    async def health() -> Response:
        if app.state.draining:
            raise APIError(503, "the server is shutting down")
        return PlainTextResponse("")

    @app.get(
        "/health_generate",
        response_class=PlainTextResponse,
        responses=errors(429, 499, 503, ok={"description": "The engine generated one token (an empty body)."}),
    )
    async def health_generate(request: Request) -> Response:
        token = engine.model_info().bos_token_id
        [r] = await gens.build(
            [
                Item(
                    None,
                    [token if token is not None else 0],
                    {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True},
                    None,
                )
            ]
        )
        try:
            await asyncio.wait_for(gens.complete(request, [r]), HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise APIError(503, f"the engine did not produce a token within {HEALTH_TIMEOUT_S:.0f} s") from None
        except ClientDisconnected:
            return Response(status_code=499)
        gens.outcome(r)
        return PlainTextResponse("")


def _add_info_routes(app: FastAPI, engine: EngineClient, settings: Any) -> None:
    @app.get("/get_model_info")
    async def get_model_info() -> dict:
        model = engine.model_info()
        return {
            "model_path": model.path,
            "tokenizer_path": settings.tokenizer_path,
            "served_model_name": model.name,
            "is_generation": True,
            "context_length": model.context_len,
            "vocab_size": model.vocab_size,
            "lora_enabled": model.lora_enabled,
            "preferred_sampling_params": None,
        }

    @app.get("/get_server_info")
    async def get_server_info() -> dict:
        info = engine.effective_settings()
        info.update(
            version=__version__,
            frontends=list(app.state.frontends),
            loaded_adapters=loaded_adapters(engine),
            adapters=engine.loaded_adapters(),
            unloading_adapters=engine.unloading_adapters(),
        )
        return info

    @app.get(
        "/metrics",
        responses={
            200: {
                "description": "Prometheus text exposition.",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    )
    async def metrics() -> Response:
        data = app.state.metrics.render(await run_in_threadpool(engine.stats))  # waits for the step to end
        return Response(data, media_type=app.state.metrics.content_type)


FLUSH_OK = {
    "description": "The prefix cache is empty: every cached prompt prefix is forgotten (blocks running "
    "requests hold stay theirs). ``flushed_blocks`` is how many KV blocks were cached.",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["message", "flushed_blocks"],
                "properties": {"message": {"type": "string"}, "flushed_blocks": {"type": "integer", "minimum": 0}},
            }
        }
    },
}


def _add_cache_routes(app: FastAPI, engine: EngineClient, settings: Any) -> None:
    gens: Generations = app.state.generations

    @app.get("/flush_cache", responses=errors(503, ok=FLUSH_OK))
    @app.post("/flush_cache", responses=errors(503, ok=FLUSH_OK))  # both, as SGLang (one operation id each)
    async def flush_cache() -> dict:
        gens.check_accepting()
        flushed = await run_in_threadpool(engine.flush_cache)  # waits for the engine's step to end
        if settings.disable_radix_cache:
            message = "the prefix cache is off (--disable-radix-cache); nothing was cached"
        else:
            message = f"cache flushed: {flushed} cached KV block(s) forgotten"
        return {"message": message, "flushed_blocks": flushed}


def _error_event(exc: APIError, index: int | None) -> dict:
    event = error_body(exc.status, exc.message, openai=False)
    if index is not None:
        event["index"] = index
    return event
