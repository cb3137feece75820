"""The prefix cache against its targets (issue 19): the same workloads with the cache on and off.

Three seeded workloads (prompt token ids drawn as ``workloads.py`` draws them, adapters spread over
``--num-adapters`` random PEFT adapters as ``bench_offline.py`` writes them):

- ``shared_prefix``: each adapter has its own system prompt of ``--system-len`` tokens; every
  request is its adapter's system prompt plus ``--unique-len`` tokens of its own.
- ``multi_turn``: ``--conversations`` conversations of ``--turns`` turns, each on one adapter; a
  turn's prompt is the previous turn's prompt, its output and ``--turn-len`` new tokens. It runs in
  rounds: round k submits turn k of every conversation and waits for all of them, so a turn is
  only sent once the turn before it finished.
- ``no_sharing``: the sizes of ``shared_prefix``, every prompt random (the overhead check).

For each setting (cache on, then off) one in-process engine is built (with ``--interleave`` both
are kept at once and the on and off runs alternate), warmed up with requests that share nothing
with the workloads (a prompt and then the same prompt with a new tail, so the cached-prefix path
runs too) and then, per workload, flushed (``flush_cache``) and timed, ``--repeats``
times (the run of median wall time is kept, every run's wall time listed). Requests go out all at
once (one ``generate`` call per round) unless ``--request-rate`` is finite, when each one is sent at
its Poisson arrival time through ``generate_async``. Every request is greedy with
``ignore_eos`` and ``--output-len`` new tokens, so both settings must give the same output ids;
``outputs_identical`` says whether they did (on CPU in float32 they must; in bf16 the cached path
runs other kernels and a near tie may flip a token).

It reports per (workload, setting) the input and output tokens/s, wall time, TTFT median/p90/p99
(``meta_info["ttft_s"]``), the cached-token fraction (sum of ``cached_tokens`` over sum of prompt
tokens) and the engine's prefix-cache counters; per workload the on/off ratios; and the issue's
targets, met or missed and by how much: on ``shared_prefix`` at least 3x the input throughput and at
most a third of the median TTFT, on ``no_sharing`` at least 0.98x the input throughput. It prints a
table, writes JSON (``--output-file``) and a markdown table (``--markdown``).

    python benchmarks/bench_prefix_cache.py --config-dir benchmarks/configs/llama-3.1-8b --dtype bfloat16 \\
        --device cuda --output-file prefix_cache.json --markdown prefix_cache.md
    python benchmarks/bench_prefix_cache.py --config-dir benchmarks/configs/tiny-llama --device cpu \\
        --system-len 512 --unique-len 32 --output-len 16 --num-prompts 64 --conversations 16 --turns 3
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_offline  # noqa: E402
from tables import markdown_table, text_table  # noqa: E402
from workloads import DISTRIBUTIONS, RequestSpec, allowed_token_ids, poisson_arrival_times, sample_lora_names  # noqa: E402

WORKLOADS = ("shared_prefix", "multi_turn", "no_sharing")
# seed streams of this benchmark (workloads.py uses 0-2)
_SYSTEM, _UNIQUE, _RANDOM, _TURNS, _WARMUP = 10, 11, 12, 13, 14
# (workload, ratio, ">=" or "<=", threshold, what it checks) from issue 19
TARGETS = (
    ("shared_prefix", "input_throughput_ratio", ">=", 3.0, "input throughput with the cache on / off"),
    ("shared_prefix", "ttft_median_ratio", "<=", 1 / 3, "median TTFT with the cache on / off"),
    ("no_sharing", "input_throughput_ratio", ">=", 0.98, "input throughput with the cache on / off (overhead)"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    bench_offline.add_model_args(parser)
    work = parser.add_argument_group("workloads")
    work.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    work.add_argument("--num-prompts", type=int, default=256, help="requests of shared_prefix and no_sharing")
    work.add_argument("--system-len", type=int, default=2048, help="tokens of each adapter's system prompt")
    work.add_argument("--unique-len", type=int, default=128, help="tokens of each request after the system prompt")
    work.add_argument("--output-len", type=int, default=128, help="new tokens of every request (and turn)")
    work.add_argument("--conversations", type=int, default=32, help="conversations of multi_turn")
    work.add_argument("--turns", type=int, default=4, help="turns per conversation")
    work.add_argument("--turn-len", type=int, default=128, help="new prompt tokens of each turn")
    work.add_argument("--lora-request-distribution", default="uniform", choices=DISTRIBUTIONS)
    work.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="Poisson arrivals per second (within each multi_turn round); inf sends each round at once",
    )
    work.add_argument("--seed", type=int, default=0, help="seed of the workloads and the adapters")
    lora = parser.add_argument_group("adapters")
    lora.add_argument("--num-adapters", type=int, default=8, help="0: every request on the base model")
    bench_offline.add_adapter_args(lora)
    engine = bench_offline.add_engine_args(parser)
    engine.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="time each workload this many times per engine (flushed before each) and keep the median-wall run",
    )
    engine.add_argument(
        "--interleave",
        action="store_true",
        help="keep both engines at once and alternate on and off runs (less drift on a busy host; on a GPU both "
        "must fit: give --engine-setting mem_fraction_static)",
    )
    engine.add_argument(
        "--warmup-requests", type=int, default=4, help="untimed requests per engine, sharing nothing with the runs"
    )
    out = parser.add_argument_group("output")
    out.add_argument("--output-file", default=None, help="write the JSON result here")
    out.add_argument("--markdown", default=None, help="write a markdown table here")
    out.add_argument("--record-outputs", action="store_true", help="put every request's output ids in the JSON")
    parser.set_defaults(no_lora=False)  # what bench_offline's helpers read
    return parser


# -- workloads --------------------------------------------------------------------------------------


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([stream, seed])


def _draw(rng: np.random.Generator, pool: np.ndarray, n: int) -> list[int]:
    return pool[rng.integers(0, pool.size, size=n)].tolist()


def adapter_names(args: argparse.Namespace) -> list[str] | None:
    return [f"lora{i}" for i in range(args.num_adapters)] or None


def shared_prefix_requests(args: argparse.Namespace, vocab_size: int) -> list[RequestSpec]:
    """Each request: its adapter's system prompt, then ``unique_len`` tokens of its own."""
    pool = allowed_token_ids(vocab_size)
    names = adapter_names(args)
    loras = sample_lora_names(args.num_prompts, names, args.lora_request_distribution, seed=args.seed)
    system_rng, unique_rng = _rng(args.seed, _SYSTEM), _rng(args.seed, _UNIQUE)
    systems = {name: _draw(system_rng, pool, args.system_len) for name in names or [None]}
    return [
        RequestSpec(systems[lora] + _draw(unique_rng, pool, args.unique_len), args.output_len, lora) for lora in loras
    ]


