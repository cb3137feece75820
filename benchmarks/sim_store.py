"""GPU adapter memory by rank against padded slots (issue 22), simulated with the real store: how many
adapters of mixed ranks the GPU holds at once, and how often a request finds its adapter there.

The engine's :class:`~loraserve.lora.gpu_store.GpuAdapterStore` and slot pool are built for a model
shape (``--config-dir``, every projection targeted) on PyTorch's ``meta`` device (no memory is
allocated), and the store's page buffers are then dropped so that no copy runs: its page allocator,
eviction (LRU), compaction and metrics run exactly as in the engine. ``--num-adapters`` adapters
get ranks drawn uniformly from ``--ranks``; a seeded stream of ``--num-requests`` requests picks
adapters with Zipf-skewed popularity (``p(k) ~ k ** -zipf``).
Each request's adapter is looked up in the store and put there when missing (evicting by LRU).

Two designs at the same bytes, per ``--gib`` budget:

- ``paged``: pages of 8 rank rows (the store as the engine builds it): an adapter of rank r takes
  ``ceil(r / 8)`` pages;
- ``padded``: pages of ``max(--ranks)`` rows, i.e. every adapter padded to the maximum rank, as a
  slot pool padded to ``--max-lora-rank`` is (SGLang and vLLM pad every slot so).

It reports per design the adapters resident (mean over the measured requests and at the end), the GPU
hit rate (requests whose adapter was resident), puts per 1,000 requests (host-to-GPU copies), and
the compactions. The first ``--warmup-fraction`` of the requests are not measured. No timing: this
counts memory, it does not measure speed (the served run on a GPU does).

    python benchmarks/sim_store.py --output-file benchmarks/results/store_sim.json \\
        --markdown benchmarks/results/store_sim.md
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import random_adapters  # noqa: E402
from tables import write_results  # noqa: E402

from loraserve.lora.gpu_store import DEFAULT_PAGE_RANK, GpuAdapterStore  # noqa: E402
from loraserve.lora.pools import GpuAdapterPool  # noqa: E402
from loraserve.plugins.eviction_lru import LRUPolicy  # noqa: E402

META = torch.device("meta")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-dir", default=str(HERE / "configs" / "llama-3.1-8b"))
    p.add_argument("--gib", type=float, nargs="+", default=[4.0, 8.0, 16.0, 32.0])
    p.add_argument("--num-adapters", type=int, default=2000)
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--num-requests", type=int, default=20000)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--warmup-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--time-compaction",
        action="store_true",
        help="time each compaction's host side: the store's ops dispatched on meta page buffers (no data)",
    )
    p.add_argument("--output-file", default=None)
    p.add_argument("--markdown", default=None)
    return p


def projections(config: dict) -> dict[str, tuple[int, tuple[int, ...]]]:
    """fused name -> (in, output offsets), every projection targeted (the engine's fused layout)."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    d = config.get("head_dim") or h // heads
    q, k = heads * d, kv * d
    return {
        "qkv_proj": (h, (0, q, q + k, q + 2 * k)),
        "o_proj": (q, (0, h)),
        "gate_up_proj": (h, (0, inter, 2 * inter)),
        "down_proj": (inter, (0, h)),
    }


def sized_adapter(name: str, rank: int) -> SimpleNamespace:
    """What the store reads of an adapter when it holds no page buffers: its rank, name and scaling."""
    return SimpleNamespace(name=name, source=name, rank=rank, scaling=1.0, dora_scales={})


def simulate(args, config: dict, gib: float, page_rank: int, ranks: list[int], stream: np.ndarray) -> dict:
    modules, layers = projections(config), config["num_hidden_layers"]
    pool = GpuAdapterPool(1, max(args.ranks), layers, modules, {}, torch.bfloat16, META, LRUPolicy())
    store = GpuAdapterStore(pool, int(gib * 2**30), LRUPolicy(), page_rank=page_rank)
    buffers = store.A, store.B
    store.A, store.B = {}, {}  # no page buffers: puts and compactions move no data (see the docstring)
    compaction_s: list[float] = []
    if args.time_compaction:  # compactions dispatch their ops on the meta buffers: the host's share alone
        compact = store.compact

        def timed_compact() -> None:
            store.A, store.B = buffers
            t0 = time.perf_counter()
            compact()
            compaction_s.append(time.perf_counter() - t0)
            store.A, store.B = {}, {}

        store.compact = timed_compact
    warm = int(args.warmup_fraction * len(stream))
    hits = puts = 0
    resident = []
    for i, a in enumerate(stream):
        key = (f"a{a}", 1)
        hit = store.get(key) is not None
        if not hit:
            store.put(key, sized_adapter(f"a{a}", ranks[a]), set())
        if i >= warm:
            hits += hit
            puts += not hit
            resident.append(len(store.entries))
    store.check_integrity()
    measured = len(stream) - warm
    stats = store.stats()
    return {
        "gib": gib,
        "page_rank": store.page_rank,
        "pages": store.num_pages,
        "resident_mean": float(np.mean(resident)),
        "resident_end": stats["resident"],
        "hit_rate": hits / measured,
        "puts_per_1000": 1000 * puts / measured,
        "compactions": stats["compactions"],
        "padding_rows_end": stats["padding_rows"],
        "compaction_host_ms_mean": 1e3 * float(np.mean(compaction_s)) if compaction_s else None,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    config = random_adapters.load_config(args.config_dir)
    rng = np.random.default_rng(args.seed)
    ranks = rng.choice(args.ranks, size=args.num_adapters).tolist()
    weights = np.arange(1, args.num_adapters + 1, dtype=float) ** -args.zipf
    stream = rng.choice(args.num_adapters, size=args.num_requests, p=weights / weights.sum())
    runs = []
    for gib in args.gib:
        row = {"gib": gib}
        for design, page_rank in (("paged", DEFAULT_PAGE_RANK), ("padded", max(args.ranks))):
            row[design] = simulate(args, config, gib, page_rank, ranks, stream)
        row["resident_ratio"] = row["paged"]["resident_mean"] / row["padded"]["resident_mean"]
        runs.append(row)
        paged, padded = row["paged"], row["padded"]
        timed = f"; compaction {paged['compaction_host_ms_mean']:.1f} ms host" if args.time_compaction else ""
        print(f"{gib:g} GiB: paged {paged['resident_mean']:.0f} resident, hit {paged['hit_rate']:.3f}; "
              f"padded {padded['resident_mean']:.0f}, hit {padded['hit_rate']:.3f}{timed}", flush=True)  # fmt: skip
    device = "a simulation (meta tensors, no GPU)"
    result = {"benchmark": "store_sim", "device": device, "config": vars(args), "runs": runs}
    head = ["GiB", "paged resident", "padded resident", "ratio", "paged hit rate", "padded hit rate",
            "paged puts/1k", "padded puts/1k"]  # fmt: skip
    rows = [
        [f"{r['gib']:g}", f"{r['paged']['resident_mean']:.0f}", f"{r['padded']['resident_mean']:.0f}",
         f"{r['resident_ratio']:.2f}", f"{r['paged']['hit_rate']:.3f}", f"{r['padded']['hit_rate']:.3f}",
         f"{r['paged']['puts_per_1000']:.0f}", f"{r['padded']['puts_per_1000']:.0f}"]
        for r in runs
    ]  # fmt: skip
    write_results(result, head, rows, args.output_file, args.markdown)
    return result


if __name__ == "__main__":
    main()
