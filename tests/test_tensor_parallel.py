"""Tensor-parallel sharding of the Llama model and of the LoRA slot pool: 2 CPU processes over gloo.

Each rank builds its shard of the model (``LlamaForCausalLM(..., tp=TensorParallel)``) and, for
LoRA, a ``LoRAManager`` whose pool holds the rank's part of every (full) adapter, then runs the same
steps the model runner runs: a mixed prefill of several sequences, then greedy decode steps, through
the paged KV cache and SDPA attention. The two ranks run in one ``torch.multiprocessing.spawn`` for
the whole module. Oracles: the same steps at one rank (``tp=None``, the unsharded code path),
transformers for the base model, PEFT's per-row adapters for LoRA. Construction errors and the pool's
slicing are checked in this process with a ``TensorParallel`` that has no process group (shapes
need none; only the collectives do).
"""

from __future__ import annotations

import copy
import datetime
import os
import socket
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from lora_utils import make_peft_adapter, tiny_llama_config
from test_models import make_hf
from transformers import Qwen2Config

from loraserve.distributed import TensorParallel
from loraserve.errors import ConfigError
from loraserve.lora.pools import GpuAdapterPool
from loraserve.models.dtypes import runs_triton
from loraserve.models.llama import LlamaForCausalLM
from loraserve.runner.model_runner import ModelRunner
from loraserve.sched.kv_cache import KVCache
from loraserve.sched.request import Request
from loraserve.sched.scheduler import ScheduledChunk

TP = 2
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_RANK = 8
BASE_PROMPT_LENS = (5, 1, 9)
LORA_ROWS = (("a", 5), (None, 3), ("b", 6), ("a", 1))  # (adapter, prompt length): two adapters and base rows
DECODE_STEPS = 2


def base_configs() -> dict:
    """GQA Llama; Qwen2 with tied embeddings and qkv bias; Llama with o_proj and down_proj biases."""
    small = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=256,
        max_position_embeddings=256,
    )
    return {
        "llama_gqa": tiny_llama_config(),
        "qwen2_tied": Qwen2Config(**small, num_key_value_heads=2, tie_word_embeddings=True),
        "llama_bias": tiny_llama_config(attention_bias=True, mlp_bias=True, num_key_value_heads=4),
    }


# -- driving a model as the model runner does ---------------------------------------------------


def prompt_ids(lengths, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]


@torch.no_grad()
def run_steps(model, prompts: list[list[int]], adapters: list | None = None, lora=None) -> dict:
    """Prefill every prompt in one step, then ``DECODE_STEPS`` greedy decode steps, through a paged
    KV cache of 4-token blocks and :class:`ModelRunner`. Returns each step's float32 logits
    (``[step, row, vocab]``) and each row's generated tokens."""
    kv = KVCache(
        model.num_layers,
        model.num_kv_heads,
        model.head_dim,
        num_blocks=32,
        block_size=4,
        dtype=model.dtype,
        device="cpu",
    )
    runner = ModelRunner(model, kv, torch.device("cpu"), prepare_lora=lora.prepare if lora is not None else None)
    adapters = adapters or [None] * len(prompts)
    requests = [Request(f"r{i}", list(p), params=None, adapter=a) for i, (p, a) in enumerate(zip(prompts, adapters))]
    if lora is not None:
        lora.acquire(requests)
        for i, r in enumerate(requests):
            if lora.can_join(r, requests[:i]) is not True:
                raise RuntimeError(f"request {i} (adapter {r.adapter}) cannot join the step")
    for r in requests:
        r.blocks = kv.allocator.allocate(kv.allocator.blocks_for(r.num_tokens + DECODE_STEPS))
    chunks = [ScheduledChunk(r, 0, r.num_tokens) for r in requests]
    steps = []
    for _ in range(DECODE_STEPS + 1):
        logits = runner.forward(chunks)
        steps.append(logits.clone())
        for r, c, row in zip(requests, chunks, logits):
            r.num_computed = c.start + c.num_tokens
            r.output_ids.append(int(row.argmax()))
        chunks = [ScheduledChunk(r, r.num_computed, 1) for r in requests]
    return {"logits": torch.stack(steps), "tokens": [r.output_ids for r in requests]}


