"""HTTP errors: the exception the frontends raise, the JSON bodies clients get, and request parsing.

Every client mistake becomes a 4xx with a message that says what to change; only a bug is a 500.
Routes under ``/v1/`` (the OpenAI API) answer in OpenAI's error format ``{"error": {"message",
"type", "param", "code"}}`` with ``code`` a string such as ``model_not_found``; native routes answer
``{"error": {"message", "type", "code"}}`` with the HTTP status as ``code``, as SGLang does.
:func:`read_json` and :func:`parse_body` turn a request body into a validated pydantic model and
turn pydantic's complaints into one readable message. Imported only by the server and frontends.
"""

from __future__ import annotations

import json
import logging
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraserve.errors import UserError

logger = logging.getLogger("loraserve.server")

M = TypeVar("M", bound=BaseModel)

# The vLLM-style adapter endpoints live under /v1 but answer in the native format.
NATIVE_UNDER_V1 = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                 500: "internal_server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An HTTP error with a status and a message that says what to change."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


class ClientDisconnected(Exception):
    """The client went away before its response was ready; its requests were aborted."""


class StrictModel(BaseModel):
    """A request body: no type coercion ("5" is not an int) and no unknown fields."""

    model_config = ConfigDict(strict=True, extra="forbid")


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/") and path not in NATIVE_UNDER_V1


def error_body(status: int, message: str, openai: bool, code: str | None = None, param: str | None = None) -> dict:
    if openai:
        return {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "invalid_request_error"),
                          "param": param, "code": code}}
    return {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "invalid_request_error"), "code": status}}


def error_response(path: str, status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, is_openai_path(path), code, param), status_code=status,
                        headers=headers)


def api_error_of(exc: BaseException) -> APIError:
    """The APIError a stream reports for ``exc`` once its headers are already sent."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, UserError):
        return APIError(400, str(exc))
    return APIError(500, f"internal error ({type(exc).__name__}: {exc}); this is a bug, please report it")


# -- request bodies ---------------------------------------------------------------------------------


async def read_json(request: Request) -> Any:
    """The request body as JSON, or a 400 that says what is wrong with it."""
    body = await request.body()
    if not body.strip():
        raise APIError(400, "the request body is empty; send a JSON object with Content-Type: application/json")
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8 text; send a JSON object encoded as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc.msg} at line {exc.lineno} column "
                            f"{exc.colno}); send a JSON object") from None


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validation_message(exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One line per problem: the field, what is wrong, and the value that was sent."""
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err.get("loc", ()) if p != "body")
        where = _where(loc) or "the request body"
        kind = err.get("type", "")
        msg = err.get("msg", "").removeprefix("Value error, ")
        if kind == "extra_forbidden":
            allowed = f"; allowed fields: {', '.join(model.model_fields)}" if model is not None and len(loc) == 1 else ""
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
        raise APIError(400, f"the request body must be a JSON object, got a JSON {type(data).__name__}")
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
        return error_response(request.url.path, exc.status, exc.message, exc.code, exc.param)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError) -> JSONResponse:
        return error_response(request.url.path, 400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        lines = []
        for err in exc.errors():
            loc = tuple(p for p in err.get("loc", ()) if p not in ("body", "query", "path"))
            lines.append(f"{_where(loc) or 'the request'}: {err.get('msg', '')}")
        return error_response(request.url.path, 400, "; ".join(lines))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        path, method = request.url.path, request.method
        if exc.status_code == 404:
            message = f"there is no endpoint {method} {path}; see {_endpoint_list(app)}"
        elif exc.status_code == 405:
            allowed = exc.headers.get("Allow", "") if exc.headers else ""
            message = f"{path} does not accept {method}; use {allowed or 'another method'}"
        else:
            message = str(exc.detail)
        return error_response(path, exc.status_code, message, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(request.url.path, 500, api_error_of(exc).message)


def _endpoint_list(app: FastAPI) -> str:
    paths = sorted({getattr(r, "path", "") for r in app.routes if getattr(r, "include_in_schema", False)})
    return ", ".join(p for p in paths if p)
