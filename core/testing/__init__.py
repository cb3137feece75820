"""``loraserve.testing``: conformance checks a LoRA kernel backend or an eviction policy runs in its own tests.

:func:`check_backend` runs seeded random steps (1 and 5 tokens, rank 3, rank-0 slots, base rows,
1/2/3 output slices with unequal qkv widths, several segments on mixed slots, scalings away from
1, NaN past each slot's rank) through ``prepare`` and ``run_lora`` and compares every output
with backend_torch, the oracle. It checks what the ``LoRABackend`` contract says: the delta is
added in place within the dtype's tolerance; rows of rank-0 slots stay bit-identical; x, A and B
are never modified; one-token steps work; and, when the backend offers them, ``shrunk`` (the
shrink done by the base GEMM), the epilogue from ``expand_epilogue`` (applied eagerly), LoRA on the
embedding, and on CUDA a graph capture of ``prepare`` + ``run_lora`` replayed over refilled buffers.
:func:`check_eviction_policy` checks the ``EvictionPolicy`` contract on hand-picked calls and seeded
random sequences. A violation raises AssertionError naming the case (sizes, slots, ranks, dtype)
and what differed; both return a :class:`ConformanceReport` listing which checks ran and which were
skipped, and why (a path the backend does not offer is skipped, never counted as passed).

A plugin's test::

    from loraserve.testing import check_backend, check_eviction_policy
    from my_plugin.backend import MyLoRABackend
    from my_plugin.policy import MyPolicy

    def test_conformance():
        print(check_backend(lambda device: MyLoRABackend(device)))
        check_eviction_policy(MyPolicy)
"""

from __future__ import annotations

from loraserve.testing.backend import BACKEND_CHECKS, check_backend
from loraserve.testing.cases import BackendCase, Projection, default_cases, gate_up, plain, qkv, random_cases
from loraserve.testing.compare import TOLERANCES
from loraserve.testing.eviction import EVICTION_CHECKS, check_eviction_policy
from loraserve.testing.report import ConformanceReport

__all__ = [
    "BACKEND_CHECKS",
    "EVICTION_CHECKS",
    "TOLERANCES",
    "BackendCase",
    "ConformanceReport",
    "Projection",
    "check_backend",
    "check_eviction_policy",
    "default_cases",
    "gate_up",
    "plain",
    "qkv",
    "random_cases",
]
