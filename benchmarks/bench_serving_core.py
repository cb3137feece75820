"""The serving core against its targets (issue 18): served vs offline throughput, the served decode
step vs its GPU time and its host time, TPOT vs the step's bytes-over-bandwidth limit, and the
first minute of serving vs a warm server, with the overlapped loop on and off.

Parts (run each in its own call; every part writes its own JSON, ``--summarize`` merges them into
one JSON and a markdown table):

- ``offline``: one in-process engine (Python API), the workload with and without adapters at each
  concurrency (the scheduler's ``max_running`` set per run; graphs are captured up to the largest),
  overlap on and off (the stepper's switch flipped between runs). Also measures the device's copy
  bandwidth for the limit.
- ``served-overlap`` / ``served-sync``: one server each (``python -m loraserve``, default memory
  flags, ``--disable-overlap-schedule`` for sync): first the adapter workload at the first
  concurrency right after a 16-request warm-up (``cold``), then every (concurrency, adapters) run,
  then the ``cold`` run again (``warm``: the server has now served the whole workload). Engine
  counters (steps, wall, host and GPU seconds per step) are read from ``/metrics`` around each run.
- ``served-base-only``: a server without LoRA, default memory flags, the base workload at the
  largest concurrency (it must complete: no out-of-memory).

    python benchmarks/bench_serving_core.py --config-dir benchmarks/configs/llama-3.1-8b \\
        --part offline --output-file core_offline.json
    python benchmarks/bench_serving_core.py --summarize core_*.json --output-file core.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_serving  # noqa: E402
import httpx  # noqa: E402
import random_adapters  # noqa: E402
from bench_offline import environment  # noqa: E402
from server_runs import diff_steps, free_port, parse_step_times, wait_healthy  # noqa: E402
from workloads import make_workload  # noqa: E402

PARTS = ("offline", "served-overlap", "served-sync", "served-base-only")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-dir", default=str(HERE / "configs" / "llama-3.1-8b"))
    p.add_argument("--part", choices=PARTS, action="append", default=[])
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    p.add_argument("--num-adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--distribution", default="skewed")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--warmup-requests", type=int, default=16)
    p.add_argument("--work-dir", default="/tmp/bench-core")
    p.add_argument("--server-arg", action="append", default=[])
    p.add_argument("--startup-timeout", type=float, default=400)
    p.add_argument("--summarize", nargs="+", default=None, help="merge these part files")
    p.add_argument("--output-file", default=None)
    p.add_argument("--markdown", default=None, help="with --summarize: write the table here")
    return p


def adapters(args, config) -> dict[str, Path]:
    return random_adapters.write_random_adapters(
        config, Path(args.work_dir) / "adapters", args.num_adapters, rank=args.rank, seed=args.seed, dtype="bfloat16"
    )


def workload(args, config, names):
    return make_workload(
        args.num_prompts,
        args.input_len,
        args.output_len,
        config["vocab_size"],
        names,
        args.distribution if names else "uniform",
        seed=args.seed,
    )


def step_limit_ms(config: dict, concurrency: int, args, bandwidth: float) -> dict[str, float]:
    """The bytes a decode step at ``concurrency`` reads (weights but the embedding table, plus the
    KV cache at the mean decode context) over the measured bandwidth."""
    h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or h // heads
    inter = config["intermediate_size"]
    per_layer = h * (heads * head_dim) + 2 * h * (kv_heads * head_dim) + (heads * head_dim) * h + 3 * h * inter
    weights = 2 * (layers * per_layer + vocab * h)  # bf16; lm_head read once, embedding rows not counted
    context = args.input_len + args.output_len / 2
    kv = 2 * layers * kv_heads * head_dim * 2 * context * concurrency
    return {"weight_gb": weights / 1e9, "kv_gb": kv / 1e9, "limit_ms": (weights + kv) / bandwidth * 1e3}


def measure_bandwidth() -> float:
    import torch

    if not torch.cuda.is_available():
        return float("nan")
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    bandwidth = 2 * x.numel() * 20 / (time.perf_counter() - start)
    del x, y
    torch.cuda.empty_cache()
    return bandwidth


# -- offline -----------------------------------------------------------------------------------------


def offline(args, config) -> dict[str, Any]:
    import torch

    from loraserve.engine.engine import Engine
    from loraserve.settings import make_settings

    bandwidth = measure_bandwidth()
    paths = adapters(args, config)
    settings = make_settings(
        model_path=args.config_dir,
        load_format="dummy",
        dtype="bfloat16",
        log_level="warning",
        max_running_requests=max(args.concurrency),
        lora_paths=[f"{n}={p}" for n, p in paths.items()],
        max_loras_per_batch=args.num_adapters + 1,
        max_lora_rank=args.rank,
        lora_target_modules=["all"],
        lora_backend="csgmv" if torch.cuda.is_available() else None,
    )
    t0 = time.perf_counter()
    engine = Engine(settings)
    startup = time.perf_counter() - t0
    runs = []
    try:
        base, lora = workload(args, config, None), workload(args, config, sorted(paths))
        run_generate(engine, base[: args.warmup_requests], 8)
        for overlap in (True, False):
            engine.stepper.overlap = overlap  # benchmark-only switch between runs (the engine is idle)
            for conc in args.concurrency:
                engine.scheduler.max_running = conc
                for name, specs in (("base", base), ("adapters", lora)):
                    engine.flush_cache()  # every run repeats the same prompts: none may find them cached
                    before = snapshot(engine)
                    start = time.perf_counter()
                    results = run_generate(engine, specs)
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    wall = time.perf_counter() - start
                    engine.call_in_engine(lambda: None)
                    row = {"overlap": overlap, "concurrency": conc, "workload": name, "wall_s": wall}
                    row.update(result_metrics(results, wall))
                    row["engine_steps"] = diff_steps(snapshot(engine), before)
                    row["limit"] = step_limit_ms(config, conc, args, bandwidth)
                    runs.append(row)
                    print(summary_line("offline", row), flush=True)
    finally:
        engine.shutdown()
    return {"part": "offline", "bandwidth_gbs": bandwidth / 1e9, "startup_s": startup, "runs": runs}


def snapshot(engine) -> dict:
    stats = engine.stats()
    out = {}
    for kind, (steps, secs) in stats["steps"].items():
        t = stats["step_timing"][kind]
        out[kind] = {"steps": steps, "seconds": secs, "host_s": t["host_s"], "gpu_s": t["gpu_s"]}
        out[kind]["gpu_steps"] = t["gpu_steps"]
    return out


def run_generate(engine, specs, max_new: int | None = None) -> list[dict]:
    params = [{"max_new_tokens": max_new or s.output_len, "temperature": 0, "ignore_eos": True} for s in specs]
    return engine.generate(
        input_ids=[s.input_ids for s in specs], sampling_params=params, lora_path=[s.lora_name for s in specs]
    )


def result_metrics(results: list[dict], wall: float) -> dict[str, Any]:
    counts = [len(r["output_ids"]) for r in results]
    bad = [r["meta_info"]["finish_reason"] for r in results if r["meta_info"]["finish_reason"]["type"] != "length"]
    tpot = [
        (r["meta_info"]["e2e_latency_s"] - r["meta_info"]["ttft_s"]) / (n - 1) for r, n in zip(results, counts) if n > 1
    ]
    return {
        "output_throughput": sum(counts) / wall,
        "failed": len(bad),
        "median_tpot_ms": 1e3 * statistics.median(tpot) if tpot else None,
        "mean_tpot_ms": 1e3 * statistics.fmean(tpot) if tpot else None,
    }


# -- served -----------------------------------------------------------------------------------------


def served(args, config, part: str) -> dict[str, Any]:
    lora = part != "served-base-only"
    paths = adapters(args, config) if lora else {}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    flags = ["--model-path", args.config_dir, "--load-format", "dummy", "--log-level", "warning"]
    flags += ["--max-running-requests", str(max(args.concurrency)), *args.server_arg]
    if lora:
        flags += ["--lora-paths", *[f"{n}={p}" for n, p in paths.items()], "--max-lora-rank", str(args.rank)]
        flags += ["--max-loras-per-batch", str(args.num_adapters + 1)]
    if part == "served-sync":
        flags.append("--disable-overlap-schedule")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log = open(work / f"server_{part}.log", "w")
    cmd = [sys.executable, "-m", "loraserve", *flags, "--port", str(port)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    runs = []
    try:
        wait_healthy(url, proc, args.startup_timeout)
        startup = time.perf_counter() - t0
        plan = [(c, w) for c in args.concurrency for w in (("base", "adapters") if lora else ("base",))]
        if lora:
            plan = [(args.concurrency[0], "adapters", "cold")] + [(c, w, "") for c, w in plan]
            plan += [(args.concurrency[0], "adapters", "warm")]
        else:
            plan = [(max(args.concurrency), "base", "")]
        for i, (conc, name, phase) in enumerate(plan):
            httpx.post(f"{url}/flush_cache", timeout=60).raise_for_status()  # (runs repeat the prompts)
            before = parse_step_times(httpx.get(f"{url}/metrics", timeout=10).text)
            out = work / f"serving_{part}_{i}.json"
            bench = ["--base-url", url, "--num-prompts", str(args.num_prompts)]
            bench += ["--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len)]
            bench += ["--request-rate", "inf", "--seed", str(args.seed), "--max-concurrency", str(conc)]
            bench += ["--warmup-requests", str(args.warmup_requests if i == 0 else 0), "--disable-tqdm"]
            bench += ["--output-file", str(out)]
            if name == "adapters":
                bench += ["--lora-name", *sorted(paths), "--lora-request-distribution", args.distribution]
            code = bench_serving.main(bench)
            doc = json.loads(out.read_text())
            r = doc["results"]
            row = {"part": part, "concurrency": conc, "workload": name, "phase": phase or None, "exit": code}
            row.update(
                output_throughput=r.get("output_throughput"),
                failed=r.get("failed"),
                median_tpot_ms=r.get("median_tpot_ms"),
                mean_tpot_ms=r.get("mean_tpot_ms"),
                errors=doc.get("errors", [])[:2],
            )
            page = httpx.get(f"{url}/metrics", timeout=10).text
            row["engine_steps"] = diff_steps(parse_step_times(page), before)
            runs.append(row)
            print(summary_line(part, row), flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    return {"part": part, "startup_s": startup, "server_flags": flags, "runs": runs}


def summary_line(part: str, row: dict) -> str:
    d = row["engine_steps"].get("decode", {})

    def f(v):
        return "-" if v is None else f"{v:.2f}"

    return (
        f"{part:16s} conc {row['concurrency']:4d} {row['workload']:8s} {row.get('phase') or '':4s} "
        f"overlap={row.get('overlap', part != 'served-sync')!s:5s} out tok/s {f(row['output_throughput'])} "
        f"TPOT med {f(row['median_tpot_ms'])} ms | decode step {f(d.get('mean_ms'))} ms "
        f"host {f(d.get('host_mean_ms'))} gpu {f(d.get('gpu_mean_ms'))} (n={int(d.get('steps', 0))})"
    )


def summarize(docs: list[dict]) -> dict[str, Any]:
    """One row per (overlap, concurrency, workload): offline and served throughput and their ratio,
    the served decode step against its GPU time, its host time, and TPOT against the limit."""
    parts = {p["part"]: p for d in docs for p in d["parts"]}
    off = parts.get("offline", {"runs": []})
    rows = []
    for run in off["runs"]:
        part = "served-overlap" if run["overlap"] else "served-sync"
        match = [
            r
            for r in parts.get(part, {"runs": []})["runs"]
            if r["concurrency"] == run["concurrency"] and r["workload"] == run["workload"] and not r["phase"]
        ]
        s = match[0] if match else None
        sd = (s or {}).get("engine_steps", {}).get("decode", {})
        od = run["engine_steps"].get("decode", {})
        limit = run["limit"]["limit_ms"]
        rows.append(
            {
                "overlap": run["overlap"],
                "concurrency": run["concurrency"],
                "workload": run["workload"],
                "offline_tok_s": run["output_throughput"],
                "served_tok_s": s and s["output_throughput"],
                "served_over_offline": s and s["output_throughput"] / run["output_throughput"],
                "offline_decode_step_ms": od.get("mean_ms"),
                "served_decode_step_ms": sd.get("mean_ms"),
                "served_decode_gpu_ms": sd.get("gpu_mean_ms"),
                "served_step_over_gpu": sd.get("mean_ms")
                and sd.get("gpu_mean_ms")
                and sd["mean_ms"] / sd["gpu_mean_ms"],
                "served_decode_host_ms": sd.get("host_mean_ms"),
                "limit_ms": limit,
                "served_median_tpot_ms": s and s["median_tpot_ms"],
                "tpot_over_limit": s and s["median_tpot_ms"] and s["median_tpot_ms"] / limit,
                "served_failed": s and s["failed"],
            }
        )
    warmth = {}
    for name in ("served-overlap", "served-sync"):
        runs = {r["phase"]: r for r in parts.get(name, {"runs": []})["runs"] if r["phase"]}
        if "cold" in runs and "warm" in runs:
            warmth[name] = {
                "cold_tok_s": runs["cold"]["output_throughput"],
                "warm_tok_s": runs["warm"]["output_throughput"],
                "cold_over_warm": runs["cold"]["output_throughput"] / runs["warm"]["output_throughput"],
            }
    base_only = [
        {"concurrency": r["concurrency"], "failed": r["failed"], "output_tok_s": r["output_throughput"]}
        for r in parts.get("served-base-only", {"runs": []})["runs"]
    ]

    def f(v, digits=2):
        return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))

    lines = [
        "| overlap | conc | workload | offline tok/s | served tok/s | served/offline | served decode step ms "
        "| its GPU ms | step/GPU | host ms | limit ms | served TPOT ms | TPOT/limit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {'on' if r['overlap'] else 'off'} | {r['concurrency']} | {r['workload']} | {f(r['offline_tok_s'], 0)} "
            f"| {f(r['served_tok_s'], 0)} | {f(r['served_over_offline'])} | {f(r['served_decode_step_ms'])} "
            f"| {f(r['served_decode_gpu_ms'])} | {f(r['served_step_over_gpu'])} | {f(r['served_decode_host_ms'])} "
            f"| {f(r['limit_ms'])} | {f(r['served_median_tpot_ms'])} | {f(r['tpot_over_limit'])} |"
        )
    for name, w in warmth.items():
        lines.append(
            f"\n{name}: first run after a {docs[0]['config']['warmup_requests']}-request warm-up "
            f"{w['cold_tok_s']:.0f} tok/s, after the whole workload {w['warm_tok_s']:.0f} tok/s "
            f"(cold/warm {w['cold_over_warm']:.3f})"
        )
    for b in base_only:
        lines.append(f"\nbase-only server, default memory flags, conc {b['concurrency']}: {b['failed']} failed")
    device = docs[0].get("device")
    return {
        "benchmark": "bench_serving_core",
        "device": device,
        "inputs": [{k: d.get(k) for k in ("date", "device")} for d in docs],
        "rows": rows,
        "warmth": warmth,
        "base_only": base_only,
        "parts": [part for d in docs for part in d["parts"]],
        "config": docs[0].get("config"),
        "markdown": f"Serving core on {device}\n\n" + "\n".join(lines) + "\n",
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.summarize:
        doc = summarize([json.loads(Path(p).read_text()) for p in args.summarize])
        md = doc.pop("markdown")
        if args.markdown:
            Path(args.markdown).write_text(md)
        print(md)
    else:
        config = random_adapters.load_config(args.config_dir)
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        doc = {"benchmark": "bench_serving_core", **environment(device), "config": vars(args), "parts": []}
        for part in args.part or ["offline"]:
            doc["parts"].append(offline(args, config) if part == "offline" else served(args, config, part))
            if args.output_file:  # after every part: a call cut short keeps the parts it finished
                Path(args.output_file).write_text(json.dumps(doc, indent=2) + "\n")
    if args.output_file:
        Path(args.output_file).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.output_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
