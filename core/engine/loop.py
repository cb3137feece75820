"""The engine thread: one thread that runs the calls other threads post, between steps, and steps
while there is work.

Other threads (the HTTP server's event loop, a test) never touch the scheduler or the LoRA pools
directly: they post a call (:meth:`EngineLoop.post`) or run one and wait for its result
(:meth:`EngineLoop.call`). The :class:`~loraserve.engine.Engine` says what a step is, when there is
work, and what to do with the requests left when it stops or when scheduling fails.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from loraserve.errors import UserError

logger = logging.getLogger("loraserve.engine.engine")


class EngineLoop:
    """The thread that runs ``step`` while ``has_work()``, and the posted calls between steps. On
    stop it runs ``on_stop`` (finish what is left) and exits; when ``step`` raises it calls
    ``on_step_error(exc)`` (inside the ``except``, so it may log the traceback) and goes on. The
    thread starts with the first posted call, or :meth:`start`."""

    def __init__(
        self,
        step: Callable[[], None],
        has_work: Callable[[], bool],
        on_stop: Callable[[], None],
        on_step_error: Callable[[Exception], None],
        name: str = "loraserve-engine",
    ):
        self._step, self._has_work, self._on_stop, self._on_step_error = step, has_work, on_stop, on_step_error
        self._name = name
        self._cond = threading.Condition()
        self._inbox: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        with self._cond:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def stop(self, timeout: float) -> None:
        """Refuse new calls, finish the posted ones, run ``on_stop`` and wait up to ``timeout``
        seconds for the thread to end."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def post(self, fn: Callable[[], None]) -> None:
        """Queue ``fn`` for the engine thread (starting it); UserError once stopping."""
        with self._cond:
            if self._stopping:
                raise UserError("the engine is shutting down; no new requests are accepted")
            self._inbox.append(fn)
            self._cond.notify()
        self.start()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread between steps and return its result (or raise its
        exception). Runs inline when called from the engine thread or before the thread started."""
        if self._thread is None or threading.current_thread() is self._thread:
            return fn()
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self.post(run)
        return future.result()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._inbox and not self._has_work() and not self._stopping:
                    self._cond.wait()
                inbox, self._inbox = self._inbox, []
                stopping = self._stopping
            for fn in inbox:
                try:
                    fn()
                except Exception:  # the loop must survive anything a queued call does
                    logger.exception("engine inbox call failed")
            if stopping:
                self._on_stop()
                return
            if self._has_work():
                try:
                    self._step()
                except Exception as exc:  # scheduling itself failed: fail everything rather than spin
                    self._on_step_error(exc)
