"""Shared helpers for LoRA tests: tiny Llama models, seeded PEFT adapters, and PEFT as the oracle.

``tiny_llama_config`` / ``tiny_model`` build a small float32 ``LlamaForCausalLM`` (GQA, untied
embeddings) in milliseconds. ``make_peft_adapter`` saves a real PEFT adapter whose lora_A and
lora_B are both random (PEFT starts B at zero, which would hide every bug). ``load_peft_model``
loads one back through PEFT, and ``peft_module_delta`` / ``peft_fused_delta`` give what PEFT adds
for a module, to compare with ``fused_lora_delta`` computed from our weights as the kernel contract
in ``loraserve.contract`` states it. ``write_adapter_dir`` writes hand-made adapters.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from loraserve.lora.adapter import BaseModelShape
from loraserve.lora.targets import FUSED_MODULES

_SUBLAYER = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def tiny_llama_config(**overrides: Any):
    """A small Llama config: hidden 64, 2 layers, 4 heads (2 KV heads), intermediate 128, vocab 256."""
    from transformers import LlamaConfig

    values: dict[str, Any] = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=256,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        dtype="float32",
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_model(config=None, seed: int = 0):
    """A ``LlamaForCausalLM`` with seeded random weights, in eval mode (float32)."""
    from transformers import LlamaForCausalLM

    config = config if config is not None else tiny_llama_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float().eval()


def shape_of(model_or_config) -> BaseModelShape:
    config = getattr(model_or_config, "config", model_or_config)
    return BaseModelShape.from_config(config)


def make_peft_adapter(
    model_or_config,
    out_dir,
    *,
    r: int,
    lora_alpha: float,
    target_modules,
    seed: int,
    use_rslora: bool = False,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    layers_to_transform=None,
    layers_pattern=None,
    init_scale: float = 0.1,
    **lora_config: Any,
) -> Path:
    """Save a PEFT LoRA adapter with random lora_A and lora_B (seeded) and return its directory.

    ``model_or_config`` is the base model (deep-copied, never modified) or a config, in which case the
    base is ``tiny_model(config, seed=0)``. Extra keyword arguments go to ``peft.LoraConfig``.
    """
    from peft import LoraConfig, get_peft_model

    base = model_or_config if isinstance(model_or_config, torch.nn.Module) else tiny_model(model_or_config, seed=0)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules,
        use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
        lora_dropout=0.0,
        **lora_config,
    )
    peft_model = get_peft_model(copy.deepcopy(base), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * init_scale)
    out = Path(out_dir)
    peft_model.save_pretrained(str(out))
    return out


def load_peft_model(base, adapter_dir):
    """PEFT's own view of an adapter: ``PeftModel.from_pretrained`` on a copy of ``base``, eval mode."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()


def write_adapter_dir(out_dir, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write a hand-made adapter: ``adapter_config.json`` (PEFT defaults filled in) + safetensors."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    full = {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 8,
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    full.update(config)
    (out / "adapter_config.json").write_text(json.dumps(full))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    return out


def _inner(peft_model):
    """The ``LlamaForCausalLM`` inside a PeftModel."""
    return peft_model.base_model.model


def peft_module(peft_model, layer: int | None, module: str) -> torch.nn.Module:
    inner = _inner(peft_model)
    if module == "embed_tokens":
        return inner.model.embed_tokens
    if module == "lm_head":
        return inner.lm_head
    return getattr(getattr(inner.model.layers[layer], _SUBLAYER[module]), module)


@torch.no_grad()
def peft_module_delta(peft_model, layer: int | None, module: str, x: torch.Tensor) -> torch.Tensor:
    """What PEFT's LoRA adds to the module's output for input ``x`` (zeros if the module has no LoRA)."""
    mod = peft_module(peft_model, layer, module)
    base = getattr(mod, "base_layer", None)
    if base is None:
        return torch.zeros_like(mod(x))
    return mod(x) - base(x)


def peft_fused_delta(peft_model, layer: int, fused_name: str, x: torch.Tensor) -> torch.Tensor:
    """PEFT's deltas of a fused projection's members, concatenated in the fused output order."""
    return torch.cat([peft_module_delta(peft_model, layer, m, x) for m in FUSED_MODULES[fused_name]], dim=-1)


def fused_lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, output_offsets) -> torch.Tensor:
    """``scaling * (x @ A_i^T) @ B_i^T`` per slice, as the backend contract defines it."""
    n = len(output_offsets) - 1
    r = A.shape[0] // n
    parts = []
    for i in range(n):
        lo, hi = output_offsets[i], output_offsets[i + 1]
        parts.append(scaling * (x @ A[i * r : (i + 1) * r].T) @ B[lo:hi].T)
    return torch.cat(parts, dim=-1)
