"""Which compiled kernel variants a step's LoRA launches take, as a key of host integers.

Triton compiles a kernel once per combination of its constexprs (and of the integer and pointer
arguments it specialises on; the launches mark the per-step ones ``do_not_specialize``). For the
tiled backends those constexprs follow from a few host decisions per step: the tile plan (tile
height, permutation), and per projection whether the base GEMM did the shrink (then the expand reads
h by row, and may be left to the consumer as an epilogue) or the shrink ran with a split-k chosen
from the tile count. :class:`VariantKeys` returns exactly those decisions, so the engine's warm-up
can run one step per key instead of one per shape (``loraserve.runner.warmup_plan``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loraserve.plugins.backend_triton.launch import shrink_config, tile_count


class VariantKeys:
    """The variant key of a step on a :class:`TiledLoRABackend` ``backend`` with a pool of
    ``num_slots`` slots of rank ``max_rank``: ``keys(num_tokens, num_segments)``.

    ``projections`` holds ``(in_dim, out_dim, n_slices, may_shrink_in_gemm)`` for every targeted
    projection (``may_shrink_in_gemm``: its weight has the pool's A rows appended). Steps with equal
    keys launch the same compiled variants of the shrink, the expand and the fused epilogue kernels:
    the key holds the tile plan's height and permutation and, per projection, either the shrink in
    the base GEMM (and whether the expand is left to the consumer) or the shrink's launch parameters
    (split-k, blocks, warps), and the measured plan case the step falls in, if any. Host integers
    only, as ``prepare`` and ``run_lora`` decide them. The decisions that depend on the token count
    alone are computed once per count, the shrink's parameters once per tile plan (the warm-up's
    plan asks for many keys).
    """

    def __init__(self, backend: Any, num_slots: int, max_rank: int, projections: Sequence[tuple[int, int, int, bool]]):
        self.backend, self.num_slots, self.max_rank = backend, num_slots, max_rank
        self.projections = tuple(tuple(p) for p in projections)
        self._by_tokens: dict[int, tuple] = {}
        self._configs: dict[tuple, tuple] = {}

    def _by_count(self, num_tokens: int) -> tuple:
        """Per projection: ``(("gemm", epilogue) or None, shrink parameters, measured case)`` (the
        case is in the key so that the warm-up's bisection over token counts meets every case; it
        also stands for the case's expand parameters)."""
        found = self._by_tokens.get(num_tokens)
        if found is None:
            b, R, slots = self.backend, self.max_rank, self.num_slots
            found = tuple(
                (
                    ("gemm", b.use_epilogue(num_tokens, R, n_slices))
                    if may and b.wants_shrink_in_gemm(num_tokens, in_dim, out_dim, n_slices, R, slots)
                    else None,
                    tuple(sorted(b.launch_params("shrink", num_tokens, in_dim, out_dim, n_slices, R, slots).items())),
                    getattr(b.plan_case(num_tokens, in_dim, out_dim, n_slices, R, slots), "case", None),
                )
                for in_dim, out_dim, n_slices, may in self.projections
            )
            self._by_tokens[num_tokens] = found
        return found

    def _shrink(self, block_m: int, num_tiles: int, in_dim: int, n_slices: int, params: tuple) -> tuple:
        args = (block_m, num_tiles, in_dim, n_slices, params)
        config = self._configs.get(args)
        if config is None:
            c = shrink_config(block_m, self.max_rank, in_dim, n_slices, num_tiles, self.backend.n_sms, **dict(params))
            config = self._configs[args] = ("split", block_m, c.split, c.block_r, c.block_k, c.num_warps, c.num_stages)
        return config

    def __call__(self, num_tokens: int, num_segments: int) -> tuple:
        block_m, num_tiles, use_perm = self.backend.tile_shape(num_tokens, num_segments, self.num_slots)
        bound = min(self.num_slots, num_segments) if use_perm else num_segments  # the plan's groups

        def shrink(in_dim: int, n_slices: int, params: tuple) -> tuple:
            found = dict(params)
            height = found.pop("block_m", None) or block_m  # the shrink's own tile height (TilePlan.retiled)
            tiles = num_tiles if height == block_m else tile_count(num_tokens, height, bound)
            return self._shrink(height, tiles, in_dim, n_slices, tuple(sorted(found.items())))

        per_projection = tuple(
            (gemm or shrink(in_dim, n_slices, params), case)
            for (gemm, params, case), (in_dim, _, n_slices, _) in zip(self._by_count(num_tokens), self.projections)
        )
        return block_m, use_perm, per_projection
