"""Sampling tests: every logits processor against transformers' own, greedy, seeded draws, logprobs,
parameter validation, stop strings and finish reasons."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from loraserve.engine.stop import StopChecker, finish_reason
from loraserve.errors import UserError
from loraserve.runner.sampler import Sampler
from loraserve.sched.sampling_params import MAX_TOP_LOGPROBS, SamplingParams, TokenHistory, make_generator

V = 37  # odd on purpose


def hf_processors(p: SamplingParams) -> LogitsProcessorList:
    """The chain transformers' generate() builds for these parameters, in its order."""
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.is_greedy:
        return procs
    if p.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k > 0:
        procs.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        procs.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0:
        procs.append(MinPLogitsWarper(p.min_p))
    return procs


def hf_scores(logits_row: torch.Tensor, p: SamplingParams, seen: list[int]) -> torch.Tensor:
    ids = torch.tensor([seen], dtype=torch.long)
    return hf_processors(p)(ids, logits_row[None].clone())[0]


def random_batch(gen: torch.Generator, batch: int, vocab: int = V, scale: float = 3.0):
    logits = torch.randn(batch, vocab, generator=gen) * scale
    prompts = [
        torch.randint(0, vocab, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
        for _ in range(batch)
    ]
    outputs = [
        torch.randint(0, vocab, (int(torch.randint(0, 7, (1,), generator=gen)),), generator=gen).tolist()
        for _ in range(batch)
    ]
    return logits, prompts, outputs


MIXED = [
    SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.3),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.9, min_p=0.1, repetition_penalty=0.8),
    SamplingParams(temperature=0.5, top_k=7, top_p=0.6, min_p=0.05, repetition_penalty=1.7),
    SamplingParams(),
]


@pytest.mark.parametrize(
    "params",
    [
        [SamplingParams(temperature=t) for t in (0.3, 0.7, 1.0, 1.5, 2.5)],
        [SamplingParams(top_k=k) for k in (1, 2, 3, 36, 100)],
        [SamplingParams(top_p=p) for p in (0.05, 0.3, 0.5, 0.9, 0.99)],
        [SamplingParams(min_p=m) for m in (0.01, 0.1, 0.3, 0.7, 1.0)],
        [SamplingParams(repetition_penalty=r) for r in (0.5, 0.9, 1.0, 1.2, 2.0)],
        MIXED,
    ],
    ids=["temperature", "top_k", "top_p", "min_p", "repetition", "mixed"],
)
def test_processed_logits_match_transformers(gen, params):
    sampler = Sampler(seed=0)
    for _ in range(20):
        logits, prompts, outputs = random_batch(gen, len(params))
        histories = [TokenHistory(pr, V, output_ids=out) for pr, out in zip(prompts, outputs)]
        ours = sampler.process_logits(logits, params, histories)
        for i, p in enumerate(params):
            expected = hf_scores(logits[i], p, prompts[i] + outputs[i])
            assert torch.equal(torch.isinf(ours[i]), torch.isinf(expected)), f"row {i}: filtered set differs"
            finite = torch.isfinite(expected)
            torch.testing.assert_close(ours[i][finite], expected[finite], rtol=0, atol=0)


def test_frequency_and_presence_penalties_follow_openai(gen):
    params = [
        SamplingParams(frequency_penalty=f, presence_penalty=pr, repetition_penalty=r)
        for f, pr, r in [(0.5, 0.0, 1.0), (0.0, 1.5, 1.0), (-1.0, 0.7, 1.0), (2.0, -2.0, 1.4), (0.3, 0.3, 0.7)]
    ]
    logits, prompts, outputs = random_batch(gen, len(params))
    histories = [TokenHistory(pr, V, output_ids=out) for pr, out in zip(prompts, outputs)]
    ours = Sampler().process_logits(logits, params, histories)
    for i, p in enumerate(params):
        expected = hf_scores(
            logits[i], SamplingParams(repetition_penalty=p.repetition_penalty, temperature=0), prompts[i] + outputs[i]
        )
        # OpenAI: only output tokens count; a prompt-only token is untouched by these two.
        for tok in range(V):
            count = outputs[i].count(tok)
            expected[tok] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
        torch.testing.assert_close(ours[i], expected, rtol=1e-6, atol=1e-6)


def test_history_append_matches_construction(gen):
    prompt = torch.randint(0, V, (11,), generator=gen).tolist()
    out = torch.randint(0, V, (9,), generator=gen).tolist()
    built = TokenHistory(prompt, V, output_ids=out)
    grown = TokenHistory(prompt, V)
    for t in out:
        grown.append(t)
    assert torch.equal(built.occurred, grown.occurred) and torch.equal(built.output_counts, grown.output_counts)
    assert int(built.output_counts.sum()) == len(out)
    assert set(torch.nonzero(built.occurred).flatten().tolist()) == set(prompt + out)
    # Ids beyond the logits' vocabulary (a larger embedding) are ignored, as transformers does.
    assert not TokenHistory([V + 3], V).occurred.any()


