"""Figures of the recorded benchmark results, drawn from the JSON in ``benchmarks/results`` alone.

Nothing is re-run and no GPU is needed. Each figure is a PNG written next to the JSON (or into
``--out``); its title names the device recorded in the JSON. Figures:

- ``lora_kernels_*.json`` -> ``<stem>.png``: LoRA kernel time per layer (sum of the four projections) for
  each (tokens, adapters, rank), bars, against its limit (the larger of bytes / measured copy
  bandwidth and FLOPs / measured bf16 rate, black marks), and the fraction of the limit reached; one
  panel per phase and adapter count, bars grouped by tokens, one colour per rank.
- ``lora_epilogue_*.json`` -> ``<stem>.png``: the same for the expand done by its own kernel (``gemm``)
  and left to the consumer (``epi``), per layer (o, gate_up, down), one panel per rank.
- ``engine_steps_*.json`` with limits -> ``<stem>.png``: median decode step of each engine run against
  the step's limit (weights, adapters and KV cache read once at the measured copy bandwidth), and the
  LoRA part of the step against its own limit. Files without limits (tagged A/B runs) of one device
  -> ``engine_steps_<device>_tags.png``: their median decode steps side by side.
- ``tp_*.json`` -> ``<stem>.png``: throughput, TTFT, TPOT and decode step (with its collectives) per
  tensor-parallel size.
- ``offline_*.json`` / ``hf_peft_*.json`` (and bench_serving output) of one device ->
  ``throughput_latency_<device>.png``: output throughput, mean TTFT, mean TPOT and median decode step
  of each run.
- ``overlap_loading_*.json`` of one device -> ``overlap_loading_<device>.png``: TTFT (median, p99) and
  output throughput with overlap loading off and on, per rank and seed.
- ``prefix_cache_*.json`` -> ``<stem>.png``: input throughput and median TTFT with the prefix cache off
  and on, per workload, with the on/off ratio and the issue's targets.
- ``routing_sim.json`` (benchmarks/sim_routing.py) -> ``routing_sim.png``: adapter loads per 1,000
  requests and replica balance, multiplexed vs random routing, per Zipf exponent.

A JSON file of another shape is skipped with a one-line note.

    python benchmarks/plot.py [--results DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DPI = 110
LIMIT_STYLE = {"marker": "_", "color": "black", "markersize": 11, "markeredgewidth": 2.2, "linestyle": "none"}
LIMIT_BAR_STYLE = {**LIMIT_STYLE, "marker": "|", "markersize": 14}
KERNEL_BACKEND_PREFERENCE = ("csgmv auto", "triton auto", "csgmv", "triton")
SERVING_BENCHMARKS = {
    "bench_offline": "loraserve (offline)",
    "bench_hf_peft": "HF transformers + PEFT",
    "bench_serving": "loraserve (HTTP serving)",
}


# ---------------------------------------------------------------------------------------------- shapes


def kind_of(doc: object) -> str | None:
    """The figure kind a parsed result file feeds, from its shape (None: not known)."""
    if isinstance(doc, dict) and doc.get("benchmark") == "routing_sim" and isinstance(doc.get("runs"), list):
        return "routing_sim"  # a simulation: no device
    if isinstance(doc, dict) and doc.get("benchmark") == "store_sim" and isinstance(doc.get("runs"), list):
        return "store_sim"
    if not isinstance(doc, dict) or "device" not in doc and doc.get("benchmark") != "bench_serving":
        return None
    cases = doc.get("cases")
    if isinstance(cases, list) and cases and all(isinstance(c, dict) for c in cases):
        needed = {"proj", "tokens", "adapters", "rank", "backend", "time_us", "limit_us"}
        if needed <= set(cases[0]):
            return "epilogue" if "epi_total_us" in cases[0] else "kernels"
    runs = doc.get("runs")
    if isinstance(runs, list) and runs and all(isinstance(r, dict) and "decode_step_ms_median" in r for r in runs):
        return "engine_steps"
    if doc.get("benchmark") == "tensor_parallel" and isinstance(doc.get("summary"), list):
        return "tp"
    if doc.get("benchmark") == "overlap_loading" and isinstance(doc.get("summary"), list):
        return "overlap"
    if doc.get("benchmark") in SERVING_BENCHMARKS and isinstance(doc.get("results"), dict):
        return "serving"
    if doc.get("benchmark") == "scheduler" and isinstance(doc.get("rows"), list):
        return "scheduler"
    if doc.get("benchmark") == "attention_host" and isinstance(doc.get("rows"), list):
        return "attention_host"
    if doc.get("benchmark") == "bench_serving_core" and isinstance(doc.get("rows"), list):
        return "serving_core"
    if doc.get("benchmark") == "dora_compose" and isinstance(runs, list) and isinstance(doc.get("ratios"), dict):
        return "dora_compose"
    if doc.get("benchmark") == "prefix_cache" and isinstance(runs, list) and isinstance(doc.get("ratios"), list):
        return "prefix_cache"
    if doc.get("benchmark") == "store_fill" and isinstance(doc.get("rows"), list):
        return "store_fill"
    return None


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def device_of(doc: dict) -> str:
    return doc.get("device") or "device not recorded"


# ---------------------------------------------------------------------------------------------- helpers


def kernel_cases(doc: dict) -> list[dict]:
    """One row per case of a lora_kernels / lora_epilogue JSON: its key fields, measured_us and limit_us."""
    return [
        {
            "phase": c.get("phase", "decode"),
            "proj": c["proj"],
            "tokens": c["tokens"],
            "adapters": c["adapters"],
            "rank": c["rank"],
            "backend": c["backend"],
            "measured_us": c["time_us"],
            "limit_us": c["limit_us"],
        }
        for c in doc["cases"]
    ]


def per_layer(cases: list[dict]) -> dict[tuple, tuple[float, float]]:
    """(phase, tokens, adapters, rank, backend) -> (measured, limit), each summed over the projections."""
    sums: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for c in cases:
        row = sums[(c["phase"], c["tokens"], c["adapters"], c["rank"], c["backend"])]
        row[0] += c["measured_us"]
        row[1] += c["limit_us"]
    return {k: (m, lim) for k, (m, lim) in sums.items()}


def pick_backend(cases: list[dict]) -> str:
    names = list(dict.fromkeys(c["backend"] for c in cases))
    return next((b for b in KERNEL_BACKEND_PREFERENCE if b in names), names[0])


def header(fig: plt.Figure, what: str, device: str, detail: str, handles: list | None = None) -> None:
    """Title naming the device, a grey line of details, an optional legend row; then lays the panels out below."""
    height, width = fig.get_figheight(), fig.get_figwidth()
    fig.suptitle(f"{what} — {device}", fontsize=14, fontweight="bold", y=1 - 0.08 / height, va="top")
    lines = textwrap.wrap(detail, int(width * 12.5)) or [""]
    fig.text(0.5, 1 - 0.38 / height, "\n".join(lines), ha="center", va="top", fontsize=9, color="0.3")
    used = 0.42 + 0.16 * len(lines)
    if handles:
        fig.legend(
            handles=handles,
            loc="upper center",
            bbox_to_anchor=(0.5, 1 - used / height),
            fontsize=9,
            ncol=min(len(handles), 6),
            frameon=False,
            borderaxespad=0,
        )
        used += 0.28 * -(-len(handles) // 6)
    fig.tight_layout(rect=(0, 0, 1, 1 - used / height), pad=0.6)
    titled = any(ax.get_title() for ax in fig.axes)
    fig.subplots_adjust(top=1 - (used + (0.32 if titled else 0.1)) / height)


def facet_bars(facets: dict[str, dict[str, dict]], series: list, series_name: str, xlabel: str) -> tuple:
    """Two rows of panels, one column per facet: bars of measured time with black limit marks (log axis),
    and the percentage of the limit reached. ``facets``: {panel title: {x label: {series: (measured, limit)}}}.
    Returns (figure, legend handles)."""
    widths = [max(2, len(xs)) for xs in facets.values()]
    fig, axes = plt.subplots(
        2,
        len(facets),
        figsize=(min(20.0, max(11.0, 3.5 + 0.85 * sum(widths))), 8.2),
        squeeze=False,
        sharey="row",
        width_ratios=widths,
        height_ratios=[3, 2],
    )
    colors = {s: f"C{i}" for i, s in enumerate(series)}
    width = 0.8 / len(series)
    dropped = 0
    for col, (title, xs) in enumerate(facets.items()):
        top, bottom = axes[0][col], axes[1][col]
        for i, values in enumerate(xs.values()):
            present = [s for s in series if s in values]
            start = i - width * len(present) / 2
            for j, s in enumerate(present):
                measured, limit = values[s]
                top.plot(start + width * (j + 0.5), limit, **LIMIT_STYLE)
                if measured <= 0:
                    dropped += 1
                    continue
                top.bar(start + width * (j + 0.5), measured, width, color=colors[s])
                bottom.bar(start + width * (j + 0.5), 100 * limit / measured, width, color=colors[s])
        top.set_yscale("log")
        top.set_title(title, fontsize=10)
        bottom.axhline(100, color="black", linestyle="--", linewidth=1)
        for ax in (top, bottom):
            ax.set_xticks(range(len(xs)), list(xs), fontsize=8)
            ax.set_xlim(-0.6, len(xs) - 0.4)
            ax.grid(axis="y", alpha=0.3)
        bottom.set_xlabel(xlabel, fontsize=9)
    axes[0][0].set_ylabel("LoRA time per layer (µs, log scale)")
    axes[1][0].set_ylabel("% of limit reached\n(limit / measured × 100)")
    handles = [Patch(color=colors[s], label=f"{series_name} {s}".strip()) for s in series]
    handles.append(Line2D([], [], label="limit: max(bytes / copy BW, FLOPs / bf16 rate)", **LIMIT_STYLE))
    if dropped:
        handles.append(Patch(color="white", label=f"{dropped} with measured ≤ 0 µs (timing noise): no bar"))
    return fig, handles


def hbars(ax, labels: list[str], measured: list, limits: list, color: str, unit: str) -> None:
    """Horizontal bars of ``measured`` (None: no bar), black limit marks where a limit is known, measured / limit."""
    ys = range(len(labels))
    top = max([*(m for m in measured if m), *(x for x in limits if x)])
    for y, m, lim in zip(ys, measured, limits):
        if m is None:
            continue
        ax.barh(y, m, color=color, height=0.6)
        if lim:
            ax.plot(lim, y, **LIMIT_BAR_STYLE)
            ax.text(max(m, lim) + 0.02 * top, y, f"{m:.2f} {unit} = {m / lim:.2f}× limit", va="center", fontsize=8)
        else:
            ax.text(m + 0.02 * top, y, f"{m:.2f} {unit}", va="center", fontsize=8)
    ax.set_yticks(list(ys), labels, fontsize=9)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlim(0, top * 1.45)
    ax.grid(axis="x", alpha=0.3)


def group_bars(ax, groups: list[str], series: dict[str, list], ylabel: str, fmt: str = "{:.0f}") -> None:
    """Vertical bars: one group per entry of ``groups``, one bar per series, values written on the bars;
    the legend sits in a row above the bars."""
    width = 0.8 / len(series)
    for j, (name, values) in enumerate(series.items()):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(groups))]
        bars = ax.bar(xs, [v or 0 for v in values], width, label=name, color=f"C{j}")
        ax.bar_label(bars, [fmt.format(v) if v is not None else "n/a" for v in values], fontsize=8, padding=2)
    ax.set_xticks(range(len(groups)), groups, fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(v or 0 for values in series.values() for v in values) * 1.3)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", ncol=len(series), frameon=False, handlelength=1.2, columnspacing=0.8)


# ---------------------------------------------------------------------------------------------- figures


def plot_kernels(doc: dict) -> plt.Figure:
    """lora_kernels JSON: per-layer LoRA time against its limit, by phase/adapters, tokens and rank."""
    cases = kernel_cases(doc)
    backend = pick_backend(cases)
    rows = {k: v for k, v in per_layer(cases).items() if k[4] == backend}
    ranks = sorted({k[3] for k in rows})
    facets: dict[str, dict[str, dict]] = {}
    for phase, tokens, adapters, rank, _ in sorted(rows, key=lambda k: (k[0] != "decode", k[2], k[1], k[3])):
        title = f"{phase}, {adapters} adapter{'s' if adapters > 1 else ''}"
        facets.setdefault(title, {}).setdefault(str(tokens), {})[rank] = rows[(phase, tokens, adapters, rank, backend)]
    fig, handles = facet_bars(facets, ranks, "rank", "tokens per step")
    ceil, chunk = doc.get("ceilings", {}), doc.get("config", {}).get("csgmv_max_chunk", "?")
    header(
        fig,
        f"LoRA kernel time per layer vs its limit, backend '{backend}'",
        device_of(doc),
        f"{doc.get('date', '')[:10]}; Llama-3-8B projections (qkv + o + gate_up + down summed), bf16, csgmv chunk "
        f"{chunk}, CUDA graphs, cold L2, median; limits from the measured copy bandwidth "
        f"{ceil.get('copy_GBps', 0):.0f} GB/s and bf16 matmul {ceil.get('bf16_TFLOPs', 0):.0f} TFLOP/s; "
        f"{len(cases)} per-projection cases in the file",
        handles,
    )
    return fig


def plot_epilogue(doc: dict) -> plt.Figure:
    """lora_epilogue JSON: per-layer LoRA time of expand-in-kernel vs expand-in-consumer, against the limit."""
    cases = kernel_cases(doc)
    rows = per_layer(cases)
    backends = list(dict.fromkeys(c["backend"] for c in cases))
    facets: dict[str, dict[str, dict]] = {}
    for phase, tokens, adapters, rank, backend in sorted(rows, key=lambda k: (k[3], k[1], k[2])):
        x = f"{tokens}\n{adapters}a"
        facets.setdefault(f"rank {rank}", {}).setdefault(x, {})[backend] = rows[
            (phase, tokens, adapters, rank, backend)
        ]
    fig, handles = facet_bars(facets, backends, "", "decode tokens / distinct adapters (a)")
    projs = " + ".join(p.removesuffix("_proj") for p in dict.fromkeys(c["proj"] for c in cases))
    header(
        fig,
        "LoRA expand in its own kernel (gemm) vs left to the consumer (epi)",
        device_of(doc),
        f"{doc.get('date', '')[:10]}; per layer ({projs} summed), csgmv, shrink inside the base GEMM; LoRA time = "
        "total - (base GEMM + consumer); CUDA graphs, cold L2, median of 3 interleaved rounds",
        handles,
    )
    return fig


def plot_engine_steps(doc: dict) -> plt.Figure:
    """engine_steps JSON with limits: median decode step of each run against the step's limit."""
    runs = doc["runs"]
    lora = [r.get("lora_part_ms") for r in runs]
    has_lora = any(v is not None for v in lora)
    fig, axes = plt.subplots(
        1,
        2 if has_lora else 1,
        figsize=(16 if has_lora else 11, 2.2 + 0.45 * len(runs)),
        squeeze=False,
        sharey=True,
        width_ratios=[3, 2] if has_lora else None,
    )
    hbars(
        axes[0][0],
        [r["name"] for r in runs],
        [r["decode_step_ms_median"] for r in runs],
        [r.get("limit_ms") for r in runs],
        "C0",
        "ms",
    )
    axes[0][0].set_xlabel("median decode step at full batch (ms)")
    axes[0][0].set_title("whole decode step", fontsize=10)
    handles = [
        Patch(color="C0", label="measured step"),
        Line2D([], [], label="limit: weights, distinct adapters and KV cache read once / copy BW", **LIMIT_BAR_STYLE),
    ]
    if has_lora:
        hbars(axes[0][1], [r["name"] for r in runs], lora, [r.get("lora_limit_ms") for r in runs], "C1", "ms")
        axes[0][1].set_xlabel("LoRA part: step - base step at the same batch (ms)")
        axes[0][1].set_title("LoRA part of the step", fontsize=10)
        handles.insert(1, Patch(color="C1", label="measured LoRA part (limit: distinct adapters read once)"))
    cfg, ceil = doc.get("config", {}), doc.get("ceilings", {})
    header(
        fig,
        "Engine decode step vs its limit",
        device_of(doc),
        f"bench_engine_steps '{cfg.get('tag') or 'untagged'}', {doc.get('date', '')[:10]}, Llama-3.1-8B shape, "
        f"adapters of rank {cfg.get('rank')}; measured copy bandwidth {ceil.get('copy_GBps', 0):.0f} GB/s"
        + ("; runs without a limit are prefill/decode mixes" if not all(r.get("limit_ms") for r in runs) else ""),
        handles,
    )
    return fig


