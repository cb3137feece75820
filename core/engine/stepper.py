"""One engine step, overlapped: schedule and launch step N, then read step N-1's tokens while the
GPU runs step N.

:meth:`Stepper.step` is what the engine thread calls while there is work:

1. the LoRA manager's pre-schedule work, then the scheduler's plan for step N;
2. *launch* step N: the model runner enqueues the forward pass (input tokens of step N-1 that the
   host has not read are placeholders it resolves on the device), the sampler enqueues sampling,
   the sampled tokens go to the device ring (:class:`~loraserve.engine.overlap.FutureTokens`) and
   one asynchronous copy to the host starts;
3. *complete* step N-1: wait for its copy (by now the GPU is on step N), then per request record
   the token, detokenize, check stop conditions, deliver, finish.

A request whose stop condition shows up in step N-1's tokens has already been launched in step N:
that token is dropped (nothing past a stop is delivered) and its KV blocks are freed only after
step N completed. A request whose last token by length is pending runs no further step.
With overlap off (``--disable-overlap-schedule``) step N completes before step N+1 is scheduled:
the same code with the completion moved up. With tensor parallelism and overlap, ``share_tokens``
hands every step's sampled tokens to the other ranks (a broadcast on the device), whose own rings
resolve the same placeholders.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from loraserve.engine.outputs import OutputBuilder
from loraserve.engine.overlap import FutureTokens, LaunchedStep, TokenReadback
from loraserve.sched.request import Request, Status

logger = logging.getLogger("loraserve.engine.engine")

IDLE_POLL_S = 0.0005  # how often an idle engine looks at in-flight adapter copies


class Stepper:
    """Runs engine steps over the given parts (see the module docstring).

    :param finish: ``finish(request, reason)``, the engine's way to end a request (deliver, release,
        notify); it calls :meth:`release_blocks` for the blocks.
    :param deliver: ``deliver(request)`` hands a request's new output to its consumer.
    :param overlap: launch step N+1 before reading step N's tokens.
    :param share_tokens: tensor parallelism with overlap: ``share_tokens(tokens)`` after each step
        that samples (int64, on the device), which the other ranks' rings need; called exactly once
        per such step, also when the step failed after its forward pass (then with zeros), so every
        rank runs the same collectives.
    """

    def __init__(
        self,
        scheduler: Any,
        runner: Any,
        sampler: Any,
        outputs: OutputBuilder,
        lora: Any,
        device: torch.device,
        context_len: int,
        finish: Callable[[Request, str], None],
        deliver: Callable[[Request], None],
        overlap: bool,
        share_tokens: Callable[[torch.Tensor], None] | None = None,
    ):
        self.scheduler, self.runner, self.sampler, self.outputs, self.lora = scheduler, runner, sampler, outputs, lora
        self.device, self.context_len = device, context_len
        self.finish, self.deliver, self.overlap = finish, deliver, overlap
        self.share_tokens = share_tokens
        rows = max(1, scheduler.max_running)
        self.future = FutureTokens(4 * rows + 64, device)
        self.readback = TokenReadback(rows, device)
        self.in_flight: LaunchedStep | None = None
        self.step_count = 0
        #: steps and their wall time (one loop turn: launch this step, complete the previous one),
        #: for steps that only decode and for steps with prefill tokens: ``{kind: [steps, seconds]}``
        self.step_stats: dict[str, list] = {"decode": [0, 0.0], "prefill": [0, 0.0]}
        #: host and GPU time of those steps: ``{kind: [host_s, gpu_s, gpu_steps]}``. Host time is the
        #: loop turn minus the time spent waiting for the device; GPU time is measured with CUDA
        #: events around the step's forward pass and sampling (CUDA only).
        self.step_timing: dict[str, list] = {"decode": [0.0, 0.0, 0], "prefill": [0.0, 0.0, 0]}
        self._timed = device.type == "cuda"

    def has_work(self) -> bool:
        return self.in_flight is not None or self.scheduler.has_work()

    def step(self) -> None:
        """One loop turn (engine thread only)."""
        started = time.perf_counter()
        if self.lora is not None:
            self.lora.before_schedule(fail=self._fail_one)
        plan = self.scheduler.schedule()
        launched = self._launch(plan, started) if plan else None
        previous, self.in_flight = self.in_flight, launched
        waited = 0.0
        if previous is not None:
            waited += self._complete(previous)
        if launched is not None and not self.overlap:
            self.in_flight = None
            waited += self._complete(launched)
        if launched is not None:
            elapsed = time.perf_counter() - started
            stats = self.step_stats[launched.kind]
            stats[0] += 1
            stats[1] += elapsed
            self.step_timing[launched.kind][0] += elapsed - waited
        elif previous is None and self.lora is not None and self.lora.copies_in_flight:
            time.sleep(IDLE_POLL_S)  # nothing can run until a copy lands: poll it without spinning

    def drain(self) -> None:
        """Complete the step in flight, if any (before the engine stops or fails everything)."""
        previous, self.in_flight = self.in_flight, None
        if previous is not None:
            self._complete(previous)

    def release_blocks(self, r: Request) -> None:
        """Take a finished request out of the scheduler; its KV blocks are freed now, or once the
        step in flight that may still read them completed."""
        in_flight = self.in_flight is not None and r.last_step == self.in_flight.number
        self.scheduler.remove(r, free_blocks=not in_flight)
        if in_flight:
            self.in_flight.free_after.append(r)
        r.pending.clear()

    # -- launch: everything up to the asynchronous copy of the sampled tokens ----------------------

    def _launch(self, plan: list, started: float) -> LaunchedStep | None:
        self.step_count += 1
        kind = "decode" if all(c.num_tokens == 1 for c in plan) else "prefill"
        sampled = [c.request for c in plan if c.samples]
        step = LaunchedStep(self.step_count, kind, plan, sampled, started)
        forwarded = False
        try:
            if self._timed:
                step.gpu_events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                step.gpu_events[0].record()
            logits = self.runner.forward(plan, resolve=self.future.resolve)
            forwarded = True
            for c in plan:
                c.request.num_computed += c.num_tokens
                c.request.last_step = step.number
            if sampled:
                self._sample(step, logits)
            if step.gpu_events is not None:
                step.gpu_events[1].record()
        except Exception as exc:  # never let one bad step kill the loop: fail its requests
            logger.exception("step failed; its requests are finished with an error")
            if forwarded and sampled and self.share_tokens is not None and not step.shared:
                self.share_tokens(torch.zeros(len(sampled), dtype=torch.long, device=self.device))
            self._fail([c.request for c in plan], exc)
            return None
        return step

    def _sample(self, step: LaunchedStep, logits: torch.Tensor) -> None:
        sampled = step.sampled
        result = self.sampler.sample(
            logits, [r.params for r in sampled], [r.history for r in sampled], [r.generator for r in sampled]
        )
        tokens = result.token_ids
        if self.share_tokens is not None:
            tokens = tokens.long().contiguous()
            self.share_tokens(tokens)
            step.shared = True
        for i, r in enumerate(sampled):
            if r.history is not None:  # penalties read it next step: update it on the device
                r.history.add_device(tokens[i : i + 1])
        placeholders = self.future.put(tokens)
        for r, p in zip(sampled, placeholders):
            r.pending.append(p)
            n_out = len(r.output_ids) + len(r.pending)
            if n_out >= r.params.max_new_tokens or r.num_tokens >= self.context_len:
                r.final_token_pending = True
        if any(t is not None for t in result.top_logprobs):
            step.top_logprobs = result.top_logprobs
        step.readback = self.readback.start(tokens, result.logprobs)

    # -- complete: read the tokens, then detokenize, stop, deliver ---------------------------------

    def _complete(self, step: LaunchedStep) -> float:
        """Read ``step``'s tokens and hand them on; returns the seconds spent waiting for them."""
        waited = 0.0
        try:
            if step.readback is not None:
                t0 = time.perf_counter()
                tokens, logprobs = step.readback.wait()
                waited = time.perf_counter() - t0
                for i, r in enumerate(step.sampled):
                    if r.finished or not r.pending:  # ended while the step ran: its token is dropped
                        continue
                    r.pending.pop(0)
                    if not r.pending:
                        r.final_token_pending = False
                    top = step.top_logprobs[i] if step.top_logprobs is not None else None
                    lp = logprobs[i] if logprobs is not None else None
                    reason = self.outputs.append(r, tokens[i], lp, top, self.context_len)
                    if reason is not None:
                        self.finish(r, reason)
                    else:
                        self.deliver(r)
        except Exception as exc:
            logger.exception("reading a step's outputs failed; its requests are finished with an error")
            self._fail(step.sampled, exc)
        finally:
            if step.gpu_events is not None and (step.readback is not None or step.free_after):
                step.gpu_events[1].synchronize()  # (done already when its tokens were read)
                self._record_gpu_time(step)
            for r in step.free_after:
                self.scheduler.free_blocks(r)
            step.free_after.clear()
        return waited

    def _record_gpu_time(self, step: LaunchedStep) -> None:
        if step.gpu_events is None:
            return
        timing = self.step_timing[step.kind]
        timing[1] += step.gpu_events[0].elapsed_time(step.gpu_events[1]) / 1e3
        timing[2] += 1

    def _fail_one(self, r: Request, message: str, status: int) -> None:
        """Finish one waiting request with an error that is not the engine's fault (HTTP ``status``)."""
        r.error, r.error_status = message, status
        self.finish(r, "error")

    def _fail(self, requests: list[Request], exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, torch.OutOfMemoryError):
            message = (
                "the step ran out of GPU memory; lower --chunked-prefill-size, --max-running-requests or "
                f"--mem-fraction-static ({message})"
            )
        for r in requests:
            if r.status is not Status.FINISHED:
                r.error = message
                self.finish(r, "error")
        self.scheduler.flush_prefix_cache()  # blocks the step wrote may hold wrong keys and values
