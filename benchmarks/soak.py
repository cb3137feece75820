"""Soak test of a loraserve HTTP server: many concurrent clients, small pools, adapter churn, then an audit.

It starts a server in this process on 127.0.0.1 (a free port) for a tiny random Llama with the
embedded SmolLM2 tokenizer, or for ``--model-path``, with random PEFT adapters written by
``random_adapters.py``. The engine is kept small on purpose: ``--max-loras-per-batch`` slots (the
base model takes one) for more adapters than that, so adapters are evicted from GPU slots all the
time, a host cache (``--max-loaded-loras``) smaller than the adapter set, and a KV cache of
``--max-total-tokens`` tokens, so requests queue.

On the idle server it takes one greedy reference per (prompt, adapter) for text prompts (/generate,
checked against the Python API) and for chat (/v1/chat/completions). Then ``--concurrency`` client
threads send ``--requests`` seeded requests (at most ``--duration-s`` seconds of them): /generate,
/v1/completions and /v1/chat/completions, streamed or not, on the base model or an adapter (OpenAI
routes name it ``ADAPTER`` or ``BASE:ADAPTER``), all greedy with ``ignore_eos`` and a fixed
``max_new_tokens``, so every answer must equal its reference. Some streams are abandoned after a few
events (the connection is closed). A churn thread loads and unloads one more adapter all the while;
requests for it may get 404 while it is unloaded. Any other answer is a failure: a 5xx, a connection
error, a stream without ``[DONE]`` or with an error event, an output that differs from its reference.

After the clients finish it waits (bounded) for the engine to go idle and audits it on the engine
thread: every KV block free, no running or waiting request, nothing reserved in the intake, the
LoRA pools' ``check_integrity()``, no adapter held by a request or pending. It reports counts, latency
percentiles per kind, the LoRA pool counters (evictions), the deepest waiting queue seen, and the
process RSS before and after the soak; prints a table and, with ``--output-file``, writes JSON with
the device, versions and configuration. Exit status 1 when anything failed.

    python benchmarks/soak.py --requests 5000 --concurrency 32 --duration-s 600 --output-file soak.json
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import random_adapters
from bench_offline import environment, finish, print_table

PROMPTS = (
    "The capital of France is",
    "Once upon a time",
    "A list of fruits:",
    "def fibonacci(n):",
    "My favourite colour is",
    "In 1492, Columbus",
)
CHURN = "churn"
MAX_FAILURES_KEPT = 20
KINDS = [(endpoint, stream) for endpoint in ("generate", "completions", "chat") for stream in (False, True)]


# -- the model and the server -------------------------------------------------------------------------


def tiny_model(out: Path, seed: int) -> Path:
    """A 2-layer random Llama with the embedded SmolLM2 tokenizer (so text prompts and chat work)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from loraserve.embedded import embedded_model_dir

    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float().eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def prepare(args: argparse.Namespace, work: Path) -> tuple[str, dict[str, str]]:
    """The model directory and ``{adapter name: directory}``; the last adapter is the churned one."""
    model = args.model_path or str(tiny_model(work / "model", args.seed))
    paths = random_adapters.write_random_adapters(
        model,
        work / "adapters",
        args.num_adapters + 1,
        rank=args.lora_rank,
        seed=args.seed,
        delta_std=args.adapter_delta_std,
    )
    names = [f"a{i}" for i in range(args.num_adapters)] + [CHURN]
    return model, {name: str(path) for name, path in zip(names, paths.values())}


