"""Built-in plugin: first-in-first-out eviction."""

from __future__ import annotations

from collections.abc import Hashable

from loraserve import hookimpl
from loraserve.lora.eviction import OrderedEvictionPolicy


class FIFOPolicy(OrderedEvictionPolicy):
    """Evicts the candidate that entered the tier first; use does not change the order."""

    name = "fifo"

    def touch(self, key: Hashable) -> None:
        if key not in self._order:
            self.insert(key)


@hookimpl
def loraserve_register_eviction_policies(register):
    register("fifo", FIFOPolicy, description="evict the adapter loaded longest ago")
