"""``--tp-size 2`` on CPU with gloo: the serving process is rank 0 and one worker process is rank 1.

Oracles: PEFT's mixed-batch greedy generate and the same engine at ``--tp-size 1`` (tokens
identical, log-probabilities within 1e-4), with mixed adapters and base rows, adapters cycling
through fewer slots than adapters, and adapters loaded and unloaded while requests run. A worker
that dies takes the serving process down with a message (checked in a subprocess), and sizes the
tensor-parallel degree does not divide are refused naming the size.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from test_multi_lora import ADAPTERS, GREEDY, peft_generate, prompts, setup  # noqa: F401 (fixture)

from loraserve.engine.engine import Engine
from loraserve.errors import ConfigError
from loraserve.settings import make_settings

ORDER = [None, "rank1", "rank3_rslora", "patterns", None, "one_layer", "rank1", "patterns"]


def tp_engine(base, paths, tp_size, **kwargs):
    return Engine(
        make_settings(
            model_path=base,
            device="cpu",
            max_total_tokens=1024,
            tp_size=tp_size,
            lora_paths=[f"{n}={p}" for n, p in paths.items()],
            **kwargs,
        )
    )


def logprobs(result) -> list[float]:
    return [lp for lp, _ in result["meta_info"]["output_token_logprobs"]]


def test_tp2_matches_tp1_and_peft_with_cycling_adapters(setup):
    base, paths, peft = setup
    batch = prompts(len(ORDER), seed=51)
    expected, _ = peft_generate(peft, batch, ORDER)
    results = {}
    for size, sync in ((2, False), (2, True), (1, False)):  # tp 2 overlapped (workers resolve the tokens), sync
        engine = tp_engine(
            base, paths, size, max_loras_per_batch=3, max_running_requests=4, disable_overlap_schedule=sync
        )
        try:
            assert (engine.tp is not None) == (size > 1) and engine.overlap == (not sync)
            key = "sync" if sync else size
            results[key] = engine.generate(input_ids=batch, sampling_params=GREEDY, lora_path=ORDER)
            assert engine.lora.metrics["gpu_evictions"] > 0  # more adapters than slots: slots were refilled
            engine.lora.check_integrity()
        finally:
            engine.shutdown()
    assert [r["output_ids"] for r in results[2]] == expected
    assert [r["output_ids"] for r in results["sync"]] == expected
    assert [r["output_ids"] for r in results[1]] == expected
    for a, b in zip(results[2], results[1]):
        assert max(abs(x - y) for x, y in zip(logprobs(a), logprobs(b))) < 1e-4


def test_tp2_dynamic_load_and_unload_during_generation(setup):
    base, paths, peft = setup
    names = list(ADAPTERS)
    first = {n: paths[n] for n in names[:2]}
    engine = tp_engine(base, first, 2, max_loras_per_batch=3, lora_target_modules=["all"], max_lora_rank=8)
    try:
        long = dict(GREEDY, max_new_tokens=100)  # long enough to be still decoding while adapters come and go
        batch = prompts(2, seed=52)
        box = {}
        runner = threading.Thread(
            target=lambda: box.update(r=engine.generate(input_ids=batch, sampling_params=long, lora_path=names[:2]))
        )
        runner.start()
        engine.lora.load_adapter(names[2], paths[names[2]])
        late = engine.generate(input_ids=prompts(1, seed=53), sampling_params=GREEDY, lora_path=[names[2]])
        assert runner.is_alive()  # the load and the late request happened during the long generation
        runner.join()
        engine.lora.unload_adapter(names[0])
        engine.lora.load_adapter(names[3], paths[names[3]])
        after = engine.generate(input_ids=prompts(2, seed=54), sampling_params=GREEDY, lora_path=[names[3], names[1]])
        # greedy: the first tokens of a longer generation are the shorter generation
        first = [r["output_ids"][: GREEDY["max_new_tokens"]] for r in box["r"]]
        for got, order, seed in (
            (first, names[:2], 52),
            ([r["output_ids"] for r in late], [names[2]], 53),
            ([r["output_ids"] for r in after], [names[3], names[1]], 54),
        ):
            expected, _ = peft_generate(peft, prompts(len(order), seed=seed), order)
            assert got == expected, order
        assert names[0] not in engine.lora.registry.names()
        engine.lora.check_integrity()
    finally:
        engine.shutdown()


def test_sizes_not_divisible_by_tp_size_are_refused(setup):
    base, paths, _ = setup  # 4 heads, 2 KV heads: --tp-size 4 cannot split the KV heads
    with pytest.raises(ConfigError) as err:
        tp_engine(base, {}, 4)
    msg = str(err.value)
    assert "--tp-size 4" in msg and "2" in msg and "not divisible" in msg


def test_bad_backend_is_refused_before_any_worker_starts(setup):
    base, paths, _ = setup
    with pytest.raises(ConfigError) as err:
        tp_engine(base, paths, 2, lora_backend="cutlass")
    assert "'cutlass'" in str(err.value)


def test_dead_worker_takes_the_server_down_with_a_message(setup, tmp_path):
    base, _, _ = setup
    script = tmp_path / "serve.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, signal, sys, time
        from loraserve.engine.engine import Engine
        from loraserve.settings import make_settings
        engine = Engine(make_settings(model_path={base!r}, device="cpu", max_total_tokens=256, tp_size=2))
        engine.generate(input_ids=[1, 2, 3], sampling_params={{"max_new_tokens": 2}})
        os.kill(engine.tp.procs[0].pid, signal.SIGKILL)
        time.sleep(60)
        print("still running", flush=True)
    """)
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 70, proc.stderr[-2000:]
    assert "tensor-parallel worker rank 1 exited" in proc.stderr and "still running" not in proc.stdout


