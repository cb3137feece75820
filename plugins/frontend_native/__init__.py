"""Built-in plugin: SGLang's native HTTP API (/generate, adapter loading, health, info, metrics,
cache flushing).

Registering is cheap; the routes (and FastAPI) are imported only when the server mounts the frontend.
"""

from __future__ import annotations

from loraserve import hookimpl


def _mount(app, engine, settings):
    from loraserve.plugins.frontend_native.routes import add_routes

    add_routes(app, engine, settings)


@hookimpl
def loraserve_register_frontends(register):
    register("native", _mount, description="SGLang-compatible /generate, /load_lora_adapter, /health, /metrics, ...")
