"""Benchmark of the LoRA kernel backends (triton = SGMV, csgmv = chunked SGMV) on one CUDA GPU.

Per projection of Llama-3-8B (qkv 4096->4096+1024+1024, o 4096->4096, gate_up 4096->2x14336,
down 14336->4096), in bfloat16, for decode steps (1 token per request; 1..256 tokens, 1..64
distinct adapters, ranks 8..128) and prefill steps (4 x 512 and 16 x 256 tokens, 4 and 16
adapters). Each case reports:

- the median time of one ``run_lora`` (shrink + expand), taken from CUDA-graph replays of one call
  per "layer" over several layers' distinct weight copies, with the L2 cache flushed before each
  replay (``triton.testing.do_bench``), so weights come from device memory as in a real step;
- the bytes that must move (each distinct adapter's A and B up to its rank read once, ``x`` read
  once, the output read and written once) and the FLOPs; achieved GB/s and its fraction of the
  device's copy bandwidth measured here; the case's own limit (the larger of bytes / bandwidth and
  FLOPs / measured bf16 matmul rate) and the fraction of it reached;
- the time of the base projection's GEMM for the same tokens (cuBLAS through ``F.linear``) and
  the LoRA overhead relative to it.

Each backend is timed two ways: ``triton`` / ``csgmv`` run their own shrink kernel (``run_lora``
alone), and ``triton+gemm`` / ``csgmv+gemm`` do the shrink inside the base GEMM, as the engine does
when the backend's cost model says so: every slot's A rows are appended to the base weight (the
pool keeps them there), one GEMM gives the base output and ``x @ A^T``, and only the expand
kernel runs; its LoRA time is (that GEMM + expand) minus the base GEMM alone, both timed in the same
case. ``auto`` rows are the path the backend's cost model picks (``wants_shrink_in_gemm``) for that case.
``--sweep`` times a few launch-parameter variants on representative cases. Results: JSON and a
markdown summary in ``--out``.

    python benchmarks/bench_lora_kernels.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

PROJECTIONS = {  # name: (in_dim, output_offsets) of Llama-3-8B
    "qkv_proj": (4096, (0, 4096, 5120, 6144)),
    "o_proj": (4096, (0, 4096)),
    "gate_up_proj": (4096, (0, 14336, 28672)),
    "down_proj": (14336, (0, 4096)),
}
DECODE_TOKENS = (1, 8, 32, 64, 128, 256)
DECODE_ADAPTERS = (1, 8, 32, 64)
RANKS = (8, 16, 64, 128)
PREFILL = ((4, 512), (16, 256))  # (requests, tokens each)
PREFILL_ADAPTERS = (4, 16)
PREFILL_RANKS = (16, 64)
BACKENDS = ("triton", "csgmv")
DTYPE = torch.bfloat16
DEVICE = "cuda"
LAYER_BYTES = 1 << 30  # weight copies per case: enough "layers" that graph overhead is amortised


def bench(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn`` (L2 flushed before each run by do_bench; ``rep`` is the
    measuring time in ms, so a prefill graph of several layers still gets a dozen runs)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def graph_of(fn) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and warm up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return graph


def measure_ceilings() -> dict:
    n = 1 << 30
    a = torch.empty(n // 2, dtype=DTYPE, device=DEVICE).normal_()
    b = torch.empty_like(a)
    t_copy = bench(lambda: b.copy_(a), rep=100)
    a = b = None  # free the 1 GiB before the GEMM's operands
    m = torch.randn(8192, 8192, device=DEVICE, dtype=DTYPE)
    m2 = torch.randn(8192, 8192, device=DEVICE, dtype=DTYPE)
    t_mm = bench(lambda: m @ m2, rep=200)
    m = m2 = None
    return {"copy_GBps": 2 * n / t_copy / 1e6, "bf16_TFLOPs": 2 * 8192**3 / t_mm / 1e9}


def make_backend(name: str, max_chunk: int = 16, tuning: dict | None = None, plans=None):
    if name == "triton":
        from loraserve.plugins.backend_triton.backend import SgmvLoRABackend

        return SgmvLoRABackend(DEVICE, tuning=tuning, plans=plans)
    from loraserve.plugins.backend_csgmv.backend import ChunkedSgmvLoRABackend

    return ChunkedSgmvLoRABackend(DEVICE, max_chunk=max_chunk, tuning=tuning, plans=plans)


def choose_plans(spec: str):
    """``--plans``: ``device`` (the shipped plan of this GPU, or LORASERVE_KERNEL_PLANS's), ``off``,
    or a plan file."""
    from loraserve.plugins.backend_triton.plans import KernelPlans, plans_for

    if spec == "off":
        return None
    if spec == "device":
        return plans_for(torch.device(DEVICE))
    return KernelPlans.load(spec)


class Case:
    """Inputs of one (projection, step shape, adapters, rank) case, with several layers' weights."""

    def __init__(self, proj: str, seg_lens: list[int], n_adapters: int, rank: int, seed: int = 0):
        from loraserve.contract import LoRABatchInfo

        self.proj, self.rank, self.n_adapters = proj, rank, n_adapters
        self.in_dim, self.offsets = PROJECTIONS[proj]
        self.seg_lens = seg_lens
        K, N, S = self.in_dim, self.offsets[-1], len(self.offsets) - 1
        self.T = T = sum(seg_lens)
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        per_layer = n_adapters * (S * rank * K + N * rank) * 2
        self.layers = max(2, min(8, LAYER_BYTES // max(1, per_layer)))
        self.ext: list[torch.Tensor] | None = None  # [W; A] per layer, built by time_fused
        self.weights = []
        for _ in range(self.layers):
            A = torch.randn(n_adapters, S * rank, K, device=DEVICE, generator=gen, dtype=DTYPE) * K**-0.5
            B = torch.randn(n_adapters, N, rank, device=DEVICE, generator=gen, dtype=DTYPE) * 0.1
            self.weights.append((A, B))
        self.x = torch.randn(T, K, device=DEVICE, generator=gen, dtype=DTYPE)
        self.out = torch.randn(T, N, device=DEVICE, generator=gen, dtype=DTYPE)
        seg_slot = [i % n_adapters for i in range(len(seg_lens))]
        self.info = LoRABatchInfo.build(
            seg_lens,
            seg_slot,
            [rank] * n_adapters,
            [0.5 + i / n_adapters for i in range(n_adapters)],
            rank,
            device=DEVICE,
        )
        distinct = len(set(seg_slot))
        self.bytes = distinct * (S * rank * K + N * rank) * 2 + T * K * 2 + 2 * T * N * 2
        self.flops = 2 * T * rank * (S * K + N)

    def time_backend(self, backend) -> float:
        backend.prepare(self.info)

        def step():
            for A, B in self.weights:
                backend.run_lora(self.x, A, B, self.out, self.offsets)

        graph = graph_of(step)
        return bench(graph.replay) / self.layers * 1e3  # microseconds per run_lora

    def time_fused(self, backend, rounds: int = 3) -> dict:
        """Microseconds per layer of the base GEMM over ``W`` alone, of that GEMM followed by
        ``run_lora`` (the backend's own shrink, in context), and of the GEMM over ``[W; A]`` followed
        by the expand (the shrink from the GEMM's extra columns), medians over ``rounds``
        interleaved rounds so that clock drift hits all three alike. Each layer's A moves into its
        extended weight."""
        K, N = self.in_dim, self.offsets[-1]
        gen = torch.Generator(device=DEVICE).manual_seed(1)
        if self.ext is None:
            self.ext = []
            for i, (A, B) in enumerate(self.weights):
                W = torch.randn(N, K, device=DEVICE, generator=gen, dtype=DTYPE) * K**-0.5
                ext = torch.cat([W, A.reshape(-1, K)])
                del W
                self.weights[i] = (ext[N:].view(A.shape), B)
                self.ext.append(ext)
        backend.prepare(self.info)

        def fused():
            for ext, (A, B) in zip(self.ext, self.weights):
                y = F.linear(self.x, ext)
                backend.run_lora(self.x, A, B, y[:, :N], self.offsets, shrunk=y[:, N:])

        def gemm():
            for ext in self.ext:
                F.linear(self.x, ext[:N])

        def separate():
            for ext, (A, B) in zip(self.ext, self.weights):
                backend.run_lora(self.x, A, B, F.linear(self.x, ext[:N]), self.offsets)

        return self.interleaved({"gemm_us": gemm, "separate_total_us": separate, "fused_total_us": fused}, rounds)

    def interleaved(self, steps: dict, rounds: int) -> dict:
        """Microseconds per layer of each step (a CUDA graph of each), medians over ``rounds``
        interleaved rounds so that clock drift hits all of them alike."""
        graphs = {k: graph_of(fn) for k, fn in steps.items()}
        times = {k: [] for k in graphs}
        for _ in range(rounds):
            for k, g in graphs.items():
                times[k].append(bench(g.replay) / self.layers * 1e3)
        del graphs
        return {k: sorted(v)[len(v) // 2] for k, v in times.items()}

    def time_epilogue(self, backend, rounds: int = 3, consumer_kw: dict | None = None) -> dict:
        """For o_proj and down_proj (consumed by the next RMSNorm with its residual add) and
        gate_up_proj (consumed by SiLU-and-mul): microseconds per layer of the base GEMM + consumer,
        of the GEMM over ``[W; A]`` + consumer taking the expand (``LoRAEpilogue``), and of the GEMM
        over ``[W; A]`` + expand kernel + consumer; medians over interleaved rounds. Needs
        :meth:`time_fused` first (it builds the extended weights). Also the relative error of the
        epilogue's result against the in-place expand's, on layer 0."""
        from loraserve.contract import LoRAEpilogue
        from loraserve.models import fused

        N, S, T = self.offsets[-1], len(self.offsets) - 1, self.T
        gen = torch.Generator(device=DEVICE).manual_seed(2)
        residual = torch.randn(T, N, device=DEVICE, generator=gen, dtype=DTYPE)
        norm_w = torch.rand(N, device=DEVICE, generator=gen, dtype=DTYPE) + 0.5
        backend.prepare(self.info)
        info = self.info
        kw = consumer_kw or {}

        def consume(y, lora=None):
            if self.proj == "gate_up_proj":
                return fused.silu_and_mul(y, N // 2, lora=lora, **(kw if lora is not None else {}))
            return fused.rms_norm(y, norm_w, 1e-5, residual, lora=lora, **(kw if lora is not None else {}))[0]

        def epilogue(y, B):
            return LoRAEpilogue(
                h=y[:, N:],
                B=B,
                token_slot=info.token_slot,
                ranks=info.ranks,
                scalings=info.scalings,
                n_slices=S,
                R=self.rank,
            )

        def plain():
            for ext in self.ext:
                consume(F.linear(self.x, ext[:N]))

        def epi():
            for ext, (A, B) in zip(self.ext, self.weights):
                y = F.linear(self.x, ext)
                consume(y[:, :N], epilogue(y, B))

        def in_place():
            for ext, (A, B) in zip(self.ext, self.weights):
                y = F.linear(self.x, ext)
                backend.run_lora(self.x, A, B, y[:, :N], self.offsets, shrunk=y[:, N:])
                consume(y[:, :N])

        out = self.interleaved({"plain_total_us": plain, "epi_total_us": epi, "in_place_total_us": in_place}, rounds)
        (A, B), ext = self.weights[0], self.ext[0]
        y = F.linear(self.x, ext)
        base = consume(y[:, :N]).float()
        got = consume(y[:, :N], epilogue(y, B)).float()
        backend.run_lora(self.x, A, B, y[:, :N], self.offsets, shrunk=y[:, N:])
        ref = consume(y[:, :N]).float()
        out["rel_err_vs_in_place"] = ((got - ref).norm() / (ref - base).norm().clamp_min(1e-30)).item()
        return out

    def check_fused(self, backend) -> float:
        """Relative error of the fused path against the backend's own shrink, on layer 0."""
        N = self.offsets[-1]
        backend.prepare(self.info)
        (A, B), ext = self.weights[0], self.ext[0]
        y = F.linear(self.x, ext)
        base = y[:, :N].clone()
        backend.run_lora(self.x, A, B, y[:, :N], self.offsets, shrunk=y[:, N:])
        ref = base.clone()
        backend.run_lora(self.x, A, B, ref, self.offsets)
        return ((y[:, :N].float() - ref.float()).norm() / (ref.float() - base.float()).norm()).item()

    def free(self) -> None:
        self.weights.clear()
        self.ext = None


def time_gemm(proj: str, T: int) -> float:
    K, N = PROJECTIONS[proj][0], PROJECTIONS[proj][1][-1]
    layers = 4
    ws = [torch.randn(N, K, device=DEVICE, dtype=DTYPE) * K**-0.5 for _ in range(layers)]
    x = torch.randn(T, K, device=DEVICE, dtype=DTYPE)
    graph = graph_of(lambda: [F.linear(x, w) for w in ws])
    t = bench(graph.replay) / layers * 1e3
    return t


def time_prepare(name: str, T: int, n_adapters: int, segs: int) -> float:
    """``prepare()`` of one step in a CUDA graph, us. ``NAME-ops``: the backend with its grouping and
    tile table as the tensor operations used before the one-launch kernels (``prepare_kernel.py``,
    ``tile_kernel.py``), as when a kernel fails its start-up check; for before/after."""
    from loraserve.contract import LoRABatchInfo

    seg_lens = [T // segs] * segs
    info = LoRABatchInfo.build(
        seg_lens, [i % n_adapters for i in range(segs)], [16] * n_adapters, [1.0] * n_adapters, 16, device=DEVICE
    )
    backend = make_backend(name.removesuffix("-ops"))
    if name.endswith("-ops"):
        backend.one_launch_tiles = backend.one_launch_groups = False
    graph = graph_of(lambda: backend.prepare(info))
    return bench(graph.replay) * 1e3


PREPARE_CASES = ((1, 1, 1), (8, 8, 8), (64, 8, 64), (256, 64, 256), (2048, 4, 4), (4096, 16, 16))


def run_prepare() -> list[dict]:
    return [
        {"backend": name, "tokens": T, "adapters": n, "requests": segs, "us": time_prepare(name, T, n, segs)}
        for name in (*BACKENDS, *(f"{b}-ops" for b in BACKENDS))
        for T, n, segs in PREPARE_CASES
    ]


def decode_cases(quick: bool, only_tokens: tuple[int, ...] | None = None):
    tokens = only_tokens or ((1, 64, 256) if quick else DECODE_TOKENS)
    ranks = (16, 128) if quick else RANKS
    for T in tokens:
        for n in DECODE_ADAPTERS:
            if n > T:
                continue
            for r in ranks:
                yield "decode", [1] * T, n, r


def prefill_cases(quick: bool):
    for reqs, each in PREFILL:
        for n in PREFILL_ADAPTERS:
            if n > reqs:
                continue
            for r in (16,) if quick else PREFILL_RANKS:
                yield "prefill", [each] * reqs, n, r


def run(args) -> dict:
    props = torch.cuda.get_device_properties(0)
    import triton

    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        rev = ""
    rev = rev or "unknown (no git checkout on the device)"
    ceilings = measure_ceilings()
    print(
        f"device {props.name}: copy {ceilings['copy_GBps']:.0f} GB/s, bf16 {ceilings['bf16_TFLOPs']:.0f} TFLOP/s",
        flush=True,
    )
    result = {
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "versions": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "loraserve_git": rev,
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ceilings": ceilings,
        "config": {
            "dtype": str(DTYPE),
            "projections": PROJECTIONS,
            "decode_tokens": DECODE_TOKENS,
            "decode_adapters": DECODE_ADAPTERS,
            "ranks": RANKS,
            "prefill": PREFILL,
            "prefill_adapters": PREFILL_ADAPTERS,
            "prefill_ranks": PREFILL_RANKS,
            "quick": args.quick,
            "prefill_only": args.prefill_only,
            "no_prefill": args.no_prefill,
            "only_decode_tokens": args.decode_tokens,
            "csgmv_max_chunk": args.max_chunk,
            "timing": "CUDA graph of one run_lora per layer over "
            "2-8 layers' distinct weights, L2 flushed before each replay, median (do_bench)",
            "max_rank": "= the case's rank (every adapter has that rank)",
        },
        "cases": [],
        "gemm": {},
        "prepare_us": [],
    }
    plans = choose_plans(args.plans)
    result["config"]["plans"] = plans.source if plans is not None else "none (the built-in cost model)"
    gemm = result["gemm"]
    t0 = time.time()
    cases = [] if args.prefill_only else list(decode_cases(args.quick, args.decode_tokens))
    if not args.no_prefill:
        cases += list(prefill_cases(args.quick))
    for phase, seg_lens, n, r in cases:
        for proj in PROJECTIONS:
            T = sum(seg_lens)
            key = f"{proj}/{T}"
            if key not in gemm:
                gemm[key] = time_gemm(proj, T)
            case = Case(proj, seg_lens, n, r)
            limit_us = max(case.bytes / (ceilings["copy_GBps"] * 1e3), case.flops / (ceilings["bf16_TFLOPs"] * 1e6))
            times = {}
            for name in BACKENDS:
                backend = make_backend(name, args.max_chunk, plans=plans)
                times[name] = {"time_us": case.time_backend(backend), "gemm_us": gemm[key]}
            for name in BACKENDS:  # after the separate runs: this moves each layer's A into its extended weight
                backend = make_backend(name, args.max_chunk, plans=plans)
                m = case.time_fused(backend, rounds=3 if phase == "prefill" else 1)
                times[name + "+gemm"] = {
                    "time_us": m["fused_total_us"] - m["gemm_us"],
                    **m,
                    "separate_in_context_us": m["separate_total_us"] - m["gemm_us"],
                    "rel_err_vs_kernel": case.check_fused(backend),
                }
                S = len(case.offsets) - 1
                pick = (
                    name + "+gemm" if backend.wants_shrink_in_gemm(T, case.in_dim, case.offsets[-1], S, r, n) else name
                )
                times[name + " auto"] = {**times[pick], "picked": pick}
            for name, m in times.items():
                t = m["time_us"]
                gbps = case.bytes / t / 1e3
                result["cases"].append(
                    {
                        "phase": phase,
                        "proj": proj,
                        "tokens": T,
                        "requests": len(seg_lens),
                        "adapters": n,
                        "rank": r,
                        "backend": name,
                        "bytes": case.bytes,
                        "flops": case.flops,
                        "GBps": gbps,
                        "frac_copy_bw": gbps / ceilings["copy_GBps"],
                        "limit_us": limit_us,
                        "frac_limit": limit_us / t,
                        "overhead_vs_gemm": t / m["gemm_us"],
                        **m,
                    }
                )
            case.free()
            del case
        torch.cuda.empty_cache()
        print(f"  {phase} T={sum(seg_lens)} adapters={n} rank={r} done ({time.time() - t0:.0f}s)", flush=True)
        if args.partial:  # keep what was measured if the run is cut short
            Path(args.partial).write_text(json.dumps(result))
    if args.prepare:
        result["prepare_us"] = run_prepare()
    return result


EPILOGUE_PROJS = ("o_proj", "gate_up_proj", "down_proj")


def epilogue_cases():
    """Decode cases for the expand left to the consumer: the target's (16+ adapters) at every rank,
    and a few with one or eight adapters."""
    for T in (32, 64, 128, 256):
        for n in (32, 64):
            if n <= T:
                for r in RANKS:
                    yield "decode", [1] * T, n, r
    for T, n in ((1, 1), (8, 8), (64, 8)):
        for r in (8, 16):
            yield "decode", [1] * T, n, r


def run_epilogue(args) -> dict:
    """csgmv, per projection with a consumer: the expand in place (``csgmv+gemm``: GEMM over [W; A],
    expand kernel, consumer) against the expand left to the consumer (``csgmv+epi``), each less the
    base GEMM + consumer, in one run."""
    ceilings = measure_ceilings()
    props = torch.cuda.get_device_properties(0)
    result = {
        "device": props.name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ceilings": ceilings,
        "config": {
            "dtype": str(DTYPE),
            "csgmv_max_chunk": args.max_chunk,
            "timing": "CUDA graphs over 2-8 layers' weights, cold L2, median of "
            "3 interleaved rounds; LoRA time = total - (base GEMM + "
            "consumer)",
        },
        "cases": [],
    }
    t0 = time.time()
    for phase, seg_lens, n, r in epilogue_cases():
        for proj in EPILOGUE_PROJS:
            case = Case(proj, seg_lens, n, r)
            backend = make_backend("csgmv", args.max_chunk)
            case.time_fused(backend, rounds=1)
            m = case.time_epilogue(backend)
            limit_us = max(case.bytes / (ceilings["copy_GBps"] * 1e3), case.flops / (ceilings["bf16_TFLOPs"] * 1e6))
            for name, total in (("csgmv+gemm", m["in_place_total_us"]), ("csgmv+epi", m["epi_total_us"])):
                t = total - m["plain_total_us"]
                result["cases"].append(
                    {
                        "phase": phase,
                        "proj": proj,
                        "tokens": case.T,
                        "adapters": n,
                        "rank": r,
                        "backend": name,
                        "bytes": case.bytes,
                        "time_us": t,
                        "limit_us": limit_us,
                        "frac_limit": limit_us / t if t > 0 else float("inf"),
                        **m,
                    }
                )
            case.free()
            del case
        torch.cuda.empty_cache()
        print(f"  T={sum(seg_lens)} adapters={n} rank={r} done ({time.time() - t0:.0f}s)", flush=True)
    return result


EPILOGUE_SWEEP = {
    "cases": [([1] * 32, 32, 8), ([1] * 64, 64, 8), ([1] * 128, 64, 8), ([1] * 64, 32, 16), ([1] * 128, 64, 16)],
    "rms_norm": [
        {},
        {"block_r": 16},
        {"num_warps": 8},
        {"num_warps": 4},
        {"block_r": 4},
        {"block_r": 16, "num_warps": 8},
    ],
    "silu_and_mul": [
        {},
        {"block_n": 256},
        {"block_n": 512, "num_warps": 8},
        {"block_n": 64},
        {"block_r": 8},
        {"block_n": 256, "num_warps": 8},
        {"num_warps": 2},
        {"block_n": 1024, "num_warps": 8},
    ],
}


def sweep_epilogue(args) -> list[dict]:
    """The consumers' launch parameters with the LoRA epilogue, on representative low-rank cases:
    LoRA time (GEMM over [W; A] + consumer with the epilogue, less base GEMM + consumer) per variant."""
    rows = []
    for seg_lens, n, r in EPILOGUE_SWEEP["cases"]:
        for proj, key in (("o_proj", "rms_norm"), ("down_proj", "rms_norm"), ("gate_up_proj", "silu_and_mul")):
            case = Case(proj, seg_lens, n, r)
            backend = make_backend("csgmv", args.max_chunk)
            case.time_fused(backend, rounds=1)
            for kw in EPILOGUE_SWEEP[key]:
                m = case.time_epilogue(backend, rounds=3, consumer_kw=kw)
                rows.append(
                    {
                        "proj": proj,
                        "tokens": case.T,
                        "adapters": n,
                        "rank": r,
                        "consumer_kw": kw,
                        "epi_us": m["epi_total_us"] - m["plain_total_us"],
                        "gemm_us": m["in_place_total_us"] - m["plain_total_us"],
                        "bytes": case.bytes,
                    }
                )
                print(
                    f"{proj} T={case.T} n={n} r={r} {kw}: epi {rows[-1]['epi_us']:.1f} us, "
                    f"in place {rows[-1]['gemm_us']:.1f} us",
                    flush=True,
                )
            case.free()
            del case
        torch.cuda.empty_cache()
    return rows


def summarize_epilogue(result: dict) -> str:
    lines = [
        f"# LoRA expand left to the consumer, on {result['device']}",
        "",
        f"{result['date']}; {result['config']['timing']}. `gemm` = GEMM over [W; A] + expand kernel; "
        "`epi` = GEMM over [W; A] + consumer taking the expand (RMSNorm for o/down, SiLU-and-mul for gate_up).",
        "",
        "| proj | tokens | adapters | rank | limit us | gemm us | epi us | gemm % of limit | epi % of limit | "
        "rel err |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    by = {}
    for c in result["cases"]:
        by.setdefault((c["proj"], c["tokens"], c["adapters"], c["rank"]), {})[c["backend"]] = c
    for key, v in by.items():
        g, e = v["csgmv+gemm"], v["csgmv+epi"]
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {g['limit_us']:.1f} | {g['time_us']:.1f} | "
            f"{e['time_us']:.1f} | {100 * min(1.0, g['frac_limit']):.0f}% | "
            f"{100 * min(1.0, e['frac_limit']):.0f}% | {e['rel_err_vs_in_place']:.1e} |"
        )
    lines.append("")
    # "auto": the path the backend's rule (TiledLoRABackend.use_epilogue) picks, on these measurements
    from types import SimpleNamespace

    from loraserve.plugins.backend_triton.backend import TiledLoRABackend

    rule = SimpleNamespace(tuning={"epilogue": None})
    auto = []
    for (proj, T, n, r), v in by.items():
        S = len(PROJECTIONS[proj][1]) - 1
        pick = "csgmv+epi" if TiledLoRABackend.use_epilogue(rule, T, r, S) else "csgmv+gemm"
        auto.append({**v[pick], "backend": "csgmv auto"})
    for name in ("csgmv+gemm", "csgmv+epi", "csgmv auto"):
        rows = auto if name == "csgmv auto" else result["cases"]
        sel = [c for c in rows if c["backend"] == name and c["adapters"] >= 16]
        for r in sorted({c["rank"] for c in sel}):
            fr = sorted(c["frac_limit"] for c in sel if c["rank"] == r)
            lines.append(
                f"- {name}, rank {r}, >= 16 adapters: {sum(f >= 0.75 for f in fr)}/{len(fr)} reach 75% of "
                f"their limit; median {100 * min(1.0, fr[len(fr) // 2]):.0f}%"
            )
    return "\n".join(lines) + "\n"


SWEEP = {  # representative cases and the launch-parameter variants tried on each
    "cases": [
        ("decode", [1] * 64, 64, 16, "gate_up_proj"),
        ("decode", [1] * 64, 8, 128, "qkv_proj"),
        ("decode", [1] * 128, 64, 8, "qkv_proj"),
        ("decode", [1] * 256, 32, 64, "down_proj"),
        ("decode", [1] * 8, 8, 16, "o_proj"),
        ("prefill", [512] * 4, 4, 16, "qkv_proj"),
        ("prefill", [256] * 16, 16, 16, "o_proj"),
    ],
    "variants": [
        {},
        {"expand": {"group_n": 1}},
        {"expand": {"group_n": 2}},
        {"expand": {"group_n": 4}},
        {"expand": {"group_n": 8}},
        {"expand": {"num_warps": 8}},
        {"expand": {"group_n": 4, "num_warps": 8}},
        {"expand": {"block_n": 256, "group_n": 2}},
        {"expand": {"block_n": 64, "group_n": 8}},
        {"expand": {"num_stages": 3}},
        {"expand": {"num_stages": 4, "group_n": 4}},
        {"shrink": {"num_warps": 8}},
    ],
}


def sweep(args) -> list[dict]:
    rows = []
    for phase, seg_lens, n, r, proj in SWEEP["cases"]:
        case = Case(proj, seg_lens, n, r)
        for name in BACKENDS:
            for tuning in SWEEP["variants"]:
                try:
                    t = case.time_backend(make_backend(name, args.max_chunk, tuning=tuning))
                except Exception as exc:  # a variant the compiler refuses (too much shared memory, ...)
                    t = float("nan")
                    print(f"    {tuning}: {type(exc).__name__}: {str(exc)[:120]}")
                rows.append(
                    {
                        "phase": phase,
                        "proj": proj,
                        "tokens": sum(seg_lens),
                        "adapters": n,
                        "rank": r,
                        "backend": name,
                        "tuning": tuning,
                        "time_us": t,
                        "GBps": case.bytes / t / 1e3,
                    }
                )
            best = min(
                (
                    x
                    for x in rows
                    if x["backend"] == name
                    and x["proj"] == proj
                    and x["tokens"] == sum(seg_lens)
                    and x["adapters"] == n
                    and "time_us" in x
                ),
                key=lambda x: x["time_us"] if x["time_us"] == x["time_us"] else 1e99,
            )
            default = next(
                x
                for x in rows
                if x["backend"] == name
                and x["proj"] == proj
                and x["tokens"] == sum(seg_lens)
                and x["adapters"] == n
                and not x["tuning"]
            )
            print(
                f"sweep {phase} {proj} T={sum(seg_lens)} n={n} r={r} {name}: default {default['time_us']:.1f}us "
                f"best {best['time_us']:.1f}us {best['tuning']}",
                flush=True,
            )
        for name in BACKENDS:  # where the time goes, per kernel (default parameters)
            try:
                times = kernel_times(case, make_backend(name, args.max_chunk))
            except Exception as exc:  # the profiler is a diagnostic: never lose the sweep to it
                times = {"error": f"{type(exc).__name__}: {exc}"[:200]}
            rows.append(
                {
                    "phase": phase,
                    "proj": proj,
                    "tokens": sum(seg_lens),
                    "adapters": n,
                    "rank": r,
                    "backend": name,
                    "kernels_us": times,
                }
            )
            print(f"    {name} kernels: {rows[-1]['kernels_us']}", flush=True)
        case.free()
    return rows


def kernel_times(case: Case, backend) -> dict:
    """Mean device time of each kernel of one run_lora (L2 flushed before each call), from the profiler."""
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=DEVICE)
    backend.prepare(case.info)
    A, B = case.weights[0]
    backend.run_lora(case.x, A, B, case.out, case.offsets)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            flush.zero_()
            backend.run_lora(case.x, A, B, case.out, case.offsets)
        torch.cuda.synchronize()
    times = {}
    for evt in prof.key_averages():
        total = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if "lora" in evt.key:
            times[evt.key] = round(total / max(1, evt.count), 2)
    return times


def per_layer(cases: list[dict]) -> list[dict]:
    """Sum the four projections of each (phase, tokens, adapters, rank, backend)."""
    layers: dict[tuple, dict] = {}
    for c in cases:
        key = (c["phase"], c["tokens"], c["requests"], c["adapters"], c["rank"], c["backend"])
        row = layers.setdefault(key, {"time_us": 0.0, "bytes": 0, "gemm_us": 0.0, "limit_us": 0.0})
        for f in ("time_us", "bytes", "gemm_us", "limit_us"):
            row[f] += c[f]
    return [
        {"phase": k[0], "tokens": k[1], "requests": k[2], "adapters": k[3], "rank": k[4], "backend": k[5], **v}
        for k, v in layers.items()
    ]


def summarize(result: dict) -> str:
    bw = result["ceilings"]["copy_GBps"]
    lines = [
        f"# LoRA kernels on {result['device']}",
        "",
        f"{result['date']}; torch {result['versions']['torch']}, triton {result['versions']['triton']}, "
        f"CUDA {result['versions']['cuda']}; loraserve {result['versions']['loraserve_git']}. "
        f"Measured copy bandwidth {bw:.0f} GB/s (read + write), bf16 matmul "
        f"{result['ceilings']['bf16_TFLOPs']:.0f} TFLOP/s. bfloat16, Llama-3-8B projections, "
        f"csgmv --max-lora-chunk-size {result['config']['csgmv_max_chunk']}. LoRA time per call, CUDA-graph "
        "replays with a cold L2, median: `triton`/`csgmv` = run_lora with its own shrink kernel; `+gemm` = "
        "(base GEMM over [W; A] + expand) - base GEMM; `auto` = the path the backend's cost model picks.",
        "",
        "## Per layer (sum of qkv, o, gate_up, down)",
        "",
        "| phase | tokens | adapters | rank | triton us | csgmv us | csgmv+gemm us | csgmv auto us | "
        "auto % of copy BW | auto % of limit | base GEMMs us | auto overhead |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    layers = per_layer(result["cases"])
    by = {(r["phase"], r["tokens"], r["adapters"], r["rank"], r["backend"]): r for r in layers}
    for key in sorted({k[:4] for k in by}, key=lambda k: (k[0] != "decode", k[1], k[2], k[3])):
        tr, cs, cf, ca = (by.get((*key, n)) for n in ("triton", "csgmv", "csgmv+gemm", "csgmv auto"))
        if None in (tr, cs, cf, ca):
            continue
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {tr['time_us']:.1f} | {cs['time_us']:.1f} | "
            f"{cf['time_us']:.1f} | {ca['time_us']:.1f} | "
            f"{100 * ca['bytes'] / ca['time_us'] / 1e3 / bw:.0f}% | {100 * ca['limit_us'] / ca['time_us']:.0f}% | "
            f"{cs['gemm_us']:.1f} | {100 * ca['time_us'] / cs['gemm_us']:.0f}% |"
        )
    lines += ["", "## Targets (per projection)", ""] + targets(result)
    if result["prepare_us"]:
        lines += [
            "",
            "## prepare() per step (CUDA graph, us)",
            "",
            "| backend | tokens | adapters | requests | us |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {p['backend']} | {p['tokens']} | {p['adapters']} | {p['requests']} | {p['us']:.1f} |"
            for p in result["prepare_us"]
        ]
    return "\n".join(lines) + "\n"


def targets(result: dict) -> list[str]:
    cases = result["cases"]
    names = list(dict.fromkeys(c["backend"] for c in cases))
    out = []
    dec = [c for c in cases if c["phase"] == "decode" and c["adapters"] >= 16]
    for name in names:
        sel = [c for c in dec if c["backend"] == name]
        if sel:
            fr = sorted(c["frac_limit"] for c in sel)
            worst = min(sel, key=lambda c: c["frac_limit"])
            out.append(
                f"- decode, >= 16 adapters, {name}: {sum(f >= 0.75 for f in fr)}/{len(fr)} cases reach 75% of their "
                f"limit; median {100 * fr[len(fr) // 2]:.0f}%, worst {100 * fr[0]:.0f}% "
                f"({worst['proj']} T={worst['tokens']} n={worst['adapters']} r={worst['rank']})"
            )
    pre = [c for c in cases if c["phase"] == "prefill" and c["rank"] == 16]
    for name in names:
        sel = [c for c in pre if c["backend"] == name]
        if sel:
            worst = max(sel, key=lambda c: c["overhead_vs_gemm"])
            out.append(
                f"- prefill rank 16, {name}: {sum(c['overhead_vs_gemm'] <= 0.15 for c in sel)}/{len(sel)} cases add "
                f"<= 15% to the base GEMM; worst {100 * worst['overhead_vs_gemm']:.0f}% ({worst['proj']} "
                f"T={worst['tokens']} n={worst['adapters']})"
            )
    pairs = {}
    for c in cases:
        pairs.setdefault((c["phase"], c["proj"], c["tokens"], c["adapters"], c["rank"]), {})[c["backend"]] = c[
            "time_us"
        ]
    for cs, tr in (("csgmv", "triton"), ("csgmv auto", "triton auto")):
        ratios = sorted((v[cs] / v[tr], k) for k, v in pairs.items() if cs in v and tr in v and v[tr] > 1.0)
        if ratios:
            slower = [r for r in ratios if r[0] > 1.05]
            out.append(
                f"- {cs} / {tr} time: median {ratios[len(ratios) // 2][0]:.2f}, best {ratios[0][0]:.2f} "
                f"{ratios[0][1]}, worst {ratios[-1][0]:.2f} {ratios[-1][1]}; {len(slower)}/{len(ratios)} cases "
                "slower by > 5%"
            )
    return out


def repick(result: dict, wants_gemm=None, picked_by: str = "") -> dict:
    """``result`` with its ``auto`` rows redone from the two measured paths of each case (so a change
    of the choice is judged on the same measurements): ``wants_gemm(backend, case, (in_dim, out_dim,
    n_slices))`` picks the shrink inside the GEMM; by default the built-in cost model of this code
    (tune_lora_kernels.py --repicked passes a kernel plan's choice)."""
    from loraserve.plugins.backend_triton.cost_model import shrink_in_gemm_by_bytes

    if wants_gemm is None:
        wants_gemm = lambda name, c, shape: shrink_in_gemm_by_bytes(c["tokens"], *shape, c["rank"], c["adapters"])  # noqa: E731
        picked_by = "the cost model of the code that merged these files (benchmarks --merge)"
    projections = result["config"]["projections"]
    rows = {(c["phase"], c["proj"], c["tokens"], c["adapters"], c["rank"], c["backend"]): c for c in result["cases"]}
    cases = []
    for c in result["cases"]:
        if c["backend"].endswith(" auto"):
            name = c["backend"][: -len(" auto")]
            in_dim, offsets = projections[c["proj"]]
            pick = name + "+gemm" if wants_gemm(name, c, (in_dim, offsets[-1], len(offsets) - 1)) else name
            src = rows[(c["phase"], c["proj"], c["tokens"], c["adapters"], c["rank"], pick)]
            c = {**src, "backend": c["backend"], "picked": pick}
        cases.append(c)
    return {**result, "cases": cases, "auto_picked_by": picked_by}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--quick", action="store_true", help="a trimmed grid (ranks 16/128, 1/64/256 tokens)")
    parser.add_argument("--sweep", action="store_true", help="only time launch-parameter variants")
    parser.add_argument("--max-chunk", type=int, default=16, help="csgmv --max-lora-chunk-size")
    parser.add_argument("--prefill-only", action="store_true", help="only the prefill cases")
    parser.add_argument("--no-prefill", action="store_true", help="only the decode cases")
    parser.add_argument(
        "--decode-tokens",
        type=lambda v: tuple(int(t) for t in v.split(",")),
        default=None,
        help="only these decode token counts, e.g. 1,8,32 (to split the grid over several runs)",
    )
    parser.add_argument("--no-prepare", dest="prepare", action="store_false", help="skip timing prepare()")
    parser.add_argument("--only-prepare", action="store_true", help="only time prepare() (printed, not written)")
    parser.add_argument(
        "--plans",
        default="device",
        help="kernel plan of the backends: device (shipped for this GPU), off (the built-in cost model), or a file",
    )
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument(
        "--epilogue",
        action="store_true",
        help="only compare the in-place expand with the expand left to the consumer (csgmv)",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="merge result files of one device (parts of the grid) into one JSON + summary",
    )
    args = parser.parse_args()
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        if len({p["device"] for p in parts}) != 1:
            sys.exit("--merge: the files come from different devices")
        result = parts[0]
        for p in parts[1:]:
            result["cases"] += p["cases"]
            result["prepare_us"] += p["prepare_us"]
            result["gemm"].update(p["gemm"])
        result["merged_from"] = [{"date": p["date"], "ceilings": p["ceilings"]} for p in parts]
        result = repick(result)
        out = Path(args.out)
        slug = result["device"].replace(" ", "_") + (f"_{args.tag}" if args.tag else "")
        (out / f"lora_kernels_{slug}.json").write_text(json.dumps(result, indent=1))
        (out / f"lora_kernels_{slug}.md").write_text(summarize(result))
        print(summarize(result))
        return
    if not torch.cuda.is_available():
        sys.exit("bench_lora_kernels.py needs a CUDA GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = torch.cuda.get_device_name(0).replace(" ", "_") + (f"_{args.tag}" if args.tag else "")
    if args.epilogue and args.sweep:
        rows = sweep_epilogue(args)
        (out / f"lora_epilogue_sweep_{slug}.json").write_text(json.dumps(rows, indent=1))
        return
    if args.epilogue:
        result = run_epilogue(args)
        (out / f"lora_epilogue_{slug}.json").write_text(json.dumps(result, indent=1))
        summary = summarize_epilogue(result)
        (out / f"lora_epilogue_{slug}.md").write_text(summary)
        print(summary)
        return
    if args.sweep:
        rows = sweep(args)
        (out / f"lora_kernels_sweep_{slug}.json").write_text(json.dumps(rows, indent=1))
        return
    if args.only_prepare:
        print("| backend | tokens | adapters | requests | us |\n|---|---|---|---|---|")
        for r in run_prepare():
            print(f"| {r['backend']} | {r['tokens']} | {r['adapters']} | {r['requests']} | {r['us']:.1f} |")
        return
    args.partial = str(out / f"lora_kernels_{slug}.partial.json")
    result = run(args)
    Path(args.partial).unlink(missing_ok=True)
    (out / f"lora_kernels_{slug}.json").write_text(json.dumps(result, indent=1))
    summary = summarize(result)
    (out / f"lora_kernels_{slug}.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
