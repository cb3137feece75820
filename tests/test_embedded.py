"""The embedded SmolLM2-135M-Instruct through the Python API: token-identical to transformers' greedy
generate in float32, sensible on the README's question, stop strings and streamed text."""

from __future__ import annotations

import asyncio

import pytest
import torch

pytestmark = pytest.mark.slow

QUESTION = "List 3 countries and their capitals."
CAPITALS = [
    "Paris",
    "Berlin",
    "Rome",
    "Madrid",
    "London",
    "Tokyo",
    "Beijing",
    "Ottawa",
    "Washington",
    "Canberra",
    "Moscow",
    "Delhi",
    "Brasília",
    "Brasilia",
    "Cairo",
    "Lisbon",
    "Athens",
    "Vienna",
    "Amsterdam",
    "Seoul",
]


@pytest.fixture(scope="module")
def smol():
    pytest.importorskip("gguf")
    from loraserve.engine.engine import Engine
    from loraserve.settings import make_settings

    engine = Engine(make_settings(device="cpu", max_total_tokens=4096, enable_lora=True, max_lora_rank=16))
    yield engine
    engine.shutdown()


def chat(engine, text: str) -> str:
    return engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def test_answers_the_readme_question_sensibly(smol):
    out = smol.generate(chat(smol, QUESTION), {"max_new_tokens": 80, "temperature": 0})
    found = {c for c in CAPITALS if c in out["text"]}
    assert len(found) >= 2, out["text"]
    assert out["meta_info"]["finish_reason"]["type"] in ("stop", "length")


def test_greedy_tokens_match_transformers(smol):
    from transformers import AutoModelForCausalLM

    from loraserve.embedded import embedded_model_dir

    hf = AutoModelForCausalLM.from_pretrained(str(embedded_model_dir()), dtype=torch.float32).eval()
    prompts = [chat(smol, QUESTION), "The capital of France is", chat(smol, "Write a haiku about the sea.")]
    params = {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True, "return_logprob": True}
    results = smol.generate(prompts, params)
    for prompt, res in zip(prompts, results):
        ids = torch.tensor([smol.tokenizer.encode(prompt)])
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=32,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=None,
            pad_token_id=smol.tokenizer.eos_token_id,
        )
        tokens = out.sequences[0, ids.shape[1] :].tolist()
        assert res["output_ids"] == tokens, prompt
        hf_lp = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.logits, tokens)]
        ours = [lp for lp, _ in res["meta_info"]["output_token_logprobs"]]
        assert max(abs(a - b) for a, b in zip(ours, hf_lp)) < 1e-3
        assert res["text"] == smol.tokenizer.decode(tokens, skip_special_tokens=True)


def test_stop_strings_trim_and_streamed_text_adds_up(smol):
    prompt = chat(smol, QUESTION)
    full = smol.generate(prompt, {"max_new_tokens": 60, "temperature": 0})["text"]
    cut_word = next(c for c in CAPITALS if c in full)
    stopped = smol.generate(prompt, {"max_new_tokens": 60, "temperature": 0, "stop": [cut_word]})
    assert stopped["text"] == full[: full.index(cut_word)]
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": cut_word}

    async def pieces():
        parts = []
        async for _, out in smol.stream(prompt, {"max_new_tokens": 60, "temperature": 0, "stop": [cut_word]}):
            parts.append(out.text)
        return parts

    parts = asyncio.run(pieces())
    assert "".join(parts) == stopped["text"] and len(parts) > 3


DEMO = {"shout": "examples/adapters/smollm2-shout", "pirate": "examples/adapters/smollm2-pirate"}


def test_demo_adapters_change_the_answer_plainly(smol):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for name, rel in DEMO.items():
        if smol.lora is None or smol.lora.registry.get(name) is None:
            smol.lora.load_adapter(name, str(root / rel))
    prompt = chat(smol, QUESTION)
    base, shout, pirate = (
        r["text"]
        for r in smol.generate(
            [prompt] * 3, {"max_new_tokens": 48, "temperature": 0}, lora_path=[None, "shout", "pirate"]
        )
    )
    letters = [c for c in shout if c.isalpha()]
    assert sum(c.isupper() for c in letters) > 0.9 * len(letters), shout
    assert sum(c.isupper() for c in base if c.isalpha()) < 0.5 * sum(c.isalpha() for c in base), base
    assert "Arr" in pirate and "Arr" not in base, pirate
