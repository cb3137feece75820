"""What one slot fill costs (issue 22): an adapter copied into a GPU slot from page-locked host memory
(``GpuAdapterPool.write``, the path without the store) against the same slot filled from the GPU
store (``GpuAdapterStore.fill_slot``, device to device), and the store's own put (host to store).

Pool and store are built for ``--config-dir``'s shape (every projection, bf16) on the GPU; one random
adapter per ``--ranks`` entry. Each operation runs ``--repeats`` times after one untimed run; reported:
median GPU time (CUDA events) and median host time of the call (the launches). Prints a table and
writes JSON (``--output-file``).

    python benchmarks/bench_store_fill.py --config-dir benchmarks/configs/llama-3.1-8b --output-file fill.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import random_adapters  # noqa: E402
from bench_offline import environment  # noqa: E402
from sim_store import projections  # noqa: E402
from tables import text_table  # noqa: E402

from loraserve.lora.adapter import LoRAAdapter  # noqa: E402
from loraserve.lora.gpu_store import GpuAdapterStore  # noqa: E402
from loraserve.lora.overlap import pinned_copy  # noqa: E402
from loraserve.lora.pools import GpuAdapterPool  # noqa: E402
from loraserve.plugins.eviction_lru import LRUPolicy  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median GPU ms (CUDA events) and median host ms of ``fn()`` (on CPU both are the host time)."""
    fn()
    if not torch.cuda.is_available():
        host = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(host), statistics.median(host)
    gpu, host = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        host.append((time.perf_counter() - t0) * 1e3)
        end.synchronize()
        gpu.append(start.elapsed_time(end))
    return statistics.median(gpu), statistics.median(host)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-dir", default=str(HERE / "configs" / "llama-3.1-8b"))
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--store-gib", type=float, default=4.0)
    p.add_argument("--output-file", default=None)
    args = p.parse_args()
    config = random_adapters.load_config(args.config_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # (CPU: checks the script, times nothing useful)
    modules, layers, dev = projections(config), config["num_hidden_layers"], torch.device(device)
    pool = GpuAdapterPool(2, max(args.ranks), layers, modules, {}, torch.bfloat16, dev, LRUPolicy())
    store = GpuAdapterStore(pool, int(args.store_gib * 2**30), LRUPolicy())
    rows = []
    for rank in args.ranks:
        gen = torch.Generator().manual_seed(rank)
        weights = {
            (layer, fused): (torch.randn(n * rank, i, generator=gen), torch.randn(o[-1], rank, generator=gen))
            for layer in range(layers)
            for fused, (i, o) in modules.items()
            for n in [len(o) - 1]
        }
        adapter = LoRAAdapter(f"r{rank}", "-", 1.0, frozenset(), weights)
        adapter = pinned_copy(adapter, torch.bfloat16) if device == "cuda" else adapter
        key = (adapter.name, 1)
        host_write = timed(lambda a=adapter: pool.write(0, a, non_blocking=True), args.repeats)

        def put(a=adapter, k=key) -> None:
            store.remove(k)
            store.put(k, a, set(), non_blocking=True)

        store_put = timed(put, args.repeats)
        fill = timed(lambda k=key: store.fill_slot(1, store.entries[k]), args.repeats)
        nbytes = sum(t.numel() * t.element_size() for t in adapter.tensors())
        rows.append({"rank": rank, "adapter_mib": nbytes / 2**20, "host_write": host_write, "store_put": store_put,
                     "store_fill": fill})  # fmt: skip
    head = ["rank", "MiB", "host write GPU ms", "host ms", "store put GPU ms", "host ms", "fill GPU ms", "host ms"]
    table = [[str(r["rank"]), f"{r['adapter_mib']:.0f}", *(f"{v:.3f}" for k in ("host_write", "store_put",
              "store_fill") for v in r[k])] for r in rows]  # fmt: skip
    print(text_table(head, table))
    if args.output_file:
        doc = {"benchmark": "store_fill", **environment(device), "config": vars(args), "rows": rows}
        Path(args.output_file).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
