"""What both HTTP frontends share: building engine requests, running them, streaming them as events.

:class:`Generations` turns validated inputs into engine requests (fanning ``n > 1`` out into ``n``
requests, with seeds ``seed, seed+1, ...`` when a seed is given, so the samples differ but stay
reproducible; one HTTP request may ask for at most ``--max-sequences-per-request`` sequences, inputs
x n), runs them to completion or as a stream, and records their metrics. Tokenizing and validating
run in a worker thread, so a long prompt never stalls the event loop (and /health with it). A client that
disconnects has its requests aborted at once (their KV blocks are freed before the next step),
whether it was waiting for a whole response or reading a stream. A request the engine ended with
an error, or aborted because the server is shutting down, becomes an :class:`APIError` (500, 503).
Server-sent events are written by :class:`EventStream`, which always closes its generator, so an
aborted stream never leaves a request running.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request as HttpRequest
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from loraserve.contract import EngineClient
from loraserve.errors import TooLarge, UserError
from loraserve.http.errors import APIError, ClientDisconnected
from loraserve.http.metrics import ServerMetrics
from loraserve.sched.request import Request, RequestOutput

SHUTTING_DOWN = "the server is shutting down and accepts no new requests; retry against another instance"


@dataclass
class Item:
    """One input of an HTTP request: a text prompt or token ids, its sampling parameters, its adapter."""

    prompt: str | None
    input_ids: list[int] | None
    params: dict[str, Any]
    adapter: str | None


def samples_of(params: dict[str, Any], most: int) -> int:
    """The ``n`` of ``params`` (1 when unset), or a UserError unless it is an integer from 1 to ``most``."""
    n = params.get("n", 1)
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= most:
        raise UserError(f"n={n!r} is invalid; send an integer from 1 to {most} (--max-sequences-per-request)")
    return n


def check_sequences(inputs: int, sequences: int, most: int) -> None:
    """TooLarge when one HTTP request asks for more than ``most`` sequences (``inputs`` x n)."""
    if sequences > most:
        raise TooLarge(
            f"this request asks for {sequences} sequences ({inputs} input(s) x n), more than the "
            f"{most} allowed per request (--max-sequences-per-request); split it into several "
            "requests or lower n"
        )


def fan_out(params: dict[str, Any], most: int) -> list[dict[str, Any]]:
    """``n`` copies of ``params`` with ``n=1`` (``n`` at most ``most``); copy ``j`` gets seed ``seed + j``
    when a seed is set."""
    n = samples_of(params, most)
    seed = params.get("seed")
    copies = []
    for j in range(n):
        p = {**params, "n": 1}
        if isinstance(seed, int) and not isinstance(seed, bool) and j:
            p["seed"] = (seed + j) % 2**64
        copies.append(p)
    return copies


async def wait_disconnect(http: HttpRequest) -> None:
    """Return once the client has gone away (call only after the request body was read)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


async def race_disconnect(http: HttpRequest, work: Awaitable[Any]) -> Any:
    """Await ``work`` unless the client disconnects first: then cancel it, raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnect(http))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        watcher.cancel()
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


def sse(data: Any) -> str:
    """One server-sent event carrying ``data`` as JSON (or the literal ``[DONE]``)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class EventStream(StreamingResponse):
    """A ``text/event-stream`` response that closes its generator however the response ends, so the
    generator's ``finally`` (which aborts unfinished requests) runs even when sending failed."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


class Generations:
    """Runs the requests of HTTP calls on one engine and records their metrics."""

    def __init__(self, engine: EngineClient, metrics: ServerMetrics, app_state: Any):
        self.engine, self.metrics, self.state = engine, metrics, app_state

    def check_accepting(self) -> None:
        if getattr(self.state, "draining", False):
            raise APIError(503, SHUTTING_DOWN)

    async def build(self, items: Sequence[Item]) -> list[Request]:
        """Validate and tokenize every item in a worker thread (raises UserError naming the bad one);
        submits nothing."""
        self.check_accepting()
        return await run_in_threadpool(self._build, items)

    def _build(self, items: Sequence[Item]) -> list[Request]:
        requests = []
        for k, item in enumerate(items):
            try:
                requests.append(
                    self.engine.make_request(
                        prompt=item.prompt, input_ids=item.input_ids, params=item.params, adapter=item.adapter
                    )
                )
            except UserError as exc:
                if len(items) > 1:
                    exc.args = (f"input {k}: {exc}",)  # the same exception: a TooLarge stays a 413
                raise exc from None
        return requests

    def _observe(self, r: Request, reason: str | None) -> None:
        self.metrics.observe_finished(r, reason or "abort", time.perf_counter())

    def outcome(self, r: Request) -> None:
        """Raise the APIError for a request the engine did not finish normally."""
        if r.finish_reason == "error" and r.error_status is not None:
            raise APIError(r.error_status, r.error or "the request failed")
        if r.finish_reason == "error":
            raise APIError(500, f"generation failed inside the engine ({r.error}); this is a bug, please report it")
        if r.finish_reason == "abort":
            raise APIError(
                503,
                "the request was aborted because the server is shutting down; retry it"
                if getattr(self.state, "draining", False)
                else "the request was aborted; retry it",
            )

    async def _events(self, requests: list[Request]) -> AsyncIterator[tuple[int, RequestOutput]]:
        stream = self.engine.stream(requests=requests)
        observed: set[int] = set()
        try:
            try:
                event = await stream.__anext__()  # submits: unknown adapters are refused here
            except UserError:
                observed.update(range(len(requests)))  # refused, never ran: not a finished request
                self.check_accepting()  # the engine refuses work while it stops: say so with a 503
                raise
            while True:
                index, out = event
                if out.finished:
                    observed.add(index)
                    self._observe(requests[index], out.finish_reason)
                yield index, out
                try:
                    event = await stream.__anext__()
                except StopAsyncIteration:
                    return
        finally:
            await stream.aclose()  # aborts whatever has not finished
            for index, r in enumerate(requests):
                if index not in observed:
                    self._observe(r, "abort")

    async def complete(self, http: HttpRequest, requests: list[Request]) -> list[Request]:
        """Run ``requests`` to the end; abort them if the client disconnects first."""
        self.check_accepting()

        async def drain() -> None:
            async for _ in self._events(requests):
                pass

        await race_disconnect(http, drain())
        return requests

    async def open_stream(self, http: HttpRequest, requests: list[Request]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Submit ``requests`` and wait for their first output, so that a request the engine refuses
        (an unknown adapter) is still answered with a 4xx before any event is sent."""
        self.check_accepting()
        events = self._events(requests)
        try:
            first = await race_disconnect(http, events.__anext__())
        except BaseException:
            await events.aclose()
            raise

        async def chained() -> AsyncIterator[tuple[int, RequestOutput]]:
            try:
                yield first
                async for event in events:
                    yield event
            finally:
                await events.aclose()

        return chained()
