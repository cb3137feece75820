"""``SgmvLoRABackend`` (SGMV: one segment per request) and the tiled base class both GPU backends share.

:class:`TiledLoRABackend` owns what the two Triton backends share: the launch parameters (from host
integers only: token, segment and slot counts, shapes, the device's multiprocessor count), the two
launches per projection (a shrink over every tile, slice and rank block; an expand over every tile
and output column block of up to three slices), the checks, and DoRA's scaling kernel. A subclass
says how a step's tokens are cut into tiles in :meth:`_plan_tiles` (:mod:`~loraserve.plugins.backend_triton.tiles`).

:class:`SgmvLoRABackend` cuts each request's segment into tiles of ``BLOCK_M`` tokens (an adapter
shared by several requests is read once per segment: Punica/S-LoRA's SGMV).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from loraserve.contract import LoRABackend, LoRABatchInfo, LoRAEpilogue
from loraserve.errors import ConfigError
from loraserve.kernel_checks import one_launch_ok
from loraserve.models import fused
from loraserve.models.dtypes import runs_triton
from loraserve.plugins.backend_triton.cost_model import epilogue_by_size, epilogue_env, shrink_in_gemm_by_bytes
from loraserve.plugins.backend_triton.launch import (
    ExpandConfig,
    ShrinkConfig,
    apply_dora_kernel,
    expand_config,
    launch_expand,
    launch_shrink,
    shrink_config,
)
from loraserve.plugins.backend_triton.plans import KernelPlans, PlanEntry
from loraserve.plugins.backend_triton.tile_kernel import check_segment_tiles
from loraserve.plugins.backend_triton.tiles import TilePlan, segment_tile_count, segment_tiles, sgmv_block_m

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SLICES_PER_EXPAND = 3


def check_device(backend: str, device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if runs_triton(device):
        return device
    raise ConfigError(
        f"--lora-backend {backend} runs Triton kernels and needs a CUDA device, not {device.type!r}; "
        "use --lora-backend torch here (tests may set TRITON_INTERPRET=1 to run the kernels in "
        "Triton's CPU interpreter, slowly)"
    )


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
    ``plans`` (optional): the device's measured cases (the factories pass ``plans_for(device)``);
    this backend keeps those measured with it.
    """

    supports_embedding = False
    supports_shrink_in_gemm = True
    graph_capturable = True
    apply_dora = apply_dora_kernel  # LoRABackend.apply_dora in one kernel

    def __init__(
        self, device: torch.device | str = "cuda", tuning: dict | None = None, plans: KernelPlans | None = None
    ):
        super().__init__(check_device(self.name, device))
        self.tuning = tuning or {}
        self.plans = plans.for_backend(self.name) if plans is not None else None
        self._plan: TilePlan | None = None
        if self.device.type == "cuda":
            self.n_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        else:
            self.n_sms = 1  # interpreter: keep grids small
        # the per-segment tile table in one launch, once this device ran it right (selfcheck.py)
        self.one_launch_tiles = one_launch_ok("SGMV tile table", self.device, check_segment_tiles)

    def prepare(self, batch: LoRABatchInfo) -> None:
        super().prepare(batch)
        self._plan = self._plan_tiles(batch) if batch.num_tokens > 0 else None
        self._retiled: dict[int, TilePlan] = {}
        self._configs: dict[tuple, tuple] = {}  # per projection shape: the same for every layer of a step

    def _step_config(self, kind: str, in_dim: int, out_dim: int, n_slices: int, n_slots: int) -> Any:
        """This step's ``expand`` config, or ``shrink`` tile plan and config, for the projections of one
        shape: host integers only (and the shrink's own tiles, built on the device), computed by the
        first layer that needs them and reused by the others."""
        key = (kind, in_dim, out_dim, n_slices, n_slots)
        found = self._configs.get(key)
        if found is None:
            plan, T, R = self._plan, self.batch.num_tokens, self.batch.max_rank
            params = self.launch_params(kind, T, in_dim, out_dim, n_slices, R, n_slots)
            if kind == "expand":
                found = expand_config(plan.block_m, R, plan.num_tiles, out_dim, self.n_sms, **params)
            else:
                plan = self._tiles_of_height(params.pop("block_m", None))  # the shrink's own tile height
                found = plan, shrink_config(plan.block_m, R, in_dim, n_slices, plan.num_tiles, self.n_sms, **params)
            self._configs[key] = found
        return found

    def _tiles_of_height(self, block_m: int | None) -> TilePlan:
        """The step's tile plan, or the same positions in tiles of ``block_m`` (built on first use in
        a step, on the device, so capturable; the later layers reuse it)."""
        plan = self._plan
        if not block_m or block_m == plan.block_m:
            return plan
        if block_m not in self._retiled:
            self._retiled[block_m] = plan.retiled(block_m, self.batch.num_tokens)
        return self._retiled[block_m]

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
        """Whether the base GEMM over ``[W; A of every slot]`` beats a separate shrink launch:
        ``tuning["shrink_in_gemm"]`` (True/False) if set, else the measured plan's case (if any),
        else :func:`~loraserve.plugins.backend_triton.cost_model.shrink_in_gemm_by_bytes`."""
        forced = self.tuning.get("shrink_in_gemm")
        if forced is not None:
            return bool(forced)
        case = self.plan_case(num_tokens, in_dim, out_dim, n_slices, max_rank, num_slots)
        if case is not None and case.shrink_in_gemm is not None:
            return case.shrink_in_gemm
        return shrink_in_gemm_by_bytes(num_tokens, in_dim, out_dim, n_slices, max_rank, num_slots)

    def plan_case(
        self, num_tokens: int, in_dim: int, out_dim: int, n_slices: int, max_rank: int, num_slots: int
    ) -> PlanEntry | None:
        """The measured case this step falls in (see :class:`KernelPlans`), if any."""
        if self.plans is None:
            return None
        return self.plans.lookup(num_tokens, in_dim, out_dim, n_slices, max_rank, num_slots)

    def launch_params(
        self, kind: str, num_tokens: int, in_dim: int, out_dim: int, n_slices: int, max_rank: int, num_slots: int
    ) -> dict:
        """Launch parameters of the separate ``shrink`` or of the ``expand`` that override
        :func:`shrink_config`'s / :func:`expand_config`'s: the plan case's, then ``tuning[kind]``."""
        case = self.plan_case(num_tokens, in_dim, out_dim, n_slices, max_rank, num_slots)
        return {**dict(getattr(case, kind, None) or ()), **self.tuning.get(kind, {})}

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
        return epilogue_by_size(num_tokens, max_rank, n_slices)

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
        # A's slots are the pool's (a captured step's batch info also lists the null slot)
        shape = (x.shape[1], base_out.shape[1], n_slices, A.shape[0])
        ec = self._step_config("expand", *shape)
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
        shrink_plan, sc = self._step_config("shrink", *shape)
        h = self._shrink(x, A, shrink_plan, perm, use_perm, n_slices, sc)
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
        self,
        x: torch.Tensor,
        A: torch.Tensor,
        plan: TilePlan,
        perm: torch.Tensor,
        use_perm: bool,
        n_slices: int,
        sc: ShrinkConfig,
    ) -> torch.Tensor:
        """``x @ A^T`` of every slice into a new float32 ``h [tokens, split, slices * R]``, in ``plan``'s
        tiles (the shrink's own height)."""
        R, T = self.batch.max_rank, x.shape[0]
        h = torch.empty((T, sc.split, n_slices * R), dtype=torch.float32, device=x.device)
        launch_shrink(
            x,
            A,
            h,
            plan.tiles,
            perm,
            self.batch.ranks,
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
        return h

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


class SgmvLoRABackend(TiledLoRABackend):
    """SGMV: each request's segment is cut into tiles of ``BLOCK_M`` tokens (rank-0 segments get none)."""

    name = "triton"

    def tile_shape(self, num_tokens: int, num_segments: int, num_slots: int) -> tuple[int, int, bool]:
        block_m = self.tuning.get("block_m") or sgmv_block_m(num_tokens, num_segments)
        return block_m, segment_tile_count(num_tokens, num_segments, block_m), False

    def _plan_tiles(self, batch: LoRABatchInfo) -> TilePlan:
        block_m, _, _ = self.tile_shape(batch.num_tokens, batch.num_segments, batch.ranks.numel())
        return segment_tiles(batch, block_m, self.one_launch_tiles)
