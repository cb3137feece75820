"""Host time per decode step of the Triton attention's metadata, before and after the device block table.

No model runs and no kernel launches: ``N`` requests decode at a context of ``C`` tokens (blocks of
16), and each step times ``begin_step`` (eager) and ``begin_graph_step`` (CUDA-graph refill) of the
Triton attention backend. As in steady decoding, a sixteenth of the requests gain a block each step.

- before: the sequences carry no block-table row (``table_row`` -1), so every sequence's whole block
  table is packed on the host each step: O(N x C / 16) Python work. This is the algorithm the
  backend used for every step before the device block table (tensor-parallel workers too, until
  their tables replayed rank 0's journal).
- after: the scheduler's rows of the KV cache's device :class:`BlockTable`; the step's new blocks are
  flushed (one copy and a scatter) and the rows gathered on the device: O(N) host work.

Also timed: :meth:`LoRABatchInfo.build` for a decode step of ``N`` rows, five copies (before) against
one packed copy (after). On a CPU "device" the device-side ops (copy, scatter, gather) run inline and
count in the host time; on a GPU they are asynchronous launches.

    python benchmarks/bench_attention_host.py --requests 64 256 --context 8192 --out benchmarks/results

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

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # no kernel runs here, but Triton wants a backend

from loraserve.contract import LoRABatchInfo  # noqa: E402
from loraserve.plugins.attention_triton.attention import PagedTritonAttention  # noqa: E402
from loraserve.sched.kv_cache import KVCache  # noqa: E402
from loraserve.staging import HostStaging  # noqa: E402

BLOCK = 16


def median_us(fn, steps: int, setup=None) -> float:
    """Median host time of ``fn(i)`` over ``steps`` calls (after an untimed ``setup(i)``)."""
    times = []
    for i in range(steps):
        if setup is not None:
            setup(i)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # untimed: the timed part is the host's (device work is enqueued)
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times[2:] if len(times) > 4 else times)


def attention_host(num_requests: int, context: int, steps: int, device: str) -> dict:
    per_seq = -(-context // BLOCK) + 4 * steps // BLOCK + 2  # room for the blocks gained below
    kv = KVCache(1, 1, 16, num_requests * per_seq, BLOCK, torch.float16, device)
    attn = PagedTritonAttention(kv, max_seqs=num_requests, max_blocks_per_seq=per_seq)
    table = kv.block_table
    blocks, rows, free = [], [], list(range(num_requests * per_seq - 1, -1, -1))
    for _ in range(num_requests):
        need = -(-context // BLOCK)
        own = [free.pop() for _ in range(need)]
        row = table.acquire()
        table.append(row, own)
        blocks.append(own)
        rows.append(row)
    table.flush()
    start = context - 1  # the context stays put; the blocks gained lie past it, as a step's new block does

    def gain(i: int) -> None:
        """What the scheduler does in a decode step (untimed): a sixteenth of the requests gain a block."""
        for r in range(i % BLOCK, num_requests, BLOCK):
            new = free.pop()
            blocks[r].append(new)
            table.append(rows[r], [new])

    def seqs(with_rows: bool) -> list[tuple]:
        """What the model runner hands over (timed: it is part of the step's host work)."""
        if with_rows:
            return [(blocks[r], start, 1, rows[r]) for r in range(num_requests)]
        return [(blocks[r], start, 1) for r in range(num_requests)]

    out = {}
    for name, with_rows in (("before", False), ("after", True)):
        out[f"begin_step_{name}_us"] = median_us(lambda i, w=with_rows: attn.begin_step(seqs(w)), steps, gain)
        out[f"begin_graph_step_{name}_us"] = median_us(
            lambda i, w=with_rows: attn.begin_graph_step(seqs(w), num_requests), steps, gain
        )
    return out


def batch_info_host(num_rows: int, steps: int, device: str) -> dict:
    num_slots = 9
    seg_slot = [r % num_slots for r in range(num_rows)]
    ranks = [0] + [16] * (num_slots - 1)
    scalings = [0.0] + [2.0] * (num_slots - 1)
    seg_lens = [1] * num_rows

    def five_copies(_):
        """LoRABatchInfo.build as it was: the same checks, then one tensor and one copy per field."""
        for s in seg_slot:
            if not 0 <= s < len(ranks):
                raise ValueError(s)
        if any(r < 0 or r > 16 for r in ranks):
            raise ValueError(ranks)
        indptr = [0]
        for n in seg_lens:
            if n < 0:
                raise ValueError(n)
            indptr.append(indptr[-1] + n)
        token_slot = [s for s, n in zip(seg_slot, seg_lens) for _ in range(n)]
        i32 = dict(dtype=torch.int32, device=device)
        return (
            torch.tensor(indptr, **i32),
            torch.tensor(seg_slot, **i32),
            torch.tensor(token_slot, **i32),
            torch.tensor(ranks, **i32),
            torch.tensor(scalings, dtype=torch.float32, device=device),
            [float(s) for s in scalings],
        )

    staging = HostStaging(device)
    return {
        "batch_info_before_us": median_us(five_copies, steps),
        "batch_info_after_us": median_us(
            lambda _: LoRABatchInfo.build(seg_lens, seg_slot, ranks, scalings, 16, device, staging), steps
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=None, help="a directory for the JSON (default: print only)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(1)  # the engine's host thread is one thread
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    rows = []
    for n in args.requests:
        row = {"requests": n, "context": args.context}
        row.update(attention_host(n, args.context, args.steps, device))
        row.update(batch_info_host(n, args.steps, device))
        rows.append(row)
    print(f"\nhost time per decode step, median us ({name}, context {args.context}, blocks of {BLOCK})")
    print(
        "| requests | begin_step before | after | x | begin_graph_step before | after | x | batch info before | after |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['requests']} | {r['begin_step_before_us']:.0f} | {r['begin_step_after_us']:.0f} | "
            f"{r['begin_step_before_us'] / r['begin_step_after_us']:.1f} | {r['begin_graph_step_before_us']:.0f} | "
            f"{r['begin_graph_step_after_us']:.0f} | "
            f"{r['begin_graph_step_before_us'] / r['begin_graph_step_after_us']:.1f} | "
            f"{r['batch_info_before_us']:.0f} | {r['batch_info_after_us']:.0f} |"
        )
    result = {
        "benchmark": "attention_host",
        "device": name,
        "python": platform.python_version(),
        "torch": torch.__version__,
        # other processes share the machine: its load says how far to trust the absolute numbers
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "config": vars(args) | {"block_size": BLOCK, "torch_threads": 1},
        "rows": rows,
    }
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        slug = name.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
        path = out / f"attention_host_{slug}.json"
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
