"""The engine against transformers' generate (the oracle) on tiny random models of each family:
greedy tokens identical, log-probabilities within 1e-3, whatever the batching (mixed lengths,
chunked prefill, preemption); plus admission limits, aborts and streaming."""

from __future__ import annotations

import asyncio

import pytest
import torch
from test_models import FAMILIES, make_config, make_hf

from loraserve.engine.engine import Engine
from loraserve.errors import UserError
from loraserve.settings import make_settings

NEW_TOKENS = 32


def prompts(vocab: int, lengths=(1, 5, 17, 40), seed: int = 7) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    hf = make_hf(make_config(request.param))
    hf.generation_config.eos_token_id = None
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, str(path)


def make_engine(path: str, **kwargs) -> Engine:
    return Engine(
        make_settings(model_path=path, device="cpu", max_total_tokens=kwargs.pop("max_total_tokens", 2048), **kwargs)
    )


def hf_greedy(hf, ids: list[int], n: int = NEW_TOKENS) -> tuple[list[int], list[float]]:
    ids_t = torch.tensor([ids])  # an explicit mask: token 0 in a prompt must not be taken for padding
    out = hf.generate(
        ids_t,
        attention_mask=torch.ones_like(ids_t),
        max_new_tokens=n,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    tokens = out.sequences[0, len(ids) :].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


GREEDY = {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True, "return_logprob": True}


def test_greedy_tokens_and_logprobs_match_transformers(family):
    name, hf, path = family
    engine = make_engine(path)
    try:
        batch = prompts(hf.config.vocab_size)
        results = engine.generate(input_ids=batch, sampling_params=GREEDY)
        for ids, res in zip(batch, results):
            tokens, logprobs = hf_greedy(hf, ids)
            assert res["output_ids"] == tokens, f"{name}: prompt of {len(ids)} tokens"
            ours = [lp for lp, _ in res["meta_info"]["output_token_logprobs"]]
            assert max(abs(a - b) for a, b in zip(ours, logprobs)) < 1e-3
            assert res["meta_info"]["finish_reason"] == {"type": "length"}
        engine.kv.allocator.check_integrity()
        assert engine.kv.allocator.num_free == engine.kv.allocator.num_blocks
    finally:
        engine.shutdown()


@pytest.mark.parametrize("name", ["llama", "qwen2"])  # batching is family-independent: two suffice
def test_batch_equals_each_prompt_alone_with_chunking_and_preemption(name, tmp_path):
    hf = make_hf(make_config(name))
    hf.save_pretrained(tmp_path)
    path = str(tmp_path)
    batch = prompts(hf.config.vocab_size, lengths=(3, 40, 9, 26, 1))
    alone_engine = make_engine(path)
    alone = [alone_engine.generate(input_ids=ids, sampling_params=GREEDY)["output_ids"] for ids in batch]
    alone_engine.shutdown()
    # 7-token prefill chunks, and a KV cache of 96 tokens: 5 requests of up to 72 tokens must take turns
    tight = make_engine(path, chunked_prefill_size=7, max_total_tokens=96)
    try:
        together = [r["output_ids"] for r in tight.generate(input_ids=batch, sampling_params=GREEDY)]
        assert together == alone
        tight.kv.allocator.check_integrity()
        assert tight.kv.allocator.num_free == tight.kv.allocator.num_blocks
    finally:
        tight.shutdown()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    hf = make_hf(make_config("llama"))
    hf.generation_config.eos_token_id = None
    path = tmp_path_factory.mktemp("llama-engine")
    hf.save_pretrained(path)
    engine = make_engine(str(path), max_total_tokens=256)
    yield hf, engine
    engine.shutdown()


def test_requests_that_can_never_fit_are_refused(llama):
    _, engine = llama
    with pytest.raises(UserError, match="KV cache of 256 tokens"):
        engine.generate(input_ids=[1] * 100, sampling_params={"max_new_tokens": 200})
    with pytest.raises(UserError, match="context length of 512"):
        engine.generate(input_ids=[1] * 10, sampling_params={"max_new_tokens": 600})
    with pytest.raises(UserError, match="outside the vocabulary"):
        engine.generate(input_ids=[1, 999999], sampling_params={"max_new_tokens": 2})
    with pytest.raises(UserError, match="no tokenizer"):
        engine.generate("hello")
    with pytest.raises(UserError, match="n=2 is not supported yet"):
        engine.generate(input_ids=[1, 2], sampling_params={"n": 2})


def test_stop_token_ids_and_max_new_tokens(llama):
    hf, engine = llama
    empty = engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 0})
    assert empty["output_ids"] == [] and empty["meta_info"]["finish_reason"] == {"type": "length"}
    ids = prompts(hf.config.vocab_size)[2]
    tokens, _ = hf_greedy(hf, ids, 12)
    res = engine.generate(
        input_ids=ids, sampling_params={"max_new_tokens": 12, "temperature": 0, "stop_token_ids": [tokens[5]]}
    )
    first = tokens.index(tokens[5])
    assert res["output_ids"] == tokens[: first + 1]
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": tokens[5]}


def test_seeded_sampling_is_reproducible_and_batch_independent(llama):
    hf, engine = llama
    batch = prompts(hf.config.vocab_size)
    params = {"max_new_tokens": 10, "temperature": 1.0, "top_p": 0.9, "seed": 42}
    alone = engine.generate(input_ids=batch[1], sampling_params=params)["output_ids"]
    together = engine.generate(input_ids=batch, sampling_params=[{**params, "seed": s} for s in (1, 42, 3, 4)])
    assert together[1]["output_ids"] == alone
    other_seed = engine.generate(input_ids=batch[1], sampling_params={**params, "seed": 43})["output_ids"]
    assert other_seed != alone  # 10 sampled tokens from a random model: a collision would be a bug


def test_streaming_deltas_add_up_and_abort_frees_blocks(llama):
    hf, engine = llama
    batch = prompts(hf.config.vocab_size)

    async def consume():
        seen: dict[int, list[int]] = {0: [], 1: []}
        finished = {}
        async for i, out in engine.stream(input_ids=batch[:2], sampling_params=GREEDY):
            seen[i].extend(out.token_ids)
            if out.finished:
                finished[i] = out.finish_reason
        return seen, finished

    seen, finished = asyncio.run(consume())
    expected = engine.generate(input_ids=batch[:2], sampling_params=GREEDY)
    assert [seen[0], seen[1]] == [r["output_ids"] for r in expected]
    assert finished == {0: "length", 1: "length"}

    async def walk_away():
        stream = engine.stream(input_ids=batch[3], sampling_params={**GREEDY, "max_new_tokens": 200})
        async for _, out in stream:
            if len(out.token_ids) and not out.finished:
                break
        await stream.aclose()

    asyncio.run(walk_away())
    engine.generate(input_ids=batch[0], sampling_params={"max_new_tokens": 1})  # a step after the abort
    engine.kv.allocator.check_integrity()
    assert engine.kv.allocator.num_free == engine.kv.allocator.num_blocks
    assert not engine.scheduler.has_work()
