"""Overlap loading on a live server: the serving benchmark with and without --enable-lora-overlap-loading.

For each adapter rank, random adapters of the base model's shape are written once; then for each
setting of the flag a server is started (``python -m loraserve``), :mod:`bench_serving` runs the
same seeded workload against it (distinct adapters: round robin over more adapters than GPU slots,
so nearly every admission needs a copy), the server's LoRA counters are read from ``/metrics``
(slot fills, bytes and seconds copied, time requests waited for a copy, prefetches), and the
server is stopped. One JSON file keeps every run, the device and the configuration, and a summary
of TTFT (median, p99), TPOT and E2E with the change the flag makes.

``--weight-copies`` writes fewer distinct weight files than adapter names (the names map to them
round robin): every name is still its own adapter in the server (its own host copy, slot and
copies), only the disk space and the start-up time shrink.

    python benchmarks/bench_overlap_loading.py --config-dir benchmarks/configs/llama-3.1-8b \\
        --ranks 16 128 --num-adapters 16 --max-loaded-loras 16 --max-loras-per-batch 8 \\
        --request-rate 4 --input-len 512 --output-len 512 --num-prompts 64 --output-file overlap.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import random_adapters  # noqa: E402
from server_runs import add_run_args, serve_and_bench, work_dir, workload_flags  # noqa: E402


def server_flags(args: argparse.Namespace, adapters: dict[str, Path], rank: int, overlap: bool) -> list[str]:
    flags = [
        "--model-path",
        args.config_dir,
        "--load-format",
        "dummy",
        "--max-loras-per-batch",
        str(args.max_loras_per_batch),
        "--max-loaded-loras",
        str(args.max_loaded_loras),
        "--max-lora-rank",
        str(rank),
        "--lora-paths",
        *[f"{name}={path}" for name, path in adapters.items()],
        "--log-level",
        "warning",
    ]
    if args.lora_backend:
        flags += ["--lora-backend", args.lora_backend]
    if overlap:
        flags.append("--enable-lora-overlap-loading")
    return flags + list(args.server_arg)


def run_one(args: argparse.Namespace, adapters: dict[str, Path], rank: int, overlap: bool, out_dir: Path) -> dict:
    bench = workload_flags(args) + [
        "--lora-name",
        *adapters,
        "--lora-request-distribution",
        "distinct",
        "--warmup-requests",
        str(args.warmup_requests),
    ]
    return serve_and_bench(
        server_flags(args, adapters, rank, overlap),
        bench,
        f"r{rank}_{'on' if overlap else 'off'}",
        out_dir,
        args.port,
        args.startup_timeout,
    )


def summary_row(rank: int, overlap: bool, doc: dict) -> dict[str, Any]:
    r = doc["results"]
    row = {
        "rank": rank,
        "overlap": overlap,
        "completed": r["completed"],
        "failed": r["failed"],
        "duration_s": r["duration"],
        "output_throughput": r["output_throughput"],
    }
    for metric, name in (("ttft", "ttft"), ("tpot", "tpot"), ("e2e", "e2e_latency")):
        for key in ("median", "p99", "mean"):
            row[f"{metric}_{key}_ms"] = r.get(f"{key}_{name}_ms")
    row.update({f"lora_{k}": v for k, v in doc.get("lora_counters", {}).items()})
    return row


def compare(rows: list[dict]) -> list[dict]:
    """Per rank: with / without the flag, as ratios (below 1: the flag lowered it)."""
    out = []
    for rank in sorted({r["rank"] for r in rows}):
        on = next((r for r in rows if r["rank"] == rank and r["overlap"]), None)
        off = next((r for r in rows if r["rank"] == rank and not r["overlap"]), None)
        if on is None or off is None:
            continue
        entry = {"rank": rank}
        for key in ("ttft_median_ms", "ttft_p99_ms", "tpot_median_ms", "e2e_median_ms", "output_throughput"):
            if on.get(key) is not None and off.get(key):
                entry[f"{key}_on_over_off"] = on[key] / off[key]
        out.append(entry)
    return out


def format_summary(rows: list[dict], ratios: list[dict]) -> str:
    head = (
        "| rank | overlap | TTFT median ms | TTFT p99 ms | TPOT median ms | E2E median ms | out tok/s | copies | "
        "copy s | wait s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:

        def f(key, fmt="{:.1f}"):
            v = r.get(key)
            return "—" if v is None else fmt.format(v)

        lines.append(
            f"| {r['rank']} | {'on' if r['overlap'] else 'off'} | {f('ttft_median_ms')} | {f('ttft_p99_ms')} | "
            f"{f('tpot_median_ms', '{:.2f}')} | {f('e2e_median_ms')} | {f('output_throughput')} | "
            f"{f('lora_slot_fills', '{:.0f}')} | {f('lora_copy_seconds', '{:.2f}')} | "
            f"{f('lora_copy_wait_seconds', '{:.2f}')} |"
        )
    for e in ratios:
        lines.append(
            f"\nrank {e['rank']}: TTFT median on/off = {e.get('ttft_median_ms_on_over_off', float('nan')):.3f}, "
            f"p99 {e.get('ttft_p99_ms_on_over_off', float('nan')):.3f}, "
            f"TPOT {e.get('tpot_median_ms_on_over_off', float('nan')):.3f}, "
            f"E2E {e.get('e2e_median_ms_on_over_off', float('nan')):.3f}"
        )
    return "\n".join(lines)


def gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config-dir", default=str(HERE / "configs" / "llama-3.1-8b"), help="base model config (dummy weights)"
    )
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 128])
    p.add_argument("--num-adapters", type=int, default=16)
    p.add_argument("--weight-copies", type=int, default=None, help="distinct weight files (default: one per adapter)")
    p.add_argument("--max-loaded-loras", type=int, default=16)
    p.add_argument("--max-loras-per-batch", type=int, default=8)
    p.add_argument("--lora-backend", default=None)
    p.add_argument("--request-rate", type=float, default=4.0)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--warmup-requests", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--port", type=int, default=30077)
    p.add_argument("--modes", nargs="+", choices=("off", "on"), default=["off", "on"])
    add_run_args(p, "overlap-bench-")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    work = work_dir(args)
    config = random_adapters.load_config(args.config_dir)
    runs, rows = [], []
    for rank in args.ranks:
        copies = args.weight_copies or args.num_adapters
        files = random_adapters.write_random_adapters(
            config, work / f"rank{rank}", copies, rank=rank, seed=args.seed, dtype="bfloat16"
        )
        paths = list(files.values())
        adapters = {f"lora{i}": paths[i % len(paths)] for i in range(args.num_adapters)}
        for mode in args.modes:
            overlap = mode == "on"
            print(f"rank {rank}, overlap {mode}: starting the server", file=sys.stderr, flush=True)
            doc = run_one(args, adapters, rank, overlap, work)
            runs.append({"rank": rank, "overlap": overlap, "doc": doc})
            rows.append(summary_row(rank, overlap, doc))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    ratios = compare(rows)
    device = gpu_name()
    result = {
        "benchmark": "overlap_loading",
        "device": device,
        "config": vars(args),
        "adapter_bytes": {
            r: random_adapters.adapter_bytes(config, r, random_adapters.ALL_TARGETS, "bfloat16") for r in args.ranks
        },
        "summary": rows,
        "on_over_off": ratios,
        "runs": runs,
    }
    print(format_summary(rows, ratios))
    if args.output_file:
        Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_file).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.output_file}")
    return result


if __name__ == "__main__":
    main()
