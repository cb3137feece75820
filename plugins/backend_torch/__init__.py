"""Built-in plugin: the pure-PyTorch LoRA backend, the CPU default and the oracle for every kernel."""

from __future__ import annotations

from loraserve import hookimpl


def _make(settings=None, device="cpu"):
    from loraserve.plugins.backend_torch.backend import TorchLoRABackend

    return TorchLoRABackend(device)


@hookimpl
def loraserve_register_backends(register):
    register(
        "torch",
        _make,
        description="pure PyTorch reference backend (CPU default, kernel oracle)",
        priority={"cpu": 100, "cuda": 0},
    )
