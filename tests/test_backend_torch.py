"""backend_torch against the LoRA formula computed token by token in float64 (and the example backend
against backend_torch)."""

from __future__ import annotations

import pytest
import torch

from loraserve.contract import LoRABatchInfo
from loraserve.plugins.backend_torch.backend import TorchLoRABackend
from loraserve.testing import check_backend


def formula(x, A, B, base, offsets, token_slot, ranks, scalings, R):
    """base + scaling * (x @ A^T) @ B^T, one token at a time, in float64."""
    out = base.double().clone()
    for t in range(x.shape[0]):
        s = token_slot[t]
        r = ranks[s]
        if r == 0:
            continue
        for i in range(len(offsets) - 1):
            lo, hi = offsets[i], offsets[i + 1]
            h = A[s, i * R : i * R + r].double() @ x[t].double()
            out[t, lo:hi] += scalings[s] * (B[s, lo:hi, :r].double() @ h)
    return out


def random_case(gen, seg_lens, seg_slot, ranks, offsets, in_dim, R, dtype=torch.float32):
    n_slots, T = len(ranks), sum(seg_lens)
    x = torch.randn(T, in_dim, generator=gen).to(dtype)
    A = torch.randn(n_slots, (len(offsets) - 1) * R, in_dim, generator=gen).to(dtype)
    B = torch.randn(n_slots, offsets[-1], R, generator=gen).to(dtype)
    base = torch.randn(T, offsets[-1], generator=gen).to(dtype)
    scalings = (torch.rand(n_slots, generator=gen) * 2 + 0.1).tolist()
    info = LoRABatchInfo.build(seg_lens, seg_slot, ranks, scalings, R)
    return x, A, B, base, info


CASES = {
    "odd sizes, one slice": dict(seg_lens=[5], seg_slot=[1], ranks=[0, 3], offsets=(0, 72), in_dim=72, R=4),
    "one token": dict(seg_lens=[1], seg_slot=[0], ranks=[5, 0], offsets=(0, 33), in_dim=17, R=8),
    "qkv slices, mixed ranks incl. 0": dict(
        seg_lens=[3, 1, 4, 2], seg_slot=[2, 0, 1, 2], ranks=[0, 1, 7], offsets=(0, 24, 32, 40), in_dim=24, R=8
    ),
    "gate_up slices, many segments": dict(
        seg_lens=[1] * 9 + [6],
        seg_slot=[i % 4 for i in range(10)],
        ranks=[2, 4, 3, 0],
        offsets=(0, 40, 80),
        in_dim=20,
        R=4,
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_torch_backend_matches_formula(gen, case):
    cfg = CASES[case]
    x, A, B, base, info = random_case(
        gen, cfg["seg_lens"], cfg["seg_slot"], cfg["ranks"], cfg["offsets"], cfg["in_dim"], cfg["R"]
    )
    expected = formula(
        x, A, B, base, cfg["offsets"], info.token_slot.tolist(), cfg["ranks"], info.scalings_host, cfg["R"]
    )
    out = base.clone()
    backend = TorchLoRABackend()
    backend.prepare(info)
    backend.run_lora(x, A, B, out, cfg["offsets"])
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    base_rows = [t for t, s in enumerate(info.token_slot.tolist()) if cfg["ranks"][s] == 0]
    assert torch.equal(out[base_rows], base[base_rows])  # rank-0 rows bit-identical


def test_padding_beyond_rank_is_ignored(gen):
    cfg = CASES["qkv slices, mixed ranks incl. 0"]
    x, A, B, base, info = random_case(
        gen, cfg["seg_lens"], cfg["seg_slot"], cfg["ranks"], cfg["offsets"], cfg["in_dim"], cfg["R"]
    )
    A2, B2 = A.clone(), B.clone()
    for s, r in enumerate(cfg["ranks"]):  # garbage in the padding must not change the result
        for i in range(3):
            A2[s, i * cfg["R"] + r : (i + 1) * cfg["R"]] = 1e6
        B2[s, :, r:] = -1e6
    out1, out2 = base.clone(), base.clone()
    backend = TorchLoRABackend()
    backend.prepare(info)
    backend.run_lora(x, A, B, out1, cfg["offsets"])
    backend.run_lora(x, A2, B2, out2, cfg["offsets"])
    assert torch.equal(out1, out2)


def test_embedding_lora_matches_formula(gen):
    vocab, hidden, R = 50, 12, 4
    ranks, seg_lens, seg_slot = [0, 3], [2, 3], [1, 0]
    ids = torch.randint(0, vocab, (5,), generator=gen)
    A = torch.randn(2, R, vocab, generator=gen)
    B = torch.randn(2, hidden, R, generator=gen)
    base = torch.randn(5, hidden, generator=gen)
    info = LoRABatchInfo.build(seg_lens, seg_slot, ranks, [0.5, 2.0], R)
    out = base.clone()
    backend = TorchLoRABackend()
    backend.prepare(info)
    backend.run_lora_embedding(ids, A, B, out)
    expected = base.double().clone()
    for t in range(2):  # slot 1, rank 3, scaling 2.0
        expected[t] += 2.0 * (B[1, :, :3].double() @ A[1, :3, ids[t]].double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_shape_errors_name_the_tensor(gen):
    cfg = CASES["odd sizes, one slice"]
    x, A, B, base, info = random_case(
        gen, cfg["seg_lens"], cfg["seg_slot"], cfg["ranks"], cfg["offsets"], cfg["in_dim"], cfg["R"]
    )
    backend = TorchLoRABackend()
    backend.prepare(info)
    with pytest.raises(ValueError, match="B has shape"):
        backend.run_lora(x, A, B[:, :10], base, cfg["offsets"])
    with pytest.raises(ValueError, match="segment slot 5"):
        LoRABatchInfo.build([1], [5], [0, 1], [1.0, 1.0], 4)


def test_example_einsum_backend_matches_torch_backend():
    """The conformance kit's cases, backend_torch the oracle."""
    example = pytest.importorskip("loraserve_example.backend")
    report = check_backend(example.EinsumLoRABackend)
    assert report.ran["run_lora"] > 0 and report.ran["rank0_rows"] > 0
