"""Building blocks of the Llama-family model: LoRA-aware linear and embedding layers, RMSNorm, RoPE.

Every projection is a :class:`LoRALinear`: one weight ``[out_total, in]`` that may fuse several
output slices (q/k/v, gate/up), an optional bias, and a ``lora_hook`` the LoRA manager sets. The
hook receives the layer input and the base output and adds the adapter delta into the output in
place, so the base projection runs once for the whole batch whatever adapters the tokens use.
A LoRA backend that can take the shrink from the base GEMM gets the adapters' A rows appended
to the weight (:meth:`LoRALinear.append_rows`); on steps where ``shrink_in_gemm()`` says so, one GEMM
then gives the base output and every slot's ``x @ A^T`` (the shrink shares the GEMM's read of
``x``), and the hook gets those extra columns as a third argument.
Parameters are created empty, directly on the target device and dtype; the loader fills them.
Under tensor parallelism (a :class:`~loraserve.distributed.TensorParallel` of more than one rank) a
layer holds this rank's shard, Megatron-style: a ``"column"`` layer a slice of every fused output
slice (q, k and v each cut by heads), a ``"row"`` layer a slice of its input features followed by
an all-reduce, and the embedding a slice of the vocabulary; ``input_size`` and ``output_offsets``
are then the local sizes and :meth:`LoRALinear.shard_of` cuts a full checkpoint tensor to them.
RMSNorm (with the residual add) and RoPE run as fused Triton kernels where
:func:`~loraserve.models.fused.use_fused` says so (on CUDA, by default) and as the eager code here
otherwise; the kernels round as this code does (:mod:`loraserve.models.fused` says where they differ).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loraserve.contract import LoRAEpilogue
from loraserve.distributed import TensorParallel
from loraserve.errors import ConfigError
from loraserve.models import fused
from loraserve.models.epilogue import apply_epilogue

#: ``hook(x, out)`` (or ``hook(x, out, shrunk)``, see :meth:`LoRALinear.append_rows`) for linear layers,
#: ``hook(input_ids, out)`` for the embedding; edits ``out`` in place.
LoRAHook = Callable[..., None]

# RoPE types whose frequencies do not depend on the sequence length, so one table serves a flat
# batch of many sequences. "dynamic" and "longrope" rescale with the length and are refused.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


PARALLEL_STYLES = ("column", "row")


class LoRALinear(nn.Module):
    """A linear layer whose output may fuse several slices, with a LoRA hook.

    :param input_size: features in (of the whole model, before any tensor-parallel sharding).
    :param output_sizes: size of each fused output slice (``[q, kv, kv]`` for qkv_proj,
        ``[inter, inter]`` for gate_up_proj, ``[out]`` for a plain projection), unsharded.
    :param bias: whether the layer has a bias.
    :param parallel: ``"column"`` (each rank holds ``1/size`` of every output slice, the input
        whole), ``"row"`` (each rank holds ``1/size`` of the input features and computes a partial
        sum of the whole output, all-reduced at the end of :meth:`forward`) or None (replicated).
    :param tp: the tensor-parallel group (None: one rank, no sharding whatever ``parallel`` says).

    ``input_size``, ``output_sizes`` and ``output_offsets`` are this rank's: ``output_offsets``
    holds the slice boundaries, ``(0, q, q+kv, q+2kv)`` for qkv_proj with q and kv the local
    sizes; the LoRA backends read it to apply one adapter matrix pair per slice.
    ``full_input_size`` and ``full_output_sizes`` are the unsharded sizes.

    A row-parallel layer's LoRA hook sees the local input slice and the rank's *partial* output,
    before the all-reduce, and adds its partial delta there. That is exact: with A cut by
    columns like the weight, ``s * (x A^T) B^T = sum_r s * (x_r A_r^T) B^T``, so the one
    all-reduce sums the base and LoRA partials together, and no extra communication is needed
    (equivalent to all-reducing the partial shrink ``x_r A_r^T`` as S-LoRA does). Its bias is
    added on rank 0 only, so the sum counts it once.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
        *,
        parallel: str | None = None,
        tp: TensorParallel | None = None,
        name: str = "linear layer",
        lora_defer: bool = False,
    ):
        super().__init__()
        if input_size < 1 or not output_sizes or any(s < 1 for s in output_sizes):
            raise ConfigError(f"linear layer sizes must be positive: input {input_size}, outputs {tuple(output_sizes)}")
        if parallel is not None and parallel not in PARALLEL_STYLES:
            raise ValueError(f"parallel style {parallel!r} of {name}; use one of {PARALLEL_STYLES} or None")
        self.tp = tp if tp is not None else TensorParallel()
        #: how this layer is sharded, or None when it is not (replicated, or a single rank)
        self.parallel = parallel if self.tp.size > 1 else None
        self.full_input_size = int(input_size)
        self.full_output_sizes: tuple[int, ...] = tuple(int(s) for s in output_sizes)
        local_in, local_out = self.full_input_size, self.full_output_sizes
        if self.parallel == "row":
            local_in = self.tp.shard_size(self.full_input_size, f"{name} input size")
        elif self.parallel == "column":
            local_out = tuple(self.tp.shard_size(s, f"{name} output size") for s in self.full_output_sizes)
        offsets = [0]
        for size in local_out:
            offsets.append(offsets[-1] + size)
        self.input_size = local_in
        self.output_sizes: tuple[int, ...] = local_out
        self.output_offsets: tuple[int, ...] = tuple(offsets)
        self.output_size = offsets[-1]
        self.weight = _empty((self.output_size, self.input_size), dtype, device)
        self.bias = _empty((self.output_size,), dtype, device) if bias else None
        # a row-parallel layer's ranks each produce a partial sum: only rank 0 adds the bias
        self._adds_bias = not (self.parallel == "row" and self.tp.rank != 0)
        self.lora_hook: LoRAHook | None = None
        #: with :meth:`append_rows`: whether this step's GEMM includes the appended rows (the shrink in the GEMM)
        self.shrink_in_gemm: Callable[[], bool] | None = None
        #: given by the model when the kernel that consumes this layer's output can add the LoRA
        #: delta itself (:class:`~loraserve.contract.LoRAEpilogue`): the model then takes it
        #: with :meth:`take_epilogue` right after the call and must hand it to that kernel
        self.lora_defer = lora_defer
        self._epilogue: LoRAEpilogue | None = None
        self._weight_ext: torch.Tensor | None = None
        self._bias_ext: torch.Tensor | None = None

    @property
    def added_bias(self) -> torch.Tensor | None:
        """The bias this rank adds to its output (a row-parallel layer's ranks past 0 add none)."""
        return self.bias if self._adds_bias else None

    @property
    def shard_spec(self) -> tuple[str, int, int] | None:
        """``(parallel, rank, size)`` when this layer is sharded, else None: what the LoRA pool
        needs to cut full adapter tensors to this rank's part."""
        return None if self.parallel is None else (self.parallel, self.tp.rank, self.tp.size)

    def full_shape(self, kind: str, slice_idx: int | None = None) -> tuple[int, ...]:
        """The unsharded shape of ``kind`` (``"weight"`` or ``"bias"``), of all fused slices
        or, with ``slice_idx``, of that one (a checkpoint's ``q_proj``)."""
        out = sum(self.full_output_sizes) if slice_idx is None else self.full_output_sizes[slice_idx]
        return (out, self.full_input_size) if kind == "weight" else (out,)

    def shard_of(self, full: torch.Tensor, kind: str, slice_idx: int | None = None) -> torch.Tensor:
        """This rank's part of an unsharded tensor of :meth:`full_shape` (a view when it can be).

        Column-parallel: of every output slice, the rank's contiguous rows (for qkv_proj, its
        heads of q, of k and of v). Row-parallel: the weight's columns of the rank's input
        features; the bias whole. Unsharded: ``full`` itself."""
        if self.parallel == "row" and kind == "weight":
            start, stop = self.tp.shard_range(self.full_input_size, "input size")
            return full[:, start:stop]
        if self.parallel != "column":
            return full
        slices = range(len(self.full_output_sizes)) if slice_idx is None else [slice_idx]
        parts, base = [], 0
        for i in slices:
            local = self.output_sizes[i]
            parts.append(full[base + self.tp.rank * local : base + (self.tp.rank + 1) * local])
            base += self.full_output_sizes[i]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def append_rows(self, rows: int) -> torch.Tensor:
        """Reallocate the weight as ``[out + rows, in]`` with zero rows after its own (the bias with
        zeros after it) and return those rows, ``[rows, in]``, for the caller to fill (the LoRA pool
        keeps its A buffers there). ``weight`` and ``bias`` stay views of their first ``out`` rows."""
        if self._weight_ext is not None:
            raise RuntimeError("append_rows() may be called once per layer")
        full = torch.zeros(self.output_size + rows, self.input_size, dtype=self.weight.dtype, device=self.weight.device)
        full[: self.output_size].copy_(self.weight.data)
        self.weight.data = full[: self.output_size]
        self._weight_ext = full
        if self.bias is not None:
            bias = torch.zeros(self.output_size + rows, dtype=self.bias.dtype, device=self.bias.device)
            bias[: self.output_size].copy_(self.bias.data)
            self.bias.data = bias[: self.output_size]
            self._bias_ext = bias
        return full[self.output_size :]

    def attach_lora(self, hook: LoRAHook, shrink_in_gemm: Callable[[], bool] | None = None) -> None:
        """Called once by the LoRA manager: ``hook`` adds each step's adapter delta to this layer's
        output; ``shrink_in_gemm()`` (only after :meth:`append_rows`) says per step whether the GEMM
        covers the appended rows and so hands the hook the shrink."""
        if shrink_in_gemm is not None and self._weight_ext is None:
            raise RuntimeError("attach_lora(shrink_in_gemm=...) needs append_rows() first")
        self.lora_hook, self.shrink_in_gemm = hook, shrink_in_gemm

    def take_epilogue(self) -> LoRAEpilogue | None:
        """The LoRA delta the last call left to the output's consumer (see ``lora_defer``), or None."""
        epilogue, self._epilogue = self._epilogue, None
        return epilogue

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._epilogue = None
        if self.shrink_in_gemm is not None and self.shrink_in_gemm():
            y = F.linear(x, self._weight_ext, self._bias_ext if self._adds_bias else None)
            out = y[:, : self.output_size]  # rows of stride out + rows: downstream ops take views
            if self.lora_defer and self.parallel != "row":  # a row layer's delta must precede its all-reduce
                self._epilogue = self.lora_hook(x, out, y[:, self.output_size :], defer=True)
            else:
                self.lora_hook(x, out, y[:, self.output_size :])
        else:
            out = F.linear(x, self.weight, self.bias if self._adds_bias else None)
            if self.lora_hook is not None:
                self.lora_hook(x, out)  # adds the adapter delta in place
        if self.parallel == "row":
            # one all-reduce sums the ranks' base and LoRA partials together (class docstring)
            out = self.tp.all_reduce(out.contiguous())
        return out

    def extra_repr(self) -> str:
        sharded = f", {self.parallel}-parallel {self.tp.rank}/{self.tp.size}" if self.parallel else ""
        return f"in={self.input_size}, offsets={self.output_offsets}, bias={self.bias is not None}{sharded}"


