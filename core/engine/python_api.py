"""SGLang's Python API over an :class:`~loraserve.engine.Engine`: ``generate`` (blocking),
``generate_async`` and ``stream`` (asyncio), taking one prompt or a batch with SGLang's arguments.

These are what the engine's methods of the same names run; they use only the engine's public
surface (``make_request``, ``submit``, ``abort``, ``final_output``, ``stream``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from loraserve.engine.intake import split_batch
from loraserve.sched.request import Request, RequestOutput

if TYPE_CHECKING:
    from loraserve.engine.engine import Engine


def build_batch(engine: Engine, prompt, sampling_params, lora_path, input_ids) -> tuple[list[Request], bool]:
    """The requests of SGLang's ``generate`` arguments, and whether they were a single input."""
    items, single = split_batch(prompt, sampling_params, lora_path, input_ids)
    return [
        engine.make_request(prompt=text, input_ids=ids, params=params, adapter=adapter)
        for text, ids, params, adapter in items
    ], single


def generate(engine: Engine, prompt, sampling_params, lora_path, input_ids) -> dict | list[dict]:
    """Generate for one prompt or a batch; blocks until every request finished."""
    requests, single = build_batch(engine, prompt, sampling_params, lora_path, input_ids)
    finished = [threading.Event() for _ in requests]
    for r, event in zip(requests, finished):
        r.sink = lambda out, event=event: out.finished and event.set()
    engine.submit(requests)
    for event in finished:
        event.wait()
    results = [engine.final_output(r) for r in requests]
    return results[0] if single else results


async def generate_async(engine: Engine, prompt, sampling_params, lora_path, input_ids) -> dict | list[dict]:
    """Like :func:`generate`, awaiting instead of blocking."""
    requests, single = build_batch(engine, prompt, sampling_params, lora_path, input_ids)
    async for _ in engine.stream(requests=requests):
        pass
    results = [engine.final_output(r) for r in requests]
    return results[0] if single else results


async def stream(
    engine: Engine, prompt, sampling_params, lora_path, input_ids, requests: list[Request] | None
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yield ``(index, delta)`` pairs as tokens are produced; aborts the requests if the consumer
    stops early (a client disconnect). ``requests``, or else those of SGLang's arguments (built on
    the first iteration)."""
    if requests is None:
        requests, _ = build_batch(engine, prompt, sampling_params, lora_path, input_ids)
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    index = {r.request_id: i for i, r in enumerate(requests)}
    for r in requests:
        r.sink = lambda out, r=r: loop.call_soon_threadsafe(queue.put_nowait, (index[r.request_id], out))
    await _submit_off_loop(engine, requests)
    pending = len(requests)
    try:
        while pending:
            i, out = await queue.get()
            pending -= out.finished
            yield i, out
    finally:
        for r in requests:
            if not r.finished:
                r.sink = None  # the consumer is gone: nothing to deliver the abort to
                engine.abort(r.request_id)


async def _submit_off_loop(engine: Engine, requests: list[Request]) -> None:
    """Submit ``requests``; on a worker thread when one names an adapter that is not loaded, since
    submitting then resolves and loads it (seconds) and the event loop must keep serving others. A
    consumer cancelled meanwhile aborts whatever that submit queued, once it returns."""
    lora = engine.lora
    if lora is None or all(r.adapter is None or lora.registry.get(r.adapter) is not None for r in requests):
        engine.submit(requests)
        return
    submitted = asyncio.get_running_loop().run_in_executor(None, engine.submit, requests)
    try:
        await asyncio.shield(submitted)
    except asyncio.CancelledError:

        def abort_queued(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None:
                for r in requests:
                    r.sink = None
                    engine.abort(r.request_id)

        submitted.add_done_callback(abort_queued)
        raise
