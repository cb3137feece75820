"""Adapters pushed as tensors (``POST /load_lora_adapter_from_tensors``) kept as private directories.

An adapter sent as its ``adapter_config.json`` content and the bytes of its
``adapter_model.safetensors`` is written to a directory of its own under one private root
(``mkdtemp``, mode 0700) and then loaded like any adapter directory, by the same loader plugins and
with the same checks, so pushed weights can never skip a validation a directory load makes. The
directory lives as long as the adapter does: the host cache re-reads an evicted adapter from it, and
the manager removes it when the adapter's memory is freed (unload, or an in-place update's old
version once its last request finished). Its files are read with a source policy confined to the root,
so ``--lora-allowed-dirs`` (which governs where clients may point ``lora_path``) neither refuses
these reads nor opens the root to directory loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import threading
import weakref
from typing import Any

from loraserve.errors import UserError
from loraserve.lora.policy import AdapterSourcePolicy

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"


class TensorSources:
    """The private directories of the adapters pushed as tensors to one engine."""

    def __init__(self, policy: AdapterSourcePolicy):
        self._base_policy = policy
        self._root: str | None = None
        self._lock = threading.Lock()

    def _root_dir(self) -> str:
        with self._lock:
            if self._root is None:
                self._root = os.path.realpath(tempfile.mkdtemp(prefix="loraserve-tensors-"))
                weakref.finalize(self, shutil.rmtree, self._root, True)
            return self._root

    @property
    def policy(self) -> AdapterSourcePolicy:
        """The source policy that reads these directories: the engine's, confined to the root."""
        return dataclasses.replace(self._base_policy, allowed_dirs=(self._root_dir(),))

    def write(self, config: Any, weights: bytes) -> str:
        """A new private directory holding ``config`` (a JSON object) and ``weights`` (safetensors bytes)."""
        if not isinstance(config, dict):
            raise UserError(
                f"config_dict must be a JSON object (the content of {CONFIG_NAME}), got {type(config).__name__}"
            )
        if not isinstance(weights, (bytes, bytearray)) or not weights:
            raise UserError(f"tensors must be the non-empty bytes of {SAFETENSORS_NAME}")
        directory = tempfile.mkdtemp(prefix="adapter-", dir=self._root_dir())
        try:
            with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
                json.dump(config, f)
            with open(os.path.join(directory, SAFETENSORS_NAME), "wb") as f:
                f.write(weights)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return directory

    def owns(self, source: str) -> bool:
        """Whether ``source`` is one of these private directories."""
        root = self._root
        return root is not None and os.path.dirname(os.path.realpath(source)) == root

    def remove(self, source: str) -> None:
        """Delete ``source`` if it is one of these directories (quietly: it may be gone already)."""
        if self.owns(source):
            shutil.rmtree(source, ignore_errors=True)
