"""``check_eviction_policy``: an eviction policy against the ``EvictionPolicy`` contract.

The contract says nothing about *which* candidate a policy evicts (that is the policy's point), only
what it may and may not do; so the kit checks that, on hand-picked calls and on seeded random
sequences that follow the pool's protocol (insert a key when it enters the tier, touch it on use,
remove it when it leaves, ask for a victim among any keys, known or not). Three fresh policies run
every sequence in lockstep: one is also asked for extra victims, one also told to remove keys it
never held, the third neither; whenever they are asked the same question they must give the same
answer, which is how "victim() changes no state" and "removing an unknown key is a no-op" are
checked without knowing the policy's order. So ``make_policy()`` must give a fresh policy each call,
and a policy must answer the same question in the same state the same way (no randomness).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable

from loraserve.contract import EvictionPolicy
from loraserve.testing.compare import call
from loraserve.testing.report import ConformanceReport

EVICTION_CHECKS = {
    "empty_candidates": "victim() of no candidates (list, tuple, empty iterator) is None",
    "victim_in_candidates": "victim() returns one of the candidates, never a key outside them",
    "unknown_candidates": "keys never inserted (or already removed) may be offered as candidates",
    "victim_repeatable": "asking twice in a row gives the same answer",
    "iterator_candidates": "candidates given as a one-shot iterator get the same answer as a list",
    "victim_pure": "victim() changes no state: a twin never asked evicts in the same order",
    "remove_unknown_noop": "remove() of a key not held changes no state (twin compared)",
    "drain": "evicting the held keys one by one returns each exactly once, in the twins' common order",
    "len_consistent": "len(policy), where defined, counts the keys inserted and not removed",
    "random_sequences": "seeded random insert/touch/remove/victim sequences never raise",
}

KEYS: tuple[Hashable, ...] = ("a", "b", "c", "d", "e", "f", ("adapter", 1), ("adapter", 2), 7, 8)
HISTORY = 30  # operations quoted in a failure message


class _Run:
    """One random sequence on three twin policies (see the module docstring), with its log."""

    def __init__(self, make_policy: Callable[[], EvictionPolicy], where: str, report: ConformanceReport):
        self.where, self.report, self.log = where, report, []
        self.plain = call(where, "make_policy()", make_policy)
        self.asked = call(where, "make_policy()", make_policy)  # also asked for extra victims
        self.removed = call(where, "make_policy()", make_policy)  # also told to remove unknown keys
        self.held: list[Hashable] = []

    def fail(self, what: str) -> None:
        ops = "; ".join(self.log[-HISTORY:])
        raise AssertionError(f"{self.where}: {what}. Last operations (all twins unless marked): {ops}")

    def do(self, op: str, key: Hashable) -> None:
        self.log.append(f"{op}({key!r})")
        for policy in (self.plain, self.asked, self.removed):
            call(f"{self.where}, after {'; '.join(self.log[-HISTORY:])}", f"{op}({key!r})", getattr(policy, op), key)

    def victim(self, policy: EvictionPolicy, candidates, shown: list[Hashable], twin: str) -> Hashable | None:
        answer = call(
            f"{self.where}, after {'; '.join(self.log[-HISTORY:])}",
            f"victim({shown!r}) on {twin}",
            policy.victim,
            candidates,
        )
        if not shown:
            if answer is not None:
                self.fail(f"victim({shown!r}) on {twin} returned {answer!r}; with no candidates it must be None")
            self.report.passed("empty_candidates")
        elif answer not in shown:
            self.fail(f"victim({shown!r}) on {twin} returned {answer!r}, which is not one of the candidates")
        else:
            self.report.passed("victim_in_candidates")
        return answer

    def probe(self, candidates: list[Hashable]) -> None:
        """Extra questions to the ``asked`` twin only: in candidates, the same twice, the same from an iterator."""
        first = self.victim(self.asked, list(candidates), candidates, "the asked twin")
        again = self.victim(self.asked, list(candidates), candidates, "the asked twin")
        self.log.append(f"[asked twin] victim({candidates!r}) -> {first!r}, again -> {again!r}")
        if again != first:
            self.fail(
                f"victim({candidates!r}) returned {first!r} and then {again!r}: asking must not change the answer"
            )
        self.report.passed("victim_repeatable")
        from_iter = self.victim(self.asked, iter(candidates), candidates, "the asked twin (an iterator)")
        if from_iter != first:
            self.fail(f"victim(iter({candidates!r})) returned {from_iter!r} but victim of the list {first!r}")
        self.report.passed("iterator_candidates")

    def compare(self, candidates: list[Hashable]) -> Hashable | None:
        """The same question to all three twins: the same answer, or the extra calls changed a twin."""
        want = self.victim(self.plain, list(candidates), candidates, "the plain twin")
        got = self.victim(self.asked, list(candidates), candidates, "the asked twin")
        got_removed = self.victim(self.removed, list(candidates), candidates, "the removed twin")
        self.log.append(f"victim({candidates!r}) -> {want!r}")
        if got != want:
            self.fail(
                f"victim({candidates!r}) is {want!r} on a fresh twin that went through the same inserts, "
                f"touches and removes, but {got!r} on the twin that was also asked for victims: victim() "
                "must not change the policy's state"
            )
        self.report.passed("victim_pure")
        if got_removed != want:
            self.fail(
                f"victim({candidates!r}) is {want!r} on a fresh twin but {got_removed!r} on the twin that was "
                "also told to remove keys it never held: removing an unknown key must be a no-op"
            )
        self.report.passed("remove_unknown_noop")
        if any(c not in self.held for c in candidates):
            self.report.passed("unknown_candidates")
        return want

    def check_len(self) -> None:
        if hasattr(type(self.plain), "__len__"):
            n = len(self.plain)
            if n != len(self.held):
                self.fail(f"len(policy) is {n} but {len(self.held)} keys were inserted and not removed")
            self.report.passed("len_consistent")


def check_eviction_policy(
    make_policy: Callable[[], EvictionPolicy], *, seed: int = 0, sequences: int = 60, steps: int = 40
) -> ConformanceReport:
    """Check an eviction policy against the ``EvictionPolicy`` contract; raise AssertionError on a violation.

    :param make_policy: returns a fresh policy each call (a policy class, or a plugin's factory).
    :param seed: seeds the random sequences; a failure names the sequence and quotes its last operations.
    :param sequences: how many random sequences to run, each on three fresh twin policies.
    :param steps: operations per sequence (then every held key is evicted in turn).
    :return: a :class:`ConformanceReport` of the checks that ran.
    """
    name = getattr(call("make_policy()", "make_policy()", make_policy), "name", "?")
    report = ConformanceReport(f"eviction policy {name!r}", dict(EVICTION_CHECKS))
    _check_by_hand(make_policy, f"eviction policy {name!r}, hand-picked calls", report)
    for i in range(sequences):
        rng = random.Random(f"{seed}/{i}")
        run = _Run(make_policy, f"eviction policy {name!r}, random sequence {i} of seed {seed}", report)
        ghosts = [f"never-inserted-{i}-{j}" for j in range(3)]
        for _ in range(steps):
            free = [k for k in KEYS if k not in run.held]
            op = rng.choices(
                ("insert", "touch", "remove", "remove_unknown", "probe", "compare"),
                weights=(3 if free else 0, 4 if run.held else 0, 2 if run.held else 0, 1, 2, 2),
            )[0]
            if op == "insert":
                key = rng.choice(free)
                run.do("insert", key)
                run.held.append(key)
            elif op in ("touch", "remove"):
                key = rng.choice(run.held)
                run.do(op, key)
                if op == "remove":
                    run.held.remove(key)
            elif op == "remove_unknown":
                key = rng.choice(ghosts + free)
                run.log.append(f"[removed twin] remove({key!r})")
                call(
                    f"{run.where}, after {'; '.join(run.log[-HISTORY:])}",
                    f"remove({key!r}) of a key not held",
                    run.removed.remove,
                    key,
                )
            else:
                candidates = rng.sample(run.held, rng.randint(0, len(run.held)))
                if rng.random() < 0.3:
                    candidates.insert(rng.randint(0, len(candidates)), rng.choice(ghosts + free))
                if op == "probe":
                    run.probe(candidates)
                else:
                    run.compare(candidates)
            run.check_len()
        _drain(run, rng)
        report.passed("random_sequences")
    report.skip("len_consistent", "the policy defines no __len__")
    return report.finish()


def _check_by_hand(make_policy: Callable[[], EvictionPolicy], where: str, report: ConformanceReport) -> None:
    run = _Run(make_policy, where, report)
    for empty in ([], (), iter(())):
        run.victim(run.plain, empty, [], "a fresh policy")
    call(where, "remove('never-inserted') on a fresh policy", run.plain.remove, "never-inserted")
    run.victim(run.plain, ["stranger"], ["stranger"], "a fresh policy")  # the only candidate, never inserted
    report.passed("unknown_candidates")
    for key in ("a", "b", "c"):
        run.do("insert", key)
        run.held.append(key)
    run.victim(run.plain, [], [], "a policy holding a, b, c")
    run.probe(["b"])
    run.probe(["stranger", "a"])
    run.probe(["c", "a", "b"])
    run.compare(["a", "b", "c"])
    run.check_len()


def _drain(run: _Run, rng: random.Random) -> None:
    """Evict every held key in turn (all twins asked the same), then check nothing is left behind."""
    seen = []
    while run.held:
        candidates = rng.sample(run.held, len(run.held))
        victim = run.compare(candidates)
        seen.append(victim)
        run.do("remove", victim)
        run.held.remove(victim)
        run.check_len()
    if len(seen) != len(set(seen)):
        run.fail(f"draining returned a key twice: {seen}")
    run.report.passed("drain")
