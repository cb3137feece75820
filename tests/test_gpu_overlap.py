"""The overlapped engine loop on a CUDA GPU: launching a step (eager prefill with LoRA, or a decode
replayed from a CUDA graph) never waits for the device, and greedy tokens with overlap on and off
equal PEFT's (float32, graphs on, both kernel backends) while requests join, finish at different
steps, stop on a stop token mid-batch and are aborted. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from test_multi_lora import ADAPTERS, peft_generate, prompts, setup  # noqa: F401 (fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NEW = 12


def gpu_engine(base, paths, backend, overlap, **kwargs):
    from loraserve.engine.engine import Engine
    from loraserve.settings import make_settings

    return Engine(
        make_settings(
            model_path=base,
            device="cuda",
            dtype="float32",
            max_total_tokens=4096,
            lora_backend=backend,
            cuda_graph_max_bs=16,
            disable_overlap_schedule=not overlap,
            lora_paths=[f"{n}={p}" for n, p in paths.items()],
            **kwargs,
        )
    )


@pytest.mark.parametrize("backend", ["csgmv", "triton"])
def test_greedy_tokens_equal_peft_with_overlap_on_and_off(setup, backend):
    base, paths, peft = setup
    adapters = [*ADAPTERS, None, "rank1", "patterns", None, "rank3_rslora"]
    batch = prompts(len(adapters), seed=23)
    expected, _ = peft_generate(peft, batch, adapters)
    lengths = [1 + (3 * i) % NEW for i in range(len(batch))]  # requests finish at different steps
    params = [{"max_new_tokens": n, "temperature": 0, "ignore_eos": True} for n in lengths]
    want = [e[:n] for e, n in zip(expected, lengths)]
    stop_row = max(range(len(batch)), key=lambda i: lengths[i])
    params[stop_row]["stop_token_ids"] = [expected[stop_row][4]]  # a stop token mid-batch
    cut = expected[stop_row].index(expected[stop_row][4]) + 1
    want[stop_row] = expected[stop_row][:cut]
    outputs = {}
    for overlap in (True, False):
        engine = gpu_engine(base, paths, backend, overlap, max_running_requests=4)  # waiting requests join
        try:
            assert engine.runner.graphs is not None and engine.overlap == overlap
            res = engine.generate(input_ids=batch, sampling_params=params, lora_path=adapters)
            outputs[overlap] = [r["output_ids"] for r in res]
            assert engine.runner.graphs.replays > 0
            engine.kv.allocator.check_integrity()
            engine.lora.check_integrity()
            assert engine.kv.allocator.num_free == engine.kv.allocator.num_blocks
        finally:
            engine.shutdown()
    assert outputs[True] == want
    assert outputs[False] == want


def queue(engine, n: int, seed: int, new: int, adapters: list) -> list:
    """Requests put straight into the scheduler: the test drives the steps (no engine thread)."""
    reqs = [
        engine.make_request(input_ids=ids, params={"max_new_tokens": new, "temperature": 0}, adapter=a)
        for ids, a in zip(prompts(n, seed=seed), adapters)
    ]
    engine.lora.acquire(reqs)
    for r in reqs:
        engine.scheduler.add(r)
    return reqs


def test_launching_a_step_never_waits_for_the_device(setup):
    base, paths, _ = setup
    engine = gpu_engine(base, paths, "csgmv", True)
    stepper = engine.stepper
    stream = torch.cuda.current_stream()
    adapters = ["rank1", None, "patterns", "rank1"]
    try:
        warm = queue(engine, 4, 4, 3, adapters)  # adapters into their slots, kernels compiled
        while stepper.has_work():
            stepper.step()
        assert all(r.finished for r in warm)
        reqs = queue(engine, 4, 5, 6, adapters)
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000)  # about a second of GPU time queued ahead of the step
        stepper.step()  # eager prefill with LoRA: launched, nothing read back
        assert not stream.query(), "launching the prefill step waited for the device"
        stepper.drain()
        replays = engine.runner.graphs.replays
        torch.cuda._sleep(2_000_000_000)
        stepper.step()  # a decode step replayed from a CUDA graph
        assert engine.runner.graphs.replays == replays + 1
        assert not stream.query(), "launching the decode step waited for the device"
        while stepper.has_work():
            stepper.step()
        assert all(r.finished and len(r.output_ids) == 6 for r in reqs)
        engine.kv.allocator.check_integrity()
    finally:
        engine.shutdown()


def test_abort_while_a_step_is_in_flight_frees_blocks_once_it_completed(setup):
    base, paths, _ = setup
    engine = gpu_engine(base, paths, "csgmv", True)
    stepper = engine.stepper
    try:
        reqs = queue(engine, 3, 6, 50, ["rank1", None, "patterns"])
        for _ in range(4):
            stepper.step()
        victim = reqs[1]
        held = list(victim.blocks)
        engine._abort(victim.request_id)  # the engine thread's abort, between two steps
        assert victim.finished and victim.blocks == held  # the step in flight may still read them
        stepper.step()
        assert victim.blocks == [] and len(victim.output_ids) >= 2
        while stepper.has_work():
            stepper.step()
        assert [len(r.output_ids) for r in (reqs[0], reqs[2])] == [50, 50]
        engine.kv.allocator.check_integrity()
        assert engine.kv.allocator.num_free == engine.kv.allocator.num_blocks
    finally:
        engine.shutdown()
