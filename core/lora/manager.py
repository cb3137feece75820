"""The LoRA manager: adapter lifecycle (load, unload, pin, evict) and the per-step batch info.

It owns the registry, the host cache and the GPU pool, installs a LoRA hook on every targeted
linear layer of the model (:mod:`~loraserve.lora.model_hooks`), and builds each step's batch info
(eagerly, or into the static buffers of a CUDA graph: :mod:`~loraserve.lora.graph_buffers`). The
scheduler's question "may this request join the step?" and the filling of GPU slots (synchronous,
or on a copy engine with overlap loading) are answered by the
:class:`~loraserve.lora.admission.SlotAdmission` it holds. Mutating calls run on the engine thread;
``load_adapter``/``unload_adapter`` do their slow parts (reading weights, waiting for in-flight
requests) on the caller's thread and hand the state change to the engine thread through
``run_in_engine``. A load checks everything (the name, the :class:`AdapterSourcePolicy`, the files,
the config, the weights) before it changes any state, and undoes what it did if registering fails,
so a refused load leaves nothing behind. An unload whose wait for in-flight requests timed out
leaves the adapter *pending*: the release of its last request frees its memory, on the engine thread.
An in-place update (``load_inplace``) puts the new version under the name in the same engine-thread
step and frees the old version as an unload would, at once or after its last running request.
Adapters pushed as tensors are loaded from private directories (:mod:`~loraserve.lora.tensor_source`).
Loading and unloading live in :mod:`~loraserve.lora.lifecycle` (a base class of the manager).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from loraserve.contract import LoRABatchInfo
from loraserve.errors import NotFound, UserError
from loraserve.lora.adapter import BaseModelShape
from loraserve.lora.admission import SlotAdmission, key_of
from loraserve.lora.composition import SOURCE_PREFIX, AdapterCompositions, is_composition
from loraserve.lora.dora import DoraScales
from loraserve.lora.graph_buffers import GraphBatchInfoBuffers
from loraserve.lora.lifecycle import AdapterLifecycle
from loraserve.lora.model_hooks import LoRAModelHooks, make_pool
from loraserve.lora.policy import AdapterSourcePolicy, check_adapter_name, shown
from loraserve.lora.pools import BASE_KEY, HostAdapterCache
from loraserve.lora.registry import AdapterRef, AdapterRegistry
from loraserve.lora.resolution import SingleFlight, make_resolvers, resolve_and_load
from loraserve.lora.tensor_source import TensorSources
from loraserve.staging import HostStaging

logger = logging.getLogger("loraserve.lora")


class LoRAManager(AdapterLifecycle):
    """The adapters of one engine (see the module docstring). ``running``, ``waiting``,
    ``copy_engine`` and ``mirror`` go to its :class:`SlotAdmission` (see there); ``pin_host`` keeps
    host copies page-locked, in the pool's dtype (with a CUDA copy engine). ``resolutions`` runs one
    resolution per unknown adapter name at a time (:class:`SingleFlight`)."""

    # size: the facade wires each part it drives (registry, pools, admission, hooks, DoRA), a statement each
    def __init__(
        self,
        settings: Any,
        plugins: Any,
        model: torch.nn.Module,
        backend: Any,
        max_rank: int,
        target_modules: list[str],
        device: torch.device,
        dtype: torch.dtype,
        run_in_engine: Callable[[Callable[[], Any]], Any],
        policy: AdapterSourcePolicy | None = None,
        *,
        running: Callable[[], list] = lambda: [],
        waiting: Callable[[], Any] = lambda: [],
        copy_engine: Any = None,
        pin_host: bool = False,
        mirror: Callable[[tuple], None] | None = None,
    ):
        self.settings, self.plugins, self.backend = settings, plugins, backend
        self.device, self.run_in_engine = device, run_in_engine
        #: where adapters may come from (default: anywhere, as SGLang)
        self.policy = policy if policy is not None else AdapterSourcePolicy()
        self.shape = BaseModelShape.from_config(model.config)
        self.max_rank, self.target_modules = max_rank, list(target_modules)
        self.loaders = [plugins.loaders.create(r.name) for r in plugins.loaders]
        self.resolvers = make_resolvers(plugins, settings, self.policy)
        self.registry, self.resolutions, self.servable_checks = AdapterRegistry(), SingleFlight(), SingleFlight()
        #: private directories of the adapters pushed as tensors (load_adapter_from_tensors)
        self.tensor_sources = TensorSources(self.policy)
        self.host = HostAdapterCache(
            settings.host_cache_capacity,
            plugins.eviction_policies.create(settings.lora_eviction_policy),
            None if settings.max_loaded_lora_gib is None else int(settings.max_loaded_lora_gib * 2**30),
        )
        # the fused modules: those whose base GEMM may do the shrink
        self.pool, shrink_in_gemm_modules = make_pool(
            model, settings, plugins, backend, self.shape, max_rank, self.target_modules, dtype, device
        )
        self.pin_host, self.dtype = pin_host, dtype
        #: the rank-paged GPU tier (--lora-gpu-store-gib), or None; rank 0 only with tensor parallelism
        #: (a sharded pool without a mirror is another rank's, whose fills come from host memory)
        self.store = None
        if settings.lora_gpu_store_gib > 0 and (mirror is not None or not self.pool.shard):
            from loraserve.lora.gpu_store import GpuAdapterStore

            policy_ = plugins.eviction_policies.create(settings.lora_eviction_policy)
            self.store = GpuAdapterStore(self.pool, int(settings.lora_gpu_store_gib * 2**30), policy_)
        # prefetch scans twice as many waiting requests as a batch has slots
        self.admission = SlotAdmission(
            self.pool,
            self.host,
            self.registry,
            self.read_adapter,
            plugins.notify,
            running=running,
            waiting=waiting,
            copy_engine=copy_engine,
            mirror=mirror,
            store=self.store,
            finish=lambda adapter: self.dora.finish(adapter),
            components=lambda source: self.compositions.parts_of(source),
            prefetch_lookahead=2 * settings.max_loras_per_batch,
            # re-reads only exist with a bounded host tier; compositions are built from the host cache
            background=(lambda source: not source.startswith(SOURCE_PREFIX)) if self.host.bounded else None,
        )
        self.loads = 0
        #: weighted compositions of adapters, each a virtual adapter of its own
        self.compositions = self._make_compositions()
        #: the hooks on the model's targeted layers and the per-step state they read
        self.hooks = LoRAModelHooks(model, backend, self.pool, max_rank, shrink_in_gemm_modules, self.shape.vocab_size)
        self.dora = DoraScales(model, backend, self.shape)
        self.dora_in_graphs = settings.enable_dora_cuda_graph and self.pool.dora_flags is not None  # graph_can_serve
        self._graph_buffers: GraphBatchInfoBuffers | None = None
        # page-locked staging of the eager batch infos, one per build a step makes (HostStaging)
        self._staging, self._logits_staging = HostStaging(device), HostStaging(device)

    def _make_compositions(self) -> AdapterCompositions:
        return AdapterCompositions(
            self.registry,
            self.max_rank,
            acquire_component=lambda name: self.registry.acquire(name) or self._resolve(name),
            release_component=self._release_ref,
            weights_of=self._component_weights,
            cache_on_host=lambda key, adapter: self.admission.cache_on_host(key, self._host_form(adapter)),
            retire=self._free_or_defer,
            run_in_engine=self.run_in_engine,
        )

    # -- slot admission (engine thread; see loraserve.lora.admission) -----------------------------

    def close(self) -> None:
        """The engine is stopping: adapter reads not started are cancelled."""
        self.admission.close()

    def can_join(self, request, step: list):
        """The scheduler's ``can_join`` (:meth:`SlotAdmission.can_join`)."""
        return self.admission.can_join(request, step)

    def before_schedule(self, fail: Callable[[Any, str, int], None]) -> None:
        """Retire finished copies and reads, and prefetch (:meth:`SlotAdmission.before_schedule`)."""
        self.admission.before_schedule(fail)

    @property
    def copies_in_flight(self) -> int:
        return self.admission.copies_in_flight

    @property
    def copy_engine(self) -> Any:
        return self.admission.copy_engine

    @property
    def metrics(self) -> dict:
        """Adapter loads, and slot admission's hits, misses, evictions, fills and copies."""
        return {"loads": self.loads, **self.admission.metrics}

    # -- requests -------------------------------------------------------------------------------

    def acquire(self, requests: list) -> None:
        """Attach adapter refs to requests (any thread); an unknown name is resolved (see
        :meth:`_resolve`, which blocks for the load), else NotFound."""
        taken = []
        try:
            for r in requests:
                if r.adapter is None:
                    continue
                if is_composition(r.adapter):
                    ref = self.compositions.acquire(r.adapter)
                else:
                    ref = self.registry.acquire(r.adapter)
                if ref is None:
                    ref = self._resolve(r.adapter)
                r.adapter_ref = ref
                taken.append(r)
        except Exception:
            for r in taken:
                self.release(r)
            raise

    def _resolve(self, name: str) -> AdapterRef:
        """Have the resolver plugins find ``name`` and load it; the held ref, else NotFound. Blocks: runs
        on the submitting thread, never the engine thread (see :mod:`~loraserve.lora.resolution`)."""
        try:
            check_adapter_name(name)
        except UserError:  # no such name can be loaded, so no resolver is asked
            raise NotFound(
                f"unknown adapter {shown(name)}; adapter names are 1 to 256 characters from A-Z a-z "
                "0-9 . _ / @ + -; GET /v1/models lists the loaded ones"
            ) from None
        if self.resolvers:
            self.resolutions.run(name, lambda: resolve_and_load(name, self.resolvers, self.registry, self.load_adapter))
            ref = self.registry.acquire(name)
            if ref is not None:
                return ref
        known = ", ".join(sorted(self.registry.names())) or "none"
        raise NotFound(
            f"unknown adapter {name!r}; loaded adapters: {known}. Load it first "
            "(POST /load_lora_adapter) or start with --lora-paths"
        )

    def release(self, request) -> None:
        """Drop the request's adapter ref (any thread); the last request of a pending unload frees it."""
        ref, request.adapter_ref = request.adapter_ref, None
        if ref is not None:
            self._release_ref(ref)

    def _release_ref(self, ref: AdapterRef) -> None:
        if self.registry.release(ref):
            try:
                self.run_in_engine(lambda: self._free(ref))
            except UserError:  # the engine is stopping: nothing to free any more
                pass

    # -- the step's batch info (engine thread) ----------------------------------------------------

    def _step_slots(self, chunks: list) -> list[int]:
        """The GPU slot of each chunk's adapter; marks every adapter of the step as used."""
        seg_slot = [self.pool.slot_of(key_of(c.request)) for c in chunks]
        if any(s is None or s in self.pool.loading for s in seg_slot):
            raise RuntimeError("a scheduled request's adapter is not in a GPU slot, or its copy has not finished")
        for key in {key_of(c.request) for c in chunks}:
            self.pool.policy.touch(key)
        return seg_slot

    def prepare(self, chunks: list) -> None:
        """Build this step's LoRABatchInfo and hand it to the backend (engine thread): one
        host-to-device copy from page-locked staging (once per step: see
        :class:`~loraserve.staging.HostStaging`)."""
        seg_slot = self._step_slots(chunks)
        active = any(self.pool.ranks_host[s] > 0 for s in seg_slot)
        seg_lens = [c.num_tokens for c in chunks]
        dora = any(self.pool.dora_host[s] for s in seg_slot)
        self.hooks.begin_step(active, sum(seg_lens), dora)
        if not active:
            return
        info = LoRABatchInfo.build(
            seg_lens,
            seg_slot,
            self.pool.ranks_host,
            self.pool.scalings_host,
            self.max_rank,
            device=self.device,
            staging=self._staging,
        )
        self.backend.prepare(info)
        if (-1, "lm_head") in self.pool.A:
            sampled = [s for c, s in zip(chunks, seg_slot) if c.samples]
            self.hooks.set_logits_info(
                LoRABatchInfo.build(
                    [1] * len(sampled),
                    sampled,
                    self.pool.ranks_host,
                    self.pool.scalings_host,
                    self.max_rank,
                    device=self.device,
                    staging=self._logits_staging,
                )
            )

    # -- CUDA graphs (engine thread; see loraserve.lora.graph_buffers) ----------------------------

    @property
    def graph_capturable(self) -> bool:
        """Whether a step's LoRA work can be captured in a CUDA graph (the backend's prepare and
        run_lora read only device tensors) — the kernel backends, not the host-looping torch one,
        and not LoRA on the embedding or lm_head, whose batch info the hooks rebuild on the host."""
        on_embeddings = (-1, "lm_head") in self.pool.A or (-1, "embed_tokens") in self.pool.A
        return bool(getattr(self.backend, "graph_capturable", False)) and not on_embeddings

    def init_graph_buffers(self, max_tokens: int) -> None:
        """Static batch-info buffers for decode steps of up to ``max_tokens`` requests
        (:class:`~loraserve.lora.graph_buffers.GraphBatchInfoBuffers`)."""
        self._graph_buffers = GraphBatchInfoBuffers(self.pool.num_slots, self.max_rank, max_tokens, self.device)

    def begin_graph_capture(self, num_tokens: int) -> LoRABatchInfo:
        """Set the hooks up for capturing a decode step of ``num_tokens`` rows; returns its batch
        info (views of the static buffers, refilled by :meth:`prepare_graph_step` before every
        replay), for the caller to hand to ``backend.prepare`` inside the capture."""
        self.hooks.begin_step(True, num_tokens, dora=self.dora_in_graphs)
        return self._graph_buffers.capture_info(num_tokens)

    def graph_can_serve(self, chunks: list) -> bool:
        """Whether the captured decode graphs compute these chunks right: always, unless a chunk's
        adapter is DoRA and the graphs were captured without DoRA's pass (``--enable-dora-cuda-graph``
        off), in which case the step runs eagerly."""
        if self.dora_in_graphs or not any(self.pool.dora_host):
            return True
        slots = (self.pool.slot_of(key_of(c.request)) for c in chunks)
        return not any(s is not None and self.pool.dora_host[s] for s in slots)

    def prepare_graph_step(self, chunks: list, num_tokens: int) -> None:
        """Fill the static buffers for a decode step (one token per chunk) padded to ``num_tokens``
        rows: one host-to-device copy of the slots, ranks and scalings."""
        seg_slot = self._step_slots(chunks)
        self._graph_buffers.fill(seg_slot, self.pool.ranks_host, self.pool.scalings_host, num_tokens)

    def check_integrity(self) -> None:
        """Pools consistent, and every adapter they hold is registered or still held by a request."""
        self.pool.check_integrity()
        self.host.check_integrity()
        if {r.key for r in self.registry.pinned_refs()} != {r.key for r in self.registry.refs() if r.pinned}:
            raise RuntimeError("the registry's pinned set differs from its pinned adapters")
        live = (
            {r.key for r in self.registry.refs()}
            | {r.key for r in self.registry.pending()}
            | self.admission.batch_keys()
            | self.compositions.keys()
            | {BASE_KEY}
        )
        for key in [*self.pool.resident(), *self.host.keys()]:
            if key not in live:
                raise RuntimeError(f"adapter {key} is still in memory but neither registered nor in use")

    def loaded_adapters(self) -> list[dict]:
        return [
            {
                "name": r.name,
                "source": r.source,
                "pinned": r.pinned,
                "rank": r.rank,
                "version": r.version,
                "identity": f"blake2b:{r.identity}",
            }
            for r in self.registry.refs()
        ]
