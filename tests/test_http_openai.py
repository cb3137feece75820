"""The OpenAI-compatible API through the real ``openai`` client against a real uvicorn server:
completions and chat (plain, streaming, logprobs, n, stop, usage) equal the engine's Python API for
the same requests; ``model`` selects the base, ``base:adapter`` or an adapter; /v1/models lists the
base and every adapter with ``parent`` and ``root``; unknown models are 404 model_not_found; usage tells
the prompt tokens found in the prefix cache."""

from __future__ import annotations

import openai
import pytest
import torch
from http_fixtures import RunningServer, assets, make_engine

MAX = 10


@pytest.fixture(scope="module")
def served():
    engine = make_engine()
    server = RunningServer(engine)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield client, engine
    client.close()
    server.stop()


def greedy(n: int = MAX, **extra) -> dict:
    return {"max_new_tokens": n, "temperature": 0, **extra}


def chat_ids(engine, messages) -> list[int]:
    text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return engine.tokenizer.encode(text, add_special_tokens=False)


def test_models_list_base_and_adapters_with_parent_and_root(served):
    client, engine = served
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", "alpha", "beta"}
    assert cards["tiny"].parent is None and cards["tiny"].root == assets().base
    for name in ("alpha", "beta"):
        assert cards[name].parent == "tiny" and cards[name].root == assets().adapters[name]
    assert client.models.retrieve("beta").root == assets().adapters["beta"]
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("nope")
    assert err.value.code == "model_not_found"


@pytest.mark.parametrize("model, adapter", [("tiny", None), ("alpha", "alpha"), ("tiny:beta", "beta")])
def test_completions_equal_the_python_api(served, model, adapter):
    client, engine = served
    prompts = ["The weather today", "Numbers: 1, 2,"]
    res = client.completions.create(model=model, prompt=prompts, max_tokens=MAX, temperature=0)
    refs = engine.generate(prompts, greedy(), adapter)
    assert res.model == model and res.object == "text_completion"
    assert [c.text for c in res.choices] == [r["text"] for r in refs]
    assert [c.index for c in res.choices] == [0, 1] and all(c.finish_reason == "length" for c in res.choices)
    assert res.usage.prompt_tokens == sum(r["meta_info"]["prompt_tokens"] for r in refs)
    assert res.usage.completion_tokens == 2 * MAX and res.usage.total_tokens == res.usage.prompt_tokens + 2 * MAX

    ids = [3, 14, 159, 2653]
    res = client.completions.create(model=model, prompt=ids, max_tokens=MAX, temperature=0, logprobs=2)
    ref = engine.generate(
        input_ids=ids, sampling_params=greedy(return_logprob=True, top_logprobs_num=2), lora_path=adapter
    )
    assert res.choices[0].text == ref["text"]
    lp = res.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([x for x, _ in ref["meta_info"]["output_token_logprobs"]], abs=1e-4)
    assert lp.tokens == [engine.tokenizer.decode([t]) for t in ref["output_ids"]]
    assert all(len(top) <= 2 for top in lp.top_logprobs) and len(lp.text_offset) == MAX


def test_completion_stream_concatenates_to_the_python_api_text(served):
    client, engine = served
    stream = client.completions.create(
        model="beta",
        prompt="Stream me",
        max_tokens=MAX,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    ref = engine.generate("Stream me", greedy(), "beta")
    assert text == ref["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX


def test_chat_equals_the_python_api_on_the_chat_template(served):
    client, engine = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    ids = chat_ids(engine, messages)
    for model, adapter in (("tiny", None), ("tiny:alpha", "alpha"), ("beta", "beta")):
        res = client.chat.completions.create(
            model=model, messages=messages, max_tokens=MAX, temperature=0, logprobs=True, top_logprobs=3
        )
        ref = engine.generate(
            input_ids=ids, sampling_params=greedy(return_logprob=True, top_logprobs_num=3), lora_path=adapter
        )
        choice = res.choices[0]
        assert choice.message.role == "assistant" and choice.message.content == ref["text"]
        assert choice.finish_reason == "length" and res.object == "chat.completion"
        assert res.usage.prompt_tokens == len(ids) and res.usage.completion_tokens == MAX
        assert [c.logprob for c in choice.logprobs.content] == pytest.approx(
            [x for x, _ in ref["meta_info"]["output_token_logprobs"]], abs=1e-4
        )
        assert all(len(c.top_logprobs) == 3 for c in choice.logprobs.content)
    # text parts are joined like a plain string
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}]
    res = client.chat.completions.create(model="tiny", messages=parts, max_tokens=MAX, temperature=0)
    assert (
        res.choices[0].message.content
        == engine.generate(
            input_ids=chat_ids(engine, [{"role": "user", "content": "Name a colour."}]), sampling_params=greedy()
        )["text"]
    )


