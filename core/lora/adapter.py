"""The adapter data model: the base model's LoRA-relevant shape and one loaded adapter's weights.

:class:`BaseModelShape` says which sizes an adapter must fit (read from the base model's Hugging
Face config) and how the engine fuses projections: ``qkv_proj`` (slices q, k, v), ``o_proj``,
``gate_up_proj`` (slices gate, up) and ``down_proj``. :class:`LoRAAdapter` holds one adapter as
CPU tensors already in that fused layout, with every per-module scaling folded into B so that one
``scaling`` per adapter is all the kernels need. :func:`build_adapter` turns per-module PEFT weights
into that layout; every loader plugin ends with it, so the layout is defined in one place.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from loraserve.lora.targets import EMBEDDING_MODULES, FUSED_MODULES, FUSED_SLICE


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """PEFT's scaling of a module: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


@dataclass(frozen=True)
class BaseModelShape:
    """Sizes of the base model that adapter weights must fit.

    ``q_size`` is ``num_attention_heads * head_dim`` and ``kv_size`` is
    ``num_key_value_heads * head_dim``; they differ from ``hidden_size`` under GQA or an explicit
    ``head_dim``.
    """

    num_layers: int
    hidden_size: int
    q_size: int
    kv_size: int
    intermediate_size: int
    vocab_size: int

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BaseModelShape.{f.name} must be a positive integer, not {value!r}")

    @classmethod
    def from_config(cls, hf_config: Any) -> BaseModelShape:
        """Read the sizes from a transformers ``PretrainedConfig`` (or a dict of its fields)."""
        get = hf_config.get if isinstance(hf_config, Mapping) else lambda k, d=None: getattr(hf_config, k, d)
        text = get("text_config")
        if text is not None and get("hidden_size") is None:  # multimodal wrappers keep the LM config inside
            return cls.from_config(text)
        missing = [
            k
            for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
            if get(k) is None
        ]
        if missing:
            raise ValueError(
                f"the base model config has no {', '.join(missing)}; LoRA serving needs a Llama-family config"
            )
        heads = get("num_attention_heads")
        head_dim = get("head_dim") or get("hidden_size") // heads
        kv_heads = get("num_key_value_heads") or heads
        return cls(
            num_layers=get("num_hidden_layers"),
            hidden_size=get("hidden_size"),
            q_size=heads * head_dim,
            kv_size=kv_heads * head_dim,
            intermediate_size=get("intermediate_size"),
            vocab_size=get("vocab_size"),
        )

    def module_features(self) -> dict[str, tuple[int, int]]:
        """``(in_features, out_features)`` of every PEFT module name in
        :data:`loraserve.lora.targets.SUPPORTED_MODULES`.

        For ``embed_tokens`` "in" is the vocabulary (the rows of LoRA A's transpose) and "out" the
        hidden size, matching PEFT's ``lora_embedding_A [r, vocab]`` / ``lora_embedding_B [hidden, r]``.
        """
        h, q, kv, i, v = self.hidden_size, self.q_size, self.kv_size, self.intermediate_size, self.vocab_size
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
            "embed_tokens": (v, h),
            "lm_head": (h, v),
        }

    def fused_in_features(self, fused_name: str) -> int:
        """Input size of a fused projection (every slice shares it)."""
        return self.module_features()[_members(fused_name)[0]][0]

    def output_offsets(self, fused_name: str) -> tuple[int, ...]:
        """Output offsets of a fused projection's slices, e.g. ``(0, q, q+kv, q+2kv)`` for qkv_proj."""
        feats = self.module_features()
        offsets = [0]
        for member in _members(fused_name):
            offsets.append(offsets[-1] + feats[member][1])
        return tuple(offsets)


def _members(fused_name: str) -> tuple[str, ...]:
    try:
        return FUSED_MODULES[fused_name]
    except KeyError:
        raise ValueError(
            f"unknown fused projection {fused_name!r}; expected one of {', '.join(FUSED_MODULES)}"
        ) from None


