"""A replica: an in-process engine and loraserve's app, with adapters as Ray Serve multiplexed models
(see :mod:`loraserve.ray_serve`)."""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from loraserve.errors import LoraserveError, NotFound, UserError
from loraserve.ray_serve.catalog import catalog_handle
from loraserve.settings import Settings

HEALTH_PERIOD_S = 1.0


class _Resident:
    """One adapter Ray's multiplexing holds on a replica; unloaded from the engine when evicted."""

    def __init__(self, replica: Any, name: str, version: int | None):
        self.replica, self.name, self.version = replica, name, version
        self._released = False

    def __del__(self) -> None:  # Ray calls it in an executor on LRU eviction
        if self._released:
            return
        self._released = True
        self.replica.drop(self.name, self.version)


class ReplicaBase:
    """A replica's engine and app; :func:`replica_deployment` adds the multiplexed loader."""

    def __init__(self, settings_data: dict[str, Any]):
        from loraserve.engine.engine import Engine, default_plugins
        from loraserve.http.server import create_app

        settings = Settings.model_validate(settings_data)
        plugins = default_plugins(settings)
        self.engine = Engine(settings, plugins)
        self.app = create_app(self.engine, settings, plugins)
        self.catalog = catalog_handle()
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (tests)
            self.replica_id = f"local-{os.getpid()}"
        # adapter -> catalog version loaded here (--lora-paths: loaded at start, version 1)
        self.loaded: dict[str, int | None] = {spec.lora_name: 1 for spec in settings.lora_paths or []}
        self.requests: Counter[str] = Counter()  # adapter ("" for the base model) -> requests
        self.loads = 0
        self.unloads = 0
        # fleet-wide /flush_cache requests handled (None until the first health check: those asked for
        # before it need nothing, this replica's cache was empty when they came)
        self.flushed: int | None = None

    # adapters -------------------------------------------------------------------------------------

    async def _load(self, name: str) -> _Resident:
        entry = await self.catalog.lookup.remote(name)
        if entry is None:
            if await asyncio.to_thread(self.engine.is_servable, name):
                return _Resident(self, name, None)  # a resolver of this replica's engine knows it
            raise NotFound(f"adapter {name!r} is not loaded in this fleet; POST /load_lora_adapter first")
        source, version = entry
        if self.loaded.get(name) == version:
            return _Resident(self, name, version)
        inplace = name in self.loaded
        await asyncio.to_thread(self.engine.load_adapter, name, source, False, inplace)
        self.loaded[name] = version
        self.loads += 1
        return _Resident(self, name, version)

    def drop(self, name: str, version: int | None) -> None:
        """Unload ``name`` from the engine if the version loaded here is ``version`` (blocks until
        the requests using it finished)."""
        if name in self.loaded and self.loaded[name] == version:
            del self.loaded[name]
            try:
                self.engine.unload_adapter(name, None)
                self.unloads += 1
            except LoraserveError:
                pass  # already gone

    async def _current(self, name: str, resident: _Resident) -> None:
        """Bring ``name`` here in line with the catalog: unloaded there -> unloaded here; loaded
        again with another version -> loaded again here."""
        if resident.version is None:
            return
        entry = await self.catalog.lookup.remote(name)
        if entry is None:
            await asyncio.to_thread(self.drop, name, self.loaded.get(name))
        elif self.loaded.get(name) != entry[1]:
            resident.version = (await self._load(name)).version

    async def check_health(self) -> None:
        """Ray Serve calls this every HEALTH_PERIOD_S: drop adapters the catalog no longer has, flush
        the prefix cache when the fleet was asked to, report this replica's statistics."""
        known, flushes = await self.catalog.state.remote()
        for name, version in list(self.loaded.items()):
            if name not in known or known[name][1] != version:
                await asyncio.to_thread(self.drop, name, version)
        if self.flushed is not None and flushes > self.flushed:
            await asyncio.to_thread(self.engine.flush_cache)
        self.flushed = flushes
        self.catalog.report.remote(self.replica_id, self.stats())

    def stats(self) -> dict:
        return {
            "pid": os.getpid(),
            "adapters": sorted(self.loaded),
            "engine_adapters": sorted(a["name"] for a in self.engine.loaded_adapters()),
            "requests": dict(self.requests),
            "adapter_loads": self.loads,
            "adapter_unloads": self.unloads,
            "flushed": self.flushed,
        }

    # requests -------------------------------------------------------------------------------------

    async def ensure(self, adapters: list[str]) -> tuple[int, str]:
        """Load ``adapters`` here (the multiplexed one through Ray's cache); ``(200, "")``, or the
        error's HTTP status and message. Not counted as a request."""
        try:
            for name in adapters:
                resident = await self.get_adapter(name)
                await self._current(name, resident)
        except UserError as exc:
            return exc.http_status, str(exc)
        return 200, ""

    async def handle(
        self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes, adapters: list[str]
    ) -> AsyncIterator[dict]:
        """Serve one HTTP request through the app; yields ``{"status", "headers"}`` then ``{"body"}``
        chunks. Loads ``adapters`` first (the multiplexed one through Ray's cache)."""
        status, message = await self.ensure(adapters)
        if status != 200:
            yield {"status": status, "headers": [(b"content-type", b"application/json")]}
            yield {"body": json.dumps({"error": {"message": message, "code": status}}).encode()}
            return
        for name in adapters or [""]:
            self.requests[name] += 1
        async for message in self._asgi(method, path, query, headers, body):
            yield message

    async def _asgi(
        self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> AsyncIterator[dict]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query,
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 0),
            "server": ("127.0.0.1", 0),
        }
        queue: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            await queue.put(message)

        task = asyncio.create_task(self.app(scope, receive, send))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (message := await queue.get()) is not None:
                if message["type"] == "http.response.start":
                    yield {"status": message["status"], "headers": list(message.get("headers", []))}
                elif message["type"] == "http.response.body" and message.get("body"):
                    yield {"body": bytes(message["body"])}
            task.result()
        finally:
            gone.set()  # the client left (the generator was closed): the app aborts the request
            if not task.done():
                await asyncio.wait_for(task, 30)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def replica_deployment(max_adapters: int, num_replicas: int, actor_options: dict[str, Any]):
    """The replica deployment, with ``@serve.multiplexed(max_num_models_per_replica=max_adapters)``."""

    class LoraserveReplica(ReplicaBase):
        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def get_adapter(self, name: str) -> _Resident:
            return await self._load(name)

    return serve.deployment(
        LoraserveReplica,
        name="LoraserveReplica",
        num_replicas=num_replicas,
        ray_actor_options=actor_options,
        health_check_period_s=HEALTH_PERIOD_S,
        health_check_timeout_s=30,
        max_ongoing_requests=1024,
    )
