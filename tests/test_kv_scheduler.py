"""KV block allocator and scheduler: allocation, freeing, exhaustion, preemption, chunking, integrity
after random workloads."""

from __future__ import annotations

import random

import pytest
import torch

from loraserve.sched.kv_cache import BlockAllocator, KVCache, OutOfBlocks
from loraserve.sched.request import Request
from loraserve.sched.scheduler import Scheduler


class _Params:
    max_new_tokens = 4


def make_kv(num_blocks=8, block_size=4):
    return KVCache(
        num_layers=1,
        num_kv_heads=1,
        head_dim=2,
        num_blocks=num_blocks,
        block_size=block_size,
        dtype=torch.float32,
        device="cpu",
    )


def req(rid, n_prompt):
    return Request(request_id=rid, prompt_ids=list(range(1, n_prompt + 1)), params=_Params())


def test_allocate_free_exhaust():
    alloc = BlockAllocator(4, 16)
    blocks_a = alloc.allocate(3)
    assert len(set(blocks_a)) == 3 and alloc.num_free == 1
    with pytest.raises(OutOfBlocks):
        alloc.allocate(2)
    assert alloc.num_free == 1  # a failed allocation takes nothing
    with pytest.raises(RuntimeError, match="shared while neither held nor cached"):
        alloc.share([next(b for b in range(4) if b not in blocks_a)])
    alloc.check_integrity([blocks_a])
    with pytest.raises(RuntimeError, match="holder count"):
        alloc.check_integrity([blocks_a, blocks_a[:1]])
    alloc.release(blocks_a)
    with pytest.raises(RuntimeError, match="released more often"):
        alloc.release(blocks_a[:1])
    assert alloc.num_free == 4
    alloc.check_integrity([])
    assert alloc.blocks_for(1) == 1 and alloc.blocks_for(16) == 1 and alloc.blocks_for(17) == 2


def test_integrity_check_catches_corruption():
    alloc = BlockAllocator(4, 2)
    blocks = alloc.allocate(2)
    alloc._free.append(blocks[0])  # simulate a double free
    with pytest.raises(RuntimeError):
        alloc.check_integrity()


def test_slots_follow_the_block_table():
    kv = make_kv(num_blocks=8, block_size=4)
    assert kv.slots([5, 2, 7], 0, 10).tolist() == [20, 21, 22, 23, 8, 9, 10, 11, 28, 29]
    assert kv.slots([5, 2, 7], 6, 9).tolist() == [10, 11, 28]


def test_chunked_prefill_and_decode_order():
    kv = make_kv(num_blocks=16, block_size=4)
    sched = Scheduler(kv, max_running=8, step_tokens=10, chunk_size=6)
    long, short = req("long", 14), req("short", 3)
    sched.add(long)
    sched.add(short)
    plan = sched.schedule()
    assert [(c.request.request_id, c.num_tokens, c.samples) for c in plan] == [("long", 6, False), ("short", 3, True)]
    for c in plan:
        c.request.num_computed += c.num_tokens
    short.output_ids.append(7)  # sampled
    plan = sched.schedule()
    # the decode goes first, then the next chunk of the long prompt
    assert [(c.request.request_id, c.start, c.num_tokens) for c in plan] == [("short", 3, 1), ("long", 6, 6)]


def test_waiting_request_that_does_not_fit_blocks_the_queue_head():
    kv = make_kv(num_blocks=4, block_size=4)
    sched = Scheduler(kv, max_running=8, step_tokens=64, chunk_size=64)
    big, small = req("big", 20), req("small", 2)
    first = req("first", 8)
    sched.add(first)
    sched.add(big)
    sched.add(small)
    plan = sched.schedule()
    # big needs 5 blocks; only 2 are left; small must not overtake it (no starvation of big)
    assert [c.request.request_id for c in plan] == ["first"]


def test_decode_preempts_the_latest_request_when_blocks_run_out():
    kv = make_kv(num_blocks=2, block_size=2)
    sched = Scheduler(kv, max_running=8, step_tokens=64, chunk_size=64)
    a, b = req("a", 2), req("b", 2)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert [c.request.request_id for c in plan] == ["a", "b"]
    for c in plan:
        c.request.num_computed += c.num_tokens
        c.request.output_ids.append(1)
    plan = sched.schedule()  # a needs a third block: b is preempted and goes back to the queue head
    assert [c.request.request_id for c in plan] == ["a"]
    assert b.num_computed == 0 and b.blocks == [] and sched.waiting[0] is b and b.num_preemptions == 1
    kv.allocator.check_integrity()


def test_random_workload_keeps_the_pool_consistent():
    rng = random.Random(0)
    kv = make_kv(num_blocks=24, block_size=4)
    sched = Scheduler(kv, max_running=6, step_tokens=20, chunk_size=8)
    live, finished = [], 0
    for step in range(400):
        if rng.random() < 0.3:
            r = req(f"r{step}", rng.randint(1, 30))
            r.target = rng.randint(1, 12)
            sched.add(r)
            live.append(r)
        plan = sched.schedule()
        for c in plan:
            c.request.num_computed += c.num_tokens
            if c.samples:
                c.request.output_ids.append(rng.randint(0, 9))
        for r in list(sched.running):
            if len(r.output_ids) >= r.target or (rng.random() < 0.02):  # finish or abort
                sched.remove(r)
                live.remove(r)
                finished += 1
        kv.allocator.check_integrity()
        owned = sum(len(r.blocks) for r in sched.running)
        assert owned + kv.allocator.num_free == kv.allocator.num_blocks
        assert all(not r.blocks for r in sched.waiting if r.num_computed == 0)
    assert finished > 50