@dataclass
class LoRAAdapter:
    """One adapter, as CPU tensors in the engine's fused layout.

    ``weights[(layer_idx, fused_name)] = (A, B)`` with ``A: [n_slices * r, in]`` (slice ``i`` in
    rows ``i*r:(i+1)*r``) and ``B: [out_total, r]`` (slice ``i`` in rows ``off[i]:off[i+1]`` of
    :meth:`BaseModelShape.output_offsets`), ``r`` being the largest rank among that projection's
    targeted members; smaller members are zero-padded and untargeted members are all zeros. A layer
    or projection the adapter does not touch has no entry. ``embed_tokens`` is
    ``(A [r, vocab], B [hidden, r])`` and ``lm_head`` is ``(A [r, hidden], B [vocab, r])``.

    For every module, ``scaling * (x @ A_i^T) @ B_i^T`` is exactly what PEFT adds: per-module
    scalings that differ from :attr:`scaling` (``rank_pattern`` / ``alpha_pattern``) are folded into B.
    Instances are treated as immutable once built.
    """

    name: str
    source: str
    scaling: float
    target_modules: frozenset[str]
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    embed_tokens: tuple[torch.Tensor, torch.Tensor] | None = None
    lm_head: tuple[torch.Tensor, torch.Tensor] | None = None
    #: adapter_config values, for display; ``rank`` (below) is what sizes the GPU slot
    r: int | None = None
    lora_alpha: float | None = None
    use_rslora: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    #: DoRA: float32 ``[out_total]`` magnitude per fused projection, NaN on slices without DoRA
    #: (see :mod:`loraserve.lora.dora`); empty for a plain LoRA adapter
    magnitudes: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    #: DoRA: float32 ``[out_total]`` per-output-feature scale ``m / ||W + s*B*A||`` per fused projection
    #: (1 on slices without DoRA), computed against the base weights when the engine loads the adapter
    dora_scales: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    #: DoRA with tensor parallelism: ``(magnitude, this rank's partial squared norms)`` of the
    #: row-parallel projections, until the ranks' parts are summed (:func:`~loraserve.lora.dora.finish_scales`)
    dora_partial: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def is_dora(self) -> bool:
        """Whether any module of the adapter is a DoRA module (has a magnitude vector)."""
        return bool(self.magnitudes)

    @property
    def rank(self) -> int:
        """Largest rank over every module: the GPU slot rank this adapter needs."""
        ranks = [A.shape[0] // len(FUSED_MODULES[fused]) for (_, fused), (A, _) in self.weights.items()]
        ranks += [pair[0].shape[0] for pair in (self.embed_tokens, self.lm_head) if pair is not None]
        return max(ranks, default=0)

    @property
    def nbytes(self) -> int:
        """Host bytes held by the weights."""
        dora = [*self.magnitudes.values(), *self.dora_scales.values()]
        return sum(t.numel() * t.element_size() for t in [*self.tensors(), *dora])

    def tensors(self) -> list[torch.Tensor]:
        out = [t for pair in self.weights.values() for t in pair]
        out += [t for pair in (self.embed_tokens, self.lm_head) if pair is not None for t in pair]
        return out

    def identity(self) -> str:
        """The hash of what the adapter computes: its scaling and every weight's place, dtype, shape
        and bytes (BLAKE2b, hex). Equal for equal weights whatever the name or source; the prefix
        cache keys cached prefixes on it (with the load's version)."""
        h = hashlib.blake2b(digest_size=32)
        h.update(repr(float(self.scaling)).encode())
        entries = [(f"{layer}.{fused}", pair) for (layer, fused), pair in sorted(self.weights.items())]
        entries += [(name, pair) for name, pair in (("embed_tokens", self.embed_tokens), ("lm_head", self.lm_head))]
        entries += [(f"{layer}.{fused}.magnitude", (m,)) for (layer, fused), m in sorted(self.magnitudes.items())]
        for name, pair in entries:
            if pair is None:
                continue
            for t in pair:
                h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy())  # (no copy to bytes)
        return h.hexdigest()

    def module_rank(self, layer_idx: int, fused_name: str) -> int:
        """Rank of one fused projection (0 when the adapter does not touch it)."""
        pair = self.weights.get((layer_idx, fused_name))
        return 0 if pair is None else pair[0].shape[0] // len(FUSED_MODULES[fused_name])

    def check(self, shape: BaseModelShape) -> None:
        """Raise ``ValueError`` unless every tensor follows the layout above for ``shape``.

        A loader that passes its adapters through :func:`build_adapter` always satisfies this; the
        engine may call it on any loader's output before the adapter becomes visible.
        """
        if not math.isfinite(self.scaling):
            raise ValueError(f"adapter {self.name!r}: scaling {self.scaling} is not finite")
        for (layer, fused), (A, B) in self.weights.items():
            where = f"adapter {self.name!r} layer {layer} {fused}"
            if not isinstance(layer, int) or not 0 <= layer < shape.num_layers:
                raise ValueError(f"{where}: layer index must lie in [0, {shape.num_layers})")
            n, in_f, offsets = len(_members(fused)), shape.fused_in_features(fused), shape.output_offsets(fused)
            if A.dim() != 2 or A.shape[0] % n or A.shape[0] == 0 or A.shape[1] != in_f:
                raise ValueError(f"{where}: A has shape {tuple(A.shape)}, expected ({n} * r, {in_f}) with r >= 1")
            r = A.shape[0] // n
            if tuple(B.shape) != (offsets[-1], r):
                raise ValueError(f"{where}: B has shape {tuple(B.shape)}, expected ({offsets[-1]}, {r})")
        for key, m in self.magnitudes.items():
            if key not in self.weights or tuple(m.shape) != (shape.output_offsets(key[1])[-1],):
                raise ValueError(
                    f"adapter {self.name!r} {key}: a DoRA magnitude needs LoRA weights and one value per output"
                )
        feats = shape.module_features()
        for mod in EMBEDDING_MODULES:
            pair = getattr(self, mod)
            if pair is None:
                continue
            A, B = pair
            in_f, out_f = feats[mod]
            if A.dim() != 2 or A.shape[1] != in_f or A.shape[0] == 0 or tuple(B.shape) != (out_f, A.shape[0]):
                raise ValueError(
                    f"adapter {self.name!r} {mod}: A {tuple(A.shape)} / B {tuple(B.shape)} do not "
                    f"fit, expected A (r, {in_f}) and B ({out_f}, r)"
                )
        for t in self.tensors():
            if t.device.type != "cpu":
                raise ValueError(f"adapter {self.name!r}: weights must be CPU tensors, found one on {t.device}")