def no_sharing_requests(args: argparse.Namespace, vocab_size: int) -> list[RequestSpec]:
    """``shared_prefix``'s sizes and adapters, every prompt random."""
    pool = allowed_token_ids(vocab_size)
    loras = sample_lora_names(args.num_prompts, adapter_names(args), args.lora_request_distribution, seed=args.seed)
    rng = _rng(args.seed, _RANDOM)
    return [RequestSpec(_draw(rng, pool, args.system_len + args.unique_len), args.output_len, lora) for lora in loras]


class Conversations:
    """``multi_turn``: turn k of conversation i is turn k - 1's prompt and output plus new tokens."""

    def __init__(self, args: argparse.Namespace, vocab_size: int):
        pool = allowed_token_ids(vocab_size)
        self.loras = sample_lora_names(
            args.conversations, adapter_names(args), args.lora_request_distribution, seed=args.seed
        )
        rng = _rng(args.seed, _TURNS)
        self.new_tokens = [[_draw(rng, pool, args.turn_len) for _ in range(args.turns)] for _ in self.loras]
        self.output_len = args.output_len

    def rounds(self) -> Callable[[list[dict] | None], list[RequestSpec]]:
        """A function from the previous round's results (None before the first) to the next round."""
        history: list[list[int]] = [[] for _ in self.loras]
        turn = 0

        def next_round(previous: list[dict] | None) -> list[RequestSpec]:
            nonlocal turn
            for i, res in enumerate(previous or ()):
                history[i] = history[i] + res["output_ids"]
            specs = []
            for i, lora in enumerate(self.loras):
                history[i] = history[i] + self.new_tokens[i][turn]
                specs.append(RequestSpec(list(history[i]), self.output_len, lora))
            turn += 1
            return specs

        return next_round


