"""``PeftAdapterLoader``: a PEFT LoRA adapter (directory or hub id) -> :class:`LoRAAdapter`.

It reads ``adapter_config.json`` (see :mod:`.config` for what is honoured and refused), checks the
engine's limits before touching the weights, then maps every tensor of the weights file to a module
the config targets and checks its shape against the base model, naming the tensor, the expected and
the actual shape on any mismatch. Accepted key forms are those save_pretrained() writes:
``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``, with or without an adapter name
(``.lora_A.default.weight``), ``...embed_tokens.lora_embedding_A`` / ``_B`` for the embedding, and
the ``base_layer.weight`` copies of embed_tokens / lm_head that PEFT saves beside embedding LoRA
(checked for vocabulary size, otherwise ignored: the engine serves the base model's own weights).

``fan_in_fan_out`` needs no transposition: PEFT stores lora_A / lora_B as ``nn.Linear`` weights
(``[r, in]`` / ``[out, r]``) whatever the flag, which only concerns the base layer's layout (Conv1D);
for Llama's ``nn.Linear`` layers PEFT itself resets it to False.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from loraserve.contract import AdapterError, AdapterLoader, AdapterSummary
from loraserve.lora.adapter import BaseModelShape, LoRAAdapter, ModuleLoRA, build_adapter
from loraserve.lora.loader import check_max_rank, check_target_modules
from loraserve.lora.targets import EMBEDDING_MODULES, SUPPORTED_MODULES
from loraserve.plugins.loader_peft.config import CONFIG_NAME, PeftLoraConfig, canonical_modules
from loraserve.plugins.loader_peft.files import (
    BIN_NAME,
    SAFETENSORS_NAME,
    check_vocabulary,
    looks_like_hub_id,
    read_weights,
    resolve_directory,
)

if TYPE_CHECKING:
    from loraserve.lora.policy import AdapterSourcePolicy

_LORA_KEY = re.compile(r"(?P<module>.+?)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight")
_EMBEDDING_KEY = re.compile(r"(?P<module>.+?)\.(?P<kind>lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?")
_MAGNITUDE_KEY = re.compile(
    r"(?P<module>.+?)\.(?P<kind>lora_magnitude_vector)(?:\.(?!weight$)(?P<adapter>[^.]+))?(?:\.weight)?"
)
_BASE_LAYER_KEY = re.compile(r"(?P<module>.+)\.base_layer\.weight")
_LAYER_PATH = re.compile(r"(?:.*\.)?layers\.(?P<idx>\d+)\.(?P<sub>self_attn|mlp)\.(?P<leaf>\w+)")
# Peek without a base model: layer indices in configs never exceed this.
_PEEK_LAYERS = 256


class PeftAdapterLoader(AdapterLoader):
    """Loads PEFT LoRA adapters; stateless (see :class:`AdapterLoader` for the contract)."""

    name = "peft"

    def can_load(self, source: str) -> bool:
        if not isinstance(source, str) or not source.strip():
            return False
        path = Path(source).expanduser()
        try:
            if path.is_dir():
                return any((path / f).is_file() for f in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME))
        except OSError:  # a name the file system cannot even look up (too long, say): not ours to read
            return False
        return looks_like_hub_id(source)

    def peek(
        self, source: str, shape: BaseModelShape | None = None, *, policy: AdapterSourcePolicy | None = None
    ) -> AdapterSummary:
        config = PeftLoraConfig.read(resolve_directory(source, config_only=True, policy=policy))
        targeted = config.targeted_modules(shape.num_layers if shape is not None else _PEEK_LAYERS)
        return AdapterSummary(
            rank=max(config.module_rank(k)[0] for k in targeted),
            target_modules=frozenset(module for _, module in targeted.values()),
        )

    def load(
        self,
        source: str,
        *,
        name: str,
        shape: BaseModelShape,
        max_rank: int | None = None,
        target_modules: Iterable[str] | None = None,
        policy: AdapterSourcePolicy | None = None,
    ) -> LoRAAdapter:
        if not isinstance(name, str) or not name:
            raise AdapterError(f"adapter name {name!r} is empty; give the adapter a name")
        directory = resolve_directory(source, policy=policy)
        config = PeftLoraConfig.read(directory)
        check_vocabulary(directory, shape.vocab_size)
        targeted = config.targeted_modules(shape.num_layers)
        _check_dora_targets(config, targeted)
        check_target_modules(source, {module for _, module in targeted.values()}, target_modules)
        check_max_rank(source, {k: config.module_rank(k) for k in targeted}, max_rank)

        tensors, weights_path = read_weights(directory)
        found = _group_tensors(tensors, weights_path, config, targeted, shape)
        feats = shape.module_features()
        modules: dict[tuple[int | None, str], ModuleLoRA] = {}
        for key, (layer, module) in targeted.items():
            pair = found.get(key, {})
            A_name, B_name = (
                ("lora_embedding_A", "lora_embedding_B") if module == "embed_tokens" else ("lora_A", "lora_B")
            )
            missing = [n for n in (A_name, B_name) if n not in pair]
            if missing and layer is not None and not any(v[0] == layer for k, v in targeted.items() if k in found):
                raise AdapterError(
                    f"{weights_path} has no tensor for layer {layer} (needed for {key}); this adapter was trained "
                    f"for a base model with fewer layers than this one's {shape.num_layers}"
                )
            if missing:
                raise AdapterError(
                    f"{weights_path}: target module {key} (selected by {CONFIG_NAME} target_modules) has no "
                    f"{' and no '.join(missing)} tensor; the weights file does not match the config, "
                    "re-save the adapter"
                )
            rank, where = config.module_rank(key)
            in_f, out_f = feats[module]
            (a_key, A), (b_key, B) = pair[A_name], pair[B_name]
            _check_shape(weights_path, a_key, A, (rank, in_f), 0, where, module, shape)
            _check_shape(weights_path, b_key, B, (out_f, rank), 1, where, module, shape)
            magnitude = _magnitude(weights_path, key, pair, config.use_dora, out_f)
            modules[(layer, module)] = ModuleLoRA(A=A, B=B, scaling=config.module_scaling(key), magnitude=magnitude)

        return build_adapter(
            name=name,
            source=source,
            shape=shape,
            scaling=config.scaling,
            modules=modules,
            r=config.r,
            lora_alpha=config.lora_alpha,
            use_rslora=config.use_rslora,
            config=dict(config.raw),
        )


def _layers(n: int) -> str:
    return f"{n} layer" if n == 1 else f"{n} layers"


def _canonical(module_path: str, canon: dict[str, tuple[int | None, str]]) -> str:
    """Full module name as ``LlamaForCausalLM`` spells it (may name a layer beyond the base model)."""
    name = module_path.removeprefix("base_model.model.")
    if name in canon:
        return name
    m = _LAYER_PATH.fullmatch(name)
    if m:
        return f"model.layers.{m['idx']}.{m['sub']}.{m['leaf']}"
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "embed_tokens":
        return "model.embed_tokens"
    return leaf if leaf == "lm_head" else name


def _group_tensors(
    tensors: dict[str, torch.Tensor],
    weights_path: Path,
    config: PeftLoraConfig,
    targeted: dict[str, tuple[int | None, str]],
    shape: BaseModelShape,
) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    """Full module name -> {"lora_A" | "lora_B" | "lora_embedding_A" | ...: (tensor key, tensor)}."""
    canon = canonical_modules(shape.num_layers)
    found: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    adapter_names: dict[str, str] = {}  # keys without an adapter name are PEFT's "default"
    for key, tensor in tensors.items():
        m = _LORA_KEY.fullmatch(key) or _EMBEDDING_KEY.fullmatch(key) or _MAGNITUDE_KEY.fullmatch(key)
        if m is not None and m["kind"] == "lora_magnitude_vector" and not config.use_dora:
            raise AdapterError(
                f"{weights_path}: tensor {key!r} is a DoRA magnitude but {config.path} does not set "
                "use_dora; the config and the weights disagree, re-save the adapter"
            )
        if m is None:
            base = _BASE_LAYER_KEY.fullmatch(key)
            module = _canonical(base["module"], canon) if base else None
            if module in ("model.embed_tokens", "lm_head") and module in targeted:
                _check_base_copy(weights_path, key, tensor, canon[module][1], shape)
                continue
            raise AdapterError(
                f"{weights_path}: tensor {key!r} is not a LoRA weight that {config.path} explains "
                "(expected ...lora_A.weight / ...lora_B.weight of a target module); remove it or "
                "fix target_modules"
            )
        adapter_names.setdefault(m["adapter"] or "default", key)
        if len(adapter_names) > 1:
            names = ", ".join(repr(n) for n in adapter_names)
            raise AdapterError(
                f"{weights_path} holds weights of several adapters ({names}, e.g. tensor {key!r}); "
                "save each adapter to its own directory"
            )
        module = _target_module(key, m["module"], weights_path, config, targeted, canon, shape)
        kind = m["kind"]
        if (kind.startswith("lora_embedding")) != (canon[module][1] == "embed_tokens"):
            raise AdapterError(
                f"{weights_path}: tensor {key!r} is a {kind} tensor, which PEFT does not write for "
                f"{module}; re-save the adapter with save_pretrained()"
            )
        slot = found.setdefault(module, {})
        if kind in slot:
            raise AdapterError(f"{weights_path}: tensors {slot[kind][0]!r} and {key!r} both hold {kind} of {module}")
        slot[kind] = (key, tensor)
    return found


def _target_module(
    key: str,
    name: str,
    weights_path: Path,
    config: PeftLoraConfig,
    targeted: dict[str, tuple[int | None, str]],
    canon: dict[str, tuple[int | None, str]],
    shape: BaseModelShape,
) -> str:
    """The canonical module that LoRA tensor ``key`` (module path ``name``) is for; AdapterError when
    loraserve does not support it, the base model lacks it, or the config does not target it."""
    module = _canonical(name, canon)
    leaf = module.rsplit(".", 1)[-1]
    if leaf not in SUPPORTED_MODULES:
        raise AdapterError(
            f"{weights_path}: tensor {key!r} puts LoRA on module {leaf!r}, which loraserve does "
            f"not support; supported: {', '.join(SUPPORTED_MODULES)}"
        )
    if module not in canon:
        lm = _LAYER_PATH.fullmatch(module)
        if lm and int(lm["idx"]) >= shape.num_layers:
            raise AdapterError(
                f"{weights_path}: tensor {key!r} is for layer {lm['idx']} but the base model has "
                f"{_layers(shape.num_layers)}; this adapter was trained for a different base model"
            )
        raise AdapterError(
            f"{weights_path}: tensor {key!r} names module {name!r}, which is not a module "
            "of a Llama-family model; this adapter was trained for a different architecture"
        )
    if module not in targeted:
        raise AdapterError(
            f"{weights_path}: tensor {key!r} is for module {module}, which {config.path} does not "
            f"target (target_modules {config.target_modules!r}, layers_to_transform "
            f"{config.layers_to_transform}); the config and the weights disagree"
        )
    return module


def _check_shape(
    path: Path,
    key: str,
    tensor: torch.Tensor,
    expected: tuple[int, int],
    rank_axis: int,
    rank_from: str,
    module: str,
    shape: BaseModelShape,
) -> None:
    if not tensor.is_floating_point():
        raise AdapterError(f"{path}: tensor {key!r} has dtype {tensor.dtype}; LoRA weights must be floating point")
    actual = tuple(tensor.shape)
    if actual != expected:
        size_axis = 1 - rank_axis
        if len(actual) == 2 and actual[size_axis] == expected[size_axis]:
            why = (
                f"its rank {actual[rank_axis]} disagrees with {rank_from} = {expected[rank_axis]} in "
                f"{CONFIG_NAME}; the config and the weights disagree, re-save the adapter"
            )
        else:
            why = (
                f"the base model's {module} is {shape.module_features()[module][0]} -> "
                f"{shape.module_features()[module][1]}; this adapter does not fit the base model"
            )
            if module in EMBEDDING_MODULES and len(actual) == 2 and shape.vocab_size not in actual:
                why += (
                    f" (its vocabulary differs from the base model's {shape.vocab_size} tokens, and adapters "
                    "with added tokens are not supported)"
                )
        raise AdapterError(f"{path}: tensor {key!r} has shape {actual}, expected {expected}: {why}")
    if not _all_finite(tensor):
        raise AdapterError(f"{path}: tensor {key!r} holds NaN or infinite values; the adapter is corrupt")


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite: the float64 sum of a 16- or 32-bit tensor is finite exactly then
    (NaN and infinities carry through it, and no sum of finite such values reaches float64's range),
    and one reduction costs 4-10x less than ``isfinite().all()`` (which writes a mask first)."""
    if tensor.dtype == torch.float64:  # (a float64 sum of finite values may overflow)
        return bool(torch.isfinite(tensor).all())
    return math.isfinite(tensor.sum(dtype=torch.float64).item())


