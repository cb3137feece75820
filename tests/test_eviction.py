"""Eviction policies: LRU and FIFO on a sequence where they disagree, and the shared contract."""

from __future__ import annotations

import pytest

from loraserve.plugins.eviction_fifo import FIFOPolicy
from loraserve.plugins.eviction_lru import LRUPolicy


def replay(policy, events):
    for op, key in events:
        getattr(policy, op)(key)
    return policy


# a, b, c enter in that order; then a is used again. LRU keeps a (recent), FIFO evicts it (oldest).
SEQUENCE = [("insert", "a"), ("insert", "b"), ("insert", "c"), ("touch", "a"), ("touch", "b")]


def test_lru_and_fifo_choose_different_victims():
    lru, fifo = replay(LRUPolicy(), SEQUENCE), replay(FIFOPolicy(), SEQUENCE)
    assert lru.victim(["a", "b", "c"]) == "c"
    assert fifo.victim(["a", "b", "c"]) == "a"


@pytest.mark.parametrize("policy_cls, first, then", [(LRUPolicy, "c", "a"), (FIFOPolicy, "b", "a")])
def test_victim_only_from_candidates_and_does_not_change_state(policy_cls, first, then):
    policy = replay(policy_cls(), SEQUENCE)
    assert policy.victim(["b", "c"]) == first
    assert policy.victim(["b", "c"]) == first  # asking twice gives the same answer
    assert policy.victim([]) is None
    policy.remove(first)
    policy.remove("never-inserted")  # a no-op
    assert policy.victim([k for k in "abc" if k != first]) == then


def test_lru_full_order_after_removal():
    policy = replay(LRUPolicy(), SEQUENCE)
    order = []
    keys = ["a", "b", "c"]
    while keys:
        v = policy.victim(keys)
        order.append(v)
        policy.remove(v)
        keys.remove(v)
    assert order == ["c", "a", "b"]


def test_fifo_reinsert_goes_to_the_back():
    policy = replay(FIFOPolicy(), SEQUENCE + [("remove", "a"), ("insert", "a")])
    assert policy.victim(["a", "b", "c"]) == "b"


@pytest.mark.parametrize("policy_cls", [LRUPolicy, FIFOPolicy])
def test_unknown_candidate_is_evicted_first(policy_cls):
    policy = replay(policy_cls(), SEQUENCE)
    assert policy.victim(["b", "stranger"]) == "stranger"


def test_example_lfu_policy():
    lfu_mod = pytest.importorskip("loraserve_example.lfu")
    policy = replay(lfu_mod.LFUPolicy(), SEQUENCE + [("touch", "b")])
    assert policy.victim(["a", "b", "c"]) == "c"  # used once
    assert policy.victim(["a", "b"]) == "a"  # used twice vs three times
