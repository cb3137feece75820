"""Built-in plugin: the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2) from ``loraserve.models.llama``."""

from __future__ import annotations

from loraserve import hookimpl

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def _make(config, dtype, device, tp=None):
    from loraserve.models.llama import LlamaForCausalLM

    return LlamaForCausalLM(config, dtype=dtype, device=device, tp=tp)


@hookimpl
def loraserve_register_models(register):
    for arch in ARCHITECTURES:
        register(arch, _make, description="Llama-family decoder (fused qkv and gate_up)")
