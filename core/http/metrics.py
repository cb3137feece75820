"""Prometheus metrics of one HTTP server: request counters, latency histograms and engine gauges.

Each app owns a :class:`ServerMetrics` with its own ``CollectorRegistry`` (no global registry, so
tests build several apps side by side). Request metrics (requests by adapter and finish reason,
prompt and generation tokens by adapter, time to first token, time per output token, end-to-end
latency) are recorded by the frontends' request runner when a request finishes or its client goes
away. Engine state (queue length, running requests, KV-cache use, LoRA slots in use, host-cache
size, loads, evictions, slot hits and misses, engine steps and their time by kind, slot fills, bytes
and seconds of adapter copies, copies in flight, prefetches, time requests waited for a copy, which
memory tier holds each loaded adapter, each adapter's version and identity, vLLM's
``lora_requests_info``, and the prefix cache's tokens looked up and found, evictions and blocks) is
read at scrape time
from :meth:`EngineClient.stats() <loraserve.contract.EngineClient.stats>`, a snapshot the
engine takes between steps. HTTP responses are counted by route and status by
:class:`HttpMetricsMiddleware`. Adapter label values are only names of adapters the engine
loaded (requests naming others are refused before they run), and :data:`COMPOSITION_LABEL` for every
weighted composition, so series stay bounded. No
``_created`` series is exposed: routers and dashboards do not use them and they double the output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from loraserve.lora.composition import is_composition

PREFIX = "loraserve"
#: the adapter label of requests for a weighted composition of adapters
COMPOSITION_LABEL = "(composition)"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _EngineCollector:
    """Turns the latest engine snapshot (:class:`~loraserve.contract.EngineStats`) into metric
    families at scrape time."""

    def __init__(self) -> None:
        self.snapshot: Mapping[str, Any] = {}

    def describe(self) -> list:
        return []  # families depend on whether LoRA is enabled; nothing to check at registration

    def collect(self):
        s = self.snapshot
        if not s:
            return
        yield from _gauges(s)
        yield from _steps(s.get("steps", {}))
        yield from _step_timing(s.get("step_timing", {}))
        cache = s.get("prefix_cache")
        if cache is not None:
            yield from _prefix_cache(cache)
        counters = s.get("lora_counters")
        if counters is not None:
            yield from _lora_counters(counters)
        store = s.get("lora_store")
        if store is not None:
            yield from _lora_store(store)
        residency = s.get("lora_residency")
        if residency is not None:
            yield _residency(residency)
        adapter_info = s.get("lora_adapter_info")
        if adapter_info is not None:
            yield _adapter_info(adapter_info)
        info = s.get("lora_requests_info")
        if info is not None:
            yield _requests_info(info)


LORA_COUNTERS = (
    ("lora_loads", "Adapters loaded (by name, including reloads).", "loads"),
    ("lora_slot_hits", "Adapter lookups that found it in a GPU slot.", "hits"),
    ("lora_slot_misses", "Adapter lookups that had to copy it into a slot.", "misses"),
    ("lora_host_reloads", "Adapters re-read from their source after a host eviction.", "host_reloads"),
    ("lora_slot_fills", "Adapter weights copied into a GPU slot.", "slot_fills"),
    ("lora_copied_bytes", "Bytes of adapter weights copied host to GPU.", "bytes_copied"),
    (
        "lora_copy_seconds",
        "Time spent copying adapters into GPU slots (GPU-timed with overlap loading).",
        "copy_seconds",
    ),
    (
        "lora_copy_wait_seconds",
        "Time requests waited for their adapter's copy (overlap loading).",
        "copy_wait_seconds",
    ),
    ("lora_prefetches", "Adapter copies started for waiting requests before their turn.", "prefetches"),
    (
        "lora_slot_refusals",
        "Times a waiting request was passed over because its step used every adapter slot or none could "
        "be freed; a steady rise while requests wait means --max-loras-per-batch bounds the batch.",
        "slot_refusals",
    ),
)


PREFIX_CACHE_COUNTERS = (
    ("prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache.", "queried_tokens"),
    ("prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache (not computed again).", "hit_tokens"),
    ("prefix_cache_evicted_blocks", "Cached KV blocks evicted to make room.", "evicted_blocks"),
)
PREFIX_CACHE_GAUGES = (
    ("prefix_cache_cached_blocks", "KV blocks holding a cached prompt prefix.", "cached_blocks"),
    ("prefix_cache_evictable_blocks", "Cached KV blocks no running request holds.", "evictable_blocks"),
)


def _gauges(s: Mapping[str, Any]):
    """The scheduler's and the KV cache's gauges, and the adapter pools' when LoRA is enabled."""
    gauges = [
        ("num_requests_waiting", "Requests waiting to be scheduled (the queue length).", s["waiting"]),
        ("num_requests_running", "Requests in the running batch.", s["running"]),
        ("kv_cache_blocks_total", "KV-cache blocks.", s["kv_blocks_total"]),
        (
            "kv_cache_blocks_free",
            "KV-cache blocks a request may get: free, or cached and evictable.",
            s["kv_blocks_free"],
        ),
        (
            "kv_cache_usage_ratio",
            "Fraction of KV-cache blocks in use.",
            1.0 - s["kv_blocks_free"] / max(1, s["kv_blocks_total"]),
        ),
    ]
    if "lora_slots_total" in s:
        gauges += [
            ("lora_slots_total", "GPU adapter slots (the base model counts as one).", s["lora_slots_total"]),
            (
                "lora_slots_in_use",
                "GPU adapter slots holding an adapter or the base model.",
                s["lora_slots_in_use"],
            ),
            ("lora_host_cache_adapters", "Adapters held in the host cache.", s["lora_host_cached"]),
            ("lora_adapters_loaded", "Adapters registered (loaded by name).", s["lora_adapters"]),
            (
                "lora_copies_in_flight",
                "Adapter copies to GPU slots not finished yet (overlap loading).",
                s["lora_copies_in_flight"],
            ),
        ]
    for name, doc, value in gauges:
        family = GaugeMetricFamily(f"{PREFIX}_{name}", doc)
        family.add_metric([], float(value))
        yield family


