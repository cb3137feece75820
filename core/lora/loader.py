"""Contracts of adapter loaders and resolvers, the error they raise, and the limit checks they share.

An :class:`AdapterLoader` turns a source string (a directory, a hub id, anything its plugin
understands) into a :class:`~loraserve.lora.adapter.LoRAAdapter`; an :class:`AdapterResolver` maps
an adapter name nobody loaded to such a source. Both are registered by plugins through
``loraserve_register_loaders`` / ``loraserve_register_resolvers``. Every refusal is an
:class:`AdapterError` whose message names the offending field, tensor or flag and what to change.
The engine-wide limits (``--max-lora-rank``, ``--lora-target-modules``) are checked here, so every
loader words them the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping, NamedTuple

from loraserve.errors import UserError
from loraserve.lora.adapter import BaseModelShape, LoRAAdapter
from loraserve.lora.targets import SUPPORTED_MODULES

if TYPE_CHECKING:
    from loraserve.lora.policy import AdapterSourcePolicy


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

    def load(self, source: str, *, name: str, shape: BaseModelShape, max_rank: int | None = None,
             target_modules: Iterable[str] | None = None, policy: AdapterSourcePolicy | None = None) -> LoRAAdapter:
        raise NotImplementedError

    def peek(self, source: str, shape: BaseModelShape | None = None, *,
             policy: AdapterSourcePolicy | None = None) -> AdapterSummary:
        raise NotImplementedError


class AdapterResolver:
    """Base class of adapter resolvers.

    Contract: :meth:`resolve` maps an adapter name that a request used but nobody loaded to a
    source string some loader's ``can_load`` accepts, or returns None when this resolver does not
    know the name. It must not load weights itself and must not raise for an unknown name; it may
    raise :class:`AdapterError` when it knows the name but the source is unusable.
    """

    name = "abstract"

    def resolve(self, name: str) -> str | None:
        raise NotImplementedError


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
        raise AdapterError(f"--lora-target-modules names unknown module(s) {', '.join(unknown)}; "
                           f"choose from {', '.join(SUPPORTED_MODULES)} or 'all'")
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
            f"listing {', '.join(sorted(allowed | set(outside)))} (the GPU pool only has room for those)")


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
            f"{max_rank}; restart with --max-lora-rank {rank} or more, or use an adapter of rank <= {max_rank}")
