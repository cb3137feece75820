"""The engine process: builds an :class:`~loraserve.engine.Engine` from the settings and serves the
messages of the HTTP server's process (:mod:`~loraserve.ipc.messages`).

:func:`engine_main` is what the front spawns. It builds the engine without detokenization (the
front decodes text and checks stop strings), answers :class:`Ready` or :class:`StartFailed`, then
:class:`EngineServer` receives the front's messages on this process's main thread: submits and aborts
are handed to the engine thread at once (a submit naming an adapter that is not loaded first waits on a
small pool for the resolver plugins to load it); the other calls (adapter loads, stats: they may block) run on
a small thread pool, so an abort never waits behind a slow load. Outputs and replies leave through
:class:`Outbox`, one thread that sends whatever has accumulated as one frame (a step's outputs
travel together). With ``--tp-size > 1`` the engine starts its tensor-parallel workers from here:
this process is rank 0. SIGINT is ignored (Ctrl+C reaches the whole process group, and the front
decides how to stop); the process exits when the front asks, or when the front is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import msgspec
import zmq

from loraserve.errors import LoraserveError
from loraserve.ipc.messages import (
    RPC_METHODS,
    Abort,
    Call,
    Codec,
    Delta,
    Ready,
    Reply,
    Shutdown,
    StartFailed,
    Stopped,
    Submit,
    error_info,
)

logger = logging.getLogger("loraserve.ipc.engine")

#: exit codes of the engine process: the engine could not be built (a configuration error, a bug)
START_FAILED_EXIT_CODE = 2
#: threads running the front's blocking calls (adapter loads and unloads, stats, cache flushes)
CALL_THREADS = 4
RESOLVE_THREADS = 4  # submits that must first load an adapter a resolver found (see EngineServer.handle)
POLL_MS = 1000  # how long the receiver waits for a message before it looks at its own state again


class Outbox:
    """Messages for the front, sent by a thread of their own: each send takes every message queued
    since the last one (``put`` is safe from any thread and never blocks on the socket)."""

    def __init__(self, socket: zmq.Socket, codec: Codec):
        self._socket, self._codec = socket, codec
        self._cond = threading.Condition()
        self._items: list[Any] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="loraserve-ipc-send", daemon=True)
        self._thread.start()

    def put(self, message: Any) -> None:
        with self._cond:
            self._items.append(message)
            self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                batch, self._items = self._items, []
                closed = self._closed
            if batch:
                try:
                    self._socket.send(self._codec.encode(batch), copy=False)
                except Exception:  # this thread must outlive any one batch
                    logger.exception("could not send %d messages to the HTTP process", len(batch))
            elif closed:
                return


def delta_of(out: Any, cached_tokens: int | None = None) -> Delta:
    """The wire form of one engine output (a :class:`~loraserve.sched.request.RequestOutput`), with
    the request's ``cached_tokens`` when this delta reports them."""
    reason = out.meta.get("finish_reason") if out.finished else None
    reason = reason if isinstance(reason, dict) else {}
    return Delta(
        request_id=out.request_id,
        token_ids=[int(t) for t in out.token_ids],
        logprobs=[float(lp) for lp in out.logprobs],
        top_logprobs=[[(int(t), float(lp)) for t, lp in row] for row in out.top_logprobs],
        finished=out.finished,
        finish_reason=out.finish_reason,
        matched=reason.get("matched"),
        error=reason.get("message"),
        cached_tokens=cached_tokens,
    )


class RequestSink:
    """The sink of one request (called on the engine thread): sends each output as a :class:`Delta`,
    and the request's ``cached_tokens`` with the first delta sent once the scheduler has set them
    (before its first token), so the front's meta_info has them even when a stop string ends the
    request there first."""

    def __init__(self, request: Any, outbox: Outbox):
        self.request, self.outbox = request, outbox
        self.reported = False

    def __call__(self, out: Any) -> None:
        cached = None
        if not self.reported and self.request.cached_tokens is not None:
            cached, self.reported = self.request.cached_tokens, True
        self.outbox.put(delta_of(out, cached))