def test_greedy_is_argmax_after_penalties(gen):
    params = [
        SamplingParams(temperature=0),
        SamplingParams(top_k=1, temperature=0.8),
        SamplingParams(temperature=0, repetition_penalty=1.8, frequency_penalty=1.0),
        SamplingParams(temperature=1e-7),
        SamplingParams(temperature=0.9),
    ]
    sampler = Sampler(seed=3)
    for _ in range(30):
        logits, prompts, outputs = random_batch(gen, len(params))
        histories = [TokenHistory(pr, V, output_ids=out) for pr, out in zip(prompts, outputs)]
        tokens = sampler.sample(logits, params, histories).token_ids
        assert tokens[0] == logits[0].argmax() and tokens[1] == logits[1].argmax() and tokens[3] == logits[3].argmax()
        penalised = hf_scores(logits[2], SamplingParams(repetition_penalty=1.8, temperature=0), prompts[2] + outputs[2])
        penalised -= torch.tensor([outputs[2].count(t) for t in range(V)], dtype=torch.float32)
        assert tokens[2] == penalised.argmax()


def test_seeded_rows_are_reproducible_and_independent_of_the_batch(gen):
    target = SamplingParams(temperature=1.2, top_p=0.95, seed=42)
    others = [
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=0, seed=5),
        SamplingParams(top_k=4, seed=9),
        SamplingParams(min_p=0.2),
    ]
    steps = [torch.randn(V, generator=gen) * 2 for _ in range(25)]
    alone_gen = make_generator(42)
    alone = [int(Sampler(seed=1).sample(row[None], [target], generators=[alone_gen]).token_ids[0]) for row in steps]
    for position in range(len(others) + 1):
        row_gen, sampler = make_generator(42), Sampler(seed=position + 100)
        batch = others[:position] + [target] + others[position:]
        got = []
        for row in steps:
            logits = torch.randn(len(batch), V, generator=gen)
            logits[position] = row
            gens = [make_generator(p.seed) if p.seed is not None else None for p in batch]
            gens[position] = row_gen
            got.append(int(sampler.sample(logits, batch, generators=gens).token_ids[position]))
        assert got == alone, f"target at position {position} drew differently"
    assert len(set(alone)) > 1, "a seeded row should still sample, not repeat one token"


def test_unseeded_rows_follow_the_sampler_seed(gen):
    logits = torch.randn(6, V, generator=gen)
    params = [SamplingParams(temperature=1.5)] * 6
    first = [Sampler(seed=7).sample(logits, params).token_ids for _ in range(2)]
    assert torch.equal(first[0], first[1])


@pytest.mark.parametrize(
    "p",
    [
        SamplingParams(top_k=3),
        SamplingParams(top_p=0.5, temperature=1.4),
        SamplingParams(min_p=0.3),
        SamplingParams(top_k=6, top_p=0.7, min_p=0.1, seed=11),
        SamplingParams(repetition_penalty=1.5, temperature=0.6, top_p=0.8),
    ],
)
def test_sampled_tokens_are_inside_the_processed_support(gen, p):
    logits, prompts, outputs = random_batch(gen, 1, scale=1.5)
    history = TokenHistory(prompts[0], V, output_ids=outputs[0])
    allowed = torch.isfinite(hf_scores(logits[0], p, prompts[0] + outputs[0]))
    assert 1 < int(allowed.sum()) < V, "the filter should keep some tokens and drop others"
    batch = 400
    out = Sampler(seed=2).sample(
        logits.expand(batch, V),
        [p] * batch,
        [history] * batch,
        generators=[make_generator(p.seed + j) if p.seed else None for j in range(batch)],
    )
    assert allowed[out.token_ids].all()
    if p.top_k == 3:
        assert set(out.token_ids.tolist()) <= set(logits[0].topk(3).indices.tolist())


@pytest.mark.parametrize("seeded", [False, True], ids=["sampler-generator", "row-generator"])
def test_empirical_frequencies_match_transformers_distribution(gen, seeded):
    p = SamplingParams(temperature=0.8, top_k=12, top_p=0.9, seed=123 if seeded else None)
    logits = torch.randn(1, V, generator=gen) * 1.5
    probs = torch.softmax(hf_scores(logits[0], p, []), dim=-1)
    draws = 3000
    if seeded:
        row_gen, sampler = make_generator(p.seed), Sampler()
        tokens = torch.cat([sampler.sample(logits, [p], generators=[row_gen]).token_ids for _ in range(draws)])
    else:
        tokens = Sampler(seed=2024).sample(logits.expand(draws, V), [p] * draws).token_ids
    freq = torch.bincount(tokens, minlength=V).float() / draws
    # 5 standard errors of a binomial proportion, per token.
    tolerance = 5 * torch.sqrt(probs * (1 - probs) / draws) + 1e-3
    assert ((freq - probs).abs() <= tolerance).all(), (freq, probs)
    assert (freq[probs == 0] == 0).all()


