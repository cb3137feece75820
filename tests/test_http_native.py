"""The native (SGLang-compatible) API over a real uvicorn server: /generate single, batch (adapters and
the base mixed), streaming, logprobs and n, against the engine's Python API for the same requests;
the info endpoints; Prometheus metrics; adapter load/unload answers; cached prompt tokens in
``meta_info`` and the prefix cache's metrics, emptied by /flush_cache."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from http_fixtures import GREEDY, RunningServer, assets, make_engine
from prometheus_client.parser import text_string_to_metric_families


@pytest.fixture(scope="module")
def served():
    engine = make_engine()
    server = RunningServer(engine)
    client = httpx.Client(base_url=server.url, timeout=60)
    yield server, client, engine
    client.close()
    server.stop()


def same(http: dict, ref: dict) -> None:
    """An HTTP result equals the Python API's result (ids and timings aside)."""
    assert http["output_ids"] == ref["output_ids"]
    assert http["text"] == ref["text"]
    for key in ("prompt_tokens", "completion_tokens", "finish_reason", "lora_path"):
        assert http["meta_info"][key] == ref["meta_info"][key], key
    if "output_token_logprobs" in ref["meta_info"]:
        got, want = http["meta_info"]["output_token_logprobs"], ref["meta_info"]["output_token_logprobs"]
        assert [t for _, t in got] == [t for _, t in want]
        assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=1e-4)


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_single_and_mixed_adapter_batches_equal_the_python_api(served):
    _, client, engine = served
    single = client.post("/generate", json={"text": "The capital of France", "sampling_params": GREEDY})
    assert single.status_code == 200
    same(single.json(), engine.generate("The capital of France", GREEDY))

    prompts = ["Once upon a time", "Once upon a time", "Once upon a time", "Hi", "A list:"]
    loras = ["alpha", None, "beta", "beta", "alpha"]
    batch = client.post("/generate", json={"text": prompts, "sampling_params": GREEDY, "lora_path": loras})
    assert batch.status_code == 200
    results = batch.json()
    for got, want in zip(results, engine.generate(prompts, GREEDY, loras)):
        same(got, want)
    assert [r["meta_info"]["lora_path"] for r in results] == loras
    # the same prompt under two adapters and the base: three different continuations
    assert len({tuple(r["output_ids"]) for r in results[:3]}) == 3

    ids = [[5, 17, 300, 41], [9000, 12], [77]]
    params = [GREEDY, {**GREEDY, "max_new_tokens": 3}, {"max_new_tokens": 6, "temperature": 0.8, "seed": 7}]
    by_ids = client.post(
        "/generate", json={"input_ids": ids, "sampling_params": params, "lora_path": [None, "alpha", "beta"]}
    )
    assert by_ids.status_code == 200
    for got, want in zip(
        by_ids.json(), engine.generate(input_ids=ids, sampling_params=params, lora_path=[None, "alpha", "beta"])
    ):
        same(got, want)


def test_stream_sends_growing_text_and_ends_with_the_python_api_result(served):
    _, client, engine = served
    body = {"text": "Streaming works", "sampling_params": GREEDY, "lora_path": "alpha", "stream": True}
    with client.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) == GREEDY["max_new_tokens"]
    for prev, cur in zip(chunks, chunks[1:]):
        assert (
            cur["text"].startswith(prev["text"]) and cur["output_ids"][: len(prev["output_ids"])] == prev["output_ids"]
        )
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    same(chunks[-1], engine.generate("Streaming works", GREEDY, "alpha"))

    prompts, loras = ["one", "two", "three"], ["beta", None, "alpha"]
    body = {"text": prompts, "sampling_params": GREEDY, "lora_path": loras, "stream": True}
    with client.stream("POST", "/generate", json=body) as response:
        events = sse_events(response)
    finals = {c["index"]: c for c in events[:-1] if c["meta_info"]["finish_reason"] is not None}
    assert sorted(finals) == [0, 1, 2]
    for i, want in enumerate(engine.generate(prompts, GREEDY, loras)):
        same(finals[i], want)


