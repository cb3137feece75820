"""The whole contract a loraserve plugin implements or receives, in one module.

A plugin author reads this file and ``loraserve.hookspecs`` (the hooks that register what is
defined here) and nothing else. Every base class states what each method may change and what is
always safe; ``loraserve.testing`` checks the LoRA backend and eviction-policy contracts.

What a plugin implements, by hook:

- ``loraserve_register_backends``: a :class:`LoRABackend` (receives :class:`LoRABatchInfo` once
  per step and the :ref:`slot-pool layout <pool layout>` per layer; may hand the expand to the
  consumer as a :class:`LoRAEpilogue`).
- ``loraserve_register_attention_backends``: an :class:`AttentionBackend`.
- ``loraserve_register_eviction_policies``: an :class:`EvictionPolicy`.
- ``loraserve_register_loaders`` / ``loraserve_register_resolvers``: an :class:`AdapterLoader`
  (producing a :class:`~loraserve.lora.adapter.LoRAAdapter` through
  :func:`~loraserve.lora.adapter.build_adapter`) / an :class:`AdapterResolver`.
- ``loraserve_register_frontends``: a function ``factory(app, engine, settings)`` adding routes to a
  FastAPI app that talk to the engine only through :class:`EngineClient`.
- ``loraserve_register_options``: a :class:`PluginOptions` subclass with the plugin's own flags.

Pool layout (what ``A`` and ``B`` are in :meth:`LoRABackend.run_lora`): for one layer's projection
with ``S`` output slices (1 for a plain projection, 3 for fused q/k/v, 2 for fused gate/up) the GPU
pool keeps ``A [num_slots, S * R, in_dim]`` and ``B [num_slots, out_dim, R]``, where ``R`` is the
pool's rank capacity (``--max-lora-rank``); slot ``k``'s rows ``A[k, i*R : i*R + r]`` are slice
``i``'s shrink and ``B[k, off[i]:off[i+1], :r]`` its expand, ``r = ranks[k]``; entries past ``r``
are unspecified and must never be read into a result (see :func:`pool_shapes`). The base model
occupies a slot of rank 0 when it is in a batch; a captured decode step's padding rows use a
*null* slot past the pool's last, of rank 0. Buffers are allocated once and only their contents
change, so a captured CUDA graph stays valid. For backends with ``supports_shrink_in_gemm`` the
layer keeps the ``A`` rows of every slot appended below its base weight, so one GEMM over
``[W; A_all]`` yields the base output and every slot's shrink (``shrunk``, :func:`shrunk_columns`).

"""

# size: longer than the ~400 lines a module usually gets, because it is the one document of the
# contract; splitting it would send a plugin author back to several places.

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypedDict

from pydantic_settings import BaseSettings, SettingsConfigDict

from loraserve.errors import UserError

if TYPE_CHECKING:
    import torch

    from loraserve.lora.adapter import BaseModelShape, LoRAAdapter
    from loraserve.lora.policy import AdapterSourcePolicy
    from loraserve.sched.kv_cache import KVCache
    from loraserve.sched.request import Request, RequestOutput
    from loraserve.sched.sampling_params import SamplingParams
    from loraserve.staging import HostStaging

# torch is imported where it is used, not here: a plugin imports this module (for PluginOptions) when
# it is loaded, and loading plugins must stay cheap (``loraserve --help``, ``loraserve plugins``)


# == Registering ===================================================================================


class Register(Protocol):
    """The ``register`` callback a register-style hook receives.

    ``name`` is what the user types (``--lora-backend NAME``); ``factory`` a cheap callable that
    imports heavy modules (triton, CUDA extensions) only when called; ``description`` one line shown
    by ``loraserve plugins``; ``priority`` maps a device type (``"cuda"``, ``"cpu"``) to an int, and
    the highest among the registered names is the default on that device (backends and attention
    backends). Registering a name another plugin registered is an error naming both plugins.
    """

    def __call__(
        self, name: str, factory: Callable[..., Any], description: str = "", priority: Mapping[str, int] | None = None
    ) -> None: ...


# == The slot pool layout ===========================================================================


