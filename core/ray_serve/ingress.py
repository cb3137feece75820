"""The fleet's HTTP entry point: reads the adapters a request names and forwards it to a replica with
Ray Serve's multiplexed model id (see :mod:`loraserve.ray_serve`).

No ``from __future__ import annotations`` here: Ray Serve's ingress hands the methods to FastAPI, which
must see ``Request`` as a class, not as a string, to inject it.
"""

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError

from loraserve.errors import UserError
from loraserve.lora.composition import is_composition, parse_spelling
from loraserve.lora.policy import check_adapter_name, check_source_text
from loraserve.ray_serve.catalog import catalog_handle
from loraserve.ray_serve.replica import HEALTH_PERIOD_S

#: the routes whose body names the adapters of a generation (forwarded with a multiplexed model id)
GENERATION_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")
#: errors of a replica that died or was lost while it served a request
REPLICA_LOST = (RayActorError, ray.exceptions.ActorUnavailableError)


def request_adapters(path: str, body: bytes, base_name: str) -> list[str]:
    """The adapter names a generation request's body uses, in order, without repeats; [] for the
    base model, a body that is not JSON, or a route that names none (the replica answers those)."""
    if path not in GENERATION_ROUTES:
        return []
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return []
    if not isinstance(data, dict):
        return []
    names: list[str] = []
    if path == "/generate":
        paths = data.get("lora_path")
        entries = paths if isinstance(paths, list) else [paths]
        for entry in entries:
            if isinstance(entry, str):
                names.append(entry)
            elif isinstance(entry, list):  # a weighted composition of one input
                names.extend(c["name"] for c in entry if isinstance(c, dict) and isinstance(c.get("name"), str))
            elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
                names.append(entry["name"])
    else:
        model = data.get("model")
        if isinstance(model, str) and model != base_name:
            prefix, colon, rest = model.partition(":")
            adapter = rest if colon and prefix == base_name else model
            if is_composition(adapter):
                try:
                    names.extend(name for name, _ in parse_spelling(adapter))
                except UserError:
                    return []  # malformed: the replica answers 400
            elif adapter:
                names.append(adapter)
    return [n for n in dict.fromkeys(names) if _valid_name(n)][:8]


def _valid_name(name: str) -> bool:
    """Whether ``name`` may be a multiplexed model id: a valid adapter name (others are left to the
    replica, which answers them with its 4xx)."""
    try:
        check_adapter_name(name)
    except UserError:
        return False
    return True


