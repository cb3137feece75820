"""Named registries that register-style hooks fill: one per kind of alternative.

A registry maps a user-facing name (``--backend csgmv``) to the factory a plugin registered and
remembers which plugin registered it, so ``loraserve plugins`` can show it and a clash between two
plugins names both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

from loraserve.errors import ConfigError, PluginError


@dataclass(frozen=True)
class Registration:
    """One named alternative: its factory and the plugin that registered it."""

    name: str
    factory: Callable[..., Any]
    plugin: str
    description: str = ""


class Registry:
    """Name -> :class:`Registration` for one kind of alternative (backend, eviction policy, ...)."""

    def __init__(self, kind: str, flag: str | None = None):
        self.kind = kind
        self.flag = flag
        self._entries: dict[str, Registration] = {}

    def add(self, name: str, factory: Callable[..., Any], plugin: str, description: str = "") -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered a {self.kind} with an invalid name {name!r}")
        if not callable(factory):
            raise PluginError(f"plugin {plugin!r} registered {self.kind} {name!r} with a factory that is not callable")
        existing = self._entries.get(name)
        if existing is not None:
            raise PluginError(
                f"{self.kind} {name!r} is registered by both plugin {existing.plugin!r} and plugin "
                f"{plugin!r}; disable one of them with --disable-plugin"
            )
        self._entries[name] = Registration(name, factory, plugin, description)

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

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the factory registered under ``name``."""
        return self.get(name).factory(*args, **kwargs)
