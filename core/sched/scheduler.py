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

With a prefix cache (:mod:`loraserve.sched.prefix_cache`), a request that joins first takes the
longest cached prefix computed under its adapter identity and computes only the rest; its blocks are
cached as they fill. While at most ``lpm_queue_limit`` requests wait, those with longer cached
prefixes join first (SGLang's longest-prefix-match); a request that has waited ``lpm_patience``
steps is no longer overtaken.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from loraserve.sched.kv_cache import KVCache, OutOfBlocks
from loraserve.sched.prefix_cache import PrefixOwner
from loraserve.sched.request import Request, Status

#: ``can_join``'s answer for "not yet: its adapter is being copied into a GPU slot"
COPYING = "copying"


@dataclass
class ScheduledChunk:
    request: Request
    start: int  # first token position fed this step (== request.num_computed)
    num_tokens: int
    #: the request's row in the KV cache's device block table (-1: none, e.g. a warm-up step's
    #: scratch sequence; the attention then reads the host block list)
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
        lpm_queue_limit: int = 128,
        lpm_patience: int = 64,
    ):
        self.kv = kv
        self.max_running = max_running
        self.step_tokens = step_tokens
        self.chunk_size = chunk_size
        self.can_join = can_join
        self.on_preempt = on_preempt
        self.starvation_steps = starvation_steps
        self.prefix_cache = kv.allocator.prefix_cache
        self.lpm_queue_limit = lpm_queue_limit
        self.lpm_patience = lpm_patience
        self.num_steps = 0  # schedule() calls, the clock of lpm_patience
        self.waiting: deque[Request] = deque()
        #: running requests in admission order (a dict as an ordered set: joining, finishing and
        #: preempting are O(1), and membership is the request's ``status``)
        self.running: dict[Request, None] = {}

    # -- queue management -------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        request.status = Status.WAITING
        request.enqueued_step = self.num_steps
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
        plan: list[ScheduledChunk] = []
        budget = self._plan_running(plan, self.step_tokens)
        self._admit_waiting(plan, budget)
        if self.prefix_cache is not None:
            bs = self.kv.block_size
            for c in plan:  # (most decode chunks fill no block: checked inline, per-step cost)
                r = c.request
                upto = min(c.start + c.num_tokens, r.num_read)
                if upto // bs > r.num_cached_blocks:
                    self._cache_blocks(r, upto)
        self.num_steps += 1
        return plan

    def _plan_running(self, plan: list[ScheduledChunk], budget: int) -> int:
        """Plan the running requests' chunks; returns the token budget left."""
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
        return budget

    def _admit_waiting(self, plan: list[ScheduledChunk], budget: int) -> None:
        """3. Waiting requests join in arrival order (longest cached prefix first while few wait); one
        whose adapter cannot get a slot now is skipped, until it has waited starvation_steps steps:
        then nobody overtakes it. One whose next block another request of this step computes waits."""
        skipped: list[Request] = []
        in_step = [c.request for c in plan]  # grown as requests join: can_join reads it, never rebuilt
        computing: set | None = None  # blocks this step computes that are not cached yet
        if budget > 0 and len(self.running) < self.max_running and self.prefix_cache is not None and self.waiting:
            if 1 < len(self.waiting) <= self.lpm_queue_limit:
                self._longest_prefix_first()
            computing = {self._block_in_progress(c.request, c.start) for c in plan if c.num_tokens > 1}
            computing.discard(None)
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
            matched = self._take_cached_prefix(req)
            block = self._block_in_progress(req, req.num_computed) if computing else None
            wait = block is not None and block in computing  # computed this step: found cached next step
            n = min(req.num_pending, budget, self.chunk_size)
            if wait or not self._reserve(req, req.num_computed + n):
                if matched:
                    self._free_blocks(req)  # the prefix it found waits in the cache again
                    req.num_computed = 0
                if not wait:
                    break
                skipped.append(self.waiting.popleft())
                continue
            self.waiting.popleft()
            self._join(req)
            plan.append(ScheduledChunk(req, req.num_computed, n, req.table_row))
            in_step.append(req)
            budget -= n
            if computing is not None:
                block = self._block_in_progress(req, req.num_computed)
                if block is not None:
                    computing.add(block)
        self.waiting.extendleft(reversed(skipped))

    def _join(self, req: Request) -> None:
        if self.prefix_cache is not None:  # counted once it joins (a refused join retries)
            self.prefix_cache.count_hit(req.num_read, req.num_computed)
            if req.cached_tokens is None:
                req.cached_tokens = req.num_computed
            req.prefix_keys = None
        req.status = Status.RUNNING
        self.running[req] = None

    # -- the prefix cache --------------------------------------------------------------------------

    def _longest_prefix_first(self) -> None:
        """Reorder the waiting queue: requests past ``lpm_patience`` steps first, in queue order, then
        the others by cached prefix length (longest first; ties keep queue order)."""
        due_before = self.num_steps - self.lpm_patience
        order = sorted(
            self.waiting,
            key=lambda r: (0, 0) if r.enqueued_step <= due_before else (1, -self._cached_blocks(r)),
        )
        self.waiting = deque(order)

    def _prefix_keys(self, req: Request) -> list:
        """Block keys of ``req``'s known tokens that a cached prefix may cover (one token stays to be
        computed, so a step samples), built once per length."""
        limit = min(req.num_read, req.num_tokens - 1) // self.kv.block_size
        if req.prefix_keys is None or len(req.prefix_keys) != limit:
            req.prefix_keys = self.prefix_cache.block_keys(req.token_slice(0, limit * self.kv.block_size), limit)
        return req.prefix_keys

    def _cached_blocks(self, req: Request) -> int:
        if req.blocks or req.num_computed:
            return 0
        return len(self.prefix_cache.match(PrefixOwner.of(req.adapter_ref), self._prefix_keys(req), touch=False))

    def _take_cached_prefix(self, req: Request) -> bool:
        """Give a joining request the longest cached prefix of its tokens under its adapter identity;
        True when it found one."""
        if self.prefix_cache is None or req.blocks or req.num_computed:
            return False
        req.prefix_owner = PrefixOwner.of(req.adapter_ref)
        req.prefix_node, req.num_cached_blocks, req.prefix_cache_off = None, 0, False
        nodes = self.prefix_cache.match(req.prefix_owner, self._prefix_keys(req))
        if not nodes:
            return False
        blocks = [n.block for n in nodes]
        self.kv.allocator.share(blocks)
        self._gain(req, blocks)
        req.num_computed = len(nodes) * self.kv.block_size
        req.prefix_node, req.num_cached_blocks = nodes[-1], len(nodes)
        return True

    def _block_in_progress(self, req: Request, start: int) -> tuple | None:
        """``(owner, parent node, tokens)`` of the uncached full block a chunk starting at ``start``
        computes, if it will be cached: equal for two requests exactly when they compute the same
        keys and values. A request that would compute a block another request of the same step
        computes waits a step instead (SGLang's in-batch prefix check), then finds it cached."""
        bs = self.kv.block_size
        index = start // bs
        if req.prefix_cache_off or req.prefix_owner is None or index != req.num_cached_blocks:
            return None
        if (index + 1) * bs > req.num_read:
            return None
        return (req.prefix_owner, req.prefix_node, tuple(req.token_slice(index * bs, (index + 1) * bs)))

    def _cache_blocks(self, req: Request, upto: int) -> None:
        """Cache ``req``'s blocks that are full of known tokens up to position ``upto`` (their keys and
        values written by a launched step)."""
        bs = self.kv.block_size
        first, last = req.num_cached_blocks, min(upto // bs, len(req.blocks))
        if last <= first or req.prefix_cache_off or req.prefix_owner is None:
            return
        if req.prefix_node is not None and not self.prefix_cache.is_attached(req.prefix_node):
            req.prefix_cache_off = True  # its prefix was evicted or flushed: later blocks cannot hang from it
            return
        tokens = req.token_slice(first * bs, last * bs)
        node = req.prefix_node
        for i in range(first, last):
            key = tuple(tokens[(i - first) * bs : (i - first + 1) * bs])
            node = self.prefix_cache.insert(req.prefix_owner, node, key, req.blocks[i])
        req.prefix_node, req.num_cached_blocks = node, last

    def flush_prefix_cache(self) -> int:
        """Forget every cached prefix (POST /flush_cache, or after a failed step whose blocks may hold
        wrong keys and values); blocks requests hold stay theirs, uncached. Returns how many blocks
        were cached."""
        if self.prefix_cache is None:
            return 0
        cached = self.prefix_cache.num_cached
        self.kv.allocator.flush_cache()
        for r in (*self.running, *self.waiting):
            r.prefix_cache_off = True
        return cached

    def _reserve(self, req: Request, num_tokens: int, preempt_from: set[int] | None = None) -> bool:
        """Make ``req`` own enough blocks for ``num_tokens`` tokens.

        With ``preempt_from`` (ids of requests already planned this step, which are never
        preempted), the most recently admitted unplanned running request is preempted until the
        blocks are free; that may be ``req`` itself, and then False is returned.
        """
        need = self.kv.allocator.blocks_for(num_tokens) - len(req.blocks)
        while need > 0:
            try:
                self._gain(req, self.kv.allocator.allocate(need))
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
        self._free_blocks(req)  # (its computed full blocks stay cached: its recompute finds them)
        req.enqueued_step = -self.lpm_patience  # due: nobody overtakes it
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
            if self.prefix_cache is not None and req.error is None:
                self._cache_blocks(req, min(req.num_computed, req.num_read))
            self.kv.allocator.release(req.blocks)
            req.blocks = []
        req.prefix_node, req.num_cached_blocks = None, 0
        if req.table_row >= 0:
            self.kv.block_table.release(req.table_row)
            req.table_row = -1

    def check_integrity(self, holding: Iterable[Request] = ()) -> None:
        """Raise unless every KV block is free, cached or held, each held block's count equals the
        requests holding it, the prefix cache is consistent, and the device block table holds
        exactly the block lists of the running requests, plus ``holding`` (requests that keep their
        blocks outside the queues, e.g. finished while a launched step may read them). For tests."""
        candidates = dict.fromkeys((*self.running, *self.waiting, *holding))  # each request once
        holders = [r for r in candidates if r.table_row >= 0 or r.blocks]
        self.kv.allocator.check_integrity(r.blocks for r in holders)
        self.kv.block_table.check_integrity((r.table_row, r.blocks) for r in holders)
