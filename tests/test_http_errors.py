"""Client mistakes over HTTP: each bad input gets the right 4xx and a message that says what to change
(OpenAI's error format on /v1 routes), and the server keeps serving: a good request right after
each one succeeds. Also ``--api-key``: every endpoint but /health needs the bearer key."""

from __future__ import annotations

import httpx
import openai
import pytest
from http_fixtures import RunningServer, assets, make_engine

GOOD = {"text": "still alive", "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
CHAT = [{"role": "user", "content": "hi"}]
LONG = "word " * 300  # ~300 tokens: fits the context of 512, not with 400 new tokens in a KV cache of 384

# (method, path, body (dict/list, or bytes sent raw), status, substring of the message)
CASES = [
    ("POST", "/generate", b"{not json", 400, "not valid JSON"),
    ("POST", "/generate", b"", 400, "request body is empty"),
    ("POST", "/generate", [1, 2], 400, "must be a JSON object"),
    ("POST", "/generate", {"sampling_params": {}}, 400, "exactly one of 'text'"),
    ("POST", "/generate", {"text": 5}, 400, "'text' must be a string"),
    ("POST", "/generate", {"text": "x", "temprature": 0}, 400, "unknown field(s) temprature"),
    ("POST", "/generate", {"text": "x", "sampling_params": {"temp": 0}}, 400, "unknown sampling parameter(s) temp"),
    ("POST", "/generate", {"text": "x", "sampling_params": {"temperature": -1}}, 400, "temperature=-1.0 is invalid"),
    (
        "POST",
        "/generate",
        {"text": "x", "sampling_params": {"max_new_tokens": "8"}},
        400,
        "max_new_tokens must be an integer",
    ),
    ("POST", "/generate", {"text": "x", "sampling_params": {"top_p": 0}}, 400, "0 < top_p <= 1"),
    ("POST", "/generate", {"text": "x", "sampling_params": {"n": 0}}, 400, "n=0 is invalid"),
    ("POST", "/generate", {"input_ids": [1, 99999999]}, 400, "outside the vocabulary"),
    ("POST", "/generate", {"input_ids": []}, 400, "'input_ids' must be a non-empty list"),
    ("POST", "/generate", {"text": "x", "lora_path": "nope"}, 404, "unknown adapter 'nope'"),
    ("POST", "/generate", {"text": ["a", "b"], "lora_path": ["alpha"]}, 400, "lora_path has 1 entries"),
    (
        "POST",
        "/generate",
        {"text": "x", "sampling_params": {"max_new_tokens": 600}},
        400,
        "more than the model's context length of 512",
    ),
    (
        "POST",
        "/generate",
        {"text": LONG, "sampling_params": {"max_new_tokens": 150}},
        400,
        "can never fit in the KV cache of 384 tokens",
    ),
    ("POST", "/generate", {"text": "x", "stream": "yes"}, 400, "stream must be true or false"),
    (
        "POST",
        "/load_lora_adapter",
        {"lora_name": "x", "lora_path": "/does/not/exist"},
        404,
        "no adapter loader can read",
    ),
    ("POST", "/load_lora_adapter", {"lora_name": "x"}, 400, "lora_path is required"),
    ("POST", "/load_lora_adapter", {"lora_name": "base", "lora_path": "."}, 400, "invalid adapter name 'base'"),
    ("POST", "/unload_lora_adapter", {"lora_name": "nope"}, 404, "no adapter named 'nope'"),
    ("GET", "/generate", None, 405, "use POST"),
    ("GET", "/no/such/endpoint", None, 404, "there is no endpoint GET /no/such/endpoint"),
    ("POST", "/v1/completions", {"model": "nope", "prompt": "x"}, 404, "the model 'nope' does not exist"),
    ("POST", "/v1/completions", {"model": "tiny"}, 400, "prompt is required"),
    (
        "POST",
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "temperature": "hot"},
        400,
        "temperature: Input should be a valid number",
    ),
    (
        "POST",
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "max_tokens": 10_000},
        400,
        "max_tokens is 10000: together more than the model's context length",
    ),
    (
        "POST",
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "frobnicate": 1},
        400,
        "unknown field 'frobnicate'; remove it",
    ),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 50}, 400, "logprobs=50 is invalid"),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": [[]]}, 400, "prompt must be a string"),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "stop": 3}, 400, "stop: must be a string"),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "n": 1000}, 400, "n=1000 is invalid"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages is empty"),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "unknown role 'wizard'",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        },
        400,
        "'image_url' part is not supported",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "tiny", "messages": CHAT, "tools": [{"type": "function"}]},
        400,
        "tools (function calling) are not supported",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "tiny", "messages": CHAT, "top_logprobs": 2},
        400,
        "top_logprobs needs logprobs=true",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": LONG * 2}]},
        400,
        "leaves no room to generate within 384 tokens",
    ),
]


@pytest.fixture(scope="module")
def client():
    engine = make_engine(max_total_tokens=384)
    server = RunningServer(engine)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
    server.stop()


