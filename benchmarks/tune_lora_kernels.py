"""Tune the tiled LoRA backends for one device and write a kernel plan (issue 23).

For every case of ``bench_lora_kernels.py``'s grid (projection, step tokens, adapters = pool slots,
rank) and each backend, on the GPU:

1. time the separate shrink + expand (``run_lora``, one CUDA graph, L2 cold) under each candidate
   set of shrink launch parameters (the cost model's own and variants of tile height, split-k, k and
   rank blocks, warps) and keep the fastest; then the same for the expand's (column block, groups,
   warps);
2. time, interleaved and in context, the base GEMM alone, the GEMM followed by the separate path
   with those parameters, and the GEMM over ``[W; A]`` followed by the expand (the shrink inside the
   base GEMM); the plan records which of the two was faster, and the parameters where they beat
   the defaults by 3%.

The plan (``plugins/backend_triton/plans.py``'s format) goes to ``--output-file``; copy it to
``plugins/backend_triton/plan_data/<device>.json`` to ship it, or point ``LORASERVE_KERNEL_PLANS`` at it.
The file is rewritten after every case, so a run cut short keeps what it measured.

``--from-results FILE`` builds the plan's GEMM-or-separate choices from a ``bench_lora_kernels.py``
result instead (no GPU): each case's in-context times of both paths decide. ``--repicked FILE``
then writes that result with its ``auto`` rows re-picked by the plan, for a before/after table from
the same measurements.

    python benchmarks/tune_lora_kernels.py --output-file plan.json [--quick] [--backend csgmv]
    python benchmarks/tune_lora_kernels.py --from-results benchmarks/results/lora_kernels_X.json \\
        --output-file plugins/backend_triton/plan_data/X.json --repicked benchmarks/results/lora_kernels_X_planned.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from loraserve.plugins.backend_triton.plans import KernelPlans, PlanEntry  # noqa: E402

CANDIDATES = {  # launch parameters tried per kernel besides the cost model's own ({})
    "shrink": (
        {"split": 1},
        {"split": 2},
        {"split": 4},
        {"block_k": 64},
        {"block_k": 128},
        {"num_warps": 8},
        {"block_m": 64},  # the shrink in taller tiles than the expand's: A read once per 64 or 128 tokens
        {"block_m": 64, "block_r": 128, "num_warps": 8},
        {"block_m": 128, "block_k": 64, "num_warps": 8},
    ),
    "expand": (
        {"block_n": 64},
        {"block_n": 256},
        {"group_n": 1},
        {"group_n": 4},
        {"num_warps": 8},
    ),
}


def projection_shape(projections: dict, proj: str) -> tuple[int, int, int]:
    """``(in_dim, out_dim, n_slices)`` of a projection of a result's config."""
    in_dim, offsets = projections[proj]
    return in_dim, offsets[-1], len(offsets) - 1


def plan_from_results(result: dict) -> KernelPlans:
    """One entry per (backend, projection, tokens, adapters, rank) of a ``bench_lora_kernels.py``
    result: the shrink in the GEMM where its in-context time beat the separate path's."""
    projections = result["config"]["projections"]
    entries = []
    for c in result["cases"]:
        if not c["backend"].endswith("+gemm"):
            continue
        in_dim, out_dim, n_slices = projection_shape(projections, c["proj"])
        entries.append(
            PlanEntry(
                c["backend"][: -len("+gemm")],
                in_dim,
                out_dim,
                n_slices,
                c["tokens"],
                c["adapters"],
                c["rank"],
                shrink_in_gemm=c["time_us"] < c["separate_in_context_us"],
            )
        )
    rev = result.get("versions", {}).get("loraserve_git", "?")
    source = f"bench_lora_kernels.py of {result.get('date', '?')} (loraserve {rev}): in-context times of both paths"
    return KernelPlans(entries, device=result["device"], source=source)


def repick_by_plan(result: dict, plans: KernelPlans) -> dict:
    """``result`` with every ``<backend> auto`` row the path the plan picks (the plan's case is the
    measured case itself)."""
    from bench_lora_kernels import repick

    def wants_gemm(name: str, c: dict, shape: tuple[int, int, int]) -> bool:
        case = plans.for_backend(name).lookup(c["tokens"], *shape, c["rank"], c["adapters"])
        return case is not None and bool(case.shrink_in_gemm)

    return repick(result, wants_gemm, f"the kernel plan from {plans.source}")


def compare_auto(before: dict, after: dict) -> list[tuple]:
    """Per layer (sum of the four projections) of csgmv, for every case where a pick changed: the
    LoRA time of the fixed cost model's picks and of the plan's, both from the in-context times
    (base GEMM + LoRA - base GEMM, interleaved) of the ``csgmv+gemm`` rows, the base GEMMs, and
    both overheads."""
    fused = {
        (c["phase"], c["proj"], c["tokens"], c["adapters"], c["rank"]): c
        for c in before["cases"]
        if c["backend"] == "csgmv+gemm"
    }

    def in_context(c: dict) -> float:
        row = fused[(c["phase"], c["proj"], c["tokens"], c["adapters"], c["rank"])]
        return row["time_us"] if c["picked"].endswith("+gemm") else row["separate_in_context_us"]

    layers: dict[tuple, list[float]] = {}
    for b, a in zip(before["cases"], after["cases"]):
        if b["backend"] != "csgmv auto":
            continue
        key = (b["phase"], b["tokens"], b["adapters"], b["rank"])
        row = layers.setdefault(key, [0.0, 0.0, 0.0, 0])
        row[0] += in_context(b)
        row[1] += in_context(a)
        row[2] += fused[(b["phase"], b["proj"], b["tokens"], b["adapters"], b["rank"])]["gemm_us"]
        row[3] += b["picked"] != a["picked"]
    return [(*k, tb, ta, g, tb / g, ta / g) for k, (tb, ta, g, changed) in sorted(layers.items()) if changed]


