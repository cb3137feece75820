"""No surprises at run time, on a CUDA GPU: after the warm-up, serving a random workload compiles no
new variant of any loraserve Triton kernel; and with default flags the KV cache, sized after the
profile run, leaves room for a step of the whole chunked-prefill budget. Skipped without a GPU."""

from __future__ import annotations

import gc
import random
import threading

import pytest
import torch
from lora_utils import make_peft_adapter, tiny_llama_config, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ADAPTERS = {  # name: (rank, targets)
    "r8_all": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "r16_attn": (16, ["q_proj", "v_proj", "o_proj"]),
    "r4_mlp": (4, ["gate_proj", "up_proj", "down_proj"]),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("warmup")
    config = tiny_llama_config(max_position_embeddings=1024)
    base = tiny_model(config, seed=0)
    base.save_pretrained(root / "base")
    paths = {
        name: str(make_peft_adapter(base, root / name, r=r, lora_alpha=2 * r, target_modules=t, seed=i))
        for i, (name, (r, t)) in enumerate(ADAPTERS.items())
    }
    return str(root / "base"), paths


def random_wave(rng: random.Random, max_requests: int) -> dict:
    n = rng.randint(1, max_requests)
    names = [None, *ADAPTERS]
    sampling = []
    for _ in range(n):
        if rng.random() < 0.5:
            sampling.append({"max_new_tokens": rng.randint(1, 24), "temperature": 0, "ignore_eos": True})
        else:
            sampling.append(
                {"max_new_tokens": rng.randint(1, 24), "temperature": 0.8, "top_p": 0.9, "ignore_eos": True}
            )
    return {
        "input_ids": [[rng.randrange(256) for _ in range(rng.randint(1, 300))] for _ in range(n)],
        "sampling_params": sampling,
        "lora_path": [rng.choice(names) if rng.random() < 0.7 else None for _ in range(n)],
    }


@pytest.mark.parametrize("backend", ["csgmv", "triton"])
def test_serving_after_the_warm_up_compiles_no_new_kernel_variant(family, backend):
    from loraserve.engine.engine import Engine
    from loraserve.runner.warmup import compiled_variants
    from loraserve.settings import make_settings

    base, paths = family
    engine = Engine(
        make_settings(
            model_path=base,
            device="cuda",
            dtype="bfloat16",
            max_total_tokens=32768,
            max_running_requests=24,
            max_prefill_tokens=2048,
            chunked_prefill_size=256,  # prompts up to 300 tokens: some are chunked
            cuda_graph_max_bs=8,  # decode batches of 9 to 24 run eagerly
            lora_backend=backend,
            max_loras_per_batch=3,  # 3 adapters and the base model: evictions too
            lora_paths=[f"{n}={p}" for n, p in paths.items()],
        )
    )
    try:
        warmed = compiled_variants()
        assert sum(warmed.values()) > 0, "no Triton kernel was compiled: is the GPU path in use?"
        rng = random.Random(18)
        errors: list[BaseException] = []

        def client(seed: int) -> None:
            local = random.Random(seed)
            try:
                for _ in range(6):
                    engine.generate(**random_wave(local, 24))
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(rng.randrange(1 << 30),)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        engine.generate(**random_wave(rng, 24))
        after = compiled_variants()
        grown = {k: (warmed.get(k, 0), v) for k, v in after.items() if v != warmed.get(k, 0)}
        assert not grown, f"kernels compiled at run time (variants before, after): {grown}"
    finally:
        engine.shutdown()


@pytest.mark.parametrize("lora", [False, True])
def test_default_flags_leave_room_for_the_whole_chunked_prefill_budget(tmp_path, lora):
    """The KV cache takes most of the GPU, yet a step of --max-prefill-tokens tokens (64 prompts of
    256, each sampling) runs without running out of memory."""
    from loraserve.engine.engine import Engine
    from loraserve.settings import make_settings

    config = tiny_llama_config(
        hidden_size=1024,
        intermediate_size=4096,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    tiny_model(config, seed=0).to(torch.bfloat16).save_pretrained(tmp_path)
    extra = {"enable_lora": True, "max_lora_rank": 16} if lora else {}
    gc.collect()
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    engine = Engine(make_settings(model_path=str(tmp_path), device="cuda", **extra))
    try:
        kv_bytes = sum(t.numel() * t.element_size() for t in engine.kv.k + engine.kv.v)
        assert kv_bytes > 0.5 * free  # the cache really took the memory the step must fit beside
        assert engine.scheduler.step_tokens == 16384
        gen = torch.Generator().manual_seed(5)
        prompts = torch.randint(0, 32000, (64, 256), generator=gen).tolist()
        results = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": 2, "temperature": 0})
        assert all(len(r["output_ids"]) == 2 for r in results)
        assert engine.step_stats["prefill"][0] >= 1
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        torch.cuda.empty_cache()
