"""Built-in plugin: SGMV LoRA kernels in Triton (one segment per request).

Its ``kernels`` module also holds the shrink/expand kernels that backend_csgmv reuses; Triton is
imported only when a factory runs.
"""

from __future__ import annotations

from loraserve import hookimpl


def _make(settings=None, device="cuda"):
    import torch

    from loraserve.plugins.backend_triton.backend import SgmvLoRABackend
    from loraserve.plugins.backend_triton.plans import plans_for

    return SgmvLoRABackend(device, plans=plans_for(torch.device(device)))


@hookimpl
def loraserve_register_backends(register):
    register("triton", _make, description="SGMV Triton kernels, one segment per request", priority={"cuda": 50})
