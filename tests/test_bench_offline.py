"""The offline benchmarks (benchmarks/bench_offline.py, bench_hf_peft.py) and their random adapters
(benchmarks/random_adapters.py), on a tiny random Llama on CPU in float32.

The random adapters are checked against PEFT: PEFT loads them with no missing or unexpected keys,
and loraserve's PEFT loader reproduces PEFT's delta for every projection. The benchmarks are run
in-process: exact token counts, the step timer sees every step, and transformers + PEFT (the
oracle) gives each request the same greedy tokens as the engine, with left padding, variable
lengths, base rows ("__base__") and a config whose every token is EOS (both must ignore it).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from lora_utils import fused_lora_delta, peft_fused_delta, peft_module, shape_of, tiny_llama_config, tiny_model
from safetensors.torch import load_file

from loraserve.lora.targets import FUSED_MODULES
from loraserve.plugins.loader_peft.loader import PeftAdapterLoader

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_hf_peft  # noqa: E402
import bench_offline  # noqa: E402
import random_adapters  # noqa: E402
from workloads import RequestSpec, make_workload  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

ALL7 = list(random_adapters.ALL_TARGETS)
RUN = [
    "--num-prompts",
    "6",
    "--input-len",
    "8",
    "--output-len",
    "4",
    "--num-adapters",
    "2",
    "--lora-rank",
    "3",
    "--seed",
    "5",
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--record-outputs",
]


def load_in_peft(base, adapter_dirs: dict[str, Path]):
    """PEFT's view of the adapters, each loaded under its name; asserts no key is missing or unexpected."""
    from peft import PeftModel

    names = list(adapter_dirs)
    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dirs[names[0]]), adapter_name="probe")
    for name in names:
        result = peft.load_adapter(str(adapter_dirs[name]), adapter_name=name)
        assert result.missing_keys == [] and result.unexpected_keys == [], name
    return peft.eval()


# -- random adapters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,rank,alpha,targets",
    [
        ({}, 3, 5, ALL7),
        (
            {"head_dim": 24, "num_key_value_heads": 1, "intermediate_size": 80},
            5,
            None,
            ["q_proj", "v_proj", "down_proj"],
        ),
    ],
)
def test_random_adapters_load_in_peft_and_loraserve(tmp_path, overrides, rank, alpha, targets):
    config = tiny_llama_config(**overrides)
    config.save_pretrained(tmp_path / "model")
    # from a config object and from a directory: the same tensors
    paths = random_adapters.write_random_adapters(
        config, tmp_path / "a", 2, rank=rank, alpha=alpha, target_modules=targets, seed=4
    )
    again = random_adapters.write_random_adapters(
        tmp_path / "model", tmp_path / "b", 2, rank=rank, alpha=alpha, target_modules=targets, seed=4
    )
    assert list(paths) == ["lora0", "lora1"]
    for name in paths:
        first = load_file(str(paths[name] / "adapter_model.safetensors"))
        second = load_file(str(again[name] / "adapter_model.safetensors"))
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first)

    base = tiny_model(config, seed=0)
    peft = load_in_peft(base, paths)
    shape = shape_of(config)
    loader = PeftAdapterLoader()
    gen = torch.Generator().manual_seed(11)
    for name, path in paths.items():
        saved = load_file(str(path / "adapter_model.safetensors"))
        assert len(saved) == 2 * len(targets) * config.num_hidden_layers
        assert all(not torch.equal(t, torch.zeros_like(t)) for t in saved.values())
        peft.set_adapter(name)
        adapter = loader.load(str(path), name=name, shape=shape)
        assert adapter.scaling == pytest.approx((2 * rank if alpha is None else alpha) / rank)
        for layer in range(config.num_hidden_layers):
            for fused, members in FUSED_MODULES.items():
                lora = [m for m in members if hasattr(peft_module(peft, layer, m), "base_layer")]
                assert set(lora) == set(members) & set(targets)
                if not lora:
                    assert (layer, fused) not in adapter.weights
                    continue
                x = torch.randn(5, shape.fused_in_features(fused), generator=gen)
                expected = peft_fused_delta(peft, layer, fused, x)
                A, B = adapter.weights[(layer, fused)]
                got = fused_lora_delta(x, A, B, adapter.scaling, shape.output_offsets(fused))
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_random_adapter_delta_has_the_documented_size(tmp_path):
    config = tiny_llama_config(hidden_size=256, intermediate_size=384)
    paths = random_adapters.write_random_adapters(config, tmp_path, 1, rank=7, alpha=3, seed=2, delta_std=0.3)
    peft = load_in_peft(tiny_model(config, seed=0), paths)
    peft.set_adapter("lora0")
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))  # unit RMS
    for module in ("q_proj", "k_proj", "gate_proj"):
        mod = peft_module(peft, 1, module)
        std = (mod(x) - mod.base_layer(x)).std().item()
        assert 0.2 < std < 0.4, (module, std)


