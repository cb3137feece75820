"""/metrics for a router and a dashboard, over a real server with two GPU adapter slots: which memory
tier holds each adapter (changed by loading, eviction and unloading), vLLM's lora_requests_info,
prompt and generation tokens by adapter, and no ``_created`` series."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch
from http_fixtures import ADAPTERS, RunningServer, assets, make_engine, wait_until
from prometheus_client.parser import text_string_to_metric_families

MAX_LORAS = 2  # the base model or one adapter beside the pinned one
RESIDENT = "loraserve_lora_adapter_resident"


@pytest.fixture(scope="module")
def served():
    engine = make_engine(adapters=["alpha"], max_loras_per_batch=MAX_LORAS, max_running_requests=1)
    server = RunningServer(engine)
    client = httpx.Client(base_url=server.url, timeout=60)
    yield server, client, engine
    client.close()
    server.stop()


def scrape(client: httpx.Client) -> dict[str, list]:
    """Sample name -> its samples, from the text exposition."""
    text = client.get("/metrics").text
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def residency(samples: dict[str, list]) -> dict[tuple[str, str], tuple[str, str, float]]:
    """(adapter, tier) -> (rank, pinned, value)."""
    out = {}
    for s in samples.get(RESIDENT, []):
        key = (s.labels["adapter"], s.labels["tier"])
        assert key not in out, f"two series for {key}"
        out[key] = (s.labels["rank"], s.labels["pinned"], s.value)
    return out


def counter(samples: dict[str, list], name: str, adapter: str) -> float:
    return sum(s.value for s in samples.get(name, []) if s.labels.get("adapter") == adapter)


def prompt_ids(n: int, seed: int) -> list[int]:
    return torch.randint(10, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def generate(client: httpx.Client, adapter: str | None, n_prompt: int, n_new: int, seed: int) -> dict:
    body = {
        "input_ids": prompt_ids(n_prompt, seed),
        "lora_path": adapter,
        "sampling_params": {"max_new_tokens": n_new, "temperature": 0, "ignore_eos": True},
    }
    res = client.post("/generate", json=body)
    assert res.status_code == 200, res.text
    return res.json()


def test_residency_follows_loading_eviction_and_unloading(served):
    _, client, _ = served
    res = client.post(
        "/load_lora_adapter", json={"lora_name": "beta", "lora_path": assets().adapters["beta"], "pinned": True}
    )
    assert res.status_code == 200, res.text
    generate(client, "alpha", 5, 3, seed=1)
    tiers = residency(scrape(client))
    alpha_rank, beta_rank = str(ADAPTERS["alpha"][0]), str(ADAPTERS["beta"][0])
    assert tiers == {
        ("alpha", "gpu"): (alpha_rank, "false", 1.0),
        ("alpha", "host"): (alpha_rank, "false", 1.0),
        ("beta", "gpu"): (beta_rank, "true", 1.0),
        ("beta", "host"): (beta_rank, "true", 1.0),
    }

    res = client.post("/load_lora_adapter", json={"lora_name": "gamma", "lora_path": assets().adapters["gamma"]})
    assert res.status_code == 200, res.text
    gamma_rank = str(ADAPTERS["gamma"][0])
    tiers = residency(scrape(client))
    assert tiers[("gamma", "gpu")] == (gamma_rank, "false", 0.0)  # loaded, not yet needed on the GPU
    assert tiers[("gamma", "host")] == (gamma_rank, "false", 1.0)

    generate(client, "gamma", 3, 2, seed=2)  # beta pinned, one slot left: alpha makes room for gamma
    tiers = residency(scrape(client))
    assert tiers[("gamma", "gpu")][2] == 1.0
    assert tiers[("alpha", "gpu")][2] == 0.0 and tiers[("alpha", "host")][2] == 1.0
    assert tiers[("beta", "gpu")][2] == 1.0

    assert client.post("/unload_lora_adapter", json={"lora_name": "gamma"}).status_code == 200
    assert {adapter for adapter, _ in residency(scrape(client))} == {"alpha", "beta"}  # no base model ("") either


def test_token_counters_by_adapter_equal_the_requests(served):
    _, client, _ = served
    requests = [("alpha", 5, 3), (None, 1, 4), ("alpha", 7, 1), ("beta", 3, 5)]
    before = scrape(client)
    sent = {"alpha": [0, 0], "": [0, 0], "beta": [0, 0]}
    for k, (adapter, n_prompt, n_new) in enumerate(requests):
        out = generate(client, adapter, n_prompt, n_new, seed=10 + k)
        assert len(out["output_ids"]) == n_new
        sent[adapter or ""][0] += n_prompt
        sent[adapter or ""][1] += len(out["output_ids"])
    after = scrape(client)
    for adapter, (prompt, generated) in sent.items():
        got_prompt = counter(after, "loraserve_prompt_tokens_total", adapter) - counter(
            before, "loraserve_prompt_tokens_total", adapter
        )
        got_generated = counter(after, "loraserve_generation_tokens_total", adapter) - counter(
            before, "loraserve_generation_tokens_total", adapter
        )
        assert (got_prompt, got_generated) == (prompt, generated), adapter


def test_lora_requests_info_names_running_and_waiting_adapters(served):
    _, client, _ = served
    start = time.time()
    idle = scrape(client)["loraserve_lora_requests_info"]
    assert [s.labels for s in idle] == [
        {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": str(MAX_LORAS)}
    ]
    assert start <= idle[0].value <= time.time()  # when the engine was seen, in unix seconds

    # one request runs at a time (max_running_requests=1): a long alpha request (about a second on a
    # CPU), then a beta one that waits for it
    done = []
    threads = [
        threading.Thread(target=lambda a=a, n=n, s=s: done.append(generate(client, a, 4, n, seed=s)))
        for a, n, s in (("alpha", 400, 20), ("beta", 8, 21))
    ]
    seen = set()

    def look() -> bool:
        for s in scrape(client)["loraserve_lora_requests_info"]:
            seen.add((s.labels["running_lora_adapters"], s.labels["waiting_lora_adapters"]))
        return len(done) == 2

    threads[0].start()
    assert wait_until(lambda: look() or ("alpha", "") in seen, timeout=30)
    threads[1].start()
    assert wait_until(look, timeout=60)
    for t in threads:
        t.join(10)
    assert ("alpha", "beta") in seen, seen


def test_no_created_series(served):
    _, client, _ = served
    generate(client, "alpha", 2, 2, seed=30)
    text = client.get("/metrics").text
    names = [s.name for family in text_string_to_metric_families(text) for s in family.samples]
    assert "loraserve_time_to_first_token_seconds_count" in names and "loraserve_requests_total" in names
    assert [n for n in names if n.endswith("_created")] == []
