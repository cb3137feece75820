"""Tensor parallelism on a live server: the serving benchmark at each ``--tp-size``, and the step split.

For each tensor-parallel size a server is started (``python -m loraserve --tp-size N``) on a model
config with dummy weights and random adapters, :mod:`bench_serving` runs the same seeded workload
against it, and the server's engine counters (decode and prefill steps and their wall time) are read
from ``/metrics``. The step-time split of a decode step at ``--tp-size N`` is its measured mean
time against the communication it contains, timed on its own: the collectives one decode step runs
(an all-reduce of ``[batch, hidden]`` after the embedding and after each layer's o_proj and
down_proj, and the all-gather of the logits), captured in a CUDA graph over N processes with NCCL,
at several batch sizes. One JSON file keeps everything with the device.

    python benchmarks/bench_tp.py --config-dir benchmarks/configs/llama-3.1-8b --tp-sizes 1 2 \\
        --num-adapters 8 --rank 16 --num-prompts 256 --max-concurrency 64 --output-file tp.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import random_adapters  # noqa: E402
from server_runs import add_run_args, free_port, serve_and_bench, work_dir, workload_flags  # noqa: E402


def collective_times(
    tp_size: int,
    hidden: int,
    vocab: int,
    num_layers: int,
    batches: Sequence[int],
    dtype: str = "bfloat16",
    iters: int = 50,
) -> dict[int, float]:
    """Milliseconds of one decode step's collectives at each batch size, on ``tp_size`` GPUs."""
    import torch.multiprocessing as mp

    port = free_port()
    out = mp.get_context("spawn").Manager().dict()
    mp.spawn(
        _collectives_worker,
        args=(tp_size, port, hidden, vocab, num_layers, list(batches), dtype, iters, out),
        nprocs=tp_size,
        join=True,
    )
    return dict(out)


def _collectives_worker(
    rank: int,
    size: int,
    port: int,
    hidden: int,
    vocab: int,
    num_layers: int,
    batches: list[int],
    dtype: str,
    iters: int,
    out: Any,
) -> None:
    import gc

    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size, device_id=torch.device("cuda", rank)
    )
    dt = getattr(torch, dtype)
    for b in batches:
        x = torch.randn(b, hidden, dtype=dt, device="cuda")
        shard = torch.randn(b, vocab // size, dtype=torch.float32, device="cuda")
        parts = [torch.empty_like(shard) for _ in range(size)]

        def step() -> None:
            for _ in range(2 * num_layers + 1):  # embedding, and o_proj + down_proj of every layer
                dist.all_reduce(x)
            dist.all_gather(parts, shard)

        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        for _ in range(3):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        if rank == 0:
            out[b] = start.elapsed_time(end) / iters
        del graph  # a graph holding NCCL work must go before the group does (pytorch/pytorch#115388)
        gc.collect()
        torch.cuda.synchronize()
    dist.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-dir", default=str(HERE / "configs" / "llama-3.1-8b"))
    p.add_argument("--tp-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--num-adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--distribution", default="uniform", choices=("uniform", "distinct", "skewed"))
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--max-concurrency", type=int, default=64)
    p.add_argument(
        "--warmup-requests",
        type=int,
        default=16,
        help="untimed requests of the same workload first; step times count from after them",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--collective-batches",
        type=int,
        nargs="*",
        default=[1, 8, 32, 64],
        help="decode batch sizes whose collectives are timed on their own (CUDA only; none: skip)",
    )
    add_run_args(p, "tp-bench-")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    work = work_dir(args)
    config = random_adapters.load_config(args.config_dir)
    adapters = (
        random_adapters.write_random_adapters(
            config, work / "adapters", args.num_adapters, rank=args.rank, seed=args.seed, dtype="bfloat16"
        )
        if args.num_adapters
        else {}
    )
    bench = workload_flags(args) + ["--max-concurrency", str(args.max_concurrency)]
    if adapters:
        bench += ["--lora-name", *adapters, "--lora-request-distribution", args.distribution]
    runs = []
    for size in args.tp_sizes:
        flags = [
            "--model-path",
            args.config_dir,
            "--load-format",
            "dummy",
            "--tp-size",
            str(size),
            "--log-level",
            "warning",
            *args.server_arg,
        ]
        if adapters:
            flags += ["--lora-paths", *[f"{n}={p}" for n, p in adapters.items()], "--max-lora-rank", str(args.rank)]
        print(f"--tp-size {size}: starting the server", file=sys.stderr, flush=True)
        doc = serve_and_bench(
            flags, bench, f"tp{size}", work, free_port(), args.startup_timeout, prewarm=args.warmup_requests
        )
        r = doc["results"]
        row = {
            "tp_size": size,
            "completed": r["completed"],
            "failed": r["failed"],
            "output_throughput": r["output_throughput"],
            "total_throughput": r["total_throughput"],
            "median_ttft_ms": r["median_ttft_ms"],
            "median_tpot_ms": r["median_tpot_ms"],
            "decode_step_ms": doc["engine_steps"].get("decode", {}).get("mean_ms"),
            "prefill_step_ms": doc["engine_steps"].get("prefill", {}).get("mean_ms"),
            "decode_steps": doc["engine_steps"].get("decode", {}).get("steps"),
        }
        runs.append({"row": row, "doc": doc})
        print(json.dumps(row), file=sys.stderr, flush=True)
    collectives: dict = {}
    result = {
        "benchmark": "tensor_parallel",
        "device": _device(),
        "config": vars(args),
        "summary": [r["row"] for r in runs],
        "decode_collectives_ms": collectives,
        "runs": runs,
    }
    _write(result, args.output_file)  # the serving runs are kept even if the collective timing fails
    if args.collective_batches:
        import torch

        for size in args.tp_sizes:
            if size > 1 and torch.cuda.device_count() >= size:
                collectives[size] = collective_times(
                    size,
                    config["hidden_size"],
                    config["vocab_size"],
                    config["num_hidden_layers"],
                    args.collective_batches,
                )
    print(format_summary(result))
    _write(result, args.output_file)
    return result


def _write(result: dict, output_file: str | None) -> None:
    if output_file:
        Path(output_file).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {output_file}", file=sys.stderr)


def format_summary(result: dict) -> str:
    lines = [
        "| tp | out tok/s | total tok/s | TTFT median ms | TPOT median ms | decode step ms | prefill step ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["summary"]:

        def f(v, fmt="{:.1f}"):
            return "—" if v is None else fmt.format(v)

        lines.append(
            f"| {r['tp_size']} | {f(r['output_throughput'])} | {f(r['total_throughput'])} | "
            f"{f(r['median_ttft_ms'])} | {f(r['median_tpot_ms'], '{:.2f}')} | "
            f"{f(r['decode_step_ms'], '{:.2f}')} | {f(r['prefill_step_ms'], '{:.2f}')} |"
        )
    for size, times in result["decode_collectives_ms"].items():
        lines.append(
            f"\ncollectives of one decode step at --tp-size {size} (CUDA graph, ms): "
            + ", ".join(f"batch {b}: {t:.3f}" for b, t in sorted(times.items()))
        )
    return "\n".join(lines)


def _device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    except ImportError:
        pass
    return f"cpu ({os.cpu_count()} cores)"


if __name__ == "__main__":
    main()
