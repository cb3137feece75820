"""Built-in plugin: resolve an unknown adapter name ``ORG/REPO`` to that Hugging Face hub repository,
for the organisations and repositories in ``--lora-resolver-hub-repos``. Off unless the flag is given.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from loraserve import hookimpl
from loraserve.contract import PluginOptions
from loraserve.lora.policy import check_hub_entries


class HubResolverOptions(PluginOptions):
    """Options of the Hugging Face hub adapter resolver."""

    lora_resolver_hub_repos: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description=(
            "Load an adapter a request names as ORG/REPO but nobody loaded from that Hugging Face hub repository, "
            "when ORG or ORG/REPO is in this list (comma- or space-separated). With HF_HUB_OFFLINE=1 only the local "
            "hub cache is read, and an adapter not in it is a 404 saying so. Default: off."
        ),
        json_schema_extra={"nargs": "+", "metavar": "ORG_OR_ORG/REPO"},
    )

    @field_validator("lora_resolver_hub_repos", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            return check_hub_entries([n.strip() for item in value for n in str(item).split(",") if n.strip()])
        return value


def _make(settings, options=None):
    from loraserve.plugins.resolver_hub.resolver import HubResolver

    return HubResolver(options.lora_resolver_hub_repos, settings)


@hookimpl
def loraserve_register_options(register):
    register(HubResolverOptions)


@hookimpl
def loraserve_register_resolvers(register, options):
    if options is not None and options.lora_resolver_hub_repos:
        register("hub", _make, description="adapter ORG/REPO -> that hub repository (--lora-resolver-hub-repos)")