def plot_engine_step_tags(docs: list[dict]) -> plt.Figure:
    """engine_steps JSON files without limits (tagged A/B runs) of one device: their decode steps side by side."""
    docs = sorted(docs, key=lambda d: (d.get("config", {}).get("rank", 0), d.get("config", {}).get("tag", "")))
    rows = [
        (f"{d.get('config', {}).get('tag') or 'untagged'}: {r['name']}", r["decode_step_ms_median"])
        for d in docs
        for r in d["runs"]
    ]
    fig, ax = plt.subplots(figsize=(11, 2.2 + 0.45 * len(rows)))
    hbars(ax, [r[0] for r in rows], [r[1] for r in rows], [None] * len(rows), "C2", "ms")
    ax.set_xlabel("median decode step at full batch (ms)")
    header(
        fig,
        "Engine decode step of tagged runs",
        device_of(docs[0]),
        "bench_engine_steps --tag <tag>: one bar per run of each file; the tag names the variant measured",
        [Patch(color="C2", label="measured step (these files record no limit)")],
    )
    return fig


def run_results(doc: dict) -> dict[int, dict]:
    """tp_size -> the serving benchmark's results of that run (empty dict where the run kept none)."""
    return {run.get("row", {}).get("tp_size"): run.get("doc", {}).get("results", {}) for run in doc.get("runs", [])}


