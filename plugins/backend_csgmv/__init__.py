"""Built-in plugin: chunked SGMV LoRA kernels in Triton (tokens sorted by slot, fixed-size chunks)."""

from __future__ import annotations

from loraserve import hookimpl


def _make(settings=None, device="cpu"):
    from loraserve.errors import NotSupportedYet

    raise NotSupportedYet("--lora-backend csgmv is not supported yet: its kernels have not landed; "
                          "use --lora-backend torch")


@hookimpl
def loraserve_register_backends(register):
    register("csgmv", _make, description="chunked SGMV Triton kernels (default on CUDA)")