def test_steps_carry_rows_not_block_lists():
    """A running request's step entry names its block-table row, not its blocks; the worker's stand-in
    reads the blocks its replayed table holds for that row (a chunk without a row still sends them)."""
    from types import SimpleNamespace

    from loraserve.engine.tp import describe_chunks, rebuild_chunks
    from loraserve.sched.scheduler import ScheduledChunk

    def req(blocks, n):
        return SimpleNamespace(
            blocks=blocks, num_tokens=n, adapter_ref=None, token_slice=lambda a, b: list(range(a, b))
        )

    chunks = [ScheduledChunk(req([5, 6, 7], 40), 39, 1, table_row=3), ScheduledChunk(req([1], 9), 0, 9)]
    described = describe_chunks(chunks)
    assert [d[3:5] for d in described] == [(3, None), (-1, [1])]
    rebuilt = rebuild_chunks(described, {3: [5, 6, 7]})
    assert [(c.table_row, c.request.blocks, c.start, c.num_tokens, c.samples) for c in rebuilt] == [
        (3, [5, 6, 7], 39, 1, True),
        (-1, [1], 0, 9, True),
    ]
    assert rebuilt[0].request.token_slice(39, 40) == [39]


def test_tp2_dora_matches_peft(tmp_path):
    """DoRA at --tp-size 2: column-parallel projections (qkv, gate_up) take their own rows' scales,
    row-parallel ones (o, down) sum the ranks' partial norms at each slot fill; with fewer slots than
    adapters the fills (and their collective) repeat. Tokens and log-probabilities equal PEFT's. With
    rank 0's GPU store on: the plain adapter is refilled from it, the DoRA ones skip it."""
    import torch
    from lora_utils import tiny_llama_config, tiny_model
    from test_dora import ROWS, _case, peft_rows
    from test_multi_lora import assert_matches_peft

    base, paths, peft = _case(tiny_model(tiny_llama_config(), seed=0), tmp_path)
    batch = torch.randint(0, 256, (len(ROWS), 5), generator=torch.Generator().manual_seed(5)).tolist()
    expected, expected_lp = peft_rows(peft, batch, ROWS)
    engine = tp_engine(base, paths, 2, max_loras_per_batch=2, max_running_requests=3, lora_gpu_store_gib=0.001)
    try:
        results = engine.generate(input_ids=batch, sampling_params=GREEDY, lora_path=ROWS)
        results += engine.generate(input_ids=batch, sampling_params=GREEDY, lora_path=ROWS)
        assert engine.lora.metrics["gpu_evictions"] > 0
        assert [key[0] for key in engine.lora.store.entries] == ["plain"] and engine.lora.store.metrics["store_hits"]
        engine.lora.check_integrity()
    finally:
        engine.shutdown()
    assert_matches_peft(results, expected * 2, expected_lp * 2, ROWS * 2, "tp2 dora")


def test_tp2_compositions_match_peft_cat(tmp_path):
    """Weighted compositions at --tp-size 2: each fill of a composition's slot carries its components,
    which the worker reads and composes itself. Equal to PEFT's add_weighted_adapter(..., "cat")."""
    from lora_utils import tiny_llama_config, tiny_model
    from test_adapter_composition import ADAPTERS as COMPONENTS
    from test_adapter_composition import MIX2, MIX3
    from test_multi_lora import _family_case

    model = tiny_model(tiny_llama_config(), seed=0)
    model.generation_config.eos_token_id = None
    base, paths, peft = _family_case(model, tmp_path, COMPONENTS, seed=40)
    for label, mix in (("mix2", MIX2), ("mix3", MIX3)):
        peft.add_weighted_adapter([c["name"] for c in mix], [c["weight"] for c in mix], label, combination_type="cat")
    ours, theirs = [MIX2, "c1", None, MIX3, MIX2, "c3"], ["mix2", "c1", None, "mix3", "mix2", "c3"]
    batch = prompts(len(ours), seed=7)
    expected, _ = peft_generate(peft, batch, theirs)
    engine = tp_engine(base, paths, 2, max_lora_rank=8, lora_target_modules=["all"], max_loras_per_batch=3)
    try:
        results = engine.generate(input_ids=batch, sampling_params=GREEDY, lora_path=ours)
        assert engine.lora.metrics["gpu_evictions"] > 0  # composition slots were refilled too
        engine.lora.check_integrity()
    finally:
        engine.shutdown()
    assert [r["output_ids"] for r in results] == expected
