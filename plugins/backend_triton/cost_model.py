"""The tiled backends' built-in cost model: the choices an untuned device gets, from host integers.

A measured plan (:mod:`~loraserve.plugins.backend_triton.plans`) overrides these where it has a
case near the step; these thresholds were themselves measured on an H100 and stay the fallback.
"""

from __future__ import annotations

import os

LAUNCH_BYTES = 4_000_000  # a kernel launch and its ramp, in bytes the device could have moved (~1.3 us)
COMPUTE_BOUND_TOKENS = 512  # from here a bf16 GEMM of Llama shapes is bound by arithmetic on an H100
# The expand is left to the output's consumer (norm, SiLU-and-mul) on steps of at most this many
# tokens and pools of at most this rank: those kernels read each row's B themselves, which pays
# while the launch it saves outweighs rereading B for tokens that share an adapter. Measured on an
# H100 (benchmarks/results/lora_epilogue_*): at rank 8 it wins every decode case up to 128 tokens,
# at rank 16 those of o_proj and down_proj, and gate_up_proj's up to 64 tokens; from rank 64, or at
# 256 tokens, the expand kernel wins.
EPILOGUE_MAX_TOKENS = 128
EPILOGUE_MAX_RANK = 16
EPILOGUE_MAX_TOKENS_TWO_SLICES_RANK_16 = 64


def epilogue_env() -> bool | None:
    """``LORASERVE_LORA_EPILOGUE``: ``1`` leaves every expand it can to the output's consumer, ``0``
    none, unset or ``auto`` as measured (:meth:`TiledLoRABackend.use_epilogue`); for A/B runs."""
    mode = os.environ.get("LORASERVE_LORA_EPILOGUE", "auto").strip().lower()
    if mode in ("", "auto"):
        return None
    if mode in ("0", "1"):
        return mode == "1"
    raise ValueError(f"LORASERVE_LORA_EPILOGUE={mode!r}; use 1, 0 or auto")


def epilogue_by_size(num_tokens: int, max_rank: int, n_slices: int) -> bool:
    """Whether a step leaves a projection's expand to its consumer, by the measured thresholds above
    (the pool's rank capacity decides, since it is a host integer)."""
    if max_rank > EPILOGUE_MAX_RANK:
        return False
    if n_slices > 1 and max_rank > 8:
        return num_tokens <= EPILOGUE_MAX_TOKENS_TWO_SLICES_RANK_16
    return num_tokens <= EPILOGUE_MAX_TOKENS


def shrink_in_gemm_by_bytes(
    num_tokens: int, in_dim: int, out_dim: int, n_slices: int, max_rank: int, num_slots: int
) -> bool:
    """Whether the base GEMM over ``[W; A of every slot]`` beats a separate shrink launch:

    - a step of fewer than ``COMPUTE_BOUND_TOKENS`` tokens is bound by reading the weights, so
      the extra rows cost the bytes of every slot's A read at the GEMM's bandwidth; the separate
      shrink reads the A of up to ``num_tokens`` slots and ``x`` again at about half of it, plus
      a launch (bytes compared; measured on an H100 the GEMM wins every decode case of the
      benchmark, up to 2x on the layer's LoRA time, and loses only when many idle high-rank
      slots would be read for a few tokens);
    - a longer step is bound by the GEMM's arithmetic, and its extra columns cost more than their
      share of FLOPs when they push the GEMM into another wave of tiles: the GEMM keeps the
      shrink only while the extra rows are at most 1/32 of the output (measured: 4 slots of rank
      16 on every Llama-3-8B projection gain, 16 slots lose on qkv, o and down).
    """
    extra = num_slots * n_slices * max_rank
    if num_tokens >= COMPUTE_BOUND_TOKENS:
        return extra * 32 <= out_dim
    fused = extra * in_dim * 2
    used = min(num_tokens, num_slots) * n_slices * max_rank
    separate = LAUNCH_BYTES + 2 * (used * in_dim * 2 + num_tokens * in_dim * 2)
    return fused <= separate
