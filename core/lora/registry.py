"""The adapter registry: which adapter names requests may use, each with a unique version.

A name maps to an :class:`AdapterRef`. Loading a name gives it a fresh version id, so the host
cache and the GPU pool, which key on ``(name, version)``, can never serve the weights of an
earlier load under a reloaded name. ``in_flight`` counts the requests holding the ref; unloading
removes the name at once and then waits until that count reaches zero, or, when the wait timed out,
marks the ref *pending* (:meth:`AdapterRegistry.defer_free`): the release that brings its count to
zero says so, and whoever made it frees the memory. An in-place update
(:meth:`AdapterRegistry.replace`) puts a new ref, with a new version, under the name in one step; the
old ref goes the way of an unloaded one. The registry is the one piece of LoRA state
that request threads touch, so it has its own lock.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

from loraserve.errors import Conflict, NotFound


@dataclass(eq=False)
class AdapterRef:
    name: str
    version: int
    source: str
    pinned: bool = False
    rank: int = 0
    in_flight: int = 0
    unloaded: bool = False
    meta: dict = field(default_factory=dict)
    #: the hash of the loaded weights and scaling (:meth:`LoRAAdapter.identity`)
    identity: str = ""

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)


class AdapterRegistry:
    """Thread-safe name -> :class:`AdapterRef` map with in-flight counting."""

    def __init__(self) -> None:
        self._refs: dict[str, AdapterRef] = {}
        self._pinned: dict[str, AdapterRef] = {}  # the pinned ones of _refs (asked per host-cache insert)
        self._pending: dict[tuple[str, int], AdapterRef] = {}  # unloaded, freed by their last release
        self._versions = itertools.count(1)
        self._cond = threading.Condition()

    def new_version(self) -> int:
        with self._cond:
            return next(self._versions)

    def add(self, ref: AdapterRef) -> None:
        with self._cond:
            if ref.name in self._refs:
                raise Conflict(f"an adapter named {ref.name!r} is already loaded; unload it first or pick another name")
            self._refs[ref.name] = ref
            self._pin(ref)

    def _pin(self, ref: AdapterRef) -> None:
        if ref.pinned:
            self._pinned[ref.name] = ref
        else:
            self._pinned.pop(ref.name, None)

    def pinned_refs(self) -> list[AdapterRef]:
        """The registered pinned adapters (without a scan of every registered one)."""
        with self._cond:
            return list(self._pinned.values())

    def get(self, name: str) -> AdapterRef | None:
        with self._cond:
            return self._refs.get(name)

    def names(self) -> list[str]:
        with self._cond:
            return list(self._refs)

    def refs(self) -> list[AdapterRef]:
        with self._cond:
            return list(self._refs.values())

    def acquire(self, name: str) -> AdapterRef | None:
        """The ref for ``name`` with its in-flight count raised, or None when no such name exists."""
        with self._cond:
            ref = self._refs.get(name)
            if ref is not None:
                ref.in_flight += 1
            return ref

    def hold(self, ref: AdapterRef) -> bool:
        """Raise the in-flight count of a ref held outside the name map (a composition, see
        :mod:`~loraserve.lora.composition`); False, and no hold, once it is unloaded."""
        with self._cond:
            if ref.unloaded:
                return False
            ref.in_flight += 1
            return True

    def mark_unloaded(self, ref: AdapterRef) -> None:
        """Mark a ref held outside the name map unloaded: no new hold; free it with :meth:`defer_free`."""
        with self._cond:
            ref.unloaded = True

    def release(self, ref: AdapterRef) -> bool:
        """Drop one request's hold on ``ref``; True when that was the last hold on a pending ref,
        which the caller must then free (it is no longer pending)."""
        with self._cond:
            ref.in_flight -= 1
            if ref.in_flight < 0:
                raise RuntimeError(f"adapter {ref.name!r} released more often than acquired")
            self._cond.notify_all()
            return ref.in_flight == 0 and self._pending.pop(ref.key, None) is not None

    def replace(self, ref: AdapterRef) -> AdapterRef | None:
        """Put ``ref`` under its name in one step (an in-place update); returns the ref it replaced,
        now marked unloaded (the caller frees it or defers that to its last request), or None when
        the name was free. Requests holding the old ref keep it; new ones get ``ref``."""
        with self._cond:
            old = self._refs.get(ref.name)
            self._refs[ref.name] = ref
            self._pin(ref)
            if old is not None:
                old.unloaded = True
            return old

    def remove(self, name: str) -> AdapterRef:
        """Make ``name`` unknown to new requests at once; returns its ref."""
        with self._cond:
            ref = self._refs.pop(name, None)
            self._pinned.pop(name, None)
            if ref is None:
                known = ", ".join(sorted(self._refs)) or "none"
                raise NotFound(f"no adapter named {name!r} is loaded; loaded adapters: {known}")
            ref.unloaded = True
            return ref

    def wait_idle(self, ref: AdapterRef, timeout: float | None = None) -> bool:
        """Block until no request holds ``ref``; returns False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: ref.in_flight == 0, timeout)

    def defer_free(self, ref: AdapterRef) -> int:
        """Mark the removed ``ref`` pending and return how many requests hold it; 0 (not marked) when
        none does, and the caller frees it now."""
        with self._cond:
            if not ref.unloaded:
                raise RuntimeError(f"adapter {ref.name!r} is still registered; remove it before freeing it")
            if ref.in_flight:
                self._pending[ref.key] = ref
            return ref.in_flight

    def pending(self) -> list[AdapterRef]:
        """Unloaded refs whose memory waits for their last in-flight request."""
        with self._cond:
            return list(self._pending.values())
