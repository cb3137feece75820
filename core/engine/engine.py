"""The engine: owns the settings, plugins, model, KV cache, scheduler and sampler, and runs steps.

Each ``Engine`` is self-contained (no module-level state), so tests build engines side by side.
One engine thread runs the step loop; other threads (the HTTP server's event loop, a test)
submit requests and aborts through a small inbox and receive :class:`RequestOutput` deltas
through each request's sink. :meth:`Engine.generate` is the blocking Python API,
:meth:`Engine.generate_async` and :meth:`Engine.stream` the asyncio ones.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from typing import Any, AsyncIterator, Callable, Sequence


from loraserve.engine.builder import build_components
from loraserve.errors import UserError
from loraserve.engine.intake import Intake
from loraserve.engine.outputs import OutputBuilder
from loraserve.plugin_manager import PluginManager
from loraserve.sched.request import Request, RequestOutput, Status
from loraserve.sched.sampling_params import SamplingParams, TokenHistory, make_generator
from loraserve.settings import Settings

logger = logging.getLogger("loraserve.engine.engine")

IDLE_POLL_S = 0.0005  # how often an idle engine looks at in-flight adapter copies


class Engine:
    """Builds and owns every part of a serving engine from :class:`Settings`."""

    def __init__(self, settings: Settings | None = None, plugins: PluginManager | None = None):
        self.settings = settings if settings is not None else Settings()
        self.plugins = plugins if plugins is not None else PluginManager(
            allow=self.settings.plugins, deny=self.settings.disable_plugin, trace=self.settings.trace_plugins)
        self.plugins.load()
        self.settings.check_supported()
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._inbox: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.step_count = 0
        #: steps run and their wall time (model, sampling, delivery), for steps that only decode
        #: and for steps with prefill tokens: ``{kind: [steps, seconds]}``
        self.step_stats: dict[str, list] = {"decode": [0, 0.0], "prefill": [0, 0.0]}
        #: tensor parallelism (--tp-size > 1): this process is rank 0 and drives the other ranks
        self.tp = None
        if self.settings.tp_size > 1:
            from loraserve.engine.tp import TPDriver, check_before_start, init_group

            check_before_start(self.settings, self.plugins)
            self.tp = TPDriver(self.settings)
            try:
                init_group(0, self.settings.tp_size, self.tp.port, self.settings.resolved_device())
            except BaseException:
                self.tp.shutdown(timeout=5)
                raise
        try:
            parts = build_components(self.settings, self.plugins, self.call_in_engine, tp_rank=0)
        except BaseException:
            self._stop_tp(timeout=5)
            raise
        if self.tp is not None:
            parts.runner.before_step = self.tp.send_step
            if parts.lora is not None:
                parts.lora.mirror = self.tp.mirror_lora
        self.device, self.dtype = parts.device, parts.dtype
        self.model, self.config, self.tokenizer = parts.model, parts.config, parts.tokenizer
        self.model_name, self.context_len = parts.model_name, parts.context_len
        self.kv, self.scheduler, self.runner, self.sampler = parts.kv, parts.scheduler, parts.runner, parts.sampler
        self.lora = parts.lora
        self.backend_name = parts.backend_name
        self.outputs = OutputBuilder(self.tokenizer, parts.eos_token_ids)
        #: prompt-size and queue bounds, and thread-safe tokenization
        self.intake = Intake(self.tokenizer, self.context_len, self.settings.max_queued_requests,
                             self.settings.max_prompt_chars)
        if self.lora is not None and self.settings.lora_paths:
            from tqdm.auto import tqdm

            specs = self.settings.lora_paths
            for spec in tqdm(specs, desc="loading adapters", unit="adapter", disable=len(specs) < 2):
                self.lora.load_adapter(spec.lora_name, spec.lora_path, pinned=spec.pinned, runtime=False)

    def effective_settings(self) -> dict[str, Any]:
        """The settings as this engine runs them: every ``auto``/unset input replaced by what was chosen
        (device, dtype, backends, KV-cache tokens, batch limits, LoRA limits); the API key redacted."""
        info = self.settings.model_dump(mode="json")
        if info.get("api_key"):
            info["api_key"] = "<set>"  # never echo the secret
        graphs = getattr(self.runner, "graphs", None)
        info.update(device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
                    attention_backend=self.settings.resolved_attention_backend(),
                    served_model_name=self.model_name, context_length=self.context_len,
                    max_total_tokens=self.kv.allocator.capacity_tokens,
                    max_prompt_chars=self.intake.max_prompt_chars,
                    max_running_requests=self.scheduler.max_running,
                    chunked_prefill_size=self.scheduler.chunk_size,
                    cuda_graph_max_bs=max(graphs.sizes) if graphs is not None else None,
                    disable_cuda_graph=graphs is None, enable_lora=self.lora is not None,
                    lora_backend=self.backend_name if self.lora is not None else None)
        if self.lora is not None:
            info.update(max_lora_rank=self.lora.max_rank, lora_target_modules=list(self.lora.target_modules),
                        max_loaded_loras=self.lora.host.capacity)
        return info

    # -- submitting work (any thread) -------------------------------------------------------------

    def make_request(self, prompt: str | None = None, input_ids: Sequence[int] | None = None,
                     params: SamplingParams | dict | None = None, lora: str | None = None,
                     request_id: str | None = None) -> Request:
        """Validate and tokenize one request (raises :class:`UserError`); does not submit it."""
        if isinstance(params, dict) or params is None:
            params = SamplingParams.from_dict(params or {})
        params.validate(vocab_size=self.model.vocab_size)
        if params.n != 1:
            raise UserError(f"n={params.n} is not supported yet; send n=1 (repeat the prompt for several samples)")
        if input_ids is None:
            if prompt is None:
                raise UserError("give either 'text' (a prompt) or 'input_ids'")
            if not isinstance(prompt, str):
                raise UserError(f"the prompt must be a string, got {type(prompt).__name__}")
            input_ids = self.intake.tokenize(prompt)  # TooLarge before tokenizing a huge prompt
        ids = list(input_ids)
        if not ids:
            raise UserError("the prompt is empty; send at least one token")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.model.vocab_size]
        if bad:
            raise UserError(f"input_ids contain {bad[0]!r}, outside the vocabulary [0, {self.model.vocab_size})")
        self._check_fits(len(ids), params.max_new_tokens)
        if lora is not None and self.lora is None:
            raise UserError(f"adapter {lora!r} requested but LoRA is not enabled; start with --enable-lora "
                            "or --lora-paths")
        rid = request_id or f"req-{next(self._ids)}"
        req = Request(request_id=rid, prompt_ids=ids, params=params, adapter=lora,
                      generator=make_generator(params.seed, self.device))
        if params.needs_penalties:
            req.history = TokenHistory(ids, self.model.vocab_size, device=self.device)
        return req

    def _check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len + max_new_tokens > self.context_len:
            raise UserError(f"the prompt has {prompt_len} tokens and max_new_tokens is {max_new_tokens}: together "
                            f"more than the model's context length of {self.context_len} tokens; shorten the "
                            "prompt or lower max_new_tokens")
        capacity = self.kv.allocator.capacity_tokens
        if prompt_len + max_new_tokens > capacity:
            raise UserError(f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) can never fit "
                            f"in the KV cache of {capacity} tokens; shorten the prompt, lower max_new_tokens or "
                            "start the server with a larger --max-total-tokens")

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
        """Abort a request (a client went away); its blocks are freed before the next step."""
        self._post(lambda: self._abort(request_id))

    def call_in_engine(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread between steps and return its result (or raise its
        exception). Runs inline when called from the engine thread or before the loop started."""
        if self._thread is None or threading.current_thread() is self._thread:
            return fn()
        done = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:
                box["error"] = exc
            finally:
                done.set()
        self._post(run)
        done.wait()
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def _post(self, fn: Callable[[], None]) -> None:
        with self._cond:
            if self._stopping:
                raise UserError("the engine is shutting down; no new requests are accepted")
            self._inbox.append(fn)
            self._cond.notify()
        self.start()

    # -- the Python API -----------------------------------------------------------------------------

    def generate(self, prompt: str | list[str] | None = None, sampling_params: dict | list | None = None,
                 lora_path: str | None | list[str | None] = None,
                 input_ids: list[int] | list[list[int]] | None = None) -> dict | list[dict]:
        """Generate for one prompt or a batch (SGLang's ``Engine.generate`` arguments); blocks."""
        requests, single = self._build_batch(prompt, sampling_params, lora_path, input_ids)
        done = threading.Event()
        remaining = [len(requests)]
        lock = threading.Lock()

        def sink(out: RequestOutput) -> None:
            if out.finished:
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()

        for r in requests:
            r.sink = sink
        self.submit(requests)
        done.wait()
        results = [self.outputs.final(r) for r in requests]
        return results[0] if single else results

    async def generate_async(self, prompt=None, sampling_params=None, lora_path=None, input_ids=None):
        """Like :meth:`generate`, awaiting instead of blocking."""
        requests, single = self._build_batch(prompt, sampling_params, lora_path, input_ids)
        async for _ in self.stream(requests=requests):
            pass
        results = [self.outputs.final(r) for r in requests]
        return results[0] if single else results

    async def stream(self, prompt=None, sampling_params=None, lora_path=None, input_ids=None,
                     requests: list[Request] | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yield ``(index, delta)`` pairs as tokens are produced; aborts the requests if the
        consumer stops early (a client disconnect)."""
        if requests is None:
            requests, _ = self._build_batch(prompt, sampling_params, lora_path, input_ids)
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        index = {r.request_id: i for i, r in enumerate(requests)}
        for r in requests:
            r.sink = lambda out, r=r: loop.call_soon_threadsafe(queue.put_nowait, (index[r.request_id], out))
        self.submit(requests)
        pending = len(requests)
        try:
            while pending:
                i, out = await queue.get()
                pending -= out.finished
                yield i, out
        finally:
            for r in requests:
                if not r.finished:
                    r.sink = None  # the consumer is gone: nothing to deliver the abort to
                    self.abort(r.request_id)

    def _build_batch(self, prompt, sampling_params, lora_path, input_ids) -> tuple[list[Request], bool]:
        if (prompt is None) == (input_ids is None):
            raise UserError("give exactly one of 'text' and 'input_ids'")
        single = isinstance(prompt, str) if prompt is not None else bool(input_ids) and isinstance(input_ids[0], int)
        items = [prompt] if isinstance(prompt, str) else prompt if prompt is not None else \
            [input_ids] if single else input_ids
        if not isinstance(items, list) or not items:
            raise UserError("'text' must be a string or a non-empty list of strings")
        n = len(items)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * n
        loras = lora_path if isinstance(lora_path, list) else [lora_path] * n
        if len(params) != n or len(loras) != n:
            raise UserError(f"the batch has {n} inputs but {len(params)} sampling_params and {len(loras)} "
                            "lora_path entries; give one of each per input, or a single value for all")
        requests = []
        for item, p, lora in zip(items, params, loras):
            if prompt is not None:
                requests.append(self.make_request(prompt=item, params=p, lora=lora))
            else:
                requests.append(self.make_request(input_ids=item, params=p, lora=lora))
        return requests, single

    # -- the engine thread --------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._loop, name="loraserve-engine", daemon=True)
                self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop: running requests are aborted (they get an 'abort' finish)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
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

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._inbox and not self.scheduler.has_work() and not self._stopping:
                    self._cond.wait()
                inbox, self._inbox = self._inbox, []
                stopping = self._stopping
            for fn in inbox:
                try:
                    fn()
                except Exception:  # the loop must survive anything a queued call does
                    logger.exception("engine inbox call failed")
            if stopping:
                for r in list(self.scheduler.running) + list(self.scheduler.waiting):
                    self._finish(r, "abort")
                return
            if self.scheduler.has_work():
                try:
                    self.step()
                except Exception as exc:  # scheduling itself failed: fail everything rather than spin
                    logger.exception("scheduling failed; every queued request is finished with an error")
                    for r in list(self.scheduler.running) + list(self.scheduler.waiting):
                        r.error = f"{type(exc).__name__}: {exc}"
                        self._finish(r, "error")

    def _admit(self, requests: list[Request]) -> None:
        try:
            for r in requests:
                self._add(r)
        finally:
            self.intake.release(len(requests))  # after they joined the queue: never under-counted

    def _add(self, request: Request) -> None:
        if request.params.max_new_tokens == 0:  # nothing to generate: done without touching the model
            self._finish(request, "length")
            return
        self.scheduler.add(request)

    def _abort(self, request_id: str) -> None:
        for r in list(self.scheduler.running) + list(self.scheduler.waiting):
            if r.request_id == request_id:
                self._finish(r, "abort")

    def step(self) -> None:
        """Schedule, run the model, sample, and deliver outputs (engine thread only)."""
        if self.lora is not None:
            self.lora.before_schedule()
        plan = self.scheduler.schedule()
        if not plan:
            if self.lora is not None and self.lora.copies_in_flight:
                time.sleep(IDLE_POLL_S)  # nothing can run until a copy lands: poll it without spinning
            return
        self.step_count += 1
        kind = "decode" if all(c.num_tokens == 1 for c in plan) else "prefill"
        started = time.perf_counter()
        try:
            logits = self.runner.forward(plan)
            sampling = [c.request for c in plan if c.samples]
            for c in plan:
                c.request.num_computed += c.num_tokens
            if sampling:
                result = self.sampler.sample(logits, [r.params for r in sampling],
                                             [r.history for r in sampling], [r.generator for r in sampling])
                for i, r in enumerate(sampling):
                    self._append_token(r, result, i)
            stats = self.step_stats[kind]
            stats[0] += 1
            stats[1] += time.perf_counter() - started
        except Exception as exc:  # never let one bad step kill the loop: fail its requests
            logger.exception("step failed; its requests are finished with an error")
            for c in plan:
                if not c.request.finished:
                    c.request.error = f"{type(exc).__name__}: {exc}"
                    self._finish(c.request, "error")

    def _append_token(self, r: Request, result: Any, i: int) -> None:
        token = int(result.token_ids[i])
        r.output_ids.append(token)
        if r.history is not None:
            r.history.append(token)
        if r.params.return_logprob or r.params.top_logprobs_num:
            r.logprobs.append(float(result.logprobs[i]))
            if r.params.top_logprobs_num:
                r.top_logprobs.append(result.top_logprobs[i])
        if r.first_token_time is None:
            r.first_token_time = time.perf_counter()
        reason = self.outputs.advance(r, token, self.context_len)
        if reason is not None:
            self._finish(r, reason)
        else:
            self._deliver(r, finished=False)

    def _deliver(self, r: Request, finished: bool) -> None:
        if r.sink is None:
            return
        try:
            r.sink(self.outputs.delta(r, finished=finished))
        except Exception:  # a consumer that went away (closed event loop) must not stop the engine
            logger.warning("could not deliver output of %s; dropping its sink", r.request_id, exc_info=True)
            r.sink = None

    def _finish(self, r: Request, reason: str) -> None:
        self.scheduler.remove(r)
        r.status, r.finish_reason, r.finish_time = Status.FINISHED, reason, time.perf_counter()
        if self.lora is not None:
            self.lora.release(r)
        self._deliver(r, finished=True)
        logger.debug("request %s finished (%s): adapter %r, %d prompt and %d output tokens", r.request_id, reason,
                     r.adapter, len(r.prompt_ids), len(r.output_ids))
        self.plugins.notify("loraserve_request_finished", request_id=r.request_id, adapter=r.adapter,
                            prompt_tokens=len(r.prompt_ids), completion_tokens=len(r.output_ids),
                            finish_reason=reason)
