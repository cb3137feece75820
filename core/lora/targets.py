"""The names of the model parts an adapter may target, in one place (no torch: settings import it).

PEFT names the per-layer projections ``q_proj`` ... ``down_proj``; the engine fuses them into
``qkv_proj`` (slices q, k, v), ``o_proj``, ``gate_up_proj`` (slices gate, up) and ``down_proj``.
``embed_tokens`` and ``lm_head`` are model-level modules, served by backends with embedding support.
``all`` in ``--lora-target-modules`` means the seven projections (:func:`expand_all`).
"""

from __future__ import annotations

from collections.abc import Iterable

#: fused projection -> the PEFT module names of its slices, in output order
FUSED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}
#: PEFT module name -> (fused projection, slice index)
FUSED_SLICE: dict[str, tuple[str, int]] = {
    member: (fused, i) for fused, members in FUSED_MODULES.items() for i, member in enumerate(members)
}
#: PEFT names of the per-layer projections LoRA may target (what ``all`` means)
LAYER_MODULES: tuple[str, ...] = tuple(FUSED_SLICE)
#: PEFT names of the model-level modules LoRA may target
EMBEDDING_MODULES: tuple[str, ...] = ("embed_tokens", "lm_head")
#: every PEFT module name an adapter may target
SUPPORTED_MODULES: tuple[str, ...] = LAYER_MODULES + EMBEDDING_MODULES


def expand_all(names: Iterable[str]) -> list[str]:
    """``names`` with ``all`` replaced by the seven projections, each name once, in a stable order."""
    names = list(names)
    expanded = [*LAYER_MODULES, *names] if "all" in names else names
    return [m for m in dict.fromkeys(expanded) if m != "all"]
