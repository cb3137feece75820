"""An example third-party loraserve plugin: the ``einsum`` backend and the ``lfu`` eviction policy."""

from __future__ import annotations

from loraserve import hookimpl


def _make_backend(settings=None, device="cpu"):
    from loraserve_example.backend import EinsumLoRABackend

    return EinsumLoRABackend(device)


def _make_lfu():
    from loraserve_example.lfu import LFUPolicy

    return LFUPolicy()


@hookimpl
def loraserve_register_backends(register):
    register("einsum", _make_backend, description="per-token gathered weights applied with einsum (example)")


@hookimpl
def loraserve_register_eviction_policies(register):
    register("lfu", _make_lfu, description="evict the least frequently used adapter (example)")
