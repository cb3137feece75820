"""Kernel plans (issue 23): measured per-device choices kept as data. The lookup finds the nearest
measured case, the backends follow it (explicit tuning still wins), a bad plan file is refused with
the field at fault, the shrink in its own taller tiles equals backend_torch, the warm-up meets every
case a plan can pick, and the shipped H100 plan agrees with the measurements it came from."""

from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from test_kernels import (  # noqa: E402
    CASES,
    DEVICE,
    GPU_BATCHES,
    LLAMA3_8B,
    check,
    check_captured_replays,
    make_backend,
    oracle,
    random_case,
)
from test_warmup_plan import LLAMA_8B, assert_within, kernel_backend  # noqa: E402

from loraserve.errors import ConfigError  # noqa: E402
from loraserve.plugins.backend_triton.plans import (  # noqa: E402
    ENV,
    FORMAT,
    PLAN_DIR,
    KernelPlans,
    PlanEntry,
    plan_file_name,
    plans_for,
)
from loraserve.runner.warmup_plan import StepLimits, even_split, lora_shapes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
H100 = "NVIDIA H100 80GB HBM3"
QKV = (4096, 6144, 3)


def entry(tokens, slots, rank, in_gemm=None, shrink=(), backend="csgmv", shape=QKV, expand=()):
    params = [tuple(sorted(dict(p).items())) for p in (shrink, expand)]
    return PlanEntry(backend, *shape, tokens, slots, rank, in_gemm, *params)


def test_lookup_takes_the_nearest_case_of_the_shape_within_the_pool_distance():
    plans = KernelPlans([entry(8, 8, 16, True), entry(256, 8, 16, False), entry(2048, 4, 64, True)])
    assert plans.lookup(8, *QKV, 16, 8).tokens == 8
    assert plans.lookup(40, *QKV, 16, 8).tokens == 8  # log2 distance 2.32 from 8, 2.68 from 256
    assert plans.lookup(50, *QKV, 16, 8).tokens == 256
    assert plans.lookup(100_000, *QKV, 16, 8).tokens == 256  # beyond the grid: the nearest end
    assert plans.lookup(3000, *QKV, 32, 4).tokens == 2048  # pool distance 1 + tokens 0.55 beats 256's 3.55
    assert plans.lookup(3000, *QKV, 16, 8).tokens == 256  # 2048's pool is 3 away (2 on rank, 1 on slots)
    assert plans.lookup(8, *QKV, 16, 64) is None  # 8x the slots: no case near this pool
    assert plans.lookup(7, *QKV, 16, 8) is None  # fewer tokens than slots: idle slots were never measured
    assert plans.lookup(8, 4096, 4096, 1, 16, 8) is None  # another projection shape
    assert KernelPlans([entry(8, 8, 16), entry(32, 8, 16)]).lookup(16, *QKV, 16, 8).tokens == 8  # a tie: fewer