def step_split_bars(ax, groups: list[str], steps: list, colls: list, batch: str) -> None:
    """Decode step per tp size with the part its collectives take (timed alone) hatched at the bottom."""
    bars = ax.bar(range(len(groups)), [s or 0 for s in steps], 0.6, color="C0", label="decode step (engine, mean)")
    ax.bar_label(bars, [f"{s:.2f}" if s else "n/a" for s in steps], fontsize=8, padding=2)
    for i, c in enumerate(colls):
        if c:
            ax.bar(
                i,
                c,
                0.6,
                color="C3",
                hatch="//",
                edgecolor="white",
                label=f"its collectives at batch {batch}, timed alone" if i == colls.index(c) else None,
            )
            ax.text(i, c + 0.2, f"{c:.2f}", ha="center", va="bottom", fontsize=8, color="white", fontweight="bold")
    ax.set_xticks(range(len(groups)), groups, fontsize=9)
    ax.set_ylabel("time (ms)")
    ax.set_ylim(0, max(s or 0 for s in steps) * 1.3)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", frameon=False)


def plot_tp(doc: dict) -> plt.Figure:
    """tp JSON: throughput, TTFT, TPOT and decode step per tensor-parallel size."""
    summary = sorted(doc["summary"], key=lambda s: s["tp_size"])
    results = run_results(doc)
    groups = [f"tp {s['tp_size']}" for s in summary]
    fig, axes = plt.subplots(1, 4, figsize=(18, 5.6))
    group_bars(
        axes[0],
        groups,
        {
            "output": [s["output_throughput"] for s in summary],
            "total (in + out)": [s["total_throughput"] for s in summary],
        },
        "throughput (tokens/s)",
    )
    for ax, metric, name in ((axes[1], "ttft", "TTFT (ms)"), (axes[2], "tpot", "TPOT (ms)")):
        series = {q: [results.get(s["tp_size"], {}).get(f"{q}_{metric}_ms") for s in summary] for q in ("p90", "p99")}
        series = {"median": [s[f"median_{metric}_ms"] for s in summary], **series}
        group_bars(ax, groups, series, name, "{:.0f}" if metric == "ttft" else "{:.1f}")
    batch = str(doc.get("config", {}).get("max_concurrency") or "")
    colls = [doc.get("decode_collectives_ms", {}).get(str(s["tp_size"]), {}).get(batch) for s in summary]
    step_split_bars(axes[3], groups, [s.get("decode_step_ms") for s in summary], colls, batch)
    for ax, title in zip(axes, ("throughput", "time to first token", "time per output token", "decode step")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("tensor-parallel size")
    cfg = doc.get("config", {})
    header(
        fig,
        "Tensor parallelism: serving throughput and latency",
        device_of(doc),
        f"Llama-3.1-8B shape, {cfg.get('num_adapters')} adapters of rank {cfg.get('rank')} "
        f"({cfg.get('distribution')}), "
        f"{cfg.get('num_prompts')} requests of {cfg.get('input_len')} in / {cfg.get('output_len')} out, "
        f"{cfg.get('max_concurrency')} in flight, after {cfg.get('warmup_requests')} warm-up requests",
    )
    return fig


def common_suffix(stems: list[str]) -> str:
    parts = [s.split("_") for s in stems]
    n = 0
    while all(len(p) > n + 1 for p in parts) and len({p[-1 - n] for p in parts}) == 1:
        n += 1
    return "_".join(parts[0][len(parts[0]) - n :]) if n else ""


def serving_label(stem: str, suffix: str, doc: dict) -> str:
    label = stem[: len(stem) - len(suffix)].rstrip("_") if suffix else stem
    warmup = doc.get("config", {}).get("warmup_requests")
    return f"{label}\n({warmup} warm-up requests)" if warmup is not None else label


SERVING_METRICS = (
    ("output throughput (tokens/s)", lambda r: r.get("output_throughput")),
    ("mean TTFT (ms)", lambda r: r.get("mean_ttft_ms")),
    ("mean TPOT (ms)", lambda r: r.get("mean_tpot_ms")),
    ("median decode step (ms)", lambda r: ((r.get("step_metrics") or {}).get("decode") or {}).get("median_ms")),
)


def plot_serving(named: list[tuple[str, dict]]) -> plt.Figure:
    """offline / hf_peft / serving JSON files of one device: throughput, TTFT, TPOT and decode step per run."""
    named = sorted(named, key=lambda n: (list(SERVING_BENCHMARKS).index(n[1]["benchmark"]), n[0]))
    suffix = common_suffix([stem for stem, _ in named])
    labels = [serving_label(stem, suffix, d) for stem, d in named]
    colors = [f"C{list(SERVING_BENCHMARKS).index(d['benchmark'])}" for _, d in named]
    fig, axes = plt.subplots(1, len(SERVING_METRICS), figsize=(18, 2.4 + 0.6 * len(named)), sharey=True)
    for ax, (name, get) in zip(axes, SERVING_METRICS):
        values = [get(d["results"]) for _, d in named]
        top = max([v for v in values if v] or [1])
        for y, (v, color) in enumerate(zip(values, colors)):
            ax.barh(y, v or 0, color=color, height=0.6)
            ax.text((v or 0) + 0.02 * top, y, f"{v:.1f}" if v is not None else "not recorded", va="center", fontsize=8)
        ax.set_xlabel(name)
        ax.set_xlim(0, top * 1.35)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(labels)), labels, fontsize=9)
    axes[0].set_ylim(len(labels) - 0.5, -0.5)
    kinds = dict.fromkeys(d["benchmark"] for _, d in named)
    header(
        fig,
        "Throughput and latency per run",
        device_of(named[0][1]),
        f"files '<run>_{suffix}.json'; bench_offline: the engine in-process, all requests at once; bench_hf_peft: "
        "transformers generate with PEFT adapters, same workload; TTFT includes any kernel compilation",
        [Patch(color=f"C{list(SERVING_BENCHMARKS).index(k)}", label=SERVING_BENCHMARKS[k]) for k in kinds],
    )
    return fig


