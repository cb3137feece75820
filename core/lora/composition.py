"""Weighted composition of adapters: one request runs ``w_1·ΔW_1 + … + w_n·ΔW_n`` as a virtual adapter.

A linear combination of LoRA deltas is exactly a LoRA of the concatenated rank: for every fused
projection and each of its slices, the components' A are stacked along the rank and their B
columns, each multiplied by ``weight_i * scaling_i``, are stacked the same way; the composed
adapter's scaling is 1. This is PEFT's ``add_weighted_adapter(..., combination_type="cat")``
(which puts ``weight_i * scaling_i`` on A instead of B, and keeps the sign of a negative weight: no
square-root split). The result runs through the existing kernels in one GPU slot.

A request names a composition by its *spelling*, ``NAME*WEIGHT+NAME*WEIGHT…`` (``*`` is not allowed
in adapter names, so a spelling is never an adapter name); natively it may also give the list
``[{"name": "a", "weight": 0.7}, …]``, which the frontends turn into the spelling. The engine keeps
the spelling in ``request.adapter``. :class:`AdapterCompositions` builds each composition once per
``(component name, version, weight)`` tuple and gives it an :class:`AdapterRef` of its own (a fresh
version, and the hash of its weights as identity), so the host cache, the GPU slots and the prefix
cache treat it as one more adapter. When a component is unloaded or updated, the compositions built
from that version are retired like an unloaded adapter (freed after their last request).
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from loraserve.errors import UserError
from loraserve.lora.adapter import LoRAAdapter
from loraserve.lora.policy import shown
from loraserve.lora.registry import AdapterRef, AdapterRegistry
from loraserve.lora.targets import FUSED_MODULES

#: most adapters one composition may name
MAX_COMPONENTS = 8
#: most compositions remembered at once; the least recently used idle one is retired beyond it
MAX_CACHED_COMPOSITIONS = 64
#: the ``source`` of a composed adapter's ref (followed by its versioned spelling)
SOURCE_PREFIX = "composition:"

Components = tuple[tuple[str, float], ...]

_WEIGHT = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_NAME_CHARS = re.compile(r"[A-Za-z0-9._/@+\-]+")
_WEIGHT_RE = re.compile(_WEIGHT)
#: longest spelling: every component a 256-character name and a 32-character weight
MAX_SPELLING_CHARS = MAX_COMPONENTS * (256 + 1 + 32 + 1)
_FORM = "NAME*WEIGHT+NAME*WEIGHT (e.g. 'a*0.7+b*-0.3')"


def is_composition(adapter: str | None) -> bool:
    """Whether ``request.adapter`` spells a composition rather than naming one adapter."""
    return adapter is not None and "*" in adapter


def check_components(components: Components) -> Components:
    """``components`` checked: 1 to :data:`MAX_COMPONENTS` distinct names, finite weights."""
    if not components:
        raise UserError("a weighted composition needs at least one adapter; give [{'name': ..., 'weight': ...}, ...]")
    if len(components) > MAX_COMPONENTS:
        raise UserError(f"a weighted composition may name at most {MAX_COMPONENTS} adapters, got {len(components)}")
    names = [n for n, _ in components]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"a weighted composition names {', '.join(map(repr, dupes))} more than once; give each once")
    for name, weight in components:
        if not math.isfinite(weight):
            raise UserError(f"the weight of adapter {name!r} must be a finite number, got {weight!r}")
    return components


def components_from_list(value: Any) -> Components:
    """The components of a native ``[{"name": str, "weight": number}, …]``; UserError naming what is wrong."""
    if not isinstance(value, list):
        raise UserError(f"a weighted composition must be a list of {{'name', 'weight'}} objects, got {value!r}")
    out = []
    for item in value:
        if not isinstance(item, dict) or set(item) != {"name", "weight"}:
            raise UserError(
                f"each entry of a weighted composition must be an object with exactly the keys 'name' and "
                f"'weight', got {item!r}"
            )
        name, weight = item["name"], item["weight"]
        if not isinstance(name, str) or not name or "*" in name:
            raise UserError(f"an adapter name in a weighted composition must be a non-empty string, got {name!r}")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise UserError(f"the weight of adapter {name!r} must be a finite number, got {weight!r}")
        out.append((name, float(weight)))
    return check_components(tuple(out))


def spelling(components: Components) -> str:
    """The canonical spelling of ``components`` (the value ``request.adapter`` holds)."""
    return "+".join(f"{name}*{float(weight)!r}" for name, weight in components)


def parse_spelling(text: str) -> Components:
    """The components spelled by ``text`` (``NAME*WEIGHT+…``); UserError when it is not one.

    A linear scan (names cannot hold ``*``, so each ``*`` ends a name), never a backtracking regex over
    the whole text: a client chooses this string."""
    bad = UserError(f"{shown(text)} is not a weighted composition; write {_FORM}, at most {MAX_COMPONENTS} adapters")
    if len(text) > MAX_SPELLING_CHARS:
        raise bad
    components, pos = [], 0
    while True:
        star = text.find("*", pos)
        if star <= pos or not _NAME_CHARS.fullmatch(text, pos, star):
            raise bad
        weight = _WEIGHT_RE.match(text, star + 1)
        if weight is None:
            raise bad
        components.append((text[pos:star], float(weight.group())))
        end = weight.end()
        if end == len(text):
            return check_components(tuple(components))
        if text[end] != "+":
            raise bad
        pos = end + 1


def composed_lora_path(value: Any) -> Any:
    """``lora_path`` (one value, or one per input) with each composition list replaced by its spelling.

    A list whose entries are all objects is one composition shared by every input; in a per-input
    list, an entry that is a list is that input's composition."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return spelling(components_from_list(value))
    if isinstance(value, list):
        return [spelling(components_from_list(v)) if isinstance(v, list) else v for v in value]
    if isinstance(value, str) and is_composition(value):
        return spelling(parse_spelling(value))
    return value


