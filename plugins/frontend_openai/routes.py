"""The OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

``model`` selects the adapter: the served base model name means the base model, an adapter name
means that adapter, and ``BASE:ADAPTER`` (split at the first colon) names an adapter explicitly;
``a*0.7+b*-0.3`` (or ``BASE:a*0.7+b*-0.3``) is a weighted composition of adapters (400 when malformed);
anything else is a 404 ``model_not_found``. ``/v1/models`` lists the base model (``parent`` null,
``root`` its path) and every loaded adapter (``parent`` the base model, ``root`` its source,
``version`` its load's version and ``identity`` the hash of its weights and scaling).
``n > 1`` fans out into ``n`` engine requests (see ``loraserve.http.serving``); choice ``i * n + j`` is
sample ``j`` of prompt ``i``; prompts x n may be at most ``--max-sequences-per-request`` (413 beyond).
The chat template and tokenization run in a worker thread. Usage counts each prompt once (its first
sample's request), and ``prompt_tokens_details.cached_tokens`` the part of it found in the prefix
cache. Streams follow OpenAI's chunk format, with a final usage chunk when
``stream_options.include_usage`` is set, and end with ``[DONE]``. The routes use only the engine's
:class:`~loraserve.contract.EngineClient` surface.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from loraserve.contract import EngineClient
from loraserve.errors import UserError
from loraserve.http.errors import APIError, ClientDisconnected, parse_body, read_json
from loraserve.http.openapi import errors, request_body
from loraserve.http.serving import EventStream, Generations, Item, check_sequences, fan_out, samples_of
from loraserve.lora.composition import is_composition, parse_spelling, spelling
from loraserve.plugins.frontend_openai.cards import composition_card
from loraserve.plugins.frontend_openai.protocol import ChatCompletionRequest, CompletionRequest
from loraserve.plugins.frontend_openai.streams import chat_chunks, completion_chunks, framed

FINISH_REASONS = {"stop": "stop", "length": "length"}
COMPLETION_NAMES = {"max_new_tokens": "max_tokens", "top_logprobs_num": "logprobs", "input_ids": "prompt"}


def chat_names(body: ChatCompletionRequest) -> dict[str, str]:
    """Engine parameter -> the chat field the client sent (max_completion_tokens, or the older max_tokens)."""
    limit = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    return {"max_new_tokens": limit, "top_logprobs_num": "top_logprobs"}


class OpenAIFrontend:
    """The routes' shared state: the engine, the request runner and the model's facts."""

    def __init__(self, app: FastAPI, engine: EngineClient, settings: Any):
        self.engine, self.settings = engine, settings
        self.model = engine.model_info()  # fixed while the engine runs
        self.gens: Generations = app.state.generations
        self.created = int(time.time())

    # -- models ---------------------------------------------------------------------------------

    def adapter_names(self) -> list[str]:
        return [a["name"] for a in self.engine.loaded_adapters()]

    def model_cards(self) -> list[dict]:
        m = self.model
        base = {
            "id": m.name,
            "object": "model",
            "created": self.created,
            "owned_by": "loraserve",
            "root": m.path,
            "parent": None,
            "max_model_len": m.context_len,
        }
        cards = [base]
        for a in self.engine.loaded_adapters():
            cards.append(
                {
                    "id": a["name"],
                    "object": "model",
                    "created": self.created,
                    "owned_by": "loraserve",
                    "root": a["source"],
                    "parent": m.name,
                    "max_model_len": m.context_len,
                    "version": a["version"],
                    "identity": a["identity"],
                }
            )
        return cards

    async def resolve(self, model: str) -> str | None:
        """The adapter ``model`` names, or None for the base model; 404 model_not_found otherwise."""
        base = self.model.name
        if model == base:
            return None
        names = self.adapter_names()
        adapter = model
        if model not in names and ":" in model:
            prefix, adapter = model.split(":", 1)
            if prefix != base or not adapter:
                raise self.not_found(model, names)
        if adapter in names:
            return adapter
        if is_composition(adapter) and self.model.lora_enabled:
            return await self.resolve_composition(model, adapter, names)
        if self.model.lora_enabled and await run_in_threadpool(self.engine.is_servable, adapter):
            return adapter  # a resolver knows it: the engine loads it when the request arrives
        raise self.not_found(model, names)

    async def resolve_composition(self, model: str, adapter: str, names: list[str]) -> str:
        """The canonical spelling of the weighted composition ``adapter`` (``a*0.7+b*0.3``); 400 when
        it is malformed, 404 model_not_found when it names an adapter that is not servable."""
        try:
            components = parse_spelling(adapter)
        except UserError as exc:
            raise APIError(400, str(exc), param="model") from None
        for name, _ in components:
            if name not in names and not await run_in_threadpool(self.engine.is_servable, name):
                raise self.not_found(model, names, f" (the composition names {name!r}, which is not loaded)")
        return spelling(components)

    def not_found(self, model: str, names: list[str], why: str = "") -> APIError:
        base = self.model.name
        adapters = ", ".join(repr(n) for n in sorted(names)) or "none loaded"
        return APIError(
            404,
            f"the model {model!r} does not exist{why}; use {base!r} for the base model, an adapter name "
            f"({adapters}) or '{base}:ADAPTER' (GET /v1/models lists them)",
            code="model_not_found",
            param="model",
        )

    # -- helpers --------------------------------------------------------------------------------

    def token_text(self, token: int) -> str:
        if not self.model.has_tokenizer:
            return f"token_id:{token}"
        return self.engine.detokenize([token], skip_special_tokens=False)

    def finish_reason(self, r: Any) -> str:
        self.gens.outcome(r)  # abort/error become a 503/500
        return FINISH_REASONS.get(r.finish_reason, r.finish_reason)

    async def build(
        self,
        prompts: list[tuple[str | None, list[int] | None]],
        params: dict,
        adapter: str | None,
        renames: dict[str, str],
        default_max: bool = False,
    ) -> tuple[list, list[int]]:
        """Engine requests for every prompt x n, and the prompt index of each. ``renames`` maps the
        engine's parameter names to the request's, so that a message names the field the client sent."""
        most = self.settings.max_sequences_per_request
        try:
            check_sequences(len(prompts), len(prompts) * samples_of(params, most), most)
            items, owner = [], []
            for i, (text, ids) in enumerate(prompts):
                p = dict(params)
                if default_max and "max_new_tokens" not in p:
                    p["max_new_tokens"] = self.room_after(len(ids))
                for copy in fan_out(p, most):
                    items.append(Item(text, ids, copy, adapter))
                    owner.append(i)
            return await self.gens.build(items), owner
        except UserError as exc:
            message = str(exc).replace("sampling parameter ", "")
            for ours, theirs in renames.items():
                message = message.replace(ours, theirs)
            exc.args = (message,)  # the same exception: a TooLarge stays a 413
            raise exc from None

    def room_after(self, prompt_len: int) -> int:
        """The most tokens a request with this prompt can generate (context and KV cache)."""
        most = min(self.model.context_len, self.model.max_total_tokens)
        room = most - prompt_len
        if room <= 0:
            raise UserError(
                f"the prompt has {prompt_len} tokens, which leaves no room to generate within "
                f"{most} tokens (the context length or the KV-cache size); shorten the messages"
            )
        return room

    def usage(self, requests: list, owner: list[int]) -> dict:
        firsts = {o: r for r, o in reversed(list(zip(requests, owner)))}
        prompt = sum(len(r.prompt_ids) for r in firsts.values())
        cached = sum(r.cached_tokens or 0 for r in firsts.values())
        completion = sum(len(r.output_ids) for r in requests)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        """The prompt ids of a chat (blocks: call it in a worker thread)."""
        return self.engine.apply_chat_template([m.for_template() for m in body.messages])

    # -- logprobs -------------------------------------------------------------------------------

    def completion_logprobs(self, tokens: list[int], lps: list[float], tops: list, offset: int) -> dict:
        texts = [self.token_text(t) for t in tokens]
        offsets = []
        for t in texts:
            offsets.append(offset)
            offset += len(t)
        top = [{self.token_text(t): lp for t, lp in row} for row in tops] if tops else None
        return {"tokens": texts, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}

    def chat_logprobs(self, tokens: list[int], lps: list[float], tops: list) -> dict:
        def entry(t: int, lp: float) -> dict:
            text = self.token_text(t)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        content = []
        for k, (t, lp) in enumerate(zip(tokens, lps)):
            row = entry(t, lp)
            row["top_logprobs"] = [entry(tt, tlp) for tt, tlp in tops[k]] if k < len(tops) else []
            content.append(row)
        return {"content": content}


COMPLETION_OK = {
    "description": "The completion; with stream=true, server-sent events of chunks ending with 'data: [DONE]'.",
    "content": {
        "application/json": {"schema": {"type": "object", "required": ["id", "choices"]}},
        "text/event-stream": {},
    },
}
CARD = {"type": "object", "required": ["id", "object", "parent", "root"]}


def add_routes(app: FastAPI, engine: EngineClient, settings: Any) -> None:
    front = OpenAIFrontend(app, engine, settings)
    _add_model_routes(app, front)
    _add_completion_route(app, front)
    _add_chat_route(app, front)


def _add_model_routes(app: FastAPI, front: OpenAIFrontend) -> None:
    @app.get(
        "/v1/models",
        responses=errors(
            ok={
                "description": "The base model and every adapter.",
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["data"],
                            "properties": {"data": {"type": "array", "items": CARD}},
                        }
                    }
                },
            }
        ),
    )
    async def list_models() -> dict:
        return {"object": "list", "data": front.model_cards()}

    @app.get(
        "/v1/models/{model_id:path}",
        responses=errors(404, ok={"description": "One model card.", "content": {"application/json": {"schema": CARD}}}),
    )
    async def retrieve_model(model_id: str) -> dict:
        cards = {card["id"]: card for card in front.model_cards()}
        if model_id in cards:
            return cards[model_id]
        prefix, _, name = model_id.partition(":")  # BASE:ADAPTER, as the generation routes take it
        if prefix == front.model.name and name in cards and name != prefix:
            return {**cards[name], "id": model_id}
        card = composition_card(model_id, cards, front.model.name)  # (not listed, but found)
        if card is not None:
            return card
        raise front.not_found(model_id, front.adapter_names())


def _add_completion_route(app: FastAPI, front: OpenAIFrontend) -> None:
    engine, gens = front.engine, front.gens

    @app.post(
        "/v1/completions",
        openapi_extra=request_body(app, CompletionRequest),
        responses=errors(400, 404, 413, 429, 499, 503, ok=COMPLETION_OK),
    )
    async def completions(request: Request) -> Any:
        body = parse_body(CompletionRequest, await read_json(request))
        adapter = await front.resolve(body.model)
        prompts = body.prompts()
        requests, owner = await front.build(prompts, body.sampling_params(), adapter, COMPLETION_NAMES)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = [
            (text if text is not None else engine.detokenize(ids) if front.model.has_tokenizer else "")
            if body.echo
            else ""
            for text, ids in prompts
        ]
        head = {"id": rid, "object": "text_completion", "created": created, "model": body.model}
        try:
            if body.stream:
                events = await gens.open_stream(request, requests)
                return EventStream(
                    framed(
                        front,
                        completion_chunks(front, events, requests, owner, echo, head, body),
                        events,
                        requests,
                        owner,
                        head,
                        body,
                    )
                )
            await gens.complete(request, requests)
        except ClientDisconnected:
            return Response(status_code=499)
        choices = []
        for k, r in enumerate(requests):
            prefix = echo[owner[k]]
            logprobs = (
                front.completion_logprobs(r.output_ids, r.logprobs, r.top_logprobs, len(prefix))
                if body.logprobs is not None
                else None
            )
            choices.append(
                {
                    "index": k,
                    "text": prefix + engine.final_output(r)["text"],
                    "logprobs": logprobs,
                    "finish_reason": front.finish_reason(r),
                }
            )
        return {**head, "choices": choices, "usage": front.usage(requests, owner), "system_fingerprint": None}


def _add_chat_route(app: FastAPI, front: OpenAIFrontend) -> None:
    engine, gens = front.engine, front.gens

    @app.post(
        "/v1/chat/completions",
        openapi_extra=request_body(app, ChatCompletionRequest),
        responses=errors(400, 404, 413, 429, 499, 503, ok=COMPLETION_OK),
    )
    async def chat_completions(request: Request) -> Any:
        body = parse_body(ChatCompletionRequest, await read_json(request))
        adapter = await front.resolve(body.model)
        ids = await run_in_threadpool(front.chat_prompt, body)  # jinja and the tokenizer: off the event loop
        requests, owner = await front.build(
            [(None, ids)], body.sampling_params(), adapter, chat_names(body), default_max=True
        )
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": body.model}
        try:
            if body.stream:
                events = await gens.open_stream(request, requests)
                chunk_head = {**head, "object": "chat.completion.chunk"}
                return EventStream(
                    framed(
                        front,
                        chat_chunks(front, events, requests, owner, chunk_head, body),
                        events,
                        requests,
                        owner,
                        chunk_head,
                        body,
                    )
                )
            await gens.complete(request, requests)
        except ClientDisconnected:
            return Response(status_code=499)
        choices = []
        for k, r in enumerate(requests):
            logprobs = front.chat_logprobs(r.output_ids, r.logprobs, r.top_logprobs) if body.logprobs else None
            choices.append(
                {
                    "index": k,
                    "message": {"role": "assistant", "content": engine.final_output(r)["text"]},
                    "logprobs": logprobs,
                    "finish_reason": front.finish_reason(r),
                }
            )
        return {**head, "choices": choices, "usage": front.usage(requests, owner), "system_fingerprint": None}
