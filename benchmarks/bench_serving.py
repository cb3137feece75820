"""Serving benchmark of a running loraserve HTTP server, modelled on SGLang's ``bench_serving``.

Sends a seeded random workload (``workloads.make_workload``) to the native ``/generate`` endpoint,
one request per prompt with its adapter as ``lora_path`` and ``sampling_params`` ``{max_new_tokens:
O, ignore_eos: true, temperature: 0}`` so every output has exactly O tokens. Requests start at
Poisson arrival times (``--request-rate``, inf = all at once), at most ``--max-concurrency`` in
flight; a request waiting for a concurrency slot is not yet timed (as in SGLang). Per request:

- TTFT: from sending to the first streamed chunk that carries tokens;
- ITL: the gap between consecutive chunks that carry tokens; a chunk with k new tokens counts as
  k gaps of (gap / k), as SGLang splits multi-token chunks, so every generated token after the
  first chunk has one ITL;
- TPOT: (E2E - TTFT) / (output tokens - 1), for requests with more than one output token;
- E2E: from sending to the final chunk; output tokens: the server's ``meta_info.completion_tokens``.

With ``--disable-stream`` only E2E is measured (TTFT, TPOT, ITL are null). A failed request (HTTP
error, error event, connection error, a stream that ends early) counts as failed; the first
``MAX_ERRORS_KEPT`` errors are kept. Results: a table on stdout and, with ``--output-file``, JSON
with the configuration, the workload, the server's ``/get_model_info``, ``/v1/models`` and
``/get_server_info``, the date and versions. Exit status 1 when any request failed.

    python benchmarks/bench_serving.py --base-url http://127.0.0.1:30000 --num-prompts 200 \\
        --random-input-len 256 --random-output-len 128 --request-rate 8 --lora-name a b c \\
        --lora-request-distribution skewed --seed 1 --output-file results.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from workloads import (
    DEFAULT_ZIPF_ALPHA,
    DISTRIBUTIONS,
    RequestSpec,
    describe_workload,
    make_workload,
    poisson_arrival_times,
)

MAX_ERRORS_KEPT = 10
DEFAULT_TIMEOUT_S = 6 * 3600.0  # SGLang's client timeout: long runs at high load must not time out
METRICS = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e_latency", "E2E"))


@dataclass
class RequestResult:
    """What one request measured (times in seconds)."""

    index: int
    lora_name: str | None
    input_len: int
    expected_output_len: int
    success: bool = False
    output_len: int = 0
    ttft: float | None = None
    e2e_latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    server_ttft: float | None = None  # the server's own meta_info.ttft_s (excludes HTTP and queueing here)
    error: str | None = None


def generate_body(spec: RequestSpec, stream: bool) -> dict[str, Any]:
    return {
        "input_ids": spec.input_ids,
        "sampling_params": spec.sampling_params(),
        "lora_path": spec.lora_name,
        "stream": stream,
    }


def _error_text(status: int, body: str) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.strip()[:500]
    return f"HTTP {status}: {message}"


def _finish(result: RequestResult, final: dict, start: float) -> None:
    meta = final.get("meta_info") or {}
    result.e2e_latency = time.perf_counter() - start
    result.output_len = int(meta.get("completion_tokens", len(final.get("output_ids") or ())))
    result.server_ttft = meta.get("ttft_s")
    result.success = True


async def send_request(client: httpx.AsyncClient, spec: RequestSpec, index: int, stream: bool) -> RequestResult:
    """POST one spec to ``/generate`` and measure it; never raises for a failed request."""
    result = RequestResult(index, spec.lora_name, spec.input_len, spec.output_len)
    start = time.perf_counter()
    try:
        if not stream:
            response = await client.post("/generate", json=generate_body(spec, False))
            if response.status_code != 200:
                result.error = _error_text(response.status_code, response.text)
            else:
                _finish(result, response.json(), start)
            return result
        async with client.stream("POST", "/generate", json=generate_body(spec, True)) as response:
            if response.status_code != 200:
                result.error = _error_text(response.status_code, (await response.aread()).decode(errors="replace"))
                return result
            seen, last = 0, start
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"error event: {chunk['error'].get('message', chunk['error'])}"
                    return result
                now, n = time.perf_counter(), len(chunk.get("output_ids") or ())
                if n > seen:
                    if result.ttft is None:
                        result.ttft = now - start
                    else:
                        result.itl.extend([(now - last) / (n - seen)] * (n - seen))
                    seen, last = n, now
                if (chunk.get("meta_info") or {}).get("finish_reason") is not None:
                    _finish(result, chunk, start)
            if not result.success:
                result.error = "the stream ended before the request finished"
    except Exception as exc:  # a connection error or a bad reply is this request's failure, not the run's
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if not result.success:  # a failed request's partial timings would bias the metrics
            result.ttft, result.itl = None, []
    return result


async def fetch_server_info(client: httpx.AsyncClient) -> dict[str, Any]:
    """``/get_model_info``, ``/v1/models`` and ``/get_server_info`` (None where unavailable)."""
    info: dict[str, Any] = {}
    for key, path in (("model_info", "/get_model_info"), ("models", "/v1/models"), ("server_info", "/get_server_info")):
        try:
            response = await client.get(path)
            info[key] = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            info[key] = None
    return info


def _stats(name: str, values: Sequence[float]) -> dict[str, float | None]:
    ms = np.asarray(values, dtype=np.float64) * 1000.0
    out = {}
    for label, fn in (
        ("mean", np.mean),
        ("median", np.median),
        ("p90", lambda a: np.percentile(a, 90)),
        ("p99", lambda a: np.percentile(a, 99)),
    ):
        out[f"{label}_{name}_ms"] = float(fn(ms)) if ms.size else None
    return out


def summarize(results: Sequence[RequestResult], duration: float) -> dict[str, Any]:
    """SGLang's metric names (plus ``failed``, ``p90_*``): throughputs over completed requests."""
    done = [r for r in results if r.success]
    total_in, total_out = sum(r.input_len for r in done), sum(r.output_len for r in done)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: None)
    summary: dict[str, Any] = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "output_len_mismatches": sum(r.output_len != r.expected_output_len for r in done),
        "request_throughput": per_s(len(done)),
        "input_throughput": per_s(total_in),
        "output_throughput": per_s(total_out),
        "total_throughput": per_s(total_in + total_out),
        "concurrency": per_s(sum(r.e2e_latency for r in done)),
    }
    ttfts = [r.ttft for r in done if r.ttft is not None]
    tpots = [(r.e2e_latency - r.ttft) / (r.output_len - 1) for r in done if r.ttft is not None and r.output_len > 1]
    itls = [g for r in done for g in r.itl]
    for (name, _), values in zip(METRICS, (ttfts, tpots, itls, [r.e2e_latency for r in done])):
        summary.update(_stats(name, values))
    return summary


