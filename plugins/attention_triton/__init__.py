"""Built-in plugin: attention over the paged KV cache with Triton kernels (``--attention-backend triton``).

The default on CUDA (its priority there beats ``torch_native``), and the only built-in attention
that decode steps can be captured with in CUDA graphs.
"""

from __future__ import annotations

from loraserve import hookimpl


def make_attention(spec):
    from loraserve.errors import ConfigError
    from loraserve.models.dtypes import runs_triton

    if not runs_triton(spec.device):
        raise ConfigError(
            f"--attention-backend triton runs Triton kernels and needs a CUDA device, not "
            f"{spec.device.type!r}; use --attention-backend torch_native (tests may set TRITON_INTERPRET=1)"
        )
    from loraserve.plugins.attention_triton.attention import PagedTritonAttention

    return PagedTritonAttention(
        spec.kv,
        sliding_window=spec.sliding_window,
        max_seqs=spec.max_seqs,
        max_blocks_per_seq=-(-spec.context_len // spec.kv.block_size),
    )


@hookimpl
def loraserve_register_attention_backends(register):
    register(
        "triton",
        make_attention,
        description="Triton paged attention: flash-decoding and flash prefill, CUDA-graph capturable",
        priority={"cuda": 100},
    )
