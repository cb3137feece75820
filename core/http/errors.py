"""HTTP errors: the exception the frontends raise, the JSON bodies clients get, and request parsing.

Every client mistake becomes a 4xx with a message that says what to change; only a bug is a 500.
Routes under ``/v1/`` (the OpenAI API) answer in OpenAI's error format ``{"error": {"message",
"type", "param", "code"}}`` with ``code`` a string such as ``model_not_found``; native routes answer
``{"error": {"message", "type", "code"}}`` with the HTTP status as ``code``, as SGLang does.
A ``UserError`` answers its class's ``http_status`` (400, 403, 404, 413, 429); 429 and 503 answers carry
``Retry-After``.
Every message is made encodable and cut to :data:`MAX_MESSAGE_CHARS` before it is rendered, so
echoing client data can never fail the response. :func:`read_json` reads a body in chunks, refusing
one over ``--max-request-body-bytes`` with a 413 before reading the rest, and parses it with the
bounds of ``loraserve.safe_json`` (off the event loop when large); :func:`parse_body` turns it into
a validated pydantic model and pydantic's complaints into one readable message. Imported only by the
server and frontends.
"""

from __future__ import annotations

import json
import logging
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from loraserve import safe_json
from loraserve.errors import QueueFull, UserError

logger = logging.getLogger("loraserve.http.server")

M = TypeVar("M", bound=BaseModel)

# The vLLM-style adapter endpoints live under /v1 but answer in the native format.
NATIVE_UNDER_V1 = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}
RETRY_AFTER_S = 1  # Retry-After of a 429 (queue full) or 503 (shutting down, overloaded)
MAX_MESSAGE_CHARS = 4000  # an error message echoing a huge client value is cut to this
PARSE_IN_THREAD_BYTES = 64 * 1024  # bodies at least this large are parsed off the event loop


class APIError(Exception):
    """An HTTP error with a status and a message that says what to change."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers


class ClientDisconnected(Exception):
    """The client went away before its response was ready; its requests were aborted."""


class StrictModel(BaseModel):
    """A request body: no type coercion ("5" is not an int) and no unknown fields."""

    model_config = ConfigDict(strict=True, extra="forbid")


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/") and path not in NATIVE_UNDER_V1


def safe_text(text: str, most: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` with lone surrogates escaped (so it always encodes as UTF-8), cut to ``most`` characters."""
    if len(text) > most:
        text = f"{text[:most]}... ({len(text) - most} more characters)"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(status: int, message: str, openai: bool, code: str | None = None, param: str | None = None) -> dict:
    message = safe_text(message)
    if openai:
        param = safe_text(param, 200) if param is not None else None
        return {
            "error": {
                "message": message,
                "type": _OPENAI_TYPES.get(status, "invalid_request_error"),
                "param": param,
                "code": code,
            }
        }
    return {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "invalid_request_error"), "code": status}}


def retry_after(status: int, headers: dict | None = None) -> dict | None:
    """``headers`` plus ``Retry-After`` when ``status`` is one a client should retry (429, 503)."""
    if status in (429, 503):
        return {"Retry-After": str(RETRY_AFTER_S), **(headers or {})}
    return headers


def error_response(
    path: str, status: int, message: str, code: str | None = None, param: str | None = None, headers: dict | None = None
) -> JSONResponse:
    headers = retry_after(status, headers)
    return JSONResponse(
        error_body(status, message, is_openai_path(path), code, param), status_code=status, headers=headers
    )


def _describe(exc: BaseException) -> str:
    """``exc``'s type and the start of its text, safe to send (its ``__str__`` may fail or hold anything)."""
    try:
        text = str(exc)
    except Exception:
        text = "its message could not be read"
    return f"{type(exc).__name__}: {safe_text(text, 200)}" if text else type(exc).__name__


def api_error_of(exc: BaseException) -> APIError:
    """The APIError to answer for ``exc`` (also what a stream reports once its headers are sent)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFull):
        return APIError(429, str(exc), code="rate_limit_exceeded")
    if isinstance(exc, UserError):
        return APIError(exc.http_status, str(exc))
    return APIError(500, f"internal error ({_describe(exc)}); this is a bug, please report it")


# -- request bodies ---------------------------------------------------------------------------------


def _too_large(size: str, limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is {size}, more than the limit of {limit} bytes "
        "(--max-request-body-bytes); send a smaller body, or split the request",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, read chunk by chunk; a 413 as soon as Content-Length or the bytes read pass ``limit``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and (len(declared) > 18 or int(declared) > limit):  # 18 digits: never int()'s limit
        shown = declared if len(declared) <= 18 else f"a {len(declared)}-digit number of"
        raise _too_large(f"{shown} bytes (its Content-Length)", limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large("larger than that", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    """Parse a request body with ``safe_json``'s bounds, or raise a 400 that says what is wrong."""
    try:
        return safe_json.loads(body)
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8 text; send a JSON object encoded as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise APIError(
            400,
            f"the request body is not valid JSON ({exc.msg} at line {exc.lineno} column "
            f"{exc.colno}); send a JSON object",
        ) from None
    except safe_json.UnsafeJSON as exc:
        raise APIError(400, str(exc)) from None


