"""Routing simulation (no GPUs): Ray Serve's multiplexed routing against random routing for many LoRA adapters.

A discrete-event simulation of ``--num-replicas`` replicas, each holding at most ``--slots`` adapters with LRU
eviction (what ``@serve.multiplexed(max_num_models_per_replica=...)`` does), serving a seeded stream of
``--num-requests`` requests whose adapters are drawn from ``--num-adapters`` adapters with Zipf-skewed popularity
(``p(rank k) ~ k ** -zipf``; ``--base-fraction`` of the requests carry no adapter). Arrivals are Poisson.

Each replica serves one request at a time, first in first out: a request takes ``--service-time`` time units,
plus ``--load-time`` when its adapter is not resident (the load evicts the least recently used adapter when the
replica is full). An adapter becomes resident, and visible to the router, when the request that loads it starts.
A replica's queue length is its request in service plus the requests queued on it. Two policies see the same
requests at the same times:

- ``multiplexed``, after Ray Serve's power-of-two-choices router with a multiplexed model id
  (``ray/serve/_private/request_router``: ``MultiplexMixin.apply_multiplex_routing``): the candidates are the
  replicas that hold the adapter; else, if some replica has a free adapter slot, the replicas with the fewest
  adapters loaded; else all replicas. Two candidates are sampled and the one with the shorter queue wins (one
  candidate: it). Requests without an adapter go to any replica by power of two choices.
- ``random``: a uniformly random replica.

Ray Serve caps a replica at ``max_ongoing_requests`` (``--max-ongoing``, Ray's default 5; 0 = no cap): a replica
at its cap is no candidate; when all of a tier's candidates are at the cap the next tier is tried (Ray falls back
the same way, after a backoff this model leaves out), and when every replica is at the cap the request waits in
the router, first in first out, until one finishes. ``random`` picks among the replicas below the cap.

Unless ``--arrival-rate`` is given, the rate is calibrated so that random routing keeps the replicas about
``--utilization`` busy: a pass of random routing without timing gives its load rate ``m`` per request, and the
rate is ``utilization * replicas / (service_time + m * load_time)``. Multiplexed routing, with fewer loads, is
less busy on the same arrivals. The first ``--warmup-fraction`` of the requests (by arrival) are not measured.

Per policy it reports adapter loads per 1,000 requests, the adapter hit rate, the balance of requests across
replicas (max/mean and coefficient of variation of the requests each replica served), the replicas' busy
fraction, and the latency (router wait + replica queueing + load + service) mean, p50 and p99 in time units.
``--sweep`` also runs Zipf exponents 0.8 and 1.2. It prints a table, writes JSON (``--output-file``), a markdown
table (``--markdown``) and a bar chart (``--plot``, when matplotlib is importable).

    python benchmarks/sim_routing.py --sweep --output-file benchmarks/results/routing_sim.json \\
        --markdown benchmarks/results/routing_sim.md --plot benchmarks/results/routing_sim.png
    python benchmarks/sim_routing.py --num-adapters 100 --num-replicas 4 --slots 4 --num-requests 5000
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import platform
import random
import subprocess
import sys
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import markdown_table, text_table  # noqa: E402

POLICIES = ("multiplexed", "random")
SWEEP_ZIPF = (0.8, 1.2)
BASE = -1  # the adapter id of a request for the base model
# seed streams
_ADAPTERS, _BASE_DRAW, _GAPS, _CALIBRATION = 0, 1, 2, 3


@dataclass(frozen=True)
class SimConfig:
    num_adapters: int = 1000
    zipf: float = 1.0
    num_replicas: int = 8
    slots: int = 16
    num_requests: int = 100_000
    warmup_fraction: float = 0.1
    service_time: float = 1.0
    load_time: float = 2.0
    utilization: float = 0.7
    arrival_rate: float | None = None
    base_fraction: float = 0.0
    max_ongoing: int = 5
    seed: int = 0

    @property
    def warmup_requests(self) -> int:
        return int(self.num_requests * self.warmup_fraction)


@dataclass
class Workload:
    adapters: list[int]  # per request: adapter id (0 is the most popular) or BASE
    arrivals: list[float]  # per request, increasing
    arrival_rate: float
    calibration_loads_per_request: float | None  # random routing's load rate used to set the rate (None: given)


@dataclass
class SimOutcome:
    policy: str
    metrics: dict[str, Any]
    served: list[int]  # per request: how many times it completed
    replica_of: list[int]  # per request: the replica that served it
    loaded: list[bool]  # per request: whether it loaded its adapter
    final_lru: list[list[int]]  # per replica: resident adapters, least recently used first
    max_resident: int  # the most adapters any replica held at any time
    extra: dict[str, Any] = field(default_factory=dict)


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def zipf_probabilities(num_adapters: int, exponent: float) -> np.ndarray:
    weights = np.arange(1, num_adapters + 1, dtype=np.float64) ** -exponent
    return weights / weights.sum()


def random_routing_load_rate(adapters: Sequence[int], cfg: SimConfig) -> float:
    """Loads per measured request of random routing, timing aside (with no cap, its choices do not depend on time)."""
    choices = _rng(cfg.seed, _CALIBRATION).integers(cfg.num_replicas, size=len(adapters)).tolist()
    lrus: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(cfg.num_replicas)]
    loads = 0
    for i, (adapter, r) in enumerate(zip(adapters, choices)):
        if adapter == BASE:
            continue
        lru = lrus[r]
        if adapter in lru:
            lru.move_to_end(adapter)
            continue
        if len(lru) >= cfg.slots:
            lru.popitem(last=False)
        lru[adapter] = None
        loads += i >= cfg.warmup_requests
    return loads / max(1, len(adapters) - cfg.warmup_requests)


def make_workload(cfg: SimConfig) -> Workload:
    """The seeded request stream both policies serve: adapters by Zipf rank, Poisson arrival times."""
    n = cfg.num_requests
    adapters = _rng(cfg.seed, _ADAPTERS).choice(
        cfg.num_adapters, size=n, p=zipf_probabilities(cfg.num_adapters, cfg.zipf)
    )
    if cfg.base_fraction > 0:
        adapters[_rng(cfg.seed, _BASE_DRAW).random(n) < cfg.base_fraction] = BASE
    adapter_list = adapters.tolist()
    calibration = None
    rate = cfg.arrival_rate
    if rate is None:
        calibration = random_routing_load_rate(adapter_list, cfg)
        rate = cfg.utilization * cfg.num_replicas / (cfg.service_time + calibration * cfg.load_time)
    gaps = _rng(cfg.seed, _GAPS).standard_exponential(n) / rate
    return Workload(adapter_list, np.cumsum(gaps).tolist(), rate, calibration)


def simulate(workload: Workload, cfg: SimConfig, policy: str, debug: bool = False) -> SimOutcome:
    """Runs one policy over the workload; with ``debug`` it checks the replicas' invariants at every step."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}: expected one of {POLICIES}")
    adapters, arrivals = workload.adapters, workload.arrivals
    n, num_replicas, slots = len(adapters), cfg.num_replicas, cfg.slots
    cap = cfg.max_ongoing if cfg.max_ongoing > 0 else math.inf
    replicas = range(num_replicas)
    rng = random.Random(cfg.seed * 1_000_003 + POLICIES.index(policy))

    lrus: list[OrderedDict[int, None]] = [OrderedDict() for _ in replicas]
    holders: dict[int, set[int]] = {}  # adapter -> replicas holding it (the router's view)
    queues: list[deque[int]] = [deque() for _ in replicas]
    busy = [False] * num_replicas
    qlen = [0] * num_replicas  # in service + queued on the replica
    pending: deque[int] = deque()  # requests waiting in the router: every replica at the cap
    events: list[tuple[float, int, int, int]] = []  # (finish time, sequence, replica, request)
    seq = 0

    start = [math.nan] * n
    finish = [math.nan] * n
    duration = [0.0] * n
    loaded = [False] * n
    replica_of = [-1] * n
    served = [0] * n
    waited_in_router = [False] * n
    max_resident = 0

    def check(r: int) -> None:
        assert len(lrus[r]) <= slots, f"replica {r} holds {len(lrus[r])} adapters > {slots}"
        assert qlen[r] == len(queues[r]) + busy[r], f"replica {r}: queue length out of step"
        assert qlen[r] <= cap, f"replica {r}: {qlen[r]} requests > max_ongoing {cap}"
        for adapter in lrus[r]:
            assert r in holders.get(adapter, ()), f"router does not see adapter {adapter} on replica {r}"
        for adapter, where in holders.items():
            assert (r in where) == (adapter in lrus[r]), f"router sees adapter {adapter} on replica {r} wrongly"

    def two_choices(candidates: list[int]) -> int:
        if len(candidates) == 1:
            return candidates[0]
        i = rng.randrange(len(candidates))
        j = rng.randrange(len(candidates) - 1)
        if j >= i:
            j += 1
        a, b = candidates[i], candidates[j]
        return b if qlen[b] < qlen[a] else a

    def route(request: int) -> int | None:
        open_replicas = [r for r in replicas if qlen[r] < cap]
        if not open_replicas:
            return None
        if policy == "random":
            return open_replicas[rng.randrange(len(open_replicas))]
        adapter = adapters[request]
        if adapter != BASE:
            holding = sorted(r for r in holders.get(adapter, ()) if qlen[r] < cap)
            if holding:
                return two_choices(holding)
            fewest = min(len(lru) for lru in lrus)
            if fewest < slots:
                emptiest = [r for r in open_replicas if len(lrus[r]) == fewest]
                if emptiest:
                    return two_choices(emptiest)
        return two_choices(open_replicas)

    def start_service(request: int, r: int, now: float) -> None:
        nonlocal seq, max_resident
        busy[r] = True
        took = cfg.service_time
        adapter = adapters[request]
        if adapter != BASE:
            lru = lrus[r]
            if adapter in lru:
                lru.move_to_end(adapter)
            else:
                if len(lru) >= slots:
                    evicted, _ = lru.popitem(last=False)
                    holders[evicted].discard(r)
                lru[adapter] = None
                holders.setdefault(adapter, set()).add(r)
                loaded[request] = True
                took += cfg.load_time
                max_resident = max(max_resident, len(lru))
        start[request] = now
        duration[request] = took
        heapq.heappush(events, (now + took, seq, r, request))
        seq += 1
        if debug:
            check(r)

    def assign(request: int, r: int, now: float) -> None:
        replica_of[request] = r
        qlen[r] += 1
        if busy[r]:
            queues[r].append(request)
        else:
            start_service(request, r, now)
        if debug:
            check(r)

    def complete() -> None:
        now, _, r, request = heapq.heappop(events)
        finish[request] = now
        served[request] += 1
        qlen[r] -= 1
        busy[r] = False
        if queues[r]:
            start_service(queues[r].popleft(), r, now)
        while pending:
            target = route(pending[0])
            if target is None:
                break
            assign(pending.popleft(), target, now)
        if debug:
            check(r)

    for request in range(n):
        now = arrivals[request]
        while events and events[0][0] <= now:
            complete()
        target = route(request) if not pending else None
        if target is None:
            pending.append(request)
            waited_in_router[request] = True
        else:
            assign(request, target, now)
    while events:
        complete()
    assert not pending, "requests left in the router"

    metrics = measure(cfg, workload, start, finish, duration, loaded, replica_of, waited_in_router)
    metrics["distinct_adapters_resident_end"] = len({a for lru in lrus for a in lru})
    metrics["copies_of_top_adapter_end"] = len(holders.get(0, ()))
    return SimOutcome(
        policy=policy,
        metrics=metrics,
        served=served,
        replica_of=replica_of,
        loaded=loaded,
        final_lru=[list(lru) for lru in lrus],
        max_resident=max_resident,
    )


