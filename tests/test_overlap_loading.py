"""Overlap loading's scheduling logic on CPU, with a fake copy engine whose completion the test controls.

The fake engine takes the place of the CUDA load stream: a submitted slot fill is not performed
until the test's completion rule says so, and until then the slot holds poison (large random
weights), so a request admitted before its copy finished would produce different tokens. The
oracle is PEFT's mixed-batch generate, and the same engine without overlap loading.
"""

from __future__ import annotations

import pytest
import torch
from test_multi_lora import ADAPTERS, GREEDY, peft_generate, prompts, setup  # noqa: F401 (fixture)

from loraserve.engine.engine import Engine
from loraserve.sched.scheduler import COPYING
from loraserve.settings import make_settings


class FakeCopies:
    """A copy engine for tests: a fill completes at the ``delay``-th query of whether it is done
    (the engine queries in-flight copies once per scheduling round, more when requests ask for
    them); until then its slot holds poison. Records whether the engine kept stepping while
    copies were in flight, and whether a slot being filled was ever reassigned."""

    asynchronous = True

    def __init__(self, engine: Engine, delay: int):
        self.engine, self.delay = engine, delay
        self.handles: list[dict] = []
        self.steps_while_copying: set[int] = set()
        self.violations: list[str] = []
        self.submitted = 0

    def submit(self, fill):
        handle = {"fill": fill, "bytes": 0, "queries": 0, "done": False, "slot": None}
        self.handles.append(handle)
        self.submitted += 1
        return handle

    def _slot_of(self, handle) -> int:
        pool = self.engine.lora.pool
        if handle["slot"] is None:  # first look: find the slot and poison it
            handle["slot"] = next(s for s, h in pool.loading.items() if h is handle)
            handle["key"] = pool.slot_key[handle["slot"]]
            gen = torch.Generator().manual_seed(len(self.handles))
            for buf in (*pool.A.values(), *pool.B.values()):
                buf[handle["slot"]].copy_(torch.randn(buf[handle["slot"]].shape, generator=gen) * 5)
        return handle["slot"]

    def done(self, handle) -> bool:
        pool = self.engine.lora.pool
        slot = self._slot_of(handle)
        if pool.loading.get(slot) is not handle or pool.slot_key[slot] != handle["key"]:
            self.violations.append(f"slot {slot} was reassigned while its copy was in flight")
        handle["queries"] += 1
        if handle["queries"] <= self.delay:
            self.steps_while_copying.add(self.engine.step_count)
            return False
        if not handle["done"]:
            handle["bytes"] = handle["fill"]()
            handle["done"] = True
        return True

    def wait(self, handle) -> float:
        assert handle["done"]
        return 0.001


def no_failures(request, message, status):
    pytest.fail(f"no adapter read may fail here: {message} ({status})")


def overlap_engine(base, paths, delay, **kwargs):
    engine = Engine(
        make_settings(
            model_path=base,
            device="cpu",
            max_total_tokens=1024,
            lora_paths=[f"{n}={p}" for n, p in paths.items()],
            **kwargs,
        )
    )
    engine.lora.admission.copy_engine = FakeCopies(engine, delay)  # replaces the engine's (None on CPU)
    return engine


# more adapters than slots, base rows that can run while copies are in flight, repeats that hit
ORDER = [
    None,
    "rank1",
    "rank3_rslora",
    None,
    "patterns",
    "one_layer",
    "rank1",
    "one_layer",
    "patterns",
    "rank3_rslora",
    None,
    "rank1",
]


@pytest.mark.parametrize("delay", [0, 4, 12])
def test_outputs_identical_with_overlap_loading(setup, delay):
    base, paths, peft = setup
    assert set(ORDER) - {None} == set(ADAPTERS)
    batch = prompts(len(ORDER), seed=41)
    expected, _ = peft_generate(peft, batch, ORDER)
    settings = dict(max_loras_per_batch=2, enable_lora_overlap_loading=True, max_running_requests=4)
    engine = overlap_engine(base, paths, delay, **settings)
    try:
        results = engine.generate(input_ids=batch, sampling_params=GREEDY, lora_path=ORDER)
        fake, m = engine.lora.copy_engine, engine.lora.metrics
        assert [r["output_ids"] for r in results] == expected
        assert fake.violations == []
        assert fake.submitted == m["slot_fills"] > len(ADAPTERS)  # more adapters than slots: refills
        assert m["gpu_evictions"] > 0
        assert engine.lora.copies_in_flight == 0
        if delay:
            # the running batch kept decoding while copies were in flight, and requests waited for them
            assert len(fake.steps_while_copying) >= 2
            assert m["copy_wait_seconds"] > 0
        engine.lora.check_integrity()
        engine.kv.allocator.check_integrity()
    finally:
        engine.shutdown()
    sync = Engine(
        make_settings(
            model_path=base,
            device="cpu",
            max_total_tokens=1024,
            lora_paths=[f"{n}={p}" for n, p in paths.items()],
            max_loras_per_batch=2,
            max_running_requests=4,
        )
    )
    try:
        assert sync.lora.copy_engine is None  # without the flag (and on CPU): synchronous fills
        assert [
            r["output_ids"] for r in sync.generate(input_ids=batch, sampling_params=GREEDY, lora_path=ORDER)
        ] == expected
    finally:
        sync.shutdown()


def test_flag_on_cpu_has_no_effect_beyond_the_log(setup, caplog):
    base, paths, _ = setup
    with caplog.at_level("INFO", logger="loraserve.engine.engine"):
        engine = Engine(
            make_settings(
                model_path=base,
                device="cpu",
                max_total_tokens=512,
                max_loras_per_batch=3,
                enable_lora_overlap_loading=True,
                lora_paths=[f"{n}={p}" for n, p in paths.items()],
            )
        )
    try:
        assert engine.lora.copy_engine is None and not engine.lora.pin_host
        assert "overlap loading has no effect on cpu" in caplog.text
        assert engine.lora.host.capacity == 6  # 2 x --max-loras-per-batch by default with the flag
    finally:
        engine.shutdown()


