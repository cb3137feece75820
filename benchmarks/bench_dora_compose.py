"""DoRA adapters and weighted compositions against plain LoRA of the same total rank (issue 21): the
decode step of one in-process engine (CUDA graphs on a GPU) serving one batch of each case.

Cases, each ``--batch`` greedy requests of ``--input-len`` prompt tokens and ``--output-len`` new
tokens, spread evenly over ``--num-adapters`` adapters:

- ``base``: no adapter (the floor).
- ``lora``: plain LoRA adapters of rank ``--rank`` (the reference every ratio divides by).
- ``composed``: compositions ``h{2i}*0.6+h{2i+1}*-0.4`` of two plain adapters of rank ``--rank / 2``:
  total rank ``--rank``, served as one virtual adapter per composition.
- ``dora``: DoRA adapters of rank ``--rank``: measured on the engine without
  ``--enable-dora-cuda-graph`` (``dora_eager``: decode steps with DoRA rows run eagerly) and on a
  second engine with it (``dora_graph``: the scaling pass captured; ``lora_dora_graph`` is the
  plain LoRA case on that engine, since the flag makes every captured step pay the pass).

Every case runs once untimed (compiles, adapter loads, composition builds), then timed: the engine's
step counters (``Engine.stats()``) give the mean decode step wall time and its GPU time (CUDA events).
Adapters are random (``random_adapters.py``), all projections; the base model is ``--config-dir``
with dummy weights. Writes JSON (``--output-file``) and a markdown table (``--markdown``).

    python benchmarks/bench_dora_compose.py --config-dir benchmarks/configs/llama-3.1-8b \\
        --output-file dora_compose.json --markdown dora_compose.md
    python benchmarks/bench_dora_compose.py --config-dir benchmarks/configs/tiny-llama --batch 8 \\
        --input-len 16 --output-len 8   # CPU: checks the script, times nothing worth quoting
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import random_adapters  # noqa: E402
from bench_offline import environment  # noqa: E402
from bench_serving_core import snapshot  # noqa: E402
from server_runs import diff_steps  # noqa: E402
from tables import write_results  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-dir", default=str(HERE / "configs" / "llama-3.1-8b"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--work-dir", default="/tmp/bench-dora-compose")
    p.add_argument("--output-file", default=None)
    p.add_argument("--markdown", default=None)
    return p


def write_adapters(args, config) -> tuple[dict[str, Path], dict[str, list]]:
    """Every adapter on disk, and each case's ``lora_path`` per adapter index."""
    root, n, r = Path(args.work_dir), args.num_adapters, args.rank
    dtype = "bfloat16"
    paths = random_adapters.write_random_adapters(config, root / "lora", n, rank=r, seed=args.seed, dtype=dtype)
    paths |= random_adapters.write_random_adapters(
        config, root / "dora", n, rank=r, seed=args.seed + 1, dtype=dtype, prefix="dora", dora=True
    )
    paths |= random_adapters.write_random_adapters(
        config, root / "half", 2 * n, rank=max(1, r // 2), seed=args.seed + 2, dtype=dtype, prefix="h"
    )
    mixes = [[{"name": f"h{2 * i}", "weight": 0.6}, {"name": f"h{2 * i + 1}", "weight": -0.4}] for i in range(n)]
    cases = {
        "base": [None] * n,
        "lora": [f"lora{i}" for i in range(n)],
        "composed": mixes,
        "dora": [f"dora{i}" for i in range(n)],
    }
    return paths, cases


def start(args, paths: dict[str, Path], dora_graphs: bool) -> Any:
    import torch

    from loraserve.engine.engine import Engine
    from loraserve.settings import make_settings

    cuda = torch.cuda.is_available()
    settings = make_settings(
        model_path=args.config_dir,
        load_format="dummy",
        dtype="bfloat16" if cuda else "float32",
        log_level="warning",
        max_running_requests=args.batch,
        lora_paths=[f"{n}={p}" for n, p in paths.items()],
        max_loras_per_batch=args.num_adapters + 1,
        max_lora_rank=args.rank,
        lora_target_modules=["all"],
        lora_backend="csgmv" if cuda else None,
        enable_dora_cuda_graph=dora_graphs,
        disable_radix_cache=True,
    )
    return Engine(settings)


def run_case(engine, args, vocab: int, lora_paths: list, seed: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab - 10, (args.batch, args.input_len), generator=gen).tolist()
    per_row = [lora_paths[i % len(lora_paths)] for i in range(args.batch)]
    params = {"max_new_tokens": args.output_len, "temperature": 0, "ignore_eos": True}
    engine.generate(input_ids=ids, sampling_params={**params, "max_new_tokens": 4}, lora_path=per_row)  # untimed
    before = snapshot(engine)
    t0 = time.perf_counter()
    results = engine.generate(input_ids=ids, sampling_params=params, lora_path=per_row)
    wall = time.perf_counter() - t0
    engine.call_in_engine(lambda: None)
    steps = diff_steps(snapshot(engine), before).get("decode", {})
    return {
        "decode_steps": steps.get("steps"),
        "mean_decode_ms": steps.get("mean_ms"),
        "gpu_decode_ms": steps.get("gpu_mean_ms"),
        "host_decode_ms": steps.get("host_mean_ms"),
        "output_throughput": sum(len(r["output_ids"]) for r in results) / wall,
    }


def measure(args, config, paths, cases) -> list[dict[str, Any]]:
    import torch

    plan = [(False, "base", "base"), (False, "lora", "lora"), (False, "composed", "composed")]
    plan += [(False, "dora", "dora_eager"), (True, "lora", "lora_dora_graph"), (True, "dora", "dora_graph")]
    runs = []
    for flag in (False, True):
        engine = start(args, paths, flag)
        try:
            for i, (f, case, label) in enumerate(plan):
                if f == flag:
                    measured = run_case(engine, args, config["vocab_size"], cases[case], i)
                    row = {"case": label, "dora_cuda_graph": flag, **measured}
                    runs.append(row)
                    print(f"{label:>16}: mean decode step {row['mean_decode_ms']:.3f} ms", flush=True)
        finally:
            engine.shutdown()
            del engine
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return runs


def ratios(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    by = {r["case"]: r["mean_decode_ms"] for r in runs}

    def ratio(a: str, b: str) -> float | None:
        return by[a] / by[b] if by.get(a) and by.get(b) else None

    return {
        "composed_over_lora": ratio("composed", "lora"),
        "dora_eager_over_lora": ratio("dora_eager", "lora"),
        "dora_graph_over_lora_same_engine": ratio("dora_graph", "lora_dora_graph"),
        "dora_graph_over_lora": ratio("dora_graph", "lora"),
        "lora_over_base": ratio("lora", "base"),
    }


def table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    def f(v, digits=2):
        return "-" if v is None else f"{v:.{digits}f}"

    lora = next(r["mean_decode_ms"] for r in result["runs"] if r["case"] == "lora")
    head = [
        "case",
        "--enable-dora-cuda-graph",
        "decode steps",
        "mean decode ms",
        "GPU ms",
        "host ms",
        "vs lora",
        "out tok/s",
    ]
    rows = [
        [r["case"], str(r["dora_cuda_graph"]), f(r["decode_steps"], 0), f(r["mean_decode_ms"]), f(r["gpu_decode_ms"]),
         f(r["host_decode_ms"]), f(r["mean_decode_ms"] / lora if lora and r["mean_decode_ms"] else None),
         f(r["output_throughput"], 0)]
        for r in result["runs"]
    ]  # fmt: skip
    return head, rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import torch

    args = build_parser().parse_args(argv)
    config = random_adapters.load_config(args.config_dir)
    paths, cases = write_adapters(args, config)
    runs = measure(args, config, paths, cases)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"benchmark": "dora_compose", **environment(device), "config": vars(args), "runs": runs}
    result["ratios"] = ratios(runs)
    head, rows = table(result)
    write_results(result, head, rows, args.output_file, args.markdown)
    print(json.dumps(result["ratios"], indent=2))
    return result


if __name__ == "__main__":
    main()
