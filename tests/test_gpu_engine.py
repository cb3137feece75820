"""The engine on a CUDA GPU: float32 greedy tokens identical to PEFT (mixed adapters and base rows),
bfloat16 close to float32. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from test_multi_lora import ADAPTERS, GREEDY, peft_generate, prompts, setup  # noqa: F401 (fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def cuda_engine(base, paths, dtype):
    from loraserve.engine import Engine
    from loraserve.settings import make_settings

    return Engine(make_settings(model_path=base, device="cuda", dtype=dtype, max_total_tokens=2048,
                                lora_backend="torch", lora_paths=[f"{n}={p}" for n, p in paths.items()]))


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