def plot_overlap(docs: list[dict]) -> plt.Figure:
    """overlap_loading JSON files of one device: TTFT and throughput with overlap loading off and on."""
    rows = {(s["rank"], d.get("config", {}).get("seed"), bool(s["overlap"])): s for d in docs for s in d["summary"]}
    keys = sorted({k[:2] for k in rows})
    groups = [f"rank {r}\nseed {seed}" for r, seed in keys]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.8))
    for ax, field, name in (
        (axes[0], "ttft_median_ms", "median TTFT (ms)"),
        (axes[1], "ttft_p99_ms", "p99 TTFT (ms)"),
        (axes[2], "output_throughput", "output throughput (tokens/s)"),
    ):
        series = {
            f"overlap loading {'on' if on else 'off'}": [rows.get((*k, on), {}).get(field) for k in keys]
            for on in (False, True)
        }
        group_bars(ax, groups, series, name)
        for i, k in enumerate(keys):
            off, on = (rows.get((*k, o), {}).get(field) for o in (False, True))
            if off and on:
                ax.text(
                    i + 0.2,
                    on / 2,
                    f"on/off\n{on / off:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white",
                    fontweight="bold",
                )
        ax.set_xlabel("adapter rank / workload seed")
        ax.set_title(name.split(" (")[0], fontsize=10)
    cfg = docs[0].get("config", {})
    header(
        fig,
        "Overlap loading: latency and throughput, off vs on",
        device_of(docs[0]),
        f"{cfg.get('num_adapters')} adapters through {cfg.get('max_loras_per_batch')} slots per batch, Poisson "
        f"{cfg.get('request_rate')} req/s, {cfg.get('num_prompts')} requests of {cfg.get('input_len')} in / "
        f"{cfg.get('output_len')} out; one server per run",
    )
    return fig


