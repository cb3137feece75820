"""Multi-LoRA serving against PEFT (the oracle): mixed batches of several adapters and base rows give
PEFT's mixed-batch greedy tokens; eviction, pinning, unload and reload keep every output correct."""

from __future__ import annotations

import threading

import pytest
import torch
from lora_utils import make_peft_adapter, tiny_llama_config, tiny_model
from peft import PeftModel

from loraserve.engine.engine import Engine
from loraserve.errors import UserError
from loraserve.settings import make_settings

ADAPTERS = {
    # name: (r, alpha, targets, extra LoraConfig options)
    "rank1": (1, 4, ["q_proj", "v_proj"], {}),
    "rank3_rslora": (3, 6, ["q_proj", "k_proj", "o_proj", "down_proj"], {"use_rslora": True}),
    "patterns": (
        8,
        16,
        ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        {"rank_pattern": {"down_proj": 5}, "alpha_pattern": {"gate_proj": 3}},
    ),
    "one_layer": (4, 8, ["k_proj", "up_proj"], {"layers_to_transform": [1]}),
}
NEW = 24
GREEDY = {"max_new_tokens": NEW, "temperature": 0, "ignore_eos": True, "return_logprob": True}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tiny_model(tiny_llama_config(), seed=0)
    base.generation_config.eos_token_id = None
    return _family_case(base, tmp_path_factory.mktemp("multi-lora"), ADAPTERS, seed=10)


def _family_case(base_model, root, adapters: dict, seed: int = 30):
    """Save a base model and PEFT adapters; returns (base_dir, paths, a PEFT model with all of them)."""
    base_model.save_pretrained(root / "base")
    paths = {}
    for i, (name, (r, alpha, targets, extra)) in enumerate(adapters.items()):
        paths[name] = str(
            make_peft_adapter(
                base_model,
                root / name,
                r=r,
                lora_alpha=alpha,
                target_modules=targets,
                seed=seed + i,
                init_scale=0.3,
                **extra,
            )
        )
    names = list(paths)
    peft = PeftModel.from_pretrained(base_model, paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(paths[name], adapter_name=name)
    return str(root / "base"), paths, peft.eval()


def peft_generate(peft, prompts: list[list[int]], adapters: list[str | None]) -> tuple[list, list]:
    """PEFT's mixed-batch greedy generate (equal-length prompts: no padding)."""
    names = [a if a is not None else "__base__" for a in adapters]
    ids = torch.tensor(prompts)  # an explicit mask: token 0 in a prompt must not be taken for padding
    out = peft.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        adapter_names=names,
        max_new_tokens=NEW,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    n = len(prompts[0])
    tokens = out.sequences[:, n:].tolist()
    logprobs = [
        [torch.log_softmax(step[i].float(), -1)[t].item() for step, t in zip(out.logits, tokens[i])]
        for i in range(len(prompts))
    ]
    return tokens, logprobs


def prompts(n: int, length: int = 6, seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, length), generator=gen).tolist()


def engine_with(base: str, paths: dict, **kwargs) -> Engine:
    lora_paths = [f"{name}={path}" for name, path in paths.items()]
    options = {"device": "cpu", "max_total_tokens": 1024, **kwargs}
    return Engine(make_settings(model_path=base, lora_paths=lora_paths, **options))


def assert_matches_peft(
    results: list, expected: list, expected_lp: list, adapters: list, label: str = "", tol: float = 1e-3
) -> None:
    """Greedy tokens identical to PEFT's, log-probabilities within ``tol``, row by row."""
    for i, res in enumerate(results):
        assert res["output_ids"] == expected[i], f"{label} row {i} adapter {adapters[i]}"
        ours = [lp for lp, _ in res["meta_info"]["output_token_logprobs"]]
        assert max(abs(a - b) for a, b in zip(ours, expected_lp[i])) < tol, f"{label} row {i}"
        assert res["meta_info"]["lora_path"] == adapters[i]


