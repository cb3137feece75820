"""The conformance kit (``loraserve.testing``) on the built-in backends and eviction policies, and proof that
it fails: deliberately broken backends and policies must each make it raise AssertionError.

Without a GPU the Triton backends run in Triton's CPU interpreter (float32 and float16); the ``gpu``
tests run every backend compiled on CUDA, bfloat16 included, with the CUDA graph check.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when a kernel is decorated, so it must be set before the kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from loraserve.contract import shrunk_columns  # noqa: E402
from loraserve.plugins.backend_torch.backend import TorchLoRABackend  # noqa: E402
from loraserve.plugins.eviction_fifo import FIFOPolicy  # noqa: E402
from loraserve.plugins.eviction_lru import LRUPolicy  # noqa: E402
from loraserve.testing import BACKEND_CHECKS, EVICTION_CHECKS, check_backend, check_eviction_policy  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def kernel_backend(name: str, **tuning):
    def make(device):
        if name == "triton":
            from loraserve.plugins.backend_triton.backend import SgmvLoRABackend

            return SgmvLoRABackend(device, tuning=tuning)
        from loraserve.plugins.backend_csgmv.backend import ChunkedSgmvLoRABackend

        return ChunkedSgmvLoRABackend(device, tuning=tuning)

    return make


# -- the built-ins conform ----------------------------------------------------------------------


def test_torch_backend_conforms_and_the_report_says_what_did_not_run():
    report = check_backend(TorchLoRABackend)
    print(report)
    for check in (
        "run_lora",
        "rank0_rows",
        "inputs_unchanged",
        "padding_ignored",
        "one_token",
        "steps_in_sequence",
        "embedding",
    ):
        assert report.ran[check] > 0, check
    assert set(report.ran) | set(report.skipped) == set(BACKEND_CHECKS)
    # paths the oracle does not offer are skipped with their reason, never counted
    assert report.ran["shrunk"] == report.ran["epilogue"] == report.ran["null_slot"] == 0
    assert report.skipped["shrunk"] == "supports_shrink_in_gemm is False"
    assert "graph_capturable is False" in report.skipped["null_slot"]
    assert report.ran["graph_capture"] == 0 and report.skipped["graph_capture"]


@pytest.mark.parametrize("name", ["triton", "csgmv"])
def test_triton_backends_conform(name, monkeypatch):
    """Every path: in place, the shrink from the GEMM, the epilogue (forced on, consumers' kernels on
    under the interpreter) and the null slot; on CUDA the graph capture too."""
    monkeypatch.setenv("LORASERVE_FUSED_OPS", "1")
    report = check_backend(kernel_backend(name, epilogue=True), device=DEVICE)
    print(report)
    for check in (
        "run_lora",
        "rank0_rows",
        "inputs_unchanged",
        "padding_ignored",
        "one_token",
        "steps_in_sequence",
        "shrunk",
        "epilogue",
        "null_slot",
    ):
        assert report.ran[check] > 0, check
    assert report.skipped["embedding"] == "supports_embedding is False"
    assert (report.ran["graph_capture"] > 0) == CUDA


@pytest.mark.parametrize("policy", [LRUPolicy, FIFOPolicy], ids=lambda p: p.name)
def test_builtin_eviction_policies_conform(policy):
    report = check_eviction_policy(policy)
    assert set(report.ran) == set(EVICTION_CHECKS)  # every check ran (both define __len__)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["torch", "triton", "csgmv"])
def test_backends_conform_on_gpu(name):
    make = TorchLoRABackend if name == "torch" else kernel_backend(name)
    report = check_backend(make, device="cuda", dtypes=(torch.float32, torch.float16, torch.bfloat16))
    print(report)
    assert report.ran["run_lora"] > 0
    if name != "torch":
        assert report.ran["graph_capture"] > 0 and report.ran["shrunk"] > 0 and report.ran["epilogue"] > 0


# -- the kit fails on broken backends -----------------------------------------------------------


class TouchesRank0Rows(TorchLoRABackend):
    """Forgets to skip rank-0 slots: runs them at the pool's full rank, reading their padding."""

    def prepare(self, batch):
        super().prepare(dataclasses.replace(batch, ranks_host=[r or batch.max_rank for r in batch.ranks_host]))


class IgnoresScaling(TorchLoRABackend):
    def prepare(self, batch):
        super().prepare(dataclasses.replace(batch, scalings_host=[1.0] * len(batch.scalings_host)))


class ModifiesX(TorchLoRABackend):
    """Uses x's first column as scratch space."""

    def run_lora(self, x, A, B, base_out, output_offsets):
        super().run_lora(x, A, B, base_out, output_offsets)
        x[:, 0] = 0


