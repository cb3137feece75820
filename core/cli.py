"""The ``loraserve`` command: serve (the default), ``plugins`` and the other subcommands.

The argument parser is generated from :class:`loraserve.settings.Settings`, so every flag, its
default and its help come from one place. Plugins are loaded before the parser is built: the
``choices`` of ``--lora-backend`` and ``--lora-eviction-policy`` are the names the registries hold,
so a third-party backend appears in ``--help`` without a fork.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from collections.abc import Sequence
from typing import Any

from loraserve import __version__
from loraserve.errors import LoraserveError
from loraserve.plugin_manager import PluginManager
from loraserve.settings import Settings, flag_name, make_settings

SUBCOMMANDS = ("serve", "plugins", "ray-serve")
GROUP_TITLES = {
    "model": "model",
    "server": "HTTP server",
    "scheduling": "scheduling and memory",
    "lora": "LoRA",
    "plugins": "plugins",
}
# settings fields whose choices come from plugin registries
REGISTRY_CHOICES = {
    "lora_backend": "backends",
    "lora_eviction_policy": "eviction_policies",
    "attention_backend": "attention_backends",
}
# argparse destination of a plugin option: kept apart from the core settings' names
PLUGIN_DEST_PREFIX = "plugin_option:"


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Root logging at ``level`` with timestamped lines; replaces any earlier configuration.

    uvicorn is started with ``log_config=None``, so its loggers use these handlers too.
    """
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, force=True)


def _literal_choices(annotation: Any) -> list[Any] | None:
    """The values of ``Literal[...]``, also inside ``Literal[...] | None`` (ints stay ints)."""
    if typing.get_origin(annotation) is typing.Literal:
        return [a if isinstance(a, int) else str(a) for a in typing.get_args(annotation)]
    for arg in typing.get_args(annotation):
        if typing.get_origin(arg) is typing.Literal:
            return [a if isinstance(a, int) else str(a) for a in typing.get_args(arg)]
    return None