def measure(
    cfg: SimConfig,
    workload: Workload,
    start: list[float],
    finish: list[float],
    duration: list[float],
    loaded: list[bool],
    replica_of: list[int],
    waited_in_router: list[bool],
) -> dict[str, Any]:
    """Metrics over the requests after the warm-up."""
    w = cfg.warmup_requests
    arrivals = np.asarray(workload.arrivals[w:])
    adapters = np.asarray(workload.adapters[w:])
    finish_a = np.asarray(finish[w:])
    start_a = np.asarray(start[w:])
    loads = int(np.count_nonzero(loaded[w:]))
    requests = len(arrivals)
    adapter_requests = int(np.count_nonzero(adapters != BASE))
    per_replica = np.bincount(np.asarray(replica_of[w:]), minlength=cfg.num_replicas)
    busy_per_replica = np.bincount(
        np.asarray(replica_of[w:]), weights=np.asarray(duration[w:]), minlength=cfg.num_replicas
    )
    window = float(finish_a.max() - arrivals[0]) if requests else 0.0
    latency = finish_a - arrivals
    mean_per_replica = float(per_replica.mean())
    return {
        "requests": requests,
        "adapter_requests": adapter_requests,
        "adapter_loads": loads,
        "loads_per_1000_requests": 1000.0 * loads / requests if requests else 0.0,
        "hit_rate": 1.0 - loads / adapter_requests if adapter_requests else float("nan"),
        "requests_per_replica": per_replica.tolist(),
        "balance_max_over_mean": float(per_replica.max()) / mean_per_replica if mean_per_replica else float("nan"),
        "balance_cv": float(per_replica.std()) / mean_per_replica if mean_per_replica else float("nan"),
        "busy_fraction_mean": float(busy_per_replica.mean()) / window if window else float("nan"),
        "busy_fraction_max": float(busy_per_replica.max()) / window if window else float("nan"),
        "latency_mean": float(latency.mean()),
        "latency_p50": float(np.percentile(latency, 50)),
        "latency_p99": float(np.percentile(latency, 99)),
        "wait_mean": float((start_a - arrivals).mean()),
        "router_queued_fraction": float(np.count_nonzero(waited_in_router[w:])) / requests if requests else 0.0,
    }


