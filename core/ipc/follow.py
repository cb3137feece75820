"""The front's record of the requests running in the engine process: their text and stop strings.

The engine process sends token ids; :class:`Followers` appends them (and the prompt tokens the
prefix cache held, sent once) to the front's own :class:`~loraserve.sched.request.Request` of each
request, decodes them incrementally and checks stop strings (:meth:`OutputBuilder.follow
<loraserve.engine.outputs.OutputBuilder.follow>`), and hands the resulting deltas to the asyncio
queue of the stream that waits for them. A stop string that matches here finishes the request with
``"stop"`` at once (no text past it is delivered) and the caller sends the engine an abort, so its KV
blocks are freed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

from loraserve.engine.outputs import OutputBuilder
from loraserve.ipc.messages import Delta
from loraserve.sched.request import Request, RequestOutput, Status


@dataclass
class Followed:
    """One running request and where its deltas go: ``(index, delta)`` onto ``queue`` of ``loop``."""

    request: Request
    index: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def deliver(self, out: RequestOutput) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, out))
        except RuntimeError:  # the event loop is closed: nobody waits for this request any more
            pass


class Followers:
    """The requests of every open stream, by id. Thread-safe; :meth:`on_delta` and :meth:`fail_all`
    run on the front's receiving thread."""

    def __init__(self, outputs: OutputBuilder):
        self.outputs = outputs
        self._live: dict[str, Followed] = {}
        self._lock = threading.Lock()

    def add(self, requests: list[Request], loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        with self._lock:
            for i, r in enumerate(requests):
                self._live[r.request_id] = Followed(r, i, loop, queue)

    def drop(self, requests: list[Request]) -> list[str]:
        """Stop following ``requests``; returns the ids of those not finished (the engine should abort them)."""
        with self._lock:
            for r in requests:
                self._live.pop(r.request_id, None)
        return [r.request_id for r in requests if not r.finished]

    def on_delta(self, delta: Delta) -> bool:
        """Follow one delta from the engine; returns True when a stop string finished the request
        here while the engine still runs it (abort it there)."""
        with self._lock:
            followed = self._live.get(delta.request_id)
        if followed is None:  # finished here already (a stop string), or its stream was closed
            return False
        r = followed.request
        if delta.cached_tokens is not None:
            r.cached_tokens = delta.cached_tokens
        wants_logprobs = r.params.return_logprob or r.params.top_logprobs_num
        stopped = False
        for k, token in enumerate(delta.token_ids):
            r.output_ids.append(token)
            if wants_logprobs and k < len(delta.logprobs):
                r.logprobs.append(delta.logprobs[k])
                if r.params.top_logprobs_num and k < len(delta.top_logprobs):
                    r.top_logprobs.append([tuple(pair) for pair in delta.top_logprobs[k]])
            if r.first_token_time is None:
                r.first_token_time = time.perf_counter()
            if self.outputs.follow(r, token):
                stopped = True
                break
        if stopped:
            self._finish(followed, "stop")
        elif delta.finished:
            r.error = delta.error
            self._finish(followed, delta.finish_reason or "abort", delta.matched)
        else:
            followed.deliver(self.outputs.delta(r, finished=False))
        return stopped and not delta.finished

    def fail(self, request_id: str, message: str) -> None:
        """Finish one followed request with an error (``message`` says what went wrong)."""
        with self._lock:
            followed = self._live.get(request_id)
        if followed is not None:
            followed.request.error = message
            self._finish(followed, "error")

    def fail_all(self, message: str, reason: str = "error") -> None:
        """Finish every followed request with ``reason`` (the engine process is gone: ``message`` says why)."""
        with self._lock:
            live = list(self._live.values())
        for followed in live:
            followed.request.error = message if reason == "error" else None
            self._finish(followed, reason)

    def _finish(self, followed: Followed, reason: str, matched: int | str | None = None) -> None:
        r = followed.request
        with self._lock:
            if self._live.pop(r.request_id, None) is None:
                return  # finished by another thread meanwhile
        r.status, r.finish_reason, r.finish_time = Status.FINISHED, reason, time.perf_counter()
        self.outputs.finished_elsewhere(r, matched)
        followed.deliver(self.outputs.delta(r, finished=True))