def _steps(by_kind: Mapping[str, tuple[int, float]]):
    steps = CounterMetricFamily(
        f"{PREFIX}_engine_steps",
        "Engine steps run, by kind (decode only, or with prefill tokens).",
        labels=["kind"],
    )
    seconds = CounterMetricFamily(
        f"{PREFIX}_engine_step_seconds",
        "Wall time of engine steps (model, sampling, delivery), by kind.",
        labels=["kind"],
    )
    for kind, (count, secs) in by_kind.items():
        steps.add_metric([kind], float(count))
        seconds.add_metric([kind], float(secs))
    yield steps
    yield seconds


def _step_timing(by_kind: Mapping[str, Mapping[str, float]]):
    """The host's and the GPU's share of the steps' wall time (the overlap makes them overlap)."""
    families = [
        (
            "engine_step_host_seconds",
            "Host time of engine steps (wall time minus waiting for the device), by kind.",
            "host_s",
        ),
        (
            "engine_step_gpu_seconds",
            "GPU time of engine steps (forward pass and sampling, CUDA events), by kind.",
            "gpu_s",
        ),
        ("engine_gpu_timed_steps", "Engine steps whose GPU time was measured, by kind.", "gpu_steps"),
    ]
    for name, doc, key in families:
        family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["kind"])
        for kind, values in by_kind.items():
            family.add_metric([kind], float(values[key]))
        yield family


def _lora_counters(counters: Mapping[str, Any]):
    yield from _unlabelled(CounterMetricFamily, LORA_COUNTERS, counters)
    family = CounterMetricFamily(f"{PREFIX}_lora_evictions", "Adapter evictions, by memory tier.", labels=["tier"])
    family.add_metric(["gpu"], float(counters.get("gpu_evictions", 0)))
    family.add_metric(["host"], float(counters.get("host_evictions", 0)))
    yield family


LORA_STORE_GAUGES = (
    ("lora_store_bytes_used", "GPU adapter store: bytes of pages holding adapters.", "bytes_used"),
    ("lora_store_bytes_free", "GPU adapter store: bytes of free pages.", "bytes_free"),
    ("lora_store_adapters", "GPU adapter store: adapters held.", "resident"),
    ("lora_store_padding_rows", "GPU adapter store: rank rows held but unused (ranks rounded up to pages).",
     "padding_rows"),
    ("lora_store_fragmentation_ratio", "GPU adapter store: share of free pages outside the largest free run.",
     "fragmentation"),
)  # fmt: skip
LORA_STORE_COUNTERS = (
    ("lora_store_evictions", "GPU adapter store: adapters evicted to make room.", "store_evictions"),
    ("lora_store_compactions", "GPU adapter store: compactions (runs moved to close gaps).", "compactions"),
    ("lora_store_hits", "GPU adapter store: slot fills served from the store (device copies).", "store_hits"),
    ("lora_store_prefetches", "GPU adapter store: adapters put there for waiting requests.", "store_prefetches"),
)


def _unlabelled(kind: type, table: tuple, values: Mapping[str, Any]):
    """One unlabelled family of ``kind`` per ``(name, doc, key)`` of ``table``, valued ``values[key]`` (0 if absent)."""
    for name, doc, key in table:
        family = kind(f"{PREFIX}_{name}", doc)
        family.add_metric([], float(values.get(key, 0)))
        yield family


def _lora_store(store: Mapping[str, Any]):
    """The GPU adapter store's pages, adapters and fragmentation (``--lora-gpu-store-gib``)."""
    yield from _unlabelled(GaugeMetricFamily, LORA_STORE_GAUGES, store)
    yield from _unlabelled(CounterMetricFamily, LORA_STORE_COUNTERS, store)
    ranks = GaugeMetricFamily(f"{PREFIX}_lora_store_adapters_by_rank", "GPU adapter store: adapters by rank.",
                              labels=["rank"])  # fmt: skip
    for rank in sorted(set(store.get("ranks", []))):
        ranks.add_metric([str(rank)], float(store["ranks"].count(rank)))
    yield ranks


