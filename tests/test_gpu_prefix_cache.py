"""The prefix cache on a CUDA GPU: shared prefixes under mixed adapters, with CUDA graphs, the Triton
attention's extend path over cached blocks and both kernel backends, give PEFT's greedy tokens
(float32) with the cache on and off, and reuse only what the same adapter computed. Skipped without a
GPU."""

from __future__ import annotations

import pytest
import torch
from test_multi_lora import ADAPTERS, peft_generate, setup  # noqa: F401 (fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NEW = 12


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("backend", ["csgmv", "triton"])
def test_cached_prefixes_under_adapters_equal_peft_with_graphs(setup, backend):
    from loraserve.engine.engine import Engine
    from loraserve.settings import make_settings

    base, paths, peft = setup
    names = list(ADAPTERS)
    system = [tokens(37, 1), tokens(37, 2)]
    rows = [(0, names[0]), (1, names[1]), (0, None), (1, names[2]), (0, names[0]), (1, names[1])]
    results = {}
    for cache in (True, False):
        engine = Engine(
            make_settings(
                model_path=base,
                device="cuda",
                dtype="float32",
                max_total_tokens=4096,
                lora_backend=backend,
                cuda_graph_max_bs=16,
                disable_radix_cache=not cache,
                lora_paths=[f"{n}={p}" for n, p in paths.items()],
            )
        )
        try:
            assert engine.runner.graphs is not None
            got = []
            for round_no in range(2):  # round 1 finds what round 0 cached
                batch = [system[s] + tokens(5, 50 + 10 * round_no + i) for i, (s, _) in enumerate(rows)]
                adapters = [a for _, a in rows]
                want, _ = peft_generate(peft, batch, adapters)
                params = {"max_new_tokens": NEW, "temperature": 0, "ignore_eos": True}
                res = engine.generate(input_ids=batch, sampling_params=params, lora_path=adapters)
                assert [r["output_ids"] for r in res] == [w[:NEW] for w in want], f"cache={cache} round {round_no}"
                got.append([r["meta_info"]["cached_tokens"] for r in res])
            assert engine.runner.graphs.replays > 0
            engine.scheduler.check_integrity()
            engine.lora.check_integrity()
            results[cache] = got
        finally:
            engine.shutdown()
    assert results[False] == [[0] * len(rows)] * 2
    # round 0: rows 4 and 5 repeat rows 0 and 1 in the same batch, so they wait a step for their blocks
    assert results[True][0] == [0, 0, 0, 0, 32, 32]
    assert results[True][1] == [32] * len(rows)  # each (prompt, adapter) pair was computed in round 0
