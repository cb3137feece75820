"""The engine on a CUDA GPU: float32 greedy tokens identical to PEFT (mixed adapters and base rows),
bfloat16 close to float32. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from test_multi_lora import ADAPTERS, GREEDY, peft_generate, prompts, setup  # noqa: F401 (fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def cuda_engine(base, paths, dtype):
    from loraserve.engine.engine import Engine
    from loraserve.settings import make_settings

    return Engine(
        make_settings(
            model_path=base,
            device="cuda",
            dtype=dtype,
            max_total_tokens=2048,
            lora_backend="torch",
            lora_paths=[f"{n}={p}" for n, p in paths.items()],
        )
    )


def test_cuda_float32_matches_peft_and_bfloat16_is_close(setup):
    base, paths, peft = setup
    adapters = [*ADAPTERS, None, "rank1"]
    batch = prompts(len(adapters), seed=21)
    expected, expected_lp = peft_generate(peft, batch, adapters)
    fp32 = cuda_engine(base, paths, "float32")
    try:
        results = fp32.generate(input_ids=batch, sampling_params=GREEDY, lora_path=adapters)
        assert [r["output_ids"] for r in results] == expected
        fp32.kv.allocator.check_integrity()
        fp32.lora.check_integrity()
    finally:
        fp32.shutdown()
    bf16 = cuda_engine(base, paths, "bfloat16")
    try:
        results = bf16.generate(input_ids=batch, sampling_params=GREEDY, lora_path=adapters)
        for res, lps in zip(results, expected_lp):
            first = res["meta_info"]["output_token_logprobs"][0][0]
            assert abs(first - lps[0]) < 0.1  # bf16 weights and activations: close, not equal
    finally:
        bf16.shutdown()


@pytest.mark.parametrize("backend", ["csgmv", "triton"])
def test_cuda_graphs_and_kernel_backends_match_peft(setup, backend):
    """float32: the kernel backends (shrink inside the base GEMM or not), the Triton attention, and
    decode steps replayed from CUDA graphs give PEFT's greedy tokens; graphs on and off agree
    token for token and within 1e-4 in log-probability, with batches that need padding rows."""
    from loraserve.engine.engine import Engine
    from loraserve.settings import make_settings

    base, paths, peft = setup
    adapters = [*ADAPTERS, None, "rank1", "patterns"]  # 7 requests: padded to a captured size of 8
    batch = prompts(len(adapters), seed=22)
    expected, _ = peft_generate(peft, batch, adapters)
    results = {}
    for graphs in (True, False):
        engine = Engine(
            make_settings(
                model_path=base,
                device="cuda",
                dtype="float32",
                max_total_tokens=2048,
                lora_backend=backend,
                disable_cuda_graph=not graphs,
                cuda_graph_max_bs=16,
                lora_paths=[f"{n}={p}" for n, p in paths.items()],
            )
        )
        try:
            assert (engine.runner.graphs is not None) == graphs
            results[graphs] = engine.generate(input_ids=batch, sampling_params=GREEDY, lora_path=adapters)
            if graphs:
                assert engine.runner.graphs.replays >= GREEDY["max_new_tokens"] - 2
            engine.kv.allocator.check_integrity()
            engine.lora.check_integrity()
        finally:
            engine.shutdown()
    assert [r["output_ids"] for r in results[True]] == expected
    assert [r["output_ids"] for r in results[False]] == expected
    for a, b in zip(results[True], results[False]):
        la = [lp for lp, _ in a["meta_info"]["output_token_logprobs"]]
        lb = [lp for lp, _ in b["meta_info"]["output_token_logprobs"]]
        assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-4


def test_cuda_graphs_bfloat16_dummy_model_and_base_only():
    """bf16 on a Llama-3.2-1B-shaped dummy model without LoRA: greedy tokens with and without graphs
    are identical for a batch of a captured size (the same GEMM shapes, so the same kernels) and
    the graphs were replayed."""
    from pathlib import Path

    from loraserve.engine.engine import Engine
    from loraserve.settings import make_settings

    config = Path(__file__).parent.parent / "benchmarks" / "configs" / "llama-3.2-1b"
    batch = prompts(8, length=12, seed=5)
    params = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
    outs = {}
    for graphs in (True, False):
        engine = Engine(
            make_settings(
                model_path=str(config),
                load_format="dummy",
                device="cuda",
                dtype="bfloat16",
                max_total_tokens=4096,
                disable_cuda_graph=not graphs,
                cuda_graph_max_bs=8,
                random_seed=0,
            )
        )
        try:
            outs[graphs] = [r["output_ids"] for r in engine.generate(input_ids=batch, sampling_params=params)]
            if graphs:
                assert engine.runner.graphs.replays > 0
        finally:
            engine.shutdown()
    assert outs[True] == outs[False]


@pytest.mark.parametrize("backend", ["csgmv", "triton"])
def test_overlap_loading_on_cuda_streams_matches_peft(setup, backend):
    """float32, CUDA graphs on: adapters cycling through fewer slots than adapters give PEFT's greedy
    tokens with overlap loading (copies on the load stream from page-locked host copies) and
    without it; with it, every copy went through the stream and was timed on the GPU."""
    from test_overlap_loading import ORDER

    from loraserve.engine.engine import Engine
    from loraserve.lora.overlap import CudaStreamCopies
    from loraserve.settings import make_settings

    base, paths, peft = setup
    batch = prompts(len(ORDER), seed=23)
    expected, _ = peft_generate(peft, batch, ORDER)
    for overlap in (True, False):
        engine = Engine(
            make_settings(
                model_path=base,
                device="cuda",
                dtype="float32",
                max_total_tokens=2048,
                lora_backend=backend,
                cuda_graph_max_bs=8,
                max_loras_per_batch=2,
                max_running_requests=4,
                enable_lora_overlap_loading=overlap,
                lora_paths=[f"{n}={p}" for n, p in paths.items()],
            )
        )
        try:
            lora = engine.lora
            assert isinstance(lora.copy_engine, CudaStreamCopies) == overlap
            results = engine.generate(input_ids=batch, sampling_params=GREEDY, lora_path=ORDER)
            assert [r["output_ids"] for r in results] == expected, f"overlap={overlap}"
            assert engine.runner.graphs is not None and engine.runner.graphs.replays > 0
            m = lora.metrics
            assert m["slot_fills"] > len(ADAPTERS) and m["gpu_evictions"] > 0 and m["bytes_copied"] > 0
            if overlap:
                assert lora.copies_in_flight == 0 and m["copy_seconds"] > 0
                assert all(t.is_pinned() for key in lora.host.keys() for t in lora.host.get(key).tensors())
            lora.check_integrity()
        finally:
            engine.shutdown()