def rss_mib() -> float:
    """This process's resident memory now (psutil, else /proc/self/status VmRSS)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -- requests -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """One request of the soak."""

    index: int
    endpoint: str  # generate | completions | chat
    stream: bool
    adapter: str | None
    prompt: int
    abandon_after: int | None  # close a stream after this many events
    prefixed: bool  # OpenAI routes: name the adapter as BASE:ADAPTER


def make_plans(args: argparse.Namespace, adapters: Sequence[str]) -> list[Plan]:
    rng = random.Random(args.seed)
    choices = [None, *adapters]
    plans = []
    for i in range(args.requests):
        endpoint, stream = rng.choice(KINDS)
        abandon = rng.randint(1, 3) if stream and rng.random() < args.abandon_fraction else None
        plans.append(
            Plan(i, endpoint, stream, rng.choice(choices), rng.randrange(len(PROMPTS)), abandon, rng.random() < 0.5)
        )
    return plans


def sse(response: httpx.Response, most: int | None = None) -> tuple[list, bool]:
    """The JSON events of a stream (at most ``most``) and whether ``[DONE]`` ended it."""
    events = []
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        payload = line.removeprefix("data: ")
        if payload == "[DONE]":
            return events, True
        events.append(json.loads(payload))
        if most is not None and len(events) >= most:
            break
    return events, False


class Soak:
    """The clients, the churn thread and the bookkeeping of one soak run."""

    def __init__(self, url: str, base: str, args: argparse.Namespace, refs: dict):
        self.url, self.base, self.args, self.refs = url, base, args, refs
        self.greedy = {"max_new_tokens": args.max_new_tokens, "temperature": 0, "ignore_eos": True}
        self.lock = threading.Lock()
        self.outcomes: list[dict] = []
        self.failures: list[dict] = []
        self.churn_log = {"loads": 0, "unloads": 0, "pending_unloads": 0}
        self.stop = threading.Event()

    # one request ---------------------------------------------------------------------------------

    def body(self, plan: Plan) -> tuple[str, dict]:
        max_new = self.args.max_new_tokens * (4 if plan.abandon_after else 1)  # abandoned ones run longer
        text = PROMPTS[plan.prompt]
        if plan.endpoint == "generate":
            return "/generate", {
                "text": text,
                "sampling_params": {**self.greedy, "max_new_tokens": max_new},
                "lora_path": plan.adapter,
                "stream": plan.stream,
            }
        model = self.base if plan.adapter is None else f"{self.base}:{plan.adapter}" if plan.prefixed else plan.adapter
        common = {"model": model, "max_tokens": max_new, "temperature": 0, "ignore_eos": True, "stream": plan.stream}
        if plan.endpoint == "completions":
            return "/v1/completions", {**common, "prompt": text}
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": text}]}

    def result_of(self, plan: Plan, status: int, data: Any, events: list, done: bool) -> tuple[str, str]:
        """(``ok`` | ``absent`` | ``failed``, detail) for a finished request."""
        if status == 404 and plan.adapter == CHURN:
            return "absent", ""
        if status != 200:
            return "failed", f"HTTP {status}: {str(data)[:300]}"
        if plan.stream:
            if not done:
                return "failed", f"the stream ended without [DONE] after {len(events)} events"
            if any("error" in e for e in events):
                return "failed", f"error event: {[e for e in events if 'error' in e][0]}"
        kind = "chat" if plan.endpoint == "chat" else "text"
        want_ids, want_text = self.refs[kind][(plan.prompt, plan.adapter)]
        if plan.endpoint == "generate":
            final = events[-1] if plan.stream else data
            got_ids, got_text = final["output_ids"], final["text"]
            finished = final["meta_info"]["finish_reason"]
        else:
            chunks = events if plan.stream else [data]
            pieces = [c["choices"][0] for c in chunks if c.get("choices")]
            key = "text" if plan.endpoint == "completions" else "delta" if plan.stream else "message"
            got_text = "".join((p[key] if key == "text" else p[key].get("content") or "") for p in pieces)
            got_ids, finished = want_ids, pieces[-1]["finish_reason"] if pieces else None
        if got_ids != want_ids or got_text != want_text:
            return "failed", f"output differs from the reference: {got_text!r} != {want_text!r}"
        if not finished:
            return "failed", "no finish reason"
        return "ok", ""

    def send(self, client: httpx.Client, plan: Plan) -> None:
        path, body = self.body(plan)
        started = time.perf_counter()
        events, done, data, status = [], False, None, 0
        try:
            if plan.stream:
                with client.stream("POST", path, json=body) as res:
                    status = res.status_code
                    if status == 200:
                        events, done = sse(res, plan.abandon_after)
                    else:
                        data = res.read().decode(errors="replace")
                if plan.abandon_after and status == 200:
                    outcome, detail = (
                        ("abandoned", "")
                        if len(events) >= plan.abandon_after or done
                        else ("failed", f"the stream ended after {len(events)} events, before it was abandoned")
                    )
                else:
                    outcome, detail = self.result_of(plan, status, data, events, done)
            else:
                res = client.post(path, json=body)
                status = res.status_code
                data = res.json() if res.headers.get("content-type", "").startswith("application/json") else res.text
                outcome, detail = self.result_of(plan, status, data, events, done)
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            outcome, detail = "failed", f"{type(exc).__name__}: {exc}"
        row = {
            "endpoint": plan.endpoint,
            "stream": plan.stream,
            "adapter": plan.adapter,
            "status": status,
            "outcome": outcome,
            "seconds": time.perf_counter() - started,
        }
        with self.lock:
            self.outcomes.append(row)
            if outcome == "failed" and len(self.failures) < MAX_FAILURES_KEPT:
                self.failures.append({**asdict(plan), "status": status, "detail": detail})

    # the threads ---------------------------------------------------------------------------------

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=self.args.request_timeout_s)

    def worker(self, plans: list[Plan], cursor: list[int], deadline: float) -> None:
        with self.client() as client:
            while time.monotonic() < deadline:
                with self.lock:
                    if cursor[0] >= len(plans):
                        return
                    plan = plans[cursor[0]]
                    cursor[0] += 1
                self.send(client, plan)

    def churn(self, path: str, deadline: float, most_cycles: int = 100_000) -> None:
        """Unload and load ``CHURN`` until told to stop (it starts loaded, and ends loaded)."""
        with self.client() as client:
            for _ in range(most_cycles):
                if self.stop.is_set() or time.monotonic() > deadline:
                    return
                res = client.post("/unload_lora_adapter", json={"lora_name": CHURN})
                self.churn_step("unload", res, (200, 202))
                self.stop.wait(self.args.churn_interval_s)
                res = client.post("/load_lora_adapter", json={"lora_name": CHURN, "lora_path": path})
                self.churn_step("load", res, (200,))
                self.stop.wait(self.args.churn_interval_s)

    def churn_step(self, what: str, res: httpx.Response, expected: tuple[int, ...]) -> None:
        with self.lock:
            self.churn_log[f"{what}s"] += 1
            self.churn_log["pending_unloads"] += res.status_code == 202
            if res.status_code not in expected and len(self.failures) < MAX_FAILURES_KEPT:
                self.failures.append({"churn": what, "status": res.status_code, "detail": res.text[:300]})
            if res.status_code not in expected:
                self.outcomes.append(
                    {
                        "endpoint": f"churn-{what}",
                        "stream": False,
                        "adapter": CHURN,
                        "status": res.status_code,
                        "outcome": "failed",
                        "seconds": 0.0,
                    }
                )


def monitor(engine: Any, stop: threading.Event, seen: dict, deadline: float, period_s: float = 0.005) -> None:
    """The deepest waiting queue and the most running requests seen (read without locks: lengths only)."""
    while not stop.is_set() and time.monotonic() < deadline:
        seen["max_waiting"] = max(seen["max_waiting"], len(engine.scheduler.waiting))
        seen["max_running"] = max(seen["max_running"], len(engine.scheduler.running))
        stop.wait(period_s)


# -- references and the audit ---------------------------------------------------------------------------


def references(engine: Any, url: str, base: str, adapters: Sequence[str], max_new_tokens: int) -> dict:
    """Greedy outputs on the idle server: ``{"text"|"chat": {(prompt, adapter): (ids, text)}}``; the text
    ones are checked against the Python API (``ReferenceError`` when they differ)."""
    greedy = {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}
    keys = [(p, a) for p in range(len(PROMPTS)) for a in (None, *adapters)]
    refs: dict[str, dict] = {"text": {}, "chat": {}}
    with httpx.Client(base_url=url, timeout=120) as client:
        for p, a in keys:
            res = client.post("/generate", json={"text": PROMPTS[p], "sampling_params": greedy, "lora_path": a})
            res.raise_for_status()
            refs["text"][(p, a)] = (res.json()["output_ids"], res.json()["text"])
            res = client.post(
                "/v1/chat/completions",
                json={
                    "model": base if a is None else a,
                    "messages": [{"role": "user", "content": PROMPTS[p]}],
                    "max_tokens": max_new_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            )
            res.raise_for_status()
            refs["chat"][(p, a)] = (None, res.json()["choices"][0]["message"]["content"])
    oracle = engine.generate([PROMPTS[p] for p, _ in keys], greedy, [a for _, a in keys])
    for (p, a), want in zip(keys, oracle):
        if refs["text"][(p, a)] != (want["output_ids"], want["text"]):
            raise ReferenceError(f"/generate and the Python API differ for prompt {p}, adapter {a}")
    return refs


def audit(engine: Any, idle_timeout_s: float) -> dict:
    """Wait (bounded) for the engine to go idle, then check its state on the engine thread."""
    alloc = engine.kv.allocator
    deadline = time.monotonic() + idle_timeout_s
    while time.monotonic() < deadline:
        if (
            alloc.num_free == alloc.num_blocks
            and not engine.scheduler.running
            and not engine.scheduler.waiting
            and engine.intake.pending == 0
        ):
            break
        time.sleep(0.02)

    def check() -> dict:
        state = {
            "kv_blocks": alloc.num_blocks,
            "kv_free": alloc.num_free,
            "running": len(engine.scheduler.running),
            "waiting": len(engine.scheduler.waiting),
            "intake_pending": engine.intake.pending,
            "errors": [],
        }
        for name, fn in (("kv", alloc.check_integrity), ("lora", engine.lora.check_integrity)):
            try:
                fn()
            except Exception as exc:  # reported, not raised: the audit lists everything wrong
                state["errors"].append(f"{name}.check_integrity: {exc}")
        reg = engine.lora.registry
        state["adapters_held"] = {r.name: r.in_flight for r in reg.refs() if r.in_flight}
        state["adapters_pending"] = [r.name for r in reg.pending()]
        state["slots_loading"] = len(engine.lora.pool.loading)
        state["slots"] = [None if k is None else list(k) for k in engine.lora.pool.slot_key]
        state["clean"] = (
            state["kv_free"] == state["kv_blocks"]
            and not state["running"]
            and not state["waiting"]
            and not state["intake_pending"]
            and not state["errors"]
            and not state["adapters_held"]
            and not state["adapters_pending"]
            and not state["slots_loading"]
        )
        return state

    return engine.call_in_engine(check)


def finish_reasons(url: str) -> dict[str, float]:
    """Requests the server counted as finished, by finish reason (from /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    with httpx.Client(base_url=url, timeout=60) as client:
        text = client.get("/metrics").text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "loraserve_requests_total":
                reason = sample.labels["finish_reason"]
                counts[reason] = counts.get(reason, 0) + sample.value
    return counts


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "n": len(values),
        "p50_ms": pick(0.5) * 1e3,
        "p90_ms": pick(0.9) * 1e3,
        "max_ms": ordered[-1] * 1e3,
        "mean_ms": statistics.fmean(values) * 1e3,
    }