# ---------------------------------------------------------------------------------------------- driver


def plot_scheduler(named: list[tuple[str, dict]]) -> plt.Figure:
    """Scheduler host time per step against running requests, one line per recorded run (log-log)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for stem, doc in sorted(named):
        rows = doc["rows"]
        ax.plot(
            [r["running"] for r in rows], [r["median_us"] for r in rows], marker="o", label=doc.get("label") or stem
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("running requests")
    ax.set_ylabel("scheduler host time per step (us, median)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    header(fig, "Scheduler bookkeeping per decode step", device_of(named[0][1]), "schedule() + finishes, no model")
    return fig


def plot_attention_host(doc: dict) -> plt.Figure:
    """Host time per step of the attention metadata and the LoRA batch info, before and after, per
    batch size (log scale)."""
    rows = doc["rows"]
    parts = [("begin_step", "eager step"), ("begin_graph_step", "graph step"), ("batch_info", "LoRA batch info")]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.13
    for i, row in enumerate(rows):
        for j, (key, label) in enumerate(parts):
            for k, when in enumerate(("before", "after")):
                x = i + (2 * j + k - 2.5) * width
                ax.bar(
                    x,
                    row[f"{key}_{when}_us"],
                    width,
                    color=f"C{j}",
                    alpha=0.45 if when == "before" else 1.0,
                    label=f"{label}, {when}" if i == 0 else None,
                )
    ax.set_xticks(range(len(rows)), [f"{r['requests']} requests x {r['context']} tokens" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("host time per step (us, median)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=3)
    header(fig, "Per-step host work: block tables and LoRA batch info", device_of(doc), "before: rebuilt on the host")
    return fig


def plot_serving_core(doc: dict) -> plt.Figure:
    """Served vs offline throughput and the served decode step vs its GPU time, overlap on and off."""
    rows = doc["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    cases = sorted({(r["concurrency"], r["workload"]) for r in rows})
    for k, overlap in enumerate((True, False)):
        by_case = {(r["concurrency"], r["workload"]): r for r in rows if r["overlap"] == overlap}
        xs = [i + (k - 0.5) * 0.38 for i in range(len(cases))]
        label = "overlap on" if overlap else "overlap off"
        left.bar(xs, [by_case.get(c, {}).get("served_over_offline") or 0 for c in cases], 0.38, label=label)
        right.bar(xs, [by_case.get(c, {}).get("served_step_over_gpu") or 0 for c in cases], 0.38, label=label)
    names = [f"{c} {w}" for c, w in cases]
    for ax, target, title in (
        (left, 0.9, "served / offline output tok/s"),
        (right, 1.1, "served decode step / its GPU time"),
    ):
        ax.axhline(target, color="k", linestyle="--", linewidth=1, label=f"target {target}")
        ax.set_xticks(range(len(cases)), names, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    header(fig, "Serving core: the GPU never waits for Python", device_of(doc), "concurrency and workload on x")
    return fig


def plot_prefix_cache(doc: dict) -> plt.Figure:
    """prefix_cache JSON: input throughput and median TTFT per workload, cache off vs on, with the on/off
    ratio over each pair and the target where the issue sets one."""
    runs = {(r["workload"], r["cache"]): r for r in doc["runs"]}
    workloads = list(dict.fromkeys(r["workload"] for r in doc["runs"]))
    ratios = {r["workload"]: r for r in doc["ratios"]}
    targets = {(t["workload"], t["ratio"]): t for t in doc.get("targets", [])}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.4))
    for ax, field, ratio, name, fmt in (
        (axes[0], "input_throughput", "input_throughput_ratio", "input throughput (tokens/s)", "{:.0f}"),
        (axes[1], "ttft_median_ms", "ttft_median_ratio", "median TTFT (ms)", "{:.1f}"),
    ):
        series = {
            f"cache {'on' if on else 'off'}": [runs.get((w, on), {}).get(field) for w in workloads]
            for on in (False, True)
        }
        group_bars(ax, workloads, series, name, fmt)
        top = ax.get_ylim()[1]
        for i, w in enumerate(workloads):
            if w not in ratios:
                continue
            text = f"on/off {ratios[w][ratio]:.2f}×"
            target = targets.get((w, ratio))
            if target:
                text += f"\ntarget {target['target']}: {'met' if target['met'] else 'missed'}"
            ax.text(
                i,
                0.9 * top,
                text,
                ha="center",
                va="top",
                fontsize=8,
                color="0.2" if target is None else "green" if target["met"] else "red",
            )
        ax.set_title(name.split(" (")[0], fontsize=10)
    cfg = doc.get("config", {})
    same = "identical" if doc.get("outputs_identical") else "NOT identical"
    header(
        fig,
        "Prefix cache: input throughput and TTFT, off vs on",
        device_of(doc),
        f"{doc.get('date', '')[:10]}; {cfg.get('model_type')} ({cfg.get('resolved_dtype')}), {cfg.get('num_adapters')} "
        f"adapters; shared_prefix / no_sharing: {cfg.get('num_prompts')} requests of {cfg.get('system_len')} + "
        f"{cfg.get('unique_len')} prompt tokens; multi_turn: {cfg.get('conversations')} x {cfg.get('turns')} turns of "
        f"+{cfg.get('turn_len')}; {cfg.get('output_len')} output tokens; arrivals {cfg.get('arrivals')}; greedy "
        f"outputs {same} with the cache on and off",
    )
    return fig


def plot_routing_sim(doc: dict) -> plt.Figure:
    """routing_sim JSON (benchmarks/sim_routing.py): adapter loads per 1,000 requests and the busiest
    replica's requests over the mean, multiplexed vs random routing, per Zipf exponent."""
    runs = doc["runs"]
    groups = [f"zipf {r['zipf']:g}" for r in runs]
    policies = list(runs[0]["policies"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.4))
    for ax, field, name, fmt in (
        (axes[0], "loads_per_1000_requests", "adapter loads per 1,000 requests", "{:.0f}"),
        (axes[1], "balance_max_over_mean", "busiest replica's requests / mean", "{:.2f}"),
    ):
        group_bars(ax, groups, {p: [r["policies"][p][field] for r in runs] for p in policies}, name, fmt)
        ax.set_title(name, fontsize=10)
    cfg = doc.get("config", {})
    header(
        fig,
        "Routing simulation: multiplexed vs random routing",
        "a simulation (no GPU)",
        f"{cfg.get('num_adapters')} adapters, {cfg.get('num_replicas')} replicas x {cfg.get('slots')} slots (LRU), "
        f"{cfg.get('num_requests')} requests; benchmarks/sim_routing.py",
    )
    return fig


