"""``--tp-size 2`` on two CUDA GPUs with NCCL. Skipped with fewer than two GPUs.

float32 on the tiny model with PEFT adapters: greedy tokens identical to PEFT and to ``--tp-size 1``,
with CUDA graphs and both kernel backends, adapters cycling through fewer slots than adapters, and an
adapter loaded and one unloaded between batches. float32 on a Llama-3.2-1B-shaped dummy model: the
next-token distribution at tp 2 is tp 1's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_multi_lora import ADAPTERS, GREEDY, peft_generate, prompts, setup  # noqa: F401 (fixture)
from test_tp_engine import ORDER

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]

CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"


def _engine(**kwargs):
    from loraserve.engine.engine import Engine
    from loraserve.settings import make_settings

    return Engine(make_settings(device="cuda", **kwargs))


@pytest.mark.parametrize("backend", ["csgmv", "triton"])
def test_tp2_nccl_matches_peft_and_tp1(setup, backend):
    base, paths, peft = setup
    batch = prompts(len(ORDER), seed=61)
    expected, _ = peft_generate(peft, batch, ORDER)
    names = list(ADAPTERS)
    for size in (2, 1):
        engine = _engine(
            model_path=base,
            dtype="float32",
            max_total_tokens=2048,
            tp_size=size,
            lora_backend=backend,
            max_loras_per_batch=3,
            cuda_graph_max_bs=8,
            lora_paths=[f"{n}={paths[n]}" for n in names[:3]],
        )
        try:
            engine.lora.load_adapter(names[3], paths[names[3]])
            results = engine.generate(input_ids=batch, sampling_params=GREEDY, lora_path=ORDER)
            assert [r["output_ids"] for r in results] == expected, f"tp {size}"
            assert engine.runner.graphs is not None and engine.runner.graphs.replays > 0
            engine.lora.unload_adapter(names[0])  # rank1: the rows below use adapters still loaded
            again = engine.generate(input_ids=batch[2:6], sampling_params=GREEDY, lora_path=ORDER[2:6])
            assert [r["output_ids"] for r in again] == expected[2:6]
        finally:
            engine.shutdown()


def test_tp2_dummy_1b_next_token_distribution_matches_tp1():
    """float32, Llama-3.2-1B shape, dummy weights (drawn whole, each rank keeping its part): the 20
    most likely first tokens at tp 2 are tp 1's, with log-probabilities within 1e-3."""
    batch = [list(range(10 + i, 42 + i)) for i in range(6)]
    params = {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True, "top_logprobs_num": 20}
    tops = {}
    for size in (1, 2):
        engine = _engine(
            model_path=str(CONFIGS / "llama-3.2-1b"),
            load_format="dummy",
            dtype="float32",
            max_total_tokens=4096,
            tp_size=size,
        )
        try:
            results = engine.generate(input_ids=batch, sampling_params=params)
            tops[size] = [{tok: lp for lp, tok in r["meta_info"]["output_top_logprobs"][0]} for r in results]
        finally:
            engine.shutdown()
    for one, two in zip(tops[1], tops[2]):
        shared = set(one) & set(two)
        assert len(shared) >= 18  # near-ties at the 20th place may swap
        assert max(abs(one[t] - two[t]) for t in shared) < 1e-3
