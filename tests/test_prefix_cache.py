"""The prefix cache (issue 19): greedy outputs with the cache on equal PEFT's (and the cache off's) for
shared system prompts, multi-turn prompts that extend earlier ones, partial-block prefixes and mixed
adapters; a prefix computed under one adapter is never reused under another or the base model; an
adapter reloaded with other weights under the same name and path never reuses the old KV; the pool
stays consistent through randomized workloads with eviction, preemption, aborts, unloads and flushes."""

from __future__ import annotations

import random

import pytest
import torch
from lora_utils import make_peft_adapter, tiny_llama_config, tiny_model
from peft import PeftModel
from test_multi_lora import GREEDY, NEW, peft_generate

from loraserve.engine.engine import Engine
from loraserve.sched.kv_cache import BlockAllocator, KVCache, OutOfBlocks
from loraserve.sched.prefix_cache import BASE_OWNER, PrefixCache, PrefixOwner
from loraserve.sched.request import Request
from loraserve.sched.scheduler import Scheduler
from loraserve.settings import make_settings

BS = 16  # the engine's KV block size
ADAPTERS = {
    "alpha": (4, 8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "beta": (8, 16, ["q_proj", "v_proj", "down_proj"]),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-cache")
    base = tiny_model(tiny_llama_config(), seed=0)
    base.generation_config.eos_token_id = None
    base.save_pretrained(root / "base")
    paths = {}
    for i, (name, (r, alpha, targets)) in enumerate(ADAPTERS.items()):
        paths[name] = str(
            make_peft_adapter(
                base, root / name, r=r, lora_alpha=alpha, target_modules=targets, seed=50 + i, init_scale=0.3
            )
        )
    peft = PeftModel.from_pretrained(base, paths["alpha"], adapter_name="alpha")
    peft.load_adapter(paths["beta"], adapter_name="beta")
    return root, str(root / "base"), paths, peft.eval()


def engine(base: str, paths: dict, **kwargs) -> Engine:
    values = dict(
        model_path=base, device="cpu", max_total_tokens=2048, lora_paths=[f"{n}={p}" for n, p in paths.items()]
    )
    values.update(kwargs)
    return Engine(make_settings(**values))


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def check_pool(e: Engine) -> None:
    e.scheduler.check_integrity()
    assert not e.scheduler.has_work() and e.kv.allocator.num_held == 0


# -- against PEFT, through the engine -------------------------------------------------------------


def test_shared_system_prompts_across_adapters_match_peft_and_reuse_only_their_own(setup):
    _, base, paths, peft = setup
    system = {"alpha": tokens(40, 1), "beta": tokens(40, 2)}  # 2.5 blocks each
    # round 1 caches (system, adapter) pairs: alpha's prompt under alpha, beta's under beta and base
    first = [("alpha", "alpha"), ("beta", "beta"), ("beta", None)]
    # round 2: the same pairs again (hits), and alpha's prompt under beta and base (never computed
    # under them: no reuse)
    second = [("alpha", "alpha"), ("beta", "beta"), ("beta", None), ("alpha", "beta"), ("alpha", None)]
    outs = {}
    for cache in (True, False):
        e = engine(base, paths, disable_radix_cache=not cache)
        try:
            for round_no, rows in enumerate((first, second)):
                batch = [system[s] + tokens(6, 100 + 10 * round_no + i) for i, (s, _) in enumerate(rows)]
                adapters = [a for _, a in rows]
                results = e.generate(input_ids=batch, sampling_params=GREEDY, lora_path=adapters)
                want, _ = peft_generate(peft, batch, adapters)
                assert [r["output_ids"] for r in results] == want, f"cache={cache} round {round_no}"
                outs[cache, round_no] = [r["output_ids"] for r in results]
                cached = [r["meta_info"]["cached_tokens"] for r in results]
                if not cache or round_no == 0:
                    assert cached == [0] * len(rows)
                else:  # two full blocks of the 40-token system prompt, only under the same owner
                    assert cached == [32, 32, 32, 0, 0]
            check_pool(e)
        finally:
            e.shutdown()
    assert outs[True, 1] == outs[False, 1]


def test_requests_arriving_together_compute_a_shared_prefix_once(setup):
    """In one batch, requests whose next block another request of the step computes wait a step and
    find it cached (SGLang's in-batch prefix check); a short prompt (no full block) never waits."""
    _, base, paths, peft = setup
    system = tokens(40, 11)
    batch = [system + tokens(6, 300 + i) for i in range(3)] + [tokens(46, 12)]
    adapters = ["alpha", "alpha", "alpha", "alpha"]
    e = engine(base, paths)
    try:
        results = e.generate(input_ids=batch + [tokens(5, 13)], sampling_params=GREEDY, lora_path=adapters + [None])
        want, _ = peft_generate(peft, batch, adapters)
        assert [r["output_ids"] for r in results[:4]] == want
        assert [r["meta_info"]["cached_tokens"] for r in results] == [0, 32, 32, 0, 0]
        check_pool(e)
    finally:
        e.shutdown()


def test_multi_turn_and_partial_block_prefixes_match_peft(setup):
    _, base, paths, peft = setup
    e = engine(base, paths)
    try:
        turn1 = tokens(21, 7)
        r1 = e.generate(input_ids=turn1, sampling_params=GREEDY, lora_path="beta")
        # the next turn extends the first one's prompt and answer: the answer's full blocks are cached too
        turn2 = turn1 + r1["output_ids"] + tokens(5, 8)
        r2 = e.generate(input_ids=turn2, sampling_params=GREEDY, lora_path="beta")
        want, _ = peft_generate(peft, [turn2], ["beta"])
        assert r2["output_ids"] == want[0]
        assert r2["meta_info"]["cached_tokens"] == (len(turn1) + NEW) // BS * BS == 32
        # a prompt that shares 20 tokens (one block and 4) with turn1 reuses the one full block only
        partial = turn1[:20] + tokens(10, 9)
        r3 = e.generate(input_ids=partial, sampling_params=GREEDY, lora_path="beta")
        want, _ = peft_generate(peft, [partial], ["beta"])
        assert r3["output_ids"] == want[0] and r3["meta_info"]["cached_tokens"] == 16
        # a prompt that is exactly cached full blocks still computes its last token (to sample)
        exact = turn2[:32]
        r4 = e.generate(input_ids=exact, sampling_params=GREEDY, lora_path="beta")
        want, _ = peft_generate(peft, [exact], ["beta"])
        assert r4["output_ids"] == want[0] and r4["meta_info"]["cached_tokens"] == 16
        stats = e.stats()["prefix_cache"]
        assert stats["hit_tokens"] == 32 + 16 + 16 and stats["cached_blocks"] > 0
        check_pool(e)
        assert e.flush_cache() > 0
        assert e.stats()["prefix_cache"]["cached_blocks"] == 0
        r5 = e.generate(input_ids=turn2, sampling_params=GREEDY, lora_path="beta")
        assert r5["output_ids"] == r2["output_ids"] and r5["meta_info"]["cached_tokens"] == 0
        check_pool(e)
    finally:
        e.shutdown()


def test_reloading_changed_weights_under_the_same_name_and_path_never_reuses_old_kv(setup, tmp_path):
    """vLLM #42125: the cache keyed by name and path served stale KV after a reload."""
    root, base, paths, _ = setup
    base_model = tiny_model(tiny_llama_config(), seed=0)
    base_model.generation_config.eos_token_id = None
    path = tmp_path / "changing"
    make_peft_adapter(base_model, path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=1, init_scale=0.4)
    prompt = tokens(40, 3)
    e = engine(base, {"x": str(path)})
    try:
        old = e.generate(input_ids=prompt, sampling_params=GREEDY, lora_path="x")
        again = e.generate(input_ids=prompt, sampling_params=GREEDY, lora_path="x")
        assert again["meta_info"]["cached_tokens"] == 32 and again["output_ids"] == old["output_ids"]
        e.unload_adapter("x", timeout=10)
        make_peft_adapter(
            base_model, path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=2, init_scale=0.4
        )
        e.load_adapter("x", str(path))
        new = e.generate(input_ids=prompt, sampling_params=GREEDY, lora_path="x")
        peft = PeftModel.from_pretrained(base_model, str(path)).eval()
        want, _ = peft_generate(peft, [prompt], ["default"])
        assert new["meta_info"]["cached_tokens"] == 0
        assert new["output_ids"] == want[0] and new["output_ids"] != old["output_ids"]
        # the same weights under a second name: each load has its own version, so no sharing
        e.load_adapter("x_copy", str(path))
        twin = e.generate(input_ids=prompt, sampling_params=GREEDY, lora_path="x_copy")
        assert twin["meta_info"]["cached_tokens"] == 0 and twin["output_ids"] == new["output_ids"]
        check_pool(e)
    finally:
        e.shutdown()


def test_a_base_request_never_hits_an_adapters_kv(setup):
    """sglang #24638: a base request with a crafted key could reuse an adapter's KV. Here the owner is
    derived from the registry's reference, not from anything the request sends."""
    _, base, paths, peft = setup
    e = engine(base, paths)
    try:
        prompt = tokens(48, 4)
        e.generate(input_ids=prompt, sampling_params=GREEDY, lora_path="alpha")
        res = e.generate(input_ids=prompt, sampling_params=GREEDY)
        want, _ = peft_generate(peft, [prompt], [None])
        assert res["meta_info"]["cached_tokens"] == 0 and res["output_ids"] == want[0]
        owners = {PrefixOwner.of(r) for r in e.lora.registry.refs()}
        assert BASE_OWNER not in owners and len(owners) == 2
    finally:
        e.shutdown()


def test_preemption_with_the_cache_matches_peft_and_reuses_the_computed_prefix(setup):
    _, base, paths, peft = setup
    # 6 blocks of KV for 4 requests of 30 + 24 tokens: decodes preempt each other
    e = engine(base, paths, max_total_tokens=6 * BS, max_running_requests=4)
    preempted = []
    on_preempt = e.scheduler.on_preempt

    def count(r):
        preempted.append(r.request_id)
        if on_preempt is not None:
            on_preempt(r)

    e.scheduler.on_preempt = count
    try:
        system = tokens(32, 5)
        batch = [system + tokens(2, 200 + i) for i in range(4)]
        adapters = ["alpha", "alpha", None, "alpha"]
        results = e.generate(input_ids=batch, sampling_params=GREEDY, lora_path=adapters)
        want, _ = peft_generate(peft, batch, adapters)
        assert [r["output_ids"] for r in results] == want
        assert preempted and e.stats()["prefix_cache"]["hit_tokens"] > 0
        check_pool(e)
    finally:
        e.shutdown()


# -- the cache and the allocator alone --------------------------------------------------------------


def test_lru_eviction_drops_subtrees_and_never_touches_held_blocks():
    cache = PrefixCache(block_size=2)
    alloc = BlockAllocator(6, 2, cache)
    owner = PrefixOwner(adapter=True, version=1, identity="h")
    a = alloc.allocate(3)  # a chain of three blocks
    node = None
    for i, b in enumerate(a):
        node = cache.insert(owner, node, (i, i), b)
    b = alloc.allocate(2)
    other = None
    for i, blk in enumerate(b):
        other = cache.insert(BASE_OWNER, other, (i, i), blk)
    alloc.release(a)
    alloc.check_integrity([b])
    assert alloc.num_free == 1 + 3 and cache.num_evictable == 3
    assert [n.block for n in cache.match(owner, [(0, 0), (1, 1), (2, 2)])] == a
    assert cache.match(BASE_OWNER, [(0, 0), (1, 1), (2, 2)])[-1].block == b[-1]
    assert cache.match(PrefixOwner(adapter=True, version=2, identity="h"), [(0, 0)]) == []
    got = alloc.allocate(2)  # one free block, then the LRU cached one: a's tail (released first)
    assert a[2] in got and cache.num_evictable == 2
    assert [n.block for n in cache.match(owner, [(0, 0), (1, 1), (2, 2)])] == a[:2]
    alloc.check_integrity([b, got])
    alloc.share(a[:1])  # a hit holds a[0]: evicting a[1] must not free it
    alloc.allocate(1)
    assert alloc.is_held(a[0]) and not cache.is_cached(a[1])
    with pytest.raises(OutOfBlocks):
        alloc.allocate(1)
    alloc.flush_cache()
    assert cache.num_cached == 0 and alloc.is_held(a[0])


def test_longest_prefix_first_without_starving_the_queue():
    kv = KVCache(1, 1, 2, 32, 4, torch.float32, "cpu", prefix_caching=True)
    sched = Scheduler(kv, max_running=1, step_tokens=64, chunk_size=64, lpm_patience=3)

    def req(rid, ids):
        return Request(request_id=rid, prompt_ids=ids, params=None)

    warm = req("warm", list(range(1, 13)))
    sched.add(warm)
    sched.schedule()
    warm.num_computed = 12
    sched.remove(warm)  # its 3 blocks stay cached
    cold, hot = req("cold", [99] * 12), req("hot", list(range(1, 13)) + [5, 6])
    sched.add(cold)
    sched.add(hot)
    plan = sched.schedule()
    assert [c.request.request_id for c in plan] == ["hot"] and plan[0].start == 12 and hot.cached_tokens == 12
    hot.num_computed = 14
    sched.remove(hot)
    # a stream of hits keeps arriving: "cold" is overtaken until it has waited lpm_patience steps
    order = []
    for i in range(5):
        h = req(f"hit{i}", list(range(1, 13)) + [7 + i])
        sched.add(h)
        plan = sched.schedule()
        r = plan[0].request
        order.append(r.request_id)
        r.num_computed += plan[0].num_tokens
        sched.remove(r)
    assert "cold" in order and order.index("cold") <= 3
    sched.check_integrity()


def test_randomized_workload_keeps_the_pool_consistent():
    """Requests with shared prefixes under three owners join, decode, get preempted, aborted, lose
    their adapter (an unload: its version never comes back) and see flushes; after every step the
    allocator's counts, the trie and the block table agree."""
    rng = random.Random(0)
    kv = KVCache(1, 1, 2, 24, 4, torch.float32, "cpu", prefix_caching=True)
    sched = Scheduler(kv, max_running=6, step_tokens=24, chunk_size=8)
    refs = [
        None,
        type("Ref", (), {"version": 1, "identity": "a"})(),
        type("Ref", (), {"version": 2, "identity": "b"})(),
    ]
    prefixes = [[rng.randrange(50) for _ in range(rng.choice((3, 4, 8, 11)))] for _ in range(4)]
    live: list[Request] = []
    for step in range(400):
        if rng.random() < 0.5 and len(live) < 12:
            r = Request(
                f"r{step}", rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 6))], None
            )
            r.adapter_ref = rng.choice(refs)
            r.max_out = rng.randrange(1, 10)
            sched.add(r)
            live.append(r)
        if rng.random() < 0.03:  # an unload: later requests get a new version
            refs[2] = type("Ref", (), {"version": refs[2].version + 1, "identity": "b"})()
        if rng.random() < 0.02:
            sched.flush_prefix_cache()
        for c in sched.schedule():
            r = c.request
            r.num_computed += c.num_tokens
            if c.samples:
                r.output_ids.append(rng.randrange(50))
        for r in list(live):
            done = len(r.output_ids) >= r.max_out
            if done or rng.random() < 0.03:  # finished or aborted (waiting or running)
                sched.remove(r)
                live.remove(r)
        sched.check_integrity()
    for r in live:
        sched.remove(r)
    sched.check_integrity()
    assert kv.allocator.num_held == 0 and kv.allocator.num_free == 24
    assert kv.allocator.prefix_cache.hit_tokens > 0 and kv.allocator.prefix_cache.evicted_blocks > 0
