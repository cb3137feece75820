"""Built-in plugin: least-recently-used eviction (the default, as in SGLang)."""

from __future__ import annotations

from collections.abc import Hashable

from loraserve import hookimpl
from loraserve.lora.eviction import OrderedEvictionPolicy


class LRUPolicy(OrderedEvictionPolicy):
    """Evicts the candidate used longest ago; every use moves a key to the back."""

    name = "lru"

    def touch(self, key: Hashable) -> None:
        self.insert(key)


@hookimpl
def loraserve_register_eviction_policies(register):
    register("lru", LRUPolicy, description="evict the least recently used adapter")