def pool_shapes(
    num_slots: int, n_slices: int, max_rank: int, in_dim: int, out_dim: int
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The shapes of one projection's ``A`` and ``B`` buffers (see the module docstring)."""
    return (num_slots, n_slices * max_rank, in_dim), (num_slots, out_dim, max_rank)


def shrunk_columns(slot: int, n_slices: int, max_rank: int) -> slice:
    """The columns of ``shrunk`` (the shrink done by the base GEMM) that belong to ``slot``:
    ``n_slices * max_rank`` of them, slice ``i``'s rank entries at ``i * max_rank`` within."""
    start = slot * n_slices * max_rank
    return slice(start, start + n_slices * max_rank)


# == What a LoRA backend receives once per step ===================================================


@dataclass
class LoRABatchInfo:
    """Per-step LoRA routing shared by every layer.

    :ivar num_tokens: tokens in this step (rows of every activation).
    :ivar num_segments: requests in this step.
    :ivar seg_indptr: ``int32 [num_segments + 1]``; segment ``i`` is tokens
        ``seg_indptr[i]:seg_indptr[i+1]``.
    :ivar seg_slot: ``int32 [num_segments]``; GPU-pool slot of each segment's adapter.
    :ivar token_slot: ``int32 [num_tokens]``; slot of each token (``seg_slot`` expanded).
    :ivar ranks: ``int32 [num_slots]``; rank of the adapter in each slot, 0 for the base model or an
        empty slot (tokens of such slots are left untouched).
    :ivar scalings: ``float32 [num_slots]``; LoRA scaling of each slot.
    :ivar max_rank: the pool's rank capacity (second dimension of the A buffers per slice).
    :ivar seg_indptr_host, seg_slot_host: host copies of the same data, for backends that loop on
        the host (the torch reference backend). Never read by kernel backends.
    """

    num_tokens: int
    num_segments: int
    seg_indptr: torch.Tensor
    seg_slot: torch.Tensor
    token_slot: torch.Tensor
    ranks: torch.Tensor
    scalings: torch.Tensor
    max_rank: int
    seg_indptr_host: list[int]
    seg_slot_host: list[int]
    ranks_host: list[int]
    scalings_host: list[float]

    @classmethod
    def build(
        cls,
        seg_lens: list[int],
        seg_slot: list[int],
        ranks: list[int],
        scalings: list[float],
        max_rank: int,
        device: torch.device | str = "cpu",
        staging: HostStaging | None = None,
    ) -> LoRABatchInfo:
        """Build from host lists (one entry per segment, one per slot).

        Every device field is a view of one int32 tensor ``[seg_indptr | seg_slot | token_slot |
        ranks | scalings (float32 bits)]``, each part starting 16-byte aligned (as a tensor of its
        own would: kernels specialised on aligned pointers stay valid), filled by one host-to-device
        copy: from ``staging`` (page-locked buffers owned by the caller, used alternately: one build
        per step per :class:`~loraserve.staging.HostStaging`, whose device is used) when given, else
        from ordinary host memory."""
        _check_batch_lists(seg_lens, seg_slot, ranks, scalings, max_rank)
        import array
        import itertools

        import torch

        from loraserve.staging import pack_aligned

        indptr = list(itertools.accumulate(seg_lens, initial=0))
        nseg, ntok, nslot = len(seg_lens), indptr[-1], len(ranks)
        scalings_host = [float(s) for s in scalings]
        if ntok == nseg and max(seg_lens, default=1) <= 1:
            token_slot = seg_slot  # every segment one token (decode)
        else:
            token_slot = [s for s, n in zip(seg_slot, seg_lens) for _ in range(n)]
        packed, starts = pack_aligned([indptr, seg_slot, token_slot, ranks, array.array("f", scalings_host)])
        if staging is not None:
            flat = staging.upload(packed)
        else:
            flat = torch.frombuffer(packed, dtype=torch.int32).to(device, copy=True)
        views = [flat[a : a + n] for a, n in zip(starts, (nseg + 1, nseg, ntok, nslot, nslot))]
        return cls(
            num_tokens=ntok,
            num_segments=nseg,
            seg_indptr=views[0],
            seg_slot=views[1],
            token_slot=views[2],
            ranks=views[3],
            scalings=views[4].view(torch.float32),
            max_rank=max_rank,
            seg_indptr_host=indptr,
            seg_slot_host=list(seg_slot),
            ranks_host=list(ranks),
            scalings_host=scalings_host,
        )


def _check_batch_lists(
    seg_lens: list[int], seg_slot: list[int], ranks: list[int], scalings: list[float], max_rank: int
) -> None:
    """Raise ValueError unless :meth:`LoRABatchInfo.build`'s lists fit together. min/max rather
    than a Python loop: this runs every step, over every request of the batch."""
    if len(seg_lens) != len(seg_slot):
        raise ValueError(f"seg_lens has {len(seg_lens)} entries but seg_slot has {len(seg_slot)}")
    if len(ranks) != len(scalings):
        raise ValueError(f"ranks has {len(ranks)} slots but scalings has {len(scalings)}")
    if seg_slot and (min(seg_slot) < 0 or max(seg_slot) >= len(ranks)):
        bad = next(s for s in seg_slot if not 0 <= s < len(ranks))
        raise ValueError(f"segment slot {bad} is outside the pool's {len(ranks)} slots")
    if ranks and (min(ranks) < 0 or max(ranks) > max_rank):
        raise ValueError(f"slot ranks {ranks} must lie in [0, max_rank={max_rank}]")
    if seg_lens and min(seg_lens) < 0:
        raise ValueError(f"segment length {min(seg_lens)} is negative")


# == LoRA kernel backends ======================================================================


class LoRABackend:
    """Base class of LoRA kernel backends.

    Contract:

    - :meth:`prepare` is called once per forward step, before any layer runs, with that step's
      :class:`LoRABatchInfo`. It may derive and cache whatever the kernels need (permutations,
      chunk tables) but must not read device data back to the host, so a decode step stays
      capturable in a CUDA graph.
    - :meth:`run_lora` is called per LoRA layer and adds the delta into ``base_out`` **in place**.
      It may not modify ``x``, ``A`` or ``B``. Rows whose slot has rank 0 must be left bit-identical.
      Arithmetic accumulates in float32 whatever the input dtype.
    - Both are always safe to call with ``num_tokens == 1``.
    - A backend with ``supports_shrink_in_gemm`` also accepts ``shrunk``: ``x @ A[slot].T`` for *every*
      slot, computed by the caller (the base GEMM over the weight with the pool's A rows appended,
      so the shrink shares the GEMM's read of ``x``): ``[num_tokens, num_slots * num_slices * R]``,
      row stride free, column stride 1, slot ``s``'s columns at ``s * num_slices * R``. The backend
      then only runs the expand, taking each token's own slot's columns.
    - A backend with ``supports_dora`` lets the engine serve DoRA adapters: on steps with rows of
      DoRA slots (and in every captured decode step with ``--enable-dora-cuda-graph``) the LoRA hooks
      do not take :meth:`expand_epilogue`; they call :meth:`apply_dora` on ``base_out`` right after
      :meth:`run_lora` added the delta in place (``loraserve.lora.dora``). The default
      :meth:`apply_dora` is plain torch and graph-capturable; a backend may override it with a kernel.

    Tensors: ``x`` is ``[num_tokens, in_dim]``; ``A`` is ``[num_slots, num_slices * R, in_dim]``;
    ``B`` is ``[num_slots, out_dim, R]``; ``base_out`` is ``[num_tokens, out_dim]``;
    ``output_offsets`` is a host tuple of ``num_slices + 1`` increasing ints ending at ``out_dim``.
    """

    name = "abstract"
    #: whether :meth:`run_lora_embedding` is implemented (LoRA on embed_tokens / lm_head)
    supports_embedding = False
    #: whether :meth:`run_lora` accepts ``shrunk`` (the shrink done by the base GEMM)
    supports_shrink_in_gemm = False
    #: whether ``prepare`` + ``run_lora`` read only device tensors (and the batch's host integers),
    #: so the engine may capture decode steps in CUDA graphs and replay them with new buffer contents
    graph_capturable = False
    #: whether the engine may serve DoRA adapters with this backend: :meth:`apply_dora` scales the
    #: rows of DoRA slots after :meth:`run_lora` added the delta in place (``loraserve.lora.dora``)
    supports_dora = True

    def __init__(self, device: torch.device | str = "cpu"):
        import torch

        self.device = torch.device(device)
        self.batch: LoRABatchInfo | None = None

    def prepare(self, batch: LoRABatchInfo) -> None:
        self.batch = batch

    def run_lora(
        self,
        x: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        base_out: torch.Tensor,
        output_offsets: Sequence[int],
        shrunk: torch.Tensor | None = None,
    ) -> None:
        raise NotImplementedError

    def wants_shrink_in_gemm(
        self, num_tokens: int, in_dim: int, out_dim: int, n_slices: int, max_rank: int, num_slots: int
    ) -> bool:
        """Whether a step of ``num_tokens`` should do a projection's shrink inside its base GEMM
        (only asked of backends with ``supports_shrink_in_gemm``; host integers only)."""
        return False

    def checked_batch(
        self,
        x: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        base_out: torch.Tensor,
        output_offsets: Sequence[int],
        shrunk: torch.Tensor | None = None,
    ) -> tuple[LoRABatchInfo, int]:
        """The step's batch info and the number of slices, after the checks every backend shares."""
        if self.batch is None:
            raise RuntimeError("prepare() must be called before run_lora()")
        n_slices = check_run_lora_args(x, A, B, base_out, output_offsets, self.batch.max_rank)
        if shrunk is not None:
            if not self.supports_shrink_in_gemm:
                raise ValueError(f"LoRA backend {self.name!r} does not take a precomputed shrink")
            width = A.shape[0] * A.shape[1]
            if shrunk.dim() != 2 or shrunk.shape != (x.shape[0], width) or shrunk.stride(1) != 1:
                raise ValueError(
                    f"shrunk has shape {tuple(shrunk.shape)} and strides {shrunk.stride()}, expected "
                    f"({x.shape[0]}, {width}) with column stride 1"
                )
            if shrunk.dtype != x.dtype:
                raise ValueError(f"shrunk has dtype {shrunk.dtype}, expected {x.dtype}")
        return self.batch, n_slices

    def expand_epilogue(self, B: torch.Tensor, output_offsets: Sequence[int], shrunk: torch.Tensor) -> Any:
        """Optionally leave this step's expand to the kernel that consumes the projection's output.

        Called instead of ``run_lora(..., shrunk=shrunk)`` for projections whose consumer can add the
        delta itself (o_proj and down_proj into the next RMSNorm, gate_up_proj into SiLU-and-mul).
        Return a :class:`LoRAEpilogue` to take that path, or None (the
        default) to have ``run_lora`` add the delta in place as usual. Decide from host integers only
        (a decode step may be captured in a CUDA graph)."""
        return None

    def apply_dora(
        self, base_out: torch.Tensor, bias: torch.Tensor | None, scales: torch.Tensor, flags: torch.Tensor
    ) -> None:
        """Scale the rows of DoRA slots of ``base_out`` in place, after :meth:`run_lora` added the delta.

        A row whose slot ``s = token_slot[row]`` has ``flags[s] != 0`` becomes
        ``out + (scales[s] - 1) * (out - bias)`` (computed in float32); every other row stays
        bit-identical. ``scales`` is float32 ``[num_slots, out_dim]``, ``flags`` int32 ``[num_slots]``,
        ``bias`` the projection's ``[out_dim]`` bias or None. Reads only device tensors (capturable)."""
        import torch

        batch = self.batch
        if batch is None:
            raise RuntimeError("prepare() must be called before apply_dora()")
        slot = batch.token_slot[: base_out.shape[0]].long()
        on = flags.index_select(0, slot).bool().unsqueeze(1)
        # the null slot of graph padding rows (index num_slots) has no scales: its flag is 0
        g = torch.where(on, scales.index_select(0, slot.clamp(max=scales.shape[0] - 1)), 1.0)
        out32 = base_out.float()
        plain = out32 if bias is None else out32 - bias.float()
        base_out.copy_(torch.where(on, out32 + (g - 1) * plain, out32).to(base_out.dtype))

    def run_lora_embedding(
        self, input_ids: torch.Tensor, A: torch.Tensor, B: torch.Tensor, base_out: torch.Tensor
    ) -> None:
        """Add ``scaling * A[slot][:, input_ids].T @ B[slot].T`` for LoRA on the embedding.

        ``A`` is ``[num_slots, R, vocab]`` and ``B`` is ``[num_slots, hidden, R]`` (PEFT layout).
        """
        raise NotImplementedError(f"LoRA backend {self.name!r} does not support LoRA on embeddings")


def check_run_lora_args(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    base_out: torch.Tensor,
    output_offsets: Sequence[int],
    max_rank: int,
) -> int:
    """Validate shapes shared by every backend; returns the number of slices."""
    n_slices = len(output_offsets) - 1
    if n_slices < 1 or output_offsets[0] != 0 or any(b <= a for a, b in zip(output_offsets, output_offsets[1:])):
        raise ValueError(f"output_offsets {tuple(output_offsets)} must start at 0 and increase")
    if base_out.shape != (x.shape[0], output_offsets[-1]):
        raise ValueError(f"base_out has shape {tuple(base_out.shape)}, expected ({x.shape[0]}, {output_offsets[-1]})")
    if A.dim() != 3 or A.shape[1] != n_slices * max_rank or A.shape[2] != x.shape[1]:
        raise ValueError(f"A has shape {tuple(A.shape)}, expected (slots, {n_slices}*{max_rank}, {x.shape[1]})")
    if B.dim() != 3 or B.shape[1] != output_offsets[-1] or B.shape[2] != max_rank or B.shape[0] != A.shape[0]:
        raise ValueError(f"B has shape {tuple(B.shape)}, expected ({A.shape[0]}, {output_offsets[-1]}, {max_rank})")
    return n_slices


# == The expand left to the output's consumer ==================================================


@dataclass(frozen=True)
class LoRAEpilogue:
    """A LoRA expand left to the kernel that consumes a projection's output (see module docstring).

    For a token ``t`` of slot ``k = token_slot[t] >= 0`` with ``ranks[k] > 0``, column ``n`` of
    output slice ``s`` gets ``scalings[k] * sum_{j < ranks[k]} h[t, k*S*R + s*R + j] * B[k, n, j]``
    (``S = n_slices``, ``n`` counted over the whole output); other tokens get nothing. Columns past a
    slot's rank are never let into the sum, whatever h and B hold there. Slots must be -1, below
    ``num_slots`` or a null slot past B's whose rank is 0 (``ranks`` and ``scalings`` may be longer
    than B's slot count for that); that is device data and is not checked.

    :ivar h: ``[T, C]``, ``C >= num_slots * n_slices * R``, float32, bfloat16 or float16; any row
        stride (typically a column view of the base GEMM's output), contiguous last dim.
    :ivar B: ``[num_slots, out_total, R]``, contiguous, the output's dtype.
    :ivar token_slot: ``int32 [T]``, each token's slot or -1.
    :ivar ranks: ``int32 [num_slots]``, each slot's rank (``<= R``; 0: no adapter).
    :ivar scalings: ``float32 [num_slots]``.
    :ivar n_slices: 1 (o_proj, down_proj) or 2 (gate_up_proj: gate, then up, each ``out_total / 2``).
    :ivar R: the pool's largest rank, the length of B's rows.
    """

    h: torch.Tensor
    B: torch.Tensor
    token_slot: torch.Tensor
    ranks: torch.Tensor
    scalings: torch.Tensor
    n_slices: int
    R: int

    def __post_init__(self) -> None:
        import torch

        from loraserve.models.dtypes import check_rows

        floats = (torch.float32, torch.bfloat16, torch.float16)
        S, R = self.n_slices, self.R
        if S not in (1, 2):
            raise ValueError(f"n_slices is {S!r}; the epilogue takes 1 (one output slice) or 2 (gate and up)")
        if not isinstance(R, int) or R < 1:
            raise ValueError(f"R is {R!r}; it must be an int >= 1")
        B = self.B
        if B.dim() != 3 or B.shape[2] != R or not B.is_contiguous() or B.dtype not in floats:
            raise ValueError(
                f"B must be a contiguous [num_slots, out_total, {R}] float32, bfloat16 or float16 "
                f"tensor, got {tuple(B.shape)} {B.dtype} strides {B.stride()}"
            )
        num_slots, out_total = B.shape[:2]
        if out_total % S:
            raise ValueError(f"B's out_total {out_total} does not split into {S} equal slices")
        check_rows("h", self.h, 2)
        T, cols = self.h.shape
        if cols < num_slots * S * R:
            raise ValueError(
                f"h has {cols} columns; {num_slots} slots of {S} slices of rank {R} need {num_slots * S * R}"
            )
        # ranks and scalings may go on past B's slots: a captured decode step's batch has a null
        # slot of rank 0 there for its padding rows, which no kernel reads B for
        for name, t, shape, dtype in (
            ("token_slot", self.token_slot, (T,), torch.int32),
            ("ranks", self.ranks, (num_slots,), torch.int32),
            ("scalings", self.scalings, (num_slots,), torch.float32),
        ):
            ok = t.dim() == 1 and (t.shape[0] == shape[0] if name == "token_slot" else t.shape[0] >= shape[0])
            if not ok or t.dtype != dtype or not t.is_contiguous():
                at_least = "" if name == "token_slot" else "at least "
                raise ValueError(
                    f"{name} must be a contiguous 1-d {dtype} tensor of {at_least}{shape[0]} entries, "
                    f"got {tuple(t.shape)} {t.dtype} strides {t.stride()}"
                )
        for name in ("h", "token_slot", "ranks", "scalings"):
            if getattr(self, name).device != B.device:
                raise ValueError(f"{name} is on {getattr(self, name).device}, B on {B.device}")

    def check_output(self, name: str, out: torch.Tensor, n_slices: int) -> None:
        """Refuse an output ``out`` that this epilogue does not fit (a ValueError naming ``name``)."""
        want = (self.token_slot.shape[0], self.B.shape[1])
        if out.dim() != 2 or tuple(out.shape) != want or out.dtype != self.B.dtype or out.device != self.B.device:
            raise ValueError(
                f"{name} is {tuple(out.shape)} {out.dtype} on {out.device}; the LoRA epilogue "
                f"needs {list(want)} {self.B.dtype} on {self.B.device}"
            )
        if self.n_slices != n_slices:
            raise ValueError(f"the LoRA epilogue has n_slices={self.n_slices}; {name} needs {n_slices}")

    def _active(self) -> torch.Tensor:
        """``bool [T]``: whether each token gets a delta (a slot, and a rank above 0)."""
        slot = self.token_slot.long()
        return (slot >= 0) & (self.ranks[slot.clamp(min=0)] > 0)

    def delta(self) -> torch.Tensor:
        """The delta, ``float32 [T, out_total]``, eagerly: one float32 GEMM per slot and slice over
        the rows of that slot (the loop bound is a shape, so nothing is read back from the device)."""
        import torch

        num_slots, out_total, R = self.B.shape
        S, width = self.n_slices, out_total // self.n_slices
        delta = torch.zeros((self.h.shape[0], out_total), dtype=torch.float32, device=self.B.device)
        j = torch.arange(R, device=self.B.device)
        active = self._active()
        for k in range(num_slots):
            keep = j < self.ranks[k]
            rows = active & (self.token_slot == k)
            B_k = torch.where(keep, self.B[k].float(), 0.0)  # a select: past the rank B may hold NaN
            for s in range(S):
                h = self.h[:, (k * S + s) * R : (k * S + s + 1) * R].float()
                h = torch.where(rows[:, None] & keep[None, :], h, 0.0)
                part = (h @ B_k[s * width : (s + 1) * width].T) * self.scalings[k]
                delta[:, s * width : (s + 1) * width] = torch.where(
                    rows[:, None], part, delta[:, s * width : (s + 1) * width]
                )
        return delta

    def apply_(self, out: torch.Tensor) -> None:
        """Add the delta into ``out`` ``[T, out_total]`` in place, rounded as the in-place expand
        kernel rounds it (``out.float() + delta``, cast once); rows without LoRA are left untouched."""
        import torch

        self.check_output("out", out, self.n_slices)
        new = (out.float() + self.delta()).to(out.dtype)
        out.copy_(torch.where(self._active()[:, None], new, out))


# == Eviction ==================================================================================


class EvictionPolicy:
    """Base class of eviction policies.

    One policy object tracks one tier (the GPU slots, or the host cache). The pool tells it about
    every key it holds and asks it for a victim when it needs room; the pool, not the policy, decides
    which keys may be evicted (pinned adapters and adapters in the running batch are never offered).

    - :meth:`insert` is called when ``key`` enters the tier; :meth:`touch` on every use while it
      is there; :meth:`remove` when it leaves (evicted or unloaded). Removing an unknown key is a
      no-op.
    - :meth:`victim` returns one key from ``candidates`` (never a key outside it), or None when
      ``candidates`` is empty. It must not change the policy's state: the pool calls
      :meth:`remove` once it has actually evicted the key.
    """

    name = "abstract"

    def insert(self, key: Hashable) -> None:
        raise NotImplementedError

    def touch(self, key: Hashable) -> None:
        raise NotImplementedError

    def remove(self, key: Hashable) -> None:
        raise NotImplementedError

    def victim(self, candidates: Iterable[Hashable]) -> Hashable | None:
        raise NotImplementedError


# == Adapter loaders and resolvers =============================================================


class AdapterError(UserError):
    """An adapter cannot be loaded: missing or corrupt files, an unsupported feature, or weights
    that do not fit the base model or the engine's limits. The message says what to change."""


class AdapterSummary(NamedTuple):
    """What an adapter needs from the engine, read without loading its weights."""

    #: largest rank over the modules it targets
    rank: int
    #: PEFT module names it targets (``q_proj``, ..., ``embed_tokens``, ``lm_head``)
    target_modules: frozenset[str]


class AdapterLoader:
    """Base class of adapter-format loaders.

    Contract:

    - A loader is **stateless**: it keeps nothing between calls, so one instance may serve
      concurrent loads and a failed load leaves nothing behind.
    - :meth:`can_load` is cheap (no weight reads, no network) and says whether ``source`` looks
      like this loader's format. It never raises.
    - :meth:`load` reads, validates and builds the whole adapter as CPU tensors before returning
      it; on any problem it raises :class:`AdapterError` and returns nothing, so a half-loaded
      adapter can never become visible. It validates against ``shape`` (every tensor fits the base
      model), ``max_rank`` (no module's rank exceeds it; ``None`` = no limit) and
      ``target_modules`` (every targeted module is allowed; ``None`` = any supported module).
    - Given a ``policy`` (:class:`~loraserve.lora.policy.AdapterSourcePolicy`), :meth:`load` and
      :meth:`peek` pass every local file they open through ``policy.check_file`` first, so no
      file outside ``--lora-allowed-dirs`` is read (a symbolic link leading out is refused). The
      engine has already checked the source itself with ``policy.check_source``.
    - :meth:`peek` reads only the adapter's configuration and returns its :class:`AdapterSummary`,
      so the engine can infer ``--max-lora-rank`` and ``--lora-target-modules`` from the start-up
      adapters (the largest rank, the union of target modules) before sizing its GPU pool.
    """

    name = "abstract"

    def can_load(self, source: str) -> bool:
        raise NotImplementedError

    def load(
        self,
        source: str,
        *,
        name: str,
        shape: BaseModelShape,
        max_rank: int | None = None,
        target_modules: Iterable[str] | None = None,
        policy: AdapterSourcePolicy | None = None,
    ) -> LoRAAdapter:
        raise NotImplementedError

    def peek(
        self, source: str, shape: BaseModelShape | None = None, *, policy: AdapterSourcePolicy | None = None
    ) -> AdapterSummary:
        raise NotImplementedError


class AdapterResolver:
    """Base class of adapter resolvers.

    Contract: :meth:`resolve` maps an adapter name that a request used but nobody loaded to a
    source string some loader's ``can_load`` accepts, or returns None when this resolver does not
    know the name. It must not load weights itself (it may fetch files into a local directory and
    return that) and must not raise for an unknown name; it may raise :class:`AdapterError` (400)
    when it knows the name but the source is unusable, :class:`~loraserve.errors.NotFound` (404) when
    it owns the name but cannot reach its files, :class:`~loraserve.errors.Forbidden` (403) for a name
    it refuses (one that escapes its directory). It is called on a thread that may block (never the
    engine thread nor an event loop), once at a time per name; it must be thread-safe across names.
    A source it returns is loaded with ``runtime=False`` (an enabled resolver is the operator's
    choice of sources, as ``--lora-paths`` is), so ``--lora-allowed-dirs`` applies to it but the
    hub rule does not: a resolver that returns hub ids keeps its own allow-list.
    """

    name = "abstract"

    def resolve(self, name: str) -> str | None:
        raise NotImplementedError


# == Attention over the paged KV cache =============================================================


class AttentionBackend:
    """Base class of attention backends: attention over the paged KV cache, one step at a time.

    Lifecycle, per step: the runner calls :meth:`begin_step` (eager steps) or, for a decode step
    replayed from a CUDA graph, :meth:`begin_graph_step`; then the model calls :meth:`attention`
    once per layer. Contract:

    - :meth:`begin_step` gets ``(blocks, start, num_new_tokens, table_row)`` per sequence, in the
      order the step's tokens are packed; ``blocks`` are the sequence's KV-cache block ids (a host
      list), ``start`` the number of tokens already cached, ``table_row`` the sequence's row in the
      KV cache's device block table ``kv.block_table``
      (:class:`~loraserve.sched.block_table.BlockTable`), or -1 when it has none (a
      warm-up step's scratch sequences); the older three-field form means -1. It may
      build any metadata it likes. A backend that reads the device table calls
      ``kv.block_table.flush()`` first (in :meth:`begin_graph_step` too): that writes the blocks
      the scheduler handed out since the last step; a backend that reads ``blocks`` need not.
    - Ordering: the host may free KV blocks and table rows and hand them to the next step while a
      launched step still runs; every device write a backend makes (metadata copies, gathers, the
      flush) must be enqueued on the current stream, so a launched step reads what it was launched
      with. Page-locked host staging copied with ``non_blocking=True`` must not be rewritten before
      its copy ran: two buffers used alternately suffice (:class:`~loraserve.staging.HostStaging`),
      since the engine prepares step N+1 only after step N-1 completed.
    - :meth:`attention` writes the step's new keys and values into their cache slots, then returns
      ``[num_tokens, num_heads, head_dim]``: each token attends causally over its sequence's
      context (and at most ``sliding_window`` keys back when set). It may not modify ``q``.
    - A backend with ``graph_capturable = True`` implements :meth:`begin_graph_step`, which refills
      fixed buffers (never reallocates them) for a padded batch of ``batch_size`` decode rows; the
      padding rows must write nothing and read nothing. Every launch is sized from host integers.
    - Always safe: a step of one sequence and one token.
    """

    name = "abstract"
    #: whether decode steps may be captured in CUDA graphs (see :meth:`begin_graph_step`)
    graph_capturable = False

    def __init__(self, kv: KVCache, sliding_window: int | None = None):
        self.kv = kv
        self.sliding_window = sliding_window

    def begin_step(self, seqs: list[tuple[list[int], int, int, int]]) -> None:
        raise NotImplementedError

    def begin_graph_step(self, seqs: list[tuple[list[int], int, int, int]], batch_size: int) -> None:
        raise NotImplementedError(f"attention backend {self.name!r} cannot run in CUDA graphs")

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class AttentionSpec:
    """What an attention backend's factory receives: ``factory(spec)``."""

    kv: KVCache
    device: torch.device
    #: the model's sliding window in tokens, or None
    sliding_window: int | None
    #: most sequences in one step, and the context length (the longest block table)
    max_seqs: int
    context_len: int


# == Plugin options ================================================================================


class PluginOptions(BaseSettings):
    """Base class of a plugin's own options, registered with ``loraserve_register_options``.

    Each field is one option, declared as :class:`loraserve.settings.Settings` declares its own:
    ``max_lora_chunk_size: int = Field(16, description="...")`` becomes ``--max-lora-chunk-size``
    in ``--help`` (in a group named after the plugin) and ``LORASERVE_MAX_LORA_CHUNK_SIZE`` in the
    environment (flag > environment > default). Validators raise ``ValueError`` naming the allowed
    values. Option names share one namespace with the core flags and other plugins' options: a
    clash is an error naming both. The validated instance reaches every factory the plugin
    registered as the keyword argument ``options``.
    """

    model_config = SettingsConfigDict(env_prefix="LORASERVE_", extra="forbid", validate_default=True)


# == Frontends ======================================================================================


class FrontendFactory(Protocol):
    """What ``loraserve_register_frontends`` registers: adds routes to the server's FastAPI app.

    ``engine`` is an :class:`EngineClient`, the only surface a frontend may use; ``settings`` the
    server's :class:`~loraserve.settings.Settings`. Raise :class:`~loraserve.errors.UserError`
    subclasses from routes for 4xx answers (their ``http_status``). The return value is ignored.
    """

    def __call__(self, app: Any, engine: Any, settings: Any) -> None: ...


@dataclass(frozen=True)
class ModelInfo:
    """Facts about the served model that do not change while the engine runs."""

    name: str  #: the served model name (``--served-model-name``, else the model's own)
    path: str  #: where the weights came from (``--model-path``, else the config's name or path)
    context_len: int  #: the most tokens (prompt plus output) one request may hold
    vocab_size: int  #: token ids are in ``[0, vocab_size)``
    max_total_tokens: int  #: the KV cache's size in tokens; a request never holds more
    lora_enabled: bool  #: whether requests may name adapters at all
    has_tokenizer: bool  #: False for a model without one (dummy weights): only token-id prompts work
    bos_token_id: int | None  #: the tokenizer's beginning-of-sequence token, if it has one


class EngineStats(TypedDict, total=False):
    """A snapshot of the engine between two steps, for ``/metrics``. The ``lora_*`` keys are present
    only when LoRA is enabled."""

    waiting: int  #: requests in the waiting queue
    running: int  #: requests in the running batch
    kv_blocks_total: int
    kv_blocks_free: int  #: blocks a request may get: free, or cached with no holder (evictable)
    #: with the prefix cache on: ``{"cached_blocks", "evictable_blocks", "queried_tokens",
    #: "hit_tokens", "evicted_blocks"}`` (blocks now; tokens and evictions counted since start)
    prefix_cache: dict[str, int]
    steps: dict[str, list]  #: ``{"decode" | "prefill": [steps, seconds]}``
    #: ``{"decode" | "prefill": {"host_s", "gpu_s", "gpu_steps"}}``: the host's share of the steps'
    #: wall time and the GPU time of their forward pass and sampling (CUDA events; CUDA only)
    step_timing: dict[str, dict[str, float]]
    lora_slots_total: int  #: GPU adapter slots (the base model counts as one)
    lora_slots_in_use: int
    lora_host_cached: int  #: adapters held in the host cache
    lora_adapters: int  #: adapters registered by name
    lora_copies_in_flight: int  #: adapter copies to GPU slots not finished yet
    lora_counters: dict[str, float]  #: loads, hits, misses, evictions, bytes and seconds of copies, ...
    #: ``(adapter, rank, pinned, in a GPU slot, in the host cache)`` of each registered adapter
    lora_residency: list[tuple[str, int, bool, bool, bool]]
    #: ``(adapter, version, identity)`` of each registered adapter (identity: ``"blake2b:<hex>"``)
    lora_adapter_info: list[tuple[str, int, str]]
    #: vLLM's ``lora_requests_info``: ``{"running": names, "waiting": names, "max_lora": int, "time": unix s}``
    lora_requests_info: dict[str, Any]


class EngineClient(abc.ABC):
    """The engine as a frontend sees it.

    A frontend plugin's ``factory(app, engine, settings)`` receives one. Lifecycle: usable as soon
    as it is built; generations go ``make_request`` (validate, tokenize) then ``stream`` (submit and
    receive outputs) then ``final_output``; ``shutdown`` ends it: unfinished requests end with the
    finish reason ``"abort"``, and submitting, aborting or changing adapters afterwards raises
    ``UserError``. Adapter names are ``adapter`` (a str) here; on the wire they keep SGLang's
    ``lora_path`` / ``lora_name``.

    Errors a client can fix are :class:`loraserve.errors.UserError` subclasses, which the HTTP layer
    answers with their ``http_status`` (400, 403 Forbidden, 404 NotFound, 409 Conflict, 413
    TooLarge, 429 QueueFull); anything else is a bug (500). The engine may run in this process
    (:class:`loraserve.engine.Engine` implements this class directly) or in another one behind IPC:
    every method takes and returns plain data, or the request and output records that travel with
    a generation.

    Threads: the engine runs its steps on a thread of its own. ``stream`` is awaited on an asyncio
    event loop; the methods that may block (tokenizing, loading an adapter, waiting for the engine
    thread between steps) are marked "blocks": call them from a worker thread, never from the event
    loop and never from the engine thread. The rest are quick and safe from any thread.
    """

    # -- the model ------------------------------------------------------------------------------

    @abc.abstractmethod
    def model_info(self) -> ModelInfo:
        """Facts about the served model (name, path, context length, vocabulary, KV size, whether LoRA
        is on). Quick; any thread; never raises."""

    @abc.abstractmethod
    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        """The prompt token ids of a chat: ``messages`` (``{"role", "content", ...}`` dicts) rendered by
        the tokenizer's chat template with the generation prompt appended, then tokenized without
        adding special tokens (the template has them). Blocks (jinja and the tokenizer).

        Raises UserError when the model has no tokenizer or no chat template, or the template rejects
        the messages; TooLarge when the rendered text is longer than ``--max-prompt-chars``.
        """

    @abc.abstractmethod
    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``token_ids``. Quick; any thread. Raises UserError when the model has no
        tokenizer (``model_info().has_tokenizer`` tells beforehand)."""

    # -- generations ----------------------------------------------------------------------------

    @abc.abstractmethod
    def make_request(
        self,
        prompt: str | None = None,
        input_ids: Sequence[int] | None = None,
        params: SamplingParams | dict | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Validate and tokenize one request; submits nothing. ``prompt`` (text) or ``input_ids``;
        ``params`` SGLang's sampling parameters (``n`` must be 1: a frontend fans out ``n`` itself);
        ``adapter`` a name, None for the base model (whether it exists is checked on submit).
        Blocks (tokenizing a long prompt).

        Raises UserError naming the bad value (sampling parameters, token ids outside the vocabulary,
        prompt plus ``max_new_tokens`` past the context or the KV cache, an adapter without LoRA);
        TooLarge for a prompt longer than ``--max-prompt-chars``.
        """

    @abc.abstractmethod
    def stream(self, *, requests: list[Request]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Submit ``requests`` (atomically: they may join the same step) and yield ``(index, delta)``
        as tokens come, ``index`` the position in ``requests``; each request's last delta has
        ``finished`` set, with ``finish_reason`` ``"stop"``, ``"length"``, ``"abort"`` (shut down
        or aborted) or ``"error"`` (a bug; the request's ``error`` says what). An async generator: run
        it on an event loop. Closing it early (a client went away) aborts the unfinished requests.

        The first ``__anext__`` raises, before anything runs: NotFound for an adapter nobody knows,
        QueueFull when the waiting queue is at ``--max-queued-requests`` (TooLarge when the requests
        alone are more than it holds), UserError when the engine is shutting down.
        """

    @abc.abstractmethod
    def abort(self, request_id: str) -> None:
        """Abort a submitted request; it finishes with ``"abort"`` and its KV blocks are freed before
        the next step. Unknown or finished ids are ignored. Quick; any thread. Raises UserError when
        the engine is shutting down (which aborts everything anyway)."""

    @abc.abstractmethod
    def final_output(self, request: Request) -> dict[str, Any]:
        """The SGLang-style result of a finished request: ``{"text", "output_ids", "meta_info"}``.
        Quick; any thread; call only after its last delta arrived."""

    # -- adapters -------------------------------------------------------------------------------

    @abc.abstractmethod
    def loaded_adapters(self) -> list[dict[str, Any]]:
        """Every adapter loaded by name: ``{"name", "source", "pinned", "rank", "version", "identity"}``
        dicts (``identity``: ``"blake2b:<hex>"``, the hash of the weights and scaling, equal for equal
        weights); empty without LoRA. Quick; any thread."""

    @abc.abstractmethod
    def unloading_adapters(self) -> list[dict[str, Any]]:
        """Adapters unloaded by name whose memory waits for their in-flight requests:
        ``{"name", "version", "source", "in_flight"}`` dicts; empty without LoRA. Quick; any thread."""

    @abc.abstractmethod
    def is_servable(self, adapter: str) -> bool:
        """Whether a request may name ``adapter``: it is loaded, or a resolver plugin knows a source for
        it (the engine then loads it when such a request is submitted). False without LoRA. Blocks (a
        resolver may look at a file system or a hub)."""

    @abc.abstractmethod
    def check_adapter_updates(self) -> None:
        """Raise unless adapters may be loaded and unloaded now: UserError when LoRA is off, Forbidden
        with ``--disable-lora-runtime-updates``. Quick; any thread. ``load_adapter`` and
        ``unload_adapter`` check this too; a frontend calls it first to refuse before reading a body."""

    @abc.abstractmethod
    def load_adapter(self, adapter: str, source: str, pinned: bool = False, load_inplace: bool = False) -> None:
        """Load the adapter at ``source`` (a PEFT directory, a hub id, whatever a loader plugin reads)
        under the name ``adapter``, ``pinned`` keeping it in a GPU slot. Requests see it only once it
        is complete; a failed load leaves nothing behind. Blocks (reads the weights).

        ``load_inplace``: when ``adapter`` is loaded already, swap in the new weights in one step under
        a new version; requests already running finish on the old version (freed after the last of
        them), later ones get the new one, and no cached prefix of the old version is reused.

        Raises what ``check_adapter_updates`` raises; UserError for a bad name or unreadable files;
        Forbidden for a source the operator's settings refuse; NotFound for a missing source;
        Conflict when the name is taken (without ``load_inplace``) or no slot can be pinned.
        """

    @abc.abstractmethod
    def load_adapter_from_tensors(
        self, adapter: str, config: dict[str, Any], tensors: bytes, pinned: bool = False, load_inplace: bool = False
    ) -> None:
        """Load an adapter sent as data: ``config`` the content of its ``adapter_config.json``,
        ``tensors`` the bytes of its ``adapter_model.safetensors`` (the caller has verified any
        checksum). The same checks as a directory load apply (loader, limits, pins); ``pinned`` and
        ``load_inplace`` as in :meth:`load_adapter`. Blocks.

        Raises what ``check_adapter_updates`` raises; UserError for a config or weights the loader
        refuses; Conflict as :meth:`load_adapter`.
        """

    @abc.abstractmethod
    def unload_adapter(self, adapter: str, timeout: float | None) -> int:
        """Hide ``adapter`` from new requests at once, wait up to ``timeout`` seconds (None: as long as
        it takes) for its in-flight requests, then free its memory. Returns 0 when freed, else the
        number of requests still holding it (the last of them frees it; ``unloading_adapters`` lists
        it until then). Blocks. Raises what ``check_adapter_updates`` raises; NotFound for a name that
        is not loaded."""

    # -- the prefix cache --------------------------------------------------------------------------

    @abc.abstractmethod
    def flush_cache(self) -> int:
        """Forget every cached prompt prefix (SGLang's ``/flush_cache``): blocks no request holds are
        freed, blocks running requests hold stay theirs, uncached. Returns the number of blocks that
        were cached (0 with ``--disable-radix-cache``). Blocks until the engine thread reaches the end
        of its current step; raises UserError once the engine has stopped."""

    # -- stats ----------------------------------------------------------------------------------

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """Queue lengths, KV-cache use, step counts and, with LoRA, adapter residency and counters,
        taken between two steps (or as they stand once the engine has stopped). Blocks until the
        engine thread reaches the end of its current step."""

    @abc.abstractmethod
    def effective_settings(self) -> dict[str, Any]:
        """The settings as the engine runs them: every ``auto`` or unset input replaced by what was
        chosen (device, dtype, backends, KV-cache tokens, batch and LoRA limits), as JSON values; the
        API key redacted. Quick; any thread."""

    # -- lifecycle ------------------------------------------------------------------------------

    @abc.abstractmethod
    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine: unfinished requests end with ``"abort"``, new work is refused. Idempotent.
        Blocks up to ``timeout`` seconds; never call it from the engine thread."""
