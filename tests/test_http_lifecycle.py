"""Adapters and requests coming and going over HTTP: load, use, unload and reload an adapter while
other requests stream; clients that disconnect mid-stream or mid-request free their requests and KV
blocks; shutdown lets in-flight requests finish, or answers them with an error after the grace
period; ``loraserve`` serves from the command line and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from http_fixtures import GREEDY, RunningServer, assets, make_engine, wait_until
from test_http_native import same, sse_events

LONG_STREAM = {"max_new_tokens": 200, "temperature": 0, "ignore_eos": True}


def start_stream(url: str, body: dict, out: dict) -> threading.Thread:
    """Stream /generate in a thread; ``out`` gets the events and the time the last one arrived."""

    def run():
        with httpx.Client(base_url=url, timeout=120) as c, c.stream("POST", "/generate", json=body) as res:
            out["status"] = res.status_code
            out["events"] = sse_events(res)
            out["done_at"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_load_use_unload_reload_while_other_requests_stream():
    engine = make_engine()
    server = RunningServer(engine)
    paths = assets().adapters
    step = engine.step
    engine.step = lambda: (time.sleep(0.02), step())[1]  # the streams (4 s at least) outlive the operations
    try:
        streams = [
            ({"text": "stream one", "sampling_params": LONG_STREAM, "lora_path": "alpha", "stream": True}, {}),
            ({"text": "stream two", "sampling_params": LONG_STREAM, "stream": True}, {}),
        ]
        threads = [start_stream(server.url, body, out) for body, out in streams]
        assert wait_until(lambda: len(engine.scheduler.running) == 2)
        with httpx.Client(base_url=server.url, timeout=60) as c:
            load = c.post("/load_lora_adapter", json={"lora_name": "gamma", "lora_path": paths["gamma"]})
            assert load.status_code == 200 and load.json()["success"], load.text
            used = c.post(
                "/generate", json={"text": ["use", "use"], "sampling_params": GREEDY, "lora_path": ["gamma", "beta"]}
            ).json()
            old_gamma = engine.generate("use", GREEDY, "gamma")
            same(used[0], old_gamma)
            unload = c.post("/unload_lora_adapter", json={"lora_name": "gamma"})
            assert unload.status_code == 200 and "gamma" not in unload.json()["loaded_adapters"]
            gone = c.post("/generate", json={"text": "use", "sampling_params": GREEDY, "lora_path": "gamma"})
            assert gone.status_code == 404 and "unknown adapter 'gamma'" in gone.json()["error"]["message"]
            assert "gamma" not in {m["id"] for m in c.get("/v1/models").json()["data"]}
            # reload the name with other weights: a new version, never the old weights
            reload = c.post("/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": paths["beta"]})
            assert reload.status_code == 200 and reload.json()["loaded_adapters"]["gamma"] == paths["beta"]
            new_gamma = c.post(
                "/v1/completions",
                json={"model": "gamma", "prompt": "use", "max_tokens": 12, "temperature": 0, "ignore_eos": True},
            ).json()
            assert new_gamma["choices"][0]["text"] == used[1]["text"] != old_gamma["text"]
            ops_done = time.monotonic()
            engine.step = step
        for t in threads:
            t.join(120)
        for body, out in streams:
            assert out["status"] == 200 and out["events"][-1] == "[DONE]"
            assert out["done_at"] > ops_done, "the streams ended before the adapter operations: make them longer"
            same(out["events"][-2], engine.generate(body["text"], LONG_STREAM, body.get("lora_path")))
        engine.lora.check_integrity()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def served():
    engine = make_engine(adapters=["alpha"])
    server = RunningServer(engine)
    yield server, engine
    server.stop()


def _aborts(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("loraserve_requests_total{") and 'finish_reason="abort"' in line
    )


def _all_free(engine) -> bool:
    alloc = engine.kv.allocator
    return alloc.num_free == alloc.num_blocks and not engine.scheduler.running and not engine.scheduler.waiting


@pytest.mark.parametrize(
    "path, body",
    [
        (
            "/generate",
            {
                "text": "bye",
                "sampling_params": {**LONG_STREAM, "max_new_tokens": 450},
                "stream": True,
                "lora_path": "alpha",
            },
        ),
        (
            "/v1/chat/completions",
            {
                "model": "alpha",
                "messages": [{"role": "user", "content": "bye"}],
                "stream": True,
                "max_tokens": 400,
                "ignore_eos": True,
            },
        ),
    ],
)
def test_client_disconnecting_mid_stream_frees_its_request(served, path, body):
    server, engine = served
    before = _aborts(server.url)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", path, json=body) as res:
            lines = res.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: {") for line in got)
            assert engine.kv.allocator.num_free < engine.kv.allocator.num_blocks
    assert wait_until(lambda: _all_free(engine), timeout=10)
    assert _aborts(server.url) == before + 1
    engine.kv.allocator.check_integrity()


def test_client_giving_up_on_a_whole_response_frees_its_request(served):
    server, engine = served
    before = _aborts(server.url)
    entered, gate = threading.Event(), threading.Event()  # the engine is held: the request cannot finish first
    threading.Thread(target=engine.call_in_engine, args=(lambda: entered.set() or gate.wait(30),), daemon=True).start()
    assert entered.wait(10)
    body = {"text": "slow", "sampling_params": {**LONG_STREAM, "max_new_tokens": 450}}
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/generate", json=body, timeout=0.5)
    finally:
        gate.set()
    assert wait_until(lambda: _all_free(engine), timeout=10)
    assert _aborts(server.url) == before + 1


def test_shutdown_drains_then_answers_leftover_requests_with_an_error():
    engine = make_engine(adapters=[])
    server = RunningServer(engine, grace_s=3.0)
    gate = threading.Event()  # holds the engine thread until both requests are in, so both are in flight
    step = engine.step
    engine.step = lambda: (time.sleep(0.01), step())[1]  # the long stream cannot end within the grace
    engine.start()
    threading.Thread(target=engine.call_in_engine, args=(lambda: gate.wait(30),), daemon=True).start()
    short, long = {}, {}
    start_stream(server.url, {"text": "short", "sampling_params": GREEDY, "stream": True}, short)
    thread = start_stream(
        server.url, {"text": "long", "sampling_params": {**LONG_STREAM, "max_new_tokens": 480}, "stream": True}, long
    )
    assert wait_until(lambda: engine.intake.pending == 2)
    gate.set()
    server.stop()
    thread.join(30)
    assert not server.thread.is_alive()
    assert short["events"][-2]["meta_info"]["finish_reason"]["type"] == "length"  # finished within the grace
    error = long["events"][-2]["error"]
    assert error["code"] == 503 and "shutting down" in error["message"]
    assert long["events"][-1] == "[DONE]"


def test_cli_refuses_a_port_in_use_before_loading_the_model(capsys):
    import socket

    from loraserve.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["--model-path", "/nonexistent", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "another --port" in err


def test_loraserve_command_serves_and_stops_cleanly_on_sigterm():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LORASERVE_LOG_LEVEL": "warning"}
    cmd = [
        sys.executable,
        "-m",
        "loraserve.cli",
        "serve",
        "--model-path",
        assets().base,
        "--device",
        "cpu",
        "--port",
        str(port),
        "--max-total-tokens",
        "2048",
        "--served-model-name",
        "tiny",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("loraserve: serving"):
                break
        url = f"http://127.0.0.1:{port}"
        assert f"at {url}" in lines[-1], "".join(lines)
        assert httpx.get(f"{url}/health").status_code == 200
        body = {"text": "in flight", "sampling_params": {**LONG_STREAM, "max_new_tokens": 60}, "stream": True}
        with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", "/generate", json=body) as res:
            lines = res.iter_lines()
            first = json.loads(next(line for line in lines if line).removeprefix("data: "))
            assert first["meta_info"]["finish_reason"] is None
            proc.send_signal(signal.SIGTERM)  # while the request is in flight: it still finishes
            events = [line.removeprefix("data: ") for line in lines if line]
        assert events[-1] == "[DONE]"
        final = json.loads(events[-2])
        assert final["meta_info"]["finish_reason"]["type"] == "length" and len(final["output_ids"]) == 60
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        rest = proc.stdout.read()
        assert "Traceback" not in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
