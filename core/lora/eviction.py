"""The ``EvictionPolicy`` contract that eviction plugins implement.

One policy object tracks one tier (the GPU slots, or the host cache). The pool tells it about
every key it holds and asks it for a victim when it needs room; the pool, not the policy, decides
which keys may be evicted (pinned adapters and adapters in the running batch are never offered).
"""

from __future__ import annotations

from typing import Hashable, Iterable


class EvictionPolicy:
    """Base class of eviction policies.

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


class OrderedEvictionPolicy(EvictionPolicy):
    """Evicts the candidate that comes first in an order the subclass maintains."""

    def __init__(self) -> None:
        self._order: dict[Hashable, None] = {}

    def insert(self, key: Hashable) -> None:
        self._order.pop(key, None)
        self._order[key] = None

    def remove(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def victim(self, candidates: Iterable[Hashable]) -> Hashable | None:
        candidates = list(candidates)
        # a candidate the policy was never told about is the oldest of all
        for key in candidates:
            if key not in self._order:
                return key
        allowed = set(candidates)
        return next((key for key in self._order if key in allowed), None)

    def __len__(self) -> int:
        return len(self._order)