def workload_rounds(name: str, args: argparse.Namespace, vocab_size: int) -> tuple[int, Callable]:
    """(number of rounds, next-round function) of a workload; single-round workloads ignore the argument."""
    if name == "multi_turn":
        return args.turns, Conversations(args, vocab_size).rounds()
    specs = (shared_prefix_requests if name == "shared_prefix" else no_sharing_requests)(args, vocab_size)
    return 1, lambda _previous: specs


def warmup_requests(args: argparse.Namespace, vocab_size: int) -> list[list[RequestSpec]]:
    """Two rounds sharing nothing with the workloads: prompts of the workload's length, then the same
    prompts with their tail replaced (a cached prefix with the cache on)."""
    if args.warmup_requests < 1:
        return []
    pool = allowed_token_ids(vocab_size)
    names = adapter_names(args) or [None]
    rng = _rng(args.seed, _WARMUP)
    first = [
        RequestSpec(_draw(rng, pool, args.system_len + args.unique_len), 8, names[i % len(names)])
        for i in range(args.warmup_requests)
    ]
    second = [
        RequestSpec(r.input_ids[: args.system_len] + _draw(rng, pool, args.unique_len), 8, r.lora_name) for r in first
    ]
    return [first, second]


# -- running ----------------------------------------------------------------------------------------


def submit(engine: Any, requests: Sequence[RequestSpec], arrivals: Sequence[float]) -> list[dict]:
    """Results of ``requests`` in order: one ``generate`` call when every arrival is 0, else each
    request sent at its arrival time (seconds from now) through ``generate_async``."""
    if not any(arrivals):
        return bench_offline.generate(engine, requests)

    async def send_all() -> list[dict]:
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def send(spec: RequestSpec, at: float) -> dict:
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            return await engine.generate_async(
                input_ids=spec.input_ids, sampling_params=spec.sampling_params(), lora_path=spec.lora_name
            )

        return list(await asyncio.gather(*(send(s, a) for s, a in zip(requests, arrivals))))

    return asyncio.run(send_all())


def percentile_ms(values: Sequence[float], q: float) -> float:
    return 1e3 * float(np.percentile(values, q))


def prefix_counters(engine: Any) -> dict[str, int] | None:
    return engine.stats().get("prefix_cache")


def run_workload(engine: Any, name: str, args: argparse.Namespace, vocab_size: int, device: str) -> dict[str, Any]:
    """One timed run of a workload on a flushed engine: its metrics and every request's outputs."""
    engine.flush_cache()
    num_rounds, next_round = workload_rounds(name, args, vocab_size)
    before = prefix_counters(engine)
    specs: list[RequestSpec] = []
    results: list[dict] = []
    previous = None
    wall_s = 0.0
    for k in range(num_rounds):
        batch = next_round(previous)
        arrivals = poisson_arrival_times(len(batch), args.request_rate, seed=args.seed + k)
        bench_offline.sync(device)
        start = time.perf_counter()
        previous = submit(engine, batch, arrivals)
        bench_offline.sync(device)
        wall_s += time.perf_counter() - start
        specs += batch
        results += previous
    after = prefix_counters(engine)
    bad = [
        r["meta_info"]["finish_reason"]
        for r in results
        if (r["meta_info"]["finish_reason"] or {}).get("type") != "length"
    ]
    if bad:
        raise RuntimeError(f"{name}: {len(bad)} request(s) did not finish by length, e.g. {bad[0]}")
    return summarize(name, specs, results, wall_s, num_rounds, before, after)


