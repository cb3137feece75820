"""The HTTP server: builds the FastAPI app from the frontend plugins and serves it with uvicorn.

:func:`create_app` mounts every frontend the given plugin manager registered through
``loraserve_register_frontends`` (the built-in native and OpenAI APIs are two of them), installs
the error handlers, the ``--api-key`` check (every endpoint but ``/health`` needs
``Authorization: Bearer KEY``) and the HTTP metrics. The server and its frontends see the engine
only as an :class:`~loraserve.contract.EngineClient`, so it may live in this process or
another. :func:`serve` builds the engine (by default in a process of its own,
:class:`~loraserve.ipc.client.RemoteEngine`; with ``--engine-in-process`` on a thread here),
listens on ``--host``/``--port``, prints the URL once it accepts connections, and on SIGINT/SIGTERM
shuts down in order: stop accepting, let in-flight requests finish for up to
``--shutdown-grace-period`` seconds, abort the rest (their clients get a 503 error, streams an
error event), stop the engine. An engine process that dies takes the server down: its in-flight
requests fail with a 500 that says so and the command exits with ``ENGINE_DIED_EXIT_CODE``. The
engine itself never imports this module or FastAPI.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from loraserve import __version__
from loraserve.contract import EngineClient
from loraserve.engine.engine import Engine
from loraserve.errors import ConfigError, PluginError
from loraserve.http import openapi
from loraserve.http.errors import error_body, install_error_handlers, is_openai_path
from loraserve.http.metrics import HttpMetricsMiddleware, ServerMetrics
from loraserve.http.serving import Generations
from loraserve.plugin_manager import PluginManager
from loraserve.settings import Settings

logger = logging.getLogger("loraserve.http.server")

OPEN_PATHS = frozenset({"/health"})
#: exit code of a server whose engine process died (as for a dead tensor-parallel worker)
ENGINE_DIED_EXIT_CODE = 70


class ApiKeyMiddleware:
    """Refuses every request but ``OPEN_PATHS`` without ``Authorization: Bearer <api key>`` (401)."""

    def __init__(self, app: Any, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"authorization")
        if given is not None and secrets.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        path = scope["path"]
        message = (
            "this server needs an API key; send the header 'Authorization: Bearer <key>' with the key "
            "given to --api-key"
            if given is None
            else "the API key in the Authorization header is wrong; send 'Authorization: Bearer <key>' with "
            "the key given to --api-key"
        )
        body = error_body(401, message, is_openai_path(path), code="invalid_api_key")
        response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def create_app(engine: EngineClient, settings: Settings, plugins: PluginManager) -> FastAPI:
    """The FastAPI app serving ``engine`` through every frontend ``plugins`` registered, with the
    server's ``settings`` (its bounds, the API key; the frontends read theirs there too).

    The app does not own the engine: whoever built the engine shuts it down (:func:`serve` does).
    """
    app = FastAPI(
        title="loraserve",
        version=__version__,
        description="Multi-LoRA LLM serving: SGLang's native API and the OpenAI API.",
    )
    metrics = ServerMetrics()
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    app.state.draining = False
    app.state.generations = Generations(engine, metrics, app.state)
    install_error_handlers(app)
    openapi.install(app)
    frontends = plugins.frontends
    app.state.frontends = [entry.name for entry in frontends]  # /get_server_info lists them
    if not len(frontends):
        logger.warning(
            "no HTTP frontend plugin is loaded (were frontend_native and frontend_openai disabled?); "
            "the server has no endpoints"
        )
    for entry in frontends:
        try:
            entry.factory(app, engine, settings)
        except Exception as exc:
            raise PluginError(
                f"frontend {entry.name!r} of plugin {entry.plugin!r} failed to add its routes: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)  # outermost: counts the 401s too
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or a ConfigError that says which flag to change."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) on accepted connections only
    # when the listening socket says TCP, and with Nagle on every keep-alive answer written in two
    # pieces (headers, body) waits ~40 ms for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); pass another --port, or a "
            "--host this machine has, or stop the process that uses the port"
        ) from None
    sock.set_inheritable(True)
    return sock


class LoraserveServer(uvicorn.Server):
    """uvicorn's server, plus: print the URL when ready; on shutdown, drain, then stop the engine."""

    def __init__(self, app: FastAPI, engine: EngineClient, settings: Settings, grace_s: float | None = None):
        """``grace_s``: how long in-flight requests may run on after SIGINT/SIGTERM before they are
        aborted (default ``--shutdown-grace-period``)."""
        grace_s = settings.shutdown_grace_period if grace_s is None else grace_s
        config = uvicorn.Config(
            app,
            log_config=None,
            log_level=settings.log_level,
            lifespan="off",
            timeout_graceful_shutdown=int(grace_s) + 5,
        )
        super().__init__(config)
        self.app, self.engine, self.settings, self.grace_s = app, engine, settings, grace_s
        self.url: str | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.started:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}"
        print(
            f"loraserve: serving {self.engine.model_info().name} at {self.url} (OpenAI API: {self.url}/v1); "
            "Ctrl+C to stop",
            flush=True,
        )

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.app.state.draining = True  # new requests get a 503 while in-flight ones finish
        loop = asyncio.get_running_loop()
        stopper = loop.call_later(self.grace_s, lambda: asyncio.ensure_future(self._stop_engine()))
        try:
            await super().shutdown(sockets=sockets)
        finally:
            stopper.cancel()
            await self._stop_engine()

    async def _stop_engine(self) -> None:
        # aborts every unfinished request: each handler answers its client with a 503 error
        await asyncio.to_thread(self.engine.shutdown)