def composed_rank(parts: list[tuple[LoRAAdapter, float]]) -> int:
    """The slot rank the composition of ``parts`` needs: the largest per-projection sum of ranks."""
    sums: dict[Any, int] = {}
    for adapter, _ in parts:
        for layer, fused in adapter.weights:
            sums[(layer, fused)] = sums.get((layer, fused), 0) + adapter.module_rank(layer, fused)
        for mod in ("embed_tokens", "lm_head"):
            pair = getattr(adapter, mod)
            if pair is not None:
                sums[mod] = sums.get(mod, 0) + pair[0].shape[0]
    return max(sums.values(), default=0)


def compose(name: str, source: str, parts: list[tuple[LoRAAdapter, float]]) -> LoRAAdapter:
    """The adapter computing ``sum_i weight_i * delta_i`` for ``parts = [(adapter_i, weight_i)]``:
    A stacked along the rank per slice, B columns times ``weight_i * scaling_i`` stacked, scaling 1."""
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for key in sorted({k for adapter, _ in parts for k in adapter.weights}):
        n = len(FUSED_MODULES[key[1]])
        present = [(a.weights[key], a.module_rank(*key), w * a.scaling) for a, w in parts if key in a.weights]
        r = sum(rank for _, rank, _ in present)
        A_cat, B_cat = [], []
        for (A, B), rank, factor in present:
            A_cat.append(A.reshape(n, rank, -1))
            B_cat.append(B.to(torch.float64) * factor)
        dtype = _dtype([t for (pair, _, _) in present for t in pair])
        weights[key] = (torch.cat(A_cat, 1).reshape(n * r, -1).to(dtype), torch.cat(B_cat, 1).to(dtype).contiguous())
    embeddings = {}
    for mod in ("embed_tokens", "lm_head"):
        present = [(getattr(a, mod), w * a.scaling) for a, w in parts if getattr(a, mod) is not None]
        if present:
            dtype = _dtype([t for pair, _ in present for t in pair])
            A = torch.cat([pair[0] for pair, _ in present], 0).to(dtype)
            B = torch.cat([pair[1].to(torch.float64) * f for pair, f in present], 1).to(dtype)
            embeddings[mod] = (A, B)
    rank = composed_rank(parts)
    return LoRAAdapter(
        name=name,
        source=source,
        scaling=1.0,
        target_modules=frozenset().union(*(a.target_modules for a, _ in parts)),
        weights=weights,
        embed_tokens=embeddings.get("embed_tokens"),
        lm_head=embeddings.get("lm_head"),
        r=rank,
        lora_alpha=float(rank),
    )


