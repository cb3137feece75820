"""Built-in plugin: chunked SGMV LoRA kernels in Triton (tokens sorted by slot, fixed-size chunks)."""

from __future__ import annotations

from loraserve import hookimpl


def _make(settings=None, device="cuda"):
    from loraserve.plugins.backend_csgmv.backend import ChunkedSgmvLoRABackend

    max_chunk = getattr(settings, "max_lora_chunk_size", None) or 16
    return ChunkedSgmvLoRABackend(device, max_chunk=max_chunk)


@hookimpl
def loraserve_register_backends(register):
    register("csgmv", _make, description="chunked SGMV Triton kernels (default on CUDA)")