class NotInPlace(TorchLoRABackend):
    """Adds the delta into a copy and drops it."""

    def run_lora(self, x, A, B, base_out, output_offsets):
        super().run_lora(x, A, B, base_out.clone(), output_offsets)


class StaleAcrossSteps(TorchLoRABackend):
    """Builds its token groups on the first prepare only."""

    def prepare(self, batch):
        if getattr(self, "_groups", None) is None:
            super().prepare(batch)
        self.batch = batch


class FusedShrinkTorch(TorchLoRABackend):
    """backend_torch plus the expand-only path over ``shrunk`` (correct: the kit must pass it)."""

    supports_shrink_in_gemm = True

    def first_column(self, slot, i, n_slices, R):
        return shrunk_columns(slot, n_slices, R).start + i * R

    def run_lora(self, x, A, B, base_out, output_offsets, shrunk=None):
        if shrunk is None:
            return super().run_lora(x, A, B, base_out, output_offsets)
        batch, n_slices = self.checked_batch(x, A, B, base_out, output_offsets, shrunk)
        for slot, rank, scaling, idx in self._groups:
            for i in range(n_slices):
                lo, hi = output_offsets[i], output_offsets[i + 1]
                first = self.first_column(slot, i, n_slices, batch.max_rank)
                delta = (shrunk[idx, first : first + rank].float() @ B[slot, lo:hi, :rank].float().T) * scaling
                cols = base_out[:, lo:hi]
                cols[idx] = (cols[idx].float() + delta).to(base_out.dtype)


class WrongShrunkLayout(FusedShrinkTorch):
    """Takes slot s's columns at ``s * R``, forgetting the slices in between."""

    def first_column(self, slot, i, n_slices, R):
        return (slot + i) * R


@pytest.mark.parametrize(
    "broken, message",
    [
        (TouchesRank0Rows, r"rows of rank-0 slots must be left bit-identical, but token row\(s\) \[\d+"),
        (IgnoresScaling, r"output differs from the oracle in \d+ of \d+ elements"),
        (ModifiesX, r"path run_lora: modified its input x "),
        (NotInPlace, r"no LoRA row changed at all: is the delta added into base_out in place\?"),
        (StaleAcrossSteps, r"^backend 'torch', case 'one token on a rank-0 slot'"),  # the second step: the first passes
        (WrongShrunkLayout, r"path run_lora\(shrunk=x @ A_all\^T\): output differs"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_kit_fails_a_broken_backend_and_names_the_case(broken, message):
    with pytest.raises(AssertionError, match=message) as failure:
        check_backend(broken)
    text = str(failure.value)
    assert "backend 'torch', case '" in text and "slot ranks [" in text and "dtype torch.float" in text
    assert "projection " in text  # which projection (slices, widths) too


def test_kit_passes_a_correct_shrink_in_gemm_backend():
    report = check_backend(FusedShrinkTorch)
    assert report.ran["shrunk"] == report.ran["run_lora"] > 0
    assert report.skipped["epilogue"] == "expand_epilogue returned None for every projection"


# -- the kit fails on broken eviction policies --------------------------------------------------


class NonCandidate(LRUPolicy):
    """Returns its own least recently used key, offered or not."""

    def victim(self, candidates):
        candidates = list(candidates)
        return next(iter(self._order), None) if candidates else None


class TouchesVictim(LRUPolicy):
    def victim(self, candidates):
        key = super().victim(candidates)
        if key is not None:
            self.touch(key)
        return key


class ForgetsVictim(LRUPolicy):
    """Drops the victim from its order: asked twice it still answers the same (an unknown key comes
    first), so only the twin comparison catches it."""

    def victim(self, candidates):
        key = super().victim(candidates)
        self.remove(key)
        return key


class CrashesOnEmpty(LRUPolicy):
    def victim(self, candidates):
        return min(candidates, key=lambda k: list(self._order).index(k) if k in self._order else -1)


class RemoveUnknownRaises(LRUPolicy):
    def remove(self, key):
        del self._order[key]


@pytest.mark.parametrize(
    "broken, message",
    [
        (NonCandidate, r"which is not one of the candidates"),
        (TouchesVictim, r"asking must not change the answer"),
        (ForgetsVictim, r"victim\(\) must not change the policy's state"),
        (CrashesOnEmpty, r"victim\(\[\]\) on a fresh policy raised ValueError"),
        (RemoveUnknownRaises, r"remove\('never-inserted'\) on a fresh policy raised KeyError"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_kit_fails_a_broken_eviction_policy(broken, message):
    with pytest.raises(AssertionError, match=message):
        check_eviction_policy(broken)
