"""Helpers for the HTTP tests: a tiny random Llama that uses the embedded SmolLM2 tokenizer (so text
prompts and chat work), seeded PEFT adapters for it, and a real uvicorn server on a free loopback
port running in a background thread of the test process (so tests can compare with the engine's
Python API and look at its KV cache)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lora_utils import make_peft_adapter, tiny_llama_config, tiny_model

from loraserve.engine.engine import Engine
from loraserve.http.server import ServerThread
from loraserve.settings import Settings, make_settings

# name: (rank, alpha, target modules, seed)
ADAPTERS = {
    "alpha": (4, 8, ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 11),
    "beta": (8, 8, ["q_proj", "k_proj", "v_proj", "down_proj"], 12),
    "gamma": (3, 6, ["q_proj", "up_proj"], 13),
}
GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}


@dataclass(frozen=True)
class Assets:
    base: str
    adapters: dict[str, str]


@functools.cache
def assets() -> Assets:
    """Built once per test process: the base model directory (with tokenizer) and adapter directories."""
    from transformers import AutoTokenizer

    from loraserve.embedded import embedded_model_dir

    root = Path(tempfile.mkdtemp(prefix="loraserve-http-"))
    atexit.register(shutil.rmtree, root, True)
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    config = tiny_llama_config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
    )
    base = tiny_model(config, seed=0)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapters = {}
    for name, (r, alpha, targets, seed) in ADAPTERS.items():
        adapters[name] = str(
            make_peft_adapter(
                base, root / name, r=r, lora_alpha=alpha, target_modules=targets, seed=seed, init_scale=0.5
            )
        )
    return Assets(str(root / "base"), adapters)


def make_engine(adapters: list[str] = ("alpha", "beta"), **kwargs) -> Engine:
    return Engine(engine_settings(adapters, **kwargs))


def engine_settings(adapters: list[str] = ("alpha", "beta"), **kwargs) -> Settings:
    """The settings of :func:`make_engine` (also for an engine in a process of its own)."""
    a = assets()
    values = dict(
        model_path=a.base,
        device="cpu",
        max_total_tokens=4096,
        enable_lora=True,
        max_lora_rank=8,
        lora_target_modules=["all"],
        max_loras_per_batch=4,
        served_model_name="tiny",
    )
    if adapters:
        values["lora_paths"] = [f"{n}={a.adapters[n]}" for n in adapters]
    values.update(kwargs)
    return make_settings(**values)


class RunningServer(ServerThread):
    """The engine served on 127.0.0.1:<free port> in a daemon thread of the test process."""

    def __init__(self, engine: Engine, grace_s: float | None = 5.0):
        super().__init__(engine, engine.settings, engine.plugins, grace_s=grace_s)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
