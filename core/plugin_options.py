"""Plugins' own options: which plugin declared which option, and their validated values.

A plugin registers one :class:`~loraserve.contract.PluginOptions` subclass through
``loraserve_register_options``. Its fields share one namespace with the core settings (they become
``--flag`` and ``LORASERVE_FLAG`` alike), so a name that a core setting or another plugin already
uses is refused, naming both. Values arrive as ``Settings.plugin_options`` (option name -> value,
what the command line gave); the environment and the fields' defaults fill the rest when the
options class is instantiated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from loraserve.contract import PluginOptions
from loraserve.errors import ConfigError, PluginError
from loraserve.settings import Settings, describe_validation_error

__all__ = ["PluginOptions", "PluginOptionsTable"]


class PluginOptionsTable:
    """The option classes plugins registered and, once configured, each plugin's validated options."""

    def __init__(self) -> None:
        #: plugin name -> options class (None: not collected yet)
        self.classes: dict[str, type[PluginOptions]] | None = None
        self._values: dict[str, Any] = {}
        self._instances: dict[str, PluginOptions] = {}

    @staticmethod
    def add(classes: dict[str, type[PluginOptions]], plugin: str, options_class: Any) -> None:
        """Record ``plugin``'s options class after checking it against the core settings and ``classes``."""
        if not (isinstance(options_class, type) and issubclass(options_class, PluginOptions)):
            raise PluginError(
                f"plugin {plugin!r} registered options {options_class!r}, which is not a subclass of "
                "loraserve.contract.PluginOptions"
            )
        if plugin in classes:
            raise PluginError(f"plugin {plugin!r} registered options twice; register one PluginOptions class")
        for name in options_class.model_fields:
            if name in Settings.model_fields:
                raise PluginError(
                    f"plugin {plugin!r} declares option {name!r}, which is a core setting "
                    f"(--{name.replace('_', '-')}); rename it"
                )
            owner = next((p for p, c in classes.items() if name in c.model_fields), None)
            if owner is not None:
                raise PluginError(
                    f"option {name!r} is declared by both plugin {owner!r} and plugin {plugin!r}; "
                    "disable one of them with --disable-plugin"
                )
        classes[plugin] = options_class

    def configure(self, classes: Mapping[str, type[PluginOptions]], values: Mapping[str, Any]) -> None:
        """Validate ``values`` against every plugin's options; unknown names are an error."""
        known = {name for cls in classes.values() for name in cls.model_fields}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown plugin option(s) {', '.join(unknown)}; the installed plugins declare "
                f"{', '.join(sorted(known)) or 'none'}"
            )
        self._values = dict(values)
        self._instances = {}
        for plugin, cls in classes.items():
            self.instance(plugin, cls)  # every plugin's options are checked now, not at first use

    def instance(self, plugin: str, cls: type[PluginOptions]) -> PluginOptions:
        """``plugin``'s options: the configured values, the environment, then the defaults."""
        got = self._instances.get(plugin)
        if got is None or type(got) is not cls:
            given = {k: v for k, v in self._values.items() if k in cls.model_fields}
            try:
                got = cls(**given)
            except ValidationError as exc:
                raise ConfigError(
                    f"invalid options of plugin {plugin!r}:\n  "
                    + "\n  ".join(describe_validation_error(exc, cls.model_fields))
                ) from None
            self._instances[plugin] = got
        return got
