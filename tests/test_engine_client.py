"""The HTTP server and its frontends use the engine only through ``EngineClient``.

A real tiny engine is served through a stand-in that has the methods of ``EngineClient`` and
nothing else: any other attribute a frontend reaches for (the scheduler, the KV cache, the LoRA
manager, the tokenizer, the settings, the plugin manager, ...) is refused and recorded. Every route
family then runs (generate, streams, completions with echo and logprobs, chat, model cards,
adapter loading and unloading, /metrics, /get_server_info, /get_model_info, /health_generate,
/flush_cache) and answers what the engine's own Python API answers. The contract module itself stays importable on
its own (no loraserve import at run time), so it can move into the plugin contract.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import httpx
import pytest
import torch
from http_fixtures import GREEDY, assets, make_engine

from loraserve.contract import EngineClient, ModelInfo
from loraserve.engine.engine import Engine
from loraserve.http.server import ServerThread

SURFACE = sorted(EngineClient.__abstractmethods__)
CONTRACT_SOURCE = Path(__file__).resolve().parents[1] / "core" / "contract.py"


def client_only(engine: Engine) -> tuple[EngineClient, set[str], list[str]]:
    """An EngineClient forwarding to ``engine``, the names of the methods called through it, and the
    names of every other attribute asked for (each also raises, so the request fails loudly)."""
    used: set[str] = set()
    refused: list[str] = []

    def forward(name: str):
        def method(self, *args, **kwargs):
            used.add(name)
            return getattr(engine, name)(*args, **kwargs)

        method.__name__ = name
        return method

    def refuse(self, name: str):
        refused.append(name)
        # not an AttributeError: getattr(engine, name, default) must not hide the reach either
        raise AssertionError(f"a frontend used engine.{name}, which is not part of EngineClient")

    cls = type("ClientOnly", (EngineClient,), {**{name: forward(name) for name in SURFACE}, "__getattr__": refuse})
    return cls(), used, refused


@pytest.fixture(scope="module")
def served():
    engine = make_engine(adapters=["alpha"])
    client, used, refused = client_only(engine)
    server = ServerThread(client, engine.settings, engine.plugins, grace_s=5.0)
    http = httpx.Client(base_url=server.url, timeout=60)
    yield http, engine, used, refused
    http.close()
    server.stop()
    assert "shutdown" in used  # stopping the server stopped the engine through the interface
    assert refused == [], f"frontends reached past EngineClient: {sorted(set(refused))}"


@pytest.fixture(autouse=True)
def nothing_refused(request):
    """After each test that served requests: no frontend reached past EngineClient."""
    yield
    if "served" in request.fixturenames:
        refused = request.getfixturevalue("served")[3]
        assert refused == [], f"frontends reached past EngineClient: {sorted(set(refused))}"


def ok(res: httpx.Response) -> dict | list:
    assert res.status_code == 200, res.text
    return res.json()


def events(res: httpx.Response) -> list:
    assert res.status_code == 200, res.read()
    lines = [line.removeprefix("data: ") for line in res.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def prompt_ids(n: int, seed: int) -> list[int]:
    return torch.randint(10, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_the_contract_sits_below_the_engine_at_run_time():
    """The contract module imports only the error types, dtype helpers and host staging buffers (leaf
    modules) at run time (the rest under TYPE_CHECKING), so a frontend or plugin importing it pulls in
    no engine, scheduler or server."""
    tree = ast.parse(CONTRACT_SOURCE.read_text())
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            guarded.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [(n, n.module if isinstance(n, ast.ImportFrom) else n.names[0].name) for n in imports]
    outside = [name for n, name in names if (name or "").startswith("loraserve") and id(n) not in guarded]
    assert sorted(outside) == ["loraserve.errors", "loraserve.models.dtypes", "loraserve.staging"]
    assert any((name or "").startswith("loraserve") for _, name in names)  # the check saw the guarded ones


def test_every_method_of_the_contract_is_documented_and_the_engine_implements_it():
    assert issubclass(Engine, EngineClient) and not Engine.__abstractmethods__
    for name in SURFACE:
        doc = getattr(EngineClient, name).__doc__ or ""
        assert len(doc.split()) >= 8, f"EngineClient.{name} says too little about itself: {doc!r}"
    assert {
        "make_request",
        "stream",
        "abort",
        "final_output",
        "load_adapter",
        "unload_adapter",
        "stats",
        "shutdown",
    } <= set(SURFACE)


def test_model_info_is_plain_data_about_the_served_model(served):
    _, engine, _, _ = served
    info = engine.model_info()
    assert isinstance(info, ModelInfo)
    assert info.name == "tiny" and info.path == assets().base and info.lora_enabled and info.has_tokenizer
    assert info.vocab_size == engine.model.vocab_size and info.context_len == engine.context_len
    assert info.max_total_tokens == engine.kv.allocator.capacity_tokens
    assert info.bos_token_id == engine.tokenizer.bos_token_id


def test_native_generate_and_stream_equal_the_python_api(served):
    http, engine, used, _ = served
    ids = prompt_ids(7, seed=1)
    got = ok(http.post("/generate", json={"input_ids": ids, "sampling_params": GREEDY, "lora_path": "alpha"}))
    ref = engine.generate(input_ids=ids, sampling_params=GREEDY, lora_path="alpha")
    assert got["output_ids"] == ref["output_ids"] and got["text"] == ref["text"]

    body = {"text": ["Hello there", "Numbers: 1, 2,"], "sampling_params": GREEDY, "stream": True}
    with http.stream("POST", "/generate", json=body) as res:
        chunks = events(res)
    last = {c["index"]: c for c in chunks}
    refs = engine.generate(["Hello there", "Numbers: 1, 2,"], GREEDY)
    assert [last[i]["text"] for i in (0, 1)] == [r["text"] for r in refs]
    assert {"make_request", "stream", "final_output"} <= used


def test_openai_completion_chat_and_models(served):
    http, engine, used, _ = served
    res = ok(
        http.post(
            "/v1/completions",
            json={"model": "tiny:alpha", "prompt": "The weather", "max_tokens": 6, "temperature": 0, "logprobs": 2},
        )
    )
    ref = engine.generate(
        "The weather", {"max_new_tokens": 6, "temperature": 0, "return_logprob": True, "top_logprobs_num": 2}, "alpha"
    )
    choice = res["choices"][0]
    assert choice["text"] == ref["text"]
    assert choice["logprobs"]["tokens"] == [engine.tokenizer.decode([t]) for t in ref["output_ids"]]
    ids = prompt_ids(6, seed=3)
    res = ok(
        http.post(
            "/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 4, "temperature": 0, "echo": True}
        )
    )
    ref = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 4, "temperature": 0})
    assert res["choices"][0]["text"] == engine.tokenizer.decode(ids) + ref["text"]

    messages = [{"role": "user", "content": "Say something short."}]
    body = {"model": "alpha", "messages": messages, "max_tokens": 8, "temperature": 0}
    whole = ok(http.post("/v1/chat/completions", json=body))["choices"][0]["message"]["content"]
    ids = engine.tokenizer.encode(
        engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )
    assert (
        whole
        == engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 8, "temperature": 0}, lora_path="alpha")[
            "text"
        ]
    )
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as res:
        chunks = events(res)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == whole

    cards = {c["id"]: c for c in ok(http.get("/v1/models"))["data"]}
    assert set(cards) == {"tiny", "alpha"} and cards["tiny"]["root"] == assets().base
    assert ok(http.get("/v1/models/tiny:alpha"))["parent"] == "tiny"
    missing = http.post("/v1/completions", json={"model": "nope", "prompt": "x", "max_tokens": 1})
    assert missing.status_code == 404 and "model_not_found" in missing.text
    assert {"apply_chat_template", "detokenize", "loaded_adapters", "is_servable", "model_info"} <= used


def test_adapter_routes_info_and_metrics(served):
    http, engine, used, _ = served
    gamma = assets().adapters["gamma"]
    res = ok(http.post("/load_lora_adapter", json={"lora_name": "gamma", "lora_path": gamma}))
    assert res["success"] and res["loaded_adapters"] == {"alpha": assets().adapters["alpha"], "gamma": gamma}
    ids = prompt_ids(5, seed=2)
    got = ok(http.post("/generate", json={"input_ids": ids, "sampling_params": GREEDY, "lora_path": "gamma"}))
    assert got["output_ids"] == engine.generate(input_ids=ids, sampling_params=GREEDY, lora_path="gamma")["output_ids"]

    metrics = http.get("/metrics")
    assert metrics.status_code == 200
    assert 'loraserve_lora_adapter_resident{adapter="gamma"' in metrics.text
    assert "loraserve_num_requests_running 0.0" in metrics.text

    res = ok(http.post("/unload_lora_adapter", json={"lora_name": "gamma"}))
    assert res["success"] and set(res["loaded_adapters"]) == {"alpha"}
    again = http.post("/unload_lora_adapter", json={"lora_name": "gamma"})
    assert again.status_code == 404 and not again.json()["success"]

    info = ok(http.get("/get_server_info"))
    assert info["loaded_adapters"] == {"alpha": assets().adapters["alpha"]} and info["unloading_adapters"] == []
    assert {"native", "openai"} <= set(info["frontends"])
    assert info["max_total_tokens"] == engine.kv.allocator.capacity_tokens and info["served_model_name"] == "tiny"
    model = ok(http.get("/get_model_info"))
    assert model["vocab_size"] == engine.model.vocab_size and model["model_path"] == assets().base
    assert http.get("/health_generate").status_code == 200
    cached = engine.stats()["prefix_cache"]["cached_blocks"]
    assert ok(http.post("/flush_cache"))["flushed_blocks"] == cached
    assert engine.stats()["prefix_cache"]["cached_blocks"] == 0
    assert "loraserve_prefix_cache_hit_tokens_total" in http.get("/metrics").text
    assert {
        "flush_cache",
        "check_adapter_updates",
        "load_adapter",
        "unload_adapter",
        "unloading_adapters",
        "stats",
        "effective_settings",
    } <= used
