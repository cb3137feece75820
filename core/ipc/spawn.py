"""Starting the engine process (multiprocessing's ``spawn`` context) and waiting until it has built
the engine.

Building an engine may take minutes (a download, the one-time conversion of a GGUF model, CUDA-graph
capture), so :func:`wait_ready` waits up to ``START_TIMEOUT_S`` and logs every ``START_PROGRESS_S``
that it still waits. The engine's start-up errors come back as the same loraserve errors (a
ConfigError stays a ConfigError, so the command prints the same message and exits with the same
code as with ``--engine-in-process``); a bug comes back as a LoraserveError naming it, its
traceback logged by the engine process.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time

import zmq

from loraserve.contract import ModelInfo
from loraserve.errors import LoraserveError
from loraserve.ipc.engine_process import engine_main
from loraserve.ipc.messages import Codec, Ready, StartFailed, loraserve_error
from loraserve.settings import Settings

logger = logging.getLogger("loraserve.ipc.client")

START_TIMEOUT_S = 3600.0  # building the engine: downloads, conversion, CUDA-graph capture
START_PROGRESS_S = 30.0  # how often the wait for it is logged


class EngineDied(LoraserveError):
    """The engine process exited (or never got ready) while the server needed it."""


def start_engine_process(settings: Settings, to_engine: str, from_engine: str) -> mp.process.BaseProcess:
    """The engine process of ``settings``, started; it talks to the front at those ZeroMQ addresses."""
    # not a daemon: the engine process starts tensor-parallel workers of its own
    process = mp.get_context("spawn").Process(
        target=engine_main, args=(settings.model_dump(), to_engine, from_engine), name="loraserve-engine"
    )
    process.start()
    logger.info("started the engine process (pid %d); waiting for it to build the engine", process.pid)
    return process


def wait_ready(process: mp.process.BaseProcess, socket: zmq.Socket, codec: Codec, timeout_s: float) -> ModelInfo:
    """The model of the engine ``process`` once it says :class:`Ready` on ``socket``; raises its
    start-up error, or EngineDied when it exits first or takes longer than ``timeout_s``."""
    started = shown = time.monotonic()
    while True:
        if socket.poll(1000):
            for message in codec.from_engine.decode(socket.recv()):
                if isinstance(message, Ready):
                    logger.info("the engine process is ready after %.1f s", time.monotonic() - started)
                    return ModelInfo(**message.model_info)
                if isinstance(message, StartFailed):
                    process.join(30)
                    error = message.error
                    raise loraserve_error(error) or LoraserveError(
                        f"the engine process failed to start: {error.kind}: {error.message} (its traceback is above)"
                    )
            continue
        if not process.is_alive():
            raise EngineDied(f"the engine process exited with code {process.exitcode} while starting; its log is above")
        now = time.monotonic()
        if now - started > timeout_s:
            raise EngineDied(f"the engine process did not get ready within {timeout_s:.0f} s; the server stops")
        if now - shown >= START_PROGRESS_S:
            shown = now
            logger.info("still waiting for the engine process to build the engine (%.0f s)", now - started)


def stop_process(process: mp.process.BaseProcess) -> None:
    """Kill ``process`` unless it has exited already, and reap it."""
    if process.is_alive():
        process.kill()
        process.join(10)