def test_backends_follow_the_plan_and_explicit_tuning_wins():
    plans = KernelPlans(
        [
            entry(64, 4, 16, False, {"split": 2, "block_m": 64}, expand={"block_n": 64}),
            entry(64, 4, 16, True, backend="triton"),
        ]
    )
    csgmv = make_backend("csgmv", plans=plans)
    assert not csgmv.wants_shrink_in_gemm(64, *QKV, 16, 4)  # the byte model alone says True here
    assert make_backend("csgmv").wants_shrink_in_gemm(64, *QKV, 16, 4)
    assert make_backend("triton", plans=plans).wants_shrink_in_gemm(64, *QKV, 16, 4)
    assert csgmv.launch_params("shrink", 64, *QKV, 16, 4) == {"split": 2, "block_m": 64}
    assert csgmv.launch_params("expand", 64, *QKV, 16, 4) == {"block_n": 64}
    tuned = make_backend("csgmv", plans=plans, tuning={"shrink_in_gemm": True, "shrink": {"split": 4}})
    assert tuned.wants_shrink_in_gemm(64, *QKV, 16, 4)
    assert tuned.launch_params("shrink", 64, *QKV, 16, 4) == {"split": 4, "block_m": 64}
    assert csgmv.launch_params("shrink", 64, 4096, 4096, 1, 16, 4) == {}  # no case for o_proj


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "other"}, "is not a kernel plan"),
        ({"entries": {}}, "'entries' must be a list"),
        ({"entries": [{"backend": "csgmv"}]}, "entry 0: in_dim must be a positive integer, got None"),
        ({"entries": [{**entry(8, 8, 16).to_dict(), "rank": True}]}, "rank must be a positive integer, got True"),
        ({"entries": [{**entry(8, 8, 16).to_dict(), "tokens": -1}]}, "tokens must be a positive integer"),
        ({"entries": [{**entry(8, 8, 16).to_dict(), "speed": 1}]}, "unknown field(s) speed"),
        ({"entries": [{**entry(8, 8, 16).to_dict(), "backend": "../x"}]}, "backend must be a backend's name"),
        ({"entries": [{**entry(8, 8, 16).to_dict(), "shrink_in_gemm": 1}]}, "shrink_in_gemm must be true, false"),
        ({"entries": [{**entry(8, 8, 16).to_dict(), "shrink": {"block_k": 48}}]}, "power of two from 16 to 256"),
        ({"entries": [{**entry(8, 8, 16).to_dict(), "shrink": {"block_m": 512}}]}, "power of two from 16 to 256"),
        ({"entries": [{**entry(8, 8, 16).to_dict(), "shrink": {"tiles": 2}}]}, "shrink must be an object"),
        ({"entries": [{**entry(8, 8, 16).to_dict(), "expand": {"split": 2}}]}, "expand must be an object"),
        ({"entries": [{**entry(8, 8, 16).to_dict(), "expand": {"group_n": 0}}]}, "expand.group_n must be a positive"),
        ({"entries": [{**entry(8, 8, 16).to_dict(), "expand": {"num_warps": 3}}]}, "num_warps must be 1, 2, 4"),
        ({"entries": [{**entry(8, 8, 16).to_dict(), "shrink": {"num_stages": 9}}]}, "num_stages must be from 1 to 8"),
    ],
)
def test_a_bad_plan_is_refused_naming_the_field(change, message):
    data = {"format": FORMAT, "entries": [entry(8, 8, 16, True).to_dict()], **change}
    with pytest.raises(ConfigError) as err:
        KernelPlans.from_dict(data, where="plan.json")
    assert message in str(err.value) and "plan.json" in str(err.value)


def test_plan_files_round_trip_and_the_environment_chooses(tmp_path, monkeypatch):
    plans = KernelPlans(
        [entry(8, 8, 16, True, {"split": 2}, expand={"group_n": 4}), entry(8, 8, 16, False, backend="triton")], "X", "t"
    )
    path = tmp_path / "plan.json"
    plans.save(path)
    assert KernelPlans.load(path).entries == plans.entries
    monkeypatch.setenv(ENV, str(path))
    assert plans_for(torch.device("cpu")).entries == plans.entries
    monkeypatch.setenv(ENV, "off")
    assert plans_for(torch.device("cpu")) is None
    for bad, why in ((tmp_path / "missing.json", "cannot read kernel plan"), (tmp_path / "bad.json", "not valid JSON")):
        if bad.name == "bad.json":
            bad.write_bytes(b"{\xff")
        monkeypatch.setenv(ENV, str(bad))
        with pytest.raises(ConfigError, match=why):
            plans_for(torch.device("cpu"))
    monkeypatch.delenv(ENV)
    assert plans_for(torch.device("cpu")) is None  # no shipped plan applies off a GPU
    from loraserve.plugins import backend_csgmv

    monkeypatch.setenv(ENV, str(path))
    assert backend_csgmv._make(device=DEVICE).plans.entries == plans.for_backend("csgmv").entries


CASE_NAMES = [
    "qkv: 3 unequal slices, mixed ranks incl. 0, slot spans chunks",
    "gate_up: 2 slices, many segments",
    "long segments (csgmv tiles per segment), a slot in two segments",
]


@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("name", ["triton", "csgmv"])
def test_the_shrink_in_its_own_tile_height_matches_torch_backend(name, case, block_m):
    """Also with the expand's parameters of a plan (narrow column blocks, groups of two)."""
    cfg = CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name} {case} {block_m}".encode()))
    x, A, B, base, info = random_case(
        gen, cfg["seg_lens"], cfg["seg_slot"], cfg["ranks"], cfg["offsets"], cfg["in_dim"], cfg["R"], torch.float32
    )
    expand = {"block_n": 16, "group_n": 2} if block_m == 64 else {}
    backend = make_backend(name, tuning={"shrink": {"block_m": block_m}, "expand": expand})
    backend.prepare(info)
    out = base.clone()
    backend.run_lora(x, A, B, out, cfg["offsets"])
    assert block_m == backend._plan.block_m or block_m in backend._retiled  # the shrink really retiled
    check(out, oracle(x, A, B, base, info, cfg["offsets"]), base, info, cfg["ranks"], torch.float32)


