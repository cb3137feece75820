"""Start the engine and (once it lands) the HTTP server for ``loraserve [serve]``."""

from __future__ import annotations

import logging

from loraserve.engine import Engine
from loraserve.plugin_manager import PluginManager
from loraserve.settings import Settings

logger = logging.getLogger("loraserve.server")


def serve(settings: Settings, plugins: PluginManager) -> int:
    engine = Engine(settings, plugins)
    logger.info("engine built: device=%s lora backend=%s eviction=%s", engine.device, engine.backend_name,
                settings.lora_eviction_policy)
    print("loraserve: the engine was built, but the HTTP server is not supported yet in this version; exiting.")
    return 0