def plot_dora_compose(doc: dict) -> plt.Figure:
    """dora_compose JSON (benchmarks/bench_dora_compose.py): the mean decode step of each case
    (wall and GPU time), plain LoRA, a composition and DoRA at the same total rank."""
    runs = doc["runs"]
    cases = [r["case"] for r in runs]
    fig, ax = plt.subplots(figsize=(11, 5.4))
    series = {"mean decode step (wall)": [r["mean_decode_ms"] or 0 for r in runs]}
    if any(r.get("gpu_decode_ms") for r in runs):
        series["GPU time (CUDA events)"] = [r.get("gpu_decode_ms") or 0 for r in runs]
    group_bars(ax, cases, series, "ms", "{:.2f}")
    cfg = doc.get("config", {})
    header(
        fig,
        "DoRA and weighted composition vs plain LoRA of the same total rank",
        device_of(doc),
        f"batch {cfg.get('batch')}, {cfg.get('input_len')} in / {cfg.get('output_len')} out, "
        f"{cfg.get('num_adapters')} adapters of rank {cfg.get('rank')} (compositions: two of rank "
        f"{max(1, (cfg.get('rank') or 2) // 2)}); benchmarks/bench_dora_compose.py",
    )
    return fig


def plot_store_fill(doc: dict) -> plt.Figure:
    """store_fill JSON (benchmarks/bench_store_fill.py): GPU time of a slot filled from host memory,
    of the GPU store's put and of a slot filled from the store, per adapter rank."""
    rows = doc["rows"]
    groups = [f"rank {r['rank']} ({r['adapter_mib']:.0f} MiB)" for r in rows]
    names = {"host_write": "slot from host (pinned)", "store_put": "store put (host to store)"}
    names["store_fill"] = "slot from store (device copy)"
    series = {label: [r[op][0] for r in rows] for op, label in names.items()}
    fig, ax = plt.subplots(figsize=(10, 5))
    group_bars(ax, groups, series, "GPU ms (median, CUDA events)", "{:.2f}")
    cfg = doc.get("config", {})
    header(
        fig,
        "GPU adapter slot fills: from host vs from the GPU store",
        device_of(doc),
        f"{Path(str(cfg.get('config_dir', ''))).name} shape, every projection, bf16; benchmarks/bench_store_fill.py",
    )
    return fig


