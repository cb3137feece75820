"""Decode-step times of the engine against their memory-bandwidth limit, with and without adapters.

Builds engines on a dummy (random-weight) model of a real shape (default: Llama-3.1-8B, bf16),
runs each workload through the Python API with every request submitted at once, and times every
forward step (CUDA-synchronised). For a decode step of ``B`` requests the limit is the bytes it
must read over the device's measured copy bandwidth: every base weight once, each distinct
adapter's A and B once, and the KV cache of every request. Reported per workload: the median
decode step time at the full batch, its limit, the LoRA part (step time minus the base-only step
at the same batch) against the adapters' bytes over bandwidth, and token throughputs.

    python benchmarks/bench_engine_steps.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from random_adapters import adapter_bytes, write_random_adapters  # noqa: E402
from workloads import make_workload  # noqa: E402

CONFIGS = Path(__file__).parent / "configs"


def measure_ceilings() -> dict:
    from triton.testing import do_bench

    n = 1 << 30
    a = torch.empty(n // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    t_copy = do_bench(lambda: b.copy_(a), rep=200, return_mode="median")
    del a, b
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t_mm = do_bench(lambda: m @ m, rep=200, return_mode="median")
    del m
    return {"copy_GBps": 2 * n / t_copy / 1e6, "bf16_TFLOPs": 2 * 8192 ** 3 / t_mm / 1e9}


def timed_engine(settings) -> tuple:
    """An engine whose runner records (tokens, decode-only, seconds) of every forward step."""
    from loraserve.engine import Engine

    engine = Engine(settings)
    steps: list[tuple[int, bool, float]] = []
    forward = engine.runner.forward

    def timed(chunks):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = forward(chunks)
        torch.cuda.synchronize()
        steps.append((len(chunks), all(c.num_tokens == 1 for c in chunks), time.perf_counter() - t0))
        return out
    engine.runner.forward = timed
    return engine, steps


def run_workload(engine, steps, workload) -> dict:
    warm = workload[:2]  # compile whatever this shape of step needs before timing
    engine.generate(input_ids=[w.input_ids for w in warm], lora_path=[w.lora_name for w in warm],
                    sampling_params={"max_new_tokens": 2, "ignore_eos": True, "temperature": 0})
    steps.clear()
    t0 = time.perf_counter()
    results = engine.generate(input_ids=[w.input_ids for w in workload],
                              sampling_params=[w.sampling_params() for w in workload],
                              lora_path=[w.lora_name for w in workload])
    wall = time.perf_counter() - t0
    out_tokens = sum(len(r["output_ids"]) for r in results)
    if out_tokens != sum(w.output_len for w in workload):
        raise RuntimeError(f"generated {out_tokens} tokens, expected {sum(w.output_len for w in workload)}")
    full = [t for n, dec, t in steps if dec and n == len(workload)]
    return {"requests": len(workload), "wall_s": wall, "output_tokens": out_tokens,
            "input_tokens": sum(w.input_len for w in workload), "output_tok_per_s": out_tokens / wall,
            "total_tok_per_s": (out_tokens + sum(w.input_len for w in workload)) / wall,
            "decode_steps_full_batch": len(full),
            "decode_step_ms_median": 1e3 * statistics.median(full) if full else None,
            "steps": len(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(CONFIGS / "llama-3.1-8b"))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--decode-batches", default="1,8,64")
    parser.add_argument("--decode-in", type=int, default=128)
    parser.add_argument("--decode-out", type=int, default=64)
    parser.add_argument("--mixes", default="prefill:2048:16:32,decode:128:512:64",
                        help="name:input:output:requests, comma-separated")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: base, skewed, distinct, mixes")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_engine_steps.py needs a CUDA GPU")
    from loraserve.settings import make_settings

    skip = set(filter(None, args.skip.split(",")))
    cfg = json.loads((Path(args.config) / "config.json").read_text())
    vocab = cfg["vocab_size"]
    ceil = measure_ceilings()
    bw = ceil["copy_GBps"] * 1e9
    result = {"device": torch.cuda.get_device_name(0), "date": datetime.datetime.now(datetime.timezone.utc)
              .isoformat(timespec="seconds"), "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "ceilings": ceil, "config": vars(args), "runs": []}
    common = dict(model_path=args.config, load_format="dummy", device="cuda", dtype="bfloat16", random_seed=0,
                  mem_fraction_static=0.85)
    tmp = Path(tempfile.mkdtemp(prefix="loraserve-bench-"))
    n_adapters = 64
    paths = write_random_adapters(args.config, tmp, n_adapters, rank=args.rank, dtype="bfloat16", seed=1)
    a_bytes = adapter_bytes(args.config, args.rank, dtype="bfloat16")

    engine, steps = timed_engine(make_settings(**common, max_running_requests=256))
    # a decode step reads every weight once except the embedding table (only its rows), unless tied
    embed = engine.model.model.embed_tokens.weight
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters() if p is not embed)
    if engine.model.lm_head.weight.data_ptr() == embed.data_ptr():
        weight_bytes += embed.numel() * embed.element_size()
    kv_per_token = 2 * engine.model.num_layers * engine.model.num_kv_heads * engine.model.head_dim * 2
    result["weight_bytes"], result["adapter_bytes"], result["kv_bytes_per_token"] = weight_bytes, a_bytes, kv_per_token

    def limit_ms(batch: int, ctx: int, adapters: int) -> float:
        return 1e3 * (weight_bytes + adapters * a_bytes + batch * ctx * kv_per_token) / bw

    base_step = {}
    if "base" not in skip:
        for b in map(int, args.decode_batches.split(",")):
            wl = make_workload(b, args.decode_in, args.decode_out, vocab, seed=b)
            m = run_workload(engine, steps, wl)
            ctx = args.decode_in + args.decode_out // 2
            m.update(name=f"base decode batch {b}", limit_ms=limit_ms(b, ctx, 0))
            m["vs_limit"] = m["decode_step_ms_median"] / m["limit_ms"]
            base_step[b] = m["decode_step_ms_median"]
            result["runs"].append(m)
            print(json.dumps(m), flush=True)
    mixes = [tuple(x.split(":")) for x in args.mixes.split(",") if x]
    if "mixes" not in skip:
        for name, i, o, n in mixes:
            m = run_workload(engine, steps, make_workload(int(n), int(i), int(o), vocab, seed=3))
            m.update(name=f"{name}-heavy base", mix=name)
            result["runs"].append(m)
            print(json.dumps(m), flush=True)
    engine.shutdown()
    del engine
    torch.cuda.empty_cache()

    for label, n, dist in (("skewed", 8, "skewed"), ("distinct", 64, "distinct")):
        if label in skip:
            continue
        names = list(paths)[:n]
        engine, steps = timed_engine(make_settings(
            **common, max_running_requests=256, max_loras_per_batch=n + 1, max_lora_rank=args.rank,
            lora_paths=[f"{k}={paths[k]}" for k in names]))
        wl = make_workload(64, args.decode_in, args.decode_out, vocab, names, dist, seed=7)
        m = run_workload(engine, steps, wl)
        distinct = len({w.lora_name for w in wl})
        ctx = args.decode_in + args.decode_out // 2
        m.update(name=f"64 requests, {n} adapters ({dist}), rank {args.rank}", distinct_adapters=distinct,
                 limit_ms=limit_ms(64, ctx, distinct), lora_limit_ms=1e3 * distinct * a_bytes / bw)
        m["vs_limit"] = m["decode_step_ms_median"] / m["limit_ms"]
        if 64 in base_step:
            m["lora_part_ms"] = m["decode_step_ms_median"] - base_step[64]
            m["lora_part_vs_limit"] = m["lora_part_ms"] / m["lora_limit_ms"]
        result["runs"].append(m)
        print(json.dumps(m), flush=True)
        if label == "skewed" and "mixes" not in skip:
            for name, i, o, k in mixes:
                wl = make_workload(int(k), int(i), int(o), vocab, names, "skewed", seed=3)
                m = run_workload(engine, steps, wl)
                m.update(name=f"{name}-heavy, 8 adapters skewed", mix=name)
                result["runs"].append(m)
                print(json.dumps(m), flush=True)
        engine.shutdown()
        del engine
        torch.cuda.empty_cache()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = result["device"].replace(" ", "_") + (f"_{args.tag}" if args.tag else "")
    (out / f"engine_steps_{slug}.json").write_text(json.dumps(result, indent=1))
    print(f"\n| run | decode step ms | limit ms | x limit | LoRA part ms | LoRA limit ms | out tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for m in result["runs"]:
        f = lambda k, d=2: (f"{m[k]:.{d}f}" if m.get(k) is not None else "")  # noqa: E731
        print(f"| {m['name']} | {f('decode_step_ms_median')} | {f('limit_ms')} | {f('vs_limit')} | "
              f"{f('lora_part_ms')} | {f('lora_limit_ms')} | {f('output_tok_per_s', 0)} |")


if __name__ == "__main__":
    main()