async def read_json(request: Request) -> Any:
    """The request body as JSON, or a 413 (too large) or 400 that says what is wrong with it."""
    body = await read_body(request, request.app.state.settings.max_request_body_bytes)
    if not body.strip():
        raise APIError(400, "the request body is empty; send a JSON object with Content-Type: application/json")
    if len(body) >= PARSE_IN_THREAD_BYTES:  # parsing megabytes would stall every other request
        return await run_in_threadpool(parse_json, body)
    return parse_json(body)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validation_message(exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One line per problem: the field, what is wrong, and the value that was sent."""
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err.get("loc", ()) if p != "body")
        where = safe_json.field_path(loc) or "the request body"
        kind = err.get("type", "")
        msg = err.get("msg", "").removeprefix("Value error, ")
        if kind == "extra_forbidden":
            listed = model is not None and len(loc) == 1
            allowed = f"; allowed fields: {', '.join(model.model_fields)}" if listed else ""
            lines.append(f"unknown field {where!r}; remove it{allowed}")
        elif kind == "missing":
            lines.append(f"{where} is required; add it")
        elif kind == "model_type" and not loc:
            lines.append(f"the request body must be a JSON object, got {type(err.get('input')).__name__}")
        elif kind == "value_error":
            lines.append(f"{where}: {msg}" if loc else msg)
        else:
            lines.append(f"{where}: {msg} (got {_shown(err.get('input'))})")
    return "; ".join(lines)


def parse_body(model: type[M], data: Any) -> M:
    """Validate ``data`` (parsed JSON) as ``model``; a 400 listing every problem otherwise."""
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got a JSON {safe_json.json_type(data)}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        loc = exc.errors()[0].get("loc") or ()
        param = str(loc[0]) if loc and isinstance(loc[0], str) else None
        raise APIError(400, validation_message(exc, model), param=param) from None


# -- handlers ----------------------------------------------------------------------------------------


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception to a JSON body; 4xx for the client's mistakes, 500 only for bugs."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request.url.path, exc.status, exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError) -> JSONResponse:
        err = api_error_of(exc)  # the UserError's http_status
        return error_response(request.url.path, err.status, err.message, err.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        lines = []
        for err in exc.errors():
            loc = tuple(p for p in err.get("loc", ()) if p not in ("body", "query", "path"))
            lines.append(f"{safe_json.field_path(loc) or 'the request'}: {err.get('msg', '')}")
        return error_response(request.url.path, 400, "; ".join(lines))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        path, method = request.url.path, request.method
        if exc.status_code == 404:
            message = f"there is no endpoint {method} {path}; see {_endpoint_list(app)}"
        elif exc.status_code == 405:
            # Starlette's Allow names the methods of the first route with this path only (a path may
            # have several, e.g. GET and POST /flush_cache), from a set: list all, sorted
            methods = {m.strip() for m in (exc.headers or {}).get("Allow", "").split(",") if m.strip()}
            for route in app.router.routes:
                if getattr(route, "methods", None) and route.matches(request.scope)[0] is not Match.NONE:
                    methods |= route.methods
            allowed = ", ".join(sorted(methods))
            exc.headers = {**(exc.headers or {}), "Allow": allowed}
            message = f"{path} does not accept {method}; use {allowed or 'another method'}"
        else:
            message = str(exc.detail)
        return error_response(path, exc.status_code, message, headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=499)  # the client left while sending its body: nobody reads this

    app.add_middleware(BugBoundary)  # the first one added is the innermost


class BugBoundary:
    """Answers an unhandled exception (a bug) with a 500 JSON error and keeps the connection open.

    Starlette's own handler for ``Exception`` sends its response and then re-raises, after which
    uvicorn closes the connection, so a client's next request on that keep-alive connection fails.
    An exception after the response started (a stream) cannot be answered: it propagates.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            logger.error("unhandled error on %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            await error_response(scope.get("path", ""), 500, api_error_of(exc).message)(scope, receive, send)


def _endpoint_list(app: FastAPI) -> str:
    paths = sorted({getattr(r, "path", "") for r in app.routes if getattr(r, "include_in_schema", False)})
    return ", ".join(p for p in paths if p)
