"""Weighted composition of adapters against PEFT's ``add_weighted_adapter(..., combination_type="cat")``
(the oracle): compositions of two and three adapters of different ranks, with a negative weight,
mixed in one batch with single-adapter and base rows; a composition is built once and reused, has
its own prefix-cache owner, is rebuilt after a component's update, and is refused with messages."""

from __future__ import annotations

import math

import httpx
import pytest
from lora_utils import tiny_llama_config, tiny_model
from test_multi_lora import NEW, _family_case, peft_generate, prompts

from loraserve.engine.engine import Engine
from loraserve.errors import NotFound, UserError
from loraserve.lora.composition import MAX_COMPONENTS, parse_spelling, spelling
from loraserve.settings import make_settings

ADAPTERS = {
    # name: (r, alpha, targets, extra LoraConfig options)
    "c1": (1, 4, ["q_proj", "v_proj"], {}),
    "c2": (4, 8, ["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"], {"rank_pattern": {"down_proj": 2}}),
    "c3": (2, 3, ["q_proj", "v_proj", "up_proj"], {"use_rslora": True}),
    "c4": (3, 6, ["q_proj", "down_proj"], {}),
}
MIX2 = [{"name": "c1", "weight": 0.7}, {"name": "c2", "weight": 0.3}]
MIX3 = [{"name": "c1", "weight": 0.5}, {"name": "c2", "weight": -0.8}, {"name": "c3", "weight": 1.2}]
GREEDY = {"max_new_tokens": NEW, "temperature": 0, "ignore_eos": True, "return_logprob": True}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base_model = tiny_model(tiny_llama_config(), seed=0)
    base_model.generation_config.eos_token_id = None
    base, paths, peft = _family_case(base_model, tmp_path_factory.mktemp("compose"), ADAPTERS, seed=40)
    for label, mix in (("mix2", MIX2), ("mix3", MIX3)):
        peft.add_weighted_adapter([c["name"] for c in mix], [c["weight"] for c in mix], label, combination_type="cat")
    settings = make_settings(
        model_path=base,
        device="cpu",
        max_total_tokens=2048,
        lora_paths=[f"{n}={p}" for n, p in paths.items()],
        max_lora_rank=8,
        lora_target_modules=["all"],
        max_loras_per_batch=6,
    )
    engine = Engine(settings)
    yield engine, peft, paths
    engine.shutdown()


def test_compositions_match_peft_cat_in_a_mixed_batch(setup):
    engine, peft, _ = setup
    ours = [MIX2, "c1", None, MIX3, MIX2, "c3"]
    theirs = ["mix2", "c1", None, "mix3", "mix2", "c3"]
    batch = prompts(len(ours), seed=7)
    expected, expected_lp = peft_generate(peft, batch, theirs)
    results = engine.generate(input_ids=batch, sampling_params=GREEDY, lora_path=ours)
    for i, res in enumerate(results):
        assert res["output_ids"] == expected[i], f"row {i} {theirs[i]}"
        lps = [lp for lp, _ in res["meta_info"]["output_token_logprobs"]]
        assert max(abs(a - b) for a, b in zip(lps, expected_lp[i])) < 1e-3, f"row {i}"
    assert results[0]["meta_info"]["lora_path"] == "c1*0.7+c2*0.3"
    assert len({tuple(r["output_ids"]) for r in results[:4]}) == 4  # the rows really differ
    engine.lora.check_integrity()


def test_a_composition_is_built_once_and_reused(setup):
    engine, _, _ = setup
    lora = engine.lora
    first = engine.generate(input_ids=prompts(1, seed=9)[0], sampling_params=GREEDY, lora_path=MIX2)
    builds = lora.compositions.builds
    again = engine.generate(input_ids=prompts(1, seed=9)[0], sampling_params=GREEDY, lora_path="c1*0.7+c2*0.30")
    assert lora.compositions.builds == builds and again["output_ids"] == first["output_ids"]
    # evicted from the GPU and host tiers: rebuilt from its components, transparently
    (key,) = [k for k in lora.compositions.keys() if k[0] == "c1*0.7+c2*0.3"]
    reloads = lora.metrics["host_reloads"]
    engine.call_in_engine(lambda: lora.admission.forget(key))
    rebuilt = engine.generate(input_ids=prompts(1, seed=9)[0], sampling_params=GREEDY, lora_path=MIX2)
    assert rebuilt["output_ids"] == first["output_ids"] and lora.metrics["host_reloads"] == reloads + 1
    other = [{"name": "c1", "weight": 0.7}, {"name": "c2", "weight": 0.31}]
    engine.generate(input_ids=prompts(1, seed=9)[0], sampling_params=GREEDY, lora_path=other)
    assert lora.compositions.builds == builds + 1  # other weights: another composition
    lora.check_integrity()