def test_logprobs_come_from_raw_logits(gen):
    params = [
        SamplingParams(return_logprob=True, temperature=0.5, repetition_penalty=1.5),
        SamplingParams(temperature=0),
        SamplingParams(top_logprobs_num=5, top_k=3),
        SamplingParams(top_logprobs_num=MAX_TOP_LOGPROBS, return_logprob=True, frequency_penalty=1.0),
        SamplingParams(top_logprobs_num=1, min_p=0.5),
    ]
    logits, prompts, outputs = random_batch(gen, len(params))
    histories = [TokenHistory(pr, V, output_ids=out) for pr, out in zip(prompts, outputs)]
    out = Sampler(seed=4).sample(logits, params, histories)
    raw = torch.log_softmax(logits.double(), dim=-1)
    expected = raw.gather(1, out.token_ids[:, None]).squeeze(1).float()
    torch.testing.assert_close(out.logprobs, expected, rtol=0, atol=1e-5)
    assert out.top_logprobs[0] is None and out.top_logprobs[1] is None
    for i in (2, 3, 4):
        pairs = out.top_logprobs[i]
        assert len(pairs) == params[i].top_logprobs_num
        values = [lp for _, lp in pairs]
        assert values == sorted(values, reverse=True)
        ranked = sorted(range(V), key=lambda t: -float(raw[i, t]))
        assert [t for t, _ in pairs] == ranked[: len(pairs)]
        for t, lp in pairs:
            assert math.isclose(lp, float(raw[i, t]), abs_tol=1e-5)


def test_no_logprobs_when_none_asked(gen):
    out = Sampler().sample(torch.randn(3, V, generator=gen), [SamplingParams()] * 3)
    assert out.logprobs is None and out.top_logprobs == [None, None, None]
    assert out.token_ids.shape == (3,) and out.token_ids.dtype == torch.long
    assert Sampler().sample(torch.randn(0, V, generator=gen), []).token_ids.shape == (0,)


def test_sampler_leaves_logits_untouched(gen):
    logits = torch.randn(2, V, generator=gen)
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=1.5, top_k=3), SamplingParams(temperature=0.4, top_p=0.5)]
    Sampler().sample(logits, params, [TokenHistory([1, 2, 3], V), None])
    assert torch.equal(logits, before)


def test_sampler_rejects_mismatched_inputs(gen):
    logits = torch.randn(2, V, generator=gen)
    with pytest.raises(ValueError, match="2 rows but 1"):
        Sampler().sample(logits, [SamplingParams()])
    with pytest.raises(ValueError, match="row 1 has penalties"):
        Sampler().sample(logits, [SamplingParams(), SamplingParams(presence_penalty=1.0)])
    with pytest.raises(ValueError, match="vocab size"):
        Sampler().sample(logits, [SamplingParams(repetition_penalty=1.1)] * 2, [TokenHistory([1], V + 1)] * 2)


BAD_VALUES = [
    ("temperature", -0.1),
    ("temperature", float("nan")),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_k", -2),
    ("min_p", -0.01),
    ("min_p", 1.01),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("frequency_penalty", 2.5),
    ("frequency_penalty", -2.01),
    ("presence_penalty", 3.0),
    ("max_new_tokens", -1),
    ("top_logprobs_num", -1),
    ("top_logprobs_num", MAX_TOP_LOGPROBS + 1),
    ("stop_token_ids", [-1]),
    ("n", 0),
    ("seed", -5),
    ("stop", [""]),
]


@pytest.mark.parametrize("name,value", BAD_VALUES)
def test_out_of_range_values_name_the_field_value_and_range(name, value):
    with pytest.raises(UserError) as err:
        SamplingParams.from_dict({name: value})
    message = str(err.value)
    assert name in message and repr(value) in message and "allowed" in message


@pytest.mark.parametrize(
    "name,value",
    [
        ("temperature", "hot"),
        ("top_k", 2.5),
        ("max_new_tokens", True),
        ("ignore_eos", "yes"),
        ("stop", [1, 2]),
        ("stop_token_ids", ["a"]),
        ("seed", 1.5),
        ("top_p", [0.5]),
    ],
)
def test_wrong_types_name_the_field(name, value):
    with pytest.raises(UserError, match=name):
        SamplingParams.from_dict({name: value})


