"""benchmarks/bench_prefix_cache.py on a tiny random Llama on CPU in float32: every (workload, cache)
run is in the JSON with exact token counts, the cache serves cached tokens only where prompts share
a prefix and only when it is on, and greedy output ids are identical with the cache on and off
(the oracle: the engine with the cache off). Also the workloads' shape, the on/off comparison
catching a mismatch, and Poisson arrivals through ``generate_async`` with both engines alternating.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from lora_utils import tiny_llama_config

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_prefix_cache  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

SYSTEM, UNIQUE, OUT, PROMPTS, TURN = 48, 8, 4, 6, 16
RUN = [
    *("--system-len", str(SYSTEM), "--unique-len", str(UNIQUE), "--output-len", str(OUT)),
    *("--num-prompts", str(PROMPTS), "--num-adapters", "2", "--lora-rank", "3"),
    *("--conversations", "2", "--turns", "2", "--turn-len", str(TURN)),
    *("--device", "cpu", "--dtype", "float32", "--seed", "3", "--warmup-requests", "2"),
    # one prompt per prefill step: the tiny workload would otherwise be prefilled in a single step, before
    # any system prompt is cached
    *("--engine-setting", "max_prefill_tokens=64"),
]


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench-prefix-cache")
    tiny_llama_config().save_pretrained(path)  # a bare config: random (dummy) weights
    return path


@pytest.fixture(scope="module")
def recorded(config_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-prefix-cache-out")
    argv = ["--config-dir", str(config_dir), *RUN, "--record-outputs"]
    result = bench_prefix_cache.main([*argv, "--output-file", str(out / "r.json"), "--markdown", str(out / "r.md")])
    return result, out


def test_every_run_is_recorded_with_exact_counts(recorded):
    result, out = recorded
    written = json.loads((out / "r.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["benchmark"] == "prefix_cache" and written["device"] == "cpu"
    assert {"python", "torch", "transformers", "loraserve"} <= set(written["versions"])
    assert written["config"]["arrivals"].startswith("all at once")
    runs = {(r["workload"], r["cache"]): r for r in written["runs"]}
    assert sorted(runs) == sorted((w, c) for w in bench_prefix_cache.WORKLOADS for c in (True, False))
    # multi_turn: turn 1 is TURN tokens, turn 2 adds turn 1's output and TURN new tokens
    inputs = {"shared_prefix": PROMPTS * (SYSTEM + UNIQUE), "no_sharing": PROMPTS * (SYSTEM + UNIQUE)}
    inputs["multi_turn"] = 2 * TURN + 2 * (TURN + OUT + TURN)
    outputs = {"shared_prefix": PROMPTS * OUT, "no_sharing": PROMPTS * OUT, "multi_turn": 4 * OUT}
    for (workload, _), run in runs.items():
        assert (run["input_tokens"], run["output_tokens"]) == (inputs[workload], outputs[workload])
        assert run["input_throughput"] == pytest.approx(inputs[workload] / run["wall_s"])
        assert 0 < run["ttft_median_ms"] <= run["ttft_p90_ms"] <= run["ttft_p99_ms"]
    assert [t["workload"] for t in written["targets"]] == ["shared_prefix", "shared_prefix", "no_sharing"]
    assert all(isinstance(t["met"], bool) and "by" in t["summary"] for t in written["targets"])
    table = (out / "r.md").read_text()
    assert table.count("| shared_prefix |") == 2 and "| no_sharing: input throughput" in table


def test_cached_tokens_only_where_prompts_share_and_only_with_the_cache_on(recorded):
    result, _ = recorded
    runs = {(r["workload"], r["cache"]): r for r in result["runs"]}
    assert runs["shared_prefix", True]["cached_fraction"] > 0
    assert runs["multi_turn", True]["cached_fraction"] > 0
    assert runs["no_sharing", True]["cached_fraction"] == 0
    for workload in bench_prefix_cache.WORKLOADS:
        assert runs[workload, False]["cached_fraction"] == 0 and runs[workload, False]["prefix_cache"] is None
    on = runs["shared_prefix", True]
    # block-aligned hits within the system prompts, as the engine's own counter says
    assert on["cached_tokens"] == on["prefix_cache"]["hit_tokens"] > 0
    assert on["cached_tokens"] <= (PROMPTS - 1) * SYSTEM


def test_outputs_identical_with_the_cache_on_and_off(recorded):
    result, _ = recorded
    assert result["outputs_identical"] is True
    assert all(r["outputs_identical"] and r["mismatched_requests"] == 0 for r in result["ratios"])
    outputs = {(o["workload"], o["cache"]): o["requests"] for o in result["outputs"]}
    for workload in bench_prefix_cache.WORKLOADS:
        on, off = outputs[workload, True], outputs[workload, False]
        assert [r["output_ids"] for r in on] == [r["output_ids"] for r in off]
        assert all(len(r["output_ids"]) == OUT for r in on)
    digests = {(r["workload"], r["cache"]): r["outputs_digest"] for r in result["runs"]}
    assert digests["shared_prefix", True] == digests["shared_prefix", False] != digests["no_sharing", True]


def test_compare_catches_a_changed_token():
    on = {"workload": "w", "input_throughput": 30.0, "output_throughput": 3.0, "wall_s": 1.0}
    on |= {"ttft_median_ms": 10.0, "ttft_p99_ms": 20.0, "_outputs": [[1, 2], [3, 4], [5, 6]]}
    off = {**on, "input_throughput": 10.0, "ttft_median_ms": 40.0, "_outputs": [[1, 2], [3, 5], [5, 6]]}
    ratio = bench_prefix_cache.compare(on, off)
    assert (ratio["outputs_identical"], ratio["mismatched_requests"], ratio["first_mismatch"]) == (False, 1, 1)
    assert ratio["input_throughput_ratio"] == 3.0 and ratio["ttft_median_ratio"] == 0.25
    targets = bench_prefix_cache.check_targets({"shared_prefix": ratio})
    assert [(t["met"], round(t["margin"], 3)) for t in targets] == [(True, 0.0), (True, 0.25)]
    assert bench_prefix_cache.compare(on, {**on})["outputs_identical"] is True


def test_workloads_share_exactly_what_they_say(config_dir):
    args = bench_prefix_cache.build_parser().parse_args(["--config-dir", str(config_dir), *RUN])
    shared = bench_prefix_cache.shared_prefix_requests(args, 256)
    random = bench_prefix_cache.no_sharing_requests(args, 256)
    assert [r.lora_name for r in shared] == [r.lora_name for r in random]
    assert {r.lora_name for r in shared} == {"lora0", "lora1"}
    assert all(r.input_len == SYSTEM + UNIQUE for r in shared + random)
    systems = {r.lora_name: r.input_ids[:SYSTEM] for r in shared}
    assert all(r.input_ids[:SYSTEM] == systems[r.lora_name] for r in shared)
    assert systems["lora0"] != systems["lora1"]
    assert len({tuple(r.input_ids[SYSTEM:]) for r in shared}) == PROMPTS
    assert len({tuple(r.input_ids[:16]) for r in random}) == PROMPTS
    warmup = [r.input_ids[:16] for batch in bench_prefix_cache.warmup_requests(args, 256) for r in batch]
    assert not {tuple(w) for w in warmup} & {tuple(r.input_ids[:16]) for r in shared + random}

    next_round = bench_prefix_cache.Conversations(args, 256).rounds()
    first = next_round(None)
    second = next_round([{"output_ids": [7] * OUT}, {"output_ids": [9] * OUT}])
    for a, b, token in zip(first, second, (7, 9)):
        assert b.input_ids[: a.input_len] == a.input_ids and b.lora_name == a.lora_name
        assert b.input_ids[a.input_len : a.input_len + OUT] == [token] * OUT and b.input_len == 2 * TURN + OUT


def test_poisson_arrivals_and_interleaved_repeats_send_the_same_requests(config_dir, recorded):
    extra = ["--workloads", "shared_prefix", "--request-rate", "400", "--interleave", "--repeats", "2"]
    result = bench_prefix_cache.main(["--config-dir", str(config_dir), *RUN, *extra])
    assert result["config"]["arrivals"].startswith("Poisson") and result["config"]["request_rate"] == 400
    assert result["config"]["order"].startswith("both engines at once")
    for run in result["runs"]:
        assert len(run["wall_s_repeats"]) == 2 and run["wall_s"] in run["wall_s_repeats"]
        assert run["repeats_identical"] is True
    digests = {r["cache"]: r["outputs_digest"] for r in result["runs"]}
    before = {r["cache"]: r["outputs_digest"] for r in recorded[0]["runs"] if r["workload"] == "shared_prefix"}
    assert digests == before
    assert [t["workload"] for t in result["targets"]] == ["shared_prefix", "shared_prefix"]