def plot_store_sim(doc: dict) -> plt.Figure:
    """store_sim JSON (benchmarks/sim_store.py): adapters resident on the GPU and the GPU hit rate,
    pages of 8 rank rows vs slots padded to the maximum rank, per memory budget."""
    runs = doc["runs"]
    groups = [f"{r['gib']:g} GiB" for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.4))
    for ax, field, name, fmt in (
        (axes[0], "resident_mean", "adapters resident (mean)", "{:.0f}"),
        (axes[1], "hit_rate", "requests finding their adapter on the GPU", "{:.2f}"),
    ):
        group_bars(ax, groups, {d: [r[d][field] for r in runs] for d in ("paged", "padded")}, name, fmt)
        ax.set_title(name, fontsize=10)
    cfg = doc.get("config", {})
    header(
        fig,
        "GPU adapter memory: pages of rank rows vs padded slots",
        "a simulation (no GPU)",
        f"{cfg.get('num_adapters')} adapters of ranks {cfg.get('ranks')}, {cfg.get('num_requests')} requests, "
        f"Zipf {cfg.get('zipf')}; {Path(cfg.get('config_dir', '')).name} shape; benchmarks/sim_store.py",
    )
    return fig


PER_FILE = {
    "kernels": plot_kernels,
    "epilogue": plot_epilogue,
    "engine_steps": plot_engine_steps,
    "tp": plot_tp,
    "attention_host": plot_attention_host,
    "serving_core": plot_serving_core,
    "prefix_cache": plot_prefix_cache,
    "routing_sim": plot_routing_sim,
    "dora_compose": plot_dora_compose,
    "store_fill": plot_store_fill,
    "store_sim": plot_store_sim,
}