def lora_manager(model, adapters: dict[str, str], backend: str = "torch"):
    """A LoRA manager over ``model`` with the adapters loaded (engine thread = this thread)."""
    from loraserve.lora.manager import LoRAManager
    from loraserve.plugin_manager import PluginManager
    from loraserve.settings import make_settings

    settings = make_settings(
        device="cpu",
        enable_lora=True,
        lora_backend="torch",
        max_loras_per_batch=3,
        max_lora_rank=MAX_RANK,
        lora_target_modules=LORA_TARGETS,
    )
    plugins = PluginManager().load()
    if backend == "torch":
        kernels = plugins.backends.create("torch", settings, "cpu")
    else:  # the Triton kernels under the interpreter, with the shrink forced into the base GEMM and,
        # for "csgmv_epilogue", the expands the model's consumers can take left to them
        from loraserve.plugins.backend_csgmv.backend import ChunkedSgmvLoRABackend

        kernels = ChunkedSgmvLoRABackend(
            "cpu", tuning={"shrink_in_gemm": True, "epilogue": backend == "csgmv_epilogue"}
        )
    manager = LoRAManager(
        settings,
        plugins,
        model,
        kernels,
        MAX_RANK,
        LORA_TARGETS,
        torch.device("cpu"),
        torch.float32,
        run_in_engine=lambda fn: fn(),
    )
    for name, path in adapters.items():
        manager.load_adapter(name, path)
    return manager


