"""Built-in plugin: the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models).

Registering is cheap; the routes (and FastAPI) are imported only when the server mounts the frontend.
"""

from __future__ import annotations

from loraserve import hookimpl


def _mount(app, engine, settings):
    from loraserve.plugins.frontend_openai.routes import add_routes

    add_routes(app, engine, settings)


@hookimpl
def loraserve_register_frontends(register):
    register("openai", _mount, description="OpenAI-compatible /v1/completions, /v1/chat/completions, /v1/models")