def _prefix_cache(cache: Mapping[str, int]):
    """The prefix cache's counters since start and its blocks now (only while the cache is on)."""
    yield from _unlabelled(CounterMetricFamily, PREFIX_CACHE_COUNTERS, cache)
    yield from _unlabelled(GaugeMetricFamily, PREFIX_CACHE_GAUGES, cache)


def _residency(residency) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        f"{PREFIX}_lora_adapter_resident",
        "1 when the memory tier (gpu: a GPU adapter slot, host: the host cache) holds the loaded adapter, else 0.",
        labels=["adapter", "rank", "pinned", "tier"],
    )
    for adapter, rank, pinned, on_gpu, on_host in residency:
        labels = [adapter, str(rank), "true" if pinned else "false"]
        family.add_metric([*labels, "gpu"], 1.0 if on_gpu else 0.0)
        family.add_metric([*labels, "host"], 1.0 if on_host else 0.0)
    return family


def _adapter_info(adapter_info) -> GaugeMetricFamily:
    # an info gauge, not more labels on lora_adapter_resident: an in-place update changes the
    # version and identity, and residency dashboards should not see their series end for it
    family = GaugeMetricFamily(
        f"{PREFIX}_lora_adapter_info",
        "1 for each loaded adapter, labelled with the version of its current load and its identity "
        "(blake2b hash of its weights and scaling: equal weights have equal identities).",
        labels=["adapter", "version", "identity"],
    )
    for adapter, version, identity in adapter_info:
        family.add_metric([adapter, str(version), identity], 1.0)
    return family


def _requests_info(info: Mapping[str, Any]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        f"{PREFIX}_lora_requests_info",
        "Adapters of running and of waiting "
        "requests (comma-separated names) and max_lora (--max-loras-per-batch); the "
        "value is when the engine was seen (unix seconds), as vLLM's "
        "lora_requests_info.",
        labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
    )
    family.add_metric([info["running"], info["waiting"], str(info["max_lora"])], info["time"])
    return family


class _WithoutCreated(Collector):
    """A view of a registry whose families lack the ``<name>_created`` samples that prometheus_client
    adds to counters and histograms. (``prometheus_client.disable_created_metrics()`` would do it for
    every registry of the process, a global switch.)"""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self):
        for family in self.registry.collect():  # fresh Metric objects on every collect: safe to trim
            family.samples = [s for s in family.samples if s.name != f"{family.name}_created"]
            yield family


class ServerMetrics:
    """The metrics of one app; ``render()`` gives the Prometheus text exposition."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Finished generation requests, by adapter and finish reason.",
            ["adapter", "finish_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests, by adapter.", ["adapter"], registry=r
        )
        self.generation_tokens = Counter(
            f"{PREFIX}_generation_tokens", "Generated tokens of finished requests, by adapter.", ["adapter"], registry=r
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from arrival to the first token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            f"{PREFIX}_time_per_output_token_seconds",
            "Mean time between output tokens after the first, per request.",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "Time from arrival to the last token.",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.http = Counter(
            f"{PREFIX}_http_responses", "HTTP responses, by route and status.", ["route", "status"], registry=r
        )
        self._engine = _EngineCollector()
        r.register(self._engine)
        self._exposed = _WithoutCreated(r)

    def observe_finished(self, request: Any, finish_reason: str, now: float) -> None:
        """Record one request that finished (or whose client went away) at ``now`` (perf_counter)."""
        completion = len(request.output_ids)
        adapter = request.adapter or ""
        if is_composition(adapter):  # one label for every weighted composition: clients choose the weights
            adapter = COMPOSITION_LABEL
        self.requests.labels(adapter=adapter, finish_reason=finish_reason).inc()
        self.prompt_tokens.labels(adapter=adapter).inc(len(request.prompt_ids))
        self.generation_tokens.labels(adapter=adapter).inc(completion)
        end = request.finish_time if request.finish_time is not None else now
        if request.first_token_time is not None:
            self.ttft.observe(request.first_token_time - request.arrival_time)
            if completion > 1:
                self.tpot.observe((end - request.first_token_time) / (completion - 1))
        self.e2e.observe(end - request.arrival_time)

    def render(self, snapshot: Mapping[str, Any]) -> bytes:
        """The text exposition, with the engine's gauges from ``snapshot`` (``EngineClient.stats()``)."""
        self._engine.snapshot = snapshot
        return generate_latest(self._exposed)


class HttpMetricsMiddleware:
    """Counts every HTTP response by route template (not raw path: bounded label values) and status."""

    def __init__(self, app: Any, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.http.labels(route=route, status=str(status[0])).inc()