@pytest.mark.parametrize(
    "method, path, body, status, message", CASES, ids=[f"{m} {p} {i}" for i, (m, p, *_) in enumerate(CASES)]
)
def test_bad_input_gets_a_4xx_with_a_message_then_the_server_still_serves(client, method, path, body, status, message):
    if isinstance(body, bytes):
        res = client.request(method, path, content=body, headers={"content-type": "application/json"})
    else:
        res = client.request(method, path, json=body)
    assert res.status_code == status, res.text
    data = res.json()
    if "success" in data:  # the adapter endpoints answer SGLang's {success, error_message, loaded_adapters}
        assert data["success"] is False
        text = data["error_message"]
    elif path.startswith("/v1/"):
        err = data["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
        assert err["code"] == ("model_not_found" if status == 404 else None)
        text = err["message"]
    else:
        assert data["error"]["code"] == status
        text = data["error"]["message"]
    assert message in text, text
    ok = client.post("/generate", json=GOOD)
    assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 2


def test_bad_stream_request_is_refused_before_the_stream_starts(client):
    res = client.post("/generate", json={"text": "x", "stream": True, "lora_path": "nope"})
    assert res.status_code == 404 and "unknown adapter" in res.json()["error"]["message"]
    res = client.post(
        "/v1/chat/completions", json={"model": "tiny", "messages": CHAT, "stream": True, "max_tokens": 5000}
    )
    assert res.status_code == 400 and "context length" in res.json()["error"]["message"]


def test_api_key_guards_every_endpoint_but_health():
    engine = make_engine(adapters=["alpha"], api_key="s3cret")
    server = RunningServer(engine)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as anon:
            assert anon.get("/health").status_code == 200
            for method, path in (
                ("POST", "/generate"),
                ("GET", "/metrics"),
                ("GET", "/get_server_info"),
                ("GET", "/v1/models"),
                ("POST", "/load_lora_adapter"),
                ("GET", "/health_generate"),
                ("POST", "/flush_cache"),
                ("GET", "/flush_cache"),
            ):
                res = anon.request(method, path, json=GOOD)
                assert res.status_code == 401, path
                assert "Authorization: Bearer" in res.json()["error"]["message"]
                assert res.headers["www-authenticate"] == "Bearer"
            wrong = anon.post("/generate", json=GOOD, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and "is wrong" in wrong.json()["error"]["message"]
            assert anon.get("/v1/models").json()["error"]["code"] == "invalid_api_key"
            good = anon.post("/generate", json=GOOD, headers={"Authorization": "Bearer s3cret"})
            assert good.status_code == 200
            info = anon.get("/get_server_info", headers={"Authorization": "Bearer s3cret"}).json()
            assert info["api_key"] == "<set>"
            flushed = anon.post("/flush_cache", headers={"Authorization": "Bearer s3cret"})
            assert flushed.status_code == 200 and flushed.json()["flushed_blocks"] >= 0
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret", max_retries=0)
        assert {m.id for m in client.models.list().data} == {"tiny", "alpha"}
        res = client.completions.create(model="alpha", prompt="x", max_tokens=2, temperature=0)
        assert res.usage.completion_tokens == 2
    finally:
        server.stop()


def test_loading_a_corrupt_adapter_is_a_400_and_nothing_half_loads(client, tmp_path):
    import shutil

    bad = tmp_path / "corrupt"
    shutil.copytree(assets().adapters["alpha"], bad)
    weights = next(bad.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    res = client.post("/load_lora_adapter", json={"lora_name": "corrupt", "lora_path": str(bad)})
    assert res.status_code == 400 and res.json()["success"] is False
    assert "corrupt" not in res.json()["loaded_adapters"]
    assert "corrupt" not in {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert client.post("/generate", json=GOOD).status_code == 200


def test_an_adapter_gone_from_disk_after_its_host_eviction_is_a_503_for_its_requests_only(tmp_path):
    """An adapter evicted from the host tier whose files were deleted: its request is a 503 naming the
    adapter and what to do (read again on a worker thread, failed before the step: nothing else fails);
    requests of the other adapters, before and after, are answered as usual."""
    import shutil

    names = ("alpha", "beta", "gamma")
    for name in names:
        shutil.copytree(assets().adapters[name], tmp_path / name)
    lora_paths = [f"{n}={tmp_path / n}" for n in names]
    engine = make_engine(adapters=(), lora_paths=lora_paths, max_loras_per_batch=2, max_loaded_loras=2)
    server = RunningServer(engine)
    try:
        gone = [n for n in names if engine.lora.host.get(engine.lora.registry.get(n).key) is None]
        assert len(gone) == 1, "three adapters through a host tier of two: one is evicted at start-up"
        gone = gone[0]
        assert engine.lora.pool.slot_of(engine.lora.registry.get(gone).key) is None  # never in a slot
        shutil.rmtree(tmp_path / gone)
        with httpx.Client(base_url=server.url, timeout=60) as c:
            res = c.post("/generate", json={**GOOD, "lora_path": gone})
            assert res.status_code == 503, res.text
            assert f"adapter {gone!r} could not be read again" in res.text and "reload" in res.text
            for name in names:
                if name != gone:
                    assert c.post("/generate", json={**GOOD, "lora_path": name}).status_code == 200
            assert c.post("/generate", json=GOOD).status_code == 200
    finally:
        server.stop()