def summarize(
    name: str,
    specs: Sequence[RequestSpec],
    results: Sequence[dict],
    wall_s: float,
    rounds: int,
    before: dict[str, int] | None,
    after: dict[str, int] | None,
) -> dict[str, Any]:
    metrics = bench_offline.throughput(specs, [len(r["output_ids"]) for r in results], wall_s)
    ttft = [r["meta_info"]["ttft_s"] for r in results]
    e2e = [r["meta_info"]["e2e_latency_s"] for r in results]
    cached = sum(r["meta_info"]["cached_tokens"] for r in results)
    outputs = [r["output_ids"] for r in results]
    counters = None
    if after is not None:
        counters = dict(after)
        for key in ("queried_tokens", "hit_tokens", "evicted_blocks"):  # cumulative: this run's share
            counters[key] = after[key] - (before or {}).get(key, 0)
    return {
        "workload": name,
        "rounds": rounds,
        **metrics,
        "ttft_median_ms": percentile_ms(ttft, 50),
        "ttft_p90_ms": percentile_ms(ttft, 90),
        "ttft_p99_ms": percentile_ms(ttft, 99),
        "ttft_mean_ms": 1e3 * float(np.mean(ttft)),
        "e2e_median_ms": percentile_ms(e2e, 50),
        "cached_tokens": cached,
        "cached_fraction": cached / metrics["input_tokens"],
        "prefix_cache": counters,
        "outputs_digest": hashlib.sha256(json.dumps(outputs).encode()).hexdigest()[:16],
        "_outputs": outputs,
        "_prompt_lens": [len(s.input_ids) for s in specs],
        "_adapters": [s.lora_name for s in specs],
    }


def start_engine(args: argparse.Namespace, settings: dict[str, Any], cache: bool, vocab_size: int) -> tuple[Any, float]:
    """An engine with the cache on or off, warmed up; (engine, start-up seconds)."""
    from loraserve.engine.engine import Engine
    from loraserve.settings import make_settings

    start = time.perf_counter()
    engine = Engine(make_settings(**{**settings, "disable_radix_cache": not cache}))
    startup_s = time.perf_counter() - start
    try:
        for batch in warmup_requests(args, vocab_size):
            submit(engine, batch, [0.0] * len(batch))
    except BaseException:
        engine.shutdown()
        raise
    return engine, startup_s


def measure_all(
    args: argparse.Namespace, settings: dict[str, Any], vocab_size: int, device: str
) -> tuple[dict[tuple[str, bool], list[dict[str, Any]]], dict[str, float]]:
    """Every timed run, ``{(workload, cache): [repeats]}``, and each engine's start-up seconds. One
    engine after the other (on, then off), or with ``--interleave`` both at once, alternating."""
    repeats: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    startup: dict[str, float] = {}

    def timed(engine: Any, name: str, cache: bool) -> None:
        run = run_workload(engine, name, args, vocab_size, device)
        repeats.setdefault((name, cache), []).append(run)
        print(
            f"{name}, cache {'on' if cache else 'off'}: {run['wall_s']:.2f} s, "
            f"cached {100 * run['cached_fraction']:.1f}%",
            file=sys.stderr,
        )

    engines: dict[bool, Any] = {}

    def stop_engines() -> None:  # a function: no loop variable outlives it holding an engine
        for engine in engines.values():
            engine.shutdown()
        engines.clear()

    try:
        for cache in (True, False):
            if not args.interleave:
                stop_engines()
                gc.collect()  # (the engine's thread closures form cycles) before the next one sizes its KV cache
                if device == "cuda":
                    import torch

                    torch.cuda.empty_cache()
            engines[cache], startup["on" if cache else "off"] = start_engine(args, settings, cache, vocab_size)
            if not args.interleave:
                for name in args.workloads:
                    for _ in range(args.repeats):
                        timed(engines[cache], name, cache)
        if args.interleave:
            for _ in range(args.repeats):
                for name in args.workloads:
                    for cache in (True, False):
                        timed(engines[cache], name, cache)
    finally:
        stop_engines()
    return repeats, startup


