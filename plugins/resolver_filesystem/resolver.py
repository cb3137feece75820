"""``FilesystemResolver``: adapter name -> a PEFT adapter directory inside one root directory.

The name is a relative path below the root; one that is absolute, holds ``..``, or whose real path
(symbolic links followed) lies outside the root is refused (403) before anything is read. A
directory without ``adapter_config.json`` is not an adapter: the name is unknown here (None). The
adapter's declared base model is checked against the served one
(:func:`~loraserve.lora.resolution.check_base_model`). The manager then loads the directory through
its usual path, so ``--lora-allowed-dirs`` applies to every file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from loraserve.contract import AdapterResolver
from loraserve.errors import ConfigError, Forbidden
from loraserve.lora.policy import shown
from loraserve.lora.resolution import check_base_model

CONFIG_NAME = "adapter_config.json"
ADAPTER_FILES = (CONFIG_NAME, "adapter_model.safetensors", "adapter_model.bin")


class FilesystemResolver(AdapterResolver):
    """Adapters are the directories ``root/NAME`` (see the module docstring). Stateless."""

    name = "filesystem"

    def __init__(self, root: str, settings: Any):
        real = os.path.realpath(os.path.expanduser(root))
        if not os.path.isdir(real):
            raise ConfigError(
                f"--lora-resolver-dir {root!r} is not a directory (it resolves to {real!r}); "
                "give the directory that holds one adapter directory per name"
            )
        self.root, self.settings = real, settings

    def resolve(self, name: str) -> str | None:
        parts = name.split("/")
        if name.startswith("/") or ".." in parts or os.path.isabs(name):
            raise Forbidden(
                f"adapter name {shown(name)} leads out of --lora-resolver-dir; name an adapter by its path "
                "relative to that directory"
            )
        real = self._inside(name, os.path.join(self.root, name))
        config = Path(real) / CONFIG_NAME
        if not config.is_file():
            return None
        for file in ADAPTER_FILES:  # a link in the adapter directory must not lead out either
            if os.path.lexists(os.path.join(real, file)):
                self._inside(name, os.path.join(real, file))
        check_base_model(config, self.settings, name)
        return real

    def _inside(self, name: str, path: str) -> str:
        real = os.path.realpath(path)
        if real != self.root and not real.startswith(self.root + os.sep):
            raise Forbidden(
                f"adapter {shown(name)}: {shown(path, 300)} resolves to {shown(real, 300)}, outside "
                f"--lora-resolver-dir ({self.root}); symbolic links must not lead out of it"
            )
        return real
