"""Adapters pushed as tensors and updated in place (issue 20), over HTTP, against PEFT (CPU, float32).

``POST /load_lora_adapter_from_tensors`` gives PEFT's outputs and the same identity as the same
weights loaded from their directory; a wrong checksum, bad base64 or bad safetensors bytes are 400s
that register nothing, a loaded name without ``load_inplace`` a 409, a body past
``--max-request-body-bytes`` a 413, and ``--disable-lora-runtime-updates`` a 403. An in-place update
under load: a stream started before it finishes on the old weights, a request after it gets the new
ones (each PEFT's), the old version is freed after its last request; the prefix cache never serves
the old version's KV to the new one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from http_fixtures import RunningServer, assets, make_engine, wait_until
from peft import PeftModel
from test_multi_lora import NEW, peft_generate
from transformers import LlamaForCausalLM

GREEDY = {"max_new_tokens": NEW, "temperature": 0, "ignore_eos": True}
BODY_LIMIT = 256 * 1024  # room for the tiny adapters' base64, small enough to pass in a test


@pytest.fixture(scope="module")
def peft():
    base = LlamaForCausalLM.from_pretrained(assets().base).float().eval()
    base.generation_config.eos_token_id = None
    adapters = assets().adapters
    model = PeftModel.from_pretrained(base, adapters["alpha"], adapter_name="alpha")
    for name in ("beta", "gamma"):
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


@pytest.fixture(scope="module")
def served():
    engine = make_engine(adapters=["alpha"], max_request_body_bytes=BODY_LIMIT)
    server = RunningServer(engine)
    http = httpx.Client(base_url=server.url, timeout=60)
    yield http, engine
    http.close()
    server.stop()


def tensors_body(name: str, adapter: str, **extra) -> dict:
    """The /load_lora_adapter_from_tensors body for the test adapter ``adapter``'s files."""
    directory = Path(assets().adapters[adapter])
    raw = (directory / "adapter_model.safetensors").read_bytes()
    return {
        "lora_name": name,
        "config_dict": json.loads((directory / "adapter_config.json").read_text()),
        "tensors": base64.b64encode(raw).decode(),
        "checksum": f"sha256:{hashlib.sha256(raw).hexdigest()}",
        **extra,
    }


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(10, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def generate(http: httpx.Client, ids: list[int], adapter: str) -> dict:
    res = http.post("/generate", json={"input_ids": ids, "sampling_params": GREEDY, "lora_path": adapter})
    assert res.status_code == 200, res.text
    return res.json()


def cards(http: httpx.Client) -> dict[str, dict]:
    return {c["id"]: c for c in http.get("/v1/models").json()["data"]}


def unload(http: httpx.Client, name: str) -> None:
    res = http.post("/unload_lora_adapter", json={"lora_name": name})
    assert res.status_code == 200, res.text


def test_tensors_endpoint_equals_peft_and_equal_weights_have_equal_identities(served, peft):
    http, engine = served
    res = http.post("/load_lora_adapter_from_tensors", json=tensors_body("pushed", "beta"))
    assert res.status_code == 200, res.text
    assert res.json()["success"] and "pushed" in res.json()["loaded_adapters"]
    res = http.post("/load_lora_adapter", json={"lora_name": "beta_dir", "lora_path": assets().adapters["beta"]})
    assert res.status_code == 200, res.text
    try:
        ids = prompt(7, seed=1)
        want, _ = peft_generate(peft, [ids], ["beta"])
        assert generate(http, ids, "pushed")["output_ids"] == want[0]
        models = cards(http)
        pushed, from_dir, alpha = models["pushed"], models["beta_dir"], models["alpha"]
        assert pushed["identity"] == from_dir["identity"] != alpha["identity"]
        assert pushed["identity"].startswith("blake2b:") and len(pushed["identity"]) == len("blake2b:") + 64
        assert pushed["version"] != from_dir["version"]
        listed = {a["name"]: a for a in http.get("/get_server_info").json()["adapters"]}
        assert listed["pushed"]["identity"] == pushed["identity"]
        metrics = http.get("/metrics").text
        assert (
            f'loraserve_lora_adapter_info{{adapter="pushed",identity="{pushed["identity"]}",'
            f'version="{pushed["version"]}"}} 1.0' in metrics
        )
    finally:
        unload(http, "pushed")
        unload(http, "beta_dir")
    assert wait_until(lambda: _tensor_dirs(engine) == [])  # the private copies go with the adapters


def _tensor_dirs(engine) -> list[Path]:
    root = engine.lora.tensor_sources._root
    return list(Path(root).iterdir()) if root else []


@pytest.mark.parametrize(
    "change, status, says",
    [
        ({"checksum": "sha256:" + "0" * 64}, 400, "checksum mismatch"),
        ({"tensors": "not base64!"}, 400, "not valid base64"),
        ({"tensors": base64.b64encode(b"x" * 64).decode(), "checksum": None}, 400, "safetensors"),
        ({"config_dict": {"r": 4}}, 400, ""),
        ({"lora_name": "alpha"}, 409, "load_inplace"),
        ({"tensors": "A" * BODY_LIMIT}, 413, "max-request-body-bytes"),
    ],
)
def test_refused_tensor_loads_register_nothing(served, change, status, says):
    http, engine = served
    before = http.get("/v1/models").json()
    res = http.post("/load_lora_adapter_from_tensors", json={**tensors_body("refused", "gamma"), **change})
    assert res.status_code == status, res.text
    assert says in res.text
    assert http.get("/v1/models").json() == before
    assert _tensor_dirs(engine) == []  # nothing written is left behind


def test_runtime_updates_off_refuse_the_tensors_endpoint():
    engine = make_engine(adapters=["alpha"], disable_lora_runtime_updates=True)
    server = RunningServer(engine)
    try:
        res = httpx.post(f"{server.url}/load_lora_adapter_from_tensors", json=tensors_body("x", "gamma"), timeout=60)
        assert res.status_code == 403 and "--disable-lora-runtime-updates" in res.text
    finally:
        server.stop()


def test_in_place_update_under_load(served, peft):
    """A stream on v1 started before the update ends with alpha's tokens; a request after it gets
    gamma's; the old version stays pending until the stream ends, then its memory is freed."""
    http, engine = served
    step = engine.step
    engine.step = lambda: (time.sleep(0.03), step())[1]  # slow steps: the stream outlives the update
    try:
        ids = prompt(6, seed=2)
        want_old, _ = peft_generate(peft, [ids], ["alpha"])
        want_new, _ = peft_generate(peft, [ids], ["gamma"])
        assert want_old != want_new
        old_version = cards(http)["alpha"]["version"]
        body = {"input_ids": ids, "sampling_params": GREEDY, "lora_path": "alpha", "stream": True}
        streamed: list[dict] = []
        started = threading.Event()

        def consume() -> None:
            with http.stream("POST", "/generate", json=body) as res:
                for line in res.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        streamed.append(json.loads(line.removeprefix("data: ")))
                        started.set()

        reader = threading.Thread(target=consume)
        reader.start()
        assert started.wait(30)
        res = http.post(
            "/load_lora_adapter",
            json={"lora_name": "alpha", "lora_path": assets().adapters["gamma"], "load_inplace": True},
        )
        assert res.status_code == 200, res.text
        assert res.json()["adapter"]["version"] > old_version
        pending = http.get("/get_server_info").json()["unloading_adapters"]
        assert [(p["name"], p["version"], p["in_flight"]) for p in pending] == [("alpha", old_version, 1)]
        assert generate(http, ids, "alpha")["output_ids"] == want_new[0]
        reader.join(60)
        assert streamed and streamed[-1]["output_ids"] == want_old[0]
        assert wait_until(lambda: http.get("/get_server_info").json()["unloading_adapters"] == [])
        assert ("alpha", old_version) not in engine.lora.host.keys()
        engine.call_in_engine(engine.lora.check_integrity)
    finally:
        engine.step = step
        res = http.post(
            "/load_lora_adapter",
            json={"lora_name": "alpha", "lora_path": assets().adapters["alpha"], "load_inplace": True},
        )
        assert res.status_code == 200, res.text


def test_in_place_update_never_reuses_the_old_versions_cached_prefix(served, peft):
    http, _ = served
    ids = prompt(40, seed=3)  # 2.5 KV blocks: two of them cacheable
    first = generate(http, ids, "alpha")
    assert generate(http, ids, "alpha")["meta_info"]["cached_tokens"] > 0  # cached under v1
    try:
        res = http.post("/load_lora_adapter_from_tensors", json=tensors_body("alpha", "gamma", load_inplace=True))
        assert res.status_code == 200, res.text
        after = generate(http, ids, "alpha")
        assert after["meta_info"]["cached_tokens"] == 0
        want, _ = peft_generate(peft, [ids], ["gamma"])
        assert after["output_ids"] == want[0] != first["output_ids"]
        assert generate(http, ids, "alpha")["meta_info"]["cached_tokens"] > 0  # the new version caches its own
    finally:
        res = http.post(
            "/load_lora_adapter",
            json={"lora_name": "alpha", "lora_path": assets().adapters["alpha"], "load_inplace": True},
        )
        assert res.status_code == 200, res.text
