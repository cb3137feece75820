"""Offline throughput of the loraserve engine through its Python API, with many random LoRA adapters.

It builds an :class:`~loraserve.engine.engine.Engine` for a model directory (``--model-path``, real
weights, or with ``--load-format dummy`` random ones) or a bare config (``--config-dir``, always
random weights), writes ``--num-adapters`` random PEFT adapters of that shape with
``random_adapters.py`` (into a temporary directory, or ``--adapter-dir`` to keep and reuse them),
draws a seeded workload with ``workloads.make_workload`` and submits every request at once with
``ignore_eos``, greedy sampling and ``max_new_tokens`` equal to the request's output length.
``--no-lora`` serves the same prompts on the base model alone (no adapters loaded), the baseline
that the LoRA runs are compared with as ratios.

It reports the wall time, request throughput, input/output/total token throughput, time to first
token and time per output token (from each request's ``meta_info``) and, because the engine keeps
no step metrics of its own (only ``step_count``), step times measured here: the benchmark wraps
the engine instance's ``step`` and its scheduler's ``schedule`` to time every step and classify
it as decode (every chunk decodes one token), prefill or mixed; the mean decode step time comes
from those. It prints a table and, with ``--output-file``, writes JSON with the device, versions,
configuration and date. ``bench_hf_peft.py`` runs the same workload and adapters through
transformers + PEFT and imports the shared parts from here.

    python benchmarks/bench_offline.py --config-dir benchmarks/configs/llama-3.1-8b --num-prompts 512 \\
        --input-len 256 --output-len 128 --num-adapters 8 --lora-rank 16 --output-file offline.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import random_adapters
import torch
from workloads import (
    DEFAULT_ZIPF_ALPHA,
    DEFAULT_ZIPF_EXPONENT,
    DISTRIBUTIONS,
    RequestSpec,
    describe_workload,
    make_workload,
)

# -- shared by bench_offline.py and bench_hf_peft.py ------------------------------------------------


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model group: its source, weights format, dtype and device (also bench_prefix_cache.py)."""
    model = parser.add_argument_group("model")
    source = model.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-path", help="Hugging Face model directory (weights, or --load-format dummy)")
    source.add_argument("--config-dir", help="directory with only a config.json: random weights of its shape")
    model.add_argument(
        "--load-format",
        default="auto",
        choices=("auto", "dummy"),
        help="'dummy' gives random weights of --model-path's config",
    )
    model.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="'auto' is float32 on CPU and bfloat16 on CUDA",
    )
    model.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def add_adapter_args(lora: argparse._ArgumentGroup) -> None:
    """The random adapters' shape, after the group's count flag (also bench_prefix_cache.py)."""
    lora.add_argument("--lora-rank", type=int, default=16)
    lora.add_argument(
        "--lora-ranks",
        type=int,
        nargs="+",
        default=None,
        help="mixed ranks: each adapter's rank drawn (seeded) from these; --max-lora-rank is their largest",
    )
    lora.add_argument("--lora-alpha", type=float, default=None, help="default: 2 * rank")
    lora.add_argument(
        "--lora-target-modules",
        nargs="+",
        default=list(random_adapters.ALL_TARGETS),
        choices=random_adapters.ALL_TARGETS,
    )
    lora.add_argument(
        "--adapter-delta-std",
        type=float,
        default=random_adapters.DEFAULT_DELTA_STD,
        help="std of each module's LoRA delta per output, for an input of unit RMS",
    )
    lora.add_argument(
        "--adapter-dir",
        default=None,
        help="write the adapters here and reuse them on later runs (default: a temporary dir)",
    )


