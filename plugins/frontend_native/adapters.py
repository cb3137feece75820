"""The adapter routes of the native API: ``POST /load_lora_adapter`` and ``/unload_lora_adapter``.

Both are also served under ``/v1/`` (vLLM's names) and answer SGLang's ``{success, error_message,
loaded_adapters}`` (``loaded_adapters`` maps each name to its source). They change server state, so
they take only ``Content-Type: application/json`` (415 otherwise): a browser sends a cross-site
``text/plain`` or form POST without asking the server first, a JSON one it does not. With
``--disable-lora-runtime-updates`` both answer 403; a load the source policy refuses is a 403 too.
An unload hides the name at once and waits up to ``--lora-unload-timeout`` seconds for the
adapter's in-flight requests; when some still run it answers 202 with ``"pending": true``, and the
adapter's memory is freed when the last of them finishes (``/get_server_info`` lists it under
``unloading_adapters`` until then). The routes use only the engine's
:class:`~loraserve.contract.EngineClient` adapter calls.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from loraserve.contract import EngineClient
from loraserve.errors import UserError
from loraserve.http.errors import APIError, StrictModel, api_error_of, parse_body, read_json, retry_after, safe_text
from loraserve.http.openapi import AdapterAnswer, errors, request_body
from loraserve.lora.policy import MAX_NAME_CHARS, MAX_SOURCE_CHARS, NAME_PATTERN, SOURCE_PATTERN, shown

JSON_TYPE = "application/json"


# the name rule for the OpenAPI document; check_adapter_name enforces it with its own message
NAME_SCHEMA = {"pattern": NAME_PATTERN, "minLength": 1, "maxLength": MAX_NAME_CHARS, "not": {"enum": ["base"]}}


class LoadAdapterBody(StrictModel):
    lora_name: str = Field(description="The name requests use.", json_schema_extra=NAME_SCHEMA)
    lora_path: str = Field(
        description="A PEFT adapter directory (inside --lora-allowed-dirs when set), or a hub id "
        "where the hub is allowed.",
        json_schema_extra={"minLength": 1, "maxLength": MAX_SOURCE_CHARS, "pattern": SOURCE_PATTERN},
    )
    pinned: bool = False


class UnloadAdapterBody(StrictModel):
    lora_name: str = Field(json_schema_extra=NAME_SCHEMA)


def require_json(request: Request) -> None:
    """A 415 unless the request says its body is JSON (a state change no cross-site form can make)."""
    given = request.headers.get("content-type")
    if given is None or given.split(";", 1)[0].strip().lower() != JSON_TYPE:
        what = "no Content-Type" if given is None else f"Content-Type {shown(given)}"
        raise APIError(
            415,
            f"{request.url.path} takes a JSON body, but the request has {what}; send the header "
            f"'Content-Type: {JSON_TYPE}'",
        )


def loaded_adapters(engine: EngineClient) -> dict[str, str]:
    """Name -> source of every loaded adapter, as the adapter routes and /get_server_info answer."""
    return {a["name"]: a["source"] for a in engine.loaded_adapters()}


ANSWERS = {
    "model": AdapterAnswer,
    "description": "The adapters loaded afterwards; on failure success is false and error_message says what to change.",
}
PENDING = {
    "model": AdapterAnswer,
    "description": "Unloaded for new requests; the memory is freed when its in-flight requests finish (pending: true).",
}


def _writable(engine: EngineClient, request: Request) -> None:
    """Raise unless the request may change adapters at all (415, 400, 403), before its body is read."""
    require_json(request)
    engine.check_adapter_updates()


async def _adapter_call(engine: EngineClient, fn: Callable[[], Awaitable[JSONResponse | None]]) -> JSONResponse:
    """Run a load or unload; answer ``{success, error_message, loaded_adapters}``, or ``fn``'s own answer."""
    try:
        answer = await fn()
    except (APIError, UserError) as exc:
        err = api_error_of(exc)
        return JSONResponse(
            {"success": False, "error_message": safe_text(err.message), "loaded_adapters": loaded_adapters(engine)},
            status_code=err.status,
            headers=retry_after(err.status),
        )
    if answer is not None:
        return answer
    return JSONResponse({"success": True, "error_message": None, "loaded_adapters": loaded_adapters(engine)})


def add_adapter_routes(app: FastAPI, engine: EngineClient, settings: Any) -> None:
    gens = app.state.generations

    @app.post(
        "/load_lora_adapter",
        openapi_extra=request_body(app, LoadAdapterBody),
        responses=errors(400, 403, 404, 415, 503, model=AdapterAnswer, ok=ANSWERS),
    )
    @app.post(
        "/v1/load_lora_adapter",
        openapi_extra=request_body(app, LoadAdapterBody),
        responses=errors(400, 403, 404, 415, 503, model=AdapterAnswer, ok=ANSWERS),
    )
    async def load_lora_adapter(request: Request) -> JSONResponse:
        async def load() -> None:
            _writable(engine, request)
            body = parse_body(LoadAdapterBody, await read_json(request))
            gens.check_accepting()
            await run_in_threadpool(engine.load_adapter, body.lora_name, body.lora_path, body.pinned)

        return await _adapter_call(engine, load)

    @app.post(
        "/unload_lora_adapter",
        openapi_extra=request_body(app, UnloadAdapterBody),
        responses={**errors(400, 403, 404, 415, 503, model=AdapterAnswer, ok=ANSWERS), 202: PENDING},
    )
    @app.post(
        "/v1/unload_lora_adapter",
        openapi_extra=request_body(app, UnloadAdapterBody),
        responses={**errors(400, 403, 404, 415, 503, model=AdapterAnswer, ok=ANSWERS), 202: PENDING},
    )
    async def unload_lora_adapter(request: Request) -> JSONResponse:
        async def unload() -> JSONResponse | None:
            _writable(engine, request)
            body = parse_body(UnloadAdapterBody, await read_json(request))
            held = await run_in_threadpool(engine.unload_adapter, body.lora_name, settings.lora_unload_timeout)
            if not held:
                return None
            requests = "1 in-flight request finishes" if held == 1 else f"{held} in-flight requests finish"
            return JSONResponse(
                {
                    "success": True,
                    "pending": True,
                    "error_message": None,
                    "message": f"adapter {body.lora_name!r} is unloaded for new requests; its memory is "
                    f"freed when its {requests} (still running after "
                    f"--lora-unload-timeout {settings.lora_unload_timeout:g} s)",
                    "loaded_adapters": loaded_adapters(engine),
                },
                status_code=202,
            )

        return await _adapter_call(engine, unload)
