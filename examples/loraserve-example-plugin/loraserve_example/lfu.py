"""``LFUPolicy``: evict the adapter used the fewest times; among equals, the one inserted first."""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from loraserve.contract import EvictionPolicy


class LFUPolicy(EvictionPolicy):
    name = "lfu"

    def __init__(self) -> None:
        self._uses: dict[Hashable, int] = {}

    def insert(self, key: Hashable) -> None:
        self._uses.pop(key, None)
        self._uses[key] = 1

    def touch(self, key: Hashable) -> None:
        self._uses[key] = self._uses.get(key, 0) + 1

    def remove(self, key: Hashable) -> None:
        self._uses.pop(key, None)

    def victim(self, candidates: Iterable[Hashable]) -> Hashable | None:
        order = {k: i for i, k in enumerate(self._uses)}
        pool = list(candidates)
        if not pool:
            return None
        return min(pool, key=lambda k: (self._uses.get(k, 0), order.get(k, -1)))
