"""The operator decides what adapters may be loaded, and a refused load leaves nothing (issue 16).

Over a real server on 127.0.0.1: adapter names follow one rule (paths stay usable as names, as
SGLang's ``--lora-paths PATH`` makes them); every kind of refused load (bad name, hub id at run
time, missing or corrupt files, a catastrophic regex, a pin that cannot be served, even after the
adapter reached the host cache) leaves no trace in /v1/models, /get_server_info, /metrics or the
pools, and a later load works; ``--lora-allowed-dirs`` refuses paths and symbolic links leading out
of the allowed directories; ``--disable-lora-runtime-updates`` freezes the adapter set; adapter
routes take only JSON (415 for a cross-site form); an unload whose requests outlive
``--lora-unload-timeout`` answers 202 and frees the memory when they finish.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import httpx
import pytest
from conftest import make_manager
from http_fixtures import GREEDY, RunningServer, assets, make_engine, wait_until
from lora_utils import make_peft_adapter, tiny_llama_config, write_adapter_dir

from loraserve.cli import parse_settings
from loraserve.errors import UserError
from loraserve.lora.policy import AdapterRefused, AdapterSourcePolicy
from loraserve.settings import make_settings

# streams long enough to still run while a test changes adapters; each test ends them itself
ENDLESS = {"max_new_tokens": 4000, "temperature": 0, "ignore_eos": True}
LONG_CONTEXT = dict(context_length=4096, max_total_tokens=16384)
HUB_ID = "loraserve-test/no-such-adapter"


@pytest.fixture(scope="module")
def served():
    # two slots: the base model and one adapter; one adapter may be pinned
    engine = make_engine(adapters=["alpha"], max_loras_per_batch=2, lora_unload_timeout=0.2, **LONG_CONTEXT)
    server = RunningServer(engine)
    client = httpx.Client(base_url=server.url, timeout=60)
    yield server, client, engine
    client.close()
    server.stop()


def load(client: httpx.Client, name, path, prefix: str = "", **extra) -> httpx.Response:
    body = json.dumps({"lora_name": name, "lora_path": path, **extra})  # escapes a lone surrogate, as browsers do
    return client.post(f"{prefix}/load_lora_adapter", content=body, headers={"Content-Type": "application/json"})


def assert_nothing_of(
    client: httpx.Client, engine, name: str, path: str | None = None, good: str | None = None
) -> None:
    """Nothing of a refused adapter is visible anywhere, every read endpoint answers, and a later load (of
    ``good``, default gamma) works."""
    models = client.get("/v1/models")
    assert models.status_code == 200
    assert name not in {m["id"] for m in models.json()["data"]}
    assert path is None or path not in {m["root"] for m in models.json()["data"]}
    info = client.get("/get_server_info")
    assert info.status_code == 200
    assert name not in info.json()["loaded_adapters"] and info.json()["unloading_adapters"] == []
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    lora = engine.lora
    assert lora.registry.get(name) is None
    if name:  # the base model is labelled and keyed by the empty name
        assert f'adapter="{name}"' not in metrics.text
        assert all(key[0] != name for key in [*lora.host.keys(), *lora.pool.resident()])
    lora.check_integrity()
    res = load(client, "good-after", good or assets().adapters["gamma"])
    assert res.status_code == 200, res.text
    assert client.post("/unload_lora_adapter", json={"lora_name": "good-after"}).status_code == 200


class OpenStream:
    """A started /generate stream (its first event read); :meth:`close` ends it, which aborts its request."""

    def __init__(self, client: httpx.Client, body: dict):
        self.ctx = client.stream("POST", "/generate", json={**body, "stream": True})
        res = self.ctx.__enter__()
        assert res.status_code == 200
        self.lines = res.iter_lines()  # kept: dropping the iterator would close the connection
        assert next(line for line in self.lines if line.startswith("data: {"))

    def close(self) -> None:
        self.ctx.__exit__(None, None, None)


# -- names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["my-adapter_v1.2", "org/name@rev+1", "/abs/like/a/path", "examples/adapters/x", "./rel/x", "A" * 256]
)
def test_good_names_load_including_path_like_ones(served, name):
    _, client, engine = served
    path = assets().adapters["gamma"]
    res = load(client, name, path)
    assert res.status_code == 200 and res.json()["loaded_adapters"][name] == path
    assert client.post("/generate", json={"text": "g", "sampling_params": GREEDY, "lora_path": name}).status_code == 200
    assert name in {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert client.post("/unload_lora_adapter", json={"lora_name": name}).status_code == 200


@pytest.mark.parametrize(
    "name", ["\ud800", "a:b", "with space", "tab\there", "x" * 300, "base", "", "a=b", "caf\u00e9", "new\nline", 7]
)
def test_bad_names_are_a_400_naming_the_value_and_leave_nothing(served, name):
    _, client, engine = served
    res = load(client, name, assets().adapters["gamma"])
    assert res.status_code == 400 and res.json()["success"] is False
    message = res.json()["error_message"]
    if name != "\ud800":  # refused by the JSON parser already, as any lone surrogate
        assert ascii(name)[:40] in message
    if isinstance(name, str) and name != "\ud800":
        assert "A-Z a-z 0-9 . _ / @ + -" in message
    assert_nothing_of(client, engine, str(name))


def test_bad_names_and_sources_are_refused_by_the_python_api_and_the_start_up_flags(served, tmp_path):
    _, _, engine = served
    for name in ("\ud800", "a:b", "x" * 257):
        with pytest.raises(UserError, match="invalid adapter name") as info:
            engine.lora.load_adapter(name, assets().adapters["gamma"])
        str(info.value).encode("utf-8")  # nothing un-encodable is echoed
        assert ascii(name)[:40] in str(info.value)
    with pytest.raises(UserError, match="unknown adapter '\\\\ud800'"):
        engine.generate("x", GREEDY, "\ud800")
    # a directory whose name is not UTF-8 comes back as a lone surrogate: it could never be echoed in JSON
    undecodable = os.path.join(os.fsencode(str(tmp_path)), b"bad-\xff")
    shutil.copytree(assets().adapters["gamma"], os.fsdecode(undecodable))
    with pytest.raises(UserError, match="undecodable text") as info:
        engine.lora.load_adapter("undecodable", os.fsdecode(undecodable))
    str(info.value).encode("utf-8")
    assert engine.lora.registry.get("undecodable") is None
    with pytest.raises(UserError, match="invalid adapter name 'my adapters/x'.*NAME=PATH"):
        make_settings(lora_paths=["my adapters/x"])
    assert make_settings(lora_paths=["/abs/x", "examples/adapters/x"]).lora_paths[0].lora_name == "/abs/x"
    engine.lora.check_integrity()


# -- every other kind of refused load leaves nothing ------------------------------------------------


def _bad_adapters(root) -> dict[str, tuple[str, int, str]]:
    """name -> (source, status, part of the message) of adapters each refused for another reason."""
    gamma = assets().adapters["gamma"]
    bad_json = root / "bad-json"
    shutil.copytree(gamma, bad_json)
    (bad_json / "adapter_config.json").write_text("{")
    no_weights = root / "no-weights"
    no_weights.mkdir()
    shutil.copy(os.path.join(gamma, "adapter_config.json"), no_weights)
    dora = write_adapter_dir(root / "dora", {"target_modules": ["q_proj", "lm_head"], "use_dora": True}, {})
    other_base = make_peft_adapter(
        tiny_llama_config(), root / "other-base", r=4, lora_alpha=8, target_modules=["q_proj"], seed=3
    )
    slow = write_adapter_dir(root / "slow-regex", {"target_modules": "(.*){1,32000}[bc]"}, {})
    return {
        "hub-id": (HUB_ID, 403, "--lora-allow-hub"),
        "missing": (str(root / "missing"), 404, "no adapter loader can read"),
        "bad-json": (str(bad_json), 400, "is not valid JSON"),
        "no-weights": (str(no_weights), 400, "holds neither"),
        "dora": (str(dora), 400, "DoRA is served on the layer projections"),
        "other-base": (str(other_base), 400, "does not fit the base model"),
        "slow-regex": (str(slow), 400, "takes more than 1 s to match"),
    }


def test_each_kind_of_refused_load_leaves_nothing(served, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub id must be refused before any fetch; never reach out
    _, client, engine = served
    for name, (source, status, text) in _bad_adapters(tmp_path).items():
        started = time.monotonic()
        res = load(client, name, source, prefix="/v1" if name == "dora" else "")
        assert res.status_code == status and res.json()["success"] is False, (name, res.text)
        assert text in res.json()["error_message"], (name, res.json()["error_message"])
        assert time.monotonic() - started < 5, name
        assert_nothing_of(client, engine, name, source)


def test_the_issue_regex_is_refused_fast(served, tmp_path):
    _, client, engine = served
    source = write_adapter_dir(tmp_path / "issue-regex", {"target_modules": "(?:.|.){0,20}Z"}, {})
    started = time.monotonic()
    res = load(client, "issue-regex", str(source))
    assert res.status_code == 400 and time.monotonic() - started < 2
    assert "(?:.|.){0,20}Z" in res.json()["error_message"]
    assert_nothing_of(client, engine, "issue-regex", str(source))


def test_refused_pins_leave_nothing_even_after_reaching_the_host_cache(served):
    _, client, engine = served
    paths = assets().adapters
    assert load(client, "pinned-one", paths["beta"], pinned=True).status_code == 200
    res = load(client, "pinned-two", paths["gamma"], pinned=True)  # one slot stays free for the rest
    assert res.status_code == 409 and "at most --max-loras-per-batch - 1 = 1" in res.json()["error_message"]
    assert_nothing_of(client, engine, "pinned-two", paths["gamma"])
    assert client.post("/unload_lora_adapter", json={"lora_name": "pinned-one"}).status_code == 200
    # both slots busy with running requests: the pin fails after the host copy was made, and is undone
    streams = [
        OpenStream(client, {"text": "one", "sampling_params": ENDLESS, "lora_path": "alpha"}),
        OpenStream(client, {"text": "two", "sampling_params": ENDLESS}),
    ]
    try:
        assert sorted(str(r.adapter) for r in engine.scheduler.running) == ["None", "alpha"]
        res = load(client, "pin-busy", paths["gamma"], pinned=True)
        assert res.status_code == 409 and "no GPU slot can be freed" in res.json()["error_message"]
        assert all(key[0] != "pin-busy" for key in engine.lora.host.keys())
    finally:
        for stream in streams:
            stream.close()
    assert wait_until(lambda: not engine.scheduler.running, timeout=10)
    assert_nothing_of(client, engine, "pin-busy", paths["gamma"])


# -- content types ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/load_lora_adapter", "/v1/load_lora_adapter", "/unload_lora_adapter", "/v1/unload_lora_adapter"]
)
@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None]
)
def test_adapter_routes_take_only_json(served, path, content_type):
    _, client, engine = served
    body = json.dumps(
        {"lora_name": "alpha" if "unload" in path else "cross-site", "lora_path": assets().adapters["gamma"]}
    )
    headers = {} if content_type is None else {"Content-Type": content_type}
    res = client.post(path, content=body, headers=headers)
    assert res.status_code == 415 and res.json()["success"] is False
    assert "Content-Type: application/json" in res.json()["error_message"]
    assert set(engine.lora.registry.names()) == {"alpha"}


def test_json_with_a_charset_is_json(served):
    _, client, engine = served
    body = json.dumps({"lora_name": "charset", "lora_path": assets().adapters["gamma"]})
    headers = {"Content-Type": "Application/JSON; charset=utf-8"}
    assert client.post("/load_lora_adapter", content=body, headers=headers).status_code == 200
    assert client.post("/unload_lora_adapter", content='{"lora_name": "charset"}', headers=headers).status_code == 200


# -- the hub ---------------------------------------------------------------------------------------


def test_hub_ids_are_fetched_at_run_time_only_when_allowed():
    closed = AdapterSourcePolicy()
    closed.check_source(HUB_ID, runtime=False)  # the operator typed it: start-up may fetch
    with pytest.raises(AdapterRefused, match="--lora-allow-hub.*--lora-allowed-hub-repos"):
        closed.check_source(HUB_ID, runtime=True)
    listed = AdapterSourcePolicy.from_settings(make_settings(lora_allowed_hub_repos=["Some-Org", "other/one"]))
    assert listed.hub_allowed("some-org/any") and listed.hub_allowed("other/one")
    assert not listed.hub_allowed("other/two") and not listed.hub_allowed("third/one")
    listed.check_source("Some-Org/adapter", runtime=True)  # no fetch: the loader would do that
    with pytest.raises(AdapterRefused):
        listed.check_source("other/two", runtime=True)
    assert AdapterSourcePolicy.from_settings(make_settings(lora_allow_hub=True)).hub_allowed("any/repo")
    with pytest.raises(UserError, match="is not a hub organisation"):
        make_settings(lora_allowed_hub_repos=["a b/c"])


def test_policy_flags_parse_from_the_command_line_and_the_environment(installed_entry_points, monkeypatch):
    s = parse_settings(
        [
            "--lora-allowed-dirs",
            "/a",
            "/b",
            "--lora-allow-hub",
            "--lora-allowed-hub-repos",
            "org",
            "org/x",
            "--disable-lora-runtime-updates",
            "--lora-unload-timeout",
            "2.5",
        ],
        make_manager(installed_entry_points),
    )
    assert (s.lora_allowed_dirs, s.lora_allow_hub, s.lora_allowed_hub_repos) == (["/a", "/b"], True, ["org", "org/x"])
    assert s.disable_lora_runtime_updates and s.lora_unload_timeout == 2.5
    defaults = make_settings()  # SGLang's: anywhere, no runtime hub, runtime updates on, 30 s
    assert (
        defaults.lora_allowed_dirs,
        defaults.lora_allow_hub,
        defaults.disable_lora_runtime_updates,
        defaults.lora_unload_timeout,
    ) == (None, False, False, 30.0)
    monkeypatch.setenv("LORASERVE_LORA_ALLOWED_DIRS", f"/x{os.pathsep}/y")
    assert make_settings().lora_allowed_dirs == ["/x", "/y"]


# -- allowed directories ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def confined(tmp_path_factory):
    """A server loading adapters only from ``allowed`` (holding a copy of alpha and of gamma)."""
    allowed = tmp_path_factory.mktemp("allowed")
    for name in ("alpha", "gamma"):
        shutil.copytree(assets().adapters[name], allowed / name)
    engine = make_engine(adapters=[], lora_paths=[f"alpha={allowed / 'alpha'}"], lora_allowed_dirs=[str(allowed)])
    server = RunningServer(engine)
    client = httpx.Client(base_url=server.url, timeout=60)
    yield allowed, client, engine
    client.close()
    server.stop()


def test_allowed_dirs_admit_adapters_inside(confined):
    allowed, client, engine = confined
    assert (
        client.post("/generate", json={"text": "x", "sampling_params": GREEDY, "lora_path": "alpha"}).status_code == 200
    )
    assert load(client, "inside", str(allowed / "gamma")).status_code == 200
    assert client.post("/unload_lora_adapter", json={"lora_name": "inside"}).status_code == 200


def test_allowed_dirs_refuse_paths_and_links_leading_out(confined, tmp_path):
    allowed, client, engine = confined
    outside = assets().adapters["gamma"]
    (allowed / "link-out").symlink_to(outside, target_is_directory=True)
    mixed = allowed / "weights-out"
    mixed.mkdir()
    shutil.copy(os.path.join(outside, "adapter_config.json"), mixed)
    (mixed / "adapter_model.safetensors").symlink_to(os.path.join(outside, "adapter_model.safetensors"))
    cases = {
        "outside": (outside, outside),
        "link-out": (str(allowed / "link-out"), "link-out"),
        "dot-dot": (f"{allowed}/../{os.path.basename(tmp_path)}", "/../"),
        "weights-out": (str(mixed), "adapter_model.safetensors"),
    }
    for name, (source, named) in cases.items():
        res = load(client, name, source)
        assert res.status_code == 403, (name, res.text)
        message = res.json()["error_message"]
        assert "--lora-allowed-dirs" in message and str(allowed) in message and named in message, message
        assert_nothing_of(client, engine, name, source, good=str(allowed / "gamma"))


def test_allowed_dirs_apply_to_start_up_adapters(tmp_path):
    with pytest.raises(AdapterRefused, match="lies outside --lora-allowed-dirs"):
        make_engine(
            adapters=["alpha"], lora_allowed_dirs=[str(tmp_path)], max_lora_rank=None, lora_target_modules=None
        )  # refused before its config is read to size the pool
    with pytest.raises(UserError, match="is not a directory"):
        make_engine(adapters=[], lora_allowed_dirs=[str(tmp_path / "typo")])


# -- runtime updates off ---------------------------------------------------------------------------


def test_runtime_updates_can_be_switched_off():
    engine = make_engine(adapters=["alpha"], disable_lora_runtime_updates=True)
    server = RunningServer(engine)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for prefix in ("", "/v1"):
                res = load(client, "gamma", assets().adapters["gamma"], prefix=prefix)
                assert res.status_code == 403 and "--disable-lora-runtime-updates" in res.json()["error_message"]
                res = client.post(f"{prefix}/unload_lora_adapter", json={"lora_name": "alpha"})
                assert res.status_code == 403 and "--disable-lora-runtime-updates" in res.json()["error_message"]
            assert (
                client.post(
                    "/generate", json={"text": "x", "sampling_params": GREEDY, "lora_path": "alpha"}
                ).status_code
                == 200
            )
            assert set(client.get("/get_server_info").json()["loaded_adapters"]) == {"alpha"}
        assert engine.lora.resolvers == []
    finally:
        server.stop()


# -- unload with a timeout -------------------------------------------------------------------------


def test_unload_outliving_its_timeout_answers_202_and_frees_memory_when_the_stream_ends(served):
    _, client, engine = served
    paths = assets().adapters
    assert load(client, "delta", paths["gamma"]).status_code == 200
    old_key = engine.lora.registry.get("delta").key
    stream = OpenStream(client, {"text": "long", "sampling_params": ENDLESS, "lora_path": "delta"})
    try:
        started = time.monotonic()
        res = client.post("/unload_lora_adapter", json={"lora_name": "delta"})
        assert res.status_code == 202 and time.monotonic() - started < 5
        body = res.json()
        assert body["success"] is True and body["pending"] is True and body["error_message"] is None
        assert "1 in-flight request" in body["message"] and "delta" not in body["loaded_adapters"]
        assert "delta" not in {m["id"] for m in client.get("/v1/models").json()["data"]}
        unloading = client.get("/get_server_info").json()["unloading_adapters"]
        assert [(u["name"], u["version"], u["in_flight"]) for u in unloading] == [("delta", old_key[1], 1)]
        assert old_key in engine.lora.pool.resident()  # the stream still uses it
        # a reload of the name while the old version is pending: a new version, served at once
        assert load(client, "delta", paths["beta"]).status_code == 200
        assert engine.lora.registry.get("delta").version != old_key[1]
        got = client.post("/generate", json={"text": "d", "sampling_params": GREEDY, "lora_path": "delta"})
        assert got.status_code == 200 and got.json()["meta_info"]["lora_path"] == "delta"
        assert [u["name"] for u in client.get("/get_server_info").json()["unloading_adapters"]] == ["delta"]
    finally:
        stream.close()  # the stream ends: its request finishes (aborted)
    assert wait_until(lambda: not client.get("/get_server_info").json()["unloading_adapters"], timeout=10)
    assert old_key not in engine.lora.pool.resident() and old_key not in engine.lora.host.keys()
    engine.lora.check_integrity()
    assert client.post("/unload_lora_adapter", json={"lora_name": "delta"}).status_code == 200
    assert client.get("/metrics").status_code == 200


def test_the_python_api_unload_still_blocks_until_memory_is_freed(served):
    _, client, engine = served
    assert load(client, "epsilon", assets().adapters["gamma"]).status_code == 200
    key = engine.lora.registry.get("epsilon").key
    assert engine.lora.unload_adapter("epsilon") == 0  # timeout None: waits, then frees
    assert key not in engine.lora.host.keys() and engine.lora.unloading_adapters() == []
