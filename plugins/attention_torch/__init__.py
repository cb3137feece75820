"""Built-in plugin: attention over the paged KV cache with PyTorch SDPA (``--attention-backend torch_native``).

The default on CPU; it loops over sequences on the host, so decode steps using it are not captured
in CUDA graphs.
"""

from __future__ import annotations

from loraserve import hookimpl


def make_attention(spec):
    from loraserve.runner.attention import PagedSDPAAttention

    return PagedSDPAAttention(spec.kv, sliding_window=spec.sliding_window)


@hookimpl
def loraserve_register_attention_backends(register):
    register(
        "torch_native",
        make_attention,
        description="PyTorch SDPA per sequence (CPU, and a CUDA fallback)",
        priority={"cpu": 100, "cuda": 0},
    )
