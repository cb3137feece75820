"""``HubResolver``: adapter name ``ORG/REPO`` -> that Hugging Face hub repository, when allowed.

A name that is not ``ORG/REPO``, or whose organisation and repository are both missing from the
allow-list, is not this resolver's (None). For an allowed one it fetches ``adapter_config.json`` (or,
with ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` set, finds it and the weights in the local hub cache,
else a 404 saying the files are not cached), checks the declared base model
(:func:`~loraserve.lora.resolution.check_base_model`) and returns the hub id, which the PEFT loader
fetches (or reads from the cache) as it does for ``--lora-paths``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from loraserve.contract import AdapterResolver
from loraserve.errors import NotFound
from loraserve.lora.resolution import check_base_model

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def hub_offline() -> bool:
    """Whether the hub may not be contacted (read at each call: the environment may change)."""
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


class HubResolver(AdapterResolver):
    """Adapters are the allowed hub repositories (see the module docstring). Stateless."""

    name = "hub"

    def __init__(self, allowed: list[str], settings: Any):
        self.allowed = frozenset(entry.casefold() for entry in allowed)
        self.settings = settings

    def allows(self, repo_id: str) -> bool:
        org = repo_id.split("/", 1)[0]
        return bool({org.casefold(), repo_id.casefold()} & self.allowed)

    def resolve(self, name: str) -> str | None:
        if _REPO_ID.fullmatch(name) is None or ".." in name or not self.allows(name):
            return None
        check_base_model(self._config(name), self.settings, name)
        return name

    def _config(self, repo_id: str) -> Path:
        """The local path of the repository's adapter_config.json (fetched unless offline)."""
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        if hub_offline():
            config = try_to_load_from_cache(repo_id, CONFIG_NAME)
            weights = [try_to_load_from_cache(repo_id, w) for w in WEIGHTS_NAMES]
            if not isinstance(config, str) or not any(isinstance(w, str) for w in weights):
                missing = CONFIG_NAME if not isinstance(config, str) else " or ".join(WEIGHTS_NAMES)
                raise NotFound(
                    f"adapter {repo_id!r}: its {missing} is not in the local Hugging Face cache (HF_HUB_OFFLINE): "
                    "the hub is not contacted while it is set; download it first (huggingface-cli download "
                    f"{repo_id}) or unset HF_HUB_OFFLINE"
                )
            return Path(config)
        try:
            return Path(hf_hub_download(repo_id, CONFIG_NAME))
        except Exception as exc:  # missing repository, no such file, no network, no access
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise NotFound(
                f"adapter {repo_id!r}: {CONFIG_NAME} could not be fetched from the Hugging Face hub "
                f"({type(exc).__name__}: {reason}); check the repository id and your access to it"
            ) from None