def test_random_adapters_are_reused_only_when_every_argument_matches(tmp_path):
    config = tiny_llama_config()
    first = random_adapters.write_random_adapters(config, tmp_path, 2, rank=3, seed=1)
    weights = first["lora1"] / "adapter_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    data = weights.read_bytes()
    random_adapters.write_random_adapters(config, tmp_path, 2, rank=3, seed=1)
    assert weights.stat().st_mtime_ns == stamp
    random_adapters.write_random_adapters(config, tmp_path, 2, rank=3, seed=2)
    assert weights.read_bytes() != data
    assert random_adapters.adapter_bytes(config, 3) == 3 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128)) * 2 * 4


def test_random_adapters_refuse_unknown_modules(tmp_path):
    with pytest.raises(ValueError, match="lm_head"):
        random_adapters.write_random_adapters(tiny_llama_config(), tmp_path, 1, rank=2, target_modules=["lm_head"])


# -- the benchmarks ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama whose every token is EOS: the benchmarks must generate through it."""
    path = tmp_path_factory.mktemp("bench-model")
    model = tiny_model(tiny_llama_config(), seed=0)
    everything = list(range(model.config.vocab_size))
    model.config.eos_token_id = everything
    model.generation_config.eos_token_id = everything
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def oracle_runs(model_dir, tmp_path_factory):
    """bench_offline (with and without LoRA) and bench_hf_peft on one variable-length workload."""
    out = tmp_path_factory.mktemp("bench-out")
    common = ["--model-path", str(model_dir), *RUN, "--range-ratio", "0.5"]
    return {
        "offline": bench_offline.main([*common, "--warmup-requests", "2", "--output-file", str(out / "o.json")]),
        "base": bench_offline.main([*common, "--no-lora", "--warmup-requests", "0"]),
        "hf": bench_hf_peft.main(
            [*common, "--batch-size", "4", "--warmup-batches", "0", "--output-file", str(out / "h.json")]
        ),
        "files": (out / "o.json", out / "h.json"),
    }


def test_bench_offline_writes_exact_counts_and_every_step(tmp_path):
    config_dir = tmp_path / "config"
    tiny_llama_config().save_pretrained(config_dir)  # a bare config: random (dummy) weights
    out = tmp_path / "offline.json"
    result = bench_offline.main(
        ["--config-dir", str(config_dir), *RUN, "--warmup-requests", "2", "--output-file", str(out)]
    )
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    res = written["results"]
    assert (res["num_requests"], res["input_tokens"], res["output_tokens"]) == (6, 6 * 8, 6 * 4)
    assert [len(o["output_ids"]) for o in written["outputs"]] == [4] * 6
    assert res["wall_s"] > 0
    assert res["output_throughput"] == pytest.approx(24 / res["wall_s"])
    assert res["total_throughput"] == pytest.approx(72 / res["wall_s"])
    assert res["request_throughput"] == pytest.approx(6 / res["wall_s"])
    steps = res["step_metrics"]  # six requests fit one step: one prefill, then one decode per token
    assert (steps["prefill"]["steps"], steps["decode"]["steps"], steps["mixed"]["steps"]) == (1, 3, 0)
    assert steps["decode"]["mean_batch_size"] == 6 and steps["decode"]["mean_ms"] > 0
    assert steps["step_time_total_s"] <= res["wall_s"]
    assert written["device"] == "cpu" and written["benchmark"] == "bench_offline"
    assert {"python", "torch", "transformers", "loraserve"} <= set(written["versions"])
    assert written["date"] and written["config"]["random_weights"] is True
    assert written["config"]["adapters"] == ["lora0", "lora1"] and written["config"]["lora_backend"] == "torch"
    assert written["workload"]["total_output_tokens"] == 24

    hf = bench_hf_peft.main(["--config-dir", str(config_dir), *RUN, "--batch-size", "4", "--warmup-batches", "0"])
    assert (hf["results"]["output_tokens"], hf["results"]["num_batches"]) == (24, 2)
    assert [o["lora_name"] for o in hf["outputs"]] == [o["lora_name"] for o in written["outputs"]]


