"""The serving benchmark (benchmarks/bench_serving.py) and its workload generator (benchmarks/workloads.py):
exact lengths, reproducible seeds, each adapter distribution's property, Poisson gaps; then real runs
against a tiny model served over HTTP with two PEFT adapters, checked against the workload sent."""

from __future__ import annotations

import asyncio
import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_serving  # noqa: E402
from workloads import make_workload, poisson_arrival_times, sample_lora_names  # noqa: E402

NAMES = ["a0", "a1", "a2", "a3"]


class FakeTokenizer:
    """What make_workload reads from a tokenizer: its length and its special ids."""

    all_special_ids = [0, 1, 2, 40]

    def __len__(self) -> int:
        return 50


def test_lengths_are_exact_and_ids_in_range():
    work = make_workload(37, 13, 5, vocab_size=97, lora_names=NAMES, distribution="uniform", seed=3)
    assert len(work) == 37
    assert all(s.input_len == 13 and s.output_len == 5 for s in work)
    ids = np.array([t for s in work for t in s.input_ids])
    assert ids.min() >= 0 and ids.max() < 97 and len(np.unique(ids)) > 80  # spread over the vocabulary
    low = make_workload(20, 9, 1, vocab_size=97, seed=3, low=90)
    assert all(90 <= t < 97 for s in low for t in s.input_ids)
    assert all(s.lora_name is None for s in low)
    assert work[0].sampling_params() == {"max_new_tokens": 5, "ignore_eos": True, "temperature": 0}


def test_range_ratio_and_tokenizer_special_ids():
    work = make_workload(400, 20, 10, vocab_size=500, seed=5, range_ratio=0.5)
    ins, outs = [s.input_len for s in work], [s.output_len for s in work]
    assert min(ins) == 10 and max(ins) == 20 and min(outs) == 5 and max(outs) == 10
    tok = make_workload(200, 7, 1, vocab_size=500, seed=5, tokenizer=FakeTokenizer())
    used = {t for s in tok for t in s.input_ids}
    assert used <= set(range(50)) - {0, 1, 2, 40}  # below len(tokenizer), no special ids
    assert len(used) > 40


def test_seed_reproduces_and_changes_the_workload():
    args = (25, 11, 3, 1000, NAMES, "skewed")
    assert make_workload(*args, seed=7) == make_workload(*args, seed=7)
    assert make_workload(*args, seed=7) != make_workload(*args, seed=8)
    # independent streams: the prompts do not depend on how adapters are picked
    uniform = make_workload(25, 11, 3, 1000, NAMES, "uniform", seed=7)
    assert [s.input_ids for s in uniform] == [s.input_ids for s in make_workload(*args, seed=7)]
    assert poisson_arrival_times(50, 3.0, seed=2) == poisson_arrival_times(50, 3.0, seed=2)
    assert poisson_arrival_times(50, 3.0, seed=2) != poisson_arrival_times(50, 3.0, seed=4)


def test_distinct_cycles_through_every_adapter():
    names = sample_lora_names(11, NAMES[:3], "distinct")
    assert names == ["a0", "a1", "a2"] * 3 + ["a0", "a1"]
    assert all(x != y for x, y in zip(names, names[1:]))


def test_uniform_covers_all_adapters_evenly():
    counts = Counter(sample_lora_names(4000, NAMES, "uniform", seed=11))
    assert set(counts) == set(NAMES)
    assert all(abs(c / 4000 - 0.25) < 0.03 for c in counts.values())


@pytest.mark.parametrize("alpha", [1.2, 1.5, 3.0])
def test_skewed_follows_sglang_zipf_weights(alpha):
    n = 20000
    counts = Counter(sample_lora_names(n, NAMES, "skewed", zipf_alpha=alpha, seed=13))
    assert counts.most_common(1)[0][0] == "a0"
    weights = [alpha**-i for i in range(len(NAMES))]  # SGLang: adapter i gets alpha times adapter i+1
    for i, name in enumerate(NAMES):
        expected = weights[i] / sum(weights)
        assert abs(counts[name] / n - expected) < 4 * math.sqrt(expected * (1 - expected) / n) + 1e-3, name


def test_invalid_inputs_name_the_value():
    with pytest.raises(ValueError, match="zipf_alpha=0.5"):
        sample_lora_names(3, NAMES, "skewed", zipf_alpha=0.5)
    with pytest.raises(ValueError, match="distribution='pareto'"):
        make_workload(3, 4, 4, 100, NAMES, "pareto")
    with pytest.raises(ValueError, match="input_len=0"):
        make_workload(3, 0, 4, 100)
    with pytest.raises(ValueError, match="request_rate=0"):
        poisson_arrival_times(3, 0)


def test_poisson_arrivals_have_mean_gap_one_over_rate():
    times = np.array(poisson_arrival_times(20001, 4.0, seed=17))
    gaps = np.diff(times)
    assert times[0] == 0.0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() == pytest.approx(0.25, rel=0.05)  # exponential: std equals mean
    assert poisson_arrival_times(5, math.inf) == [0.0] * 5


def _sse(*events) -> bytes:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events).encode()


def _replay(body: bytes, status: int = 200):
    """send_request against a fake /generate that answers ``body`` (an SSE stream)."""
    import httpx

    async def go():
        transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))
        async with httpx.AsyncClient(transport=transport, base_url="http://fake") as client:
            return await bench_serving.send_request(client, make_workload(1, 3, 4, 100, seed=1)[0], 0, True)

    return asyncio.run(go())