def test_vocab_dependent_checks():
    p = SamplingParams(stop_token_ids=[5, 36], top_logprobs_num=10)
    p.validate(vocab_size=V)
    with pytest.raises(UserError, match=r"stop_token_ids.*< vocab size 30"):
        p.validate(vocab_size=30)
    with pytest.raises(UserError, match=r"top_logprobs_num=10.*<= 8"):
        SamplingParams(top_logprobs_num=10).validate(vocab_size=8)


def test_from_dict_unknown_keys_list_the_allowed_ones():
    with pytest.raises(UserError) as err:
        SamplingParams.from_dict({"temprature": 0.5, "max_tokens": 3})
    message = str(err.value)
    assert "max_tokens, temprature" in message and "temperature" in message and "top_logprobs_num" in message
    with pytest.raises(UserError, match="JSON object"):
        SamplingParams.from_dict(["temperature", 0.5])


def test_from_dict_defaults_and_normalisation():
    assert SamplingParams.from_dict({}) == SamplingParams()
    p = SamplingParams.from_dict({"temperature": None, "stop": "###", "top_k": 0, "max_new_tokens": 7, "seed": None})
    assert p.temperature == 1.0 and p.stop == ["###"] and p.max_new_tokens == 7 and p.seed is None
    assert not p.is_greedy and isinstance(SamplingParams(temperature=1).temperature, float)
    assert SamplingParams().stop == [] and SamplingParams().stop_token_ids == []
    assert SamplingParams(temperature=0).is_greedy and SamplingParams(top_k=1).is_greedy


def test_stop_string_trimmed_and_matched_earliest():
    checker = StopChecker(["</s>", "END", "EN"])
    result = checker.check("hello END and </s>")
    assert result.stopped and result.matched == "EN" and result.text == "hello " and result.stream_len == 6
    kept = StopChecker(["###"], no_stop_trim=True).check("answer### tail")
    assert kept.stopped and kept.matched == "###" and kept.text == "answer### tail"


def test_stop_string_split_across_steps_and_hold_back():
    checker = StopChecker.from_params(SamplingParams(stop=["<|end|>", "\n\n"]))
    text, streamed = "", []
    for piece in ["Hi", " there<", "|en", "d", "|> more"]:
        text += piece
        result = checker.check(text)
        streamed.append(result.stream_len)
        if result.stopped:
            break
    assert result.stopped and result.matched == "<|end|>" and result.text == "Hi there"
    # "<", "<|en", "<|end" were held back until they either matched or not.
    assert streamed == [2, 8, 8, 8, 8]
    assert streamed == sorted(streamed)


def test_hold_back_released_when_prefix_breaks():
    checker = StopChecker(["STOP"])
    assert checker.check("go ST").stream_len == 3
    result = checker.check("go STAR")
    assert not result.stopped and result.stream_len == 7 and result.text == "go STAR"
    assert StopChecker([]).check("anything").stream_len == len("anything")
    assert StopChecker(["a\nb"]).check("x\n").stream_len == 2  # only a prefix of the stop string is held


def test_stop_checker_rescans_when_text_shrinks():
    checker = StopChecker(["xyz"])
    assert not checker.check("aaaaaaaaaa").stopped
    assert checker.check("xyz").stopped


def test_finish_reason_cases():
    p = SamplingParams(max_new_tokens=4, stop_token_ids=[9])
    eos = {2, 3}
    assert finish_reason(5, 1, p, eos) is None
    assert finish_reason(2, 1, p, eos) == "stop"
    assert finish_reason(9, 2, p, eos) == "stop"
    assert finish_reason(5, 4, p, eos) == "length"
    assert finish_reason(2, 4, p, eos) == "length"  # as SGLang: the length check comes first
    ignore = SamplingParams(max_new_tokens=4, stop_token_ids=[9], ignore_eos=True)
    assert finish_reason(2, 1, ignore, eos) is None  # EOS is ignored...
    assert finish_reason(9, 1, ignore, eos) == "stop"  # ...but ids the user named still stop
    assert finish_reason(5, 4, ignore, eos) == "length"
    assert finish_reason(2, 1, SamplingParams(), None) is None
    assert finish_reason(0, 0, SamplingParams(max_new_tokens=0), eos) == "length"


def test_tiny_top_p_keeps_the_most_likely_token(gen):
    # The float32 cumulative sum can end just below 1 - top_p; transformers still keeps the top token.
    params = [SamplingParams(top_p=1e-9)] * 64
    logits = torch.randn(64, 1001, generator=gen) * 0.1
    scores = Sampler().process_logits(logits, params)
    assert (torch.isfinite(scores).sum(dim=-1) == 1).all()
    assert torch.equal(scores.argmax(dim=-1), logits.argmax(dim=-1))
    for i in range(0, 64, 9):
        expected = TopPLogitsWarper(1e-9)(None, logits[i : i + 1].clone())[0]
        assert torch.equal(torch.isinf(scores[i]), torch.isinf(expected))