def test_logprobs_and_n(served):
    _, client, engine = served
    body = {
        "text": "Logprobs",
        "sampling_params": {**GREEDY, "max_new_tokens": 5},
        "return_logprob": True,
        "top_logprobs_num": 3,
        "lora_path": "beta",
    }
    res = client.post("/generate", json=body).json()
    ref = engine.generate(
        "Logprobs", {**GREEDY, "max_new_tokens": 5, "return_logprob": True, "top_logprobs_num": 3}, "beta"
    )
    same(res, ref)
    tops = res["meta_info"]["output_top_logprobs"]
    assert len(tops) == 5 and all(len(row) == 3 for row in tops)
    assert [row[0][1] for row in tops] == res["output_ids"]  # greedy: the top-1 token is the one chosen

    sampled = {"max_new_tokens": 8, "temperature": 1.0, "seed": 123, "n": 3}
    res = client.post("/generate", json={"text": "Sample", "sampling_params": sampled}).json()
    assert isinstance(res, list) and len(res) == 3
    refs = engine.generate(["Sample"] * 3, [{**sampled, "n": 1, "seed": 123 + j} for j in range(3)])
    for got, want in zip(res, refs):
        same(got, want)
    assert len({tuple(r["output_ids"]) for r in res}) > 1


def test_info_endpoints(served):
    server, client, engine = served
    health = client.get("/health")
    assert health.status_code == 200 and health.content == b""
    assert client.get("/health_generate").status_code == 200
    info = client.get("/get_model_info").json()
    assert info["model_path"] == assets().base and info["is_generation"] is True
    assert info["served_model_name"] == "tiny" and info["context_length"] == engine.context_len
    server_info = client.get("/get_server_info").json()
    assert server_info["max_loras_per_batch"] == 4 and server_info["max_total_tokens"] == 4096
    assert set(server_info["frontends"]) >= {"native", "openai"}
    assert set(server_info["loaded_adapters"]) == {"alpha", "beta"}


def test_server_info_tells_the_effective_settings_not_the_raw_inputs(served):
    server, client, engine = served
    assert engine.settings.attention_backend is None and engine.settings.max_running_requests is None  # the inputs
    info = client.get("/get_server_info").json()
    assert (info["device"], info["dtype"]) == ("cpu", "float32")
    assert (info["lora_backend"], info["attention_backend"]) == ("torch", "torch_native")
    assert info["max_total_tokens"] == engine.kv.allocator.capacity_tokens
    assert info["max_running_requests"] == engine.scheduler.max_running == 64
    assert info["chunked_prefill_size"] == engine.scheduler.chunk_size
    assert info["max_lora_rank"] == engine.lora.max_rank and info["enable_lora"] is True
    assert info["disable_cuda_graph"] is True and info["cuda_graph_max_bs"] is None  # no graphs on CPU
    effective = (
        "device",
        "dtype",
        "lora_backend",
        "attention_backend",
        "max_total_tokens",
        "max_running_requests",
        "chunked_prefill_size",
        "max_lora_rank",
        "lora_target_modules",
        "context_length",
    )
    assert not [k for k in effective if info[k] in ("auto", None)]