def add_engine_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The engine group's flags every in-process benchmark takes; returns the group for more."""
    engine = parser.add_argument_group("engine")
    engine.add_argument("--max-loras-per-batch", type=int, default=8, help="adapter slots (the base counts as one)")
    engine.add_argument("--lora-backend", default=None, help="default: csgmv on CUDA, torch on CPU")
    engine.add_argument("--max-running-requests", type=int, default=None)
    engine.add_argument("--max-total-tokens", type=int, default=None, help="KV-cache size in tokens")
    engine.add_argument(
        "--engine-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other loraserve setting (VALUE parsed as JSON when it can be)",
    )
    return engine


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Flags both benchmarks take: the model, the adapters, the workload and the output."""
    add_model_args(parser)
    work = parser.add_argument_group("workload")
    work.add_argument("--num-prompts", type=int, default=256)
    work.add_argument("--input-len", type=int, default=256)
    work.add_argument("--output-len", type=int, default=128)
    work.add_argument(
        "--range-ratio", type=float, default=1.0, help="lengths are drawn from [ratio * len, len] (1.0: all equal)"
    )
    work.add_argument("--lora-request-distribution", default="uniform", choices=DISTRIBUTIONS)
    work.add_argument(
        "--lora-zipf-alpha",
        type=float,
        default=DEFAULT_ZIPF_ALPHA,
        help="'skewed': adapter i gets alpha times the requests of adapter i + 1",
    )
    work.add_argument(
        "--lora-zipf-exponent",
        type=float,
        default=DEFAULT_ZIPF_EXPONENT,
        help="'zipf': adapter i's share of requests is proportional to (i + 1) ** -exponent",
    )
    work.add_argument("--seed", type=int, default=0, help="seed of the workload and the adapters")
    lora = parser.add_argument_group("adapters")
    lora.add_argument("--no-lora", action="store_true", help="serve every request on the base model")
    lora.add_argument("--num-adapters", type=int, default=8)
    add_adapter_args(lora)
    out = parser.add_argument_group("output")
    out.add_argument("--output-file", default=None, help="write the JSON result here")
    out.add_argument("--record-outputs", action="store_true", help="put every request's output ids in the JSON")


def resolve_device_dtype(args: argparse.Namespace) -> tuple[str, str]:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return device, dtype


def model_dir(args: argparse.Namespace) -> str:
    return args.config_dir if args.config_dir is not None else args.model_path


def random_weights(args: argparse.Namespace) -> bool:
    return args.config_dir is not None or args.load_format == "dummy"


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    """The base model's transformers config as a dict (``model_type`` etc. included)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir(args)).to_dict()


@contextlib.contextmanager
def adapters_for(args: argparse.Namespace, config: dict[str, Any], dtype: str) -> Iterator[dict[str, Path]]:
    """The run's adapters ``{name: directory}`` (empty with ``--no-lora``), removed afterwards unless
    ``--adapter-dir`` keeps them."""
    if args.no_lora or args.num_adapters == 0:
        yield {}
        return
    with contextlib.ExitStack() as stack:
        root = args.adapter_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="random-adapters-"))
        ranks = args.lora_ranks or [args.lora_rank]
        sizes = [random_adapters.adapter_bytes(config, r, args.lora_target_modules, dtype) for r in ranks]
        size = sum(sizes) / len(sizes)
        start = time.perf_counter()
        paths = random_adapters.write_random_adapters(
            config,
            root,
            args.num_adapters,
            rank=args.lora_ranks or args.lora_rank,
            alpha=args.lora_alpha,
            target_modules=args.lora_target_modules,
            seed=args.seed,
            dtype=dtype,
            delta_std=args.adapter_delta_std,
        )
        print(
            f"{args.num_adapters} random adapter(s) of {size / 2**20:.1f} MiB (mean) in {root} "
            f"({time.perf_counter() - start:.1f} s)",
            file=sys.stderr,
        )
        yield paths


def build_requests(args: argparse.Namespace, config: dict[str, Any]) -> list[RequestSpec]:
    """The seeded workload, over the adapter names ``random_adapters`` gives. Prompts and lengths come
    from their own seed stream, so ``--no-lora`` (every request on the base model) draws exactly the
    same prompts as the LoRA runs."""
    names = None if args.no_lora else [f"lora{i}" for i in range(args.num_adapters)]
    return make_workload(
        args.num_prompts,
        args.input_len,
        args.output_len,
        config["vocab_size"],
        names,
        args.lora_request_distribution,
        zipf_alpha=args.lora_zipf_alpha,
        zipf_exponent=args.lora_zipf_exponent,
        seed=args.seed,
        range_ratio=args.range_ratio,
    )


