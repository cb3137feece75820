"""loraserve on Ray Serve (loraserve.ray_serve): a local Ray instance on 127.0.0.1, 2 replicas of a
tiny model on CPU, 4 adapters loaded through the ingress. Greedy tokens through the ingress equal
PEFT's; requests for one adapter land on the replica that loaded it (the replicas' metrics);
/v1/models lists the fleet; a flush and an unload reach both replicas; a replica killed while it
streams ends that stream (with an error event) instead of hanging, and is replaced. Every wait is
bounded. Skipped without Ray (``pip install 'loraserve[ray]'``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from test_multi_lora import ADAPTERS, NEW, peft_generate, prompts, setup  # noqa: E402,F401 (fixture)

from loraserve.settings import make_settings  # noqa: E402

pytestmark = pytest.mark.slow
DEADLINE_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, check, timeout: float = DEADLINE_S):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (httpx.HTTPError, ValueError) as exc:
            last = exc
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout:.0f} s (last error: {last!r})")


@pytest.fixture(scope="module")
def fleet(setup, tmp_path_factory):
    from loraserve.ray_serve import NAMESPACE, build_app, shutdown_fleet

    base, paths, peft = setup
    port = _free_port()
    ray.init(
        num_cpus=2,
        namespace=NAMESPACE,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"TRITON_INTERPRET": "1"}},
        log_to_driver=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = make_settings(
            model_path=base,
            device="cpu",
            max_total_tokens=1024,
            enable_lora=True,
            max_lora_rank=8,
            max_loras_per_batch=4,
        )
        app = build_app(settings, num_replicas=2, max_adapters_per_replica=4, replica_cpus=0)
        serve.run(app, name="loraserve", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        client = httpx.Client(base_url=url, timeout=60)
        _wait("the fleet answers /health", lambda: client.get("/health").status_code == 200)
        yield client, base, paths, peft
        client.close()
    finally:
        shutdown_fleet()
        ray.shutdown()


def _reports():
    from loraserve.ray_serve import catalog_handle

    return ray.get(catalog_handle().replica_reports.remote())


def _generate(client, ids, adapter):
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": NEW, "temperature": 0, "ignore_eos": True}}
    if adapter is not None:
        body["lora_path"] = adapter
    return client.post("/generate", json=body)


def test_fleet_serves_peft_outputs_routes_by_adapter_unloads_everywhere_and_survives_a_kill(fleet):
    client, base, paths, peft = fleet
    names = list(ADAPTERS)
    for name in names:
        r = client.post("/load_lora_adapter", json={"lora_name": name, "lora_path": paths[name]})
        assert r.status_code == 200 and r.json()["success"], r.text
    bad = client.post("/load_lora_adapter", json={"lora_name": "bad", "lora_path": "/nonexistent/adapter"})
    assert bad.status_code in (400, 404) and not bad.json()["success"]
    assert client.post("/load_lora_adapter", json={"lora_name": "x"}).status_code == 400
    for hostile in (  # a fuzzer's bodies: each a clear 4xx with an error message, nothing registered
        b'{"lora_name": "\\ud800", "lora_path": "/tmp"}',
        b'{"lora_name": "../up", "lora_path": "/tmp"}',
        b'{"lora_name": "ok", "lora_path": "\\u0000"}',
        b'{"lora_name": 1e999, "lora_path": "/tmp"}',
        b"[" * 100_000,
    ):
        for route in ("/load_lora_adapter", "/unload_lora_adapter"):
            r = client.post(route, content=hostile, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500 and r.json(), (route, hostile[:40], r.text[:200])
    json_type = {"content-type": "application/json"}
    assert client.post("/unload_lora_adapter", content=b" " * (33 * 2**20), headers=json_type).status_code == 413
    assert {m["id"] for m in client.get("/v1/models").json()["data"]} & {"bad", "ok", "../up", "\ud800"} == set()

    # outputs equal PEFT's, for every adapter and the base model, through the ingress
    rows = [*names, None]
    batch = prompts(len(rows), seed=41)
    expected, _ = peft_generate(peft, batch, rows)
    for ids, adapter, want in zip(batch, rows, expected):
        r = _generate(client, ids, adapter)
        assert r.status_code == 200, r.text
        assert r.json()["output_ids"] == want, adapter

    # a fleet-wide flush reaches every replica: a repeated long prompt is cached, and after it is not
    long_prompt, cached = prompts(1, length=70, seed=5)[0], names[2]

    def cached_tokens():
        return _generate(client, long_prompt, cached).json()["meta_info"]["cached_tokens"]

    assert cached_tokens() == 0 and cached_tokens() >= 32  # full blocks of the first request
    flushed = client.post("/flush_cache").json()
    assert flushed["flushed_replicas"] == 2 and flushed["pending_replicas"] == [], flushed
    assert cached_tokens() == 0

    # routing: more requests for one adapter stay on the replica that holds it
    hot = names[0]
    for _ in range(6):
        assert _generate(client, batch[0], hot).status_code == 200
    reports = _wait("both replicas report", lambda: (rep := _reports()) and len(rep) == 2 and rep)
    reports = _wait(
        "the reports count the hot adapter's 7 requests",
        lambda: (rep := _reports()) and sum(r["requests"].get(hot, 0) for r in rep.values()) == 7 and rep,
    )
    serving = [rid for rid, r in reports.items() if r["requests"].get(hot)]
    assert len(serving) == 1, reports
    assert hot in reports[serving[0]]["adapters"]
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for s in family.samples
    }
    assert samples[("loraserve_replica_requests_total", (("adapter", hot), ("replica", serving[0])))] == 7
    assert samples[("loraserve_fleet_requests_total", (("adapter", hot),))] == 7
    assert samples[("loraserve_fleet_replicas", ())] == 2

    models = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == [models[0]["id"], *sorted(names)]
    assert serving[0] in next(m for m in models if m["id"] == hot)["replicas"]

    # unload reaches every replica: the engines drop it and a request for it is a 404
    assert client.post("/unload_lora_adapter", json={"lora_name": hot}).json()["success"]
    assert client.post("/unload_lora_adapter", json={"lora_name": hot}).status_code == 404
    _wait(
        "no replica's engine holds the unloaded adapter",
        lambda: (rep := _reports()) and all(hot not in r["engine_adapters"] for r in rep.values()),
    )
    gone = _generate(client, batch[0], hot)
    assert gone.status_code == 404, gone.text

    # a killed replica: Ray replaces it, and requests are served again (each answer an error or PEFT's)
    victim = names[1]
    holder = next(r for r in _reports().values() if victim in r["adapters"])
    # killed while it streams an answer: the stream ends (finished, or with an error event), never hangs
    body = {
        "input_ids": batch[1],
        "lora_path": victim,
        "stream": True,
        "sampling_params": {"max_new_tokens": 240, "temperature": 0, "ignore_eos": True},
    }
    with client.stream("POST", "/generate", json=body, timeout=httpx.Timeout(90)) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data:")
        os.kill(holder["pid"], signal.SIGKILL)
        started, rest = time.monotonic(), []
        try:
            rest.extend(lines)
        except httpx.ReadTimeout:
            pytest.fail("the stream of a killed replica hung")
        except httpx.HTTPError as exc:  # the connection ended early: an error, not a hang
            rest.append(f"error: {exc!r}")
    assert time.monotonic() - started < 60
    ended = "\n".join(rest)
    assert "data: [DONE]" in ended or "error" in ended, ended[-500:]

    def served_again():
        r = _generate(client, batch[1], victim)
        assert r.status_code in (200, 500, 503), r.text
        return r.status_code == 200 and r.json()["output_ids"] == expected[1]

    _wait("the fleet serves the killed replica's adapter again", served_again)
    _wait(
        "Ray replaced the killed replica",
        lambda: len([r for r in _reports().values() if time.time() - r["reported_at"] < 5]) == 2,
    )


def test_request_adapters_reads_the_names_a_body_uses():
    """The ingress's reading of a body (no Ray needed): every spelling, and hostile bodies give []."""
    from loraserve.ray_serve import request_adapters

    def names(path, body):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return request_adapters(path, raw, "base")

    assert names("/generate", {"lora_path": "a"}) == ["a"]
    assert names("/generate", {"lora_path": ["a", None, "b", "a"]}) == ["a", "b"]
    assert names("/generate", {"lora_path": [{"name": "a", "weight": 0.5}, {"name": "c", "weight": 0.5}]}) == ["a", "c"]
    assert names("/generate", {"lora_path": [[{"name": "a", "weight": 1}], "b"]}) == ["a", "b"]
    assert names("/v1/completions", {"model": "base"}) == []
    assert names("/v1/completions", {"model": "base:a"}) == ["a"]
    assert names("/v1/chat/completions", {"model": "a*0.7+b*-0.3"}) == ["a", "b"]
    assert names("/v1/chat/completions", {"model": "base:a*0.7+b*0.3"}) == ["a", "b"]
    assert names("/v1/chat/completions", {"model": "a**"}) == []  # malformed: the replica answers 400
    assert names("/health", {"model": "a"}) == []
    for hostile in (b"\xff\xfe", b"[" * 100_000, b'{"lora_path": "\\ud800"}', b'"a"', b"{}", {"model": "x" * 10_000}):
        assert names("/generate", hostile) == [] and names("/v1/completions", hostile) == []
