"""Host time of the scheduler's bookkeeping per decode step, against the number of running requests.

No model runs: a paged KV cache of small blocks, ``N`` requests decoding (one new token per step each,
a block gained every ``block_size`` steps), and per step ``schedule()`` plus the finish of the requests
that reached their length (``remove``), replaced by new arrivals so ``N`` stay running. What scales
worse than linearly in ``N`` here is per-step Python that issue 18 asks to keep small.

    python benchmarks/bench_scheduler.py --running 64 256 1024 --out benchmarks/results/scheduler_cpu.json

Prints a table and writes JSON with the machine, versions and configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from loraserve.sched.kv_cache import KVCache
from loraserve.sched.request import Request
from loraserve.sched.sampling_params import SamplingParams
from loraserve.sched.scheduler import Scheduler

BLOCK = 16


def run(num_running: int, steps: int, prompt: int, output: int) -> dict:
    blocks = num_running * (-(-(prompt + output) // BLOCK) + 1) + 8
    kv = KVCache(1, 1, 8, blocks, BLOCK, torch.float32, torch.device("cpu"))
    sched = Scheduler(kv, max_running=num_running, step_tokens=1 << 30, chunk_size=1 << 30)
    params = SamplingParams.from_dict({"max_new_tokens": output})
    made = 0
    length: dict[Request, int] = {}

    def arrive() -> None:
        nonlocal made
        # staggered lengths, so a few requests finish every step instead of all at once
        req = Request(request_id=f"r{made}", prompt_ids=[1] * prompt, params=params)
        length[req] = output - made % output
        sched.add(req)
        made += 1

    for _ in range(num_running):
        arrive()
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        plan = sched.schedule()
        for chunk in plan:
            r = chunk.request
            r.num_computed = chunk.start + chunk.num_tokens
            if chunk.samples:
                r.output_ids.append(1)
        for chunk in plan:
            r = chunk.request
            if chunk.samples and len(r.output_ids) >= length[r]:
                sched.remove(r)
                del length[r]
                arrive()
        if step >= 3:  # the first steps prefill
            times.append(time.perf_counter() - t0)
    return {
        "running": num_running,
        "steps_timed": len(times),
        "median_us": 1e6 * statistics.median(times),
        "mean_us": 1e6 * statistics.fmean(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--running", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--output", type=int, default=64)
    parser.add_argument("--label", default="", help="a name for this run in the JSON (e.g. a commit)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = [run(n, args.steps, args.prompt, args.output) for n in args.running]
    base = rows[0]
    print(f"| running | median us/step | per request us | vs {base['running']} running |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        ratio = r["median_us"] / base["median_us"]
        print(f"| {r['running']} | {r['median_us']:.0f} | {r['median_us'] / r['running']:.2f} | {ratio:.1f}x |")
    result = {
        "benchmark": "scheduler",
        "label": args.label,
        "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "config": vars(args) | {"out": None},
        "rows": rows,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