# ---------------------------------------------------------------------------------------------- running


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--num-adapters", type=int, default=1000)
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of adapter popularity")
    parser.add_argument("--sweep", action="store_true", help=f"also run Zipf exponents {SWEEP_ZIPF}")
    parser.add_argument("--num-replicas", type=int, default=8)
    parser.add_argument("--slots", type=int, default=16, help="adapters a replica holds (LRU)")
    parser.add_argument("--num-requests", type=int, default=100_000)
    parser.add_argument("--warmup-fraction", type=float, default=0.1, help="leading share of requests not measured")
    parser.add_argument("--service-time", type=float, default=1.0, help="time units per request")
    parser.add_argument("--load-time", type=float, default=2.0, help="time units added by an adapter load")
    parser.add_argument("--utilization", type=float, default=0.7, help="busy fraction random routing is set to")
    parser.add_argument("--arrival-rate", type=float, default=None, help="requests per time unit (default: calibrated)")
    parser.add_argument("--base-fraction", type=float, default=0.0, help="share of requests for the base model")
    parser.add_argument(
        "--max-ongoing", type=int, default=5, help="Ray Serve max_ongoing_requests per replica (0: no cap)"
    )
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--debug", action="store_true", help="check the replicas' invariants at every step (slow)")
    parser.add_argument("--output-file", help="write the results as JSON here")
    parser.add_argument("--markdown", help="write a markdown table here")
    parser.add_argument("--plot", help="write a PNG bar chart here (needs matplotlib)")
    return parser


