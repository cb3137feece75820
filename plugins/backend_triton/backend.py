"""``SgmvLoRABackend`` (SGMV: one segment per request) and the tiled base class both GPU backends share.

:class:`TiledLoRABackend` owns what the two Triton backends share: the launch parameters (from host
integers only: token, segment and slot counts, shapes, the device's multiprocessor count), the two
launches per projection (a shrink over every tile, slice and rank block; an expand over every tile
and output column block of up to three slices), the checks, and DoRA's scaling kernel. A subclass
says how a step's tokens are cut into tiles in :meth:`_plan`, on the device (so steps are capturable).

:class:`SgmvLoRABackend` cuts each request's segment into tiles of ``BLOCK_M`` tokens (an adapter
shared by several requests is read once per segment: Punica/S-LoRA's SGMV).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loraserve.contract import LoRABackend, LoRABatchInfo, LoRAEpilogue
from loraserve.errors import ConfigError
from loraserve.models import fused
from loraserve.models.dtypes import runs_triton
from loraserve.plugins.backend_triton.launch import (
    ExpandConfig,
    ShrinkConfig,
    apply_dora_kernel,
    expand_config,
    launch_expand,
    launch_shrink,
    shrink_config,
)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SLICES_PER_EXPAND = 3
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


def check_device(backend: str, device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if runs_triton(device):
        return device
    raise ConfigError(
        f"--lora-backend {backend} runs Triton kernels and needs a CUDA device, not {device.type!r}; "
        "use --lora-backend torch here (tests may set TRITON_INTERPRET=1 to run the kernels in "
        "Triton's CPU interpreter, slowly)"
    )


def build_tiles(
    starts: torch.Tensor, lens: torch.Tensor, slots: torch.Tensor, block: int, max_tiles: int
) -> torch.Tensor:
    """Cut groups of consecutive positions into tiles of at most ``block``, on the device.

    Group ``g`` covers positions ``starts[g] : starts[g] + lens[g]`` of slot ``slots[g]`` (a group of
    length 0 gets no tile). Returns ``int32 [3, max_tiles]``: slot, first position and past-the-end
    position of each tile; tiles past the real count are empty (``start == end == 0``).
    ``max_tiles`` must bound the real count; callers derive it from host integers.
    """
    n_groups = lens.numel()
    nblk = (lens + block - 1) // block
    cum = torch.cumsum(nblk, 0)
    tid = torch.arange(max_tiles, device=lens.device, dtype=cum.dtype)
    group = torch.searchsorted(cum, tid, right=True)
    valid = group < n_groups
    g = group.clamp(max=n_groups - 1)
    start = starts[g] + (tid - (cum[g] - nblk[g])) * block
    end = torch.minimum(start + block, starts[g] + lens[g])
    zero = torch.zeros_like(start)
    return (
        torch.stack(
            [torch.where(valid, slots[g], zero), torch.where(valid, start, zero), torch.where(valid, end, zero)]
        )
        .to(torch.int32)
        .contiguous()
    )


@dataclass(frozen=True)
class TilePlan:
    """How one step's tokens are cut into tiles (built in ``prepare``, read by every layer)."""

    tiles: torch.Tensor  # int32 [3, num_tiles]
    perm: torch.Tensor | None  # int32 [num_tokens]: token row at each position (None: identity)
    num_tiles: int
    block_m: int


def _check_tensors(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, base_out: torch.Tensor, num_tokens: int) -> None:
    """What the kernels need beyond the contract's checks: one row of ``x`` per token, one dtype."""
    if x.shape[0] != num_tokens:
        raise ValueError(f"x has {x.shape[0]} rows but this step has {num_tokens} tokens")
    if x.dtype not in DTYPES or A.dtype != x.dtype or B.dtype != x.dtype or base_out.dtype != x.dtype:
        raise ValueError(
            f"x, A, B and base_out must share one dtype of {', '.join(map(str, DTYPES))}; "
            f"got {x.dtype}, {A.dtype}, {B.dtype}, {base_out.dtype}"
        )


