"""Slot admission: which waiting request may join a step, and the filling of GPU adapter slots.

:class:`SlotAdmission` decides, on the engine thread, whether a waiting request may join a step (a
batch never holds more distinct adapters, the base model included, than there are slots), which
slot an adapter takes and which adapter is evicted for it, and how the slot is filled:
synchronously on the compute stream, or, with a copy engine (``--enable-lora-overlap-loading`` on
CUDA), asynchronously, in which case ``can_join`` answers :data:`~loraserve.sched.scheduler.COPYING`
until the copy is done and :meth:`SlotAdmission.before_schedule` retires finished copies and
prefetches adapters the waiting queue will need. Every slot decision is also handed to ``mirror``
(tensor parallelism), so the other ranks' pools follow. The LoRA manager builds one and delegates
to it; everything it reads arrives through its constructor, and it keeps its own counters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from loraserve.errors import UserError
from loraserve.lora.gpu_store import StoredAdapter
from loraserve.lora.pools import BASE_KEY, GpuAdapterPool, HostAdapterCache
from loraserve.lora.reads import AdapterReading, BackgroundReads
from loraserve.lora.registry import AdapterRef, AdapterRegistry
from loraserve.sched.scheduler import COPYING

logger = logging.getLogger("loraserve.lora")


def key_of(request) -> tuple:
    """The pool key of a request's adapter (:data:`BASE_KEY` for the base model)."""
    return request.adapter_ref.key if request.adapter_ref is not None else BASE_KEY