class EngineServer:
    """Serves one front: submits, aborts and calls in, outputs and replies out (through ``outbox``)."""

    def __init__(self, engine: Any, inbox: zmq.Socket, outbox: Outbox, codec: Codec):
        self.engine, self.inbox, self.outbox, self.codec = engine, inbox, outbox, codec
        self.calls = ThreadPoolExecutor(CALL_THREADS, thread_name_prefix="loraserve-ipc-call")
        self.resolutions = ThreadPoolExecutor(RESOLVE_THREADS, thread_name_prefix="loraserve-ipc-resolve")
        # ids of requests whose submit waits for an adapter resolution, and those aborted meanwhile
        self._lock = threading.Lock()
        self._resolving: set[str] = set()
        self._aborted: set[str] = set()

    def serve(self) -> float:
        """Handle messages until the front asks to stop; returns the shutdown timeout it gave."""
        while True:
            if not self.inbox.poll(POLL_MS):
                continue
            frame = self.inbox.recv()
            try:
                message = self.codec.to_engine.decode(frame)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                logger.warning("dropped a malformed message from the HTTP process (%d bytes): %s", len(frame), exc)
                continue
            if isinstance(message, Shutdown):
                return message.timeout
            try:
                self.handle(message)
            except Exception:  # the engine must outlive any one message
                logger.exception("handling %s from the HTTP process failed", type(message).__name__)

    def handle(self, message: Any) -> None:
        if isinstance(message, Submit):
            if self._needs_resolution(message):
                with self._lock:
                    self._resolving.update(item.request_id for item in message.requests)
                self.resolutions.submit(self._submit_resolving, message)
            else:
                self.outbox.put(self.submit(message))
        elif isinstance(message, Abort):
            for request_id in message.request_ids:
                with self._lock:
                    if request_id in self._resolving:  # aborted once its submit returns
                        self._aborted.add(request_id)
                        continue
                self._abort(request_id)
        elif isinstance(message, Call):
            self.calls.submit(self.call, message)

    def _needs_resolution(self, message: Submit) -> bool:
        """Whether a request names an adapter that is not loaded: submitting it then asks the resolvers
        and loads what they find (seconds), so it runs on the resolution pool, not on this thread,
        which must keep taking others' submits and aborts."""
        lora = getattr(self.engine, "lora", None)
        return lora is not None and any(
            item.adapter is not None and lora.registry.get(item.adapter) is None for item in message.requests
        )

    def _submit_resolving(self, message: Submit) -> None:
        reply = self.submit(message)
        ids = {item.request_id for item in message.requests}
        with self._lock:
            self._resolving -= ids
            aborted, self._aborted = self._aborted & ids, self._aborted - ids
        for request_id in aborted:
            self._abort(request_id)
        self.outbox.put(reply)

    def _abort(self, request_id: str) -> None:
        try:
            self.engine.abort(request_id)
        except LoraserveError:  # stopping: everything is aborted anyway
            pass

    def submit(self, message: Submit) -> Reply:
        """Queue the requests (atomically); the reply carries the error that refused them, if one did."""
        try:
            requests = [
                self.engine.make_request(
                    input_ids=item.input_ids, params=item.params, adapter=item.adapter, request_id=item.request_id
                )
                for item in message.requests
            ]
            for r in requests:
                r.sink = RequestSink(r, self.outbox)
            self.engine.submit(requests)
        except Exception as exc:
            if not isinstance(exc, LoraserveError):
                logger.exception("submitting requests failed")
            return Reply(message.call_id, error=error_info(exc))
        return Reply(message.call_id)

    def call(self, message: Call) -> None:
        try:
            if message.method not in RPC_METHODS:
                raise ValueError(f"unknown engine method {message.method!r}")
            value = getattr(self.engine, message.method)(*message.args)
            if hasattr(value, "__dataclass_fields__"):
                value = asdict(value)
            reply = Reply(message.call_id, value=value)
        except Exception as exc:
            if not isinstance(exc, LoraserveError):
                logger.exception("engine call %s failed", message.method)
            reply = Reply(message.call_id, error=error_info(exc))
        self.outbox.put(reply)

    def close(self) -> None:
        self.calls.shutdown(wait=False, cancel_futures=True)
        self.resolutions.shutdown(wait=False, cancel_futures=True)


def exit_with_parent(poll_s: float = 1.0) -> None:
    """Exit when the front is gone, whatever this process is doing (a step, a collective)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="loraserve-ipc-parent-watch", daemon=True).start()


def engine_main(payload: dict, to_engine: str, from_engine: str) -> None:
    """The engine process: build the engine from the settings ``payload`` (``Settings.model_dump()``),
    tell the front over ``from_engine``, serve its messages from ``to_engine`` until it says stop."""
    from loraserve.cli import configure_logging
    from loraserve.engine.engine import Engine
    from loraserve.settings import Settings

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent()
    settings = Settings.model_validate(payload)
    configure_logging(settings.log_level)
    context = zmq.Context()
    codec = Codec()
    sender = context.socket(zmq.PUSH)
    sender.connect(from_engine)
    outbox = Outbox(sender, codec)
    try:
        engine = Engine(settings, detokenize=False)
    except BaseException as exc:
        if not isinstance(exc, LoraserveError):
            logger.exception("the engine failed to start")
        outbox.put(StartFailed(error_info(exc)))
        outbox.close()
        sender.close(linger=5000)
        raise SystemExit(START_FAILED_EXIT_CODE) from None
    receiver = context.socket(zmq.PULL)
    receiver.connect(to_engine)
    server = EngineServer(engine, receiver, outbox, codec)
    outbox.put(Ready(asdict(engine.model_info())))
    timeout = server.serve()
    server.close()
    engine.shutdown(timeout)
    outbox.put(Stopped())
    outbox.close()
    sender.close(linger=5000)
    receiver.close(linger=0)
