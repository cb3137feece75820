"""Built-in plugin: chunked SGMV LoRA kernels in Triton (tokens sorted by slot, fixed-size chunks).

The default LoRA backend on CUDA (the highest built-in priority there). Its one option,
``--max-lora-chunk-size`` (SGLang's flag), is declared here, not in the core settings.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from loraserve import hookimpl
from loraserve.contract import PluginOptions

CHUNK_SIZES = (16, 32, 64, 128)


class CsgmvOptions(PluginOptions):
    """Options of the chunked SGMV backend (--lora-backend csgmv)."""

    max_lora_chunk_size: int = Field(
        16,
        description="Largest number of tokens per chunk of the chunked SGMV kernels.",
        json_schema_extra={"choices": list(CHUNK_SIZES)},
    )

    @field_validator("max_lora_chunk_size")
    @classmethod
    def _check_chunk(cls, value: int) -> int:
        if value not in CHUNK_SIZES:
            raise ValueError(f"must be one of {', '.join(map(str, CHUNK_SIZES))}, not {value}")
        return value


def _make(settings=None, device="cuda", options=None):
    import torch

    from loraserve.plugins.backend_csgmv.backend import ChunkedSgmvLoRABackend
    from loraserve.plugins.backend_triton.plans import plans_for

    chunk = (options or CsgmvOptions()).max_lora_chunk_size
    return ChunkedSgmvLoRABackend(device, max_chunk=chunk, plans=plans_for(torch.device(device)))


@hookimpl
def loraserve_register_options(register):
    register(CsgmvOptions)


@hookimpl
def loraserve_register_backends(register):
    register("csgmv", _make, description="chunked SGMV Triton kernels (default on CUDA)", priority={"cuda": 100})
