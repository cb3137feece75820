"""The streamed answers of the OpenAI routes: completion and chat chunks, and the framing around them.

:func:`completion_chunks` and :func:`chat_chunks` turn the engine's events into OpenAI's chunk
format (one choice per chunk; a chat stream opens with an empty assistant delta per choice);
:func:`framed` adds the usage chunk when ``stream_options.include_usage`` is set, reports an error
in-band (the headers are already sent), closes the events and ends with ``[DONE]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from loraserve.http.errors import api_error_of, error_body
from loraserve.http.serving import sse

if TYPE_CHECKING:
    from loraserve.plugins.frontend_openai.routes import OpenAIFrontend


async def completion_chunks(front: OpenAIFrontend, events, requests, owner, echo, head, body) -> AsyncIterator[str]:
    usage_field = {"usage": None} if body.include_usage else {}
    offsets = [len(echo[o]) for o in owner]
    started = [False] * len(requests)
    async for k, out in events:
        text = out.text
        if not started[k]:
            started[k], text = True, echo[owner[k]] + text
        logprobs = None
        if body.logprobs is not None:
            logprobs = front.completion_logprobs(out.token_ids, out.logprobs, out.top_logprobs, offsets[k])
            offsets[k] += sum(len(t) for t in logprobs["tokens"])
        reason = front.finish_reason(requests[k]) if out.finished else None
        choice = {"index": k, "text": text, "logprobs": logprobs, "finish_reason": reason}
        yield sse({**head, "choices": [choice], **usage_field})


async def chat_chunks(front: OpenAIFrontend, events, requests, owner, head, body) -> AsyncIterator[str]:
    usage_field = {"usage": None} if body.include_usage else {}
    for k in range(len(requests)):
        first = {"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        yield sse({**head, "choices": [first], **usage_field})
    async for k, out in events:
        if not out.finished and not out.text and not out.token_ids:
            continue
        delta = {"content": out.text} if out.text or not out.finished else {}
        logprobs = front.chat_logprobs(out.token_ids, out.logprobs, out.top_logprobs) if body.logprobs else None
        reason = front.finish_reason(requests[k]) if out.finished else None
        choice = {"index": k, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        yield sse({**head, "choices": [choice], **usage_field})


async def framed(front: OpenAIFrontend, chunks, events, requests, owner, head, body) -> AsyncIterator[str]:
    """OpenAI's framing around a stream's choice chunks: the usage chunk when asked for, an error
    reported in-band (headers are already sent), the events closed, then ``[DONE]``."""
    try:
        async for chunk in chunks:
            yield chunk
        if body.include_usage:
            yield sse({**head, "choices": [], "usage": front.usage(requests, owner)})
    except Exception as exc:
        err = api_error_of(exc)
        yield sse(error_body(err.status, err.message, openai=True, code=err.code))
    finally:
        await events.aclose()
    yield sse("[DONE]")
