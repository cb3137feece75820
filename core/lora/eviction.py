"""A base for eviction policies that keep an order (LRU, FIFO).

The contract is :class:`loraserve.contract.EvictionPolicy`; this base keeps keys in a dict whose
order the subclass maintains and evicts the first candidate in it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from loraserve.contract import EvictionPolicy


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
