"""The limit checks every adapter loader shares, so each words them the same way.

The loader and resolver contracts (:class:`~loraserve.contract.AdapterLoader`,
:class:`~loraserve.contract.AdapterResolver`, :class:`~loraserve.contract.AdapterError`) live in
``loraserve.contract``; the engine-wide limits (``--max-lora-rank``, ``--lora-target-modules``) are
checked here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from loraserve.contract import AdapterError
from loraserve.lora.targets import SUPPORTED_MODULES


def allowed_modules(target_modules: Iterable[str] | None) -> frozenset[str] | None:
    """Normalise ``--lora-target-modules``: None stays None (any), ``all`` means every layer projection."""
    if target_modules is None:
        return None
    names = set(target_modules)
    if "all" in names:
        names.discard("all")
        names.update(m for m in SUPPORTED_MODULES if m not in ("embed_tokens", "lm_head"))
    unknown = sorted(names - set(SUPPORTED_MODULES))
    if unknown:
        raise AdapterError(
            f"--lora-target-modules names unknown module(s) {', '.join(unknown)}; "
            f"choose from {', '.join(SUPPORTED_MODULES)} or 'all'"
        )
    return frozenset(names)


def check_target_modules(source: str, targeted: Iterable[str], target_modules: Iterable[str] | None) -> None:
    """Refuse an adapter that targets a module outside ``--lora-target-modules``."""
    allowed = allowed_modules(target_modules)
    if allowed is None:
        return
    outside = sorted(set(targeted) - allowed)
    if outside:
        raise AdapterError(
            f"adapter {source!r} targets {', '.join(outside)}, which --lora-target-modules "
            f"({', '.join(sorted(allowed)) or 'none'}) does not include; restart with --lora-target-modules "
            f"listing {', '.join(sorted(allowed | set(outside)))} (the GPU pool only has room for those)"
        )


def check_max_rank(source: str, module_ranks: Mapping[str, tuple[int, str]], max_rank: int | None) -> None:
    """Refuse an adapter whose rank exceeds ``--max-lora-rank``.

    :param module_ranks: module name -> (rank, where the rank comes from, e.g. ``"r"`` or
        ``"rank_pattern['q_proj']"``).
    """
    if max_rank is None:
        return
    over = {m: rw for m, rw in module_ranks.items() if rw[0] > max_rank}
    if over:
        module, (rank, where) = max(over.items(), key=lambda kv: kv[1][0])
        raise AdapterError(
            f"adapter {source!r} has rank {rank} ({where} = {rank}, module {module}), above --max-lora-rank "
            f"{max_rank}; restart with --max-lora-rank {rank} or more, or use an adapter of rank <= {max_rank}"
        )
