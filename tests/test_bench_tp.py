"""The tensor-parallel benchmark driver (benchmarks/bench_tp.py) end to end on CPU: a real server at
--tp-size 1 and at --tp-size 2 (gloo), the serving benchmark against each, and the engine's step
counters read back from /metrics. The collective timing needs GPUs and is skipped here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_tp  # noqa: E402
from lora_utils import tiny_llama_config  # noqa: E402
from server_runs import parse_step_times  # noqa: E402


def test_parse_step_times():
    page = "\n".join(
        [
            'loraserve_engine_steps_total{kind="decode"} 4.0',
            'loraserve_engine_step_seconds_total{kind="decode"} 0.2',
            'loraserve_engine_steps_total{kind="prefill"} 0.0',
            'loraserve_engine_step_seconds_total{kind="prefill"} 0.0',
        ]
    )
    steps = parse_step_times(page)
    assert steps["decode"] == {"steps": 4.0, "seconds": 0.2, "mean_ms": 50.0}
    assert steps["prefill"]["mean_ms"] is None


def test_driver_runs_tp1_and_tp2_servers(tmp_path):
    tiny_llama_config().save_pretrained(tmp_path / "config")
    out = tmp_path / "tp.json"
    result = bench_tp.main(
        [
            "--config-dir",
            str(tmp_path / "config"),
            "--tp-sizes",
            "1",
            "2",
            "--num-adapters",
            "2",
            "--rank",
            "4",
            "--num-prompts",
            "6",
            "--input-len",
            "10",
            "--output-len",
            "4",
            "--max-concurrency",
            "3",
            "--warmup-requests",
            "1",
            "--work-dir",
            str(tmp_path / "work"),
            "--output-file",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert [r["tp_size"] for r in saved["summary"]] == [1, 2]
    for row, run in zip(result["summary"], result["runs"]):
        assert row["completed"] == 6 and row["failed"] == 0
        # every request decodes 3 tokens after its prefill step: at least 3 decode steps were counted
        assert row["decode_steps"] >= 3 and row["decode_step_ms"] > 0 and row["prefill_step_ms"] > 0
        assert run["doc"]["server"]["command"][run["doc"]["server"]["command"].index("--tp-size") + 1] == str(
            row["tp_size"]
        )
    assert result["decode_collectives_ms"] == {}  # no GPUs here
