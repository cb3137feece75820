"""Decode-step times of the engine against their memory-bandwidth limit, with and without adapters.

Builds engines on a dummy (random-weight) model of a real shape (default: Llama-3.1-8B, bf16),
runs each workload through the Python API with every request submitted at once, and times every
forward step (CUDA-synchronised). For a decode step of ``B`` requests the limit is the bytes it
must read over the device's measured copy bandwidth: every base weight once, each distinct
adapter's A and B once, and the KV cache of every request. Reported per workload: the median
decode step time at the full batch, its limit, the LoRA part (step time minus the base-only step
at the same batch) against the adapters' bytes over bandwidth, and token throughputs. Each engine
configuration (base only, 8 adapters skewed, 64 distinct) runs in its own process, so its memory
is back on the device before the next starts. ``--profile`` adds a per-kernel breakdown of a base
decode step at batch 1 and 64.

    python benchmarks/bench_engine_steps.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
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
    a = b = None  # free the 1 GiB before the GEMM's operands
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t_mm = do_bench(lambda: m @ m, rep=200, return_mode="median")
    m = None
    return {"copy_GBps": 2 * n / t_copy / 1e6, "bf16_TFLOPs": 2 * 8192**3 / t_mm / 1e9}


def timed_engine(settings) -> tuple:
    """An engine whose runner records (tokens, decode-only, seconds) of every forward step."""
    from loraserve.engine.engine import Engine

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


def save(result: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    slug = result["device"].replace(" ", "_") + (f"_{result['config']['tag']}" if result["config"]["tag"] else "")
    path = out / f"engine_steps_{slug}.json"
    path.write_text(json.dumps(result, indent=1))
    return path


def run_workload(engine, steps, workload) -> dict:
    """Run ``workload`` twice and time the second run: the first compiles every kernel and picks every
    GEMM algorithm its step shapes need (Triton's cache is per process only on a fresh machine)."""
    engine.generate(
        input_ids=[w.input_ids for w in workload],
        lora_path=[w.lora_name for w in workload],
        sampling_params=[w.sampling_params() for w in workload],
    )
    steps.clear()
    t0 = time.perf_counter()
    results = engine.generate(
        input_ids=[w.input_ids for w in workload],
        sampling_params=[w.sampling_params() for w in workload],
        lora_path=[w.lora_name for w in workload],
    )
    wall = time.perf_counter() - t0
    out_tokens = sum(len(r["output_ids"]) for r in results)
    if out_tokens != sum(w.output_len for w in workload):
        raise RuntimeError(f"generated {out_tokens} tokens, expected {sum(w.output_len for w in workload)}")
    full = [t for n, dec, t in steps if dec and n == len(workload)]
    return {
        "requests": len(workload),
        "wall_s": wall,
        "output_tokens": out_tokens,
        "input_tokens": sum(w.input_len for w in workload),
        "output_tok_per_s": out_tokens / wall,
        "total_tok_per_s": (out_tokens + sum(w.input_len for w in workload)) / wall,
        "decode_steps_full_batch": len(full),
        "decode_step_ms_median": 1e3 * statistics.median(full) if full else None,
        "steps": len(steps),
    }


def profile_decode(engine, vocab: int, batch: int, top: int = 15) -> list[dict]:
    """Device time per kernel of one decode step at ``batch`` (CUDA graph replays included)."""
    wl = make_workload(batch, 128, 40, vocab, seed=11)
    engine.generate(input_ids=[w.input_ids for w in wl], sampling_params=[w.sampling_params() for w in wl])
    forward = engine.runner.forward
    captured = {}

    def grab(chunks):  # profile the 20th decode step
        captured["n"] = captured.get("n", 0) + 1
        if captured["n"] != 20:
            return forward(chunks)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out = forward(chunks)
            torch.cuda.synchronize()
        captured["prof"] = prof
        return out

    engine.runner.forward = grab
    engine.generate(input_ids=[w.input_ids for w in wl], sampling_params=[w.sampling_params() for w in wl])
    engine.runner.forward = forward
    rows = []
    for evt in captured["prof"].key_averages():
        total = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if total > 0:
            rows.append({"kernel": evt.key[:90], "calls": evt.count, "us": round(total, 1)})
    rows.sort(key=lambda r: -r["us"])
    return rows[:top]


def run_part(args, state: dict) -> None:
    """One engine configuration, in its own process (its memory goes back to the device on exit)."""
    from loraserve.settings import make_settings

    vocab = json.loads((Path(args.config) / "config.json").read_text())["vocab_size"]
    common = dict(
        model_path=args.config,
        load_format="dummy",
        device="cuda",
        dtype="bfloat16",
        random_seed=0,
        mem_fraction_static=0.85,
        max_running_requests=256,
    )
    mixes = [tuple(x.split(":")) for x in args.mixes.split(",") if x]
    if args.part == "base":
        engine, steps = timed_engine(make_settings(**common))
        # a decode step reads every weight once except the embedding table (only its rows), unless tied
        embed = engine.model.model.embed_tokens.weight
        weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters() if p is not embed)
        if engine.model.lm_head.weight.data_ptr() == embed.data_ptr():
            weight_bytes += embed.numel() * embed.element_size()
        del embed
        state["weight_bytes"] = weight_bytes
        state["kv_bytes_per_token"] = (
            2 * engine.model.num_layers * engine.model.num_kv_heads * engine.model.head_dim * 2
        )
        runs = []
        for b in map(int, args.decode_batches.split(",")):
            m = run_workload(engine, steps, make_workload(b, args.decode_in, args.decode_out, vocab, seed=b))
            m.update(name=f"base decode batch {b}", batch=b, adapters=0)
            runs.append(m)
        for name, i, o, n in mixes:
            m = run_workload(engine, steps, make_workload(int(n), int(i), int(o), vocab, seed=3))
            m.update(name=f"{name}-heavy, base only", mix=name, adapters=0)
            runs.append(m)
        if args.profile:
            state["profile"] = {str(b): profile_decode(engine, vocab, b) for b in (1, 64)}
    else:
        n, dist = {"skewed": (8, "skewed"), "distinct": (64, "distinct")}[args.part]
        names = list(state["adapters"])[:n]
        engine, steps = timed_engine(
            make_settings(
                **common,
                max_loras_per_batch=n + 1,
                max_lora_rank=args.rank,
                lora_paths=[f"{k}={state['adapters'][k]}" for k in names],
            )
        )
        wl = make_workload(64, args.decode_in, args.decode_out, vocab, names, dist, seed=7)
        m = run_workload(engine, steps, wl)
        m.update(
            name=f"decode batch 64, {n} adapters ({dist}), rank {args.rank}",
            batch=64,
            adapters=len({w.lora_name for w in wl}),
        )
        runs = [m]
        if args.part == "skewed":
            for name, i, o, k in mixes:
                m = run_workload(engine, steps, make_workload(int(k), int(i), int(o), vocab, names, "skewed", seed=3))
                m.update(name=f"{name}-heavy, 8 adapters skewed", mix=name, adapters=8)
                runs.append(m)
    for m in runs:
        print(json.dumps(m), flush=True)
    state["runs"] += runs
    engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(CONFIGS / "llama-3.1-8b"))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--decode-batches", default="1,8,64")
    parser.add_argument("--decode-in", type=int, default=128)
    parser.add_argument("--decode-out", type=int, default=64)
    parser.add_argument(
        "--mixes", default="prefill:2048:16:32,decode:128:512:64", help="name:input:output:requests, comma-separated"
    )
    parser.add_argument("--parts", default="base,skewed,distinct", help="engine configurations to run")
    parser.add_argument("--profile", action="store_true", help="kernel breakdown of a base decode step at 1 and 64")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--tag", default="")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part, in a child process
    parser.add_argument("--state", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_engine_steps.py needs a CUDA GPU")
    if args.part:
        state = json.loads(Path(args.state).read_text())
        run_part(args, state)
        Path(args.state).write_text(json.dumps(state))
        return

    tmp = Path(tempfile.mkdtemp(prefix="loraserve-bench-"))
    parts = args.parts.split(",")
    lora_parts = {"skewed": 8, "distinct": 64}
    n_adapters = max((lora_parts[p] for p in parts if p in lora_parts), default=0)
    paths = (
        write_random_adapters(args.config, tmp, n_adapters, rank=args.rank, dtype="bfloat16", seed=1)
        if n_adapters
        else {}
    )
    ceil = measure_ceilings()
    state = {
        "device": torch.cuda.get_device_name(0),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "ceilings": ceil,
        "config": {k: v for k, v in vars(args).items() if k not in ("part", "state")},
        "adapters": {k: str(v) for k, v in paths.items()},
        "adapter_bytes": adapter_bytes(args.config, args.rank, dtype="bfloat16"),
        "runs": [],
    }
    torch.cuda.empty_cache()
    state_path = tmp / "state.json"
    for part in parts:
        state_path.write_text(json.dumps(state))
        cmd = [sys.executable, __file__, "--part", part, "--state", str(state_path)]
        cmd += [a for a in sys.argv[1:]]
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            print(f"part {part} failed with exit code {proc.returncode}", flush=True)
            continue
        state = json.loads(state_path.read_text())
    result = finish(state)
    save(result, Path(args.out))
    print_table(result)


def finish(state: dict) -> dict:
    """Limits and ratios: bytes a decode step must read over the measured bandwidth."""
    bw = state["ceilings"]["copy_GBps"] * 1e9
    cfg = state["config"]
    ctx = cfg["decode_in"] + cfg["decode_out"] // 2
    wb, kvb, ab = state.get("weight_bytes"), state.get("kv_bytes_per_token"), state["adapter_bytes"]
    base = {m["batch"]: m["decode_step_ms_median"] for m in state["runs"] if m.get("batch") and not m["adapters"]}
    mixes = {m["mix"]: m for m in state["runs"] if m.get("mix") and not m["adapters"]}
    for m in state["runs"]:
        if m.get("batch") and wb:
            m["limit_ms"] = 1e3 * (wb + m["adapters"] * ab + m["batch"] * ctx * kvb) / bw
            m["vs_limit"] = m["decode_step_ms_median"] / m["limit_ms"]
            if m["adapters"] and m["batch"] in base:
                m["lora_part_ms"] = m["decode_step_ms_median"] - base[m["batch"]]
                m["lora_limit_ms"] = 1e3 * m["adapters"] * ab / bw
                m["lora_part_vs_limit"] = m["lora_part_ms"] / m["lora_limit_ms"]
        if m.get("mix") and m["adapters"] and m["mix"] in mixes:
            m["throughput_vs_base"] = m["total_tok_per_s"] / mixes[m["mix"]]["total_tok_per_s"]
    return state


def print_table(result: dict) -> None:
    print(
        "\n| run | decode step ms | limit ms | x limit | LoRA part ms | LoRA limit ms | x LoRA limit | "
        "tok/s (in+out) | vs base |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for m in result["runs"]:
        f = lambda k, d=2, m=m: f"{m[k]:.{d}f}" if m.get(k) is not None else ""  # noqa: E731
        print(
            f"| {m['name']} | {f('decode_step_ms_median')} | {f('limit_ms')} | {f('vs_limit')} | "
            f"{f('lora_part_ms')} | {f('lora_limit_ms')} | {f('lora_part_vs_limit')} | {f('total_tok_per_s', 0)} | "
            f"{f('throughput_vs_base')} |"
        )
    for b, rows in result.get("profile", {}).items():
        print(f"\nbase decode step at batch {b}, device time per kernel (us):")
        for r in rows:
            print(f"  {r['us']:9.1f}  x{r['calls']:<4} {r['kernel']}")


if __name__ == "__main__":
    main()
