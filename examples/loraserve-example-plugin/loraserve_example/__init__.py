"""An example third-party loraserve plugin: the ``einsum`` backend, the ``lfu`` eviction policy and
an option of its own, ``--einsum-priority``, that can make ``einsum`` the default backend."""

from __future__ import annotations

from pydantic import Field

from loraserve import hookimpl
from loraserve.contract import PluginOptions


class EinsumOptions(PluginOptions):
    """Options of the example plugin (the einsum LoRA backend)."""

    einsum_priority: int = Field(
        -1,
        description=(
            "Priority of the einsum backend on every device; above the built-ins' (100 for csgmv on CUDA and torch "
            "on CPU) it becomes the default LoRA backend."
        ),
    )


def _make_backend(settings=None, device="cpu", options=None):
    from loraserve_example.backend import EinsumLoRABackend

    return EinsumLoRABackend(device)


def _make_lfu(options=None):
    from loraserve_example.lfu import LFUPolicy

    return LFUPolicy()


@hookimpl
def loraserve_register_options(register):
    register(EinsumOptions)


@hookimpl
def loraserve_register_backends(register, options):
    priority = options.einsum_priority
    register(
        "einsum",
        _make_backend,
        description="per-token gathered weights applied with einsum (example)",
        priority={"cpu": priority, "cuda": priority},
    )


@hookimpl
def loraserve_register_eviction_policies(register):
    register("lfu", _make_lfu, description="evict the least frequently used adapter (example)")
