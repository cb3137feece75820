"""Built-in plugin: PEFT LoRA adapters from a local directory or a Hugging Face hub id."""

from __future__ import annotations

from loraserve import hookimpl


def _make():
    from loraserve.plugins.loader_peft.loader import PeftAdapterLoader

    return PeftAdapterLoader()


@hookimpl
def loraserve_register_loaders(register):
    register("peft", _make, description="PEFT adapter directory (adapter_config.json + weights) or hub id")
