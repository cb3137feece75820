"""Random PEFT LoRA adapters for a base model config, written without building the base model.

Benchmarks need many adapters of a real model's shape (Llama-3.1-8B: 32 layers, hidden 4096), and
``peft.get_peft_model`` would first build the 8B base model on the CPU. This module computes every
targeted module's ``(in_features, out_features)`` from the config alone (hidden_size,
intermediate_size, num_attention_heads, num_key_value_heads, head_dim) and writes what
``save_pretrained`` writes: ``adapter_config.json`` and ``adapter_model.safetensors`` with tensors
named ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` (``[r, in]``) and
``...lora_B.weight`` (``[out, r]``). Both A and B are random (PEFT starts B at zero, which would
make every adapter the base model): A is normal with variance ``1 / in`` and B is scaled so that,
after PEFT's ``lora_alpha / r`` scaling, a module's delta has a standard deviation of about
``delta_std`` per output for an input of unit RMS. The same arguments (and seed) always give the
same tensors, so two benchmark scripts that call :func:`write_random_adapters` serve the same
adapters.

    python benchmarks/random_adapters.py --config-dir benchmarks/configs/llama-3.1-8b --out /tmp/adapters \\
        --num-adapters 8 --rank 16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

#: the seven projections of a Llama-family layer, in PEFT's names
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUBLAYER = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MANIFEST_NAME = "random_adapters.json"
DEFAULT_DELTA_STD = 0.05
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_config(config_or_dir: Any) -> dict[str, Any]:
    """The base model config as a dict: from a directory (its config.json), a config.json path, a
    transformers ``PretrainedConfig`` or a dict. Multimodal wrappers give their ``text_config``."""
    if isinstance(config_or_dir, (str, Path)):
        path = Path(config_or_dir)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}; pass a model directory or its config.json")
        data = json.loads(path.read_text())
    elif isinstance(config_or_dir, dict):
        data = dict(config_or_dir)
    else:
        data = config_or_dir.to_dict()
    text = data.get("text_config")
    if isinstance(text, dict) and data.get("hidden_size") is None:
        return text
    return data


def module_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """``(in_features, out_features)`` of each of the seven projections of one layer."""
    missing = [
        k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers") if not config.get(k)
    ]
    if missing:
        raise ValueError(f"the config has no {', '.join(missing)}; a Llama-family config is needed")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    q = heads * head_dim
    kv = (config.get("num_key_value_heads") or heads) * head_dim
    inter = config["intermediate_size"]
    return {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def adapter_bytes(
    config_or_dir: Any, rank: int, target_modules: Sequence[str] = ALL_TARGETS, dtype: str = "float32"
) -> int:
    """Size of one adapter's weights file (tensor data only)."""
    config = load_config(config_or_dir)
    shapes = module_shapes(config)
    per_layer = sum(rank * (shapes[m][0] + shapes[m][1]) for m in target_modules)
    return per_layer * config["num_hidden_layers"] * DTYPES[dtype].itemsize


def adapter_config(
    config: dict[str, Any], rank: int, alpha: float, target_modules: Sequence[str], dora: bool = False
) -> dict:
    """The ``adapter_config.json`` PEFT's ``save_pretrained`` writes for a LoRA (or DoRA) adapter."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": config.get("_name_or_path") or None,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": dora,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
        "revision": None,
    }


def random_adapter_tensors(
    config: dict[str, Any],
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    seed: int,
    dtype: str = "float32",
    delta_std: float = DEFAULT_DELTA_STD,
    dora: bool = False,
) -> dict[str, torch.Tensor]:
    """Every lora_A / lora_B tensor of one adapter, named as PEFT names them (see the module docstring);
    with ``dora`` also each module's ``lora_magnitude_vector`` (random, in [0.5, 1.5): any positive
    magnitudes make a valid DoRA adapter)."""
    unknown = [m for m in target_modules if m not in ALL_TARGETS]
    if unknown:
        raise ValueError(f"unknown target module(s) {', '.join(unknown)}; choose from {', '.join(ALL_TARGETS)}")
    if rank < 1:
        raise ValueError(f"rank must be at least 1, not {rank}")
    shapes = module_shapes(config)
    scaling = alpha / rank
    b_std = delta_std / (scaling * math.sqrt(rank))
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(config["num_hidden_layers"]):
        for module in ALL_TARGETS:  # a fixed order, so the draws do not depend on the caller's order
            if module not in target_modules:
                continue
            in_f, out_f = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{SUBLAYER[module]}.{module}"
            A = torch.randn(rank, in_f, generator=gen).mul_(1.0 / math.sqrt(in_f))
            B = torch.randn(out_f, rank, generator=gen).mul_(b_std)
            tensors[f"{prefix}.lora_A.weight"] = A.to(DTYPES[dtype])
            tensors[f"{prefix}.lora_B.weight"] = B.to(DTYPES[dtype])
            if dora:
                tensors[f"{prefix}.lora_magnitude_vector"] = (torch.rand(out_f, generator=gen) + 0.5).to(DTYPES[dtype])
    return tensors


def _alpha(rank: int, alpha: float | None) -> float | int:
    """``lora_alpha``, ``2 * rank`` by default; an integer when it is one, as PEFT's configs write it."""
    value = 2 * rank if alpha is None else alpha
    return int(value) if float(value).is_integer() else float(value)


