"""One benchmark run against a server of its own: start ``python -m loraserve`` with given flags,
wait until ``/health`` answers, run :mod:`bench_serving` against it, read the server's LoRA counters
from ``/metrics``, stop the server. Shared by the drivers that compare server settings
(``bench_overlap_loading.py``, ``bench_tp.py``)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import bench_serving
import httpx

from loraserve.engine.tp import free_port  # noqa: F401 (the drivers' port picker)


def add_run_args(p: argparse.ArgumentParser, work_prefix: str) -> None:
    """The arguments every driver takes for its servers and output files."""
    p.add_argument("--server-arg", action="append", default=[], help="extra server flag (repeat)")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument(
        "--work-dir", default=None, help=f"adapters, server logs and per-run JSON (default: a temp dir {work_prefix}*)"
    )
    p.add_argument("--output-file", default=None, help="write every run and the summary here (JSON)")
    p.set_defaults(work_prefix=work_prefix)


def work_dir(args: argparse.Namespace) -> Path:
    """``--work-dir``, created, or a new temporary directory."""
    work = Path(args.work_dir or tempfile.mkdtemp(prefix=args.work_prefix))
    work.mkdir(parents=True, exist_ok=True)
    return work


def workload_flags(args: argparse.Namespace) -> list[str]:
    """``bench_serving`` flags of the workload the drivers share: prompts, lengths, rate, seed."""
    return [
        "--num-prompts",
        str(args.num_prompts),
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(args.output_len),
        "--request-rate",
        str(args.request_rate),
        "--seed",
        str(args.seed),
    ]


COUNTERS = ("slot_fills", "copied_bytes", "copy_seconds", "copy_wait_seconds", "prefetches", "slot_misses", "evictions")


def parse_counters(text: str) -> dict[str, float]:
    """The ``loraserve_lora_*_total`` counters of a Prometheus text page (GPU evictions for the
    labelled eviction counter)."""
    out: dict[str, float] = {}
    for name in COUNTERS:
        label = r'\{tier="gpu"\}' if name == "evictions" else ""
        m = re.search(rf"^loraserve_lora_{name}_total{label} ([0-9.eE+-]+)$", text, re.M)
        if m:
            out[name] = float(m.group(1))
    return out


def parse_step_times(text: str) -> dict[str, dict[str, float]]:
    """Engine steps and their wall time by kind (``decode``, ``prefill``) from a Prometheus page,
    with the mean step time in ms, and the host's and GPU's seconds of those steps when the
    server reports them (``host_s``, ``gpu_s``, ``gpu_steps``)."""
    out: dict[str, dict[str, float]] = {}
    for kind in ("decode", "prefill"):

        def value(name: str) -> float | None:
            m = re.search(rf'^loraserve_{name}_total{{kind="{kind}"}} ([0-9.eE+-]+)$', text, re.M)
            return float(m.group(1)) if m else None

        steps, secs = value("engine_steps"), value("engine_step_seconds")
        if steps is None or secs is None:
            continue
        out[kind] = {"steps": steps, "seconds": secs, "mean_ms": secs / steps * 1e3 if steps else None}
        for key, name in (("host_s", "engine_step_host_seconds"), ("gpu_s", "engine_step_gpu_seconds")):
            if (v := value(name)) is not None:
                out[kind][key] = v
        if (v := value("engine_gpu_timed_steps")) is not None:
            out[kind]["gpu_steps"] = v
    return out


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was healthy")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the server was not healthy within {timeout:.0f} s")


def diff_steps(after: dict, before: dict) -> dict:
    """Step counts and seconds of ``after`` less ``before`` (two :func:`parse_step_times` results),
    with the mean wall, host and GPU time per step in ms."""
    out = {}
    for kind, a in after.items():
        b = before.get(kind, {})
        d = {key: a[key] - b.get(key, 0.0) for key in ("steps", "seconds", "host_s", "gpu_s", "gpu_steps") if key in a}
        steps = d["steps"]
        d["mean_ms"] = d["seconds"] / steps * 1e3 if steps else None
        if "host_s" in d:
            d["host_mean_ms"] = d["host_s"] / steps * 1e3 if steps else None
        if d.get("gpu_steps"):
            d["gpu_mean_ms"] = d["gpu_s"] / d["gpu_steps"] * 1e3
        out[kind] = d
    return out


def serve_and_bench(
    server_flags: Sequence[str],
    bench_flags: Sequence[str],
    tag: str,
    out_dir: Path,
    port: int,
    startup_timeout: float = 600,
    prewarm: int = 0,
) -> dict:
    """Run ``bench_serving`` (``bench_flags``, without ``--base-url``/``--output-file``) against a
    fresh server (``server_flags``, without ``--port``); returns the result document with the
    server's command, start-up time and LoRA counters added. The server's log is ``server_TAG.log``
    in ``out_dir``.

    ``prewarm``: first run the same workload cut to that many requests, untimed (compiles every
    kernel the shapes need), and count engine steps from there on: the document's ``engine_steps``
    then cover the timed run alone (its own warm-up requests are dropped)."""
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "loraserve", *server_flags, "--port", str(port)]
    log = open(out_dir / f"server_{tag}.log", "w")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_healthy(url, proc, startup_timeout)
        startup_s = time.perf_counter() - start
        result_file = out_dir / f"serving_{tag}.json"
        flags = ["--base-url", url, *bench_flags]
        before: dict = {}
        if prewarm:
            warm_file = out_dir / f"serving_{tag}_prewarm.json"
            code = bench_serving.main(
                [
                    *flags,
                    "--num-prompts",
                    str(prewarm),
                    "--warmup-requests",
                    "0",
                    "--output-file",
                    str(warm_file),
                    "--disable-tqdm",
                ]
            )
            if code != 0:
                raise RuntimeError(f"the pre-warm run failed (exit {code}); see {warm_file}")
            before = parse_step_times(httpx.get(f"{url}/metrics", timeout=10).text)
            flags += ["--warmup-requests", "0"]  # argparse keeps the last value given
        code = bench_serving.main([*flags, "--output-file", str(result_file), "--disable-tqdm"])
        if code != 0:
            raise RuntimeError(f"bench_serving failed (exit {code}); see {result_file}")
        doc = json.loads(result_file.read_text())
        page = httpx.get(f"{url}/metrics", timeout=10).text
        doc["lora_counters"] = parse_counters(page)
        doc["engine_steps"] = diff_steps(parse_step_times(page), before)
        doc["engine_steps_scope"] = "the timed run only" if prewarm else "every step since start-up"
        doc["server"] = {"command": cmd[1:], "startup_s": startup_s}
        return doc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