def throughput(requests: Sequence[RequestSpec], output_counts: Sequence[int], wall_s: float) -> dict[str, Any]:
    """Request and token throughput of one timed run."""
    input_tokens = sum(len(r.input_ids) for r in requests)
    output_tokens = int(sum(output_counts))
    return {
        "num_requests": len(requests),
        "wall_s": wall_s,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(requests) / wall_s,
        "input_throughput": input_tokens / wall_s,
        "output_throughput": output_tokens / wall_s,
        "total_throughput": (input_tokens + output_tokens) / wall_s,
    }


def peak_memory_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def environment(device: str, extra_versions: dict[str, str] | None = None) -> dict[str, Any]:
    """Date, device name and versions for the JSON result."""
    import transformers

    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here, timeout=10
        ).stdout.strip()
        if (
            rev
            and subprocess.run(
                ["git", "diff-index", "--quiet", "HEAD", "--"], cwd=here, timeout=10, capture_output=True
            ).returncode
            == 1
        ):
            rev += "+uncommitted changes"
    except (OSError, subprocess.SubprocessError):
        rev = ""
    try:
        from importlib.metadata import version

        loraserve_version = version("loraserve")
    except Exception:
        loraserve_version = "unknown"
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "loraserve": loraserve_version,
        "loraserve_git": rev or "unknown (no git checkout)",
    }
    versions.update(extra_versions or {})
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "host": {"platform": platform.platform(), "cpu_count": _cpu_count()},
        "versions": versions,
    }


