"""The served OpenAPI document: request bodies and error responses of every route.

The routes read their bodies themselves (:func:`loraserve.http.errors.read_json`, bounded and safe
JSON, then :func:`~loraserve.http.errors.parse_body`), so FastAPI cannot see them; each route states
its body with :func:`request_body` (``openapi_extra``) and its error answers with :func:`errors`
(``responses``). The body models are the same pydantic models the route validates with, so the
document cannot drift from what is accepted; :func:`install` adds their schemas to the document's
components. With this document ``schemathesis run http://HOST:PORT/openapi.json`` needs no
hand-made spec.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict

REF = "#/components/schemas/{model}"
JSON = "application/json"
ERROR_TEXT = {
    400: "The request is malformed; the message says what to change.",
    401: "The API key is missing or wrong (--api-key).",
    403: "The server's settings forbid this; the message names the flag.",
    404: "The adapter, model or endpoint does not exist.",
    405: "The endpoint does not take this method.",
    409: "The adapter name is taken (load_inplace: true replaces its weights), or no GPU slot can be pinned.",
    413: "The body, prompt or request is larger than a bound the operator set.",
    415: "The body must be sent with Content-Type: application/json.",
    429: "The waiting queue is full; retry after Retry-After seconds.",
    499: "The client went away before the answer was ready.",
    503: "The server is shutting down, or the engine did not answer in time; retry after Retry-After.",
}


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    message: str
    type: str
    code: int | str | None = None
    param: str | None = None


class ErrorBody(BaseModel):
    """Every error answer: ``{"error": {"message", "type", "code"}}`` (OpenAI routes add ``param``)."""

    error: ErrorDetail


class AdapterAnswer(BaseModel):
    """What the adapter endpoints answer, for success and failure alike (SGLang's shape)."""

    model_config = ConfigDict(extra="allow")

    success: bool
    error_message: str | None = None
    loaded_adapters: dict[str, str]


def document_models(app: FastAPI, *models: type[BaseModel]) -> None:
    """Add ``models``' schemas to the document's components (for ``$ref`` from ``responses``)."""
    app.state.openapi_models = {**getattr(app.state, "openapi_models", {}), **{m.__name__: m for m in models}}


def request_body(app: FastAPI, model: type[BaseModel], description: str = "") -> dict[str, Any]:
    """``openapi_extra`` declaring a required JSON body of ``model``; the schema joins the components."""
    document_models(app, model)
    body = {"required": True, "content": {JSON: {"schema": {"$ref": REF.format(model=model.__name__)}}}}
    if description:
        body["description"] = description
    return {"requestBody": body}


def errors(*statuses: int, model: type[BaseModel] = ErrorBody, ok: dict | None = None) -> dict[int | str, dict]:
    """``responses`` entries for the error statuses a route may answer (``model`` is their body), and
    ``ok`` as the 200 entry when given."""
    out: dict[int | str, dict[str, Any]] = {200: ok} if ok is not None else {}
    for status in statuses:
        entry: dict[str, Any] = {"description": ERROR_TEXT[status], "model": model}
        if status in (429, 503):
            entry["headers"] = {
                "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}}
            }
        if status == 499:
            entry = {"description": ERROR_TEXT[status]}  # no body: the client is gone
        out[status] = entry
    return out


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` include the body models' schemas and the errors every route may answer."""
    build = app.openapi
    document_models(app, ErrorBody)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = build()
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for name, model in getattr(app.state, "openapi_models", {}).items():
            schema = model.model_json_schema(ref_template=REF, mode="validation")
            schemas.update(schema.pop("$defs", {}))
            schemas[name] = schema
        for methods in doc.get("paths", {}).values():
            for op in methods.values():
                responses = op.setdefault("responses", {})
                responses.pop("422", None)  # FastAPI's default; our validation errors are 400s
                for status, entry in _everywhere(app).items():
                    responses.setdefault(str(status), entry)
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def _everywhere(app: FastAPI) -> dict[int, dict[str, Any]]:
    """Answers any route may give: an unknown method (405), a key problem (401), a large body (413)."""
    ref = {"$ref": REF.format(model="ErrorBody")}
    content = {JSON: {"schema": ref}}
    out = {
        405: {"description": ERROR_TEXT[405], "content": content},
        413: {"description": ERROR_TEXT[413], "content": content},
    }
    if getattr(app.state, "settings", None) is not None and app.state.settings.api_key:
        out[401] = {"description": ERROR_TEXT[401], "content": content}
    return out