class SlotAdmission:
    """Admits requests into steps and fills GPU slots (see the module docstring).

    :param pool: the GPU slot pool; its ``loading`` holds the handles of copies in flight.
    :param host: the host cache the slots are filled from; an adapter evicted from it is read
        again with ``read_adapter``.
    :param registry: the loaded adapters (pinned ones stay in the host cache).
    :param read_adapter: ``read_adapter(name, source)``: an adapter read from its source.
    :param notify: ``notify(hook, **kwargs)``: calls a plugin hook (``loraserve_adapter_evicted``).
    :param running: ``running()``: the scheduler's running requests, whose adapters hold slots.
    :param waiting: ``waiting()``: the scheduler's waiting queue, in order, scanned for prefetches.
    :param copy_engine: None: slots are filled synchronously on the compute stream; else an object
        with ``asynchronous``, ``submit(fill) -> handle``, ``done(handle)`` and
        ``wait(handle) -> seconds`` (see :mod:`loraserve.lora.overlap`).
    :param mirror: tensor parallelism: ``mirror(event)`` replays every slot decision on the other
        ranks' pools: ``("fill", slot, key, name, source, components)``, ``("evict", slot)``, ``("forget", key)``.
    :param store: the rank-paged GPU tier (:class:`~loraserve.lora.gpu_store.GpuAdapterStore`) or
        None: a slot fill then copies from the store (device to device), putting the adapter there
        first when it is not, and an adapter the store holds needs no host copy.
    :param components: ``components(source)``: a composition's ``[(name, source, weight)]`` (sent with
        its fill, so the other ranks build it from its components), None for any other adapter.
    :param finish: ``finish(adapter) -> adapter`` right before a filled slot's weights are written, after
        the mirror (DoRA under tensor parallelism: the collective that completes row-parallel scales,
        which every rank runs for the same fill).
    :param prefetch_lookahead: how many waiting requests, in queue order, are scanned for adapters
        to prefetch.
    :param background: ``background(source)``: whether an adapter of ``source`` evicted from the host
        cache is read again on a worker thread (:mod:`loraserve.lora.reads`; ``read_adapter`` must then
        be safe on any thread for it); None: every read runs on the engine thread.
    """

    def __init__(
        self,
        pool: GpuAdapterPool,
        host: HostAdapterCache,
        registry: AdapterRegistry,
        read_adapter: Callable[[str, str], Any],
        notify: Callable[..., Any],
        *,
        running: Callable[[], list],
        waiting: Callable[[], Iterable],
        copy_engine: Any = None,
        mirror: Callable[[tuple], None] | None = None,
        store: Any = None,
        finish: Callable[[Any], Any] | None = None,
        components: Callable[[str], Any] | None = None,
        prefetch_lookahead: int = 0,
        background: Callable[[str], bool] | None = None,
    ):
        self.pool, self.host, self.registry = pool, host, registry
        self.read_adapter, self.notify = read_adapter, notify
        self.running, self.waiting = running, waiting
        self.copy_engine = copy_engine
        self.mirror = mirror
        self.store = store
        self._store_copies: list = []  # prefetches into the store still copying (overlap loading)
        self._keys_of_step: tuple[list, int, set] | None = None  # (step list, its length seen, keys)
        self.finish = finish
        self.components = components
        self.prefetch_lookahead = prefetch_lookahead
        self.background = background
        self.reads = BackgroundReads(self.read_checked) if background is not None else None
        self.metrics = {
            "gpu_evictions": 0,
            "host_evictions": 0,
            "hits": 0,
            "misses": 0,
            "host_reloads": 0,
            "slot_fills": 0,
            "bytes_copied": 0,
            "copy_seconds": 0.0,
            "copy_wait_seconds": 0.0,
            "prefetches": 0,
            "slot_refusals": 0,  # a waiting request passed over: every slot used by the step, or none freeable
        }

    def batch_keys(self, step: list | None = None) -> set:
        """The adapters of the running batch and of ``step``'s requests: their slots are protected."""
        return {key_of(r) for r in self.running()} | {key_of(r) for r in step or []}

    def _host_protected(self) -> set:
        return self.batch_keys() | {r.key for r in self.registry.pinned_refs()}

    def _step_keys(self, step: list) -> set:
        """:meth:`batch_keys` of ``step``, built once per scheduling pass: the scheduler hands every
        candidate of a pass the same list, which only grows (a request that joins is appended to it
        and to the running batch), so a later call adds only the requests appended since; admission
        costs O(1) per candidate instead of O(batch). Another list starts afresh."""
        cached = self._keys_of_step
        if cached is not None and cached[0] is step:
            keys = cached[2]
            keys.update(key_of(r) for r in step[cached[1] :])
        else:
            keys = self.batch_keys(step)
        self._keys_of_step = (step, len(step), keys)
        return keys

    def can_join(self, request, step: list):
        """True if ``request`` may join a step with ``step`` (its adapter's slot is ready),
        :data:`COPYING` while its adapter is being copied into a slot, else False. ``step``: this
        scheduling pass's requests; the scheduler passes one list per pass and only appends to it."""
        key = key_of(request)
        batch = self._step_keys(step)  # (read only below: ensure_slot never changes its protected set)
        if key in batch:
            return True
        if len(batch) >= self.pool.num_slots:
            self.metrics["slot_refusals"] += 1
            return False
        try:
            slot = self.ensure_slot(request.adapter_ref, protected=batch)
        except AdapterReading:  # read (or about to be read) on a worker thread: overtaken until it is done
            if request.copy_wait_start is None:
                request.copy_wait_start = time.perf_counter()
            return COPYING
        if slot is None:
            self.metrics["slot_refusals"] += 1
            return False
        if slot in self.pool.loading and not self._copy_finished(slot):
            if request.copy_wait_start is None:
                request.copy_wait_start = time.perf_counter()
            return COPYING
        if request.copy_wait_start is not None:
            self.metrics["copy_wait_seconds"] += time.perf_counter() - request.copy_wait_start
            request.copy_wait_start = None
        return True

    def ensure_slot(self, ref: AdapterRef | None, protected: set) -> int | None:
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
        adapter = None
        if ref is not None:  # the GPU store's copy when it holds one (then no host copy is needed)
            adapter = (self.store.get(key) if self.store is not None else None) or self._host_copy(ref)
        self.metrics["misses"] += 1
        if victim is not None:
            self.pool.evict(slot)
            self.metrics["gpu_evictions"] += 1
            self._notify_evicted([victim], "gpu")
        self._fill(slot, key, adapter)
        return slot

    def _fill(self, slot: int, key: tuple, adapter: Any | None) -> None:
        self.pool.assign(slot, key, adapter)
        if self.mirror is not None:
            self.mirror(
                (
                    "fill",
                    slot,
                    key,
                    None if adapter is None else adapter.name,
                    None if adapter is None else adapter.source,
                    None if adapter is None or self.components is None else self.components(adapter.source),
                )
            )
        if adapter is None:  # the base model: rank 0, nothing to copy
            return
        if self.finish is not None:  # after the mirror: every rank runs finish's collective for this fill
            adapter = self.finish(adapter)
        self.metrics["slot_fills"] += 1
        engine = self.copy_engine
        if engine is None or not engine.asynchronous:
            t0 = time.perf_counter()
            self.metrics["bytes_copied"] += self._write(slot, key, adapter, False)
            self.metrics["copy_seconds"] += time.perf_counter() - t0
            return
        handle = engine.submit(lambda: self._write(slot, key, adapter, True))
        handle["adapter"] = adapter  # the host copy stays alive until the copy is done
        self.pool.loading[slot] = handle

    def _write(self, slot: int, key: tuple, adapter: Any, non_blocking: bool) -> int:
        """Copy ``adapter``'s weights into ``slot`` on the current stream: from the host, or with the
        GPU store through it (put there first unless it came from there); returns the bytes copied."""
        if self.store is None or not self._storable(adapter):
            return self.pool.write(slot, adapter, non_blocking=non_blocking)
        entry = adapter if isinstance(adapter, StoredAdapter) else self.store.put(key, adapter, set(), non_blocking)
        return self.store.fill_slot(slot, entry)

    def _store_put(self, key: tuple, adapter: Any, keep: set) -> int:
        """A prefetch's put on the load stream; 0 bytes counted (slot fills count theirs)."""
        self.store.put(key, adapter, keep, non_blocking=True)
        return 0

    def _storable(self, adapter: Any) -> bool:
        """Whether the GPU store may hold ``adapter``: not a DoRA adapter under tensor parallelism (its
        fills must run the scales' collective on every rank; see :mod:`~loraserve.lora.gpu_store`)."""
        return self.mirror is None or not getattr(adapter, "is_dora", False)

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

    def before_schedule(self, fail: Callable[[Any, str, int], None]) -> None:
        """Retire finished copies and reads, and prefetch (engine thread, before each step's scheduling);
        ``fail(request, message, status)`` finishes a waiting request whose adapter cannot be read again.

        Prefetch scans the first ``prefetch_lookahead`` waiting requests in queue order and starts
        copies for their adapters that are not resident, into free slots or slots whose adapter
        neither the running batch nor an earlier request of the window needs."""
        for slot in list(self.pool.loading):
            self._copy_finished(slot)
        if self.reads is not None:
            self._take_reads(fail)
        if self.store is not None:
            self._prefetch_to_store()
        if self.copy_engine is None or not self.copy_engine.asynchronous:
            return
        protected = self.batch_keys()
        window = [r for _, r in zip(range(self.prefetch_lookahead), self.waiting())]
        protected |= {key_of(r) for r in window if self.pool.slot_of(key_of(r)) is not None}
        for r in window:
            key = key_of(r)
            if key in protected or r.adapter_ref is None:
                continue
            try:
                slot = self.ensure_slot(r.adapter_ref, protected)
            except AdapterReading:
                continue  # its read runs; prefetched once it is done
            if slot is None:
                return
            protected.add(key)
            self.metrics["prefetches"] += 1

    def _prefetch_to_store(self) -> None:
        """Put the adapters of the first ``prefetch_lookahead`` waiting requests into the GPU store when
        neither a slot nor the store holds them, so their slot fills are device copies; the store
        evicts none that the running batch or the window needs, and prefetch stops when it cannot."""
        engine = self.copy_engine
        asynchronous = engine is not None and engine.asynchronous
        self._store_copies = [h for h in self._store_copies if not engine.done(h)]
        window = [r for _, r in zip(range(self.prefetch_lookahead), self.waiting())]
        keep = self.batch_keys() | {key_of(r) for r in window}
        for r in window:
            ref = r.adapter_ref
            if ref is None or ref.key in self.store.entries or self.pool.slot_of(ref.key) is not None:
                continue
            try:
                adapter = self._host_copy(ref)
            except (UserError, AdapterReading):
                continue  # (its own slot fill reports an error; a read put it in the store next step)
            if not self._storable(adapter):
                continue
            try:
                if asynchronous:  # on the load stream, like slot fills; the host copy lives until it is done
                    handle = engine.submit(lambda ref=ref, a=adapter: self._store_put(ref.key, a, keep))
                    handle["adapter"] = adapter
                    self._store_copies.append(handle)
                else:
                    self.store.put(ref.key, adapter, keep)
            except UserError:
                return  # no room without evicting what the batch or the window needs
            self.store.metrics["store_prefetches"] += 1

    # -- the host tier ----------------------------------------------------------------------------

    def cache_on_host(self, key: tuple, adapter: Any, protected: set | None = None) -> None:
        """Put ``adapter`` in the host cache, evicting an adapter no request or pin (nor ``protected``)
        protects if full."""
        incoming = int(getattr(adapter, "nbytes", 0))
        keep = self._host_protected() | {key} | (protected or set())
        self._notify_evicted(self.host.make_room(keep, incoming), "host")
        self.host.put(key, adapter)

    def read_checked(self, ref: AdapterRef) -> Any:
        """``ref``'s adapter read again from its source, refused if its weights changed since it was
        loaded (any thread, as ``read_adapter``)."""
        adapter = self.read_adapter(ref.name, ref.source)
        if ref.identity and adapter.identity() != ref.identity:
            raise UserError(
                f"adapter {ref.name!r} changed on disk since it was loaded ({ref.source}); its requests "
                "would get other weights than its first ones: reload it (unload, then /load_lora_adapter)"
            )
        return adapter

    def _host_copy(self, ref: AdapterRef):
        """``ref``'s host copy; one evicted from the host cache is read again from its source,
        transparently: on a worker thread when ``background`` says so (raises
        :class:`~loraserve.lora.reads.AdapterReading` until it is done), else here."""
        adapter = self.host.get(ref.key)
        if adapter is None:
            if self.reads is not None and self.background(ref.source):
                adapter = self.reads.take(ref)
            else:
                adapter = self.read_checked(ref)
            self.cache_on_host(ref.key, adapter)
            self.metrics["host_reloads"] += 1
        return adapter

    def _take_reads(self, fail: Callable[[Any, str, int], None]) -> None:
        """Move finished reads into the host cache (protecting the prefetch window's adapters, so
        one read cannot evict another that a waiting request is about to use); finish the waiting
        requests of a failed read with a 503 through ``fail(request, message, status)``; start reads
        for the window's adapters that no tier holds."""
        for ref, exc in self.reads.failed():
            message = f"adapter {ref.name!r} could not be read again from {ref.source}: {exc}"
            if "reload it" not in message:  # (a changed file's error already says how)
                message += "; reload it (unload, then /load_lora_adapter)"
            for r in [r for r in self.waiting() if key_of(r) == ref.key]:
                fail(r, message, 503)  # the server's copy of the adapter is at fault, not the client
        window = [r.adapter_ref for _, r in zip(range(self.prefetch_lookahead), self.waiting())]
        window = [ref for ref in window if ref is not None]
        wanted = {ref.key for ref in window}
        for ref, adapter in self.reads.finished():
            for protected in (wanted, None):  # the window's adapters kept if the cache has room for that
                try:
                    self.cache_on_host(ref.key, adapter, protected)
                except UserError:
                    continue  # (without room at all, its request reads it again and meets the error)
                self.metrics["host_reloads"] += 1
                break
        for ref in window:
            held = ref.key in self.host or self.pool.slot_of(ref.key) is not None
            if not held and (self.store is None or ref.key not in self.store.entries) and self.background(ref.source):
                self.reads.start(ref)

    def close(self) -> None:
        """Stop the background reads (the engine is stopping)."""
        if self.reads is not None:
            self.reads.close()

    def forget(self, key: tuple) -> None:
        """Drop ``key`` from the host cache, the GPU store and its GPU slot (engine thread), on every rank."""
        self.host.remove(key)
        if self.reads is not None:
            self.reads.forget(key)
        if self.store is not None:
            self.store.remove(key)
        slot = self.pool.slot_of(key)
        if slot is not None:
            self.pool.evict(slot)
            if self.mirror is not None:
                self.mirror(("evict", slot))
        if self.mirror is not None:
            self.mirror(("forget", key))

    def _notify_evicted(self, keys: list, tier: str) -> None:
        for name, version in keys:
            if tier == "host":
                self.metrics["host_evictions"] += 1
                if self.mirror is not None:
                    self.mirror(("forget", (name, version)))
            if name:
                logger.debug("adapter %r (version %d) evicted from the %s tier", name, version, tier)
                self.notify("loraserve_adapter_evicted", name=name, version=version, tier=tier)