@dataclass(frozen=True)
class ModuleLoRA:
    """One PEFT module's weights before fusion: ``A [r, in]``, ``B [out, r]`` and its own scaling."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    #: DoRA's ``lora_magnitude_vector [out]``, None for plain LoRA
    magnitude: torch.Tensor | None = None


def build_adapter(
    *,
    name: str,
    source: str,
    shape: BaseModelShape,
    scaling: float,
    modules: Mapping[tuple[int | None, str], ModuleLoRA],
    **summary: Any,
) -> LoRAAdapter:
    """Fuse per-module weights into a :class:`LoRAAdapter`.

    :param modules: ``(layer_idx, peft_name) -> ModuleLoRA`` for per-layer projections and
        ``(None, "embed_tokens" | "lm_head")`` for the model-level ones. Shapes must already have been
        validated by the loader (with messages naming the tensors); a mismatch here is a loader bug
        and raises ``ValueError``.
    :param scaling: the adapter-wide scaling the kernels will apply; must be non-zero, since each
        module's B is multiplied by ``module.scaling / scaling``.
    :param summary: further :class:`LoRAAdapter` fields (``r``, ``lora_alpha``, ``use_rslora``, ``config``).
    """
    if scaling == 0 or not math.isfinite(scaling):
        raise ValueError(f"adapter scaling must be finite and non-zero, not {scaling}")
    feats = shape.module_features()
    groups: dict[tuple[int, str], dict[int, ModuleLoRA]] = {}
    embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, module), m in modules.items():
        in_f, out_f = feats[module]
        r = m.A.shape[0]
        if m.A.shape != (r, in_f) or m.B.shape != (out_f, r) or r == 0:
            raise ValueError(
                f"{module} of layer {layer}: A {tuple(m.A.shape)} / B {tuple(m.B.shape)} do not fit ({in_f} -> {out_f})"
            )
        if module in EMBEDDING_MODULES:
            embeddings[module] = (m.A.contiguous(), _fold(m.B, m.scaling / scaling, m.B.dtype))
        else:
            fused, i = FUSED_SLICE[module]
            groups.setdefault((layer, fused), {})[i] = m
    weights = {}
    for (layer, fused), slices in sorted(groups.items()):
        members, offsets = FUSED_MODULES[fused], shape.output_offsets(fused)
        r = max(m.A.shape[0] for m in slices.values())
        dtype = _common_dtype([t for m in slices.values() for t in (m.A, m.B)])
        A = torch.zeros(len(members) * r, shape.fused_in_features(fused), dtype=dtype)
        B = torch.zeros(offsets[-1], r, dtype=dtype)
        for i, m in slices.items():
            rm = m.A.shape[0]
            A[i * r : i * r + rm] = m.A.to(dtype)
            B[offsets[i] : offsets[i + 1], :rm] = _fold(m.B, m.scaling / scaling, dtype)
        weights[(layer, fused)] = (A, B)
    target_modules = frozenset(module for _, module in modules)
    return LoRAAdapter(
        name=name,
        source=source,
        scaling=float(scaling),
        target_modules=target_modules,
        weights=weights,
        embed_tokens=embeddings.get("embed_tokens"),
        lm_head=embeddings.get("lm_head"),
        magnitudes=_magnitudes(modules, shape),
        **summary,
    )


def _magnitudes(modules: Mapping[tuple[int | None, str], ModuleLoRA], shape: BaseModelShape) -> dict:
    """DoRA magnitudes per fused projection, float32 ``[out_total]``, NaN on slices without one."""
    out: dict[tuple[int, str], torch.Tensor] = {}
    for (layer, module), m in modules.items():
        if m.magnitude is None:
            continue
        if module in EMBEDDING_MODULES:
            raise ValueError(f"{module}: DoRA is served on the layer projections only")
        fused, i = FUSED_SLICE[module]
        offsets = shape.output_offsets(fused)
        mag = out.setdefault((layer, fused), torch.full((offsets[-1],), float("nan"), dtype=torch.float32))
        mag[offsets[i] : offsets[i + 1]] = m.magnitude.to(torch.float32)
    return dict(sorted(out.items()))


def _fold(B: torch.Tensor, ratio: float, dtype: torch.dtype) -> torch.Tensor:
    if ratio == 1.0:
        return B.to(dtype).contiguous()
    return (B.to(torch.float64) * ratio).to(dtype).contiguous()


def _common_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype
