"""The overlapped engine loop (``loraserve.engine.stepper``): outputs identical with overlap on and
off and equal to transformers' greedy tokens (requests joining and finishing every step, stop
tokens, stop strings, adapters, aborts); step N+1 is prepared before step N's tokens are waited for;
a request that finishes while a launched step still reads its KV blocks keeps them until that step
completed, and its token from that step is never delivered."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from http_fixtures import make_engine as make_tokenizer_engine
from test_engine import hf_greedy, prompts
from test_models import make_config, make_hf

from loraserve.engine.engine import Engine
from loraserve.settings import make_settings

LENGTHS = (1, 3, 5, 9, 17, 2, 40, 7)
MAX_NEW = (1, 2, 3, 5, 8, 13, 20, 32)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    hf = make_hf(make_config("llama"))
    hf.generation_config.eos_token_id = None
    path = tmp_path_factory.mktemp("llama-overlap")
    hf.save_pretrained(path)
    return hf, str(path)


def engine_for(path: str, overlap: bool, **kwargs) -> Engine:
    return Engine(
        make_settings(
            model_path=path,
            device="cpu",
            max_total_tokens=2048,
            disable_overlap_schedule=not overlap,
            **kwargs,
        )
    )


def test_overlap_on_and_off_match_transformers_as_requests_join_and_finish_every_step(llama):
    hf, path = llama
    batch = prompts(hf.config.vocab_size, LENGTHS, seed=11)
    expected = []
    params = []
    for i, (ids, n) in enumerate(zip(batch, MAX_NEW)):
        tokens, logprobs = hf_greedy(hf, ids, n)
        p = {"max_new_tokens": n, "temperature": 0, "return_logprob": True}
        if i in (4, 6):  # a stop token that ends the request mid-batch, at its first occurrence
            stop = tokens[3]
            p["stop_token_ids"] = [stop]
            cut = tokens.index(stop) + 1
            tokens, logprobs = tokens[:cut], logprobs[:cut]
        expected.append((tokens, logprobs))
        params.append(p)
    outputs = {}
    for overlap in (True, False):
        # three running at most and small prefill chunks: someone joins or finishes at nearly every step
        engine = engine_for(path, overlap, max_running_requests=3, chunked_prefill_size=16)
        try:
            results = engine.generate(input_ids=batch, sampling_params=params)
            engine.kv.allocator.check_integrity()
            assert engine.kv.allocator.num_free == engine.kv.allocator.num_blocks
            assert engine.stepper.in_flight is None and not engine.scheduler.has_work()
        finally:
            engine.shutdown()
        for (tokens, logprobs), res in zip(expected, results):
            assert res["output_ids"] == tokens
            ours = [lp for lp, _ in res["meta_info"]["output_token_logprobs"]]
            assert max(abs(a - b) for a, b in zip(ours, logprobs)) < 1e-3
        outputs[overlap] = [(r["output_ids"], r["meta_info"]["finish_reason"]) for r in results]
    assert outputs[True] == outputs[False]
    assert outputs[True][4][1]["type"] == "stop" and outputs[True][0][1] == {"type": "length"}


def test_stop_strings_adapters_and_penalties_identical_with_overlap_on_and_off():
    texts = ["The quick brown fox", "Once upon a time", "Hello", "1, 2, 3,"]
    adapters = ["alpha", None, "beta", "alpha"]
    base = {"max_new_tokens": 24, "temperature": 0}
    runs = {}
    for overlap in (False, True):
        engine = make_tokenizer_engine(disable_overlap_schedule=not overlap, max_running_requests=3)
        try:
            if not overlap:  # stop strings taken from the middle of the greedy texts: they end mid-batch
                plain = engine.generate(prompt=texts, sampling_params=base, lora_path=adapters)
                stops = [r["text"][len(r["text"]) // 2 : len(r["text"]) // 2 + 3] for r in plain]
            params = [{**base, "stop": [s]} for s in stops]
            params[3] = {**base, "repetition_penalty": 1.3, "frequency_penalty": 0.5, "presence_penalty": 0.2}
            res = engine.generate(prompt=texts, sampling_params=params, lora_path=adapters)
            runs[overlap] = [(r["text"], r["output_ids"], r["meta_info"]["finish_reason"]) for r in res]
            engine.kv.allocator.check_integrity()
            assert engine.kv.allocator.num_free == engine.kv.allocator.num_blocks
        finally:
            engine.shutdown()
    assert runs[True] == runs[False]
    for (text, _, reason), stop in zip(runs[True][:3], stops):
        if stop.strip():
            assert reason["type"] == "stop" and stop not in text


def test_abort_mid_stream_frees_blocks_with_overlap(llama):
    hf, path = llama
    engine = engine_for(path, True)
    batch = prompts(hf.config.vocab_size, (6, 30))

    async def walk_away():
        stream = engine.stream(input_ids=batch, sampling_params={"max_new_tokens": 200, "temperature": 0})
        got = 0
        async for _, out in stream:
            got += len(out.token_ids)
            if got >= 3:
                break
        await stream.aclose()

    try:
        asyncio.run(walk_away())
        # steps after the abort; greedy and ending on length: a request that stops on an EOS nobody
        # predicted was already in the next step, whose blocks are freed only after it ends
        engine.generate(input_ids=batch[0], sampling_params={"max_new_tokens": 2, "temperature": 0, "ignore_eos": True})
        engine.kv.allocator.check_integrity()
        assert engine.kv.allocator.num_free == engine.kv.allocator.num_blocks
        assert not engine.scheduler.has_work() and engine.stepper.in_flight is None
    finally:
        engine.shutdown()


class GatedReadbacks:
    """Wraps a stepper's readback: logs when each step's tokens are waited for, and lets the test
    decide when step ``n``'s tokens are there (``release(n)``)."""

    def __init__(self, stepper, log: list):
        self.stepper, self.inner, self.log = stepper, stepper.readback, log
        self.gates: dict[int, threading.Event] = {}

    def start(self, tokens, logprobs):
        number = self.stepper.step_count
        inner = self.inner.start(tokens, logprobs)
        gate = self.gates.setdefault(number, threading.Event())
        log = self.log

        class Gated:
            def wait(self):
                log.append(("wait", number))
                if not gate.wait(timeout=30):
                    raise TimeoutError(f"step {number} was never released")
                return inner.wait()

        return Gated()

    def release(self, number: int) -> None:
        self.gates.setdefault(number, threading.Event()).set()


@pytest.mark.parametrize("overlap", [True, False])
def test_step_n_plus_1_is_launched_before_step_n_is_waited_for(llama, overlap):
    hf, path = llama
    engine = engine_for(path, overlap)  # the engine thread never starts: the test drives the steps
    stepper = engine.stepper
    log: list = []
    forward = stepper.runner.forward

    def logged_forward(plan, resolve=None):
        log.append(("launch", stepper.step_count))
        return forward(plan, resolve)

    stepper.runner.forward = logged_forward
    gated = stepper.readback = GatedReadbacks(stepper, log)
    reqs = [engine.make_request(input_ids=ids, params={"max_new_tokens": 4, "temperature": 0}) for ids in prompts(97)]
    for r in reqs:
        engine.scheduler.add(r)
    if not overlap:
        for n in range(1, 6):
            gated.release(n)
        for _ in range(5):
            stepper.step()
        assert log[:4] == [("launch", 1), ("wait", 1), ("launch", 2), ("wait", 2)]
        return
    stepper.step()  # launches step 1 and returns: nothing to wait for yet
    assert log == [("launch", 1)]
    turn = threading.Thread(target=stepper.step)  # launches step 2, then waits for step 1's tokens
    turn.start()
    for _ in range(3000):
        if ("wait", 1) in log:
            break
        turn.join(0.01)
    assert log == [("launch", 1), ("launch", 2), ("wait", 1)]
    assert turn.is_alive()  # step 2 was prepared and launched while step 1's tokens were not there
    gated.release(1)
    turn.join(30)
    assert not turn.is_alive()
    for n in range(2, 8):
        gated.release(n)
    for _ in range(6):
        stepper.step()
    assert [e for e in log if e[0] == "wait"][:4] == [("wait", 1), ("wait", 2), ("wait", 3), ("wait", 4)]
    assert all(r.finished and len(r.output_ids) == 4 for r in reqs)
    engine.kv.allocator.check_integrity()
    assert engine.kv.allocator.num_free == engine.kv.allocator.num_blocks


def test_a_request_ending_while_its_next_step_runs_keeps_its_blocks_until_that_step_completed(llama):
    hf, path = llama
    engine = engine_for(path, True)
    stepper = engine.stepper
    ids = prompts(hf.config.vocab_size, (20,))[0]
    first = hf_greedy(hf, ids, 3)[0]
    r = engine.make_request(
        input_ids=ids, params={"max_new_tokens": 10, "temperature": 0, "stop_token_ids": [first[0]]}
    )
    other = engine.make_request(input_ids=ids[:5], params={"max_new_tokens": 10, "temperature": 0})
    for q in (r, other):
        engine.scheduler.add(q)
    free_before = engine.kv.allocator.num_free
    stepper.step()  # step 1: prefill of both, the stop token is sampled (not read yet)
    assert r.output_ids == [] and len(r.pending) == 1
    stepper.step()  # step 2 launched with r in it; then step 1 read: r stops
    assert r.finished and r.output_ids == [first[0]] and r.finish_reason == "stop"
    held = list(r.blocks)
    assert held and stepper.in_flight is not None and r.last_step == stepper.in_flight.number
    assert all(engine.kv.allocator.is_held(b) for b in held)  # still held while step 2 may read them
    engine.kv.allocator.check_integrity()
    stepper.step()  # step 3 launched (without r), step 2 read: r's token from step 2 is dropped
    assert r.blocks == [] and r.output_ids == [first[0]]
    assert not any(engine.kv.allocator.is_held(b) for b in held)  # free, or cached with no holder
    while stepper.has_work():
        stepper.step()
    assert other.finished and len(other.output_ids) == 10
    engine.kv.allocator.check_integrity()
    assert engine.kv.allocator.num_free == free_before


def test_the_last_token_by_length_runs_no_extra_step(llama):
    hf, path = llama
    engine = engine_for(path, True)
    launched = []
    forward = engine.runner.forward

    def counting(plan, resolve=None):
        launched.append(len(plan))
        return forward(plan, resolve)

    engine.runner.forward = counting
    try:
        res = engine.generate(input_ids=prompts(97, (4,))[0], sampling_params={"max_new_tokens": 5, "temperature": 0})
        assert len(res["output_ids"]) == 5
        assert len(launched) == 5  # one prefill, four decodes: none after the fifth token was sampled
    finally:
        engine.shutdown()


def test_placeholders_resolve_on_the_device_ring():
    from loraserve.engine.overlap import FutureTokens

    ring = FutureTokens(8, torch.device("cpu"))
    a = ring.put(torch.tensor([11, 12, 13]))
    b = ring.put(torch.tensor([21, 22, 23, 24, 25, 26]))  # wraps to the start
    assert a == [-1, -2, -3] and b == [-1, -2, -3, -4, -5, -6]
    ids = torch.tensor([5, b[0], 7, b[5], 0])
    assert ring.resolve(ids).tolist() == [5, 21, 7, 26, 0]
    with pytest.raises(ValueError, match="do not fit"):
        ring.put(torch.arange(9))
