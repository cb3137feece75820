"""The naive baseline: the same workload and adapters as ``bench_offline.py``, through transformers + PEFT.

It loads the base model with transformers (``--model-path``, or random weights of ``--config-dir``
or ``--load-format dummy`` through ``AutoModelForCausalLM.from_config``, built directly on the
device in ``--dtype``), writes the same random adapters as ``bench_offline.py`` (the same
``random_adapters`` call with the same seed) and loads them all into one ``PeftModel``, one
adapter name each, kept in the model's dtype (``autocast_adapter_dtype=False``). It draws the same
workload (same ``workloads.make_workload`` call) and runs it in static batches of ``--batch-size``
requests in workload order: each batch left-padded with an explicit attention mask, generated with
``model.generate(..., adapter_names=[...per row...], max_new_tokens=O, min_new_tokens=O,
do_sample=False)``, PEFT's mixed-batch inference, where a base-model row is named ``"__base__"``.
``O`` is the batch's longest output length; each request is credited with its own output length
only (``generated_tokens`` counts what was computed). The model's ``generation_config.eos_token_id``
is cleared, so that, as with the engine's ``ignore_eos``, EOS is neither a stop nor suppressed:
every row gets its greedy tokens exactly. The same throughput numbers and JSON as bench_offline.

With random weights the two benchmarks draw different base weights (loraserve's dummy loader and
transformers' initialiser differ), so their outputs agree only for a model directory with weights.

    python benchmarks/bench_hf_peft.py --config-dir benchmarks/configs/llama-3.1-8b --num-prompts 512 \\
        --input-len 256 --output-len 128 --num-adapters 8 --lora-rank 16 --batch-size 32
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch
from bench_offline import (
    adapters_for,
    add_common_args,
    build_requests,
    environment,
    finish,
    model_config,
    model_dir,
    peak_memory_gib,
    print_table,
    random_weights,
    resolve_device_dtype,
    sync,
    throughput,
    throughput_rows,
)
from workloads import RequestSpec, describe_workload

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_common_args(parser)
    hf = parser.add_argument_group("transformers")
    hf.add_argument("--batch-size", type=int, default=16, help="requests per static batch")
    hf.add_argument("--attn-implementation", default=None, help="e.g. sdpa, eager (default: transformers')")
    hf.add_argument(
        "--warmup-batches", type=int, default=1, help="run this many batches first (8 new tokens each), untimed"
    )
    return parser


def load_model(args: argparse.Namespace, device: str, dtype: str):
    """The base model in eval mode, on ``device`` in ``dtype``; random weights built on the device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {} if args.attn_implementation is None else {"attn_implementation": args.attn_implementation}
    if random_weights(args):
        config = AutoConfig.from_pretrained(model_dir(args))
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=TORCH_DTYPES[dtype], **extra)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir(args), dtype=TORCH_DTYPES[dtype], **extra).to(device)
    model.generation_config.eos_token_id = None  # ignore_eos: never stop at, nor suppress, EOS
    return model.eval()


def attach_adapters(model, adapters: dict[str, Any]):
    """One PeftModel holding every adapter under its own name (the base model when there are none)."""
    if not adapters:
        return model
    from peft import PeftModel

    names = list(adapters)
    peft = PeftModel.from_pretrained(
        model, str(adapters[names[0]]), adapter_name=names[0], autocast_adapter_dtype=False
    )
    for name in names[1:]:
        peft.load_adapter(str(adapters[name]), adapter_name=name, autocast_adapter_dtype=False)
    return peft.eval()


def generate_batch(
    model, batch: Sequence[RequestSpec], device: str, pad_id: int, with_lora: bool, max_new_tokens: int | None = None
) -> list[list[int]]:
    """Greedy tokens of one left-padded static batch, each row cut to its request's output length."""
    width = max(len(r.input_ids) for r in batch)
    ids = torch.tensor([[pad_id] * (width - len(r.input_ids)) + r.input_ids for r in batch], device=device)
    mask = torch.tensor([[0] * (width - len(r.input_ids)) + [1] * len(r.input_ids) for r in batch], device=device)
    new = max_new_tokens or max(r.output_len for r in batch)
    extra = {"adapter_names": [r.lora_name or BASE_ADAPTER for r in batch]} if with_lora else {}
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=pad_id,
            **extra,
        )
    tokens = out[:, width:].tolist()
    return [row[: max_new_tokens or r.output_len] for row, r in zip(tokens, batch)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import peft

    device, dtype = resolve_device_dtype(args)
    config = model_config(args)
    requests = build_requests(args, config)
    batches = [requests[i : i + args.batch_size] for i in range(0, len(requests), args.batch_size)]
    pad_id = config.get("pad_token_id")
    pad_id = pad_id if isinstance(pad_id, int) else 0
    with adapters_for(args, config, dtype) as adapters:
        start = time.perf_counter()
        model = attach_adapters(load_model(args, device, dtype), adapters)
        startup_s = time.perf_counter() - start
        with_lora = bool(adapters)
        for batch in batches[: max(0, args.warmup_batches)]:
            generate_batch(model, batch, device, pad_id, with_lora, max_new_tokens=8)
        sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        outputs: list[list[int]] = []
        start = time.perf_counter()
        for batch in batches:
            outputs += generate_batch(model, batch, device, pad_id, with_lora)
        sync(device)
        wall_s = time.perf_counter() - start
    counts = [len(o) for o in outputs]
    short = [(i, n, r.output_len) for i, (n, r) in enumerate(zip(counts, requests)) if n != r.output_len]
    if short:
        raise RuntimeError(
            f"{len(short)} request(s) got fewer tokens than asked, e.g. request {short[0][0]}: "
            f"{short[0][1]} of {short[0][2]}"
        )
    metrics = throughput(requests, counts, wall_s)
    metrics.update(
        model_load_s=startup_s,
        num_batches=len(batches),
        generated_tokens=sum(len(b) * max(r.output_len for r in b) for b in batches),
        padded_prompt_tokens=sum(len(b) * max(len(r.input_ids) for r in b) for b in batches),
        peak_gpu_memory_gib=peak_memory_gib(device),
    )
    result = {
        "benchmark": "bench_hf_peft",
        **environment(device, {"peft": peft.__version__}),
        "config": {
            **vars(args),
            "resolved_device": device,
            "resolved_dtype": dtype,
            "random_weights": random_weights(args),
            "model_type": config.get("model_type"),
            "adapters": sorted(adapters),
            "adapter_dtype": dtype,
        },
        "workload": describe_workload(requests),
        "results": metrics,
    }
    if args.record_outputs:
        result["outputs"] = [
            {"lora_name": r.lora_name, "prompt_len": len(r.input_ids), "output_ids": o}
            for r, o in zip(requests, outputs)
        ]
    return result


def report(result: dict[str, Any]) -> None:
    m, c = result["results"], result["config"]
    rows = throughput_rows(m) + [
        ("batches", m["num_batches"]),
        ("generated tokens (incl. waste)", m["generated_tokens"]),
    ]
    if m["peak_gpu_memory_gib"] is not None:
        rows.append(("peak GPU memory (GiB)", m["peak_gpu_memory_gib"]))
    lora = (
        "no LoRA"
        if c["no_lora"]
        else (f"{c['num_adapters']} adapters r{c['lora_rank']} {c['lora_request_distribution']}")
    )
    print_table(
        f"transformers + PEFT, batch {c['batch_size']}: {result['device']}, {c['resolved_dtype']}, {lora}", rows
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    result = run(args)
    report(result)
    return finish(result, args.output_file)


if __name__ == "__main__":
    main()
