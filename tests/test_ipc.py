"""The engine in a process of its own (the server's default): the same greedy text as the engine in
this process; stop strings checked in the HTTP process, with no text past the stop and the engine's
blocks freed at once; disconnects free blocks; malformed messages do not stop the engine; a dead
engine process takes the server down with a clear message; start-up errors come back as before; the
prompt tokens found in the prefix cache reach the answers, and /flush_cache reaches the engine."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import zmq
from http_fixtures import GREEDY, assets, engine_settings, make_engine, wait_until

from loraserve.errors import UserError
from loraserve.http.server import ServerThread
from loraserve.ipc.client import RemoteEngine
from loraserve.ipc.engine_process import EngineServer, Outbox
from loraserve.ipc.messages import Abort, Call, Codec, Delta, NewRequest, Reply, Shutdown, Submit
from loraserve.plugin_manager import PluginManager

LONG = {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def split():
    """A server whose engine runs in a process of its own, and the same engine in this process."""
    remote = RemoteEngine(engine_settings(max_running_requests=4))
    server = ServerThread(remote, remote.settings, PluginManager().load(), grace_s=5.0)
    local = make_engine(max_running_requests=4)
    try:
        yield server, remote, local
    finally:
        server.stop()
        local.shutdown()


def idle(remote: RemoteEngine) -> bool:
    s = remote.stats()
    return s["running"] == 0 and s["waiting"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"]


def decode_steps(remote: RemoteEngine) -> int:
    return remote.stats()["steps"]["decode"][0]


def test_split_server_returns_the_same_text_as_the_engine_in_this_process(split):
    server, remote, local = split
    prompts, adapters = ["Hello there", "the quick brown fox", "one two"], ["alpha", "beta", None]
    params = {**GREEDY, "return_logprob": True, "top_logprobs_num": 2}
    body = {"text": prompts, "sampling_params": params, "lora_path": adapters}
    got = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()
    want = local.generate(prompts, params, adapters)
    for g, w in zip(got, want):
        assert g["text"] == w["text"] and g["output_ids"] == w["output_ids"]
        assert g["meta_info"]["finish_reason"] == w["meta_info"]["finish_reason"]
        g_lp, w_lp = g["meta_info"]["output_token_logprobs"], w["meta_info"]["output_token_logprobs"]
        assert [t for _, t in g_lp] == [t for _, t in w_lp]
        assert all(abs(a[0] - b[0]) < 1e-5 for a, b in zip(g_lp, w_lp))
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8, "temperature": 0}
    answer = httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=60).json()
    ids = local.apply_chat_template(chat["messages"])
    expected = local.generate(input_ids=ids, sampling_params={"max_new_tokens": 8, "temperature": 0})
    assert answer["choices"][0]["message"]["content"] == expected["text"]
    assert wait_until(lambda: idle(remote))


def test_stop_string_mid_stream_sends_no_text_past_it_and_frees_the_blocks(split):
    server, remote, local = split
    full = local.generate("count with me", {**LONG, "max_new_tokens": 16})["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 4]  # a piece from the middle of the greedy text
    assert stop.strip(), full
    params = {**LONG, "stop": [stop]}
    want = local.generate("count with me", params)
    assert want["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    before = decode_steps(remote)
    body = {"text": "count with me", "sampling_params": params, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", "/generate", json=body) as res:
        events = [line.removeprefix("data: ") for line in res.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    streamed = chunks[-1]["text"]
    assert all(stop not in c["text"] for c in chunks)
    assert streamed == want["text"] and chunks[-1]["output_ids"] == want["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert wait_until(lambda: idle(remote))  # aborted in the engine: its blocks are free
    assert decode_steps(remote) - before < LONG["max_new_tokens"] // 2  # and it did not run on to the end


def test_client_disconnect_aborts_and_frees_blocks(split):
    server, remote, _ = split
    before = decode_steps(remote)
    body = {"text": "a long one", "sampling_params": LONG, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", "/generate", json=body) as res:
        lines = res.iter_lines()
        assert next(line for line in lines if line).startswith("data: ")
    assert wait_until(lambda: idle(remote))
    assert decode_steps(remote) - before < LONG["max_new_tokens"] // 2


def test_engine_errors_come_back_as_the_same_http_errors(split):
    server, remote, _ = split
    with httpx.Client(base_url=server.url, timeout=60) as c:
        unknown = c.post("/generate", json={"text": "x", "sampling_params": GREEDY, "lora_path": "nobody"})
        assert unknown.status_code == 404 and "nobody" in unknown.json()["error"]["message"]
        bad = c.post("/generate", json={"input_ids": [10**9], "sampling_params": GREEDY})
        assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]
        info = c.get("/get_server_info").json()
        assert set(info["loaded_adapters"]) == {"alpha", "beta"} and info["max_total_tokens"] == 4096
        load = c.post("/load_lora_adapter", json={"lora_name": "gamma", "lora_path": assets().adapters["gamma"]})
        assert load.status_code == 200 and "gamma" in load.json()["loaded_adapters"], load.text
        taken = c.post("/load_lora_adapter", json={"lora_name": "gamma", "lora_path": assets().adapters["gamma"]})
        assert taken.status_code == 409
        assert c.post("/unload_lora_adapter", json={"lora_name": "gamma"}).status_code == 200
        metrics = c.get("/metrics")
        assert metrics.status_code == 200 and "loraserve_requests_total" in metrics.text


def test_tensor_loads_and_in_place_updates_cross_the_process_split(split):
    """The safetensors bytes travel to the engine process; the pushed adapter answers what the same
    weights loaded from their directory answer here, with the same identity; an in-place update
    swaps the weights there too."""
    server, _, local = split
    directory = Path(assets().adapters["gamma"])
    raw = (directory / "adapter_model.safetensors").read_bytes()
    body = {
        "lora_name": "pushed",
        "config_dict": json.loads((directory / "adapter_config.json").read_text()),
        "tensors": base64.b64encode(raw).decode(),
        "checksum": f"sha256:{hashlib.sha256(raw).hexdigest()}",
    }
    ids = torch.randint(10, 1000, (9,), generator=torch.Generator().manual_seed(191)).tolist()
    gen = {"input_ids": ids, "sampling_params": GREEDY, "lora_path": "pushed"}
    local.load_adapter("pushed", str(directory))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            res = c.post("/load_lora_adapter_from_tensors", json=body)
            assert res.status_code == 200, res.text
            want = local.generate(input_ids=ids, sampling_params=GREEDY, lora_path="pushed")
            assert c.post("/generate", json=gen).json()["output_ids"] == want["output_ids"]
            identity = {a["name"]: a["identity"] for a in local.loaded_adapters()}["pushed"]
            assert res.json()["adapter"]["identity"] == identity
            update = {"lora_name": "pushed", "lora_path": assets().adapters["beta"], "load_inplace": True}
            assert c.post("/load_lora_adapter", json=update).status_code == 200
            beta = local.generate(input_ids=ids, sampling_params=GREEDY, lora_path="beta")
            assert c.post("/generate", json=gen).json()["output_ids"] == beta["output_ids"] != want["output_ids"]
            assert c.post("/unload_lora_adapter", json={"lora_name": "pushed"}).status_code == 200
    finally:
        local.unload_adapter("pushed", None)


def test_cached_tokens_and_flush_cache_cross_the_process_split(split):
    server, remote, local = split
    block = local.kv.allocator.block_size
    ids = torch.randint(10, 1000, (2 * block + 9,), generator=torch.Generator().manual_seed(190)).tolist()
    body = {"input_ids": ids, "sampling_params": GREEDY, "lora_path": "beta"}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        first, second = (c.post("/generate", json=body).json() for _ in range(2))
        assert [first["meta_info"]["cached_tokens"], second["meta_info"]["cached_tokens"]] == [0, 2 * block]
        want = local.generate(input_ids=ids, sampling_params=GREEDY, lora_path="beta")
        assert first["output_ids"] == second["output_ids"] == want["output_ids"] and second["text"] == want["text"]

        # a stop string ends the request here before the engine's last delta: the count came earlier
        stop = want["text"][len(want["text"]) // 2 :][:3]
        assert stop.strip(), want["text"]
        streamed = {**body, "sampling_params": {**LONG, "stop": [stop]}, "stream": True}
        with c.stream("POST", "/generate", json=streamed) as res:
            events = [json.loads(e.removeprefix("data: ")) for e in res.iter_lines() if e.startswith("data: {")]
        assert events[-1]["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
        assert {e["meta_info"]["cached_tokens"] for e in events} == {2 * block}

        usage = c.post("/v1/completions", json={"model": "beta", "prompt": ids, "max_tokens": 4, "temperature": 0})
        assert usage.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 2 * block}

        metrics = c.get("/metrics").text
        assert "loraserve_prefix_cache_hit_tokens_total" in metrics
        assert "loraserve_prefix_cache_cached_blocks" in metrics
        assert wait_until(lambda: idle(remote))
        cached = remote.stats()["prefix_cache"]["cached_blocks"]
        assert cached >= 2
        flushed = c.post("/flush_cache")
        assert flushed.status_code == 200 and flushed.json()["flushed_blocks"] == cached
        assert remote.flush_cache() == 0 and remote.stats()["prefix_cache"]["cached_blocks"] == 0
        third = c.post("/generate", json=body).json()
        assert third["meta_info"]["cached_tokens"] == 0 and third["output_ids"] == want["output_ids"]


@pytest.mark.slow
def test_shutdown_aborts_in_flight_requests_after_the_grace_period():
    remote = RemoteEngine(engine_settings([]))
    server = ServerThread(remote, remote.settings, PluginManager().load(), grace_s=0.5)
    out: dict = {}

    def run():
        body = {"text": "keep going", "sampling_params": {**LONG, "max_new_tokens": 480}}
        out["res"] = httpx.post(f"{server.url}/generate", json=body, timeout=60)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: remote.stats()["running"] == 1)
    finally:
        server.stop()
    thread.join(30)
    assert out["res"].status_code == 503 and "shutting down" in out["res"].json()["error"]["message"]
    assert not remote.process.is_alive() and remote.process.exitcode == 0
    with pytest.raises(UserError, match="shutting down"):
        remote.abort("req-0")


@pytest.mark.slow
def test_tensor_parallel_workers_start_from_the_engine_process():
    remote = RemoteEngine(engine_settings(["alpha"], tp_size=2))
    try:
        assert remote.effective_settings()["tp_size"] == 2

        async def run() -> dict:
            r = remote.make_request(prompt="Hello there", params=GREEDY, adapter="alpha")
            async for _ in remote.stream(requests=[r]):
                pass
            return remote.final_output(r)

        got = asyncio.run(run())
    finally:
        remote.shutdown()
    local = make_engine(["alpha"])
    try:
        want = local.generate("Hello there", GREEDY, "alpha")
    finally:
        local.shutdown()
    assert got["output_ids"] == want["output_ids"] and got["text"] == want["text"]
    assert remote.process.exitcode == 0


def test_malformed_messages_do_not_stop_the_engine():
    engine = make_engine(["alpha"])
    codec = Codec()
    context = zmq.Context()
    into, inbox = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    out, back = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    inbox.bind("inproc://to-engine")
    into.connect("inproc://to-engine")
    back.bind("inproc://from-engine")
    out.connect("inproc://from-engine")
    outbox = Outbox(out, codec)
    server = EngineServer(engine, inbox, outbox, codec)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        into.send(b"\xc1 not msgpack")
        into.send(codec.encode({"type": "Submit", "call_id": "one", "requests": 3}))  # wrong types
        into.send(codec.encode({"type": "Launch", "x": 1}))  # no such message
        into.send(codec.encode(Call(1, "shutdown", [])))  # not a method the front may call
        into.send(codec.encode(Call(2, "is_servable", [1, 2, 3])))  # wrong arguments
        into.send(codec.encode(Submit(3, [NewRequest("r", [1, 2, 3], {"max_new_tokens": -1})])))
        into.send(codec.encode(Abort(["nobody"])))
        ids = engine.intake.tokenize("hello")
        into.send(codec.encode(Submit(4, [NewRequest("ok", ids, GREEDY, "alpha")])))
        replies, deltas = {}, []
        deadline = time.monotonic() + 60
        while not (deltas and deltas[-1].finished) and time.monotonic() < deadline:
            if back.poll(1000):
                for m in codec.from_engine.decode(back.recv()):
                    if isinstance(m, Reply):
                        replies[m.call_id] = m
                    elif isinstance(m, Delta):
                        deltas.append(m)
        assert replies[1].error.kind == "ValueError" and "unknown engine method" in replies[1].error.message
        assert replies[2].error.kind == "TypeError"
        assert replies[3].error.kind == "UserError" and "max_new_tokens" in replies[3].error.message
        assert replies[4].error is None
        want = engine.generate(input_ids=ids, sampling_params=GREEDY, lora_path="alpha")
        assert [t for d in deltas for t in d.token_ids] == want["output_ids"]
        assert deltas[-1].finish_reason == "length"
        into.send(codec.encode(Shutdown(5.0)))
        thread.join(10)
        assert not thread.is_alive()
    finally:
        server.close()
        outbox.close()
        for s in (into, inbox, out, back):
            s.close(linger=0)
        context.term()
        engine.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "loraserve.cli",
        "serve",
        assets().base,
        "--device",
        "cpu",
        "--port",
        str(port),
        "--max-total-tokens",
        "2048",
        "--served-model-name",
        "tiny",
        *extra,
    ]


@pytest.mark.slow
def test_a_dead_engine_process_takes_the_server_down_with_a_clear_message():
    port = free_port()
    env = {**os.environ, "LORASERVE_LOG_LEVEL": "info"}
    proc = subprocess.Popen(serve_command(port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("loraserve: serving") or len(lines) > 500:
                break
        pids = [int(m.group(1)) for m in (re.search(r"engine process \(pid (\d+)\)", x) for x in lines) if m]
        assert pids and lines[-1].startswith("loraserve: serving"), "".join(lines)
        url = f"http://127.0.0.1:{port}"
        body = {"text": "in flight", "sampling_params": LONG, "stream": True}
        with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", "/generate", json=body) as res:
            events = res.iter_lines()
            assert json.loads(next(e for e in events if e).removeprefix("data: "))["meta_info"]["finish_reason"] is None
            os.kill(pids[0], signal.SIGKILL)
            rest = [e.removeprefix("data: ") for e in events if e]
        errors = [json.loads(e) for e in rest if e.startswith("{") and "error" in json.loads(e)]
        assert errors and "the engine process exited with code -9" in errors[-1]["error"]["message"], rest
        assert proc.wait(timeout=60) == 70
        out = "".join(lines) + proc.stdout.read()
        assert "loraserve: error: the engine process exited with code -9; the server stops" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_engine_start_up_errors_exit_as_in_process(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # no weights next to it
    outcomes = []
    for extra in ([], ["--engine-in-process"]):
        cmd = [sys.executable, "-m", "loraserve.cli", "serve", str(tmp_path), "--device", "cpu"]
        out = subprocess.run([*cmd, "--port", str(free_port()), *extra], capture_output=True, text=True, timeout=300)
        errors = [line for line in out.stderr.splitlines() if line.startswith("loraserve: error:")]
        assert "Traceback" not in out.stderr and len(errors) == 1, out.stderr
        outcomes.append((out.returncode, errors[0]))
    assert outcomes[0] == outcomes[1] and outcomes[0][0] == 2 and "no weights found in" in outcomes[0][1]


def test_engine_in_process_flag_and_vllm_spelling():
    from loraserve.cli import parse_settings

    pm = PluginManager().load()
    assert parse_settings([], pm).engine_in_process is False
    assert parse_settings(["--engine-in-process"], pm).engine_in_process is True
    assert parse_settings(["--disable-frontend-multiprocessing"], pm).engine_in_process is True