def _cpu_count() -> int | None:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def print_table(title: str, rows: Sequence[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{'=' * 12} {title} {'=' * 12}")
    for key, value in rows:
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown:>14}")
    print("=" * (26 + len(title)))


def throughput_rows(t: dict[str, Any]) -> list[tuple[str, Any]]:
    return [
        ("requests", t["num_requests"]),
        ("input tokens", t["input_tokens"]),
        ("output tokens", t["output_tokens"]),
        ("wall time (s)", t["wall_s"]),
        ("request throughput (req/s)", t["request_throughput"]),
        ("input throughput (tok/s)", t["input_throughput"]),
        ("output throughput (tok/s)", t["output_throughput"]),
        ("total throughput (tok/s)", t["total_throughput"]),
    ]


def finish(result: dict[str, Any], output_file: str | None) -> dict[str, Any]:
    if output_file:
        path = Path(output_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return result


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# -- the engine benchmark ---------------------------------------------------------------------------


class StepTimer:
    """Times every engine step, as the engine itself keeps no step metrics.

    Wraps ``engine.step`` and ``engine.scheduler.schedule`` on the instance (the engine loop calls
    ``self.step()``, so the instance attribute is what runs). A step's time runs from schedule to
    the last sampled token delivered; the sampler reads the tokens back, so on CUDA it includes the
    GPU work. A step is ``decode`` when every chunk feeds one generated token, ``prefill`` when
    none does, ``mixed`` otherwise; it is classified when planned, before the step advances it.
    """

    def __init__(self, engine: Any):
        self.records: list[tuple[str, int, int, float]] = []  # (kind, chunks, tokens, seconds)
        self.enabled = False
        schedule, step = engine.scheduler.schedule, engine.step
        planned: list[tuple[str, int, int]] = []

        def timed_schedule():
            plan = schedule()
            if plan:
                decodes = sum(c.start >= len(c.request.prompt_ids) for c in plan)
                kind = "decode" if decodes == len(plan) else "prefill" if decodes == 0 else "mixed"
                planned.append((kind, len(plan), sum(c.num_tokens for c in plan)))
            return plan

        def timed_step():
            enabled = self.enabled  # read before the step: its last token may end the timed run
            planned.clear()
            start = time.perf_counter()
            step()
            elapsed = time.perf_counter() - start
            if enabled and planned:
                self.records.append((*planned[0], elapsed))

        engine.scheduler.schedule = timed_schedule
        engine.step = timed_step

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": len(self.records), "step_time_total_s": sum(r[3] for r in self.records)}
        for kind in ("decode", "prefill", "mixed"):
            rows = [r for r in self.records if r[0] == kind]
            times = [r[3] for r in rows]
            out[kind] = {
                "steps": len(rows),
                "total_s": sum(times),
                "mean_ms": 1e3 * statistics.fmean(times) if times else None,
                "median_ms": 1e3 * statistics.median(times) if times else None,
                "mean_batch_size": statistics.fmean(r[1] for r in rows) if rows else None,
                "mean_tokens": statistics.fmean(r[2] for r in rows) if rows else None,
            }
        return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_common_args(parser)
    engine = add_engine_args(parser)
    engine.add_argument(
        "--warmup-requests",
        type=int,
        default=16,
        help="run this many of the workload's requests first (8 new tokens each), untimed",
    )
    return parser


def engine_settings(args: argparse.Namespace, device: str, dtype: str, adapters: dict[str, Path]) -> dict:
    values: dict[str, Any] = dict(
        model_path=model_dir(args),
        load_format="dummy" if random_weights(args) else "auto",
        dtype=dtype,
        device=device,
        random_seed=args.seed,
        log_level="warning",
        max_running_requests=args.max_running_requests,
        max_total_tokens=args.max_total_tokens,
    )
    if adapters:
        values.update(
            lora_paths=[f"{name}={path}" for name, path in adapters.items()],
            max_loras_per_batch=args.max_loras_per_batch,
            max_lora_rank=max(args.lora_ranks or [args.lora_rank]),
            lora_target_modules=list(args.lora_target_modules),
            lora_backend=args.lora_backend,
        )
    for item in args.engine_setting:
        name, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--engine-setting {item!r}: write NAME=VALUE, e.g. chunked_prefill_size=4096")
        try:
            values[name.replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            values[name.replace("-", "_")] = raw
    return {k: v for k, v in values.items() if v is not None}


def generate(engine: Any, requests: Sequence[RequestSpec], max_new_tokens: int | None = None) -> list[dict]:
    params = [
        {"max_new_tokens": max_new_tokens or r.output_len, "temperature": 0, "ignore_eos": True} for r in requests
    ]
    return engine.generate(
        input_ids=[r.input_ids for r in requests], sampling_params=params, lora_path=[r.lora_name for r in requests]
    )


def rank_label(config: dict[str, Any]) -> str:
    """``16``, or ``8/16/32/64`` for mixed ranks."""
    return "/".join(map(str, config.get("lora_ranks") or [config["lora_rank"]]))


def lora_summary(stats: dict[str, Any]) -> dict[str, Any]:
    """What the adapter tiers held at the end of the run: slots, host cache, the GPU store (if any),
    adapter loads and evictions (the engine's counters)."""
    return {
        "registered": stats["lora_adapters"],
        "slots_total": stats["lora_slots_total"],
        "host_cached": stats["lora_host_cached"],
        "counters": stats["lora_counters"],
        "store": stats.get("lora_store"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from loraserve.engine.engine import Engine
    from loraserve.settings import make_settings

    device, dtype = resolve_device_dtype(args)
    config = model_config(args)
    requests = build_requests(args, config)
    with adapters_for(args, config, dtype) as adapters:
        settings = engine_settings(args, device, dtype, adapters)
        start = time.perf_counter()
        engine = Engine(make_settings(**settings))
        startup_s = time.perf_counter() - start
        try:
            timer = StepTimer(engine)
            warm = requests[: max(0, min(args.warmup_requests, len(requests)))]
            if warm:
                generate(engine, warm, max_new_tokens=8)
            sync(device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            timer.enabled = True
            start = time.perf_counter()
            results = generate(engine, requests)
            sync(device)
            wall_s = time.perf_counter() - start
            timer.enabled = False
            engine.call_in_engine(lambda: None)  # the step that delivered the last token has returned
            backend = engine.backend_name if engine.lora is not None else None
            lora_state = lora_summary(engine.stats()) if engine.lora is not None else None
        finally:
            engine.shutdown()
    errors = [
        res["meta_info"]["finish_reason"]
        for res in results
        if (res["meta_info"]["finish_reason"] or {}).get("type") != "length"
    ]
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) did not finish by length, e.g. {errors[0]}")
    counts = [len(res["output_ids"]) for res in results]
    metrics = throughput(requests, counts, wall_s)
    ttft = [res["meta_info"]["ttft_s"] for res in results]
    tpot = [
        (res["meta_info"]["e2e_latency_s"] - res["meta_info"]["ttft_s"]) / (n - 1)
        for res, n in zip(results, counts)
        if n > 1
    ]
    metrics.update(
        engine_startup_s=startup_s,
        mean_ttft_ms=1e3 * statistics.fmean(ttft),
        median_ttft_ms=1e3 * statistics.median(ttft),
        mean_tpot_ms=1e3 * statistics.fmean(tpot) if tpot else None,
        peak_gpu_memory_gib=peak_memory_gib(device),
        step_metrics=timer.summary(),
        lora=lora_state,
    )
    result = {
        "benchmark": "bench_offline",
        **environment(device),
        "config": {
            **vars(args),
            "resolved_device": device,
            "resolved_dtype": dtype,
            "lora_backend": backend,
            "random_weights": random_weights(args),
            "model_type": config.get("model_type"),
            "engine_settings": {k: v for k, v in settings.items() if k != "lora_paths"},
            "adapters": sorted(adapters),
        },
        "workload": describe_workload(requests),
        "results": metrics,
    }
    if args.record_outputs:
        result["outputs"] = [
            {"lora_name": r.lora_name, "prompt_len": len(r.input_ids), "output_ids": res["output_ids"]}
            for r, res in zip(requests, results)
        ]
    return result


def report(result: dict[str, Any]) -> None:
    m, c = result["results"], result["config"]
    steps = m["step_metrics"]
    rows = throughput_rows(m) + [
        ("mean TTFT (ms)", m["mean_ttft_ms"]),
        ("mean TPOT (ms)", m["mean_tpot_ms"]),
        (
            "steps (decode/prefill/mixed)",
            f"{steps['decode']['steps']}/{steps['prefill']['steps']}/{steps['mixed']['steps']}",
        ),
        ("mean decode step (ms)", steps["decode"]["mean_ms"]),
        ("mean decode batch", steps["decode"]["mean_batch_size"]),
    ]
    if m["peak_gpu_memory_gib"] is not None:
        rows.append(("peak GPU memory (GiB)", m["peak_gpu_memory_gib"]))
    counters = (m.get("lora") or {}).get("counters") or {}
    if counters:  # what limited admission: reads from the source, copies waited for, slots all taken
        reads, fills = counters.get("host_reloads", 0), counters.get("slot_fills", 0)
        rows.append(("adapter re-reads / slot fills", f"{reads}/{fills}"))
        rows.append(("copy wait (s, all requests)", counters.get("copy_wait_seconds", 0.0)))
        rows.append(("slot refusals", counters.get("slot_refusals", 0)))
    lora = (
        "no LoRA"
        if c["no_lora"]
        else (f"{c['num_adapters']} adapters r{rank_label(c)} {c['lora_request_distribution']}, {c['lora_backend']}")
    )
    print_table(f"loraserve offline: {result['device']}, {c['resolved_dtype']}, {lora}", rows)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    result = run(args)
    report(result)
    return finish(result, args.output_file)


if __name__ == "__main__":
    main()
