"""The engine as the HTTP server's process sees it when the engine runs in a process of its own.

:class:`RemoteEngine` is an :class:`~loraserve.contract.EngineClient`. It spawns the engine
process (:func:`~loraserve.ipc.engine_process.engine_main`, multiprocessing's ``spawn`` context),
waits for it to be built (model conversion and CUDA-graph capture may take minutes: the wait is
logged and bounded), and then talks to it over two ZeroMQ ``ipc://`` sockets in a private
temporary directory. Tokenizing, chat templates, detokenizing and stop strings run here
(:mod:`~loraserve.ipc.follow`); the engine process receives token ids and sends token ids back.
Adapter, cache-flush and stats calls are forwarded as calls
(:data:`~loraserve.ipc.messages.RPC_METHODS`).

One thread receives everything the engine sends and watches the process: when it exits unasked,
every in-flight request finishes with an error that says so, calls in flight fail, and
``on_death`` is told (the server then stops, as for a dead tensor-parallel worker).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
import tempfile
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict
from typing import Any

import zmq

from loraserve.contract import EngineClient, EngineStats, ModelInfo
from loraserve.engine.intake import Intake, check_fits, check_sampling_params
from loraserve.engine.outputs import OutputBuilder
from loraserve.errors import LoraserveError, UserError
from loraserve.ipc.follow import Followers
from loraserve.ipc.messages import (
    Abort,
    Call,
    Codec,
    Delta,
    NewRequest,
    Reply,
    Shutdown,
    Stopped,
    Submit,
    raise_error,
)
from loraserve.ipc.spawn import START_TIMEOUT_S, EngineDied, start_engine_process, stop_process, wait_ready
from loraserve.sched.request import Request, RequestOutput
from loraserve.settings import Settings

logger = logging.getLogger("loraserve.ipc.client")

CALL_TIMEOUT_S = 300.0  # calls that only read the engine's state (they wait for the end of a step)
SEND_TIMEOUT_MS = 30_000  # a send that waits this long means the engine process no longer reads
POLL_MS = 200  # the receiving thread looks at the engine process at least this often
STOPPING = "the engine is shutting down; no new requests are accepted"


class RemoteEngine(EngineClient):
    """An engine built from ``settings`` in a process of its own; ``on_death(message)`` is called
    (on the receiving thread) when that process exits unasked."""

    def __init__(
        self,
        settings: Settings,
        on_death: Callable[[str], None] | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
    ):
        self.settings = settings
        self.on_death = on_death
        self._codec = Codec()
        self._calls: dict[int, Future] = {}
        self._call_ids = itertools.count()
        self._request_ids = itertools.count()
        self._send_lock = threading.Lock()
        self._dead: str | None = None
        self._stopping = False
        self._stopped = threading.Event()
        self._shutdown_lock = threading.Lock()
        self._closed = False
        self._dir = tempfile.mkdtemp(prefix="loraserve-ipc-")  # mode 0700: only this user reaches the sockets
        self._zmq = zmq.Context()
        self._to_engine = self._zmq.socket(zmq.PUSH)
        self._from_engine = self._zmq.socket(zmq.PULL)
        to_engine, from_engine = f"ipc://{self._dir}/to-engine", f"ipc://{self._dir}/from-engine"
        self._to_engine.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        self._to_engine.bind(to_engine)
        self._from_engine.bind(from_engine)
        try:
            self.process = start_engine_process(settings, to_engine, from_engine)
        except BaseException:
            self._close()
            raise
        # multiprocessing joins a non-daemon child at exit: a front that exits without shutdown()
        # (an uncaught error) must not wait for an engine process that waits for orders forever
        weakref.finalize(self, stop_process, self.process)
        try:
            self._info = wait_ready(self.process, self._from_engine, self._codec, start_timeout_s)
            self._build_front()
        except BaseException:
            self._kill()
            self._close()
            raise
        self._receiver = threading.Thread(target=self._receive, name="loraserve-ipc-receive", daemon=True)
        self._receiver.start()

    # -- start-up ----------------------------------------------------------------------------------

    def _build_front(self) -> None:
        """The tokenizer and the detokenizing outputs of this process (the engine's own are not used)."""
        from loraserve.engine.builder import load_tokenizer_or_none
        from loraserve.model_loader import resolve_model_source

        info = self._info
        tokenizer = None
        if info.has_tokenizer or self.settings.tokenizer_path is not None:
            tokenizer = load_tokenizer_or_none(self.settings, resolve_model_source(self.settings))
        self.tokenizer = tokenizer
        self.intake = Intake(
            tokenizer, info.context_len, self.settings.max_queued_requests, self.settings.max_prompt_chars
        )
        self.outputs = OutputBuilder(tokenizer, set())
        self.followers = Followers(self.outputs)

    # -- receiving (one thread) -----------------------------------------------------------------------

    def _receive(self) -> None:
        poller = zmq.Poller()
        poller.register(self._from_engine, zmq.POLLIN)
        poller.register(self.process.sentinel, zmq.POLLIN)
        while True:
            events = dict(poller.poll(POLL_MS))
            if self._from_engine in events:
                self._drain()
            if self.process.sentinel in events or not self.process.is_alive():
                self._drain()
                if not self._stopping:
                    self._engine_died()
                self._stopped.set()
                return

    def _drain(self) -> None:
        while True:
            try:
                frame = self._from_engine.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                messages = self._codec.from_engine.decode(frame)
            except Exception:
                logger.exception("dropped a malformed message from the engine process")
                continue
            for message in messages:
                try:
                    self._dispatch(message)
                except Exception:
                    logger.exception("handling %s from the engine process failed", type(message).__name__)

    def _dispatch(self, message: Any) -> None:
        if isinstance(message, Delta):
            try:
                stopped = self.followers.on_delta(message)
            except Exception as exc:  # decoding failed: end this request, not the others
                logger.exception("following the output of %s failed", message.request_id)
                self.followers.fail(message.request_id, f"{type(exc).__name__}: {exc}")
                stopped = not message.finished
            if stopped:  # finished here (a stop string): free its blocks in the engine
                self._abort_quietly([message.request_id])
        elif isinstance(message, Reply):
            future = self._calls.pop(message.call_id, None)
            if future is None:
                return
            if message.error is not None:
                try:
                    raise_error(message.error)
                except Exception as exc:
                    future.set_exception(exc)
            else:
                future.set_result(message.value)
        elif isinstance(message, Stopped):
            self._stopped.set()

    def _engine_died(self) -> None:
        self.process.join(5)
        message = f"the engine process exited with code {self.process.exitcode}; the server stops"
        self._dead = message
        logger.critical(message)
        self.followers.fail_all(message)
        for call_id in list(self._calls):
            future = self._calls.pop(call_id, None)
            if future is not None:
                future.set_exception(EngineDied(message))
        if self.on_death is not None:
            self.on_death(message)

    # -- sending (any thread) ---------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._dead is not None:
            raise EngineDied(self._dead)
        if self._stopping:
            raise UserError(STOPPING)

    def _send(self, message: Any) -> None:
        with self._send_lock:
            try:
                self._to_engine.send(self._codec.encode(message))
            except zmq.Again:  # nobody reads (the engine process is gone or hangs)
                raise EngineDied(
                    self._dead or f"the engine process took no message for {SEND_TIMEOUT_MS // 1000} s"
                ) from None

    def _start_call(self, call_id: int, message: Any) -> Future:
        """Send ``message`` (a Call or Submit numbered ``call_id``); the future of its reply."""
        self._check_usable()
        future: Future = Future()
        self._calls[call_id] = future
        try:
            self._send(message)
        except BaseException:
            self._calls.pop(call_id, None)
            raise
        if self._dead is not None and self._calls.pop(call_id, None) is not None:  # died meanwhile
            future.set_exception(EngineDied(self._dead))
        return future

    def _call(self, method: str, *args: Any, timeout: float | None = CALL_TIMEOUT_S) -> Any:
        call_id = next(self._call_ids)
        future = self._start_call(call_id, Call(call_id, method, list(args)))
        try:
            return future.result(timeout)
        finally:
            self._calls.pop(call_id, None)

    # -- EngineClient ---------------------------------------------------------------------------------

    def model_info(self) -> ModelInfo:
        return self._info

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.intake.apply_chat_template(messages)

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.intake.detokenize(token_ids, skip_special_tokens)

    def make_request(
        self,
        prompt: str | None = None,
        input_ids: Sequence[int] | None = None,
        params: Any = None,
        adapter: str | None = None,
        request_id: str | None = None,
    ) -> Request:
        info = self._info
        params = check_sampling_params(params, info.vocab_size)
        ids = self.intake.prompt_ids(prompt, input_ids, info.vocab_size)
        check_fits(len(ids), params.max_new_tokens, info.context_len, info.max_total_tokens)
        if adapter is not None and not info.lora_enabled:
            raise UserError(
                f"adapter {adapter!r} requested but LoRA is not enabled; start with --enable-lora or --lora-paths"
            )
        rid = request_id or f"req-{next(self._request_ids)}"
        return Request(request_id=rid, prompt_ids=ids, params=params, adapter=adapter)

    async def stream(self, *, requests: list[Request]) -> AsyncIterator[tuple[int, RequestOutput]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._check_usable()
        self.followers.add(requests, loop, queue)
        items = [NewRequest(r.request_id, list(r.prompt_ids), asdict(r.params), r.adapter) for r in requests]
        call_id = next(self._call_ids)
        try:
            await asyncio.wrap_future(self._start_call(call_id, Submit(call_id, items)))
        except BaseException as exc:
            unfinished = self.followers.drop(requests)
            if not isinstance(exc, LoraserveError):  # cancelled while submitting: they may have been queued
                self._abort_quietly(unfinished)
            raise
        pending = len(requests)
        try:
            while pending:
                i, out = await queue.get()
                pending -= out.finished
                yield i, out
        finally:
            self._abort_quietly(self.followers.drop(requests))

    def _abort_quietly(self, request_ids: list[str]) -> None:
        if request_ids and self._dead is None and not self._stopping:
            self._send(Abort(request_ids))

    def abort(self, request_id: str) -> None:
        self._check_usable()
        self._send(Abort([request_id]))

    def final_output(self, request: Request) -> dict[str, Any]:
        return self.outputs.final(request)

    def loaded_adapters(self) -> list[dict[str, Any]]:
        return self._call("loaded_adapters")

    def unloading_adapters(self) -> list[dict[str, Any]]:
        return self._call("unloading_adapters")

    def is_servable(self, adapter: str) -> bool:
        return self._call("is_servable", adapter, timeout=None)

    def check_adapter_updates(self) -> None:
        self._call("check_adapter_updates")

    def load_adapter(self, adapter: str, source: str, pinned: bool = False, load_inplace: bool = False) -> None:
        self._call("load_adapter", adapter, source, pinned, load_inplace, timeout=None)

    def load_adapter_from_tensors(
        self, adapter: str, config: dict[str, Any], tensors: bytes, pinned: bool = False, load_inplace: bool = False
    ) -> None:
        self._call("load_adapter_from_tensors", adapter, config, bytes(tensors), pinned, load_inplace, timeout=None)

    def unload_adapter(self, adapter: str, timeout: float | None) -> int:
        return self._call("unload_adapter", adapter, timeout, timeout=None)

    def flush_cache(self) -> int:
        return self._call("flush_cache")

    def stats(self) -> EngineStats:
        return self._call("stats")

    def effective_settings(self) -> dict[str, Any]:
        return self._call("effective_settings")

    # -- lifecycle ----------------------------------------------------------------------------------------

    def shutdown(self, timeout: float = 30.0) -> None:
        with self._send_lock:
            self._stopping = True  # refuse new work at once; a second caller waits for the first below
        with self._shutdown_lock:
            if self._closed:
                return
            if self._dead is None and self.process.is_alive():
                try:
                    self._send(Shutdown(timeout))
                    self._stopped.wait(timeout + 10)
                    self.process.join(timeout + 10)
                except EngineDied:
                    pass
            self._kill()
            if threading.current_thread() is not self._receiver:
                self._receiver.join(5)
            self.followers.fail_all("the engine stopped", reason="abort")
            for call_id in list(self._calls):
                future = self._calls.pop(call_id, None)
                if future is not None:
                    future.set_exception(UserError(STOPPING))
            self._close()

    def _kill(self) -> None:
        stop_process(self.process)

    def _close(self) -> None:
        self._closed = True
        self._to_engine.close(linger=0)
        self._from_engine.close(linger=0)
        self._zmq.term()
        shutil.rmtree(self._dir, ignore_errors=True)
