"""The overlap-loading benchmark driver (benchmarks/bench_overlap_loading.py) end to end on CPU: it
writes random adapters, starts a real server per setting, runs the serving benchmark against it and
reads the server's copy counters back from /metrics. On CPU the flag has no effect, so both runs fill
slots synchronously; what is checked is that every request completed and the counters are the
server's own."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_overlap_loading  # noqa: E402
from lora_utils import tiny_llama_config  # noqa: E402
from server_runs import free_port, parse_counters  # noqa: E402


def test_parse_counters_reads_the_lora_totals():
    text = "\n".join(
        [
            "# HELP loraserve_lora_slot_fills_total x",
            "loraserve_lora_slot_fills_total 7.0",
            "loraserve_lora_copied_bytes_total 1.5e+06",
            'loraserve_lora_evictions_total{tier="gpu"} 3.0',
            'loraserve_lora_evictions_total{tier="host"} 9.0',
            "loraserve_lora_slot_fills_created 1.7e9",
        ]
    )
    assert parse_counters(text) == {"slot_fills": 7.0, "copied_bytes": 1.5e6, "evictions": 3.0}


def test_driver_runs_both_settings_against_real_servers(tmp_path):
    tiny_llama_config().save_pretrained(tmp_path / "config")
    out = tmp_path / "overlap.json"
    result = bench_overlap_loading.main(
        [
            "--config-dir",
            str(tmp_path / "config"),
            "--ranks",
            "4",
            "--num-adapters",
            "4",
            "--weight-copies",
            "2",
            "--max-loaded-loras",
            "4",
            "--max-loras-per-batch",
            "2",
            "--num-prompts",
            "8",
            "--input-len",
            "12",
            "--output-len",
            "4",
            "--request-rate",
            "50",
            "--warmup-requests",
            "1",
            "--port",
            str(free_port()),
            "--work-dir",
            str(tmp_path / "work"),
            "--output-file",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    assert [(r["rank"], r["overlap"]) for r in result["summary"]] == [(4, False), (4, True)]
    for row, run in zip(result["summary"], result["runs"]):
        assert row["completed"] == 8 and row["failed"] == 0
        # 4 adapters round robin through 2 slots (one may go to nobody else): every run refills slots
        assert row["lora_slot_fills"] >= 4 and row["lora_evictions"] >= 2
        assert row["lora_copied_bytes"] > 0
        assert ("--enable-lora-overlap-loading" in run["doc"]["server"]["command"]) == row["overlap"]
    assert set(result["on_over_off"][0]) >= {"rank", "ttft_median_ms_on_over_off", "e2e_median_ms_on_over_off"}