def _waiting_request(engine, adapter):
    req = engine.make_request(input_ids=[1, 2, 3], params=dict(GREEDY), adapter=adapter)
    engine.lora.acquire([req])
    return req


def test_loading_slot_is_never_evicted_and_prefetch_looks_ahead(setup):
    """Driven step by step on the test thread: copies that never finish hold their slots against
    every later request, and the queue's adapters are copied before their turn."""
    base, paths, _ = setup
    engine = overlap_engine(base, paths, delay=10**9, max_loras_per_batch=3, enable_lora_overlap_loading=True)
    lora = engine.lora
    try:
        queue = [_waiting_request(engine, name) for name in ("rank1", "patterns", "one_layer", "rank3_rslora")]
        for r in queue:
            engine.scheduler.add(r)
        lora.before_schedule(fail=no_failures)  # prefetch: the first three adapters take the three slots
        assert lora.metrics["prefetches"] == 3 and lora.copies_in_flight == 3
        loading = {s: lora.pool.slot_key[s] for s in lora.pool.loading}
        for _ in range(3):
            engine.step()  # nothing can run: every admission answers "copying" or finds no slot
        assert list(engine.scheduler.running) == []
        assert {s: lora.pool.slot_key[s] for s in lora.pool.loading} == loading
        assert lora.can_join(queue[0], []) == COPYING
        assert lora.can_join(queue[3], []) is False  # no slot: the three being filled cannot be evicted
        # the copies land: requests join in queue order, the fourth adapter still waits for a slot
        lora.copy_engine.delay = 0
        engine.step()
        assert lora.copies_in_flight == 0
        assert [r.adapter for r in engine.scheduler.running] == ["rank1", "patterns", "one_layer"]
        lora.check_integrity()
    finally:
        for r in queue:
            engine.scheduler.remove(r)
            lora.release(r)
        engine.shutdown()


def test_abort_and_unload_while_copies_are_in_flight(setup):
    """A request aborted while its adapter is being copied leaves a consistent pool once the copy
    lands; unloading an adapter whose copy is still in flight frees its slot at once."""
    base, paths, peft = setup
    engine = overlap_engine(base, paths, delay=10**9, max_loras_per_batch=3, enable_lora_overlap_loading=True)
    lora = engine.lora
    try:
        waiting = [_waiting_request(engine, name) for name in ("rank1", "patterns")]
        for r in waiting:
            engine.scheduler.add(r)
        lora.before_schedule(fail=no_failures)
        assert lora.copies_in_flight == 2
        slot_rank1 = lora.pool.slot_of(waiting[0].adapter_ref.key)
        engine._abort(waiting[0].request_id)  # its copy goes on; nobody waits for it any more
        assert waiting[0].finished and waiting[0].adapter_ref is None  # finished, its adapter reference released
        engine._abort(waiting[1].request_id)
        key = ("patterns", lora.registry.get("patterns").version)
        lora.unload_adapter("patterns")  # in flight: the slot is emptied at once, its copy forgotten
        assert lora.pool.slot_of(key) is None and lora.copies_in_flight == 1
        lora.check_integrity()
        lora.copy_engine.delay = 0
        lora.before_schedule(fail=no_failures)  # the aborted request's copy lands and its slot becomes evictable
        assert lora.copies_in_flight == 0 and lora.pool.slot_key[slot_rank1] is not None
        lora.check_integrity()
        # the slots are usable again: new requests get PEFT's answer
        batch = prompts(2, seed=44)
        expected, _ = peft_generate(peft, batch, ["one_layer", "rank1"])
        out = engine.generate(input_ids=batch, sampling_params=GREEDY, lora_path=["one_layer", "rank1"])
        assert [r["output_ids"] for r in out] == expected
        lora.check_integrity()
    finally:
        engine.shutdown()


def test_admission_reads_each_request_once_per_scheduling_pass(setup, monkeypatch):
    """Issue 18's lean host path: a scheduling pass that refuses many waiting requests for want of a
    slot looks at each request's adapter about once, not once per running request for every
    candidate (``SlotAdmission._step_keys``); the pass admits and refuses as before."""
    import loraserve.lora.admission as admission

    base, paths, _ = setup
    engine = overlap_engine(base, paths, delay=0, max_loras_per_batch=2, max_running_requests=64)
    sched = engine.scheduler
    running = [_waiting_request(engine, name) for name in ["rank1"] * 8 + ["patterns"] * 8]
    waiting = [_waiting_request(engine, name) for name in ["one_layer", "rank3_rslora"] * 20]
    try:
        for r in running:
            sched.add(r)
        sched.schedule()  # the two adapters take both slots
        assert list(sched.running) == running
        for r in waiting:
            sched.add(r)
        calls = []
        real = admission.key_of
        monkeypatch.setattr(admission, "key_of", lambda r: calls.append(r) or real(r))
        assert not any(c.request in waiting for c in sched.schedule())
        assert all(r.join_refusals == 1 for r in waiting)
        assert engine.lora.metrics["slot_refusals"] == len(waiting)
        # 16 running + 40 candidates; before, every candidate rebuilt the batch's set: 40 x 17 calls
        assert len(calls) <= 2 * (len(running) + len(waiting)), len(calls)
    finally:
        for r in running + waiting:
            sched.remove(r)
            engine.lora.release(r)
        engine.shutdown()
