"""Slot admission: the LoRA manager's answers to the scheduler, and the filling of GPU slots.

:class:`SlotAdmission` is the part of :class:`~loraserve.lora.manager.LoRAManager` that decides,
on the engine thread, whether a waiting request may join a step (a batch never holds more distinct
adapters, the base model included, than there are slots), which slot an adapter takes and which
adapter is evicted for it, and how the slot is filled: synchronously on the compute stream, or,
with a copy engine (``--enable-lora-overlap-loading`` on CUDA), asynchronously, in which case
``can_join`` answers :data:`~loraserve.sched.scheduler.COPYING` until the copy is done and
:meth:`SlotAdmission.before_schedule` retires finished copies and prefetches adapters the waiting
queue will need. Every slot decision is also handed to ``mirror`` (tensor parallelism), so the
other ranks' pools follow. It reads the manager's ``pool``, ``host``, ``metrics``,
``copy_engine``, ``mirror``, ``running``, ``waiting``, ``registry``, ``plugins``,
``prefetch_lookahead`` and ``_read``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from loraserve.lora.pools import BASE_KEY
from loraserve.lora.registry import AdapterRef
from loraserve.sched.scheduler import COPYING

logger = logging.getLogger("loraserve.lora")


class SlotAdmission:
    """Mixed into :class:`~loraserve.lora.manager.LoRAManager` (see the module docstring)."""

    @staticmethod
    def key_of(request) -> tuple:
        return request.lora.key if request.lora is not None else BASE_KEY

    def _batch_keys(self, step: list | None = None) -> set:
        return {self.key_of(r) for r in self.running()} | {self.key_of(r) for r in step or []}

    def _host_protected(self) -> set:
        return self._batch_keys() | {r.key for r in self.registry.refs() if r.pinned}

    def can_join(self, request, step: list):
        """True if ``request`` may join a step with ``step`` (its adapter's slot is ready),
        :data:`COPYING` while its adapter is being copied into a slot, else False."""
        key = self.key_of(request)
        batch = self._batch_keys(step)
        if key in batch:
            return True
        if len(batch) >= self.pool.num_slots:
            return False
        slot = self._ensure_slot(request.lora, protected=batch)
        if slot is None:
            return False
        if slot in self.pool.loading and not self._copy_finished(slot):
            if request.copy_wait_start is None:
                request.copy_wait_start = time.perf_counter()
            return COPYING
        if request.copy_wait_start is not None:
            self.metrics["copy_wait_seconds"] += time.perf_counter() - request.copy_wait_start
            request.copy_wait_start = None
        return True

    def _ensure_slot(self, ref: AdapterRef | None, protected: set) -> int | None:
        """The GPU slot holding ``ref`` (None: the base model), starting its fill if needed; None
        if no slot can be freed. The slot may still be loading (see ``pool.loading``)."""
        key = ref.key if ref is not None else BASE_KEY
        slot = self.pool.slot_of(key)
        if slot is not None:
            self.metrics["hits"] += 1
            self.pool.policy.touch(key)
            return slot
        slot, victim = self.pool.find_slot(protected)
        if slot is None:
            return None
        self.metrics["misses"] += 1
        adapter = None if ref is None else self._host_copy(ref)
        if victim is not None:
            self.pool.evict(slot)
            self.metrics["gpu_evictions"] += 1
            self._notify_evicted([victim], "gpu")
        self._fill(slot, key, adapter)
        return slot

    def _fill(self, slot: int, key: tuple, adapter: Any | None) -> None:
        self.pool.assign(slot, key, adapter)
        if self.mirror is not None:
            self.mirror(("fill", slot, key, None if adapter is None else adapter.name,
                         None if adapter is None else adapter.source))
        if adapter is None:  # the base model: rank 0, nothing to copy
            return
        self.metrics["slot_fills"] += 1
        engine = self.copy_engine
        if engine is None or not engine.asynchronous:
            t0 = time.perf_counter()
            self.metrics["bytes_copied"] += self.pool.write(slot, adapter)
            self.metrics["copy_seconds"] += time.perf_counter() - t0
            return
        handle = engine.submit(lambda: self.pool.write(slot, adapter, non_blocking=True))
        handle["adapter"] = adapter  # the host copy stays alive until the copy is done
        self.pool.loading[slot] = handle

    def _copy_finished(self, slot: int) -> bool:
        """Whether ``slot``'s copy is done (queried without blocking); if so, retire it."""
        handle = self.pool.loading[slot]
        if not self.copy_engine.done(handle):
            return False
        del self.pool.loading[slot]
        self.metrics["copy_seconds"] += self.copy_engine.wait(handle)
        self.metrics["bytes_copied"] += handle["bytes"]
        return True

    @property
    def copies_in_flight(self) -> int:
        return len(self.pool.loading)

    def before_schedule(self) -> None:
        """Retire finished copies and prefetch (engine thread, before each step's scheduling).

        Prefetch scans the first ``prefetch_lookahead`` waiting requests in queue order and starts
        copies for their adapters that are not resident, into free slots or slots whose adapter
        neither the running batch nor an earlier request of the window needs."""
        for slot in list(self.pool.loading):
            self._copy_finished(slot)
        if self.copy_engine is None or not self.copy_engine.asynchronous:
            return
        protected = self._batch_keys()
        window = [r for _, r in zip(range(self.prefetch_lookahead), self.waiting())]
        protected |= {self.key_of(r) for r in window if self.pool.slot_of(self.key_of(r)) is not None}
        for r in window:
            key = self.key_of(r)
            if key in protected or r.lora is None:
                continue
            slot = self._ensure_slot(r.lora, protected)
            if slot is None:
                return
            protected.add(key)
            self.metrics["prefetches"] += 1

    def _host_copy(self, ref: AdapterRef):
        adapter = self.host.get(ref.key)
        if adapter is None:  # evicted from the host cache: reload from its source, transparently
            adapter = self._read(ref.name, ref.source)
            self._notify_evicted(self.host.make_room(self._host_protected() | {ref.key}), "host")
            self.host.put(ref.key, adapter)
            self.metrics["host_reloads"] += 1
        return adapter

    def _notify_evicted(self, keys: list, tier: str) -> None:
        for name, version in keys:
            if tier == "host":
                self.metrics["host_evictions"] += 1
                if self.mirror is not None:
                    self.mirror(("forget", (name, version)))
            if name:
                logger.debug("adapter %r (version %d) evicted from the %s tier", name, version, tier)
                self.plugins.notify("loraserve_adapter_evicted", name=name, version=version, tier=tier)