def save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def load_results(results: Path) -> tuple[list[tuple[str, str, dict]], list[str]]:
    """(kind, stem, doc) of every JSON file of a known shape, and one note per skipped file."""
    known, notes = [], []
    for path in sorted(results.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            notes.append(f"skipped {path.name}: not readable JSON ({e.__class__.__name__})")
            continue
        kind = kind_of(doc)
        if kind is None:
            shape = f"a list of {len(doc)} items" if isinstance(doc, list) else type(doc).__name__
            notes.append(f"skipped {path.name}: unknown shape ({shape})")
        else:
            known.append((kind, path.stem, doc))
    return known, notes


def plot_all(results: Path, out: Path) -> tuple[list[Path], list[str]]:
    """Draw every figure the result files in ``results`` support into ``out``; (written files, notes)."""
    out.mkdir(parents=True, exist_ok=True)
    known, notes = load_results(results)
    written = []
    grouped: dict[tuple[str, str], list[tuple[str, dict]]] = defaultdict(list)
    for kind, stem, doc in known:
        if kind == "engine_steps" and not any(r.get("limit_ms") for r in doc["runs"]):
            kind = "engine_tags"
        if kind in PER_FILE:
            written.append(save(PER_FILE[kind](doc), out / f"{stem}.png"))
        else:
            grouped[(kind, device_of(doc))].append((stem, doc))
    for (kind, device), named in sorted(grouped.items()):
        docs = [d for _, d in named]
        if kind == "engine_tags":
            written.append(save(plot_engine_step_tags(docs), out / f"engine_steps_{slug(device)}_tags.png"))
        elif kind == "overlap":
            written.append(save(plot_overlap(docs), out / f"overlap_loading_{slug(device)}.png"))
        elif kind == "serving":
            written.append(save(plot_serving(named), out / f"throughput_latency_{slug(device)}.png"))
        elif kind == "scheduler":
            written.append(save(plot_scheduler(named), out / f"scheduler_{slug(device)}.png"))
    return written, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the result JSON files")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNG files (default: --results)")
    args = parser.parse_args(argv)
    written, notes = plot_all(args.results, args.out or args.results)
    for note in notes:
        print(note, file=sys.stderr)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
