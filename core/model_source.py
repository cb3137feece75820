"""Where the base model comes from: :func:`resolve_model_source` turns ``--model-path`` and
``--load-format`` into a :class:`ModelSource` (a local Hugging Face directory, a GGUF file, a hub id
fetched through huggingface_hub, or the embedded SmolLM2 when no path is given), with the format
detected and the checkpoint files listed in load order. Nothing here reads weights;
:mod:`loraserve.model_loader` does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loraserve.errors import ConfigError

if TYPE_CHECKING:
    from loraserve.settings import Settings

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """What to load: the directory holding ``config.json`` (or the GGUF file) and how to read it.

    :param model_dir: directory with config.json, or the directory of the GGUF file.
    :param load_format: ``safetensors``, ``pt``, ``gguf`` or ``dummy`` (never ``auto``).
    :param weight_files: checkpoint files in load order (empty for gguf and dummy).
    :param gguf_file: the GGUF file name inside ``model_dir``, or None.
    :param name: the default served model name.
    :param origin: ``local``, ``hub`` or ``embedded``.
    """

    model_dir: Path
    load_format: str
    weight_files: tuple[Path, ...] = ()
    gguf_file: str | None = None
    name: str = ""
    origin: str = "local"


def resolve_model_source(settings: Settings) -> ModelSource:
    """Where ``settings.model_path`` points and which weight files to read; raises ConfigError if nothing fits."""
    fmt = settings.load_format
    if settings.model_path is None:
        from loraserve.embedded import EMBEDDED_MODEL_NAME, embedded_model_dir

        return _from_dir(embedded_model_dir(), fmt, EMBEDDED_MODEL_NAME, "embedded")
    given = settings.model_path
    path = Path(given).expanduser()
    if path.is_file():
        if path.suffix != ".gguf" and fmt != "gguf":
            raise ConfigError(
                f"--model-path {given!r} is a file but not a .gguf file; pass a Hugging Face "
                "directory (config.json + *.safetensors) or a GGUF file"
            )
        if fmt not in ("auto", "gguf", "dummy"):
            raise ConfigError(
                f"--model-path {given!r} is a GGUF file but --load-format is {fmt!r}; "
                "use --load-format auto (or gguf, or dummy)"
            )
        return ModelSource(
            path.parent.resolve(), "dummy" if fmt == "dummy" else "gguf", gguf_file=path.name, name=path.stem
        )
    if path.is_dir():
        return _from_dir(path.resolve(), fmt, path.resolve().name, "local")
    if HUB_ID.match(given) and not given.startswith("."):
        return _from_dir(_download(given, fmt), fmt, given, "hub")
    raise ConfigError(
        f"--model-path {given!r} does not exist; pass a local Hugging Face directory, a .gguf "
        "file, or a hub id like org/name"
    )


def _from_dir(directory: Path, fmt: str, name: str, origin: str) -> ModelSource:
    ggufs = sorted(p.name for p in directory.glob("*.gguf"))
    has_config = (directory / "config.json").is_file()
    if not has_config and not (ggufs and fmt in ("auto", "gguf", "dummy")):
        raise ConfigError(
            f"{directory} has no config.json; pass a Hugging Face model directory "
            "(config.json + *.safetensors) or a .gguf file to --model-path"
        )
    if fmt == "dummy":
        gguf = None if has_config else _single_gguf(directory, ggufs)
        return ModelSource(directory, "dummy", gguf_file=gguf, name=name, origin=origin)
    if fmt == "auto":
        if _safetensors_files(directory):
            fmt = "safetensors"
        elif _pt_files(directory):
            fmt = "pt"
        elif ggufs:
            fmt = "gguf"
        else:
            raise ConfigError(
                f"no weights found in {directory} (expected *.safetensors, pytorch_model*.bin or "
                "one *.gguf); pass --load-format dummy to run this config with random weights"
            )
    if fmt == "gguf":
        return ModelSource(directory, "gguf", gguf_file=_single_gguf(directory, ggufs), name=name, origin=origin)
    files = _safetensors_files(directory) if fmt == "safetensors" else _pt_files(directory)
    if not files:
        pattern = "*.safetensors" if fmt == "safetensors" else "pytorch_model*.bin"
        raise ConfigError(
            f"--load-format {fmt} but {directory} has no {pattern} files; use --load-format auto "
            "to detect the format, or dummy for random weights"
        )
    return ModelSource(directory, fmt, tuple(files), name=name, origin=origin)


def _single_gguf(directory: Path, ggufs: Sequence[str]) -> str:
    if len(ggufs) != 1:
        found = ", ".join(ggufs) if ggufs else "none"
        raise ConfigError(
            f"{directory} must hold exactly one .gguf file to load (found: {found}); "
            "pass the .gguf file itself as --model-path"
        )
    return ggufs[0]


def _indexed(directory: Path, index_name: str) -> list[Path] | None:
    index = directory / index_name
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"{index} is not a valid checkpoint index ({exc}); re-download the model") from None
    files = [directory / f for f in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConfigError(
            f"{index} lists shard(s) that are not in {directory}: {', '.join(missing)}; re-download the model"
        )
    return files


def _safetensors_files(directory: Path) -> list[Path]:
    indexed = _indexed(directory, "model.safetensors.index.json")
    if indexed is not None:
        return indexed
    files = sorted(directory.glob("model*.safetensors")) or sorted(directory.glob("*.safetensors"))
    return files


def _pt_files(directory: Path) -> list[Path]:
    indexed = _indexed(directory, "pytorch_model.bin.index.json")
    if indexed is not None:
        return indexed
    return sorted(directory.glob("pytorch_model*.bin"))


def _download(repo_id: str, fmt: str) -> Path:
    """Fetch config, tokenizer and (unless dummy) weights of a hub model; safetensors preferred over .bin."""
    if fmt == "gguf":
        raise ConfigError(
            f"--load-format gguf with hub id {repo_id!r} is not supported; download the .gguf "
            "file and pass its path to --model-path"
        )
    base = ["*.json", "tokenizer.model", "*.txt", "*.jinja"]
    weights = {"dummy": [], "safetensors": ["*.safetensors"], "pt": ["pytorch_model*.bin"], "auto": ["*.safetensors"]}
    directory = _snapshot(repo_id, base + weights[fmt])
    if fmt == "auto" and not _safetensors_files(directory):  # an older repo with only .bin weights
        directory = _snapshot(repo_id, base + ["pytorch_model*.bin"])
    return directory


def _snapshot(repo_id: str, patterns: list[str]) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated repo: all end the same way for the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(
            f"could not fetch model {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: "
            f"{reason}); pass a local directory with config.json and *.safetensors to "
            "--model-path instead"
        ) from None