def _dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class AdapterCompositions:
    """The compositions an engine has built, each with its held :class:`AdapterRef` (see the module
    docstring). Its collaborators are the LoRA manager's:

    :param acquire_component: ``(name) -> ref``: the held ref of a loaded (or resolved) adapter,
        NotFound when there is none; ``release_component(ref)`` drops that hold.
    :param weights_of: ``(ref) -> LoRAAdapter``: a component's weights (engine thread).
    :param cache_on_host: ``(key, adapter)``: puts a built composition in the host cache (engine thread).
    :param retire: ``(ref)``: frees an unloaded ref now or after its last request (engine thread).
    """

    def __init__(
        self,
        registry: AdapterRegistry,
        max_rank: int,
        *,
        acquire_component: Callable[[str], AdapterRef],
        release_component: Callable[[AdapterRef], None],
        weights_of: Callable[[AdapterRef], LoRAAdapter],
        cache_on_host: Callable[[tuple, LoRAAdapter], None],
        retire: Callable[[AdapterRef], Any],
        run_in_engine: Callable[[Callable[[], Any]], Any],
    ):
        self.registry, self.max_rank = registry, max_rank
        self.acquire_component, self.release_component = acquire_component, release_component
        self.weights_of, self.cache_on_host, self.retire = weights_of, cache_on_host, retire
        self.run_in_engine = run_in_engine
        self._refs: OrderedDict[tuple, AdapterRef] = OrderedDict()  # (name, version, weight)... -> ref
        self._parts: dict[str, list[tuple[AdapterRef, float]]] = {}  # source -> components, until freed
        self._lock = threading.Lock()
        #: compositions built (a reused one is not built again)
        self.builds = 0

    def acquire(self, text: str) -> AdapterRef:
        """The held ref of the composition ``text`` spells, built on first use (any thread but the
        engine's: building waits for it)."""
        components = parse_spelling(text)
        held: list[AdapterRef] = []
        try:
            for name, _ in components:
                held.append(self.acquire_component(name))
            key = tuple((ref.name, ref.version, w) for ref, (_, w) in zip(held, components))
            with self._lock:
                ref = self._refs.get(key)
                if ref is not None and self.registry.hold(ref):
                    self._refs.move_to_end(key)
                    return ref
            return self._build(text, key, [(ref, w) for ref, (_, w) in zip(held, components)])
        finally:
            for ref in held:
                self.release_component(ref)

    def _build(self, text: str, key: tuple, parts: list[tuple[AdapterRef, float]]) -> AdapterRef:
        adapters = self.run_in_engine(lambda: [self.weights_of(ref) for ref, _ in parts])
        weighted = [(a, w) for a, (_, w) in zip(adapters, parts)]
        dora = [ref.name for a, (ref, _) in zip(adapters, parts) if getattr(a, "is_dora", False)]
        if dora:
            raise UserError(
                f"the composition {text!r} names DoRA adapter(s) {', '.join(map(repr, dora))}: a DoRA "
                "adapter's output is rescaled per output feature by its own magnitude, so it is not a LoRA "
                "delta that can be weighted and summed with others; compose plain LoRA adapters only"
            )
        rank = composed_rank(weighted)
        if rank > self.max_rank:
            ranks = " + ".join(f"{a.name} {a.rank}" for a, _ in weighted)
            raise UserError(
                f"the composition {text!r} needs rank {rank} (its adapters' ranks add up: {ranks}), more "
                f"than the maximum LoRA rank {self.max_rank} (--max-lora-rank); compose fewer or smaller "
                "adapters, or start the server with a larger --max-lora-rank"
            )
        source = SOURCE_PREFIX + "+".join(f"{ref.name}@{ref.version}*{w!r}" for ref, w in parts)
        adapter = compose(text, source, weighted)
        ref = AdapterRef(
            name=text,
            version=self.registry.new_version(),
            source=source,
            rank=adapter.rank,
            identity=adapter.identity(),
            in_flight=1,
            meta={"composition": True},
        )
        return self.run_in_engine(lambda: self._commit(key, ref, adapter, parts))

    def _commit(self, key: tuple, ref: AdapterRef, adapter: LoRAAdapter, parts: list) -> AdapterRef:
        """Remember a built composition (engine thread); returns the ref its request holds."""
        with self._lock:
            other = self._refs.get(key)
        if other is not None and self.registry.hold(other):  # built twice at once: keep the first
            return other
        self.cache_on_host(ref.key, adapter)
        self._parts[ref.source] = parts
        self.builds += 1
        if any(self.registry.get(c.name) is not c for c, _ in parts):
            self._retire(ref)  # a component changed meanwhile: this request only, never cached
            return ref
        with self._lock:
            self._refs[key] = ref
            idle = [k for k, r in self._refs.items() if r.in_flight == 0]
        for k in idle[: max(0, len(self._refs) - MAX_CACHED_COMPOSITIONS)]:
            self._drop(k)
        return ref

    def _drop(self, key: tuple) -> None:
        with self._lock:
            ref = self._refs.pop(key, None)
        if ref is not None:
            self._retire(ref)

    def _retire(self, ref: AdapterRef) -> None:
        self.registry.mark_unloaded(ref)
        self.retire(ref)

    def retire_using(self, component: AdapterRef) -> None:
        """Retire the compositions built from this load of a component (engine thread): it was
        unloaded or replaced, so new requests must not get them."""
        with self._lock:
            stale = [k for k in self._refs if any((n, v) == component.key for n, v, _ in k)]
        for key in stale:
            self._drop(key)

    def rebuild(self, source: str) -> LoRAAdapter:
        """A composition's weights built again from its components (engine thread), after the host
        cache evicted them."""
        parts = self._parts.get(source)
        if parts is None:
            raise UserError(
                f"the composition {source[len(SOURCE_PREFIX) :]!r} is no longer known; send the request again"
            )
        name = "+".join(f"{ref.name}*{w!r}" for ref, w in parts)
        return compose(name, source, [(self.weights_of(ref), w) for ref, w in parts])

    def parts_of(self, source: str) -> list[tuple[str, str, float]] | None:
        """A built composition's components as ``(name, source, weight)`` (what another tensor-parallel
        rank needs to build it too), or None when ``source`` is not a composition's."""
        parts = self._parts.get(source)
        return None if parts is None else [(ref.name, ref.source, w) for ref, w in parts]

    def forget(self, ref: AdapterRef) -> None:
        """A freed composition's components are no longer needed (engine thread)."""
        self._parts.pop(ref.source, None)

    def keys(self) -> set[tuple[str, int]]:
        """The pool keys of every composition not yet freed."""
        with self._lock:
            live = {r.key for r in self._refs.values()}
        return live | {(r.name, r.version) for r in self.registry.pending() if r.source in self._parts}