def config_from_args(args: argparse.Namespace, zipf: float) -> SimConfig:
    cfg = SimConfig(
        num_adapters=args.num_adapters,
        zipf=zipf,
        num_replicas=args.num_replicas,
        slots=args.slots,
        num_requests=args.num_requests,
        warmup_fraction=args.warmup_fraction,
        service_time=args.service_time,
        load_time=args.load_time,
        utilization=args.utilization,
        arrival_rate=args.arrival_rate,
        base_fraction=args.base_fraction,
        max_ongoing=args.max_ongoing,
        seed=args.seed,
    )
    if min(cfg.num_adapters, cfg.num_replicas, cfg.slots, cfg.num_requests) < 1:
        raise SystemExit("--num-adapters, --num-replicas, --slots and --num-requests must be at least 1")
    if not 0 <= cfg.warmup_fraction < 1 or not 0 <= cfg.base_fraction <= 1 or cfg.utilization <= 0:
        raise SystemExit("--warmup-fraction must be in [0, 1), --base-fraction in [0, 1], --utilization above 0")
    return cfg


def environment(argv: Sequence[str]) -> dict[str, Any]:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": rev,
        "argv": list(argv),
    }


def run_one(cfg: SimConfig, policies: Sequence[str], debug: bool = False) -> dict[str, Any]:
    """One Zipf exponent: the workload, then every policy on it."""
    workload = make_workload(cfg)
    outcomes = {policy: simulate(workload, cfg, policy, debug=debug) for policy in policies}
    for outcome in outcomes.values():
        if any(count != 1 for count in outcome.served):
            raise RuntimeError(f"{outcome.policy}: a request was not served exactly once")
    result: dict[str, Any] = {
        "zipf": cfg.zipf,
        "arrival_rate": workload.arrival_rate,
        "calibration_random_loads_per_request": workload.calibration_loads_per_request,
        "top_adapter_share": float(zipf_probabilities(cfg.num_adapters, cfg.zipf)[0]),
        "policies": {policy: outcome.metrics for policy, outcome in outcomes.items()},
    }
    if {"multiplexed", "random"} <= set(outcomes):
        mux, rnd = outcomes["multiplexed"].metrics, outcomes["random"].metrics
        result["random_over_multiplexed"] = {
            key: rnd[key] / mux[key] if mux[key] else float("inf")
            for key in ("loads_per_1000_requests", "balance_max_over_mean", "latency_mean", "latency_p99")
        }
    return result


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    zipfs = sorted({args.zipf, *SWEEP_ZIPF}) if args.sweep else [args.zipf]
    base_cfg = config_from_args(args, args.zipf)
    config = asdict(base_cfg)
    config.update(warmup_requests=base_cfg.warmup_requests, zipf=zipfs, policies=list(args.policies))
    runs = []
    for zipf in zipfs:
        runs.append(run_one(replace(base_cfg, zipf=zipf), args.policies, debug=args.debug))
    return {"benchmark": "routing_sim", "environment": environment(argv), "config": config, "runs": runs}


