"""A soak over HTTP (benchmarks/soak.py with small numbers): a few hundred concurrent requests on all
three generation routes, streamed and not, over the base model and adapters that keep being evicted
from too few GPU slots and a too small host cache, with a KV cache small enough that requests queue,
some streams abandoned midway and one more adapter loaded and unloaded all the while. No request may
be lost (every one not abandoned ends in a complete 200, or a 404 for the churned adapter while it is
unloaded), every greedy output equals its reference from the idle server, and afterwards the engine
holds no KV block, request or adapter reference and its LoRA pools pass check_integrity()."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import soak  # noqa: E402

REQUESTS = 300
CONCURRENCY = 8


@pytest.mark.slow
def test_soak_loses_nothing_and_leaves_the_engine_clean(tmp_path, capsys):
    out = tmp_path / "soak.json"
    soak.main(
        [
            "--requests",
            str(REQUESTS),
            "--concurrency",
            str(CONCURRENCY),
            "--duration-s",
            "120",
            "--device",
            "cpu",
            "--work-dir",
            str(tmp_path / "work"),
            "--output-file",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    rss = result["rss_mib"]
    with capsys.disabled():
        print(
            f"\nsoak: {result['counts']} in {result['wall_s']:.1f} s; RSS before {rss['before_soak']:.0f} MiB, "
            f"after {rss['after_soak']:.0f} MiB (growth {rss['growth']:+.0f} MiB, peak {rss['peak']:.0f} MiB)"
        )

    counts = result["counts"]
    assert counts["failed"] == 0, json.dumps(result["failures"], indent=1)
    assert counts["sent"] == counts["planned"] == REQUESTS and counts["hung_threads"] == 0
    assert counts["ok"] + counts["absent"] + counts["abandoned"] == REQUESTS
    # every route, streamed and not, answered; streams were abandoned; the churned adapter came and went
    assert all(kind["ok"] > 0 for kind in result["by_kind"].values()), result["by_kind"]
    assert counts["abandoned"] > 0
    assert result["server_finish_reasons"].get("abort", 0) > 0  # some abandoned streams were still running
    assert result["churn"]["loads"] >= 2 and result["churn"]["unloads"] >= 2
    # the pools were too small: adapters were evicted from GPU slots, and requests waited for KV blocks
    assert result["lora_counters"]["gpu_evictions"] > 0
    assert result["queue"]["max_waiting"] > 0
    # the references tell the adapters apart, so serving one with another's weights would be caught
    served = result["config"]["num_adapters"] + 2  # the base model, the adapters and the churned one
    distinct = result["distinct_outputs_per_prompt"]
    assert all(n == served for n in distinct.values()), distinct
    state = result["final_state"]
    assert state["clean"], state
    assert state["kv_free"] == state["kv_blocks"] and state["running"] == state["waiting"] == 0
    assert state["errors"] == [] and state["adapters_held"] == {} and state["adapters_pending"] == []
    assert result["passed"]
    assert rss["before_soak"] > 0 and rss["after_soak"] > 0
