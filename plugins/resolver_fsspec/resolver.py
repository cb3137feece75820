"""``FsspecResolver``: adapter name -> ``PREFIX/NAME`` at an fsspec URL, downloaded to a local cache.

A name that is absolute or holds ``..`` is refused (403). ``PREFIX/NAME/adapter_config.json`` missing
means the name is not this resolver's (None). Otherwise the config and the weights
(``adapter_model.safetensors``, else ``adapter_model.bin``) are copied, at most ``max_bytes`` together
(413 beyond), into a fresh directory of this engine's cache, named by the hash of their contents so a
directory once written never changes while a loader reads it. With a ``file://`` prefix each remote
file must pass ``--lora-allowed-dirs`` too. The cache is ``$LORASERVE_CACHE_DIR/resolver-fsspec/engine-*``
(default ``~/.cache/loraserve``), removed when the resolver is collected or the process exits; when
``--lora-allowed-dirs`` is set it must lie inside them, since the manager loads from it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

from loraserve.contract import AdapterError, AdapterResolver
from loraserve.embedded import cache_root
from loraserve.errors import ConfigError, Forbidden, TooLarge
from loraserve.lora.policy import AdapterRefused, AdapterSourcePolicy, shown
from loraserve.lora.resolution import check_base_model

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
_CHUNK = 1 << 20


class FsspecResolver(AdapterResolver):
    """Adapters are the directories ``prefix/NAME`` of an fsspec file system (see the module docstring).
    Thread-safe: every download writes a directory of its own."""

    name = "fsspec"

    def __init__(self, prefix: str, settings: Any, *, max_bytes: int):
        import fsspec

        self.prefix = prefix.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.prefix)
        except (ValueError, ImportError) as exc:
            raise ConfigError(
                f"--lora-resolver-url {prefix!r} is not a URL fsspec can open ({type(exc).__name__}: {exc}); "
                "give a prefix such as s3://bucket/adapters or file:///srv/adapters (install the scheme's "
                "fsspec package, e.g. s3fs, if it names one)"
            ) from None
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        self.local = "file" in protocols or "local" in protocols
        self.settings, self.max_bytes = settings, max_bytes
        self.policy = AdapterSourcePolicy.from_settings(settings)
        base = cache_root() / "resolver-fsspec"
        base.mkdir(parents=True, exist_ok=True)
        self.cache = Path(tempfile.mkdtemp(prefix="engine-", dir=base))
        weakref.finalize(self, shutil.rmtree, str(self.cache), True)
        try:
            self.policy.check_file(self.cache, "the fsspec resolver's cache directory")
        except AdapterRefused as exc:
            raise ConfigError(f"{exc}. Set LORASERVE_CACHE_DIR to a directory inside --lora-allowed-dirs") from None

    def resolve(self, name: str) -> str | None:
        if name.startswith("/") or ".." in name.split("/"):
            raise Forbidden(
                f"adapter name {shown(name)} leads out of --lora-resolver-url; name an adapter by its path "
                "relative to that prefix"
            )
        remote = f"{self.root.rstrip('/')}/{name}"
        config = f"{remote}/{CONFIG_NAME}"
        if not self.fs.isfile(config):
            return None
        weights = next((f"{remote}/{w}" for w in WEIGHTS_NAMES if self.fs.isfile(f"{remote}/{w}")), None)
        if weights is None:
            raise AdapterError(
                f"adapter {shown(name)}: {shown(self.prefix + '/' + name, 300)} holds {CONFIG_NAME} but no "
                f"{' or '.join(WEIGHTS_NAMES)}; upload the weights PEFT's save_pretrained writes"
            )
        files = [config, weights]
        if self.local:
            for f in files:
                self.policy.check_file(f, "adapter file")
        sizes = [self.fs.size(f) or 0 for f in files]
        if sum(sizes) > self.max_bytes:
            raise TooLarge(self._too_large(name, sum(sizes)))
        directory = self._download(name, files)
        check_base_model(directory / CONFIG_NAME, self.settings, name)
        return str(directory)

    def _too_large(self, name: str, size: int) -> str:
        return (
            f"adapter {shown(name)} is {size} bytes, more than --lora-resolver-max-bytes {self.max_bytes}; "
            "raise the limit or load a smaller adapter"
        )

    def _download(self, name: str, files: list[str]) -> Path:
        """Copy ``files`` into a new cache directory named by their contents' hash; its path."""
        part = Path(tempfile.mkdtemp(prefix=".part-", dir=self.cache))
        try:
            digest, total = hashlib.sha256(), 0
            for remote in files:
                leaf = remote.rsplit("/", 1)[-1]
                digest.update(leaf.encode() + b"\0")
                with self.fs.open(remote, "rb") as src, open(part / leaf, "wb") as dst:
                    while chunk := src.read(_CHUNK):
                        total += len(chunk)
                        if total > self.max_bytes:  # the listed size may have been wrong or changed
                            raise TooLarge(self._too_large(name, total))
                        digest.update(chunk)
                        dst.write(chunk)
            final = self.cache / digest.hexdigest()[:32]
            try:
                os.replace(part, final)
            except OSError:  # the same contents are there already (a concurrent download of another name)
                if not final.is_dir():
                    raise
            return final
        except (TooLarge, AdapterError):
            raise
        except OSError as exc:
            raise AdapterError(
                f"adapter {shown(name)} could not be downloaded from {shown(self.prefix + '/' + name, 300)} "
                f"({type(exc).__name__}: {exc}); check the URL and your credentials"
            ) from None
        finally:
            shutil.rmtree(part, ignore_errors=True)