# ---------------------------------------------------------------------------------------------- reporting

COLUMNS = (
    ("loads/1k req", "loads_per_1000_requests", "{:.1f}"),
    ("hit rate", "hit_rate", "{:.1%}"),
    ("req/replica max/mean", "balance_max_over_mean", "{:.3f}"),
    ("req/replica CV", "balance_cv", "{:.3f}"),
    ("busy mean", "busy_fraction_mean", "{:.1%}"),
    ("busy max", "busy_fraction_max", "{:.1%}"),
    ("latency mean", "latency_mean", "{:.2f}"),
    ("latency p99", "latency_p99", "{:.2f}"),
)
HEADERS = ["zipf", "policy", *(name for name, _, _ in COLUMNS)]


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    return [
        [f"{run['zipf']:g}", policy, *(fmt.format(metrics[key]) for _, key, fmt in COLUMNS)]
        for run in result["runs"]
        for policy, metrics in run["policies"].items()
    ]


def describe(result: dict[str, Any]) -> str:
    c = result["config"]
    cap = c["max_ongoing"] if c["max_ongoing"] > 0 else "no cap"
    rates = ", ".join(f"{run['arrival_rate']:.3f} at zipf {run['zipf']:g}" for run in result["runs"])
    rate_how = (
        "given" if c["arrival_rate"] is not None else f"set for ~{c['utilization']:.0%} busy under random routing"
    )
    return (
        f"{c['num_adapters']} adapters, Zipf {'/'.join(f'{z:g}' for z in c['zipf'])}, "
        f"{c['num_replicas']} replicas x {c['slots']} adapter slots (LRU), "
        f"{c['num_requests']} requests ({c['warmup_requests']} warm-up, not measured), "
        f"{c['base_fraction']:.0%} base-model requests, "
        f"service {c['service_time']:g} + load {c['load_time']:g} time units, max_ongoing {cap}, seed {c['seed']}; "
        f"arrival rate per time unit ({rate_how}): {rates}"
    )