def median_run(repeats: list[dict[str, Any]], cache: bool) -> dict[str, Any]:
    """The repeat of median wall time, with every repeat's wall time and whether their outputs agree."""
    run = dict(sorted(repeats, key=lambda r: r["wall_s"])[(len(repeats) - 1) // 2])
    run["cache"] = cache
    run["wall_s_repeats"] = [r["wall_s"] for r in repeats]
    run["repeats_identical"] = all(r["_outputs"] == repeats[0]["_outputs"] for r in repeats)
    return run


# -- comparing --------------------------------------------------------------------------------------


def compare(on: dict[str, Any], off: dict[str, Any]) -> dict[str, Any]:
    """On/off ratios of one workload and whether every request's output ids agree."""
    mismatched = [i for i, (a, b) in enumerate(zip(on["_outputs"], off["_outputs"])) if a != b]
    return {
        "workload": on["workload"],
        "input_throughput_ratio": on["input_throughput"] / off["input_throughput"],
        "output_throughput_ratio": on["output_throughput"] / off["output_throughput"],
        "wall_ratio": on["wall_s"] / off["wall_s"],
        "ttft_median_ratio": on["ttft_median_ms"] / off["ttft_median_ms"],
        "ttft_p99_ratio": on["ttft_p99_ms"] / off["ttft_p99_ms"],
        "outputs_identical": len(on["_outputs"]) == len(off["_outputs"]) and not mismatched,
        "mismatched_requests": len(mismatched),
        "first_mismatch": mismatched[0] if mismatched else None,
    }


def check_targets(ratios: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target of the issue whose workload ran: its value, met or missed, and the margin
    (positive: better than the threshold by that fraction of it; negative: short by it)."""
    checked = []
    for workload, ratio, op, threshold, what in TARGETS:
        if workload not in ratios:
            continue
        value = ratios[workload][ratio]
        met = value >= threshold if op == ">=" else value <= threshold
        margin = value / threshold - 1 if op == ">=" else 1 - value / threshold
        checked.append(
            {
                "workload": workload,
                "ratio": ratio,
                "what": what,
                "target": f"{op} {threshold:.3g}",
                "threshold": threshold,
                "value": value,
                "met": met,
                "margin": margin,
                "summary": f"{value:.3g} {op} {threshold:.3g}: {verdict(met, margin)}",
            }
        )
    return checked


def verdict(met: bool, margin: float) -> str:
    return f"{'met' if met else 'missed'} by {100 * abs(margin):.0f}%"


def run(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype = bench_offline.resolve_device_dtype(args)
    config = bench_offline.model_config(args)
    vocab_size = config["vocab_size"]
    with bench_offline.adapters_for(args, config, dtype) as adapters:
        settings = bench_offline.engine_settings(args, device, dtype, adapters)
        repeats, startup = measure_all(args, settings, vocab_size, device)
    runs = [median_run(repeats[name, cache], cache) for cache in (True, False) for name in args.workloads]
    by_key = {(r["workload"], r["cache"]): r for r in runs}
    ratios = {name: compare(by_key[name, True], by_key[name, False]) for name in args.workloads}
    result = {
        "benchmark": "prefix_cache",
        **bench_offline.environment(device),
        "config": {
            **vars(args),
            "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
            "resolved_device": device,
            "resolved_dtype": dtype,
            "random_weights": bench_offline.random_weights(args),
            "model_type": config.get("model_type"),
            "engine_settings": {k: v for k, v in settings.items() if k != "lora_paths"},
            "adapters": sorted(adapters),
            "arrivals": "all at once (one generate call per round)"
            if math.isinf(args.request_rate)
            else f"Poisson, {args.request_rate} req/s (per multi_turn round)",
            "order": "both engines at once, alternating on and off per workload and repeat"
            if args.interleave
            else "cache on, then cache off: one engine each",
        },
        "engine_startup_s": startup,
        "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs],
        "ratios": list(ratios.values()),
        "outputs_identical": all(r["outputs_identical"] for r in ratios.values()),
        "targets": check_targets(ratios),
    }
    if args.record_outputs:
        result["outputs"] = [
            {
                "workload": r["workload"],
                "cache": r["cache"],
                "requests": [
                    {"lora_name": a, "prompt_len": n, "output_ids": o}
                    for a, n, o in zip(r["_adapters"], r["_prompt_lens"], r["_outputs"])
                ],
            }
            for r in runs
        ]
    return result


# -- reporting --------------------------------------------------------------------------------------

COLUMNS = (
    ("input tok/s", "input_throughput", "{:.0f}"),
    ("output tok/s", "output_throughput", "{:.1f}"),
    ("wall s", "wall_s", "{:.2f}"),
    ("TTFT p50 ms", "ttft_median_ms", "{:.1f}"),
    ("TTFT p90 ms", "ttft_p90_ms", "{:.1f}"),
    ("TTFT p99 ms", "ttft_p99_ms", "{:.1f}"),
    ("cached", "cached_fraction", "{:.1%}"),
)


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    ratios = {r["workload"]: r for r in result["ratios"]}
    rows = []
    for run in result["runs"]:
        row = [run["workload"], "on" if run["cache"] else "off"]
        row += [fmt.format(run[key]) for _, key, fmt in COLUMNS]
        if run["cache"]:
            ratio = ratios[run["workload"]]
            row += [
                f"{ratio['input_throughput_ratio']:.2f}x",
                f"{ratio['ttft_median_ratio']:.2f}x",
                "yes" if ratio["outputs_identical"] else f"no ({ratio['mismatched_requests']})",
            ]
        else:
            row += ["", "", ""]
        rows.append(row)
    return rows


HEADERS = ["workload", "cache", *(name for name, _, _ in COLUMNS), "in tok/s on/off", "TTFT p50 on/off", "same ids"]


def describe(result: dict[str, Any]) -> str:
    c = result["config"]
    return (
        f"{result['device']}, {c['model_type']} from {c['config_dir'] or c['model_path']}, {c['resolved_dtype']}, "
        f"{c['num_adapters']} adapters r{c['lora_rank']}; shared_prefix/no_sharing: {c['num_prompts']} requests of "
        f"{c['system_len']} + {c['unique_len']} prompt tokens; multi_turn: {c['conversations']} conversations x "
        f"{c['turns']} turns of +{c['turn_len']} tokens; {c['output_len']} output tokens; arrivals {c['arrivals']}"
    )


def report(result: dict[str, Any]) -> None:
    print(f"\nprefix cache on vs off: {describe(result)}")
    print(text_table(HEADERS, table_rows(result)))
    for target in result["targets"]:
        print(f"target {target['workload']} {target['what']}: {target['summary']}")
    print(f"outputs identical with the cache on and off: {result['outputs_identical']}")


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Prefix cache on vs off ({result['device']})",
        "",
        f"{result['date'][:10]}, loraserve {result['versions']['loraserve_git']}: {describe(result)}.",
        "",
        *markdown_table(HEADERS, table_rows(result)),
        "",
        "| target | value | result |",
        "|---|---:|---|",
        *(
            f"| {t['workload']}: {t['what']} {t['target']} | {t['value']:.3g} | {verdict(t['met'], t['margin'])} |"
            for t in result["targets"]
        ),
        "",
        f"Greedy output ids identical with the cache on and off: {'yes' if result['outputs_identical'] else 'no'}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    result = run(args)
    report(result)
    if args.markdown:
        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(markdown(result))
        print(f"wrote {path}")
    return bench_offline.finish(result, args.output_file)


if __name__ == "__main__":
    main()
