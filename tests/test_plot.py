"""benchmarks/plot.py over the recorded results in benchmarks/results: every expected figure is written as a
PNG, a file of unknown shape is skipped with a note, and the numbers it draws are the JSON's own."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = BENCHMARKS / "results"
sys.path.insert(0, str(BENCHMARKS))

import plot  # noqa: E402

H100 = "NVIDIA_H100_80GB_HBM3"
EXPECTED = [
    f"lora_kernels_{H100}.png",
    f"lora_kernels_{H100}_chunk32.png",
    f"lora_kernels_{H100}_quick_after.png",
    f"lora_kernels_{H100}_quick_before.png",
    f"lora_kernels_{H100}_planned.png",
    f"lora_epilogue_{H100}.png",
    f"engine_steps_{H100}.png",
    f"engine_steps_{H100}_final.png",
    f"engine_steps_{H100}_fused.png",
    f"engine_steps_{H100}_tags.png",
    "tp_llama-3.1-8b_2xNVIDIA_H200.png",
    f"overlap_loading_{H100}.png",
    f"throughput_latency_{H100}.png",
    "scheduler_cpu_x86_64_2_cores.png",
    "attention_host_cpu_x86_64_2_cores.png",
    "prefix_cache_cpu_x86_64_2_cores.png",
    "store_sim.png",
    f"dora_compose_{H100}.png",
    f"store_fill_{H100}_before.png",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    out = tmp_path_factory.mktemp("plots")
    written, notes = plot.plot_all(RESULTS, out)
    return out, written, notes


@pytest.mark.parametrize("name", EXPECTED)
def test_expected_png_written(drawn, name):
    out, written, _ = drawn
    path = out / name
    assert path in written
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert 20_000 < len(data) < 400_000


def test_only_the_sweeps_are_skipped(drawn):
    out, written, notes = drawn
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)
    assert len(notes) == 2 and all("unknown shape" in n for n in notes)
    skipped = {n.split()[1].rstrip(":") for n in notes}
    assert skipped == {f"lora_kernels_sweep_{H100}.json", f"lora_epilogue_sweep_{H100}.json"}


def test_unknown_shapes_are_skipped(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "odd_dict.json").write_text(json.dumps({"device": "X", "numbers": [1, 2]}))
    (results / "odd_list.json").write_text(json.dumps([{"a": 1}]))
    (results / "broken.json").write_text("{not json")
    (results / "tp_copy.json").write_text((RESULTS / "tp_llama-3.1-8b_2xNVIDIA_H200.json").read_text())
    assert plot.main(["--results", str(results), "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == [str(tmp_path / "out" / "tp_copy.png")]
    skipped = sorted(line.split()[1].rstrip(":") for line in captured.err.splitlines())
    assert skipped == ["broken.json", "odd_dict.json", "odd_list.json"]


@pytest.mark.parametrize(
    "prefix, kind",
    [
        ("lora_kernels_", "kernels"),
        ("lora_epilogue_", "epilogue"),
        ("engine_steps_", "engine_steps"),
        ("tp_", "tp"),
        ("overlap_loading_", "overlap"),
        ("offline_", "serving"),
        ("hf_peft_", "serving"),
        ("scheduler_", "scheduler"),
        ("prefix_cache_", "prefix_cache"),
        ("routing_sim", "routing_sim"),
        ("store_sim", "store_sim"),
    ],
)
def test_kind_of_recorded_files(prefix, kind):
    paths = [p for p in RESULTS.glob(f"{prefix}*.json") if "_sweep_" not in p.name]
    assert paths
    for path in paths:
        assert plot.kind_of(json.loads(path.read_text())) == kind, path.name


def test_kernel_cases_are_the_json_numbers():
    doc = json.loads((RESULTS / f"lora_kernels_{H100}.json").read_text())
    cases = plot.kernel_cases(doc)
    assert len(cases) == len(doc["cases"]) == 1872
    for i in (0, 777, len(cases) - 1):
        raw, row = doc["cases"][i], cases[i]
        assert (row["measured_us"], row["limit_us"]) == (raw["time_us"], raw["limit_us"])
        assert (row["proj"], row["tokens"], row["adapters"], row["rank"], row["backend"]) == (
            raw["proj"],
            raw["tokens"],
            raw["adapters"],
            raw["rank"],
            raw["backend"],
        )


def test_per_layer_matches_the_markdown_summary():
    # lora_kernels_*.md, row "| decode | 64 | 64 | 16 | 104.3 | 105.0 | 84.3 | 84.3 | 72% | 72% | ...":
    # csgmv auto takes 84.3 us per layer and reaches 72% of its limit.
    doc = json.loads((RESULTS / f"lora_kernels_{H100}.json").read_text())
    cases = plot.kernel_cases(doc)
    assert plot.pick_backend(cases) == "csgmv auto"
    layers = plot.per_layer(cases)
    measured, limit = layers[("decode", 64, 64, 16, "csgmv auto")]
    assert round(measured, 1) == 84.3
    assert round(100 * limit / measured) == 72
    assert round(layers[("decode", 64, 64, 16, "triton")][0], 1) == 104.3