class TiledLoRABackend(LoRABackend):
    """Shared launch logic of the Triton backends; subclasses build the :class:`TilePlan`.

    ``tuning`` (optional) overrides launch parameters: ``shrink`` and ``expand`` dicts with the
    keyword arguments of :func:`shrink_config` / :func:`expand_config`; for benchmarks and tests.
    """

    supports_embedding = False
    supports_shrink_in_gemm = True
    graph_capturable = True
    apply_dora = apply_dora_kernel  # LoRABackend.apply_dora in one kernel

    def __init__(self, device: torch.device | str = "cuda", tuning: dict | None = None):
        super().__init__(check_device(self.name, device))
        self.tuning = tuning or {}
        self._plan: TilePlan | None = None
        if self.device.type == "cuda":
            self.n_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        else:
            self.n_sms = 1  # interpreter: keep grids small

    def prepare(self, batch: LoRABatchInfo) -> None:
        super().prepare(batch)
        self._plan = self._plan_tiles(batch) if batch.num_tokens > 0 else None

    def _plan_tiles(self, batch: LoRABatchInfo) -> TilePlan:
        raise NotImplementedError

    def tile_shape(self, num_tokens: int, num_segments: int, num_slots: int) -> tuple[int, int, bool]:
        """``(block_m, num_tiles, use_perm)`` of a step's tile plan, from host integers only: what
        ``prepare`` builds (tile height, the tile count the grids are sized by, whether tokens are
        permuted)."""
        raise NotImplementedError

    def variant_keys(self, num_slots: int, max_rank: int, projections: Sequence[tuple]) -> Any:
        """``keys(num_tokens, num_segments)``: equal for steps that launch the same compiled kernel
        variants (for the engine's warm-up; :class:`~loraserve.plugins.backend_triton.variants.VariantKeys`)."""
        from loraserve.plugins.backend_triton.variants import VariantKeys

        return VariantKeys(self, num_slots, max_rank, projections)

    def wants_shrink_in_gemm(
        self, num_tokens: int, in_dim: int, out_dim: int, n_slices: int, max_rank: int, num_slots: int
    ) -> bool:
        """Whether the base GEMM over ``[W; A of every slot]`` beats a separate shrink launch.

        ``tuning["shrink_in_gemm"]`` (True/False) overrides. Otherwise, from host integers only:

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
        forced = self.tuning.get("shrink_in_gemm")
        if forced is not None:
            return bool(forced)
        extra = num_slots * n_slices * max_rank
        if num_tokens >= COMPUTE_BOUND_TOKENS:
            return extra * 32 <= out_dim
        fused = extra * in_dim * 2
        used = min(num_tokens, num_slots) * n_slices * max_rank
        separate = LAUNCH_BYTES + 2 * (used * in_dim * 2 + num_tokens * in_dim * 2)
        return fused <= separate

    def use_epilogue(self, num_tokens: int, max_rank: int, n_slices: int = 1) -> bool:
        """Whether a step leaves the expand of a projection with ``n_slices`` output slices to the
        output's consumer (``tuning["epilogue"]`` overrides): decode-sized steps with a low-rank pool
        (``EPILOGUE_MAX_TOKENS``, ``EPILOGUE_MAX_RANK``; the pool's rank capacity decides, since
        it is a host integer)."""
        forced = self.tuning.get("epilogue")
        if forced is None:
            forced = epilogue_env()
        if forced is not None:
            return bool(forced)
        if max_rank > EPILOGUE_MAX_RANK:
            return False
        if n_slices > 1 and max_rank > 8:
            return num_tokens <= EPILOGUE_MAX_TOKENS_TWO_SLICES_RANK_16
        return num_tokens <= EPILOGUE_MAX_TOKENS

    def expand_epilogue(self, B: torch.Tensor, output_offsets: Sequence[int], shrunk: torch.Tensor) -> Any:
        batch = self.batch
        n_slices = len(output_offsets) - 1
        widths = {output_offsets[i + 1] - output_offsets[i] for i in range(n_slices)}
        if (
            batch is None
            or n_slices not in (1, 2)
            or len(widths) != 1
            or not fused.use_fused(shrunk)
            or not self.use_epilogue(batch.num_tokens, batch.max_rank, n_slices)
        ):
            return None
        return LoRAEpilogue(
            h=shrunk,
            B=B,
            token_slot=batch.token_slot,
            ranks=batch.ranks,
            scalings=batch.scalings,
            n_slices=n_slices,
            R=batch.max_rank,
        )

    def run_lora(
        self,
        x: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        base_out: torch.Tensor,
        output_offsets: Sequence[int],
        shrunk: torch.Tensor | None = None,
    ) -> None:
        batch, n_slices = self.checked_batch(x, A, B, base_out, output_offsets, shrunk)
        _check_tensors(x, A, B, base_out, batch.num_tokens)
        plan = self._plan
        if plan is None or plan.num_tiles == 0:
            return
        R = batch.max_rank
        perm = plan.perm if plan.perm is not None else plan.tiles
        use_perm = plan.perm is not None
        ec = expand_config(
            plan.block_m, R, plan.num_tiles, base_out.shape[1], self.n_sms, **self.tuning.get("expand", {})
        )
        if shrunk is not None:  # the base GEMM already computed x @ A^T for every slot: only the expand runs
            self._expand(
                shrunk,
                B,
                base_out,
                output_offsets,
                plan,
                perm,
                use_perm,
                ec,
                R=R,
                split=1,
                stride_hs=0,
                stride_ht=shrunk.stride(0),
                stride_hslot=n_slices * R,
                h_by_row=True,
            )
            return
        h, sc = self._shrink(x, A, plan, perm, use_perm, n_slices)
        self._expand(
            h,
            B,
            base_out,
            output_offsets,
            plan,
            perm,
            use_perm,
            ec,
            R=R,
            split=sc.split,
            stride_hs=h.stride(1),
            stride_ht=h.stride(0),
            stride_hslot=0,
            h_by_row=False,
        )

    def _shrink(
        self, x: torch.Tensor, A: torch.Tensor, plan: TilePlan, perm: torch.Tensor, use_perm: bool, n_slices: int
    ) -> tuple[torch.Tensor, ShrinkConfig]:
        """``x @ A^T`` of every slice into a new float32 ``h [tokens, split, slices * R]``."""
        batch = self.batch
        R, T, K = batch.max_rank, x.shape[0], x.shape[1]
        sc = shrink_config(plan.block_m, R, K, n_slices, plan.num_tiles, self.n_sms, **self.tuning.get("shrink", {}))
        h = torch.empty((T, sc.split, n_slices * R), dtype=torch.float32, device=x.device)
        launch_shrink(
            x,
            A,
            h,
            plan.tiles,
            perm,
            batch.ranks,
            R=R,
            num_tiles=plan.num_tiles,
            n_slices=n_slices,
            block_m=plan.block_m,
            block_r=sc.block_r,
            block_k=sc.block_k,
            split=sc.split,
            k_per_split=sc.k_per_split,
            use_perm=use_perm,
            num_warps=sc.num_warps,
            num_stages=sc.num_stages,
        )
        return h, sc

    def _expand(
        self,
        h: torch.Tensor,
        B: torch.Tensor,
        base_out: torch.Tensor,
        output_offsets: Sequence[int],
        plan: TilePlan,
        perm: torch.Tensor,
        use_perm: bool,
        ec: ExpandConfig,
        *,
        R: int,
        split: int,
        stride_hs: int,
        stride_ht: int,
        stride_hslot: int,
        h_by_row: bool,
    ) -> None:
        batch = self.batch
        n_slices = len(output_offsets) - 1
        for g0 in range(0, n_slices, SLICES_PER_EXPAND):
            g1 = min(n_slices, g0 + SLICES_PER_EXPAND)
            lo, hi = output_offsets[g0], output_offsets[g1]
            widths = tuple(output_offsets[i + 1] - output_offsets[i] for i in range(g0, g1))
            hv = h[:, g0 * R :] if h.dim() == 2 else h[:, :, g0 * R :]
            launch_expand(
                hv,
                B[:, lo:hi],
                base_out[:, lo:hi],
                plan.tiles,
                perm,
                batch.ranks,
                batch.scalings,
                R=R,
                num_tiles=plan.num_tiles,
                split=split,
                widths=widths,
                block_m=plan.block_m,
                block_n=ec.block_n,
                block_r=ec.block_r,
                use_perm=use_perm,
                stride_hs=stride_hs,
                stride_ht=stride_ht,
                stride_hslot=stride_hslot,
                group_n=ec.group_n,
                num_warps=ec.num_warps,
                num_stages=ec.num_stages,
                h_by_row=h_by_row,
            )


def sgmv_block_m(num_tokens: int, num_segments: int) -> int:
    """Tile height from the mean segment length: 16 for decode, 32 for prefill (measured on an H100:
    64 and 128 were slower for every prefill case of the benchmark)."""
    return 16 if num_tokens <= 16 * max(1, num_segments) else 32


class SgmvLoRABackend(TiledLoRABackend):
    """SGMV: each request's segment is cut into tiles of ``BLOCK_M`` tokens (rank-0 segments get none)."""

    name = "triton"

    def tile_shape(self, num_tokens: int, num_segments: int, num_slots: int) -> tuple[int, int, bool]:
        block_m = self.tuning.get("block_m") or sgmv_block_m(num_tokens, num_segments)
        return block_m, segment_tile_count(num_tokens, num_segments, block_m), False

    def _plan_tiles(self, batch: LoRABatchInfo) -> TilePlan:
        block_m, _, _ = self.tile_shape(batch.num_tokens, batch.num_segments, batch.ranks.numel())
        return segment_tiles(batch, block_m)


def segment_tile_count(num_tokens: int, num_segments: int, block_m: int) -> int:
    """Tiles of :func:`segment_tiles`: every tile holds at least one token, and each segment adds at
    most one partial tile."""
    return min(num_tokens, -(-num_tokens // block_m) + num_segments)  # not triton.cdiv: ~6 us a call


def segment_tiles(batch: LoRABatchInfo, block_m: int) -> TilePlan:
    """Each segment of a slot of rank > 0 cut into tiles of ``block_m`` tokens, no permutation."""
    indptr = batch.seg_indptr.long()
    slots = batch.seg_slot.long()
    lens = (indptr[1:] - indptr[:-1]) * (batch.ranks.long()[slots] > 0)
    max_tiles = segment_tile_count(batch.num_tokens, batch.num_segments, block_m)
    tiles = build_tiles(indptr[:-1], lens, slots, block_m, max_tiles)
    return TilePlan(tiles=tiles, perm=None, num_tiles=max_tiles, block_m=block_m)
