"""Reading and checking a PEFT ``adapter_config.json``, and matching it to the base model's modules.

:class:`PeftLoraConfig` keeps the fields that change what an adapter computes and refuses those
loraserve cannot serve, naming the field and the value to use instead. Target matching follows
peft 0.21 exactly (``peft.tuners.tuners_utils.check_target_module_exists`` and
``peft.utils.other.get_pattern_key``), reimplemented so that serving does not depend on peft:
a list entry matches a module whose full name equals it or ends with ``"." + entry``; a string is
a regex that must ``re.fullmatch`` the full name (and then ``layers_to_transform`` does not apply,
as in PEFT); a ``rank_pattern`` / ``alpha_pattern`` key is a regex matched at the end of the name
after a dot, the first matching key winning. Full names are those of ``LlamaForCausalLM``
(``model.layers.3.self_attn.q_proj``, ``model.embed_tokens``, ``lm_head``). Every regex of a
config is bounded in length and in matching time (see :mod:`.patterns`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

from loraserve.contract import AdapterError
from loraserve.lora.adapter import lora_scaling
from loraserve.lora.targets import LAYER_MODULES, SUPPORTED_MODULES
from loraserve.plugins.loader_peft.patterns import PatternBudget, check_pattern

CONFIG_NAME = "adapter_config.json"
_SUBLAYER = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
# Modules of a Llama model LoRA cannot target: a regex that reaches them is refused (PEFT fails too).
_OTHER_LAYER_MODULES = ("", ".self_attn", ".mlp", ".mlp.act_fn", ".input_layernorm", ".post_attention_layernorm")
_OTHER_MODEL_MODULES = ("model", "model.layers", "model.norm", "model.rotary_emb")
# Config fields whose non-default value changes the computation in a way loraserve does not serve.
_REFUSED: dict[str, str] = {
    "lora_bias": "LoRA bias terms are not supported; retrain with lora_bias=false",
    "modules_to_save": "fully trained copies of modules are not supported; retrain without modules_to_save",
    "trainable_token_indices": "trained token embeddings are not supported; retrain without trainable_token_indices",
    "layer_replication": "layer replication is not supported; retrain without layer_replication",
    "target_parameters": "LoRA on parameters (MoE experts) is not supported; target modules instead",
    "alora_invocation_tokens": "activated LoRA is not supported; retrain without alora_invocation_tokens",
    "use_qalora": "QA-LoRA is not supported; retrain with use_qalora=false",
}


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object, turning every failure into an AdapterError that names the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path} does not exist; {what}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AdapterError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise AdapterError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); fix or regenerate the file"
        ) from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def canonical_modules(num_layers: int) -> dict[str, tuple[int | None, str]]:
    """Full name -> (layer index or None, PEFT module name) for every module LoRA may target."""
    names: dict[str, tuple[int | None, str]] = {"model.embed_tokens": (None, "embed_tokens")}
    for i in range(num_layers):
        for module in LAYER_MODULES:
            names[f"model.layers.{i}.{_SUBLAYER[module]}.{module}"] = (i, module)
    names["lm_head"] = (None, "lm_head")
    return names


def _other_modules(num_layers: int) -> list[str]:
    return [f"model.layers.{i}{s}" for i in range(num_layers) for s in _OTHER_LAYER_MODULES] + list(
        _OTHER_MODEL_MODULES
    )


@dataclass(frozen=True)
class PeftLoraConfig:
    """The fields of ``adapter_config.json`` that decide which modules carry LoRA and how it scales."""

    path: str
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str
    exclude_modules: tuple[str, ...] | str | None
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    layers_to_transform: tuple[int, ...] | None
    layers_pattern: tuple[str, ...] | None
    fan_in_fan_out: bool
    raw: dict[str, Any]
    #: DoRA (``use_dora``): every targeted module also has a ``lora_magnitude_vector``
    use_dora: bool
    #: the time this config's regexes may still spend matching module names
    budget: PatternBudget = dataclass_field(compare=False, repr=False)

    @classmethod
    def read(cls, directory: Path) -> PeftLoraConfig:
        path = directory / CONFIG_NAME
        data = read_json(
            path, f"a PEFT adapter directory must hold {CONFIG_NAME}; pass the directory save_pretrained() wrote"
        )
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str) -> PeftLoraConfig:
        _check_supported(data, path)
        r = data.get("r", 8)
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise _bad(data, path, "r", "a positive integer")
        alpha = data.get("lora_alpha", 8)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise _bad(data, path, "lora_alpha", "a number")
        rank_pattern, alpha_pattern = _rank_and_alpha_patterns(data, path)
        layers, pattern = _layer_selection(data, path)
        return cls(
            path=path,
            r=r,
            lora_alpha=float(alpha),
            target_modules=_targets(data, path),
            exclude_modules=_excluded(data, path),
            use_rslora=bool(data.get("use_rslora", False)),
            rank_pattern=dict(rank_pattern),
            alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
            layers_to_transform=layers,
            layers_pattern=pattern,
            fan_in_fan_out=bool(data.get("fan_in_fan_out", False)),
            raw=data,
            use_dora=bool(data.get("use_dora", False)),
            budget=PatternBudget(path),
        )

    # -- matching (peft.tuners.tuners_utils.check_target_module_exists) ---------------------------

    def targets(self, key: str) -> bool:
        """Whether PEFT would put LoRA on the module with full name ``key``."""
        ex = self.exclude_modules
        if ex is not None:
            if isinstance(ex, str):
                if self.budget.fullmatch(ex, key, "exclude_modules"):
                    return False
            elif key in ex or any(key.endswith(f".{e}") for e in ex):
                return False
        if isinstance(self.target_modules, str):
            return self.budget.fullmatch(self.target_modules, key, "target_modules")
        if key in self.target_modules:
            return True
        if not any(key.endswith(f".{t}") for t in self.target_modules):
            return False
        if self.layers_to_transform is None:
            return True
        if self.layers_pattern is None:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            match = None
            for p in self.layers_pattern:
                match = self.budget.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key, "layers_pattern", p)
                if match is not None:
                    break
        return match is not None and int(match.group("idx")) in self.layers_to_transform

    def targeted_modules(self, num_layers: int) -> dict[str, tuple[int | None, str]]:
        """Full name -> (layer, PEFT name) of every module of the base model this config targets.

        Raises AdapterError when the config reaches a module loraserve cannot serve or no module at all.
        """
        if isinstance(self.target_modules, str):
            for key in _other_modules(num_layers):
                if self.targets(key):
                    raise AdapterError(
                        f"{self.path}: target_modules regex {self.target_modules!r} matches module "
                        f"{key!r}, which loraserve does not support; supported: "
                        f"{', '.join(SUPPORTED_MODULES)}"
                    )
        found = {k: v for k, v in canonical_modules(num_layers).items() if self.targets(k)}
        if not found:
            raise AdapterError(
                f"{self.path}: target_modules {self.target_modules!r} (with layers_to_transform "
                f"{self.layers_to_transform}) matches no module of the base model "
                f"({num_layers} layers); check the adapter was trained for this base model"
            )
        return found

    # -- per-module rank and scaling (peft.utils.other.get_pattern_key) ---------------------------

    def _pattern_key(self, pattern: dict[str, Any], key: str, field: str) -> str | None:
        for p in pattern:
            if self.budget.match(rf"(.*\.)?({p})$", key, f"{field} key", p):
                return p
        return None

    def module_rank(self, key: str) -> tuple[int, str]:
        """(rank, where it comes from) for the module with full name ``key``."""
        p = self._pattern_key(self.rank_pattern, key, "rank_pattern")
        return (self.r, "r") if p is None else (self.rank_pattern[p], f"rank_pattern[{p!r}]")

    def module_scaling(self, key: str) -> float:
        p = self._pattern_key(self.alpha_pattern, key, "alpha_pattern")
        alpha = self.lora_alpha if p is None else self.alpha_pattern[p]
        return lora_scaling(self.module_rank(key)[0], alpha, self.use_rslora)

    @property
    def scaling(self) -> float:
        """The adapter-wide scaling the kernels apply (module deviations are folded into B).

        With ``lora_alpha = 0`` it is 1 so that modules given a non-zero alpha by alpha_pattern survive.
        """
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora) or 1.0


# -- reading adapter_config.json, field by field ----------------------------------------------------


def _bad(data: dict[str, Any], path: str, field: str, expected: str) -> AdapterError:
    return AdapterError(f"{path}: {field} = {data.get(field)!r} is invalid; expected {expected}")


def _check_supported(data: dict[str, Any], path: str) -> None:
    """Refuse what loraserve does not serve: other PEFT types, refused features, trained biases."""
    peft_type = data.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterError(f"{path}: peft_type = {peft_type!r}; only LoRA adapters (peft_type LORA) are supported")
    for field, why in _REFUSED.items():
        if data.get(field):
            raise AdapterError(f"{path}: {field} = {data[field]!r}; {why}")
    if data.get("bias", "none") != "none":
        raise AdapterError(
            f"{path}: bias = {data['bias']!r}; trained biases are not supported, only "
            "bias='none'; retrain with bias='none'"
        )


def _targets(data: dict[str, Any], path: str) -> str | tuple[str, ...]:
    targets = data.get("target_modules")
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return LAYER_MODULES  # PEFT: every linear layer but the output layer
        check_pattern(path, "target_modules", targets)
        return targets
    if isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets):
        for t in targets:
            leaf = t.rsplit(".", 1)[-1]
            if leaf not in SUPPORTED_MODULES:
                raise AdapterError(
                    f"{path}: target_modules entry {t!r} names module {leaf!r}, which "
                    f"loraserve does not support; supported: {', '.join(SUPPORTED_MODULES)}"
                )
        return tuple(targets)
    raise _bad(data, path, "target_modules", "a non-empty list of module names or a regex string")


def _excluded(data: dict[str, Any], path: str) -> str | tuple[str, ...] | None:
    exclude = data.get("exclude_modules")
    if isinstance(exclude, list):
        return tuple(exclude)
    if isinstance(exclude, str):
        check_pattern(path, "exclude_modules", exclude)
        return exclude
    if exclude is not None:
        raise _bad(data, path, "exclude_modules", "a list of module names, a regex string or null")
    return None


def _rank_and_alpha_patterns(data: dict[str, Any], path: str) -> tuple[dict, dict]:
    rank_pattern = data.get("rank_pattern") or {}
    alpha_pattern = data.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in rank_pattern.values()
    ):
        raise _bad(data, path, "rank_pattern", "an object mapping module-name patterns to positive integer ranks")
    if not isinstance(alpha_pattern, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in alpha_pattern.values()
    ):
        raise _bad(data, path, "alpha_pattern", "an object mapping module-name patterns to numbers")
    for field, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for key in pattern:
            check_pattern(path, f"{field} key", key)
    return rank_pattern, alpha_pattern


def _layer_selection(data: dict[str, Any], path: str) -> tuple[tuple[int, ...] | None, tuple[str, ...] | None]:
    """``layers_to_transform`` and ``layers_pattern``, normalised to tuples (None: every layer)."""
    layers = data.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = (layers,)
    elif isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        layers = tuple(layers) or None  # PEFT: an empty list means every layer
    elif layers is not None:
        raise _bad(data, path, "layers_to_transform", "an integer, a list of integers or null")
    pattern = data.get("layers_pattern")
    if isinstance(pattern, str):
        pattern = (pattern,) if pattern else None
    elif isinstance(pattern, list) and all(isinstance(p, str) for p in pattern):
        pattern = tuple(pattern) or None
    elif pattern is not None:
        raise _bad(data, path, "layers_pattern", "a string, a list of strings or null")
    for p in pattern or ():
        check_pattern(path, "layers_pattern", p)
    return layers, pattern
