"""Loading and unloading adapters: the :class:`AdapterLifecycle` part of the LoRA manager.

A load reads and checks everything (the name, the :class:`~loraserve.lora.policy.AdapterSourcePolicy`,
the files, the config, the weights) on the caller's thread before it changes any state, then commits
on the engine thread (``run_in_engine``), undoing what it did if registering fails, so a refused load
leaves nothing behind. Start-up ``--lora-paths`` are read on :data:`STARTUP_READERS` threads and
registered in order. An unload removes the name at once, waits for in-flight requests, and frees the
memory or leaves it pending until the last of them (``loraserve.lora.manager`` explains the states).
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable
from typing import Any

from loraserve.errors import Conflict, NotFound, UserError
from loraserve.lora.composition import SOURCE_PREFIX
from loraserve.lora.policy import check_adapter_name, shown
from loraserve.lora.registry import AdapterRef

#: threads reading ``--lora-paths`` at start-up (each a file read, checks and a hash)
STARTUP_READERS = 8


class AdapterLifecycle:
    """Load, register, unload and free adapters; a base of :class:`~loraserve.lora.manager.LoRAManager`,
    whose constructor sets what these methods use: ``loaders``, ``registry``, ``admission``,
    ``compositions``, ``tensor_sources``, ``policy``, ``pool``, ``dora``, ``plugins``, ``shape``,
    ``max_rank``, ``target_modules``, ``pin_host``, ``dtype`` and ``run_in_engine``."""

    # -- loading and unloading (caller thread) ----------------------------------------------------

    def _loader_for(self, source: str):
        for loader in self.loaders:
            if loader.can_load(source):
                return loader
        missing = NotFound if not os.path.exists(source) else UserError
        raise missing(f"no adapter loader can read {shown(source, 300)}; give a PEFT adapter directory or hub id")

    def read_adapter(self, name: str, source: str):
        """``name``'s adapter read from ``source`` and checked against this manager's limits; changes
        no state (any thread); a composition's is built again from its components (engine thread)."""
        if source.startswith(SOURCE_PREFIX):
            return self._host_form(self.compositions.rebuild(source))
        adapter = self._loader_for(source).load(
            source,
            name=name,
            shape=self.shape,
            max_rank=self.max_rank,
            target_modules=self.target_modules,
            policy=self.tensor_sources.policy if self.tensor_sources.owns(source) else self.policy,
        )
        return self._host_form(self.dora.with_scales(adapter))

    def _host_form(self, adapter):
        """``adapter`` as the host cache keeps it: page-locked, in the pool's dtype, with ``pin_host``."""
        if not self.pin_host:
            return adapter
        from loraserve.lora.overlap import pinned_copy

        return pinned_copy(adapter, self.dtype)

    def load_adapter(
        self, name: str, source: str, pinned: bool = False, *, runtime: bool = True, load_inplace: bool = False
    ) -> AdapterRef:
        """Load, validate and register an adapter; it is visible to requests only once complete, and a
        refused load leaves nothing behind. ``runtime``: a load after start-up, which may fetch from
        the hub only as the policy allows (start-up ``--lora-paths`` pass False). ``load_inplace``:
        a name already loaded gets the new weights under a new version in one step (requests
        already running finish on the old version, which is freed after the last of them); without
        it a loaded name is a Conflict."""
        self._check_load(name, pinned, load_inplace)
        self.policy.check_source(source, runtime=runtime)
        return self._load(name, source, pinned, load_inplace)

    def load_adapter_from_tensors(
        self, name: str, config: dict, weights: bytes, pinned: bool = False, *, load_inplace: bool = False
    ) -> AdapterRef:
        """Load an adapter given as its ``adapter_config.json`` content and the bytes of its
        ``adapter_model.safetensors``: written to a private directory (:mod:`~loraserve.lora.tensor_source`)
        and loaded from there with every check of a directory load; otherwise as :meth:`load_adapter`."""
        self._check_load(name, pinned, load_inplace)
        source = self.tensor_sources.write(config, weights)
        try:
            return self._load(name, source, pinned, load_inplace)
        except BaseException:
            self.tensor_sources.remove(source)
            raise

    def _component_weights(self, ref: AdapterRef):
        """A composition component's weights (engine thread): the host copy, else read again
        (not cached: the component may be unloaded by now) and checked against its identity."""
        adapter = self.host.get(ref.key)
        return adapter if adapter is not None else self.admission.read_checked(ref)

    def _check_load(self, name: str, pinned: Any, load_inplace: Any) -> None:
        check_adapter_name(name)
        if not isinstance(pinned, bool):
            raise UserError(f"pinned must be true or false, got {shown(pinned)}")
        if not isinstance(load_inplace, bool):
            raise UserError(f"load_inplace must be true or false, got {shown(load_inplace)}")
        if not load_inplace and self.registry.get(name) is not None:
            raise Conflict(
                f"an adapter named {name!r} is already loaded; unload it first, pick another name, or "
                "pass load_inplace: true to replace its weights"
            )

    def load_startup_adapters(self, specs: list, progress: Callable[[], Any] = lambda: None) -> None:
        """``--lora-paths``: read on up to :data:`STARTUP_READERS` threads (at most twice that many read
        ahead, so memory stays bounded), registered in order; the first failure stops start-up."""
        from concurrent.futures import ThreadPoolExecutor

        for spec in specs:
            self._check_load(spec.lora_name, spec.pinned, False)
            self.policy.check_source(spec.lora_path, runtime=False)
        todo, pending = iter(specs), deque()
        with ThreadPoolExecutor(STARTUP_READERS, thread_name_prefix="loraserve-startup-read") as pool:
            for spec in itertools.islice(todo, 2 * STARTUP_READERS):
                pending.append((spec, pool.submit(self._read_for_load, spec.lora_name, spec.lora_path)))
            while pending:
                spec, read = pending.popleft()
                adapter, identity = read.result()
                for nxt in itertools.islice(todo, 1):
                    pending.append((nxt, pool.submit(self._read_for_load, nxt.lora_name, nxt.lora_path)))
                self._register(spec.lora_name, spec.lora_path, spec.pinned, False, adapter, identity)
                progress()

    def _read_for_load(self, name: str, source: str) -> tuple[Any, str]:
        """The adapter and its identity (any thread: slow, and changes no state)."""
        adapter = self.read_adapter(name, source)
        return adapter, adapter.identity()

    def _load(self, name: str, source: str, pinned: bool, load_inplace: bool) -> AdapterRef:
        adapter, identity = self._read_for_load(name, source)  # outside the engine thread; raises before any change
        return self._register(name, source, pinned, load_inplace, adapter, identity)

    def _register(
        self, name: str, source: str, pinned: bool, load_inplace: bool, adapter: Any, identity: str
    ) -> AdapterRef:
        ref = AdapterRef(
            name=name,
            version=self.registry.new_version(),
            source=source,
            pinned=pinned,
            rank=adapter.rank,
            identity=identity,
        )
        self.run_in_engine(lambda: self._commit(ref, adapter, load_inplace))
        self.plugins.notify(
            "loraserve_adapter_loaded", name=name, version=ref.version, source=source, rank=adapter.rank, pinned=pinned
        )
        return ref

    def _commit(self, ref: AdapterRef, adapter: Any, replace: bool = False) -> None:
        old = self.registry.get(ref.name) if replace else None  # pinned or not, it leaves with this commit
        if ref.pinned and sum(r is not old for r in self.registry.pinned_refs()) + 1 > self.pool.num_slots - 1:
            raise Conflict(
                f"at most --max-loras-per-batch - 1 = {self.pool.num_slots - 1} adapters may be pinned; "
                f"unpin or unload one, or raise --max-loras-per-batch"
            )
        self.admission.cache_on_host(ref.key, adapter)
        try:
            if ref.pinned:
                slot = self.admission.ensure_slot(ref, protected=self.admission.batch_keys())
                if slot is None:
                    raise Conflict(
                        "no GPU slot can be freed to pin this adapter: every slot is pinned or in use "
                        "by running requests; try again later or unpin an adapter"
                    )
                self.pool.pinned.add(ref.key)
            if replace:
                old = self.registry.replace(ref)  # None when an unload took the name meanwhile
            else:
                self.registry.add(ref)
        except Exception:
            self.pool.pinned.discard(ref.key)
            self.admission.forget(ref.key)
            raise
        self.loads += 1
        if old is not None:
            self._free_or_defer(old)  # running requests keep the old version until they finish

    def unload_adapter(self, name: str, timeout: float | None = None) -> int:
        """Remove ``name`` for new requests at once, wait up to ``timeout`` seconds (None: as long as it
        takes) for its in-flight requests, then free its memory. Returns 0 when the memory is freed,
        else the number of requests still holding it: the last of them frees it when it finishes."""
        check_adapter_name(name)
        ref = self.registry.remove(name)
        self.registry.wait_idle(ref, timeout)
        return self.run_in_engine(lambda: self._free_or_defer(ref))

    def _free_or_defer(self, ref: AdapterRef) -> int:
        """Free an unloaded adapter now, or leave it pending until its last request (engine thread)."""
        self.compositions.retire_using(ref)
        held = self.registry.defer_free(ref)
        if held:
            self.pool.pinned.discard(ref.key)  # evictable once idle; a reload may pin the new version
            return held
        self._free(ref)
        return 0

    def _free(self, ref: AdapterRef) -> None:
        self.admission.forget(ref.key)
        if ref.meta.get("composition"):
            self.compositions.forget(ref)
            return
        self.tensor_sources.remove(ref.source)
        self.plugins.notify("loraserve_adapter_unloaded", name=ref.name, version=ref.version)

    def unloading_adapters(self) -> list[dict]:
        """Adapters unloaded by name whose memory waits for their in-flight requests."""
        return [
            {"name": r.name, "version": r.version, "source": r.source, "in_flight": r.in_flight}
            for r in sorted(self.registry.pending(), key=lambda r: r.version)
        ]
