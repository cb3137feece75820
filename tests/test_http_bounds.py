"""No input is a 500 and nothing a client sends grows without bound (issue 16): lone surrogates, huge
integers, deep nesting and NaN are 400s naming the field; bodies over --max-request-body-bytes are
413s answered before the rest is read; inputs x n over --max-sequences-per-request and prompts over
--max-prompt-chars are 413s (the prompt is never tokenized); stop strings are bounded; a full queue
(--max-queued-requests) is a 429 with Retry-After; tokenizing runs off the event loop, so /health
answers meanwhile; --shutdown-grace-period bounds the wait at shutdown. After each refusal a normal
/generate and GET /metrics still answer 200."""

from __future__ import annotations

import json
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest
from http_fixtures import RunningServer, make_engine, wait_until
from test_http_lifecycle import LONG_STREAM, start_stream

BODY_LIMIT = 256 * 1024
MAX_SEQUENCES = 8
PROMPT_LIMIT = 32 * 512  # the default --max-prompt-chars: 32 x the tiny model's context length
GOOD = {"text": "still alive", "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def served():
    engine = make_engine(adapters=[], max_request_body_bytes=BODY_LIMIT, max_sequences_per_request=MAX_SEQUENCES)
    server = RunningServer(engine)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield server, client, engine
    server.stop()


def still_serves(client: httpx.Client) -> None:
    ok = client.post("/generate", json=GOOD)
    assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 2, ok.text
    assert client.get("/metrics").status_code == 200


def message_of(res: httpx.Response, status: int) -> str:
    """The error message, after checking the status and the error format of the route (native or OpenAI)."""
    assert res.status_code == status, res.text
    err = res.json()["error"]
    if res.request.url.path.startswith("/v1/"):
        assert set(err) == {"message", "type", "param", "code"}
    else:
        assert err["code"] == status
    return err["message"]


def raw_exchange(url: str, head: bytes, parts: list[bytes], timeout: float = 5.0) -> tuple[int, dict, bytes]:
    """Send ``head`` and ``parts`` on a raw socket (never finishing a body the head promises more of)
    and read one response: its status, headers and body."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(head)
            for part in parts:
                sock.sendall(part)
        except OSError:  # the server answered and closed while we were still sending: fine
            pass
        data = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in data and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        header, _, body = data.partition(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)) and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(lines[0].split()[1]), headers, body


# -- former 500s: now 400s that name the field ----------------------------------------------------------

FORMER_500S = [
    ("/generate", '{"text": "a\\ud800b"}', ["lone surrogate U+D800 at text", "valid Unicode"]),
    ("/generate", '{"text": "x", "sampling_params": {"\\udc00": 1}}', ["U+DC00 at a key of sampling_params"]),
    ("/v1/completions", '{"model": "tiny", "prompt": "a\\ud800b"}', ["lone surrogate U+D800 at prompt"]),
    ("/v1/completions", '{"model": "tiny", "prompt": ["ok", "a\\udfffb"]}', ["U+DFFF at prompt[1]"]),
    (
        "/v1/chat/completions",
        '{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
        ["lone surrogate U+D800 at messages[0].content"],
    ),
    (
        "/generate",
        '{"text": "x", "sampling_params": {"max_new_tokens": ' + "9" * 5000 + "}}",
        ["integer with 5000 digits at sampling_params.max_new_tokens", "at most 20 digits"],
    ),
    (
        "/v1/completions",
        '{"model": "tiny", "prompt": "x", "seed": -' + "1" * 30 + "}",
        ["integer with 30 digits at seed"],
    ),
    ("/generate", "[" * 100_000, ["more than 64 levels deep"]),
    ("/v1/chat/completions", "{" + '"a":{' * 40_000, ["more than 64 levels deep"]),
    (
        "/generate",
        '{"text": "x", "sampling_params": {"stop": ' + "[" * 65 + "]" * 65 + "}}",
        ["more than 64 levels deep (under sampling_params.stop[0]..."],
    ),
    (
        "/generate",
        '{"text": "x", "sampling_params": {"temperature": NaN}}',
        ["NaN at sampling_params.temperature", "finite number"],
    ),
]


@pytest.mark.parametrize("path, body, wanted", FORMER_500S, ids=[f"{p} {i}" for i, (p, *_) in enumerate(FORMER_500S)])
def test_unparseable_in_python_is_a_400_naming_the_field(served, path, body, wanted):
    _, client, _ = served
    res = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
    text = message_of(res, 400)
    for part in wanted:
        assert part in text, text
    still_serves(client)


def test_error_messages_are_always_encodable_and_bounded(served, monkeypatch):
    _, client, engine = served
    from loraserve.http.errors import api_error_of, error_response

    def broken(_r):
        raise RuntimeError("bad \ud800 state")  # an exception text holding what UTF-8 cannot encode

    monkeypatch.setattr(engine.outputs, "final", broken)
    res = client.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}})
    text = message_of(res, 500)
    assert "RuntimeError" in text and "\\ud800" in text and "bug" in text
    monkeypatch.undo()
    huge_key = "k" * 10_000
    text = message_of(client.post("/generate", json={"text": "x", huge_key: 1}), 400)
    assert "unknown field(s) kkk" in text and "k..." in text and len(text) < 4_200  # the key is cut short
    assert error_response("/v1/x", 503, "down \udc80").headers["retry-after"] == "1"
    assert "\udc80" not in api_error_of(ValueError("\udc80")).message
    still_serves(client)


# -- request body size ------------------------------------------------------------------------------------


def test_body_over_the_limit_by_content_length_is_refused_before_it_is_read(served):
    server, client, _ = served
    head = (
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 400000000\r\n\r\n"
    )  # 400 MB promised, 100 bytes sent: reading it all would hang
    started = time.monotonic()
    status, headers, body = raw_exchange(server.url, head, [b'{"text": "' + b"a" * 88 + b'"}'])
    assert time.monotonic() - started < 3
    assert status == 413
    text = json.loads(body)["error"]["message"]
    assert "400000000 bytes" in text and f"limit of {BODY_LIMIT} bytes (--max-request-body-bytes)" in text
    still_serves(client)


def test_streamed_body_over_the_limit_is_refused_before_it_ends(served):
    server, client, _ = served
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"a" * 32 * 1024
    chunks = [b'%x\r\n{"prompt": "\r\n' % len(b'{"prompt": "')]
    chunks += [b"%x\r\n%s\r\n" % (len(piece), piece)] * (BODY_LIMIT // len(piece) + 2)  # no last chunk: never ends
    started = time.monotonic()
    status, _, body = raw_exchange(server.url, head, chunks)
    assert time.monotonic() - started < 3
    assert status == 413
    err = json.loads(body)["error"]
    assert err["type"] == "invalid_request_error" and "--max-request-body-bytes" in err["message"]
    still_serves(client)


# -- sequences, stop strings, prompt length ---------------------------------------------------------------


def test_too_many_sequences_in_one_request_is_a_413_naming_both_numbers(served):
    _, client, _ = served
    res = client.post("/generate", json={"text": ["a", "b", "c"], "sampling_params": {"n": 3, "max_new_tokens": 1}})
    text = message_of(res, 413)
    assert "9 sequences (3 input(s) x n)" in text and f"the {MAX_SEQUENCES} allowed" in text
    assert "--max-sequences-per-request" in text
    res = client.post("/v1/completions", json={"model": "tiny", "prompt": ["p"] * 5, "n": 2, "max_tokens": 1})
    text = message_of(res, 413)
    assert "10 sequences (5 input(s) x n)" in text and res.json()["error"]["type"] == "invalid_request_error"
    res = client.post("/generate", json={"text": "x", "sampling_params": {"n": MAX_SEQUENCES + 1}})
    assert f"send an integer from 1 to {MAX_SEQUENCES}" in message_of(res, 400)
    res = client.post("/generate", json={"text": ["a", "b"], "sampling_params": {"n": 4, "max_new_tokens": 1}})
    assert res.status_code == 200 and len(res.json()) == MAX_SEQUENCES  # at the bound: served
    still_serves(client)


@pytest.mark.parametrize(
    "path, body, wanted",
    [
        (
            "/generate",
            {"text": "x", "sampling_params": {"stop": ["s"] * 65}},
            "stop has 65 strings; allowed: at most 64",
        ),
        ("/generate", {"text": "x", "sampling_params": {"stop": ["ok", "s" * 1001]}}, "a string of 1001 characters"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ["s"] * 100}, "stop has 100 strings"),
    ],
)
def test_stop_strings_are_bounded_in_number_and_length(served, path, body, wanted):
    _, client, _ = served
    assert wanted in message_of(client.post(path, json=body), 400)
    still_serves(client)


@pytest.mark.parametrize(
    "path, body",
    [
        ("/generate", {"text": "x" * (PROMPT_LIMIT + 1)}),
        ("/v1/completions", {"model": "tiny", "prompt": ["ok", "y" * (PROMPT_LIMIT + 1)]}),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "z" * PROMPT_LIMIT}]}),
    ],
)
def test_prompt_over_max_prompt_chars_is_a_413_without_tokenizing_it(served, monkeypatch, path, body):
    _, client, engine = served
    encoded = []
    real = engine.tokenizer.encode
    monkeypatch.setattr(engine.tokenizer, "encode", lambda text, **kw: encoded.append(len(text)) or real(text, **kw))
    text = message_of(client.post(path, json=body), 413)
    assert f"more than the {PROMPT_LIMIT} allowed (--max-prompt-chars" in text
    assert all(n <= PROMPT_LIMIT for n in encoded), encoded  # the long one never reached the tokenizer
    assert engine.intake.max_prompt_chars == PROMPT_LIMIT
    still_serves(client)


# -- tokenizing off the event loop ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body",
    [
        ("/generate", {"text": "slow to tokenize", "sampling_params": {"max_new_tokens": 1}}),
        ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 1}),
    ],
)
def test_health_answers_while_a_prompt_is_tokenized(served, monkeypatch, path, body):
    server, client, engine = served
    entered = threading.Event()
    real = engine.tokenizer.encode

    def slow(text, **kw):
        entered.set()
        time.sleep(4)
        return real(text, **kw)

    monkeypatch.setattr(engine.tokenizer, "encode", slow)
    out = {}
    worker = threading.Thread(target=lambda: out.update(res=httpx.post(server.url + path, json=body, timeout=30)))
    worker.start()
    assert entered.wait(10)
    started = time.monotonic()
    assert client.get("/health").status_code == 200
    assert time.monotonic() - started < 2.0  # well inside the tokenization's 4 s
    worker.join(30)
    assert out["res"].status_code == 200, out["res"].text
    monkeypatch.undo()
    still_serves(client)


# -- the waiting queue ------------------------------------------------------------------------------------


def test_full_queue_is_a_429_with_retry_after_then_requests_succeed_again():
    engine = make_engine(adapters=[], max_queued_requests=2, max_running_requests=1)
    server = RunningServer(engine)
    gate = threading.Event()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            # hold the engine thread between steps: what is submitted now stays queued
            engine.start()
            blocker = threading.Thread(target=engine.call_in_engine, args=(lambda: gate.wait(30),), daemon=True)
            blocker.start()
            results = []
            fillers = [
                threading.Thread(
                    target=lambda: results.append(
                        httpx.post(f"{server.url}/generate", json={**GOOD, "text": "queued"}, timeout=60)
                    )
                )
                for _ in range(2)
            ]
            for t in fillers:
                t.start()
            assert wait_until(lambda: engine.intake.pending == 2, timeout=10)
            res = client.post("/generate", json=GOOD)
            assert "--max-queued-requests=2" in message_of(res, 429) and res.headers["retry-after"] == "1"
            res = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1})
            assert message_of(res, 429).startswith("the server is busy") and res.headers["retry-after"] == "1"
            assert (res.json()["error"]["type"], res.json()["error"]["code"]) == (
                "rate_limit_error",
                "rate_limit_exceeded",
            )
            res = client.post("/generate", json={**GOOD, "text": ["a", "b", "c"]})
            assert "the queue holds at most 2" in message_of(res, 413)  # could never fit: not a retry
            gate.set()
            for t in fillers:
                t.join(30)
            assert [r.status_code for r in results] == [200, 200]
            assert wait_until(lambda: engine.intake.pending == 0 and not engine.scheduler.has_work())
            still_serves(client)
    finally:
        gate.set()
        server.stop()


# -- shutdown -------------------------------------------------------------------------------------------


def test_shutdown_grace_period_bounds_the_wait_for_in_flight_requests():
    engine = make_engine(adapters=[], shutdown_grace_period=0.5)
    server = RunningServer(engine, grace_s=None)  # the flag's value, not the fixture's default
    long = {}
    thread = start_stream(
        server.url, {"text": "long", "sampling_params": {**LONG_STREAM, "max_new_tokens": 480}, "stream": True}, long
    )
    assert wait_until(lambda: len(engine.scheduler.running) == 1)
    started = time.monotonic()
    server.stop()
    thread.join(30)
    assert time.monotonic() - started < 5  # the default grace period is 10 s
    error = long["events"][-2]["error"]
    assert error["code"] == 503 and "shutting down" in error["message"]