def _versions() -> dict[str, Any]:
    try:
        from loraserve import __version__ as loraserve_version
    except ImportError:
        loraserve_version = None
    return {
        "loraserve_version": loraserve_version,
        "client": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "httpx": httpx.__version__,
            "numpy": np.__version__,
        },
    }


async def run_benchmark(
    base_url: str,
    workload: Sequence[RequestSpec],
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    *,
    seed: int = 1,
    stream: bool = True,
    warmup_requests: int = 1,
    api_key: str | None = None,
    request_timeout: float = DEFAULT_TIMEOUT_S,
    output_file: str | Path | None = None,
    config: dict[str, Any] | None = None,
    details: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Run ``workload`` against the server at ``base_url`` and return the results document (also
    written to ``output_file`` as JSON). ``seed`` seeds the Poisson arrivals; ``config`` (e.g. the
    CLI's arguments) is merged into the recorded configuration; ``details`` adds per-request records.
    Raises RuntimeError when a warmup request fails (the server or the workload is wrong)."""
    if not workload:
        raise ValueError("the workload is empty; give at least one request")
    if max_concurrency is not None and (
        isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1
    ):
        raise ValueError(f"max_concurrency={max_concurrency!r} is invalid; give an integer >= 1 or None (no limit)")
    if isinstance(warmup_requests, bool) or not isinstance(warmup_requests, int) or warmup_requests < 0:
        raise ValueError(f"warmup_requests={warmup_requests!r} is invalid; give an integer >= 0")
    arrivals = poisson_arrival_times(len(workload), request_rate, seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # trust_env=False: talk to the server directly, never through an HTTP proxy from the environment
    async with httpx.AsyncClient(
        base_url=base_url.rstrip("/"),
        headers=headers,
        trust_env=False,
        timeout=httpx.Timeout(request_timeout),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
    ) as client:
        server = await fetch_server_info(client)
        warm = await asyncio.gather(
            *(send_request(client, workload[i % len(workload)], -1 - i, stream) for i in range(warmup_requests))
        )
        failed = [r.error for r in warm if not r.success]
        if failed:
            raise RuntimeError(
                f"warmup request to {base_url} failed ({failed[0]}); check the server, the adapter "
                "names and the lengths against its context length"
            )
        semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        in_flight, peak = 0, 0
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(workload))

        async def one(index: int, spec: RequestSpec) -> RequestResult:
            nonlocal in_flight, peak
            if semaphore is not None:
                await semaphore.acquire()
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                return await send_request(client, spec, index, stream)
            finally:
                in_flight -= 1
                if semaphore is not None:
                    semaphore.release()
                if bar is not None:
                    bar.update(1)

        start = time.perf_counter()
        tasks = []
        for index, (spec, at) in enumerate(zip(workload, arrivals)):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index, spec)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        if bar is not None:
            bar.close()

    summary = summarize(results, duration)
    summary["peak_concurrency"] = peak
    doc: dict[str, Any] = {
        "benchmark": "bench_serving",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **_versions(),
        "config": {
            "base_url": base_url,
            "request_rate": "inf" if math.isinf(request_rate) else request_rate,
            "max_concurrency": max_concurrency,
            "stream": stream,
            "warmup_requests": warmup_requests,
            "seed": seed,
            **(config or {}),
        },
        "workload": describe_workload(workload),
        "server": server,
        "results": summary,
        "errors": [{"index": r.index, "lora_name": r.lora_name, "error": r.error} for r in results if not r.success][
            :MAX_ERRORS_KEPT
        ],
    }
    if details:
        doc["requests"] = [asdict(r) for r in results]
    if output_file is not None:
        Path(output_file).write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return doc


def format_table(doc: dict[str, Any]) -> str:
    """The results as the text table printed at the end of a run."""
    res, cfg = doc["results"], doc["config"]

    def num(value: Any, fmt: str = "{:.2f}") -> str:
        return "n/a" if value is None else fmt.format(value)

    rows = [
        ("Base URL", cfg["base_url"]),
        ("Request rate (req/s)", str(cfg["request_rate"])),
        ("Max concurrency", str(cfg["max_concurrency"] or "none")),
        ("Successful requests", str(res["completed"])),
        ("Failed requests", str(res["failed"])),
        ("Output length mismatches", str(res["output_len_mismatches"])),
        ("Benchmark duration (s)", num(res["duration"])),
        ("Total input tokens", str(res["total_input_tokens"])),
        ("Total generated tokens", str(res["total_output_tokens"])),
        ("Request throughput (req/s)", num(res["request_throughput"])),
        ("Input token throughput (tok/s)", num(res["input_throughput"])),
        ("Output token throughput (tok/s)", num(res["output_throughput"])),
        ("Total token throughput (tok/s)", num(res["total_throughput"])),
        ("Concurrency (mean / peak)", f"{num(res['concurrency'])} / {res['peak_concurrency']}"),
    ]
    lines = ["{:=^58}".format(" Serving Benchmark Result ")]
    lines += [f"{label + ':':<40}{value:>18}" for label, value in rows]
    lines.append(f"{'latency (ms)':<14}" + "".join(f"{h:>11}" for h in ("mean", "median", "p90", "p99")))
    for name, label in METRICS:
        lines.append(
            f"{label:<14}" + "".join(f"{num(res[f'{s}_{name}_ms']):>11}" for s in ("mean", "median", "p90", "p99"))
        )
    lines.append("=" * 58)
    for err in doc["errors"]:
        lines.append(f"failed request {err['index']} (adapter {err['lora_name']}): {err['error']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--base-url", default="http://127.0.0.1:30000", help="the loraserve server")
    p.add_argument("--num-prompts", type=int, default=1000, help="requests to send")
    p.add_argument("--random-input-len", type=int, default=1024, help="prompt tokens per request")
    p.add_argument("--random-output-len", type=int, default=1024, help="generated tokens per request")
    p.add_argument(
        "--random-range-ratio",
        type=float,
        default=1.0,
        help="lengths are uniform in [len * ratio, len]; 1 = exact (SGLang's default is 0)",
    )
    p.add_argument(
        "--request-rate", type=float, default=math.inf, help="Poisson arrival rate (req/s); inf = all at once"
    )
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    p.add_argument("--lora-name", nargs="+", default=None, help="adapters loaded on the server (default: base model)")
    p.add_argument(
        "--lora-request-distribution",
        choices=DISTRIBUTIONS,
        default="uniform",
        help="uniform: random; distinct: round robin; skewed: adapter i gets alpha ** -i of the requests",
    )
    p.add_argument("--lora-zipf-alpha", type=float, default=DEFAULT_ZIPF_ALPHA, help="alpha of 'skewed' (> 1)")
    p.add_argument("--seed", type=int, default=1, help="seed of prompts, adapters and arrivals")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or hub id: prompts avoid its special tokens")
    p.add_argument("--vocab-size", type=int, default=None, help="draw ids below this (default: the server's)")
    p.add_argument("--disable-stream", action="store_true", help="no streaming: only E2E latency is measured")
    p.add_argument("--warmup-requests", type=int, default=1, help="untimed requests sent first")
    p.add_argument("--api-key", default=None, help="the server's --api-key")
    p.add_argument("--request-timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per request")
    p.add_argument("--output-file", default=None, help="write the results as JSON here")
    p.add_argument("--output-details", action="store_true", help="add per-request records to the JSON")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    return p


async def _probe(base_url: str, api_key: str | None) -> dict[str, Any] | None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, trust_env=False, timeout=30) as client:
        response = await client.get("/get_model_info")
        response.raise_for_status()
        return response.json()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model_info = asyncio.run(_probe(args.base_url, args.api_key))
    except httpx.HTTPError as exc:
        print(
            f"error: cannot read {args.base_url}/get_model_info ({exc}); start the server or fix --base-url "
            "(and --api-key)",
            file=sys.stderr,
        )
        return 2
    vocab_size = args.vocab_size or model_info.get("vocab_size")
    context = model_info.get("context_length")
    if not vocab_size:
        print("error: the server did not report its vocab_size; pass --vocab-size", file=sys.stderr)
        return 2
    if context and args.random_input_len + args.random_output_len > context:
        print(
            f"error: --random-input-len {args.random_input_len} + --random-output-len {args.random_output_len} "
            f"exceeds the server's context length {context}; lower them",
            file=sys.stderr,
        )
        return 2
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    try:
        workload = make_workload(
            args.num_prompts,
            args.random_input_len,
            args.random_output_len,
            vocab_size,
            args.lora_name,
            args.lora_request_distribution,
            zipf_alpha=args.lora_zipf_alpha,
            seed=args.seed,
            range_ratio=args.random_range_ratio,
            tokenizer=tokenizer,
        )
        config = {
            k: v
            for k, v in vars(args).items()
            if k not in ("api_key", "base_url", "request_rate", "max_concurrency", "seed")
        }
        config["vocab_size"] = vocab_size
        doc = asyncio.run(
            run_benchmark(
                args.base_url,
                workload,
                args.request_rate,
                args.max_concurrency,
                seed=args.seed,
                stream=not args.disable_stream,
                warmup_requests=args.warmup_requests,
                api_key=args.api_key,
                request_timeout=args.request_timeout,
                output_file=args.output_file,
                config=config,
                details=args.output_details,
                progress=not args.disable_tqdm,
            )
        )
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(doc))
    if args.output_file:
        print(f"results written to {args.output_file}")
    return 1 if doc["results"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