def fastest(case, bench, name: str, kind: str, fixed: dict) -> tuple[tuple, dict]:
    """The fastest of ``CANDIDATES[kind]`` (and the defaults) for ``kind``'s launch parameters, with
    ``fixed`` tuning the other kernel; kept only if 3% faster than the defaults."""
    times = {}
    for params in ({}, *CANDIDATES[kind]):
        backend = bench.make_backend(name, tuning={**fixed, kind: params})
        times[tuple(sorted(params.items()))] = case.time_backend(backend)
    best = min(times, key=times.get)
    return (best if times[best] < 0.97 * times[()] else ()), {"best_us": times[best], "default_us": times[()]}


def tune_case(bench, proj: str, seg_lens: list[int], n: int, r: int, backends) -> list[PlanEntry]:
    """Measure one case on the GPU (see the module docstring); one entry per backend."""
    case = bench.Case(proj, seg_lens, n, r)
    entries = []
    for name in backends:
        shrink, ts = fastest(case, bench, name, "shrink", {})
        expand, te = fastest(case, bench, name, "expand", {"shrink": dict(shrink)})
        m = case.time_fused(bench.make_backend(name, tuning={"shrink": dict(shrink), "expand": dict(expand)}))
        in_gemm = m["fused_total_us"] < m["separate_total_us"]
        in_dim, out_dim, n_slices = case.in_dim, case.offsets[-1], len(case.offsets) - 1
        entries.append(PlanEntry(name, in_dim, out_dim, n_slices, case.T, n, r, in_gemm, shrink, expand))
        print(
            f"{name:6s} {proj:13s} T={case.T:5d} n={n:3d} r={r:3d}: shrink {dict(shrink) or 'default'}, "
            f"expand {dict(expand) or 'default'}: {te['best_us']:.1f} us (defaults {ts['default_us']:.1f}); "
            f"in GEMM {m['fused_total_us'] - m['gemm_us']:.1f} vs separate "
            f"{m['separate_total_us'] - m['gemm_us']:.1f} us -> {'gemm' if in_gemm else 'separate'}",
            flush=True,
        )
    case.free()
    return entries


def tune(args, bench, device: str) -> KernelPlans:
    """Every case of ``bench``'s grid (``bench_lora_kernels``), the plan saved after each."""
    cases = list(bench.decode_cases(args.quick)) + list(bench.prefill_cases(args.quick))
    plans = KernelPlans([], device=device, source=f"tune_lora_kernels.py on {device}, {time.strftime('%Y-%m-%d')}")
    start = time.monotonic()
    for _, seg_lens, n, r in cases:
        for proj in bench.PROJECTIONS:
            if time.monotonic() - start > args.time_limit:
                print(f"time limit of {args.time_limit} s reached: the plan holds the cases measured so far")
                return plans
            found = tune_case(bench, proj, seg_lens, n, r, args.backend)
            plans = KernelPlans(plans.entries + found, plans.device, plans.source)
            plans.save(args.output_file)
    return plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-file", required=True, help="the plan (JSON) to write")
    parser.add_argument("--from-results", help="build the plan from a bench_lora_kernels.py result (no GPU)")
    parser.add_argument("--repicked", help="with --from-results: write the result re-picked by the plan here")
    parser.add_argument("--quick", action="store_true", help="bench_lora_kernels.py's trimmed grid")
    parser.add_argument("--backend", nargs="+", default=["csgmv"], choices=["csgmv", "triton"])
    parser.add_argument("--time-limit", type=float, default=540.0, help="seconds; stop between cases after it")
    args = parser.parse_args()
    if args.from_results:
        result = json.loads(Path(args.from_results).read_text())
        plans = plan_from_results(result)
        plans.save(args.output_file)
        print(f"{len(plans.entries)} cases -> {args.output_file}")
        if args.repicked:
            from bench_lora_kernels import summarize

            after = repick_by_plan(result, plans)
            Path(args.repicked).write_text(json.dumps(after, indent=1))
            Path(args.repicked).with_suffix(".md").write_text(summarize(after) + planned_note(result, after))
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("tune_lora_kernels.py times kernels on a CUDA GPU (or use --from-results)")
    import bench_lora_kernels

    tune(args, bench_lora_kernels, torch.cuda.get_device_name(0))


def planned_note(before: dict, after: dict) -> str:
    """A markdown table of the per-layer cases whose ``csgmv auto`` time the plan changed."""
    lines = [
        "",
        "## The plan against the fixed-threshold cost model (csgmv auto, same measurements)",
        "",
        "Per layer, every case where the plan picks another path for some projection; LoRA time in",
        "context (base GEMM + LoRA - base GEMM, interleaved) for both picks. The rows above keep the",
        "original file's convention (a separate path's time measured alone).",
        "",
        "| phase | tokens | adapters | rank | before us | after us | base GEMMs us | overhead before | after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for phase, tokens, adapters, rank, tb, ta, gemm, ob, oa in compare_auto(before, after):
        lines.append(
            f"| {phase} | {tokens} | {adapters} | {rank} | {tb:.1f} | {ta:.1f} | {gemm:.1f} | {ob:.1%} | {oa:.1%} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
