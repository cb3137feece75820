"""Plugin registries, which register-style hooks fill: one per kind of alternative (not the adapter
registry of loaded adapters, :mod:`loraserve.lora.registry`).

A registry maps a user-facing name (``--backend csgmv``) to the factory a plugin registered and
remembers which plugin registered it, so ``loraserve plugins`` can show it and a clash between two
plugins names both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from loraserve.errors import ConfigError, PluginError


@dataclass(frozen=True)
class Registration:
    """One named alternative: its factory and the plugin that registered it."""

    name: str
    factory: Callable[..., Any]
    plugin: str
    description: str = ""
    #: device type (``"cuda"``, ``"cpu"``) -> priority; the highest on a device is its default
    priority: Mapping[str, int] = field(default_factory=dict)


class PluginRegistry:
    """Name -> :class:`Registration` for one kind of alternative (backend, eviction policy, ...)."""

    def __init__(self, kind: str, flag: str | None = None, options_of: Callable[[str], Any] = lambda plugin: None):
        self.kind = kind
        self.flag = flag
        self._options_of = options_of
        self._entries: dict[str, Registration] = {}

    def add(
        self,
        name: str,
        factory: Callable[..., Any],
        plugin: str,
        description: str = "",
        priority: Mapping[str, int] | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered a {self.kind} with an invalid name {name!r}")
        if not callable(factory):
            raise PluginError(f"plugin {plugin!r} registered {self.kind} {name!r} with a factory that is not callable")
        priority = dict(priority or {})
        bad = {k: v for k, v in priority.items() if not isinstance(k, str) or type(v) is not int}
        if bad:
            raise PluginError(
                f"plugin {plugin!r} registered {self.kind} {name!r} with priority {bad!r}; "
                "give a mapping of device type (e.g. 'cuda') to an int"
            )
        existing = self._entries.get(name)
        if existing is not None:
            raise PluginError(
                f"{self.kind} {name!r} is registered by both plugin {existing.plugin!r} and plugin "
                f"{plugin!r}; disable one of them with --disable-plugin"
            )
        self._entries[name] = Registration(name, factory, plugin, description, priority)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Registration]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> Registration:
        try:
            return self._entries[name]
        except KeyError:
            where = f"{self.flag} " if self.flag else ""
            available = ", ".join(sorted(self._entries)) or "none (is a plugin disabled?)"
            raise ConfigError(f"unknown {self.kind} {where}{name!r}; choose one of: {available}") from None

    def default_for(self, device_type: str) -> str:
        """The name with the highest priority on ``device_type`` (the first registered among equals),
        so an installed plugin becomes the default by stating a higher priority."""
        ranked = [
            (entry.priority[device_type], -i, entry.name)
            for i, entry in enumerate(self._entries.values())
            if device_type in entry.priority
        ]
        if not ranked:
            where = f"; choose one with {self.flag}" if self.flag else ""
            raise ConfigError(
                f"no {self.kind} states a priority for device {device_type!r}, so none is the "
                f"default{where} (registered: {', '.join(self._entries) or 'none'})"
            )
        return max(ranked)[2]

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the factory registered under ``name``; a plugin with options of its own gets them as
        the keyword argument ``options``."""
        entry = self.get(name)
        options = self._options_of(entry.plugin)
        if options is not None:
            kwargs["options"] = options
        return entry.factory(*args, **kwargs)
