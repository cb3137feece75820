"""The built-in adapter resolvers (filesystem, Hugging Face hub cache, fsspec URLs) and on-demand
resolution: resolved adapters give PEFT's tokens, escaping names and wrong base models are refused
with the reason, many concurrent first requests cause one load, and a slow resolution blocks neither
other requests nor the event loop nor the engine process's message thread."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path

import fsspec
import pytest
from http_fixtures import wait_until
from lora_utils import make_peft_adapter, tiny_llama_config, tiny_model
from peft import PeftModel
from test_multi_lora import GREEDY, peft_generate, prompts

from loraserve import hookimpl
from loraserve.contract import AdapterResolver
from loraserve.engine.engine import Engine, default_plugins
from loraserve.errors import Forbidden, NotFound, TooLarge, UserError
from loraserve.ipc.engine_process import EngineServer
from loraserve.ipc.messages import NewRequest, Reply, Submit
from loraserve.settings import make_settings

HUB_REV = "0123456789abcdef0123456789abcdef01234567"
LORA = dict(enable_lora=True, max_lora_rank=8, lora_target_modules=["all"], max_loras_per_batch=4)


def _adapter(base, out: Path, seed: int, r: int, base_name: str | None) -> Path:
    make_peft_adapter(base, out, r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "down_proj"], seed=seed)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_name
    config_path.write_text(json.dumps(config))
    return out


class GatedResolver(AdapterResolver):
    """Resolves ``gated-*`` names to one adapter directory once ``gate`` opens; counts its calls."""

    name = "gated"

    def __init__(self, source: str):
        self.source, self.calls = source, []
        self.gate, self.entered, self.timed_out = threading.Event(), threading.Event(), False

    def resolve(self, name: str) -> str | None:
        if not name.startswith("gated-"):
            return None
        self.calls.append(name)
        self.entered.set()
        if not self.gate.wait(20):
            self.timed_out = True
        return self.source


class GatedPlugin:
    def __init__(self, resolver: GatedResolver):
        self.resolver = resolver

    @hookimpl
    def loraserve_register_resolvers(self, register):
        register("gated", lambda settings: self.resolver, description="test resolver")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("resolvers")
    base = tiny_model(tiny_llama_config(), seed=0)
    base.generation_config.eos_token_id = None
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    served = str(base_dir)
    resolver_dir = root / "adapters"
    fs_dir = _adapter(base, resolver_dir / "team" / "fs_a", 11, 3, served)
    hub_src = _adapter(base, root / "hub-src", 12, 5, "some-org/" + base_dir.name)  # a hub id of the same name
    mem_src = _adapter(base, root / "mem-src", 13, 4, None)
    gated_src = _adapter(base, root / "gated", 14, 2, served)
    _adapter(base, resolver_dir / "wrong_base", 15, 2, "other-org/other-model")
    outside = _adapter(base, root / "outside", 16, 2, served)
    (resolver_dir / "escape").symlink_to(outside)
    (resolver_dir / "linked_file").mkdir()
    shutil.copy(outside / "adapter_config.json", resolver_dir / "linked_file" / "adapter_config.json")
    (resolver_dir / "linked_file" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")

    hub_cache = root / "hub-cache"
    repo = hub_cache / "models--hubby--adapter"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(HUB_REV)
    shutil.copytree(hub_src, repo / "snapshots" / HUB_REV)

    memfs = fsspec.filesystem("memory")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        memfs.pipe(f"/resolver-test/mem_b/{f}", (mem_src / f).read_bytes())

    peft = PeftModel.from_pretrained(base, str(fs_dir), adapter_name="fs").eval()
    for name, path in (("hub", hub_src), ("mem", mem_src), ("gated", gated_src)):
        peft.load_adapter(str(path), adapter_name=name)

    gated = GatedResolver(str(gated_src))
    with pytest.MonkeyPatch.context() as mp:
        import huggingface_hub.constants

        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HUB_CACHE", str(hub_cache))
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
        mp.setenv("LORASERVE_CACHE_DIR", str(root / "cache"))
        options = {
            "lora_resolver_dir": str(resolver_dir),
            "lora_resolver_hub_repos": ["hubby"],
            "lora_resolver_url": "memory://resolver-test",
        }
        settings = make_settings(model_path=served, device="cpu", max_total_tokens=2048, plugin_options=options, **LORA)
        plugins = default_plugins(settings)
        plugins.register(GatedPlugin(gated), name="gated-test")
        engine = Engine(settings, plugins)
        try:
            yield dict(engine=engine, peft=peft, root=root, served=served, gated=gated, resolver_dir=resolver_dir)
        finally:
            engine.shutdown()
            plugins.unregister("gated-test")
            memfs.rm("/resolver-test", recursive=True)


def test_each_resolver_loads_on_first_use_and_matches_peft(world):
    engine = world["engine"]
    names = ["team/fs_a", "hubby/adapter", "mem_b", None]
    batch = prompts(len(names), length=5, seed=4)
    expected, expected_lp = peft_generate(world["peft"], batch, ["fs", "hub", "mem", None])
    results = engine.generate(input_ids=batch, sampling_params=GREEDY, lora_path=names)
    for i, res in enumerate(results):
        assert res["output_ids"] == expected[i], names[i]
        ours = [lp for lp, _ in res["meta_info"]["output_token_logprobs"]]
        assert max(abs(a - b) for a, b in zip(ours, expected_lp[i])) < 1e-3
    assert len({tuple(r["output_ids"]) for r in results}) == 4  # the adapters really differ
    sources = {a["name"]: a["source"] for a in engine.loaded_adapters()}
    assert sources["team/fs_a"] == str(world["resolver_dir"] / "team" / "fs_a")
    assert sources["hubby/adapter"] == "hubby/adapter"
    assert Path(sources["mem_b"]).parent.parent == world["root"] / "cache" / "resolver-fsspec"
    engine.lora.check_integrity()


@pytest.mark.parametrize(
    ("name", "error", "reason"),
    [
        ("/etc", Forbidden, "leads out of --lora-resolver-dir"),
        ("escape", Forbidden, "outside --lora-resolver-dir"),
        ("linked_file", Forbidden, "outside --lora-resolver-dir"),
        ("team/../escape", NotFound, "unknown adapter"),
        ("wrong_base", UserError, "trained for base model 'other-org/other-model'"),
        ("hubby/missing", NotFound, r"not in the local Hugging Face cache \(HF_HUB_OFFLINE\)"),
        ("otherorg/adapter", NotFound, "unknown adapter"),
        ("nowhere", NotFound, "unknown adapter"),
    ],
)
def test_refused_names_say_why(world, name, error, reason):
    engine = world["engine"]
    with pytest.raises(error, match=reason) as info:
        engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 1}, lora_path=name)
    assert info.value.http_status == {Forbidden: 403, NotFound: 404, UserError: 400}[error]
    assert name not in {a["name"] for a in engine.loaded_adapters()}


def test_one_load_for_concurrent_first_requests_and_others_served_meanwhile(world):
    engine, gated = world["engine"], world["gated"]
    loads = engine.lora.metrics["loads"]
    batch = prompts(6, length=5, seed=8)
    expected, _ = peft_generate(world["peft"], batch, ["gated"] * 6)
    results: dict[int, dict] = {}

    def first_request(i: int) -> None:
        results[i] = engine.generate(input_ids=batch[i], sampling_params=GREEDY, lora_path="gated-one")

    threads = [threading.Thread(target=first_request, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    assert gated.entered.wait(10)
    base = engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 4, "ignore_eos": True})
    assert len(base["output_ids"]) == 4 and not gated.gate.is_set()  # served while the resolution waits
    assert engine.lora.resolutions.in_flight() == ["gated-one"]
    time.sleep(0.2)  # the other first requests reach the resolution and wait for it
    gated.gate.set()
    for t in threads:
        t.join(30)
    assert gated.calls == ["gated-one"] and not gated.timed_out
    assert engine.lora.metrics["loads"] == loads + 1
    assert [results[i]["output_ids"] for i in range(6)] == expected


def test_concurrent_servable_checks_ask_the_resolvers_once(world, monkeypatch):
    """The OpenAI routes ask is_servable before submitting: concurrent checks of one unknown name share
    one resolver call (a resolver may do remote I/O)."""
    engine, gated = world["engine"], world["gated"]
    gated.gate.clear()
    gated.entered.clear()
    before = len(gated.calls)
    flight, entered = engine.lora.servable_checks, []
    run = flight.run
    monkeypatch.setattr(flight, "run", lambda key, fn: (entered.append(key), run(key, fn))[1])
    answers: list[bool] = []
    threads = [threading.Thread(target=lambda: answers.append(engine.is_servable("gated-check"))) for _ in range(6)]
    for t in threads:
        t.start()
    assert gated.entered.wait(10)
    assert wait_until(lambda: len(entered) == 6)
    time.sleep(0.2)  # from entering the single flight to waiting on the first call: microseconds
    gated.gate.set()
    for t in threads:
        t.join(30)
    assert answers == [True] * 6
    assert gated.calls[before:] == ["gated-check"]
    assert "gated-check" not in {a["name"] for a in engine.loaded_adapters()}  # a check loads nothing


def test_a_slow_resolution_does_not_block_the_event_loop(world):
    engine, gated = world["engine"], world["gated"]
    gated.gate.clear()
    gated.entered.clear()

    async def main():
        slow = asyncio.create_task(
            engine.generate_async(input_ids=[9, 8, 7], sampling_params=GREEDY, lora_path="gated-two")
        )
        while not gated.entered.is_set():
            await asyncio.sleep(0.01)
        base = await engine.generate_async(input_ids=[1, 2], sampling_params={"max_new_tokens": 2, "ignore_eos": True})
        opened_before = gated.gate.is_set()
        gated.gate.set()
        return base, opened_before, await slow

    base, opened_before, slow = asyncio.run(main())
    assert len(base["output_ids"]) == 2 and not opened_before and not gated.timed_out
    expected, _ = peft_generate(world["peft"], [[9, 8, 7]], ["gated"])
    assert slow["output_ids"] == expected[0]  # greedy, EOS ignored: a sampled EOS cannot end it early


class ListOutbox:
    def __init__(self):
        self.items = []

    def put(self, item):
        self.items.append(item)


def test_the_engine_process_keeps_taking_submits_during_a_resolution(world):
    engine, gated = world["engine"], world["gated"]
    gated.gate.clear()
    gated.entered.clear()
    outbox = ListOutbox()
    server = EngineServer(engine, inbox=None, outbox=outbox, codec=None)
    try:
        params = {"max_new_tokens": 2, "ignore_eos": True}
        server.handle(Submit(1, [NewRequest("slow-1", [3, 4, 5], params, "gated-three")]))
        assert gated.entered.wait(10)
        server.handle(Submit(2, [NewRequest("base-1", [3, 4, 5], params, None)]))  # answered at once
        assert [i.call_id for i in outbox.items if isinstance(i, Reply)] == [2]
        gated.gate.set()
        deadline = time.monotonic() + 20
        while 1 not in [i.call_id for i in outbox.items if isinstance(i, Reply)] and time.monotonic() < deadline:
            time.sleep(0.02)
        replies = {i.call_id: i for i in outbox.items if isinstance(i, Reply)}
        assert replies[1].error is None and replies[2].error is None
    finally:
        server.close()


def test_fsspec_file_urls_the_size_bound_and_allowed_dirs(world, tmp_path, monkeypatch):
    from loraserve.plugins.resolver_fsspec.resolver import FsspecResolver

    monkeypatch.setenv("LORASERVE_CACHE_DIR", str(tmp_path / "cache"))
    src = world["resolver_dir"] / "team"
    settings = make_settings(model_path=world["served"], device="cpu")
    resolver = FsspecResolver(src.as_uri(), settings, max_bytes=10**8)
    got = Path(resolver.resolve("fs_a"))
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (got / f).read_bytes() == (src / "fs_a" / f).read_bytes()
    assert resolver.resolve("absent") is None
    with pytest.raises(Forbidden):
        resolver.resolve("../fs_a")
    with pytest.raises(TooLarge, match="--lora-resolver-max-bytes 1000"):
        FsspecResolver(src.as_uri(), settings, max_bytes=1000).resolve("fs_a")
    (tmp_path / "cache").mkdir(exist_ok=True)
    limited = make_settings(model_path=world["served"], device="cpu", lora_allowed_dirs=[str(tmp_path)])
    with pytest.raises(Forbidden, match="--lora-allowed-dirs"):
        FsspecResolver(src.as_uri(), limited, max_bytes=10**8).resolve("fs_a")


def test_the_filesystem_resolver_obeys_allowed_dirs(world, tmp_path):
    options = {"lora_resolver_dir": str(world["resolver_dir"])}
    allowed = dict(model_path=world["served"], device="cpu", max_total_tokens=256, plugin_options=options, **LORA)
    engine = Engine(make_settings(lora_allowed_dirs=[str(tmp_path)], **allowed))
    try:
        with pytest.raises(Forbidden, match="--lora-allowed-dirs"):
            engine.generate(input_ids=[1, 2], sampling_params={"max_new_tokens": 1}, lora_path="team/fs_a")
    finally:
        engine.shutdown()
    engine = Engine(make_settings(lora_allowed_dirs=[str(world["resolver_dir"])], **allowed))
    try:
        out = engine.generate(input_ids=[1, 2], sampling_params={**GREEDY, "max_new_tokens": 1}, lora_path="team/fs_a")
        assert len(out["output_ids"]) == 1
    finally:
        engine.shutdown()
