"""The fleet's adapter catalog: one named Ray actor (see :mod:`loraserve.ray_serve`)."""

from __future__ import annotations

import time

import ray

NAMESPACE = "loraserve"
CATALOG = "loraserve_adapter_catalog"


@ray.remote(num_cpus=0)
class AdapterCatalog:
    """The fleet's adapters and the replicas' last reports (one named actor)."""

    def __init__(self, adapters: dict[str, str]):
        self.sources: dict[str, str] = dict(adapters)
        self.versions: dict[str, int] = {name: 1 for name in adapters}
        self.clock = 1
        self.flushes = 0  # how many fleet-wide /flush_cache were asked for
        self.reports: dict[str, dict] = {}

    def register(self, name: str, source: str) -> int:
        self.clock += 1
        self.sources[name], self.versions[name] = source, self.clock
        return self.clock

    def unregister(self, name: str) -> bool:
        self.versions.pop(name, None)
        return self.sources.pop(name, None) is not None

    def lookup(self, name: str) -> tuple[str, int] | None:
        return (self.sources[name], self.versions[name]) if name in self.sources else None

    def adapters(self) -> dict[str, tuple[str, int]]:
        return {name: (source, self.versions[name]) for name, source in self.sources.items()}

    def state(self) -> tuple[dict[str, tuple[str, int]], int]:
        """What a replica's health check compares itself with: the adapters and the flush count."""
        return self.adapters(), self.flushes

    def request_flush(self) -> int:
        self.flushes += 1
        return self.flushes

    def report(self, replica: str, stats: dict) -> None:
        self.reports[replica] = {**stats, "reported_at": time.time()}

    def forget_replica(self, replica: str) -> None:
        self.reports.pop(replica, None)

    def replica_reports(self) -> dict[str, dict]:
        return self.reports


def catalog_handle():
    return ray.get_actor(CATALOG, namespace=NAMESPACE)
