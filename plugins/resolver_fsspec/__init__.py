"""Built-in plugin: resolve an unknown adapter name to ``PREFIX/NAME`` at any URL fsspec reads
(``s3://``, ``gs://``, ``hf://``, ``file://``, ``memory://``...), given by ``--lora-resolver-url``.
The adapter's files are downloaded into a per-engine cache directory and loaded from there.
Credentials are fsspec's own (environment variables, config files). Off unless the flag is given.
"""

from __future__ import annotations

from pydantic import Field

from loraserve import hookimpl
from loraserve.contract import PluginOptions


class FsspecResolverOptions(PluginOptions):
    """Options of the fsspec URL adapter resolver."""

    lora_resolver_url: str | None = Field(
        None,
        description=(
            "Load an adapter a request names but nobody loaded from PREFIX/NAME, any URL fsspec reads (s3://, "
            "gs://, file://, memory://...; credentials as fsspec takes them): adapter_config.json and the weights "
            "are downloaded into a per-engine directory under $LORASERVE_CACHE_DIR (which must lie inside "
            "--lora-allowed-dirs when those are set). Default: off."
        ),
        json_schema_extra={"metavar": "PREFIX"},
    )
    lora_resolver_max_bytes: int = Field(
        2 * 1024**3,
        gt=0,
        description="Largest adapter (its files together, in bytes) the fsspec resolver downloads; larger is a 413.",
        json_schema_extra={"metavar": "BYTES"},
    )


def _make(settings, options=None):
    from loraserve.plugins.resolver_fsspec.resolver import FsspecResolver

    return FsspecResolver(options.lora_resolver_url, settings, max_bytes=options.lora_resolver_max_bytes)


@hookimpl
def loraserve_register_options(register):
    register(FsspecResolverOptions)


@hookimpl
def loraserve_register_resolvers(register, options):
    if options is not None and options.lora_resolver_url:
        register("fsspec", _make, description="adapter NAME -> --lora-resolver-url PREFIX/NAME, downloaded")
