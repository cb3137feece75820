"""Built-in plugin: resolve an unknown adapter name to a directory under ``--lora-resolver-dir``.

A request for adapter ``NAME`` loads ``DIR/NAME`` when that directory holds a PEFT adapter
(``adapter_config.json``) for the served base model. Off unless the flag is given.
"""

from __future__ import annotations

from pydantic import Field

from loraserve import hookimpl
from loraserve.contract import PluginOptions


class FilesystemResolverOptions(PluginOptions):
    """Options of the filesystem adapter resolver."""

    lora_resolver_dir: str | None = Field(
        None,
        description=(
            "Load an adapter a request names but nobody loaded from DIR/NAME when that directory holds a PEFT "
            "adapter for the served base model (base_model_name_or_path in adapter_config.json is checked where "
            "present). Names leading out of DIR are refused with 403; --lora-allowed-dirs still applies. "
            "Default: off."
        ),
        json_schema_extra={"metavar": "DIR"},
    )


def _make(settings, options=None):
    from loraserve.plugins.resolver_filesystem.resolver import FilesystemResolver

    return FilesystemResolver(options.lora_resolver_dir, settings)


@hookimpl
def loraserve_register_options(register):
    register(FilesystemResolverOptions)


@hookimpl
def loraserve_register_resolvers(register, options):
    if options is not None and options.lora_resolver_dir:
        register("filesystem", _make, description="adapter NAME -> --lora-resolver-dir/NAME")