def write_random_adapter(
    config_or_dir: Any,
    out_dir: str | Path,
    *,
    rank: int,
    alpha: float | None = None,
    target_modules: Sequence[str] = ALL_TARGETS,
    seed: int = 0,
    dtype: str = "float32",
    delta_std: float = DEFAULT_DELTA_STD,
    dora: bool = False,
) -> Path:
    """Write one random adapter to ``out_dir``; ``alpha`` defaults to ``2 * rank``. Returns ``out_dir``."""
    from safetensors.torch import save_file

    config = load_config(config_or_dir)
    alpha = _alpha(rank, alpha)
    tensors = random_adapter_tensors(config, rank, alpha, target_modules, seed, dtype, delta_std, dora)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(adapter_config(config, rank, alpha, target_modules, dora), indent=2))
    return out


def mixed_ranks(rank: int | Sequence[int], num_adapters: int, seed: int = 0) -> list[int]:
    """Each adapter's rank: ``rank`` for all, or drawn uniformly from a list of ranks with ``seed``."""
    if isinstance(rank, int):
        return [rank] * num_adapters
    choices = [int(r) for r in rank]
    if not choices or min(choices) < 1:
        raise ValueError(f"ranks must be integers >= 1, got {list(rank)!r}")
    rng = random.Random(f"ranks {seed}")
    return [rng.choice(choices) for _ in range(num_adapters)]


def write_random_adapters(
    config_or_dir: Any,
    out_dir: str | Path,
    num_adapters: int,
    *,
    rank: int | Sequence[int],
    alpha: float | None = None,
    target_modules: Sequence[str] = ALL_TARGETS,
    seed: int = 0,
    dtype: str = "float32",
    delta_std: float = DEFAULT_DELTA_STD,
    prefix: str = "lora",
    dora: bool = False,
) -> dict[str, Path]:
    """Write ``num_adapters`` random adapters to ``out_dir/{prefix}{i}``; returns ``{name: directory}``.

    ``rank``: one rank for all, or several: adapter ``i``'s rank is then :func:`mixed_ranks`' ``i``-th
    (drawn from them, seeded), its alpha twice its rank unless ``alpha`` is given.
    Adapter ``i`` is drawn from seed ``seed * 1_000_003 + i``. A ``random_adapters.json`` manifest
    records the arguments; when ``out_dir`` already holds adapters written with the same ones
    (same config shape included), they are reused instead of written again.
    """
    config = load_config(config_or_dir)
    targets = [m for m in ALL_TARGETS if m in target_modules]
    if len(targets) != len(set(target_modules)):
        unknown = sorted(set(target_modules) - set(ALL_TARGETS))
        raise ValueError(f"unknown target module(s) {', '.join(unknown)}; choose from {', '.join(ALL_TARGETS)}")
    ranks = mixed_ranks(rank, num_adapters, seed)
    out = Path(out_dir)
    names = [f"{prefix}{i}" for i in range(num_adapters)]
    manifest = {
        "shape": {
            k: config.get(k)
            for k in (
                "num_hidden_layers",
                "hidden_size",
                "intermediate_size",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
            )
        },
        "rank": rank if isinstance(rank, int) else list(rank),
        "alpha": alpha,
        "target_modules": targets,
        "seed": seed,
        "dtype": dtype,
        "delta_std": delta_std,
        "dora": dora,
        "names": names,
    }
    manifest_path = out / MANIFEST_NAME
    paths = {name: out / name for name in names}
    if (
        manifest_path.is_file()
        and json.loads(manifest_path.read_text()) == manifest
        and all((p / WEIGHTS_NAME).is_file() and (p / CONFIG_NAME).is_file() for p in paths.values())
    ):
        return paths
    manifest_path.unlink(missing_ok=True)  # a half-written set must never look complete

    def write(i: int, path: Path) -> Path:
        return write_random_adapter(
            config,
            path,
            rank=ranks[i],
            alpha=alpha,
            target_modules=targets,
            seed=seed * 1_000_003 + i,
            dtype=dtype,
            delta_std=delta_std,
            dora=dora,
        )

    # each adapter draws from its own generator, so threads change nothing in the files; torch's
    # kernels and the file writes release the GIL (2,000 adapters of a 1B model: 24 GiB)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(write, range(num_adapters), paths.values()))
    out.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-dir", required=True, help="model directory (or config.json) to fit")
    parser.add_argument("--out", required=True, help="directory to write the adapters to")
    parser.add_argument("--num-adapters", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: 2 * rank)")
    parser.add_argument("--target-modules", nargs="+", default=list(ALL_TARGETS), choices=ALL_TARGETS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument(
        "--delta-std",
        type=float,
        default=DEFAULT_DELTA_STD,
        help="std of each module's delta per output, for an input of unit RMS",
    )
    args = parser.parse_args(argv)
    size = adapter_bytes(args.config_dir, args.rank, args.target_modules, args.dtype)
    print(f"writing {args.num_adapters} adapter(s) of {size / 2**20:.1f} MiB each to {args.out}")
    paths = write_random_adapters(
        args.config_dir,
        args.out,
        args.num_adapters,
        rank=args.rank,
        alpha=args.alpha,
        target_modules=args.target_modules,
        seed=args.seed,
        dtype=args.dtype,
        delta_std=args.delta_std,
    )
    for name, path in paths.items():
        print(f"{name}={path}")
    return paths


if __name__ == "__main__":
    main()