def test_mixed_batch_matches_peft(setup):
    base, paths, peft = setup
    adapters = [*ADAPTERS, None, "rank1", None]
    batch = prompts(len(adapters))
    expected, expected_lp = peft_generate(peft, batch, adapters)
    engine = engine_with(base, paths)
    try:
        results = engine.generate(input_ids=batch, sampling_params=GREEDY, lora_path=adapters)
        assert_matches_peft(results, expected, expected_lp, adapters)
        assert len({tuple(r["output_ids"]) for r in results[:5]}) == 5  # the adapters really differ
        engine.lora.check_integrity()
    finally:
        engine.shutdown()


@pytest.mark.parametrize("policy", ["lru", "fifo"])
def test_two_slots_cycling_four_adapters_stays_correct(setup, policy):
    base, paths, peft = setup
    names = list(ADAPTERS)
    # 2 slots, one of which the base model may take: adapters must be evicted and brought back
    engine = engine_with(base, paths, max_loras_per_batch=2, lora_eviction_policy=policy)
    try:
        order = names + names[::-1] + [None] + names
        batch = prompts(len(order), seed=5)
        expected, _ = peft_generate(peft, batch, order)
        results = engine.generate(input_ids=batch, sampling_params=GREEDY, lora_path=order)
        assert [r["output_ids"] for r in results] == expected
        assert engine.lora.metrics["gpu_evictions"] > 0
        engine.lora.check_integrity()
    finally:
        engine.shutdown()


def test_pinned_adapter_stays_and_pin_limit(setup):
    base, paths, peft = setup
    names = list(ADAPTERS)
    pinned = f'{{"lora_name": "pinned", "lora_path": "{paths[names[0]]}", "pinned": true}}'
    engine = Engine(
        make_settings(
            model_path=base,
            device="cpu",
            max_total_tokens=1024,
            max_loras_per_batch=2,
            lora_paths=[pinned] + [f"{n}={paths[n]}" for n in names[1:]],
        )
    )
    try:
        key = engine.lora.registry.get("pinned").key
        for name in names[1:]:
            engine.generate(input_ids=prompts(1)[0], sampling_params={"max_new_tokens": 2}, lora_path=name)
            assert engine.lora.pool.slot_of(key) is not None  # never evicted
        with pytest.raises(UserError, match="at most --max-loras-per-batch - 1 = 1"):
            engine.lora.load_adapter("second-pin", paths[names[1]], pinned=True)
        assert engine.lora.registry.get("second-pin") is None  # nothing half-loaded
        engine.lora.check_integrity()
    finally:
        engine.shutdown()


def test_host_cache_eviction_reloads_transparently(setup):
    base, paths, peft = setup
    engine = engine_with(base, paths, max_loras_per_batch=2, max_loaded_loras=2)
    try:
        names = list(ADAPTERS)
        batch = prompts(len(names), seed=9)
        expected, _ = peft_generate(peft, batch, names)
        for ids, name, exp in zip(batch, names, expected):
            assert engine.generate(input_ids=ids, sampling_params=GREEDY, lora_path=name)["output_ids"] == exp
        assert len(engine.lora.host) <= 2 and engine.lora.metrics["host_reloads"] > 0
        engine.lora.check_integrity()
    finally:
        engine.shutdown()


def engine_with_an_evicted_adapter(base: str, paths: dict, before_its_read) -> tuple[Engine, str, str]:
    """An engine whose host tier (2 adapters) has evicted the first adapter at start-up, with
    ``before_its_read(source)`` run (on the reading thread) before that adapter is read again;
    returns the engine, that adapter and another."""
    engine = engine_with(base, paths, max_loras_per_batch=2, max_loaded_loras=2)
    evicted, other = list(ADAPTERS)[:2]
    assert engine.lora.host.get(engine.lora.registry.get(evicted).key) is None
    read = engine.lora.admission.read_adapter

    def intercepted(name, source):
        if name == evicted:
            before_its_read(source)
        return read(name, source)

    engine.lora.admission.read_adapter = intercepted
    return engine, evicted, other


