"""The continuous-batching scheduler: which requests run in the next step, and how many tokens each.

Every step has a token budget. Running requests that decode (one pending token) go first; then
requests part-way through a chunked prefill; then waiting requests join in arrival order while the
budget, the KV cache and ``max_running`` allow. A long prompt is cut into chunks of at most
``chunk_size`` tokens. When a decode needs a new KV block and none is free, the most recently
admitted request is preempted (its blocks freed, recomputed later). Admission stops at the first
waiting request that does not fit in the KV cache, so a large request is not starved by small ones
behind it; a request refused for want of an adapter slot may be overtaken for a few steps only.
A request whose adapter is still being copied to the GPU (``can_join`` answers :data:`COPYING`)
is overtaken without limit: the copy finishes on its own, so nobody needs to stop for it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from loraserve.sched.kv_cache import KVCache, OutOfBlocks
from loraserve.sched.request import Request, Status

#: ``can_join``'s answer for "not yet: its adapter is being copied into a GPU slot"
COPYING = "copying"


@dataclass
class ScheduledChunk:
    request: Request
    start: int  # first token position fed this step (== request.num_computed)
    num_tokens: int
    #: the request's row in the KV cache's device block table (-1: none, e.g. a tensor-parallel
    #: worker's stand-in request; the attention then reads the host block list)
    table_row: int = -1

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the known tokens, so a new token is sampled."""
        return self.start + self.num_tokens == self.request.num_tokens


class Scheduler:
    """Owns the waiting queue and the running set; allocates and frees KV blocks for them.

    :param can_join: optional ``can_join(request, step_requests)`` consulted before a waiting
        request joins a step (the LoRA manager uses it to respect adapter slots): True to admit,
        :data:`COPYING` to skip it for now, anything else to refuse it.
    :param on_preempt: optional callback when a running request is preempted.
    :param starvation_steps: how many steps a waiting request refused by ``can_join`` may be
        overtaken by later requests; after that, admission stops until it can join.
    """

    def __init__(
        self,
        kv: KVCache,
        max_running: int,
        step_tokens: int,
        chunk_size: int,
        can_join: Callable[[Request, list[Request]], bool] | None = None,
        on_preempt: Callable[[Request], None] | None = None,
        starvation_steps: int = 8,
    ):
        self.kv = kv
        self.max_running = max_running
        self.step_tokens = step_tokens
        self.chunk_size = chunk_size
        self.can_join = can_join
        self.on_preempt = on_preempt
        self.starvation_steps = starvation_steps
        self.waiting: deque[Request] = deque()
        #: running requests in admission order (a dict as an ordered set: joining, finishing and
        #: preempting are O(1), and membership is the request's ``status``)
        self.running: dict[Request, None] = {}

    # -- queue management -------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        request.status = Status.WAITING
        self.waiting.append(request)

    def remove(self, request: Request, free_blocks: bool = True) -> None:
        """Take a request out of the queues and free its blocks (finish, abort or error). With
        ``free_blocks=False`` it keeps them until :meth:`free_blocks` (a launched step may still
        read them)."""
        if request in self.running:  # a dict: O(1)
            del self.running[request]
        elif request.status is Status.WAITING and request in self.waiting:
            self.waiting.remove(request)  # an abort before it ran: O(waiting), off the decode path
        if free_blocks:
            self._free_blocks(request)

    def free_blocks(self, request: Request) -> None:
        """Free the blocks of a request :meth:`remove` kept."""
        self._free_blocks(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- scheduling --------------------------------------------------------------------------------

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.step_tokens
        plan: list[ScheduledChunk] = []
        # 1. decodes, in admission order; preempt from the back when blocks run out
        planned: set[int] = set()
        for req in list(self.running):
            if req.status is not Status.RUNNING or req.num_pending != 1 or req.final_token_pending or budget < 1:
                continue  # (preempted earlier in this loop, not decoding, or its last token is pending)
            if not self._reserve(req, req.num_computed + 1, preempt_from=planned):
                continue
            plan.append(ScheduledChunk(req, req.num_computed, 1, req.table_row))
            planned.add(id(req))
            budget -= 1
        # 2. running requests in the middle of a chunked prefill
        for req in list(self.running):
            if req.num_pending <= 1 or budget < 1:
                continue
            n = min(req.num_pending, budget, self.chunk_size)
            if self._reserve(req, req.num_computed + n):
                plan.append(ScheduledChunk(req, req.num_computed, n, req.table_row))
                budget -= n
        # 3. waiting requests join in arrival order; one whose adapter cannot get a slot now is
        #    skipped, until it has waited starvation_steps steps: then nobody overtakes it
        skipped: list[Request] = []
        in_step = [c.request for c in plan]  # grown as requests join: can_join reads it, never rebuilt
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            req = self.waiting[0]
            verdict = True if self.can_join is None else self.can_join(req, in_step)
            if verdict is not True:
                if verdict != COPYING:
                    req.join_refusals += 1
                    if req.join_refusals >= self.starvation_steps:
                        break
                skipped.append(self.waiting.popleft())
                continue
            n = min(req.num_pending, budget, self.chunk_size)
            if not self._reserve(req, req.num_computed + n):
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running[req] = None
            plan.append(ScheduledChunk(req, req.num_computed, n, req.table_row))
            in_step.append(req)
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return plan

    def _reserve(self, req: Request, num_tokens: int, preempt_from: set[int] | None = None) -> bool:
        """Make ``req`` own enough blocks for ``num_tokens`` tokens.

        With ``preempt_from`` (ids of requests already planned this step, which are never
        preempted), the most recently admitted unplanned running request is preempted until the
        blocks are free; that may be ``req`` itself, and then False is returned.
        """
        need = self.kv.allocator.blocks_for(num_tokens) - len(req.blocks)
        while need > 0:
            try:
                self._gain(req, self.kv.allocator.allocate(need, owner=req))
                return True
            except OutOfBlocks:
                if preempt_from is None:
                    return False
                victim = next(r for r in reversed(self.running) if id(r) not in preempt_from)
                self._preempt(victim)
                if victim is req:
                    return False
        return True

    def _preempt(self, req: Request) -> None:
        del self.running[req]
        self._free_blocks(req)
        req.num_computed = 0
        req.num_preemptions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        if self.on_preempt is not None:
            self.on_preempt(req)

    def _gain(self, req: Request, new: list[int]) -> None:
        """Give ``req`` the blocks ``new``: its host list and its device block-table row (only the
        new entries are written, at the attention's next flush)."""
        table = self.kv.block_table
        if req.table_row < 0:
            req.table_row = table.acquire()
        table.append(req.table_row, new)
        req.blocks.extend(new)

    def _free_blocks(self, req: Request) -> None:
        if req.blocks:
            self.kv.allocator.free(req.blocks, owner=req)
            req.blocks = []
        if req.table_row >= 0:
            self.kv.block_table.release(req.table_row)
            req.table_row = -1

    def check_integrity(self, holding: Iterable[Request] = ()) -> None:
        """Raise unless every KV block is free or owned once and the device block table holds
        exactly the block lists of the running requests, plus ``holding`` (requests that keep their
        blocks outside the queues, e.g. finished while a launched step may read them). For tests."""
        self.kv.allocator.check_integrity()
        candidates = dict.fromkeys((*self.running, *self.waiting, *holding))  # each request once
        holders = [r for r in candidates if r.table_row >= 0 or r.blocks]
        self.kv.block_table.check_integrity((r.table_row, r.blocks) for r in holders)
