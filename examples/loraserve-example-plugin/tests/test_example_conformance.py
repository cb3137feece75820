"""The example plugin's ``einsum`` backend and ``lfu`` policy through loraserve's conformance kit.

What a third-party plugin's own test suite looks like: ``pip install -e .`` (loraserve with it), then
``pytest tests/`` here, or ``pytest examples/loraserve-example-plugin/tests`` from a loraserve checkout.
"""

from __future__ import annotations

from loraserve.testing import check_backend, check_eviction_policy
from loraserve_example.backend import EinsumLoRABackend
from loraserve_example.lfu import LFUPolicy


def test_einsum_backend_conforms():
    report = check_backend(EinsumLoRABackend)
    print(report)
    assert report.ran["run_lora"] > 0 and report.ran["rank0_rows"] > 0 and report.ran["padding_ignored"] > 0


def test_lfu_policy_conforms():
    report = check_eviction_policy(LFUPolicy)
    print(report)
    assert report.ran["victim_pure"] > 0 and report.ran["drain"] > 0
