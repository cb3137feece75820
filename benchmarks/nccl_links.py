"""How fast two (or more) GPUs of this host exchange data: one NCCL all-reduce, timed on its own.

Prints, for each message size, the mean time of an in-place all-reduce of a bf16 tensor and the
NCCL "bus bandwidth" (2 (n-1)/n x bytes / time), so a tensor-parallel result can be read against
the links it ran on. ``python benchmarks/nccl_links.py --sizes 64x4096 8192x4096 [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _worker(rank: int, size: int, port: int, shapes: list, iters: int, out) -> None:
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size, device_id=torch.device("cuda", rank)
    )
    for rows, cols in shapes:
        x = torch.ones(rows, cols, dtype=torch.bfloat16, device="cuda")
        for _ in range(5):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            dist.all_reduce(x)
        end.record()
        end.synchronize()
        if rank == 0:
            ms = start.elapsed_time(end) / iters
            nbytes = x.numel() * 2
            out[f"{rows}x{cols}"] = {"ms": ms, "bytes": nbytes, "bus_GBps": 2 * (size - 1) / size * nbytes / ms / 1e6}
    dist.destroy_process_group()


def main() -> None:
    import torch
    import torch.multiprocessing as mp
    from server_runs import free_port

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--sizes", nargs="+", default=["1x4096", "64x4096", "1024x4096", "8192x4096"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]
    result = mp.get_context("spawn").Manager().dict()
    mp.spawn(_worker, args=(args.gpus, free_port(), shapes, args.iters, result), nprocs=args.gpus, join=True)
    doc = {"device": f"{args.gpus} x {torch.cuda.get_device_name()}", "all_reduce_bf16": dict(result)}
    for k, v in doc["all_reduce_bf16"].items():
        print(f"all-reduce {k} bf16: {v['ms'] * 1e3:.1f} us, bus {v['bus_GBps']:.1f} GB/s")
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