def report(result: dict[str, Any]) -> None:
    print(f"\nrouting simulation: {describe(result)}")
    print(text_table(HEADERS, table_rows(result)))
    for run in result["runs"]:
        ratio = run.get("random_over_multiplexed")
        if ratio:
            print(
                f"zipf {run['zipf']:g}: random / multiplexed: loads {ratio['loads_per_1000_requests']:.2f}x, "
                f"max/mean {ratio['balance_max_over_mean']:.3f}x, p99 latency {ratio['latency_p99']:.2f}x"
            )


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        "# Routing simulation: multiplexed vs random routing",
        "",
        f"{env['date'][:10]}, loraserve {env['git'] or '?'}, Python {env['python']}, {env['cpu_count']} CPUs "
        f"(a simulation, no GPU): {describe(result)}.",
        "",
        *markdown_table(HEADERS, table_rows(result)),
        "",
    ]
    ratios = [run for run in result["runs"] if run.get("random_over_multiplexed")]
    if ratios:
        lines += [
            "| zipf | top adapter share | loads random / multiplexed | max/mean random / multiplexed "
            "| p99 latency random / multiplexed |",
            "|---|---:|---:|---:|---:|",
            *(
                f"| {run['zipf']:g} | {run['top_adapter_share']:.1%} "
                f"| {run['random_over_multiplexed']['loads_per_1000_requests']:.2f}x "
                f"| {run['random_over_multiplexed']['balance_max_over_mean']:.3f}x "
                f"| {run['random_over_multiplexed']['latency_p99']:.2f}x |"
                for run in ratios
            ),
            "",
        ]
    lines += [
        "Loads are adapter loads per 1,000 measured requests; balance is over the requests each replica served; busy "
        "is service + load time over the measurement window; latency (time units) is router wait + replica queueing "
        "+ load + service. The model: one request at a time per replica, FIFO; an adapter is resident (and seen by "
        "the router) from the start of the request that loads it; multiplexed routing prefers replicas holding the "
        "adapter, then replicas with the fewest adapters if one has a free slot, then all, by power of two choices on "
        "queue length, skipping replicas at max_ongoing (Ray's backoff and matching timeout are left out). "
        "Regenerate with `python benchmarks/sim_routing.py --sweep --output-file benchmarks/results/routing_sim.json "
        "--markdown benchmarks/results/routing_sim.md --plot benchmarks/results/routing_sim.png`.",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> bool:
    """A bar chart per metric, grouped by Zipf exponent; False (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not importable, no plot written")
        return False
    panels = (
        ("loads_per_1000_requests", "adapter loads / 1,000 requests"),
        ("balance_max_over_mean", "requests per replica: max / mean"),
        ("latency_p99", "p99 latency (time units)"),
    )
    runs = result["runs"]
    policies = list(runs[0]["policies"])
    x = np.arange(len(runs))
    width = 0.8 / len(policies)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (key, title) in zip(axes, panels):
        for k, policy in enumerate(policies):
            values = [run["policies"][policy][key] for run in runs]
            bars = ax.bar(x + (k - (len(policies) - 1) / 2) * width, values, width, label=policy)
            ax.bar_label(
                bars, fmt={"balance_max_over_mean": "%.3g", "latency_p99": "%.1f"}.get(key, "%.0f"), fontsize=8
            )
        ax.set_xticks(x, [f"zipf {run['zipf']:g}" for run in runs])
        ax.set_title(title, fontsize=10)
        if key == "balance_max_over_mean":
            ax.set_ylim(1.0, max(1.01, max(run["policies"][p][key] for run in runs for p in policies) * 1.05))
        ax.margins(y=0.12)
    axes[0].legend(fontsize=8)
    c = result["config"]
    fig.suptitle(
        f"Routing simulation: {c['num_adapters']} adapters, {c['num_replicas']} replicas x {c['slots']} slots, "
        f"{c['num_requests']} requests",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    result = run(args, argv)
    report(result)
    if args.markdown:
        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(markdown(result))
        print(f"wrote {path}")
    if args.plot and plot(result, Path(args.plot)):
        print(f"wrote {args.plot}")
    if args.output_file:
        path = Path(args.output_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