def _check_dora_targets(config: PeftLoraConfig, targeted: dict[str, tuple[int | None, str]]) -> None:
    on_embeddings = sorted({module for _, module in targeted.values() if module in EMBEDDING_MODULES})
    if config.use_dora and on_embeddings:
        raise AdapterError(
            f"{config.path}: use_dora with target module(s) {', '.join(on_embeddings)}: DoRA is served on the "
            "layer projections (q/k/v/o/gate/up/down_proj) only; retrain without DoRA on those modules"
        )


def _magnitude(
    path: Path, module: str, pair: dict[str, tuple[str, torch.Tensor]], use_dora: bool, out_f: int
) -> torch.Tensor | None:
    """A DoRA module's ``lora_magnitude_vector [out]`` (checked), None without ``use_dora``."""
    if not use_dora:
        return None
    if "lora_magnitude_vector" not in pair:
        raise AdapterError(
            f"{path}: target module {module} has no lora_magnitude_vector tensor although {CONFIG_NAME} sets "
            "use_dora; the weights file does not match the config, re-save the adapter"
        )
    key, m = pair["lora_magnitude_vector"]
    if not m.is_floating_point() or tuple(m.shape) != (out_f,):
        raise AdapterError(
            f"{path}: tensor {key!r} has shape {tuple(m.shape)} and dtype {m.dtype}, expected a floating-point "
            f"({out_f},) DoRA magnitude (one value per output feature of {module})"
        )
    if not bool(torch.isfinite(m).all()):
        raise AdapterError(f"{path}: tensor {key!r} holds NaN or infinite values; the adapter is corrupt")
    return m


def _check_base_copy(path: Path, key: str, tensor: torch.Tensor, module: str, shape: BaseModelShape) -> None:
    expected = (shape.vocab_size, shape.hidden_size)
    if tuple(tensor.shape) != expected:
        raise AdapterError(
            f"{path}: tensor {key!r} (the {module} weights PEFT saves beside embedding LoRA) has shape "
            f"{tuple(tensor.shape)}, expected {expected}; an adapter whose vocabulary differs from the "
            "base model's (added tokens) is not supported"
        )
