"""The adapter routes of the native API: ``POST /load_lora_adapter``, ``/load_lora_adapter_from_tensors``
and ``/unload_lora_adapter``.

Load and unload are also served under ``/v1/`` (vLLM's names); all answer SGLang's ``{success,
error_message, loaded_adapters}`` (``loaded_adapters`` maps each name to its source), a successful
load also ``adapter``: the loaded adapter's ``version`` and ``identity``. ``/load_lora_adapter_from_tensors``
takes the adapter as data, SGLang's shape with the weights as bytes rather than a pickle: ``config_dict``
(the content of ``adapter_config.json``) and ``tensors`` (the base64 of ``adapter_model.safetensors``),
with an optional ``checksum`` (``"sha256:<hex>"`` of the decoded bytes; a mismatch is a 400 and loads
nothing); the body is bounded by ``--max-request-body-bytes`` (413). ``load_inplace: true`` (vLLM's
field, on both load routes) replaces a loaded name's weights in one step: running requests finish on
the old version, later ones get the new one; without it a loaded name is a 409. They change server state, so
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

import base64
import binascii
import hashlib
import hmac
import re
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
CHECKSUM_PATTERN = "^sha256:[0-9a-fA-F]{64}$"
BASE64_PATTERN = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


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
    load_inplace: bool = Field(
        False, description="Replace the weights of a loaded adapter of this name (else a loaded name is a 409)."
    )


class LoadTensorsBody(StrictModel):
    lora_name: str = Field(description="The name requests use.", json_schema_extra=NAME_SCHEMA)
    config_dict: dict[str, Any] = Field(description="The content of the adapter's adapter_config.json.")
    tensors: str = Field(
        description="The bytes of the adapter's adapter_model.safetensors, base64-encoded (standard alphabet).",
        json_schema_extra={"minLength": 4, "pattern": BASE64_PATTERN, "contentEncoding": "base64"},
    )
    checksum: str | None = Field(
        None,
        description="sha256:<64 hex digits> of the decoded tensors; a mismatch loads nothing (400).",
        json_schema_extra={"pattern": CHECKSUM_PATTERN},
    )
    pinned: bool = False
    load_inplace: bool = Field(
        False, description="Replace the weights of a loaded adapter of this name (else a loaded name is a 409)."
    )


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


def decode_tensors(body: LoadTensorsBody) -> bytes:
    """The safetensors bytes of ``body``, checked against its checksum; a 400 that says what is wrong."""
    try:
        data = base64.b64decode(body.tensors, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(
            400, "tensors is not valid base64; send the bytes of adapter_model.safetensors base64-encoded"
        ) from None
    if not data:
        raise APIError(400, "tensors is empty; send the bytes of adapter_model.safetensors base64-encoded")
    if body.checksum is not None:
        if re.fullmatch(CHECKSUM_PATTERN, body.checksum) is None:
            raise APIError(400, f"checksum {shown(body.checksum)} is not 'sha256:' followed by 64 hex digits")
        got = hashlib.sha256(data).hexdigest()
        want = body.checksum.split(":", 1)[1].lower()
        if not hmac.compare_digest(got, want):
            raise APIError(
                400,
                f"checksum mismatch: the decoded tensors ({len(data)} bytes) have sha256:{got}, the body says "
                f"{body.checksum}; nothing was loaded. Send the tensors again, or the checksum of what you send",
            )
    return data


def _loaded(engine: EngineClient, name: str) -> JSONResponse:
    """The answer of a successful load: the adapters, and the loaded one's version and identity."""
    adapters = engine.loaded_adapters()
    entry = next((a for a in adapters if a["name"] == name), None)
    return JSONResponse(
        {
            "success": True,
            "error_message": None,
            "loaded_adapters": {a["name"]: a["source"] for a in adapters},
            "adapter": entry,
        }
    )


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


def add_tensors_route(app: FastAPI, engine: EngineClient) -> None:
    """``POST /load_lora_adapter_from_tensors``: an adapter's config and safetensors bytes in the body."""
    gens = app.state.generations

    @app.post(
        "/load_lora_adapter_from_tensors",
        openapi_extra=request_body(app, LoadTensorsBody),
        responses=errors(400, 403, 409, 413, 415, 503, model=AdapterAnswer, ok=ANSWERS),
    )
    async def load_lora_adapter_from_tensors(request: Request) -> JSONResponse:
        async def load() -> JSONResponse:
            _writable(engine, request)
            body = parse_body(LoadTensorsBody, await read_json(request))
            gens.check_accepting()
            data = await run_in_threadpool(decode_tensors, body)  # megabytes: off the event loop
            await run_in_threadpool(
                engine.load_adapter_from_tensors, body.lora_name, body.config_dict, data, body.pinned, body.load_inplace
            )
            return _loaded(engine, body.lora_name)

        return await _adapter_call(engine, load)


def add_adapter_routes(app: FastAPI, engine: EngineClient, settings: Any) -> None:
    gens = app.state.generations

    @app.post(
        "/load_lora_adapter",
        openapi_extra=request_body(app, LoadAdapterBody),
        responses=errors(400, 403, 404, 409, 415, 503, model=AdapterAnswer, ok=ANSWERS),
    )
    @app.post(
        "/v1/load_lora_adapter",
        openapi_extra=request_body(app, LoadAdapterBody),
        responses=errors(400, 403, 404, 409, 415, 503, model=AdapterAnswer, ok=ANSWERS),
    )
    async def load_lora_adapter(request: Request) -> JSONResponse:
        async def load() -> JSONResponse:
            _writable(engine, request)
            body = parse_body(LoadAdapterBody, await read_json(request))
            gens.check_accepting()
            await run_in_threadpool(engine.load_adapter, body.lora_name, body.lora_path, body.pinned, body.load_inplace)
            return _loaded(engine, body.lora_name)

        return await _adapter_call(engine, load)

    add_tensors_route(app, engine)

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