def test_the_prefix_cache_never_mixes_a_composition_with_its_component(setup):
    engine, _, _ = setup
    ids = prompts(1, length=40, seed=11)[0]
    params = {**GREEDY, "max_new_tokens": 2}
    engine.generate(input_ids=ids, sampling_params=params, lora_path="c4")
    warm = engine.generate(input_ids=ids, sampling_params=params, lora_path="c4")
    assert warm["meta_info"]["cached_tokens"] > 0
    # c4*1.0 computes what c4 does, but is an adapter of its own: nothing cached for it yet
    cold = engine.generate(input_ids=ids, sampling_params=params, lora_path=[{"name": "c4", "weight": 1.0}])
    assert cold["meta_info"]["cached_tokens"] == 0 and cold["output_ids"] == warm["output_ids"]
    again = engine.generate(input_ids=ids, sampling_params=params, lora_path="c4*1.0")
    assert again["meta_info"]["cached_tokens"] > 0


def test_an_updated_component_retires_its_compositions(setup):
    engine, _, paths = setup
    lora = engine.lora
    engine.load_adapter("c5", paths["c1"])
    ids = prompts(1, seed=13)[0]
    before = engine.generate(input_ids=ids, sampling_params=GREEDY, lora_path="c5*2.0+c3*0.5")
    builds = lora.compositions.builds
    engine.load_adapter("c5", paths["c4"], load_inplace=True)
    after = engine.generate(input_ids=ids, sampling_params=GREEDY, lora_path="c5*2.0+c3*0.5")
    assert lora.compositions.builds == builds + 1 and after["output_ids"] != before["output_ids"]
    expected = engine.generate(input_ids=ids, sampling_params=GREEDY, lora_path="c4*2.0+c3*0.5")
    assert after["output_ids"] == expected["output_ids"]
    engine.unload_adapter("c5", None)
    with pytest.raises(NotFound, match="c5"):
        engine.generate(input_ids=ids, sampling_params=GREEDY, lora_path="c5*2.0+c3*0.5")
    lora.check_integrity()


@pytest.mark.parametrize(
    "lora_path, error, message",
    [
        ("c2*1+c3*1+c4*1", UserError, r"rank 9 .*maximum LoRA rank 8 \(--max-lora-rank\)"),
        ("c1*0.5+nope*0.5", NotFound, "unknown adapter 'nope'"),
        ([{"name": "c1", "weight": math.nan}], UserError, "finite number"),
        ([{"name": "c1", "weight": "0.5"}], UserError, "finite number"),
        ([{"name": "c1", "weight": True}], UserError, "finite number"),
        ([{"name": "c1"}], UserError, "exactly the keys 'name' and 'weight'"),
        ([[]], UserError, "at least one adapter"),
        ([{"name": "c1", "weight": 1}, {"name": "c1", "weight": 2}], UserError, "'c1' more than once"),
        ([{"name": f"a{i}", "weight": 1} for i in range(MAX_COMPONENTS + 1)], UserError, "at most 8 adapters"),
        ("c1*0.5+", UserError, "not a weighted composition"),
        ("c1*inf", UserError, "not a weighted composition"),
    ],
)
def test_refusals_say_why(setup, lora_path, error, message):
    engine, _, _ = setup
    with pytest.raises(error, match=message):
        engine.generate(input_ids=[1, 2, 3], sampling_params=GREEDY, lora_path=lora_path)


def test_spelling_round_trips():
    components = (("a+b", 0.7), ("x.y/z@1", -0.25), ("3", 1e-5))
    assert parse_spelling(spelling(components)) == components
    assert parse_spelling("a*1+b*-2.5e+1") == (("a", 1.0), ("b", -25.0))


@pytest.fixture(scope="module")
def served():
    from http_fixtures import RunningServer, make_engine

    engine = make_engine(max_lora_rank=16)
    server = RunningServer(engine)
    client = httpx.Client(base_url=server.url, timeout=60)
    yield client, engine
    client.close()
    server.stop()