def test_multi_token_chunks_split_their_gap_and_the_count_comes_from_meta_info():
    meta = {"finish_reason": None}
    result = _replay(
        _sse(
            {"output_ids": [], "meta_info": meta},
            {"output_ids": [5], "meta_info": meta},
            {"output_ids": [5, 6, 7], "meta_info": meta},
            {
                "output_ids": [5, 6, 7, 8],
                "meta_info": {"finish_reason": {"type": "length"}, "completion_tokens": 4, "ttft_s": 0.01},
            },
            "[DONE]",
        )
    )
    assert result.success and result.error is None and result.output_len == 4 and result.server_ttft == 0.01
    assert len(result.itl) == 3 and result.itl[0] == result.itl[1]  # the 2-token chunk: two equal gaps
    assert 0 < result.ttft <= result.e2e_latency

    failed = _replay(
        _sse({"output_ids": [5], "meta_info": meta}, {"error": {"message": "boom", "code": 500}}, "[DONE]")
    )
    assert not failed.success and "boom" in failed.error and failed.ttft is None
    cut = _replay(_sse({"output_ids": [5], "meta_info": meta}, "[DONE]"))
    assert not cut.success and "ended before" in cut.error
    refused = _replay(json.dumps({"error": {"message": "adapter 'x' is not loaded"}}).encode(), status=400)
    assert not refused.success and refused.error == "HTTP 400: adapter 'x' is not loaded"


@pytest.fixture(scope="module")
def server():
    from http_fixtures import RunningServer, make_engine

    running = RunningServer(make_engine(adapters=["alpha", "beta"]))
    yield running
    running.stop()


def test_run_benchmark_against_a_real_server(server, tmp_path):
    vocab = server.engine.model.vocab_size
    work = make_workload(6, 8, 4, vocab, ["alpha", "beta"], "distinct", seed=1, tokenizer=server.engine.tokenizer)
    out = tmp_path / "results.json"
    doc = asyncio.run(
        bench_serving.run_benchmark(
            server.url, work, max_concurrency=3, seed=1, output_file=out, config={"note": "test"}, details=True
        )
    )
    res = doc["results"]
    assert res["completed"] == 6 and res["failed"] == 0 and doc["errors"] == []
    assert res["total_input_tokens"] == 48 and res["total_output_tokens"] == 24
    assert res["output_len_mismatches"] == 0 and 1 <= res["peak_concurrency"] <= 3
    reqs = doc["requests"]
    assert [r["output_len"] for r in reqs] == [4] * 6
    assert [r["lora_name"] for r in reqs] == ["alpha", "beta"] * 3
    for r in reqs:
        assert r["success"] and 0 < r["ttft"] <= r["e2e_latency"]
        assert len(r["itl"]) == 3  # one chunk per token on this server: a gap for each token after the first
        assert sum(r["itl"]) == pytest.approx(r["e2e_latency"] - r["ttft"], abs=0.01)
    for name in ("ttft", "tpot", "itl", "e2e_latency"):
        for stat in ("mean", "median", "p90", "p99"):
            assert res[f"{stat}_{name}_ms"] is not None and res[f"{stat}_{name}_ms"] >= 0
    assert res["mean_ttft_ms"] <= res["mean_e2e_latency_ms"]
    assert res["request_throughput"] == pytest.approx(6 / res["duration"])
    assert res["output_throughput"] == pytest.approx(24 / res["duration"])
    # the same meta_info the server reported for a request of this workload, through the Python API
    ref = server.engine.generate(
        input_ids=work[0].input_ids, sampling_params=work[0].sampling_params(), lora_path=work[0].lora_name
    )
    assert ref["meta_info"]["completion_tokens"] == reqs[0]["output_len"]
    saved = json.loads(out.read_text())
    assert saved["results"] == res and saved["config"]["note"] == "test"
    assert saved["config"]["max_concurrency"] == 3 and saved["config"]["request_rate"] == "inf"
    assert saved["server"]["model_info"]["served_model_name"] == "tiny"
    assert {m["id"] for m in saved["server"]["models"]["data"]} >= {"alpha", "beta"}
    assert saved["loraserve_version"] and saved["date"]
    assert saved["workload"]["requests_per_adapter"] == {"alpha": 3, "beta": 3}


def test_cli_counts_failed_requests_and_keeps_their_errors(server, tmp_path, capsys):
    out = tmp_path / "cli.json"
    code = bench_serving.main(
        [
            "--base-url",
            server.url,
            "--num-prompts",
            "3",
            "--random-input-len",
            "5",
            "--random-output-len",
            "3",
            "--lora-name",
            "beta",
            "missing",
            "--lora-request-distribution",
            "distinct",
            "--request-rate",
            "50",
            "--disable-stream",
            "--output-file",
            str(out),
            "--disable-tqdm",
            "--seed",
            "2",
        ]
    )
    assert code == 1  # a failed request fails the run
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "Failed requests:" in printed
    doc = json.loads(out.read_text())
    res = doc["results"]
    assert res["completed"] == 2 and res["failed"] == 1 and res["total_output_tokens"] == 6
    assert [e["index"] for e in doc["errors"]] == [1] and doc["errors"][0]["lora_name"] == "missing"
    assert "HTTP 4" in doc["errors"][0]["error"] and "missing" in doc["errors"][0]["error"]
    assert res["mean_ttft_ms"] is None and res["mean_e2e_latency_ms"] > 0  # no stream: only E2E is measured
    assert doc["config"]["lora_request_distribution"] == "distinct" and doc["config"]["request_rate"] == 50