GPU_PARAMS = [
    {"shrink": {"block_m": 64}},
    {"shrink": {"block_m": 128, "block_k": 64, "num_warps": 8}, "expand": {"block_n": 256, "group_n": 4}},
    {"shrink": {"block_m": 64, "block_r": 128, "num_warps": 8, "split": 2}, "expand": {"block_n": 64, "group_n": 1}},
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("params", range(len(GPU_PARAMS)))
@pytest.mark.parametrize("proj", ["qkv_proj", "down_proj"])
@pytest.mark.parametrize("name", ["triton", "csgmv"])
def test_plan_parameters_on_gpu_in_bf16_captured(name, proj, params):
    """The tuner's candidates at Llama-3-8B shapes in bfloat16, in a CUDA graph of prepare + run_lora
    replayed on new inputs: within 1e-2 of backend_torch, base rows untouched."""
    in_dim, offsets = LLAMA3_8B[proj]
    seg_lens, seg_slot, ranks, R = GPU_BATCHES["prefill 3 x 300 + decode"]
    gen = torch.Generator().manual_seed(3)
    x, A, B, base, info = random_case(gen, seg_lens, seg_slot, ranks, offsets, in_dim, R, torch.bfloat16)
    B /= 4
    check_captured_replays(make_backend(name, tuning=GPU_PARAMS[params]), x, A, B, base, info, offsets, gen)


def test_captured_steps_find_the_case_of_the_pool_not_of_the_null_slot():
    """A captured decode step's batch info lists one more slot (the null slot) than the pool has; the
    plan is asked with the pool's count, as the warm-up's keys are (here a pool 5 slots wide would be
    past the case's pool distance, 4 slots is at it)."""
    from loraserve.contract import LoRABatchInfo

    gen = torch.Generator().manual_seed(4)
    ranks, offsets, in_dim, R = [3, 5, 16, 2], (0, 24), 16, 16
    x, A, B, base, _ = random_case(gen, [6, 5], [0, 2], ranks, offsets, in_dim, R, torch.float32)
    info = LoRABatchInfo.build([6, 5], [0, 2], ranks + [0], [0.5, 1.0, 1.5, 2.0, 0.0], R, device=DEVICE)
    plans = KernelPlans([entry(11, 4, 64, False, {"block_m": 64}, backend="triton", shape=(in_dim, 24, 1))])
    backend = make_backend("triton", plans=plans)
    backend.prepare(info)
    out = base.clone()
    backend.run_lora(x, A, B, out, offsets)
    assert 64 in backend._retiled  # the case's shrink tile height was used
    check(out, oracle(x, A, B, base, info, offsets), base, info, ranks + [0], torch.float32)


def test_the_warm_up_meets_every_case_and_variant_a_plan_picks():
    """A plan whose choices flip back and forth with the token count (GEMM, separate with taller
    tiles, GEMM, separate with split-k, GEMM; the last three above DENSE_TOKENS, where the warm-up
    bisects token counts): brute force over every step shape finds no key the warm-up lacks."""
    cases = [(8, True, {}), (16, False, {"block_m": 64}), (600, True, {})]
    cases += [(1000, False, {"split": 4}), (1600, True, {})]
    plans = KernelPlans(
        [entry(t, 8, 16, g, s, shape=shape[:3]) for t, g, s in cases for shape in LLAMA_8B]
        + [entry(t, 8, 16, g, s, backend="triton", shape=shape[:3]) for t, g, s in cases for shape in LLAMA_8B]
    )
    limits = StepLimits(max_running=24, step_tokens=2500, max_chunk=512)
    for name in ("csgmv", "triton"):
        keys = kernel_backend(name, plans=plans).variant_keys(8, 16, LLAMA_8B)
        planned = {}
        for s in lora_shapes(limits, keys):
            assert_within(s, limits) and s.seg_lens == even_split(s.num_tokens, s.num_segments)
            planned[keys(s.num_tokens, s.num_segments)] = s.num_tokens
        for t in range(1, limits.step_tokens + 1):
            for s in limits.segments_for(t):
                assert keys(t, s) in planned, f"{name}: {t} tokens in {s} segments not warmed up"
        assert {case for _, _, per in planned for _, case in per} >= {(t, 8, 16) for t, _, _ in cases}


def test_the_shipped_h100_plan_agrees_with_its_measurements():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from tune_lora_kernels import plan_from_results, projection_shape

    plans = KernelPlans.load(PLAN_DIR / plan_file_name(H100))
    assert plans.device == H100 and plans_for.__module__  # loads and names its device
    result = json.loads((ROOT / "benchmarks" / "results" / "lora_kernels_NVIDIA_H100_80GB_HBM3.json").read_text())
    assert plans.entries == plan_from_results(result).entries
    measured = 0
    for c in result["cases"]:
        if c["backend"].endswith("+gemm"):
            backend = c["backend"][: -len("+gemm")]
            shape = projection_shape(result["config"]["projections"], c["proj"])
            found = plans.for_backend(backend).lookup(c["tokens"], *shape, c["rank"], c["adapters"])
            assert found.case == (c["tokens"], c["adapters"], c["rank"])
            assert found.shrink_in_gemm == (c["time_us"] < c["separate_in_context_us"])
            measured += 1
    assert measured == len(plans.entries) == 624
    for path in PLAN_DIR.glob("*.json"):  # every shipped plan is valid and named by its device
        assert plan_file_name(KernelPlans.load(path).device) == path.name


class FakeBench:
    """bench_lora_kernels' surface with made-up timings, to check the tuner's choices off a GPU:
    split 2 saves 10% of the shrink on decode, tiles of 64 save 20% on prefill, a column block of
    64 saves 2% (under the 3% the tuner asks), the GEMM path wins decode and loses prefill."""

    PROJECTIONS = {"qkv_proj": (4096, (0, 4096, 5120, 6144)), "o_proj": (4096, (0, 4096))}

    @staticmethod
    def decode_cases(quick):
        yield "decode", [1] * 8, 8, 16

    @staticmethod
    def prefill_cases(quick):
        yield "prefill", [512] * 4, 4, 64

    @staticmethod
    def make_backend(name, tuning=None):
        return dict(name=name, **(tuning or {}))

    class Case:
        def __init__(self, proj, seg_lens, n, r):
            self.in_dim, self.offsets = FakeBench.PROJECTIONS[proj]
            self.T, self.freed = sum(seg_lens), False

        def time_backend(self, backend):
            shrink, expand = backend.get("shrink", {}), backend.get("expand", {})
            t = 100.0
            if self.T < 512 and shrink == {"split": 2}:
                t *= 0.9
            if self.T >= 512 and shrink == {"block_m": 64}:
                t *= 0.8
            return t * (0.98 if expand == {"block_n": 64} else 1.0)

        def time_fused(self, backend):
            separate, fused = 1000 + self.time_backend(backend), 1050.0 if self.T < 512 else 1500.0
            return {"gemm_us": 1000.0, "separate_total_us": separate, "fused_total_us": fused}

        def free(self):
            self.freed = True


def test_the_tuner_keeps_what_measured_faster(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from types import SimpleNamespace

    from tune_lora_kernels import tune

    out = tmp_path / "plan.json"
    args = SimpleNamespace(quick=True, backend=["csgmv", "triton"], time_limit=600, output_file=out)
    plans = tune(args, FakeBench, "Fake GPU")
    saved = KernelPlans.load(out)
    assert saved.entries == plans.entries and saved.device == "Fake GPU" and len(saved.entries) == 8
    for e in saved.entries:
        decode = e.tokens == 8
        assert e.shrink_in_gemm is decode
        assert dict(e.shrink) == ({"split": 2} if decode else {"block_m": 64})
        assert e.expand == ()  # 2% is within the noise the tuner ignores
    assert {(e.backend, e.in_dim, e.out_dim, e.n_slices) for e in saved.entries} == {
        (b, 4096, out_dim, s) for b in ("csgmv", "triton") for out_dim, s in ((6144, 3), (4096, 1))
    }
    args.time_limit = 0
    assert tune(args, FakeBench, "Fake GPU").entries == []