ingress_app = FastAPI(title="loraserve on Ray Serve")


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def fleet_metrics(reports: dict[str, dict]) -> str:
    """Prometheus text of the replicas' last reports: per replica, and summed for the fleet."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class Fleet:
        def collect(self):
            replicas = GaugeMetricFamily("loraserve_fleet_replicas", "Replicas that reported statistics.")
            replicas.add_metric([], len(reports))
            yield replicas
            requests = CounterMetricFamily(
                "loraserve_replica_requests",
                "Requests a replica served, by adapter ('' for the base model).",
                labels=["replica", "adapter"],
            )
            loads = CounterMetricFamily(
                "loraserve_replica_adapter_loads", "Adapter loads on a replica.", labels=["replica"]
            )
            unloads = CounterMetricFamily(
                "loraserve_replica_adapter_unloads", "Adapter unloads on a replica.", labels=["replica"]
            )
            resident = GaugeMetricFamily(
                "loraserve_replica_resident_adapters", "Adapters a replica holds now.", labels=["replica"]
            )
            totals: Counter[str] = Counter()
            for replica, report in sorted(reports.items()):
                for adapter, n in sorted(report.get("requests", {}).items()):
                    requests.add_metric([replica, adapter], n)
                    totals[adapter] += n
                loads.add_metric([replica], report.get("adapter_loads", 0))
                unloads.add_metric([replica], report.get("adapter_unloads", 0))
                resident.add_metric([replica], len(report.get("adapters", [])))
            yield from (requests, loads, unloads, resident)
            fleet = CounterMetricFamily(
                "loraserve_fleet_requests", "Requests the fleet served, by adapter.", labels=["adapter"]
            )
            for adapter, n in sorted(totals.items()):
                fleet.add_metric([adapter], n)
            yield fleet

    registry = CollectorRegistry()
    registry.register(Fleet())
    return generate_latest(registry).decode()


@serve.deployment(name="LoraserveIngress", max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
@serve.ingress(ingress_app)
class LoraserveIngress:
    def __init__(self, replica: Any, max_body_bytes: int):
        self.replica, self.max_body_bytes = replica, max_body_bytes
        self.catalog = catalog_handle()
        self._base_name: str | None = None

    async def base_name(self) -> str:
        """The served model's name, as the replicas' /v1/models give it (asked once)."""
        if self._base_name is None:
            status, answer = await self._collect("GET", "/v1/models", b"", [], b"", [])
            if status != 200:
                raise RuntimeError(f"a replica answered /v1/models with {status}: {answer[:200]!r}")
            self._base_name = json.loads(answer)["data"][0]["id"]
        return self._base_name

    async def _body(self, request: Request) -> bytes | None:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    @ingress_app.get("/v1/models")
    async def models(self) -> JSONResponse:
        adapters = await self.catalog.adapters.remote()
        reports = await self.catalog.replica_reports.remote()
        holders: dict[str, list[str]] = {}
        for replica, report in sorted(reports.items()):
            for name in report.get("adapters", []):
                holders.setdefault(name, []).append(replica)
        now = int(time.time())
        base = await self.base_name()
        data = [{"id": base, "object": "model", "created": now, "owned_by": "loraserve", "parent": None}]
        for name, (source, version) in sorted(adapters.items()):
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": now,
                    "owned_by": "loraserve",
                    "parent": base,
                    "root": source,
                    "version": version,
                    "replicas": holders.get(name, []),
                }
            )
        return JSONResponse({"object": "list", "data": data})

    @ingress_app.get("/metrics")
    async def metrics(self) -> Response:
        return Response(fleet_metrics(await self.catalog.replica_reports.remote()), media_type="text/plain")

    @ingress_app.post("/load_lora_adapter")
    @ingress_app.post("/v1/load_lora_adapter")
    async def load_adapter(self, request: Request) -> JSONResponse:
        body = await self._body(request)
        if body is None:
            return _error(413, f"the request body is larger than {self.max_body_bytes} bytes")
        try:
            data = json.loads(body)
            name, source = data["lora_name"], data["lora_path"]
        except (ValueError, KeyError, TypeError, RecursionError):
            return _error(400, 'send a JSON object {"lora_name": NAME, "lora_path": SOURCE}')
        try:  # the checks a single server makes, before anything reaches the catalog
            check_adapter_name(name)
            check_source_text(source)
        except UserError as exc:
            return _error(400, str(exc))
        previous = await self.catalog.lookup.remote(name)
        await self.catalog.register.remote(name, source)
        # one replica loads it now, so a bad source is refused here and not at the first request
        try:
            status, answer = await self.replica.options(multiplexed_model_id=name).ensure.remote([name])
        except REPLICA_LOST as exc:
            status, answer = 503, f"the replica loading it stopped ({type(exc).__name__}); retry"
        if status >= 400:
            if previous is None:
                await self.catalog.unregister.remote(name)
            else:
                await self.catalog.register.remote(name, previous[0])
            return JSONResponse(
                {"success": False, "error_message": answer, "loaded_adapters": await self._loaded()},
                status_code=status,
            )
        return JSONResponse({"success": True, "error_message": None, "loaded_adapters": await self._loaded()})

    @ingress_app.post("/unload_lora_adapter")
    @ingress_app.post("/v1/unload_lora_adapter")
    async def unload_adapter(self, request: Request) -> JSONResponse:
        body = await self._body(request)
        if body is None:
            return _error(413, f"the request body is larger than {self.max_body_bytes} bytes")
        try:
            name = check_adapter_name(json.loads(body)["lora_name"])
        except (ValueError, KeyError, TypeError, RecursionError):
            return _error(400, 'send a JSON object {"lora_name": NAME}')
        except UserError as exc:
            return _error(400, str(exc))
        if not await self.catalog.unregister.remote(name):
            return JSONResponse(
                {
                    "success": False,
                    "error_message": f"adapter {name!r} is not loaded in this fleet",
                    "loaded_adapters": await self._loaded(),
                },
                status_code=404,
            )
        return JSONResponse({"success": True, "error_message": None, "loaded_adapters": await self._loaded()})

    @ingress_app.get("/flush_cache")
    @ingress_app.post("/flush_cache")
    async def flush_cache(self) -> JSONResponse:
        """Every replica empties its prefix cache (at its next health check, within about a second);
        answers once the replicas that report have done it, or after 10 s with those still pending."""
        wanted = await self.catalog.request_flush.remote()
        deadline = time.monotonic() + 10
        while True:
            reports = await self.catalog.replica_reports.remote()
            live = {rid: r for rid, r in reports.items() if time.time() - r["reported_at"] < 5 * HEALTH_PERIOD_S}
            pending = sorted(rid for rid, r in live.items() if (r.get("flushed") or 0) < wanted)
            if not pending or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        done = len(live) - len(pending)
        message = f"prefix cache flushed on {done} of {len(live)} replica(s)"
        return JSONResponse({"message": message, "flushed_replicas": done, "pending_replicas": pending})

    async def _loaded(self) -> dict[str, str]:
        return {name: source for name, (source, _) in (await self.catalog.adapters.remote()).items()}

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    async def forward(self, path: str, request: Request) -> Response:
        body = await self._body(request)
        if body is None:
            return _error(413, f"the request body is larger than {self.max_body_bytes} bytes")
        path = "/" + path
        adapters = request_adapters(path, body, await self.base_name()) if path in GENERATION_ROUTES else []
        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in (b"host", b"content-length")]
        stream = self._stream(request.method, path, request.url.query.encode(), headers, body, adapters)
        try:
            first = await anext(stream)
        except REPLICA_LOST as exc:
            return _error(503, f"the replica serving this request stopped ({type(exc).__name__}); retry", "unavailable")
        except StopAsyncIteration:
            return _error(502, "the replica closed the request without an answer", "unavailable")
        media = dict(first["headers"]).get(b"content-type", b"application/octet-stream").decode("latin-1")

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for message in stream:
                    yield message["body"]
            except REPLICA_LOST:
                error = {"error": {"message": "the replica serving this stream stopped; retry", "code": 503}}
                yield f"data: {json.dumps(error)}\n\n".encode()

        passed = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in first["headers"] if k.lower() != b"content-length"
        ]
        return StreamingResponse(rest(), status_code=first["status"], headers=dict(passed), media_type=media)

    async def _stream(self, method, path, query, headers, body, adapters) -> AsyncIterator[dict]:
        handle = self.replica.options(stream=True, multiplexed_model_id=adapters[0] if adapters else "")
        async for message in handle.handle.remote(method, path, query, headers, body, adapters):
            yield message

    async def _collect(self, method, path, query, headers, body, adapters) -> tuple[int, bytes]:
        status, chunks = 503, []
        try:
            async for message in self._stream(method, path, query, headers, body, adapters):
                if "status" in message:
                    status = message["status"]
                else:
                    chunks.append(message["body"])
        except REPLICA_LOST as exc:
            return 503, json.dumps({"error": {"message": f"the replica stopped ({type(exc).__name__})"}}).encode()
        return status, b"".join(chunks)