def _samples(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_requests_tokens_latency_and_lora_state(served):
    _, client, engine = served
    before = _samples(client.get("/metrics").text)
    prompts, loras = ["m1", "m2", "m3"], ["alpha", None, "beta"]
    results = client.post("/generate", json={"text": prompts, "sampling_params": GREEDY, "lora_path": loras}).json()
    after_text = client.get("/metrics").text
    after = _samples(after_text)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    for lora in loras:
        assert delta("loraserve_requests_total", adapter=lora or "", finish_reason="length") >= 1
    assert sum(delta("loraserve_prompt_tokens_total", adapter=lora or "") for lora in loras) >= sum(
        r["meta_info"]["prompt_tokens"] for r in results
    )
    assert (
        sum(delta("loraserve_generation_tokens_total", adapter=lora or "") for lora in loras)
        >= 3 * GREEDY["max_new_tokens"]
    )
    assert delta("loraserve_time_to_first_token_seconds_count") >= 3
    assert delta("loraserve_time_per_output_token_seconds_count") >= 3
    assert delta("loraserve_http_responses_total", route="/generate", status="200") >= 1
    assert after[("loraserve_lora_slots_total", ())] == 4
    assert after[("loraserve_lora_slots_in_use", ())] == len(engine.lora.pool.resident())
    assert after[("loraserve_lora_host_cache_adapters", ())] == len(engine.lora.host)
    assert after[("loraserve_lora_loads_total", ())] == engine.lora.metrics["loads"]
    assert after[("loraserve_lora_slot_hits_total", ())] == engine.lora.metrics["hits"]
    assert after[("loraserve_num_requests_waiting", ())] == 0
    assert ("loraserve_lora_evictions_total", (("tier", "gpu"),)) in after


def test_adapter_load_and_unload_answers(served):
    _, client, engine = served
    path = assets().adapters["gamma"]
    for prefix in ("", "/v1"):
        res = client.post(f"{prefix}/load_lora_adapter", json={"lora_name": "gamma", "lora_path": path})
        assert res.status_code == 200
        entry = next(a for a in engine.loaded_adapters() if a["name"] == "gamma")
        assert entry["identity"].startswith("blake2b:") and entry["source"] == path
        assert res.json() == {
            "success": True,
            "error_message": None,
            "loaded_adapters": {**{n: assets().adapters[n] for n in ("alpha", "beta")}, "gamma": path},
            "adapter": entry,
        }
        again = client.post(f"{prefix}/load_lora_adapter", json={"lora_name": "gamma", "lora_path": path})
        assert again.status_code == 409 and again.json()["success"] is False
        assert "already loaded" in again.json()["error_message"]
        got = client.post("/generate", json={"text": "g", "sampling_params": GREEDY, "lora_path": "gamma"}).json()
        same(got, engine.generate("g", GREEDY, "gamma"))
        res = client.post(f"{prefix}/unload_lora_adapter", json={"lora_name": "gamma"})
        assert res.status_code == 200 and "gamma" not in res.json()["loaded_adapters"]
        res = client.post(f"{prefix}/unload_lora_adapter", json={"lora_name": "gamma"})
        assert res.status_code == 404 and "no adapter named 'gamma'" in res.json()["error_message"]


def test_the_engine_imports_without_the_http_stack():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for m in ('fastapi', 'starlette', 'uvicorn', 'prometheus_client'): sys.modules[m] = None\n"
        "import loraserve.engine.engine, loraserve.cli\n"
        "from loraserve.plugin_manager import PluginManager\n"
        "print(sorted(PluginManager().load().frontends.names()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['native', 'openai']"


def _prompt_ids(n: int, seed: int) -> list[int]:
    return torch.randint(10, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_repeated_prompt_reports_cached_tokens_until_flush_cache(served):
    _, client, engine = served
    block = engine.kv.allocator.block_size
    ids = _prompt_ids(2 * block + 13, seed=19)  # two full blocks and a partial one; seen by no other test
    body = {"input_ids": ids, "sampling_params": GREEDY, "lora_path": "alpha"}
    before = _samples(client.get("/metrics").text)
    first = client.post("/generate", json=body).json()
    second = client.post("/generate", json=body).json()
    assert first["meta_info"]["cached_tokens"] == 0
    assert second["meta_info"]["cached_tokens"] == 2 * block  # the full blocks; the partial one is computed
    assert second["output_ids"] == first["output_ids"] and second["text"] == first["text"]
    with client.stream("POST", "/generate", json={**body, "stream": True}) as response:
        chunks = sse_events(response)[:-1]
    assert [c["meta_info"]["cached_tokens"] for c in chunks] == [2 * block] * len(chunks)
    assert chunks[-1]["output_ids"] == first["output_ids"]

    after = _samples(client.get("/metrics").text)

    def grew(name: str) -> float:
        return after[(name, ())] - before[(name, ())]

    assert grew("loraserve_prefix_cache_hit_tokens_total") == 4 * block  # the second and the streamed one
    assert grew("loraserve_prefix_cache_queried_tokens_total") >= 3 * len(ids)
    assert after[("loraserve_prefix_cache_cached_blocks", ())] >= 2
    assert after[("loraserve_prefix_cache_evictable_blocks", ())] == after[("loraserve_prefix_cache_cached_blocks", ())]
    assert ("loraserve_prefix_cache_evicted_blocks_total", ()) in after

    flushed = client.post("/flush_cache")
    assert flushed.status_code == 200
    assert flushed.json()["flushed_blocks"] == after[("loraserve_prefix_cache_cached_blocks", ())]
    assert "flushed" in flushed.json()["message"]
    assert client.get("/flush_cache").json()["flushed_blocks"] == 0  # GET too, as SGLang; nothing left
    assert _samples(client.get("/metrics").text)[("loraserve_prefix_cache_cached_blocks", ())] == 0
    third = client.post("/generate", json=body).json()
    assert third["meta_info"]["cached_tokens"] == 0 and third["output_ids"] == first["output_ids"]


def test_without_the_prefix_cache_nothing_is_cached_or_exported():
    engine = make_engine(adapters=[], disable_radix_cache=True)
    server = RunningServer(engine)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            body = {"input_ids": _prompt_ids(40, seed=20), "sampling_params": GREEDY}
            answers = [client.post("/generate", json=body).json() for _ in range(2)]
            assert [a["meta_info"]["cached_tokens"] for a in answers] == [0, 0]
            assert answers[0]["output_ids"] == answers[1]["output_ids"]
            flushed = client.post("/flush_cache")
            assert flushed.status_code == 200 and flushed.json()["flushed_blocks"] == 0
            assert "--disable-radix-cache" in flushed.json()["message"]
            assert "loraserve_prefix_cache" not in client.get("/metrics").text
    finally:
        server.stop()