class LoRAEmbedding(nn.Module):
    """Token embedding ``[vocab, hidden]`` with a LoRA hook called as ``hook(input_ids, out)``.

    With a ``tp`` of more than one rank it is vocab-parallel: this rank holds rows
    ``vocab_start:vocab_end``, looks up the ids that fall there, gives zeros for the others and
    all-reduces, so every rank gets the whole embedding. ``num_embeddings`` is the local row count.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        tp: TensorParallel | None = None,
    ):
        super().__init__()
        self.tp = tp if tp is not None else TensorParallel()
        self.full_num_embeddings = int(num_embeddings)
        self.vocab_start, self.vocab_end = self.tp.shard_range(self.full_num_embeddings, "vocab_size")
        self.num_embeddings = self.vocab_end - self.vocab_start
        self.embedding_dim = int(embedding_dim)
        self.weight = _empty((self.num_embeddings, self.embedding_dim), dtype, device)
        self.lora_hook: LoRAHook | None = None

    def attach_lora(self, hook: LoRAHook) -> None:
        """Called once by the LoRA manager: ``hook(input_ids, out)`` adds each step's delta."""
        self.lora_hook = hook

    def full_shape(self, kind: str = "weight", slice_idx: int | None = None) -> tuple[int, ...]:
        return self.full_num_embeddings, self.embedding_dim

    def shard_of(self, full: torch.Tensor, kind: str = "weight", slice_idx: int | None = None) -> torch.Tensor:
        """This rank's rows of an unsharded ``[vocab, hidden]`` tensor."""
        return full[self.vocab_start : self.vocab_end]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            out = F.embedding(input_ids, self.weight)
        else:
            inside = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
            out = F.embedding(torch.where(inside, input_ids - self.vocab_start, 0), self.weight)
            out.masked_fill_(~inside.unsqueeze(-1), 0.0)
            out = self.tp.all_reduce(out)  # exactly one rank contributes each row: the sum is exact
        if self.lora_hook is not None:
            self.lora_hook(input_ids, out)
        return out

    def extra_repr(self) -> str:
        sharded = f", rows {self.vocab_start}:{self.vocab_end}" if self.tp.size > 1 else ""
        return f"{self.full_num_embeddings}, {self.embedding_dim}{sharded}"


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as Hugging Face's Llama does, then cast back.

    Called with a ``residual`` it first adds ``x`` to it and returns ``(norm(h), h)`` with
    ``h = residual + x``, so a decoder keeps the residual stream and the add fuses into the norm.
    """

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.eps = float(eps)
        self.weight = _empty((hidden_size,), dtype, device)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, lora: LoRAEpilogue | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``lora``: a LoRA delta left by the projection that produced ``x``, added to ``x`` first."""
        if x.dim() == 2 and x.stride(-1) == 1 and x.dtype == self.weight.dtype and fused.use_fused(x):
            return fused.rms_norm(x, self.weight, self.eps, residual, lora=lora)
        if lora is not None:
            x = apply_epilogue(x, lora)
        if residual is None:
            return self._norm(x)
        h = residual + x
        return self._norm(h), h

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rope_parameters(config) -> dict:
    """The config's RoPE parameters in transformers 5's standard form (``rope_type``, ``rope_theta``, ...)."""
    if hasattr(config, "standardize_rope_params"):
        config.standardize_rope_params()
    params = getattr(config, "rope_parameters", None)
    if not params:  # an older-style config: rope_theta plus an optional rope_scaling dict
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_type", params.get("type", "default"))
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if "rope_type" not in params and any(isinstance(v, dict) for v in params.values()):
        raise ConfigError(
            f"per-layer RoPE parameters {params!r} are not supported by the Llama-family model; "
            "use a config with one rope_parameters dict"
        )
    return dict(params)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (NeoX half-rotation layout, as Hugging Face's Llama checkpoints use).

    The inverse frequencies and the attention scaling come from transformers' own RoPE helpers
    (``ROPE_INIT_FUNCTIONS``), so Llama-3 ``llama3`` scaling, linear and YaRN match the oracle.
    Cos/sin are computed per forward from the positions: no table sized by the context length.
    """

    def __init__(self, config, head_dim: int, device: torch.device):
        super().__init__()
        params = rope_parameters(config)
        rope_type = params.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope type {rope_type!r} (config rope_parameters/rope_scaling) is not supported: its "
                f"frequencies change with the sequence length; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(
                f"partial_rotary_factor {params['partial_rotary_factor']} is not supported; "
                "the Llama-family model rotates the whole head"
            )
        if rope_type == "default":
            base = float(params["rope_theta"])
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
            scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        if inv_freq.numel() * 2 != head_dim:
            raise ConfigError(
                f"RoPE gives {inv_freq.numel()} frequencies for head_dim {head_dim}; "
                "check head_dim and rope_parameters in config.json"
            )
        self.rope_type = rope_type
        self.attention_scaling = float(scaling)
        self.register_buffer("inv_freq", inv_freq.to(device=device, dtype=torch.float32), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[T, head_dim]`` in ``dtype``, for the flat token positions."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def rotate_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`apply_rotary` to q ``[T, heads, head_dim]`` and k ``[T, kv_heads, head_dim]``, in one
    fused kernel where :func:`~loraserve.models.fused.use_fused` says so."""
    if fused.use_fused(q) and q.stride(-1) == 1 and k.stride(-1) == 1:
        return fused.rotary(q, k, cos, sin)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[T, heads, head_dim]`` by the per-token ``cos``/``sin`` ``[T, head_dim]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
