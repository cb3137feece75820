"""The plugin manager: loads the ``loraserve`` entry points once and builds the named registries.

Each engine (and the CLI) owns one :class:`PluginManager`; nothing here is module-level state, so
tests build managers side by side. Built-in plugins are found through the same entry-point group
as third-party ones. A plugin that fails to import is reported by name and skipped; a misspelled
hook or two plugins claiming the same name fail loudly, naming the plugins involved.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pluggy

from loraserve import hookspecs
from loraserve.errors import ConfigError, PluginError
from loraserve.plugin_options import PluginOptions, PluginOptionsTable
from loraserve.plugin_registry import PluginRegistry

logger = logging.getLogger("loraserve.plugin_manager")

ENTRY_POINT_GROUP = "loraserve"
BUILTIN_PREFIX = "loraserve.plugins."

# kind -> (register hook, the flag that selects one, the noun used in messages)
REGISTRY_KINDS: dict[str, tuple[str, str | None, str]] = {
    "backends": ("loraserve_register_backends", "--lora-backend", "LoRA backend"),
    "eviction_policies": ("loraserve_register_eviction_policies", "--lora-eviction-policy", "eviction policy"),
    "attention_backends": ("loraserve_register_attention_backends", "--attention-backend", "attention backend"),
    "loaders": ("loraserve_register_loaders", None, "adapter loader"),
    "resolvers": ("loraserve_register_resolvers", None, "adapter resolver"),
    "frontends": ("loraserve_register_frontends", None, "frontend"),
    "models": ("loraserve_register_models", None, "model architecture"),
}


@dataclass
class PluginInfo:
    """What ``loraserve plugins`` reports about one plugin."""

    name: str
    module: str
    version: str | None = None
    distribution: str | None = None
    status: str = "loaded"  # loaded | failed | disabled
    error: str | None = None
    builtin: bool = False

    def as_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "module": self.module,
            "version": self.version,
            "distribution": self.distribution,
            "status": self.status,
            "builtin": self.builtin,
        }
        if self.error:
            out["error"] = self.error
        return out


@dataclass
class _LoadOptions:
    allow: list[str] | None = None
    deny: list[str] = field(default_factory=list)


class PluginManager:
    """A typed wrapper around pluggy's manager for the ``loraserve`` hooks.

    :param allow: plugin names to load (``LORASERVE_PLUGINS``); None loads every installed plugin.
    :param deny: plugin names not to load (``--disable-plugin``).
    :param trace: log every hook call at INFO level (``LORASERVE_TRACE_PLUGINS=1``).
    :param entry_points: the entry points to load; defaults to the installed ``loraserve`` group.
    """

    def __init__(
        self,
        allow: Sequence[str] | None = None,
        deny: Sequence[str] = (),
        trace: bool = False,
        entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
    ):
        self._pm = pluggy.PluginManager("loraserve")
        self._pm.add_hookspecs(hookspecs)
        self._load_options = _LoadOptions(list(allow) if allow is not None else None, list(deny))
        self._trace = trace
        self._entry_points = entry_points
        self._loaded = False
        self._infos: dict[str, PluginInfo] = {}
        self._registries: dict[str, PluginRegistry] = {}
        self._options = PluginOptionsTable()

    # -- loading --------------------------------------------------------------------------------

    def load(self) -> PluginManager:
        """Import and register every allowed entry point, once; then check hook names."""
        if self._loaded:
            return self
        self._loaded = True
        eps = list(
            self._entry_points
            if self._entry_points is not None
            else importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        )
        installed = {ep.name for ep in eps}
        for option, names in (
            ("LORASERVE_PLUGINS", self._load_options.allow or []),
            ("--disable-plugin", self._load_options.deny),
        ):
            unknown = sorted(set(names) - installed)
            if unknown:
                raise ConfigError(
                    f"{option} names {', '.join(map(repr, unknown))}, which is not an installed "
                    f"plugin; installed plugins: {', '.join(sorted(installed)) or 'none'}"
                )
        for ep in sorted(eps, key=lambda e: (not e.value.startswith(BUILTIN_PREFIX), e.name)):
            self._load_entry_point(ep)
        self.check_pending()
        return self

    def _load_entry_point(self, ep: importlib.metadata.EntryPoint) -> None:
        dist = getattr(ep, "dist", None)
        info = PluginInfo(
            name=ep.name,
            module=ep.value,
            builtin=ep.value.startswith(BUILTIN_PREFIX),
            distribution=dist.metadata["Name"] if dist is not None else None,
            version=dist.version if dist is not None else None,
        )
        self._infos[ep.name] = info
        if ep.name in self._load_options.deny or (
            self._load_options.allow is not None and ep.name not in self._load_options.allow
        ):
            info.status = "disabled"
            return
        try:
            plugin = ep.load()
            self._pm.register(plugin, name=ep.name)
            logger.debug("plugin %r loaded from %s (%s %s)", ep.name, ep.value, info.distribution, info.version)
        except Exception as exc:  # a broken plugin must not take the engine down
            info.status, info.error = "failed", f"{type(exc).__name__}: {exc}"
            logger.error("plugin %r (%s) failed to load and is skipped: %s", ep.name, ep.value, info.error)

    def register(self, plugin: object, name: str) -> None:
        """Register a plugin object directly (tests, embedding applications)."""
        self._pm.register(plugin, name=name)
        self._infos[name] = PluginInfo(name=name, module=getattr(plugin, "__name__", type(plugin).__name__))
        self._forget_derived()
        self.check_pending()

    def unregister(self, name: str) -> None:
        self._pm.unregister(name=name)
        self._infos.pop(name, None)
        self._forget_derived()

    def _forget_derived(self) -> None:
        self._registries.clear()
        self._options.classes = None

    def check_pending(self) -> None:
        """Fail loudly if a plugin implements a hook that does not exist (usually a typo)."""
        known = [n for n in dir(hookspecs) if n.startswith("loraserve_")]
        for hook_name in dir(self._pm.hook):
            if hook_name.startswith("_"):
                continue
            caller = getattr(self._pm.hook, hook_name)
            if caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                if impl.optionalhook:
                    continue
                close = difflib.get_close_matches(hook_name, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise PluginError(f"plugin {impl.plugin_name!r} implements unknown hook {hook_name!r}{hint}")
        self._pm.check_pending()

    # -- registries -----------------------------------------------------------------------------

    def registry(self, kind: str) -> PluginRegistry:
        """The registry of one kind (see ``REGISTRY_KINDS``), built on first use."""
        if kind not in REGISTRY_KINDS:
            raise KeyError(f"unknown registry kind {kind!r}; known: {', '.join(REGISTRY_KINDS)}")
        self.load()
        if kind not in self._registries:
            hook_name, flag, noun = REGISTRY_KINDS[kind]
            reg = PluginRegistry(noun, flag, options_of=self.options_of)
            for impl in self._impls(hook_name):

                def register(name, factory, description="", priority=None, _plugin=impl.plugin_name):
                    reg.add(name, factory, _plugin, description, priority)

                self._call_impl(
                    hook_name,
                    impl,
                    {"register": register, "options": self.options_of(impl.plugin_name)},
                    propagate=True,
                )
            self._registries[kind] = reg
        return self._registries[kind]

    @property
    def backends(self) -> PluginRegistry:
        return self.registry("backends")

    @property
    def eviction_policies(self) -> PluginRegistry:
        return self.registry("eviction_policies")

    @property
    def loaders(self) -> PluginRegistry:
        return self.registry("loaders")

    @property
    def resolvers(self) -> PluginRegistry:
        return self.registry("resolvers")

    @property
    def frontends(self) -> PluginRegistry:
        return self.registry("frontends")

    @property
    def models(self) -> PluginRegistry:
        return self.registry("models")

    @property
    def attention_backends(self) -> PluginRegistry:
        return self.registry("attention_backends")

    # -- plugin options -------------------------------------------------------------------------

    def option_classes(self) -> dict[str, type[PluginOptions]]:
        """plugin name -> the :class:`~loraserve.contract.PluginOptions` subclass it registered."""
        self.load()
        if self._options.classes is None:
            classes: dict[str, type[PluginOptions]] = {}
            for impl in self._impls("loraserve_register_options"):

                def register(options_class, _plugin=impl.plugin_name):
                    self._options.add(classes, _plugin, options_class)

                self._call_impl("loraserve_register_options", impl, {"register": register}, propagate=True)
            self._options.classes = classes
        return self._options.classes

    def configure(self, values: Mapping[str, Any]) -> None:
        """Validate plugins' option values (``Settings.plugin_options``: option name -> value, the
        environment filling the rest); raises ConfigError naming the flag. Registries are rebuilt,
        since register hooks may read their plugin's options."""
        self._options.configure(self.option_classes(), values)
        self._registries.clear()

    def options_of(self, plugin: str) -> PluginOptions | None:
        """The validated options of ``plugin``, or None when it registered none."""
        cls = self.option_classes().get(plugin)
        return None if cls is None else self._options.instance(plugin, cls)

    # -- observers ------------------------------------------------------------------------------

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call an observer hook on every plugin; a failing observer is logged, never raised."""
        self.load()
        for impl in self._impls(hook_name):
            self._call_impl(hook_name, impl, kwargs, propagate=False)

    # -- reporting ------------------------------------------------------------------------------

    def plugin_infos(self) -> list[PluginInfo]:
        self.load()
        return list(self._infos.values())

    def describe(self, include_builtin: bool = True) -> list[dict[str, Any]]:
        """JSON-ready description of every plugin: status, version, hooks and registrations."""
        registered: dict[str, dict[str, list[str]]] = {}
        for kind in REGISTRY_KINDS:
            for entry in self.registry(kind):
                registered.setdefault(entry.plugin, {}).setdefault(kind, []).append(entry.name)
        out = []
        for info in self.plugin_infos():
            if info.builtin and not include_builtin:
                continue
            row = info.as_dict()
            plugin = self._pm.get_plugin(info.name)
            callers = self._pm.get_hookcallers(plugin) if plugin is not None else None
            row["hooks"] = sorted(c.name for c in callers or [])
            row["registered"] = registered.get(info.name, {})
            out.append(row)
        return out

    # -- internals ------------------------------------------------------------------------------

    def _impls(self, hook_name: str) -> list[pluggy.HookImpl]:
        return list(getattr(self._pm.hook, hook_name).get_hookimpls())

    def _call_impl(self, hook_name: str, impl: pluggy.HookImpl, kwargs: dict[str, Any], propagate: bool) -> Any:
        args = {k: v for k, v in kwargs.items() if k in impl.argnames}
        start = time.perf_counter()
        try:
            result = impl.function(**args)
        except Exception as exc:
            if propagate:
                if isinstance(exc, PluginError):
                    raise
                raise PluginError(
                    f"plugin {impl.plugin_name!r} failed in {hook_name}: {type(exc).__name__}: {exc}"
                ) from exc
            logger.exception("plugin %r failed in %s (ignored)", impl.plugin_name, hook_name)
            return None
        finally:
            if self._trace:
                logger.info(
                    "hook %s -> plugin %r (%s) in %.3f ms",
                    hook_name,
                    impl.plugin_name,
                    ", ".join(f"{k}={v!r}" for k, v in args.items()),
                    1e3 * (time.perf_counter() - start),
                )
        return result