def test_hf_peft_gives_the_engine_tokens_per_request(oracle_runs, model_dir):
    offline, hf, base = oracle_runs["offline"], oracle_runs["hf"], oracle_runs["base"]
    workload = make_workload(6, 8, 4, 256, ["lora0", "lora1"], "uniform", seed=5, range_ratio=0.5)
    assert len({s.input_len for s in workload}) > 1 and len({s.output_len for s in workload}) > 1  # padding
    for outputs in (offline["outputs"], hf["outputs"]):
        assert [o["lora_name"] for o in outputs] == [s.lora_name for s in workload]
        assert [len(o["output_ids"]) for o in outputs] == [s.output_len for s in workload]
    assert hf["results"]["output_tokens"] == offline["results"]["output_tokens"] == sum(s.output_len for s in workload)
    for i, (ours, theirs) in enumerate(zip(offline["outputs"], hf["outputs"])):
        assert ours["output_ids"] == theirs["output_ids"], f"request {i} ({ours['lora_name']})"
    # the adapters change what is generated (on the same prompts), so the comparison covers them
    parse = bench_offline.build_parser().parse_args
    args = ["--model-path", str(model_dir), *RUN, "--range-ratio", "0.5"]
    config = bench_offline.model_config(parse(args))
    with_lora, without = (bench_offline.build_requests(parse(a), config) for a in (args, [*args, "--no-lora"]))
    assert [s.input_ids for s in with_lora] == [s.input_ids for s in without] == [s.input_ids for s in workload]
    assert [o["lora_name"] for o in base["outputs"]] == [None] * 6
    assert any(a["output_ids"] != b["output_ids"] for a, b in zip(base["outputs"], offline["outputs"]))
    for path in oracle_runs["files"]:
        assert json.loads(path.read_text())["results"]["output_tokens"] == hf["results"]["output_tokens"]


def test_hf_mixed_batch_with_base_rows_matches_the_engine(model_dir, tmp_path):
    from loraserve.engine.engine import Engine
    from loraserve.settings import make_settings

    args = bench_hf_peft.build_parser().parse_args(["--model-path", str(model_dir), *RUN])
    config = bench_offline.model_config(args)
    paths = random_adapters.write_random_adapters(config, tmp_path, 2, rank=3, seed=9, delta_std=0.2)
    gen = torch.Generator().manual_seed(8)
    lens = [(1, 3, None), (5, 1, "lora1"), (3, 2, "lora0"), (6, 3, None), (2, 2, "lora1")]
    # prompts start with token 0, the pad id: only the explicit attention mask tells it from padding
    requests = [
        RequestSpec([0] + torch.randint(0, 256, (n - 1,), generator=gen).tolist(), o, lora) for n, o, lora in lens
    ]
    model = bench_hf_peft.attach_adapters(bench_hf_peft.load_model(args, "cpu", "float32"), paths)
    theirs = bench_hf_peft.generate_batch(model, requests, "cpu", 0, with_lora=True)
    engine_args = bench_offline.build_parser().parse_args(["--model-path", str(model_dir), *RUN])
    engine = Engine(make_settings(**bench_offline.engine_settings(engine_args, "cpu", "float32", paths)))
    try:
        ours = [res["output_ids"] for res in bench_offline.generate(engine, requests)]
    finally:
        engine.shutdown()
    assert [len(t) for t in theirs] == [o for _, o, _ in lens]
    assert ours == theirs


def test_mixed_ranks_and_a_zipf_workload_for_many_adapters(tmp_path):
    """Issue 22's run: adapters of mixed ranks (each file's rank as drawn) and a power-law request mix
    that reaches the long tail, where ``skewed``'s geometric one leaves all but a few dozen idle."""
    from workloads import sample_lora_names, zipf_probabilities

    config = tiny_llama_config()
    paths = random_adapters.write_random_adapters(config, tmp_path / "a", 12, rank=[1, 3, 5], seed=2)
    ranks = random_adapters.mixed_ranks([1, 3, 5], 12, seed=2)
    assert len(set(ranks)) > 1
    for path, rank in zip(paths.values(), ranks):
        assert json.loads((path / "adapter_config.json").read_text())["r"] == rank
        assert {t.shape[0] for k, t in load_file(path / "adapter_model.safetensors").items() if "lora_A" in k} == {rank}
    probs = zipf_probabilities(2000, 1.0)
    assert probs.sum() == pytest.approx(1.0) and probs[0] / probs[9] == pytest.approx(10.0)
    names = [f"a{i}" for i in range(2000)]
    assert len(set(sample_lora_names(5000, names, "zipf", seed=1))) > 500
    assert len(set(sample_lora_names(5000, names, "skewed", seed=1))) < 60
    with pytest.raises(ValueError, match="zipf exponent"):
        zipf_probabilities(3, 0.0)

    config_dir = tmp_path / "config"
    config.save_pretrained(config_dir)
    args = ["--config-dir", str(config_dir), *RUN, "--warmup-requests", "0", "--num-adapters", "5"]
    result = bench_offline.main([*args, "--lora-ranks", "2", "5", "--lora-request-distribution", "zipf"])
    assert result["config"]["engine_settings"]["max_lora_rank"] == 5
    assert result["results"]["output_tokens"] == 24 and result["results"]["lora"]["registered"] == 5