def build_engine(settings: Settings, plugins: PluginManager, on_death: Callable[[str], None]) -> EngineClient:
    """The engine the server serves: in a process of its own (the default; ``on_death`` is told if
    that process exits unasked), or with ``--engine-in-process`` an :class:`Engine` on a thread here."""
    if settings.engine_in_process:
        return Engine(settings, plugins)
    from loraserve.ipc.client import RemoteEngine

    return RemoteEngine(settings, on_death=on_death)


def serve(settings: Settings, plugins: PluginManager) -> int:
    """``loraserve [serve]``: build the engine and serve it until SIGINT/SIGTERM, or until the engine
    process dies (then exit with ``ENGINE_DIED_EXIT_CODE``)."""
    sock = bind_socket(settings.host, settings.port)  # fail fast, before the model loads
    died = threading.Event()
    server: LoraserveServer | None = None

    def on_death(message: str) -> None:
        print(f"loraserve: error: {message}", file=sys.stderr, flush=True)
        died.set()
        if server is not None:
            server.should_exit = True  # in-flight requests have failed already: stop at once

    try:
        engine = build_engine(settings, plugins, on_death)
    except BaseException:
        sock.close()
        raise
    info = engine.effective_settings()
    logger.info(
        "engine built: model=%s device=%s lora backend=%s eviction=%s",
        info["served_model_name"],
        info["device"],
        info["lora_backend"],
        settings.lora_eviction_policy,
    )
    try:
        server = LoraserveServer(create_app(engine, settings, plugins), engine, settings)
        if died.is_set():
            return ENGINE_DIED_EXIT_CODE
        server.run(sockets=[sock])
    finally:
        engine.shutdown()
        sock.close()
    if died.is_set():
        return ENGINE_DIED_EXIT_CODE
    return 0 if server.started else 1


class ServerThread:
    """``engine`` served by uvicorn in a daemon thread of this process, on ``host``:``port`` (0: a free
    port), with the frontends of ``plugins`` and the server ``settings`` (for an :class:`Engine`:
    ``engine.settings``, ``engine.plugins``), for tests, benchmarks and programs that embed
    loraserve; ``stop()`` also stops the engine. ``grace_s`` None takes --shutdown-grace-period."""

    def __init__(
        self,
        engine: EngineClient,
        settings: Settings,
        plugins: PluginManager,
        host: str = "127.0.0.1",
        port: int = 0,
        grace_s: float | None = None,
        start_timeout_s: float = 30.0,
    ):
        self.engine = engine
        self.app = create_app(engine, settings, plugins)
        self.server = LoraserveServer(self.app, engine, settings, grace_s=grace_s)
        sock = bind_socket(host, port)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start within {start_timeout_s:.0f} s")
            time.sleep(0.02)
        self.url = self.server.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.shutdown()