def test_request_refused_a_slot_is_not_starved_by_a_stream_of_others():
    kv = make_kv(num_blocks=64, block_size=4)

    def can_join(r, step):  # one adapter slot: "b" only when no "a" runs (and vice versa)
        batch = {x.adapter for x in sched.running} | {x.adapter for x in step}
        return not batch or batch == {r.adapter}

    sched = Scheduler(kv, max_running=8, step_tokens=64, chunk_size=64, can_join=can_join, starvation_steps=3)
    starving = None
    for step in range(60):
        fresh = req(f"a{step}", 2)  # a new "a" request arrives every step
        fresh.adapter, fresh.target = "a", 4
        sched.add(fresh)
        if step == 1:
            starving = req("b", 2)
            starving.adapter, starving.target = "b", 4
            sched.add(starving)
        for c in sched.schedule():
            c.request.num_computed += c.num_tokens
            if c.samples:
                c.request.output_ids.append(1)
        if starving is not None and starving.status.value == "running":
            break
        for r in list(sched.running):
            if len(r.output_ids) >= r.target:
                sched.remove(r)
    assert starving.status.value == "running", "the 'b' request never got a turn"
    assert step < 3 + 4 + 3  # refusals allowed, then the running 'a' requests drain (4 tokens each)


def test_kv_budget_from_mem_fraction_static(monkeypatch):
    """--mem-fraction-static f: the KV cache gets f x total minus what is already allocated, and never
    more than the memory left after the measured activations, graphs and margin; too small a
    fraction is refused with a message naming the flag (CUDA's memory query is simulated)."""
    from types import SimpleNamespace

    from loraserve.engine.kv_sizing import BLOCK_SIZE, SAFETY_MARGIN_BYTES, kv_budget_tokens
    from loraserve.errors import ConfigError

    GiB = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * GiB, 80 * GiB))  # 20 GiB in use
    model = SimpleNamespace(num_layers=32, num_kv_heads=8, head_dim=128)
    per_token = KVCache.bytes_per_token(32, 8, 128, torch.bfloat16)  # 128 KiB, Llama-3-8B
    cuda = torch.device("cuda")
    assert kv_budget_tokens(model, cuda, torch.bfloat16, 0.9) == (int(80 * GiB * 0.9) - 20 * GiB) // per_token
    # without the flag: what is free, less the activations (3 GiB), graphs (1 GiB) and the margin
    margin = SAFETY_MARGIN_BYTES + int(0.1 * 4 * GiB)
    left = 60 * GiB - 4 * GiB - margin
    assert kv_budget_tokens(model, cuda, torch.bfloat16, None, 3 * GiB, GiB) == left // per_token
    assert kv_budget_tokens(model, cuda, torch.bfloat16, 0.95, 3 * GiB, GiB) == left // per_token  # the smaller
    with pytest.raises(ConfigError, match="--mem-fraction-static 0.2 leaves no room"):
        kv_budget_tokens(model, cuda, torch.bfloat16, 0.2)
    assert kv_budget_tokens(model, torch.device("cpu"), torch.bfloat16, 0.9) >= BLOCK_SIZE  # ignored on CPU


def test_cuda_graph_capture_sizes_cover_every_batch_up_to_the_max():
    from loraserve.runner.cuda_graph import capture_sizes

    for max_bs in (1, 3, 64, 100, 256, 400):
        sizes = capture_sizes(max_bs)
        assert sizes == sorted(set(sizes)) and sizes[0] == 1 and sizes[-1] == max_bs
        for n in range(1, max_bs + 1):  # padding rows: under 8, or under a third of the batch
            padded = next(s for s in sizes if s >= n)
            assert padded - n < max(8, n // 3), (max_bs, n, padded)


def test_running_keeps_admission_order_and_remove_takes_either_queue():
    from loraserve.sched.request import Status

    kv = make_kv(num_blocks=16, block_size=4)
    sched = Scheduler(kv, max_running=3, step_tokens=64, chunk_size=64)
    a, b, c, d = req("a", 5), req("b", 3), req("c", 7), req("d", 2)
    for r in (a, b, c, d):
        sched.add(r)
    plan = sched.schedule()
    assert [ch.request for ch in plan] == [a, b, c] and list(sched.running) == [a, b, c]
    assert list(sched.waiting) == [d] and d.status is Status.WAITING
    sched.remove(b)  # finishes while running: its blocks go back, the order of the others stays
    assert list(sched.running) == [a, c] and b.blocks == []
    sched.remove(d)  # aborted before it ever ran
    assert not sched.waiting and list(sched.running) == [a, c]
    sched.remove(d)  # twice is harmless
    for r in (a, c):
        r.num_computed = r.num_tokens
        r.output_ids.append(1)
    sched.remove(a)
    assert [ch.request for ch in sched.schedule()] == [c] and list(sched.running) == [c]
    sched.remove(c)
    assert kv.allocator.num_free == kv.allocator.num_blocks and not sched.has_work()
