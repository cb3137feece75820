"""The engine: owns the settings, the plugin manager and everything built from them.

Each ``Engine`` is self-contained (no module-level state), so tests build engines side by side.
"""

from __future__ import annotations

import logging

from loraserve.plugin_manager import PluginManager
from loraserve.settings import Settings

logger = logging.getLogger("loraserve.engine")


class Engine:
    """Builds and owns every part of a serving engine from :class:`Settings`."""

    def __init__(self, settings: Settings | None = None, plugins: PluginManager | None = None):
        self.settings = settings if settings is not None else Settings()
        self.plugins = plugins if plugins is not None else PluginManager(
            allow=self.settings.plugins, deny=self.settings.disable_plugin, trace=self.settings.trace_plugins)
        self.plugins.load()
        self.settings.check_supported()
        self.device = self.settings.resolved_device()
        self.backend_name = self.settings.resolved_backend()
        # both raise a ConfigError listing the registered names when the choice is unknown
        self.plugins.backends.get(self.backend_name)
        self.plugins.eviction_policies.get(self.settings.lora_eviction_policy)
        self.lora_backend = self.plugins.backends.create(self.backend_name, self.settings, self.device)

    def new_eviction_policy(self):
        return self.plugins.eviction_policies.create(self.settings.lora_eviction_policy)
