"""benchmarks/sim_routing.py on a small cluster (100 adapters, 4 replicas of 4 adapter slots, 5,000 requests):
multiplexed routing loads fewer adapters than random routing under Zipf 1.0, every request is served exactly once,
loads never exceed requests, and no replica ever holds more adapters than its slots (checked at every step with
``debug=True`` and on the final state). Also the script's JSON and markdown, and that a seed fixes the results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import sim_routing  # noqa: E402

SMALL = sim_routing.SimConfig(num_adapters=100, zipf=1.0, num_replicas=4, slots=4, num_requests=5000, seed=3)
SMALL_ARGS = [
    *("--num-adapters", "100", "--num-replicas", "4", "--slots", "4", "--num-requests", "5000", "--seed", "3"),
]


@pytest.fixture(scope="module")
def outcomes() -> dict[str, sim_routing.SimOutcome]:
    workload = sim_routing.make_workload(SMALL)
    return {policy: sim_routing.simulate(workload, SMALL, policy, debug=True) for policy in sim_routing.POLICIES}


def test_multiplexed_loads_fewer_adapters_than_random(outcomes):
    mux = outcomes["multiplexed"].metrics["loads_per_1000_requests"]
    rnd = outcomes["random"].metrics["loads_per_1000_requests"]
    assert 0 < mux < rnd


@pytest.mark.parametrize("policy", sim_routing.POLICIES)
def test_every_request_served_once_and_loads_bounded(outcomes, policy):
    outcome = outcomes[policy]
    assert outcome.served == [1] * SMALL.num_requests
    assert all(0 <= r < SMALL.num_replicas for r in outcome.replica_of)
    metrics = outcome.metrics
    assert metrics["requests"] == SMALL.num_requests - SMALL.warmup_requests
    assert sum(metrics["requests_per_replica"]) == metrics["requests"]
    assert 0 < metrics["adapter_loads"] <= metrics["adapter_requests"] <= metrics["requests"]
    assert sum(outcome.loaded) <= SMALL.num_requests
    assert 0.0 <= metrics["hit_rate"] <= 1.0
    assert metrics["balance_max_over_mean"] >= 1.0
    assert metrics["latency_p99"] >= metrics["latency_p50"] >= SMALL.service_time


@pytest.mark.parametrize("policy", sim_routing.POLICIES)
def test_lru_never_holds_more_than_slots(outcomes, policy):
    outcome = outcomes[policy]
    assert outcome.max_resident == SMALL.slots  # filled up, never over
    for lru in outcome.final_lru:
        assert len(lru) <= SMALL.slots
        assert len(set(lru)) == len(lru)


def test_debug_check_catches_an_overfull_replica(monkeypatch):
    """The invariant check can fail: with one slot too many admitted, debug mode raises."""
    cfg = sim_routing.SimConfig(num_adapters=20, num_replicas=2, slots=2, num_requests=200, seed=1)
    workload = sim_routing.make_workload(cfg)
    real_popitem = sim_routing.OrderedDict.popitem

    class Leaky(sim_routing.OrderedDict):
        def popitem(self, last: bool = True):  # evicts nothing once full: the LRU grows past its slots
            return (next(iter(self)), None) if len(self) >= cfg.slots else real_popitem(self, last)

    monkeypatch.setattr(sim_routing, "OrderedDict", Leaky)
    with pytest.raises(AssertionError, match="adapters >"):
        sim_routing.simulate(workload, cfg, "random", debug=True)


def test_script_writes_json_and_markdown_deterministically(tmp_path, capsys):
    out, md = tmp_path / "sim.json", tmp_path / "sim.md"
    result = sim_routing.main([*SMALL_ARGS, "--output-file", str(out), "--markdown", str(md)])
    written = json.loads(out.read_text())
    assert {"python", "platform", "cpu_count", "date", "argv"} <= set(written["environment"])
    assert written["environment"]["argv"][:2] == ["--num-adapters", "100"]
    (run,) = written["runs"]
    assert set(run["policies"]) == set(sim_routing.POLICIES)
    assert run["random_over_multiplexed"]["loads_per_1000_requests"] > 1.0
    assert "| 1 | multiplexed |" in md.read_text()
    assert "loads/1k req" in capsys.readouterr().out
    again = sim_routing.main(SMALL_ARGS)
    assert again["runs"] == result["runs"]
