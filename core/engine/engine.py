"""The engine: owns the settings, plugins, model, KV cache, scheduler and sampler, and runs steps.

Each ``Engine`` is self-contained (no module-level state), so tests build engines side by side. One engine
thread (:mod:`~loraserve.engine.loop`) runs the step loop; other threads (the HTTP server's event loop, a
test) submit requests and aborts through a small inbox and receive :class:`RequestOutput` deltas through
each request's sink. :meth:`Engine.generate` is the blocking Python API, :meth:`Engine.generate_async` and
:meth:`Engine.stream` the asyncio ones (SGLang's arguments, :mod:`~loraserve.engine.python_api`).
``Engine`` is an :class:`~loraserve.contract.EngineClient`, the surface the HTTP frontends use.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from loraserve.contract import EngineClient, EngineStats, ModelInfo
from loraserve.engine import adapters, python_api
from loraserve.engine.builder import build_components
from loraserve.engine.intake import Intake, check_fits, check_sampling_params
from loraserve.engine.loop import EngineLoop
from loraserve.engine.outputs import OutputBuilder
from loraserve.engine.stats import effective_settings, take_stats
from loraserve.engine.stepper import Stepper
from loraserve.errors import UserError
from loraserve.plugin_manager import PluginManager
from loraserve.sched.request import Request, RequestOutput, Status
from loraserve.sched.sampling_params import SamplingParams, TokenHistory, make_generator
from loraserve.settings import Settings

if TYPE_CHECKING:
    from loraserve.engine.tp import TPDriver

logger = logging.getLogger("loraserve.engine.engine")


def default_plugins(settings: Settings) -> PluginManager:
    """The plugin manager the settings ask for (``--plugins``, ``--disable-plugin``, tracing)."""
    return PluginManager(allow=settings.plugins, deny=settings.disable_plugin, trace=settings.trace_plugins)


def start_tp(settings: Settings, plugins: PluginManager) -> TPDriver | None:
    """With ``--tp-size > 1``, the :class:`~loraserve.engine.tp.TPDriver` of the other ranks, with
    this process joined to their group as rank 0; else None."""
    if settings.tp_size <= 1:
        return None
    from loraserve.engine.tp import TPDriver, check_before_start, init_group

    check_before_start(settings, plugins)
    tp = TPDriver(settings)
    try:
        init_group(0, settings.tp_size, tp.port, settings.resolved_device())
    except BaseException:
        tp.shutdown(timeout=5)
        raise
    return tp


class Engine(EngineClient):
    """Builds and owns every part of a serving engine from :class:`Settings`; the methods of
    :class:`EngineClient` document themselves there."""

    def __init__(self, settings: Settings | None = None, plugins: PluginManager | None = None, detokenize: bool = True):
        """``detokenize=False``: outputs carry token ids only, no text, and stop strings are not
        checked (the engine process of a split server: its HTTP process does both)."""
        self.settings = settings if settings is not None else Settings()
        self.plugins = plugins if plugins is not None else default_plugins(self.settings)
        self.plugins.load()
        self.plugins.configure(self.settings.plugin_options)
        self.settings.check_supported()
        self._ids = itertools.count()
        #: the engine thread, and the calls other threads post to it
        # step looked up at each call: a benchmark may wrap this instance's step (bench_offline times it)
        self._loop = EngineLoop(lambda: self.step(), lambda: self.stepper.has_work(), self._abort_all, self._fail_all)
        #: tensor parallelism (--tp-size > 1): this process is rank 0 and drives the other ranks
        self.tp = start_tp(self.settings, self.plugins)
        try:
            parts = build_components(
                self.settings,
                self.plugins,
                self.call_in_engine,
                tp_rank=0,
                send_step=self.tp.send_step if self.tp is not None else None,
                mirror_lora=self.tp.mirror_lora if self.tp is not None else None,
            )
        except BaseException:
            self._stop_tp(timeout=5)
            raise
        self.device, self.dtype = parts.device, parts.dtype
        self.model, self.config, self.tokenizer = parts.model, parts.config, parts.tokenizer
        self.model_name, self.context_len = parts.model_name, parts.context_len
        self.kv, self.scheduler, self.runner, self.sampler = parts.kv, parts.scheduler, parts.runner, parts.sampler
        self.lora = parts.lora
        self.backend_name, self.attention_name = parts.backend_name, parts.attention_name
        self.outputs = OutputBuilder(self.tokenizer, parts.eos_token_ids, detokenize=detokenize)
        #: the step loop's work (overlapped unless --disable-overlap-schedule; with TP the other ranks
        #: get each step's sampled tokens by a broadcast and resolve the placeholders themselves)
        self.overlap = not self.settings.disable_overlap_schedule
        self.stepper = Stepper(
            self.scheduler,
            self.runner,
            self.sampler,
            self.outputs,
            self.lora,
            self.device,
            self.context_len,
            finish=self._finish,
            deliver=lambda r: self._deliver(r, finished=False),
            overlap=self.overlap,
        )
        if self.tp is not None:
            self.tp.attach(self.kv.block_table, self.stepper)
        #: prompt-size and queue bounds, and thread-safe tokenization
        self.intake = Intake(
            self.tokenizer, self.context_len, self.settings.max_queued_requests, self.settings.max_prompt_chars
        )
        if self.lora is not None and self.settings.lora_paths:
            self._load_startup_adapters()

    def _load_startup_adapters(self) -> None:
        """The adapters of ``--lora-paths``."""
        from tqdm.auto import tqdm

        specs = self.settings.lora_paths
        with tqdm(total=len(specs), desc="loading adapters", unit="adapter", disable=len(specs) < 2) as bar:
            self.lora.load_startup_adapters(specs, progress=bar.update)

    def effective_settings(self) -> dict[str, Any]:
        return effective_settings(
            self.settings,
            device=self.device,
            dtype=self.dtype,
            model_name=self.model_name,
            context_len=self.context_len,
            kv_tokens=self.kv.allocator.capacity_tokens,
            max_prompt_chars=self.intake.max_prompt_chars,
            scheduler=self.scheduler,
            runner=self.runner,
            lora=self.lora,
            backend_name=self.backend_name,
            attention_name=self.attention_name,
        )

    # -- submitting work (any thread) -------------------------------------------------------------

    def make_request(
        self,
        prompt: str | None = None,
        input_ids: Sequence[int] | None = None,
        params: SamplingParams | dict | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
    ) -> Request:
        params = check_sampling_params(params, self.model.vocab_size)
        ids = self.intake.prompt_ids(prompt, input_ids, self.model.vocab_size)
        check_fits(len(ids), params.max_new_tokens, self.context_len, self.kv.allocator.capacity_tokens)
        if adapter is not None and self.lora is None:
            raise UserError(
                f"adapter {adapter!r} requested but LoRA is not enabled; start with --enable-lora or --lora-paths"
            )
        rid = request_id or f"req-{next(self._ids)}"
        req = Request(
            request_id=rid,
            prompt_ids=ids,
            params=params,
            adapter=adapter,
            generator=make_generator(params.seed, self.device),
        )
        if params.needs_penalties:
            req.history = TokenHistory(ids, self.model.vocab_size, device=self.device)
        return req

    def submit(self, requests: Sequence[Request]) -> None:
        """Queue requests for the engine thread (atomically: they join the same step if they fit);
        QueueFull when they would take the waiting queue past ``--max-queued-requests``."""
        requests = list(requests)
        self.intake.reserve(len(requests), len(self.scheduler.waiting))
        acquired = False
        try:
            if self.lora is not None:
                self.lora.acquire(requests)  # raises UserError for unknown adapters
                acquired = True
            self._post(lambda: self._admit(requests))
        except BaseException:
            self.intake.release(len(requests))
            if acquired:
                for r in requests:
                    self.lora.release(r)
            raise

    def abort(self, request_id: str) -> None:
        self._post(lambda: self._abort(request_id))

    def final_output(self, request: Request) -> dict[str, Any]:
        return self.outputs.final(request)

    def call_in_engine(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread between steps and return its result (or raise its
        exception). Runs inline when called from the engine thread or before the loop started."""
        return self._loop.call(fn)

    def _post(self, fn: Callable[[], None]) -> None:
        self._loop.post(fn)

    # -- the Python API (SGLang's arguments; see loraserve.engine.python_api) ----------------------

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list | None = None,
        lora_path: str | None | list = None,
        input_ids: list[int] | list[list[int]] | None = None,
    ) -> dict | list[dict]:
        """Generate for one prompt or a batch; blocks. The arguments are SGLang's ``Engine.generate``
        ones, so ``lora_path`` (an adapter name, or one per input) keeps SGLang's name here too; a
        weighted composition is a list ``[{"name": ..., "weight": ...}, ...]`` (for every input, or
        as one entry of the per-input list; see :mod:`loraserve.lora.composition`)."""
        return python_api.generate(self, prompt, sampling_params, lora_path, input_ids)

    async def generate_async(self, prompt=None, sampling_params=None, lora_path=None, input_ids=None):
        """Like :meth:`generate`, awaiting instead of blocking."""
        return await python_api.generate_async(self, prompt, sampling_params, lora_path, input_ids)

    def stream(
        self, prompt=None, sampling_params=None, lora_path=None, input_ids=None, requests: list[Request] | None = None
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yield ``(index, delta)`` pairs as tokens are produced; aborts the requests if the
        consumer stops early (a client disconnect). Either ``requests`` (from :meth:`make_request`,
        as :meth:`EngineClient.stream`) or SGLang's ``generate`` arguments."""
        return python_api.stream(self, prompt, sampling_params, lora_path, input_ids, requests)

    # -- the model, adapters and stats (EngineClient; any thread unless it says otherwise) ---------

    def model_info(self) -> ModelInfo:
        path = self.settings.model_path or getattr(self.config, "_name_or_path", None) or self.model_name
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return ModelInfo(
            name=self.model_name,
            path=path,
            context_len=self.context_len,
            vocab_size=self.model.vocab_size,
            max_total_tokens=self.kv.allocator.capacity_tokens,
            lora_enabled=self.lora is not None,
            has_tokenizer=self.tokenizer is not None,
            bos_token_id=bos if isinstance(bos, int) else None,
        )

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.intake.apply_chat_template(messages)

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.intake.detokenize(token_ids, skip_special_tokens)

    def loaded_adapters(self) -> list[dict[str, Any]]:
        return self.lora.loaded_adapters() if self.lora is not None else []

    def unloading_adapters(self) -> list[dict[str, Any]]:
        return self.lora.unloading_adapters() if self.lora is not None else []

    def is_servable(self, adapter: str) -> bool:
        return adapters.is_servable(self.lora, adapter)

    def check_adapter_updates(self) -> None:
        adapters.check_updates(self.lora)

    def load_adapter(self, adapter: str, source: str, pinned: bool = False, load_inplace: bool = False) -> None:
        adapters.load(self.lora, adapter, source, pinned, load_inplace)

    def load_adapter_from_tensors(
        self, adapter: str, config: dict[str, Any], tensors: bytes, pinned: bool = False, load_inplace: bool = False
    ) -> None:
        adapters.load_from_tensors(self.lora, adapter, config, tensors, pinned, load_inplace)

    def unload_adapter(self, adapter: str, timeout: float | None) -> int:
        return adapters.unload(self.lora, adapter, timeout)

    def flush_cache(self) -> int:
        return self.call_in_engine(self.scheduler.flush_prefix_cache)

    def stats(self) -> EngineStats:
        take = partial(
            take_stats,
            self.scheduler,
            self.kv.allocator,
            self.lora,
            self.stepper.step_stats,
            self.settings.max_loras_per_batch,
            self.stepper.step_timing,
        )
        try:
            return self.call_in_engine(take)
        except UserError:  # the engine is stopping: its state no longer changes
            return take()

    # -- the engine thread --------------------------------------------------------------------------

    def start(self) -> None:
        self._loop.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        self._loop.stop(timeout)
        getattr(getattr(self, "lora", None), "close", lambda: None)()  # adapter reads not started: cancelled
        self._stop_tp(timeout)

    def _stop_tp(self, timeout: float) -> None:
        if self.tp is None:
            return
        import torch.distributed as dist

        from loraserve.engine.tp import release_graphs

        release_graphs(getattr(self, "runner", None))  # not built yet when the build itself failed
        self.tp.shutdown(timeout)
        self.tp = None
        # a worker was already gone: NCCL could block tearing down with it, gloo does not
        if dist.is_initialized() and dist.get_backend() == "gloo":
            dist.destroy_process_group()

    @property
    def step_count(self) -> int:
        """Steps launched so far."""
        return self.stepper.step_count

    @property
    def step_stats(self) -> dict[str, list]:
        """``{kind: [steps, seconds]}`` (see :class:`~loraserve.engine.stepper.Stepper`)."""
        return self.stepper.step_stats

    def _abort_all(self) -> None:
        """Finish every queued request as aborted (the engine is stopping)."""
        self.stepper.drain()
        for r in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._finish(r, "abort")

    def _fail_all(self, exc: Exception) -> None:
        """Scheduling itself failed: finish every queued request with the error rather than spin."""
        logger.exception("scheduling failed; every queued request is finished with an error")
        try:
            self.stepper.drain()
        except Exception:
            logger.exception("the step in flight could not complete either")
        for r in list(self.scheduler.running) + list(self.scheduler.waiting):
            r.error = f"{type(exc).__name__}: {exc}"
            self._finish(r, "error")
        self.scheduler.flush_prefix_cache()

    def _admit(self, requests: list[Request]) -> None:
        try:
            for r in requests:
                if r.params.max_new_tokens == 0:  # nothing to generate: done without touching the model
                    self._finish(r, "length")
                else:
                    self.scheduler.add(r)
        finally:
            self.intake.release(len(requests))  # after they joined the queue: never under-counted

    def _abort(self, request_id: str) -> None:
        for r in list(self.scheduler.running) + list(self.scheduler.waiting):
            if r.request_id == request_id:
                self._finish(r, "abort")

    def step(self) -> None:
        """One turn of the step loop (engine thread only): schedule and launch a step, and complete
        the one before it (:class:`~loraserve.engine.stepper.Stepper`)."""
        self.stepper.step()

    def _deliver(self, r: Request, finished: bool) -> None:
        if r.sink is None:
            return
        try:
            r.sink(self.outputs.delta(r, finished=finished))
        except Exception:  # a consumer that went away (closed event loop) must not stop the engine
            logger.warning("could not deliver output of %s; dropping its sink", r.request_id, exc_info=True)
            r.sink = None

    def _finish(self, r: Request, reason: str) -> None:
        self.stepper.release_blocks(r)
        r.status, r.finish_reason, r.finish_time = Status.FINISHED, reason, time.perf_counter()
        if self.lora is not None:
            self.lora.release(r)
        self._deliver(r, finished=True)
        logger.debug(
            "request %s finished (%s): adapter %r, %d prompt and %d output tokens",
            r.request_id,
            reason,
            r.adapter,
            len(r.prompt_ids),
            len(r.output_ids),
        )
        self.plugins.notify(
            "loraserve_request_finished",
            request_id=r.request_id,
            adapter=r.adapter,
            prompt_tokens=len(r.prompt_ids),
            completion_tokens=len(r.output_ids),
            finish_reason=reason,
        )