# -- the run --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    from loraserve.engine.engine import Engine
    from loraserve.http.server import ServerThread
    from loraserve.settings import make_settings

    rss_at_start = rss_mib()
    with tempfile.TemporaryDirectory(prefix="loraserve-soak-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        model, adapters = prepare(args, work)
        served = [n for n in adapters if n != CHURN]
        settings = make_settings(
            model_path=model,
            device=args.device,
            max_total_tokens=args.max_total_tokens,
            enable_lora=True,
            max_lora_rank=args.lora_rank,
            lora_target_modules=["all"],
            max_loras_per_batch=args.max_loras_per_batch,
            max_loaded_loras=args.max_loaded_loras,
            served_model_name="soak-base",
            lora_unload_timeout=0.2,
            lora_paths=[f"{n}={p}" for n, p in adapters.items()],
            log_level="warning",
        )
        engine = Engine(settings)
        server = ServerThread(engine, engine.settings, engine.plugins, grace_s=2.0, start_timeout_s=60.0)
        try:
            refs = references(engine, server.url, engine.model_name, list(adapters), args.max_new_tokens)
            distinct = {
                p: len({tuple(refs["text"][(p, a)][0]) for a in (None, *adapters)}) for p in range(len(PROMPTS))
            }
            plans = make_plans(args, [*served, CHURN])
            soak = Soak(server.url, engine.model_name, args, refs)
            rss_before = rss_mib()
            lora_before = dict(engine.lora.metrics)
            deadline = time.monotonic() + args.duration_s
            seen = {"max_waiting": 0, "max_running": 0}
            side = [
                threading.Thread(target=soak.churn, args=(adapters[CHURN], deadline), daemon=True),
                threading.Thread(target=monitor, args=(engine, soak.stop, seen, deadline + 60), daemon=True),
            ]
            cursor = [0]
            workers = [
                threading.Thread(target=soak.worker, args=(plans, cursor, deadline), daemon=True)
                for _ in range(args.concurrency)
            ]
            started = time.perf_counter()
            for t in side + workers:
                t.start()
            for t in workers:
                t.join(args.duration_s + 2 * args.request_timeout_s)
            soak.stop.set()
            for t in side:
                t.join(2 * args.request_timeout_s)
            wall = time.perf_counter() - started
            hung = sum(t.is_alive() for t in workers + side)
            state = audit(engine, args.idle_timeout_s)
            finished = finish_reasons(server.url)
            rss_after = rss_mib()
            lora_counters = {
                k: engine.lora.metrics[k] - lora_before.get(k, 0)
                for k in engine.lora.metrics
                if isinstance(engine.lora.metrics[k], (int, float))
            }
        finally:
            server.stop()
    rows = soak.outcomes
    counts = {"planned": len(plans), "sent": sum(r["endpoint"] in ("generate", "completions", "chat") for r in rows)}
    for outcome in ("ok", "absent", "abandoned", "failed"):
        counts[outcome] = sum(r["outcome"] == outcome for r in rows)
    counts["not_sent"] = counts["planned"] - counts["sent"]
    counts["hung_threads"] = hung
    by_kind = {
        f"{e}{'-stream' if s else ''}": {
            o: sum(r["outcome"] == o for r in rows if (r["endpoint"], r["stream"]) == (e, s))
            for o in ("ok", "absent", "abandoned", "failed")
        }
        for e, s in KINDS
    }
    latency = {
        f"{e}{'-stream' if s else ''}": percentiles(
            [r["seconds"] for r in rows if (r["endpoint"], r["stream"]) == (e, s) and r["outcome"] == "ok"]
        )
        for e, s in KINDS
    }
    passed = counts["failed"] == 0 and hung == 0 and state["clean"] and counts["not_sent"] == 0
    return {
        "benchmark": "soak",
        "passed": passed,
        "config": vars(args),
        "device": str(engine.device),
        "environment": environment(engine.device.type),
        "wall_s": wall,
        "requests_per_s": counts["sent"] / wall if wall else None,
        "counts": counts,
        "by_kind": by_kind,
        "latency": latency,
        "churn": soak.churn_log,
        "failures": soak.failures,
        "final_state": state,
        "lora_counters": lora_counters,
        "queue": seen,
        "server_finish_reasons": finished,
        "distinct_outputs_per_prompt": distinct,
        "rss_mib": {
            "at_start": rss_at_start,
            "before_soak": rss_before,
            "after_soak": rss_after,
            "growth": rss_after - rss_before,
            "peak": peak_rss_mib(),
        },
    }


def report(result: dict[str, Any]) -> None:
    c, s, r = result["counts"], result["final_state"], result["rss_mib"]
    rows = [
        ("requests sent / planned", f"{c['sent']} / {c['planned']}"),
        ("ok", c["ok"]),
        ("absent (404, churned adapter)", c["absent"]),
        ("abandoned streams", c["abandoned"]),
        ("failed", c["failed"]),
        ("wall time (s)", result["wall_s"]),
        ("requests/s", result["requests_per_s"]),
        (
            "churn loads / unloads (202)",
            f"{result['churn']['loads']} / {result['churn']['unloads']} ({result['churn']['pending_unloads']})",
        ),
        ("GPU slot evictions", result["lora_counters"].get("gpu_evictions", 0)),
        ("deepest waiting queue", result["queue"]["max_waiting"]),
        ("aborted on the server", result["server_finish_reasons"].get("abort", 0)),
        ("KV blocks free after", f"{s['kv_free']} / {s['kv_blocks']}"),
        ("engine clean after", s["clean"]),
        ("RSS before soak (MiB)", r["before_soak"]),
        ("RSS after soak (MiB)", r["after_soak"]),
        ("peak RSS (MiB)", r["peak"]),
    ]
    for kind, lat in result["latency"].items():
        if lat["n"]:
            rows.append((f"{kind} p50 / p90 (ms)", f"{lat['p50_ms']:.0f} / {lat['p90_ms']:.0f}"))
    print_table(f"loraserve soak: {result['device']}, {'PASSED' if result['passed'] else 'FAILED'}", rows)
    for failure in result["failures"]:
        print("failure:", json.dumps(failure), file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=2000, help="requests to send in all")
    p.add_argument("--concurrency", type=int, default=16, help="client threads")
    p.add_argument("--duration-s", type=float, default=600.0, help="stop sending after this many seconds")
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens per request (abandoned streams: 4x)")
    p.add_argument("--abandon-fraction", type=float, default=0.15, help="share of streams closed after 1-3 events")
    p.add_argument("--churn-interval-s", type=float, default=0.05, help="pause between churn loads and unloads")
    p.add_argument(
        "--model-path", default=None, help="serve this model (with a tokenizer) instead of a tiny random one"
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--num-adapters", type=int, default=3, help="adapters served all along (one more is churned)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument(
        "--adapter-delta-std",
        type=float,
        default=1.0,
        help="size of each adapter's change (large: every adapter changes the greedy output)",
    )
    p.add_argument("--max-loras-per-batch", type=int, default=2, help="GPU slots, the base model's included")
    p.add_argument("--max-loaded-loras", type=int, default=3, help="host cache size (smaller than the adapter set)")
    p.add_argument("--max-total-tokens", type=int, default=256, help="KV-cache size: small, so requests queue")
    p.add_argument("--request-timeout-s", type=float, default=60.0)
    p.add_argument("--idle-timeout-s", type=float, default=30.0, help="how long the audit waits for the engine to idle")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="keep the model and adapters here (default: a temporary dir)")
    p.add_argument("--output-file", default=None, help="write the JSON result here")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    result = run(args)
    report(result)
    return finish(result, args.output_file)


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
