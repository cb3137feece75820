"""Finding, configuring and filling the base model: the one place that reads weights from disk.

:func:`resolve_model_source` (from :mod:`loraserve.model_source`) turns ``--model-path`` and
``--load-format`` into a :class:`ModelSource` (a local Hugging Face directory, a GGUF file, a hub
id, or the embedded SmolLM2 when no path is given). :func:`load_model` builds the architecture named by
``config.architectures[0]`` through the ``models`` plugin registry and fills it: safetensors and
``.bin`` checkpoints are streamed tensor by tensor into the model's parameters, GGUF files are
dequantised by transformers, and ``--load-format dummy`` draws random weights of the real shape
directly on the target device (no tokenizer or weight files needed, for benchmarks).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loraserve.errors import ConfigError
from loraserve.model_source import HUB_ID, ModelSource, resolve_model_source
from loraserve.models.dtypes import to_torch_device, to_torch_dtype

if TYPE_CHECKING:
    from loraserve.plugin_manager import PluginManager
    from loraserve.settings import Settings

logger = logging.getLogger("loraserve.model_loader")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
PROGRESS_BYTES = 1 << 30  # a single checkpoint file larger than this gets a progress bar too


# -- config and tokenizer -----------------------------------------------------------------------


def load_config(source: ModelSource):
    """The transformers config of the model (from config.json, or from the GGUF metadata)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(source.model_dir), gguf_file=source.gguf_file)
    except Exception as exc:
        where = source.model_dir / (source.gguf_file or "config.json")
        raise ConfigError(f"could not read the model config from {where}: {type(exc).__name__}: {exc}") from None


def architecture(config) -> str:
    """``config.architectures[0]``, or the causal-LM class of ``config.model_type`` when it is absent (GGUF)."""
    archs = getattr(config, "architectures", None)
    if archs:
        return archs[0]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    raise ConfigError(
        f"the model config names no architecture (architectures is empty, model_type "
        f'{model_type!r}); add "architectures": ["LlamaForCausalLM"] to config.json'
    )


def has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(settings: Settings, source: ModelSource | None = None):
    """The Hugging Face tokenizer for ``--tokenizer-path`` or, by default, the model's own.

    Raises ConfigError when the directory has no tokenizer (the benchmark configs have none:
    ``--load-format dummy`` runs with token ids and needs no tokenizer).
    """
    from transformers import AutoTokenizer

    given = settings.tokenizer_path
    if given is not None:
        path = Path(given).expanduser()
        if path.is_file():
            directory, gguf = path.parent, path.name
        elif path.is_dir():
            directory, gguf = path, None
        elif HUB_ID.match(given):
            try:
                return AutoTokenizer.from_pretrained(given)
            except Exception as exc:
                raise ConfigError(
                    f"could not fetch tokenizer {given!r} from the Hugging Face hub "
                    f"({type(exc).__name__}); pass a local tokenizer directory to --tokenizer-path"
                ) from None
        else:
            raise ConfigError(f"--tokenizer-path {given!r} does not exist; pass a directory, a .gguf file or a hub id")
    else:
        source = source or resolve_model_source(settings)
        directory, gguf = source.model_dir, source.gguf_file
    if gguf is None and not has_tokenizer(directory):
        raise ConfigError(
            f"no tokenizer in {directory} (none of {', '.join(TOKENIZER_FILES)}); pass "
            "--tokenizer-path DIR_OR_HUB_ID, or send token ids (a --load-format dummy model "
            "needs no tokenizer)"
        )
    try:
        return AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf)
    except Exception as exc:
        raise ConfigError(
            f"could not load the tokenizer from {directory / (gguf or '')}: {type(exc).__name__}: {exc}"
        ) from None


# -- weights ------------------------------------------------------------------------------------