def test_a_slow_reread_from_the_source_holds_up_no_other_request(setup):
    """An adapter evicted from the host cache is read again on a worker thread: while that read is
    stuck, requests of resident adapters still run to the end; once it returns, its request matches
    PEFT too, and the read counts as a host reload."""
    base, paths, peft = setup
    release, entered = threading.Event(), threading.Event()

    def stuck(source):
        entered.set()
        assert release.wait(30), "the test never released the read"

    engine, slow, other = engine_with_an_evicted_adapter(base, paths, stuck)
    try:
        batch = prompts(2, seed=12)
        expected, _ = peft_generate(peft, batch, [slow, other])
        box = {}
        waiter = threading.Thread(
            target=lambda: box.update(r=engine.generate(input_ids=batch[0], sampling_params=GREEDY, lora_path=slow))
        )
        waiter.start()
        assert entered.wait(30), "the evicted adapter was never read again"
        reloads = engine.lora.metrics["host_reloads"]
        done = engine.generate(input_ids=batch[1], sampling_params=GREEDY, lora_path=other)
        assert done["output_ids"] == expected[1] and waiter.is_alive() and "r" not in box
        release.set()
        waiter.join(30)
        assert box["r"]["output_ids"] == expected[0]
        assert engine.lora.metrics["host_reloads"] > reloads
        engine.lora.check_integrity()
    finally:
        release.set()
        engine.shutdown()


def test_a_failed_reread_fails_only_its_requests(setup):
    """An evicted adapter whose source can no longer be read: its waiting request finishes with an
    error that names the adapter, a request of another adapter in the same call matches PEFT, and the
    engine serves on (nothing else is failed, unlike an error raised inside scheduling)."""
    base, paths, peft = setup

    def gone(source):
        raise UserError(f"{source} is gone")

    engine, broken, other = engine_with_an_evicted_adapter(base, paths, gone)
    try:
        batch = prompts(3, seed=13)
        expected, _ = peft_generate(peft, batch, [broken, other, other])
        results = engine.generate(input_ids=batch[:2], sampling_params=GREEDY, lora_path=[broken, other])
        reason = results[0]["meta_info"]["finish_reason"]
        assert reason["type"] == "error" and f"adapter {broken!r} could not be read again" in reason["message"]
        assert "is gone" in reason["message"] and results[0]["output_ids"] == []
        assert results[1]["output_ids"] == expected[1]
        later = engine.generate(input_ids=batch[2], sampling_params=GREEDY, lora_path=other)
        assert later["output_ids"] == expected[2]
        engine.lora.check_integrity()
        engine.kv.allocator.check_integrity()
    finally:
        engine.shutdown()


def test_unload_during_generation_then_reload(setup):
    base, paths, peft = setup
    name = "patterns"
    engine = engine_with(base, {name: paths[name]})
    try:
        ids = prompts(1, seed=11)[0]
        expected, _ = peft_generate(peft, [ids], [name])
        results: list = []
        worker = threading.Thread(
            target=lambda: results.append(engine.generate(input_ids=ids, sampling_params=GREEDY, lora_path=name))
        )
        worker.start()
        while engine.step_count == 0:  # wait until the request is being generated
            threading.Event().wait(0.001)
        engine.lora.unload_adapter(name)  # waits for the in-flight request
        worker.join()
        assert results[0]["output_ids"] == expected[0]  # the in-flight request finished correctly
        with pytest.raises(UserError, match="unknown adapter 'patterns'"):
            engine.generate(input_ids=ids, sampling_params=GREEDY, lora_path=name)
        assert len(engine.lora.host) == 0 and engine.lora.pool.resident() in ([], [("", 0)])
        engine.lora.check_integrity()
        old_version = None
        ref = engine.lora.load_adapter(name, paths["rank1"])  # reload the name with other weights
        assert ref.version != old_version
        expected_new, _ = peft_generate(peft, [ids], ["rank1"])
        assert engine.generate(input_ids=ids, sampling_params=GREEDY, lora_path=name)["output_ids"] == expected_new[0]
        with pytest.raises(UserError, match="already loaded"):
            engine.lora.load_adapter(name, paths["rank1"])
    finally:
        engine.shutdown()


def test_adapter_waiting_for_a_slot_runs_correctly(setup):
    base, paths, peft = setup
    engine = engine_with(base, paths, max_loras_per_batch=2)
    try:
        # "rank1" and the base model fill both slots; "patterns" must wait, then run correctly
        order = ["rank1", None] * 4 + ["patterns"] + ["rank1", None] * 2
        batch = prompts(len(order), seed=13)
        results = engine.generate(input_ids=batch, sampling_params=GREEDY, lora_path=order)
        expected, _ = peft_generate(peft, batch, order)
        assert [r["output_ids"] for r in results] == expected
    finally:
        engine.shutdown()