def test_the_http_spellings_equal_the_python_api(served):
    client, engine = served
    ids = [3, 14, 159, 2653]
    mix = [{"name": "alpha", "weight": 0.5}, {"name": "beta", "weight": -0.75}]
    params = {"max_new_tokens": 8, "temperature": 0}
    ref = engine.generate(input_ids=ids, sampling_params=params, lora_path=mix)
    assert ref["output_ids"] != engine.generate(input_ids=ids, sampling_params=params, lora_path="alpha")["output_ids"]
    native = client.post(
        "/generate", json={"input_ids": [ids, ids], "sampling_params": params, "lora_path": [mix, None]}
    )
    assert native.status_code == 200, native.text
    assert [r["output_ids"] for r in native.json()] == [
        ref["output_ids"],
        engine.generate(input_ids=ids, sampling_params=params)["output_ids"],
    ]
    for model in ("alpha*0.5+beta*-0.75", "tiny:alpha*0.5+beta*-0.75"):
        res = client.post("/v1/completions", json={"model": model, "prompt": ids, "max_tokens": 8, "temperature": 0})
        assert res.status_code == 200, res.text
        assert res.json()["choices"][0]["text"] == ref["text"] and res.json()["model"] == model
    bad = client.post("/generate", json={"input_ids": ids, "lora_path": [{"name": "alpha", "weight": "x"}]})
    assert bad.status_code == 400 and "finite number" in bad.text, bad.text
    metrics = client.get("/metrics").text  # one label for every composition: series stay bounded
    assert 'adapter="(composition)"' in metrics and "alpha*" not in metrics


def test_a_composition_of_loaded_adapters_has_a_card(served):
    client, _ = served
    listed = [card["id"] for card in client.get("/v1/models").json()["data"]]
    assert "alpha" in listed and not any("*" in name for name in listed)  # compositions are not listed
    for model in ("alpha*0.5+beta*-0.75", "tiny:alpha*0.5+beta*-0.75"):
        card = client.get(f"/v1/models/{model}")
        assert card.status_code == 200, card.text
        assert card.json()["id"] == model and card.json()["parent"] == "tiny"
        assert card.json()["composition"] == [{"name": "alpha", "weight": 0.5}, {"name": "beta", "weight": -0.75}]
    hostile = ("alpha*1e999+beta*0.5", "alpha*0.5+%ED%A0%80*0.5", "%00*0.5+alpha*0.5", "../../etc*0.5+alpha*1")
    for model in ("alpha*0.5+nope*0.5", "alpha*0.5+beta", "tiny*0.5+alpha*0.5", *hostile, "a*0.5+" * 1500 + "b*1"):
        res = client.get(f"/v1/models/{model}")
        assert res.status_code == 404 and "error" in res.json(), model[:40]


@pytest.mark.parametrize(
    "model, status, message",
    [
        ("alpha*0.5+beta", 400, "not a weighted composition"),
        ("alpha*0.5+alpha*0.5", 400, "'alpha' more than once"),
        ("alpha*0.5+nope*0.5", 404, "the composition names 'nope'"),
        ("other:alpha*0.5", 404, "does not exist"),
    ],
)
def test_bad_openai_spellings_are_clear_errors(served, model, status, message):
    client, _ = served
    res = client.post("/v1/completions", json={"model": model, "prompt": [1, 2], "max_tokens": 2})
    assert res.status_code == status and message in res.json()["error"]["message"], res.text


def test_hostile_spellings_are_refused_by_a_linear_scan():
    """A client chooses the spelling: the parser scans it once (no backtracking regex over it) and
    refuses anything longer than eight 256-character names with their weights."""
    from loraserve.errors import UserError
    from loraserve.lora.composition import MAX_SPELLING_CHARS, parse_spelling

    assert parse_spelling("c+d*1e-2+x.y/z@1*.5") == (("c+d", 0.01), ("x.y/z@1", 0.5))
    for text in ("a1" * 1000 + "*" + "1" * 300 + "x", "a*1+" * 500 + "!", "a*1" + "0" * MAX_SPELLING_CHARS):
        with pytest.raises(UserError, match="is not a weighted composition"):
            parse_spelling(text)