def run_cases(cases: dict, tp: TensorParallel | None) -> dict:
    """Every scenario at one rank of ``tp`` (None: unsharded); the same code for both sides."""
    from loraserve.model_loader import init_dummy_weights

    out = {}
    for name, (config, weights_path) in cases["base"].items():
        model = LlamaForCausalLM(config, tp=tp)
        model.load_weights(torch.load(weights_path).items())
        out[name] = run_steps(model, prompt_ids(BASE_PROMPT_LENS, seed=1))
    dummy = LlamaForCausalLM(cases["base"]["llama_gqa"][0], tp=tp)
    init_dummy_weights(dummy, seed=7, std=0.3)
    out["dummy"] = run_steps(dummy, prompt_ids(BASE_PROMPT_LENS, seed=1))
    config, weights_path = cases["base"]["llama_gqa"]
    rows = [a for a, _ in LORA_ROWS]
    for backend in ("torch", "csgmv", "csgmv_epilogue") if runs_triton(torch.device("cpu")) else ("torch",):
        model = LlamaForCausalLM(config, tp=tp)
        model.load_weights(torch.load(weights_path).items())
        manager = lora_manager(model, cases["adapters"], backend)
        # the epilogue needs the consumers' kernels, which run on CPU only when asked (interpreter)
        fused_ops = {"LORASERVE_FUSED_OPS": "1"} if backend == "csgmv_epilogue" else {}
        with mock.patch.dict(os.environ, fused_ops):
            out[f"lora_{backend}"] = run_steps(model, prompt_ids([n for _, n in LORA_ROWS], seed=2), rows, manager)
        manager.check_integrity()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, size: int, port: int, cases: dict, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks on a two-core machine
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        tp = TensorParallel.from_group()
        if (tp.rank, tp.size) != (rank, size):
            raise RuntimeError(f"TensorParallel.from_group gave {tp}, expected rank {rank} of {size}")
        torch.save(run_cases(cases, tp), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tp")
    base, hf_models = {}, {}
    for i, (name, config) in enumerate(base_configs().items()):
        hf = make_hf(config, seed=10 + i)
        path = root / f"{name}.pt"
        torch.save(dict(hf.state_dict()), path)
        base[name], hf_models[name] = (config, str(path)), hf
    hf = hf_models["llama_gqa"]
    adapters = {  # "a" at the slot rank (one copy per tensor), "b" below it (padding zeroed)
        "a": str(
            make_peft_adapter(
                hf, root / "a", r=MAX_RANK, lora_alpha=16, target_modules=LORA_TARGETS, seed=21, init_scale=0.3
            )
        ),
        "b": str(
            make_peft_adapter(
                hf,
                root / "b",
                r=3,
                lora_alpha=6,
                target_modules=LORA_TARGETS,
                seed=22,
                init_scale=0.3,
                rank_pattern={"down_proj": 5},
            )
        ),
    }
    return {"base": base, "adapters": adapters, "hf": hf_models}


@pytest.fixture(scope="module")
def results(cases, tmp_path_factory) -> dict:
    """``{"tp1": ..., 0: ..., 1: ...}``: every scenario unsharded here and at each rank of a 2-process group."""
    import torch.multiprocessing as mp

    out_dir = tmp_path_factory.mktemp("tp-out")
    shared = {"base": cases["base"], "adapters": cases["adapters"]}
    mp.spawn(_rank_main, args=(TP, _free_port(), shared, str(out_dir)), nprocs=TP, join=True)
    got = {rank: torch.load(out_dir / f"rank{rank}.pt") for rank in range(TP)}
    got["tp1"] = run_cases(shared, None)
    return got


def assert_same_run(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert got["tokens"] == want["tokens"]
    torch.testing.assert_close(got["logits"], want["logits"], atol=atol, rtol=1e-5)


def oracle_logits(model, sequences: list[list[int]], prompt_lens, adapters=None) -> torch.Tensor:
    """``[step, row, vocab]`` logits of a transformers/PEFT model over each whole sequence, at the
    positions our steps sampled from (each prompt's last, then every decoded token but the last)."""
    rows = []
    with torch.no_grad():
        for i, (seq, n) in enumerate(zip(sequences, prompt_lens)):
            kwargs = {} if adapters is None else {"adapter_names": [adapters[i] or "__base__"]}
            logits = model(input_ids=torch.tensor([seq]), **kwargs).logits[0].float()
            rows.append(logits[n - 1 : n + DECODE_STEPS])
    return torch.stack(rows, dim=1)


# -- the model --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(base_configs()))
def test_tp2_logits_match_tp1_and_transformers(results, cases, name):
    single = results["tp1"][name]
    for rank in range(TP):
        assert_same_run(results[rank][name], single)  # every rank gets the whole vocabulary's logits
    prompts = prompt_ids(BASE_PROMPT_LENS, seed=1)
    sequences = [p + t[:DECODE_STEPS] for p, t in zip(prompts, results[0][name]["tokens"])]
    want = oracle_logits(cases["hf"][name], sequences, BASE_PROMPT_LENS)
    torch.testing.assert_close(results[0][name]["logits"], want, atol=1e-4, rtol=1e-4)


def test_tp2_dummy_weights_are_the_single_rank_model(results):
    """``--load-format dummy`` draws the unsharded model and keeps each rank's part: tp 1 and tp 2
    run one model."""
    assert results["tp1"]["dummy"]["logits"].std() > 0.1  # weights large enough to tell models apart
    for rank in range(TP):
        assert_same_run(results[rank]["dummy"], results["tp1"]["dummy"])


@pytest.mark.parametrize("backend", ["torch", "csgmv", "csgmv_epilogue"])
def test_tp2_mixed_lora_batch_matches_tp1_and_peft(results, cases, backend):
    """Two adapters and base rows in one batch; csgmv takes the shrink from the base GEMM (A rows
    appended to each layer's local weight); with the epilogue, SiLU-and-mul adds gate_up's local
    delta (column-parallel) and the norms o_proj's and down_proj's at tp 1, while at tp 2 those
    row-parallel deltas stay before the all-reduce."""
    from peft import PeftModel

    key = f"lora_{backend}"
    if key not in results["tp1"]:
        pytest.skip("the Triton kernels run on CPU only under TRITON_INTERPRET=1")
    single = results["tp1"][key]
    for rank in range(TP):
        assert_same_run(results[rank][key], single)
    adapters = [a for a, _ in LORA_ROWS]
    lens = [n for _, n in LORA_ROWS]
    prompts = prompt_ids(lens, seed=2)
    sequences = [p + t[:DECODE_STEPS] for p, t in zip(prompts, results[0][key]["tokens"])]
    peft = PeftModel.from_pretrained(copy.deepcopy(cases["hf"]["llama_gqa"]), cases["adapters"]["a"], adapter_name="a")
    peft.load_adapter(cases["adapters"]["b"], adapter_name="b")
    want = oracle_logits(peft.eval(), sequences, lens, adapters)
    base = oracle_logits(cases["hf"]["llama_gqa"], sequences, lens)
    torch.testing.assert_close(results[0][key]["logits"], want, atol=1e-4, rtol=1e-4)
    for i, adapter in enumerate(adapters):  # the adapters really change the rows they serve
        assert (adapter is None) == torch.allclose(want[:, i], base[:, i], atol=1e-3)


# -- in this process: construction and slicing ----------------------------------------------------


@pytest.mark.parametrize(
    "overrides,size,message",
    [
        ({}, 4, "num_key_value_heads 2 is not divisible by --tp-size 4"),
        ({}, 3, "num_attention_heads 4 is not divisible by --tp-size 3"),
        ({"intermediate_size": 129}, 2, "intermediate_size 129 is not divisible by --tp-size 2"),
        ({"vocab_size": 255}, 2, "vocab_size 255 is not divisible by --tp-size 2"),
    ],
)
def test_sizes_the_tp_size_does_not_divide_are_named(overrides, size, message):
    config = tiny_llama_config(**overrides)
    with pytest.raises(ConfigError, match=message):
        LlamaForCausalLM(config, tp=TensorParallel(0, size))
    LlamaForCausalLM(config)  # the same config is fine on one rank


def test_tensor_parallel_shapes_and_single_rank_no_ops():
    tp = TensorParallel(1, 4)
    assert tp.shard_range(12, "x") == (3, 6) and tp.shard_size(12, "x") == 3
    single = TensorParallel()
    x = torch.randn(3, 5)
    assert single.all_reduce(x) is x and single.all_gather(x) is x and single.group is None
    with pytest.raises(ValueError, match="rank 4 must lie in"):
        TensorParallel(4, 4)
    with pytest.raises(ConfigError, match="--tp-size 0"):
        TensorParallel(0, 0)


def test_rank_models_expose_local_shapes():
    config = tiny_llama_config()  # 4 heads, 2 kv heads of 16, intermediate 128, vocab 256
    model = LlamaForCausalLM(config, tp=TensorParallel(1, 2))
    assert (model.num_heads, model.num_kv_heads, model.q_size, model.kv_size, model.intermediate_size) == (
        2,
        1,
        32,
        16,
        64,
    )
    assert (model.vocab_size, model.hidden_size) == (256, 64)
    targets = {name: m for i, name, m in model.lora_targets() if i == 0}
    assert targets["qkv_proj"].output_offsets == (0, 32, 48, 64) and targets["qkv_proj"].shard_spec == ("column", 1, 2)
    assert targets["o_proj"].input_size == 32 and targets["o_proj"].shard_spec == ("row", 1, 2)
    assert targets["gate_up_proj"].output_offsets == (0, 64, 128)
    assert targets["down_proj"].input_size == 64 and targets["down_proj"].output_offsets == (0, 64)
    assert model.model.embed_tokens.weight.shape == (128, 64) and model.lm_head.weight.shape == (128, 64)
    assert all(m.shard_spec is None for _, _, m in LlamaForCausalLM(config).lora_targets())


def test_lora_on_embeddings_is_refused_with_tp(cases):
    model = LlamaForCausalLM(cases["base"]["llama_gqa"][0], tp=TensorParallel(0, 2))
    from loraserve.lora.manager import LoRAManager
    from loraserve.plugin_manager import PluginManager
    from loraserve.settings import make_settings

    settings = make_settings(device="cpu", enable_lora=True, max_lora_rank=4)
    plugins = PluginManager().load()
    with pytest.raises(ConfigError, match="embed_tokens/lm_head is not supported with --tp-size 2"):
        LoRAManager(
            settings,
            plugins,
            model,
            plugins.backends.create("torch", settings, "cpu"),
            4,
            ["q_proj", "embed_tokens"],
            torch.device("cpu"),
            torch.float32,
            run_in_engine=lambda fn: fn(),
        )


@pytest.mark.parametrize("rank", [MAX_RANK, 3])
@pytest.mark.parametrize("appended", [False, True])
def test_pool_shards_reassemble_the_single_rank_pool(rank, appended, gen):
    """Each rank's slot holds its part of a full adapter: qkv/gate_up B cut per slice (q, k and v by
    heads), A whole; o/down A cut by input columns, B whole. Concatenated in rank order, the parts
    are the one-rank pool's buffers, also with A kept in rows appended to the layers' weights."""
    from loraserve.lora.eviction import OrderedEvictionPolicy

    config = tiny_llama_config()
    full_model = LlamaForCausalLM(config)
    weights = {}
    for layer, name, module in full_model.lora_targets():
        n = len(module.output_sizes)
        weights[(layer, name)] = (
            torch.randn(n * rank, module.input_size, generator=gen),
            torch.randn(module.output_size, rank, generator=gen),
        )
    adapter = SimpleNamespace(weights=weights, rank=rank, scaling=0.5)

    def pool_of(model):
        modules, layers, shard = {}, {}, {}
        for layer, name, module in model.lora_targets():
            modules[name] = (module.input_size, module.output_offsets)
            layers[(layer, name)] = module
            shard[name] = module.shard_spec
        storage = (lambda layer, name, rows: layers[(layer, name)].append_rows(rows)) if appended else None
        pool = GpuAdapterPool(
            2,
            MAX_RANK,
            model.num_layers,
            modules,
            {},
            torch.float32,
            torch.device("cpu"),
            OrderedEvictionPolicy(),
            a_storage=storage,
            shard=shard,
        )
        assert pool.write(1, adapter) > 0
        if appended:  # A lives in the rows after each layer's own (local) weight
            for key, module in layers.items():
                assert pool.A[key].data_ptr() == module._weight_ext[module.output_size :].data_ptr()
        return pool

    full = pool_of(full_model)
    parts = [pool_of(LlamaForCausalLM(config, tp=TensorParallel(r, TP))) for r in range(TP)]
    for (layer, name), A in full.A.items():
        A, B = A[1], full.B[(layer, name)][1]
        As, Bs = [p.A[(layer, name)][1] for p in parts], [p.B[(layer, name)][1] for p in parts]
        if name in ("o_proj", "down_proj"):
            assert As[0].shape[-1] == A.shape[-1] // TP
            assert torch.equal(torch.cat(As, dim=-1), A) and all(torch.equal(b, B) for b in Bs)
        else:
            local = parts[0].offsets[name]
            assert local[-1] == full.offsets[name][-1] // TP
            pieces = [b[local[i] : local[i + 1]] for i in range(len(local) - 1) for b in Bs]
            assert torch.equal(torch.cat(pieces), B) and all(torch.equal(a, A) for a in As)