def iter_checkpoint(
    files: Sequence[Path], load_format: str, progress: bool | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``(name, tensor)`` pairs from safetensors or ``.bin`` files, one tensor in memory at a time.

    A tqdm bar (bytes) is shown when there is more than one file or more than 1 GiB, unless
    ``progress`` says otherwise.
    """
    from tqdm.auto import tqdm

    total = sum(f.stat().st_size for f in files)
    show = progress if progress is not None else (len(files) > 1 or total > PROGRESS_BYTES)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not show)
    try:
        for path in files:
            if load_format == "safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    for name in handle.keys():
                        tensor = handle.get_tensor(name)
                        bar.update(tensor.numel() * tensor.element_size())
                        yield name, tensor
            elif load_format == "pt":
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                for name, tensor in state.items():
                    bar.update(tensor.numel() * tensor.element_size())
                    yield name, tensor
                del state
            else:
                raise ConfigError(f"cannot stream load format {load_format!r}; use safetensors or pt")
    finally:
        bar.close()


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights in place, on the model's own device and dtype: normal(0, std), norms 1, biases 0.

    A tensor-parallel shard (a model with ``tp.size > 1``) draws each parameter at its unsharded
    shape and keeps its own part, so every rank holds a slice of the same model as a single-rank
    run with the same seed (one unsharded parameter at a time is the extra memory)."""
    norm_params = {
        id(p)
        for name, m in model.named_modules()
        if "norm" in type(m).__name__.lower()
        for p in m.parameters(recurse=False)
    }
    tp = getattr(model, "tp", None)
    sharded = tp is not None and tp.size > 1
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if id(param) in norm_params or name.endswith("norm.weight"):
            param.fill_(0.0 if name.endswith(".bias") else 1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            gen = generators.setdefault(param.device, torch.Generator(device=param.device).manual_seed(seed))
            if sharded:
                full = torch.empty(model.full_parameter_shape(name), dtype=param.dtype, device=param.device)
                param.copy_(model.shard_parameter(name, full.normal_(0.0, std, generator=gen)))
            else:
                param.normal_(0.0, std, generator=gen)


def load_model(
    settings: Settings,
    plugins: PluginManager,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    source: ModelSource | None = None,
    tp: Any = None,
):
    """Build and fill the base model. Returns ``(model, config)``; the model is in eval mode.

    ``device`` and ``dtype`` default to the settings' resolved values; names and torch objects
    both work. The architecture comes from ``config.architectures[0]`` through
    ``plugins.models`` (an unknown one raises ConfigError listing the known ones). With ``tp`` (a
    :class:`~loraserve.distributed.TensorParallel` of more than one rank) the factory gets it as
    ``tp=`` and builds this rank's shard; weights are read whole and each rank keeps its part.
    """
    device = to_torch_device(device if device is not None else settings.resolved_device())
    dtype = to_torch_dtype(dtype if dtype is not None else settings.resolved_dtype(), device)
    source = source or resolve_model_source(settings)
    start = time.perf_counter()
    hf_model = None
    if source.load_format == "gguf":
        hf_model = _load_gguf(source, dtype)
        config = hf_model.config
    else:
        config = load_config(source)
    if tp is None or tp.size == 1:
        model = plugins.models.create(architecture(config), config, dtype, device)
    else:
        try:
            model = plugins.models.create(architecture(config), config, dtype, device, tp=tp)
        except TypeError as exc:
            if "tp" not in str(exc):
                raise
            raise ConfigError(
                f"the model plugin for {architecture(config)} does not support tensor parallelism "
                "(its factory takes no tp argument); use --tp-size 1"
            ) from None
    if source.load_format == "dummy":
        init_dummy_weights(model, seed=settings.random_seed or 0)
    elif hf_model is not None:
        model.load_weights(hf_model.state_dict().items())
        del hf_model
    else:
        model.load_weights(iter_checkpoint(source.weight_files, source.load_format))
    model.eval()
    logger.info(
        "loaded %s (%s, %s weights) on %s as %s in %.1f s",
        source.name or source.model_dir,
        architecture(config),
        source.load_format,
        device,
        str(dtype).removeprefix("torch."),
        time.perf_counter() - start,
    )
    return model, config


def _load_gguf(source: ModelSource, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    path = source.model_dir / str(source.gguf_file)
    logger.info("dequantising %s through transformers (this reads the whole file)", path)
    try:
        return AutoModelForCausalLM.from_pretrained(str(source.model_dir), gguf_file=source.gguf_file, dtype=dtype)
    except ImportError as exc:
        raise ConfigError(f"reading {path} needs the gguf package ({exc}); run: pip install gguf") from None
    except Exception as exc:
        raise ConfigError(f"could not load GGUF file {path}: {type(exc).__name__}: {exc}") from None