def test_chat_stream_role_first_then_text_then_finish_and_usage(served):
    client, engine = served
    messages = [{"role": "user", "content": "Count to three."}]
    chunks = list(
        client.chat.completions.create(
            model="alpha",
            messages=messages,
            max_tokens=MAX,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (
        text
        == engine.generate(input_ids=chat_ids(engine, messages), sampling_params=greedy(), lora_path="alpha")["text"]
    )
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == MAX and chunks[-1].usage.prompt_tokens == len(
        chat_ids(engine, messages)
    )


def test_chat_without_max_tokens_may_use_the_rest_of_the_context(served):
    client, engine = served
    messages = [{"role": "user", "content": "Go on."}]
    res = client.chat.completions.create(
        model="tiny", messages=messages, temperature=0, extra_body={"ignore_eos": True}
    )
    assert res.choices[0].finish_reason == "length"
    assert res.usage.prompt_tokens + res.usage.completion_tokens == engine.context_len


def test_n_seed_and_stop(served):
    client, engine = served
    res = client.completions.create(model="tiny", prompt="Pick", max_tokens=6, temperature=1.0, seed=42, n=3)
    refs = engine.generate(["Pick"] * 3, [{"max_new_tokens": 6, "temperature": 1.0, "seed": 42 + j} for j in range(3)])
    assert [c.text for c in res.choices] == [r["text"] for r in refs]
    assert [c.index for c in res.choices] == [0, 1, 2] and len({c.text for c in res.choices}) > 1
    assert res.usage.prompt_tokens == refs[0]["meta_info"]["prompt_tokens"]
    again = client.completions.create(model="tiny", prompt="Pick", max_tokens=6, temperature=1.0, seed=42, n=3)
    assert [c.text for c in again.choices] == [c.text for c in res.choices]

    full = engine.generate("Stop here", greedy(12))["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    res = client.completions.create(model="tiny", prompt="Stop here", max_tokens=12, temperature=0, stop=[stop])
    assert res.choices[0].finish_reason == "stop" and res.choices[0].text == full[: full.index(stop)]
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0.7, seed=5, n=2
    )
    assert [c.index for c in chat.choices] == [0, 1]


def test_unknown_models_are_404_model_not_found(served):
    client, _ = served
    for model in ("nope", "tiny:nope", "other:alpha"):
        with pytest.raises(openai.NotFoundError) as err:
            client.completions.create(model=model, prompt="x", max_tokens=2)
        assert err.value.code == "model_not_found" and "GET /v1/models" in err.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}], max_tokens=2)


def test_usage_reports_the_prompt_tokens_found_in_the_prefix_cache(served):
    client, engine = served
    block = engine.kv.allocator.block_size
    gen = torch.Generator().manual_seed(191)
    prompts = [torch.randint(10, 1000, (2 * block + k,), generator=gen).tolist() for k in (5, 11)]
    first = client.completions.create(model="alpha", prompt=prompts, max_tokens=MAX, temperature=0)
    again = client.completions.create(model="alpha", prompt=prompts, max_tokens=MAX, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == 2 * 2 * block  # two full blocks of each prompt
    assert [c.text for c in again.choices] == [c.text for c in first.choices]

    messages = [{"role": "user", "content": "Tell me about the rivers and mountains of Europe, one by one. " * 3}]
    ids = chat_ids(engine, messages)
    assert len(ids) > 2 * block
    plain = client.chat.completions.create(model="beta", messages=messages, max_tokens=MAX, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="beta",
            messages=messages,
            max_tokens=MAX,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert plain.usage.prompt_tokens_details.cached_tokens < len(ids)  # the template's start may be cached already
    usage = chunks[-1].usage
    assert usage.prompt_tokens == len(ids)
    assert usage.prompt_tokens_details.cached_tokens == (len(ids) - 1) // block * block
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