def test_unknown_adapter_and_lora_disabled_errors(setup, tiny_model_dir):
    base, paths, _ = setup
    engine = engine_with(base, {"rank1": paths["rank1"]})
    try:
        with pytest.raises(UserError, match="unknown adapter 'nope'.*rank1"):
            engine.generate(input_ids=[1, 2], lora_path="nope")
    finally:
        engine.shutdown()
    plain = Engine(make_settings(model_path=tiny_model_dir, device="cpu", max_total_tokens=256))
    with pytest.raises(UserError, match="LoRA is not enabled"):
        plain.generate(input_ids=[1, 2], lora_path="rank1")


FAMILY_ADAPTERS = {
    "qkv_mlp": (4, 8, ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], {}),
    "odd_rslora": (5, 10, ["o_proj", "v_proj"], {"use_rslora": True}),
}


@pytest.mark.parametrize("family", ["mistral", "qwen2", "smollm2", "llama3"])
def test_mixed_batch_matches_peft_on_each_family(family, tmp_path):
    from test_models import make_config, make_hf

    hf = make_hf(make_config(family))
    hf.generation_config.eos_token_id = None
    base, paths, peft = _family_case(hf, tmp_path, FAMILY_ADAPTERS)
    adapters = ["qkv_mlp", None, "odd_rslora", "qkv_mlp"]
    gen = torch.Generator().manual_seed(17)
    batch = torch.randint(0, hf.config.vocab_size, (len(adapters), 7), generator=gen).tolist()
    expected, expected_lp = peft_generate(peft, batch, adapters)
    engine = engine_with(base, paths)
    try:
        results = engine.generate(input_ids=batch, sampling_params=GREEDY, lora_path=adapters)
        assert_matches_peft(results, expected, expected_lp, adapters, family)
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_mixed_batch_matches_peft_on_the_embedded_smollm2(tmp_path):
    from transformers import AutoModelForCausalLM

    from loraserve.embedded import embedded_model_dir

    model_dir = embedded_model_dir()
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    _, paths, peft = _family_case(hf, tmp_path, FAMILY_ADAPTERS)
    adapters = ["qkv_mlp", None, "odd_rslora"]
    gen = torch.Generator().manual_seed(19)
    batch = torch.randint(0, 49152, (len(adapters), 9), generator=gen).tolist()
    expected, expected_lp = peft_generate(peft, batch, adapters)
    engine = Engine(
        make_settings(device="cpu", max_total_tokens=1024, lora_paths=[f"{n}={p}" for n, p in paths.items()])
    )
    try:
        results = engine.generate(input_ids=batch, sampling_params=GREEDY, lora_path=adapters)
        assert_matches_peft(results, expected, expected_lp, adapters, "embedded")
    finally:
        engine.shutdown()


def test_embedding_and_lm_head_lora_and_path_only_adapter_names(tmp_path):
    base = tiny_model(tiny_llama_config(), seed=1)
    base.generation_config.eos_token_id = None
    adapters = {"embed_head": (4, 8, ["embed_tokens", "lm_head", "q_proj"], {}), "plain": (2, 4, ["v_proj"], {})}
    base_dir, paths, peft = _family_case(base, tmp_path, adapters)
    order = ["embed_head", None, "plain"]
    batch = prompts(len(order), seed=23)
    expected, _ = peft_generate(peft, batch, order)
    # PATH-only entries: the path doubles as the adapter name, as in SGLang
    engine = Engine(
        make_settings(
            model_path=base_dir, device="cpu", max_total_tokens=1024, lora_paths=[paths["embed_head"], paths["plain"]]
        )
    )
    try:
        assert sorted(a["name"] for a in engine.lora.loaded_adapters()) == sorted(paths.values())
        results = engine.generate(
            input_ids=batch, sampling_params=GREEDY, lora_path=[paths["embed_head"], None, paths["plain"]]
        )
        assert [r["output_ids"] for r in results] == expected
    finally:
        engine.shutdown()