def build_parser(plugins: PluginManager | None = None, prog: str = "loraserve") -> argparse.ArgumentParser:
    """An argparse parser with one flag per :class:`Settings` field and per plugin option.

    Every flag defaults to ``argparse.SUPPRESS``, so the namespace holds only what the user typed
    and the environment and the field defaults apply to the rest. Plugin options get a group per
    plugin and land under ``PLUGIN_DEST_PREFIX + name``.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,  # a typo must not pick another flag
        description="Serve one base LLM with many LoRA adapters. Subcommands: "
        "'loraserve plugins' lists plugins as JSON; 'loraserve [serve] [MODEL] FLAGS' starts the server.",
        epilog="Every flag can also be set as an environment variable: LORASERVE_<FLAG_NAME_IN_CAPITALS>.",
    )
    parser.add_argument("--version", action="version", version=f"loraserve {__version__}")
    parser.add_argument(
        "model_tag",
        nargs="?",
        metavar="MODEL",
        help="the model to serve, as vLLM's positional argument: the same as --model-path",
    )
    groups: dict[str, Any] = {}
    for name, info in Settings.model_fields.items():
        extra = dict(info.json_schema_extra or {})
        if extra.get("cli", True) is False:
            continue
        group_key = extra.get("group", "other")
        if group_key not in groups:
            groups[group_key] = parser.add_argument_group(GROUP_TITLES.get(group_key, group_key))
        choices = None
        if name in REGISTRY_CHOICES and plugins is not None:
            choices = plugins.registry(REGISTRY_CHOICES[name]).names()
        add_field(groups[group_key], name, info, name, choices)
    for plugin, options_class in (plugins.option_classes() if plugins is not None else {}).items():
        group = parser.add_argument_group(f"plugin {plugin}", (options_class.__doc__ or "").strip().split("\n")[0])
        for name, info in options_class.model_fields.items():
            add_field(group, name, info, PLUGIN_DEST_PREFIX + name)
    return parser


def add_field(group: Any, name: str, info: Any, dest: str, choices: list[str] | None = None) -> None:
    """Add the flag of one pydantic field (a core setting or a plugin option) to ``group``."""
    extra = {k: v for k, v in (info.json_schema_extra or {}).items() if k not in ("group", "cli")}
    flags = [flag_name(name), *extra.pop("aliases", [])]
    kwargs: dict[str, Any] = {"dest": dest}
    default = info.get_default(call_default_factory=True)
    help_text = info.description or ""
    if info.annotation in (bool, bool | None):
        kwargs["action"] = "store_true"
    else:
        choices = choices or extra.pop("choices", None) or _literal_choices(info.annotation)
        kwargs.update(extra)
        if choices:
            kwargs["choices"] = choices
            if "metavar" not in kwargs:
                kwargs["metavar"] = "{" + ",".join(map(str, choices)) + "}"
            if all(isinstance(c, int) for c in choices):
                kwargs["type"] = int
        kwargs.setdefault("metavar", name.upper())
        if default not in (None, []):
            help_text += f" (default: {default})"
    group.add_argument(*flags, help=help_text.replace("%", "%%"), **kwargs)


def _plugin_manager(argv: Sequence[str]) -> PluginManager:
    """Load plugins honouring --disable-plugin / --plugins (or their env vars) before full parsing."""
    pre = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS, allow_abbrev=False)
    pre.add_argument("--disable-plugin", action="append", dest="disable_plugin")
    pre.add_argument("--plugins", nargs="+", dest="plugins")
    pre.add_argument("--trace-plugins", action="store_true", dest="trace_plugins")
    known, _ = pre.parse_known_args(argv)
    settings = make_settings(**vars(known))
    return PluginManager(allow=settings.plugins, deny=settings.disable_plugin, trace=settings.trace_plugins).load()


def parse_settings(argv: Sequence[str], plugins: PluginManager) -> Settings:
    parser = build_parser(plugins)
    values = vars(parser.parse_args(argv))
    plugin_values = {
        k.removeprefix(PLUGIN_DEST_PREFIX): values.pop(k) for k in list(values) if k.startswith(PLUGIN_DEST_PREFIX)
    }
    if plugin_values:
        values["plugin_options"] = plugin_values
    model = values.pop("model_tag", None)
    if model is not None:
        given = values.get("model_path")
        if given is not None and given != model:
            parser.error(f"the model is given twice, as {model!r} and as --model-path {given!r}; give one")
        values["model_path"] = model
    settings = make_settings(**values)
    plugins.configure(settings.plugin_options)  # a bad plugin option fails here, before the model loads
    return settings


def cmd_plugins(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="loraserve plugins",
        allow_abbrev=False,
        description='List plugins as JSON, built-in ones marked "builtin": true.',
    )
    parser.add_argument("--external", action="store_true", help="list only plugins that are not built in")
    parser.add_argument("--all", action="store_true", help="(the default) list built-in plugins too")
    parser.add_argument("--disable-plugin", action="append", default=[], metavar="NAME")
    args = parser.parse_args(argv)
    if args.all and args.external:
        parser.error("--all and --external contradict each other; give one")
    pm = _plugin_manager(["--disable-plugin=" + n for n in args.disable_plugin])
    print(json.dumps(pm.describe(include_builtin=not args.external), indent=2))
    return 0


def cmd_serve(argv: Sequence[str]) -> int:
    pm = _plugin_manager(argv)
    settings = parse_settings(argv, pm)
    configure_logging(settings.log_level)
    from loraserve.http.server import serve

    return serve(settings, pm)


def cmd_ray_serve(argv: Sequence[str]) -> int:
    """``loraserve ray-serve --num-replicas N [serve flags]``: replicas on Ray Serve (loraserve.ray_serve)."""
    try:
        from loraserve import ray_serve
    except ImportError as exc:
        print(f"loraserve ray-serve: Ray Serve is not installed ({exc}); pip install 'loraserve[ray]'", file=sys.stderr)
        return 2
    return ray_serve.main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "serve"
    if argv and argv[0] in SUBCOMMANDS:
        command, argv = argv[0], argv[1:]
    if not logging.getLogger().handlers:  # until the settings are read (an embedding program keeps its own)
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        return {"serve": cmd_serve, "plugins": cmd_plugins, "ray-serve": cmd_ray_serve}[command](argv)
    except LoraserveError as exc:
        print(f"loraserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
