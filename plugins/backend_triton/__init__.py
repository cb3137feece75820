"""Built-in plugin: SGMV LoRA kernels in Triton (one segment per request)."""

from __future__ import annotations

from loraserve import hookimpl


def _make(settings=None, device="cpu"):
    from loraserve.errors import NotSupportedYet

    raise NotSupportedYet("--lora-backend triton is not supported yet: its kernels have not landed; "
                          "use --lora-backend torch")


@hookimpl
def loraserve_register_backends(register):
    register("triton", _make, description="SGMV Triton kernels, one segment per request")
