"""The fused Triton kernels of ``loraserve.models.fused`` against the eager PyTorch code they replace.

Without a GPU they run in Triton's interpreter: tests/conftest.py sets ``TRITON_INTERPRET=1`` and a
fixture here sets ``LORASERVE_FUSED_OPS=1``, which sends CPU tensors through the kernels. The oracles
are the eager formulas (Hugging Face's RMSNorm and ``rotate_half``, ``F.silu``) and, for the whole
model, our own eager path. Rounding is checked bit for bit; where the eager result depends on
something the kernels do not reproduce (the order of RMSNorm's float32 sum, and on CPU the last bit
of torch's float32 ``exp``), a test pins the rest down bit for bit and bounds the difference in
units in the last place (ulp).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loraserve.models import fused
from loraserve.models.llama import LlamaForCausalLM

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Kernel tests run where the kernels do: compiled on a GPU, in the interpreter on CPU otherwise
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def fused_on(monkeypatch):
    """The fused path on, on CPU too (under the interpreter), unless a test turns it off."""
    monkeypatch.setenv("LORASERVE_FUSED_OPS", "1")


# -- oracles and helpers ------------------------------------------------------------------------


def eager_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def eager_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place between two tensors of one float dtype."""
    assert a.dtype == b.dtype and a.shape == b.shape
    int_type, bits = (torch.int32, 32) if a.dtype == torch.float32 else (torch.int16, 16)

    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.contiguous().view(int_type).to(torch.int64)
        return torch.where(i < 0, -(i & ((1 << (bits - 1)) - 1)), i)  # sign-magnitude -> a number line

    return (ordered(a) - ordered(b)).abs()


def assert_rarely_off(got: torch.Tensor, want: torch.Tensor, max_ulp: int, max_fraction: float) -> None:
    """At most ``max_fraction`` of the elements differ, none by more than ``max_ulp``."""
    ulps = ulp_distance(got, want)
    assert ulps.max().item() <= max_ulp, f"{ulps.max().item()} ulp apart"
    assert (ulps > 0).float().mean().item() <= max_fraction, f"{(ulps > 0).sum().item()} of {ulps.numel()} differ"


def strided_rows(t: torch.Tensor, pad: int) -> torch.Tensor:
    """``t`` as a view whose rows are ``pad`` elements wider apart than its width, as a fused
    projection's slice is."""
    wide = torch.full((t.shape[0], t.shape[1] + pad), float("nan"), dtype=t.dtype, device=t.device)
    wide[:, : t.shape[1]] = t
    return wide[:, : t.shape[1]]


def exact_sum_values(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Multiples of 1/8 up to 7/8 in magnitude. The squares of these and of sums of two of them are
    multiples of 1/64 up to 196/64, so any partial sum of up to 65536 of them is exact in float32:
    RMSNorm's sum of squares then does not depend on the order the kernel and torch add in."""
    return (torch.randint(-7, 8, shape, generator=gen) / 8).to(dtype)


def rope_tables(gen: torch.Generator, T: int, D: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.randint(0, 8192, (T,), generator=gen).float()
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.cat([positions[:, None] * inv_freq[None, :]] * 2, dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# -- RMSNorm ------------------------------------------------------------------------------------

SHAPES = [(1, 72), (5, 64), (33, 72)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T,N", SHAPES)
def test_rms_norm_rounds_as_eager_bit_for_bit(gen, dtype, T, N):
    x = strided_rows(exact_sum_values(gen, (T, N), dtype).to(DEVICE), pad=24)
    residual = exact_sum_values(gen, (T, N), dtype).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(N, generator=gen)).to(DEVICE, dtype)
    assert torch.equal(fused.rms_norm(x, weight, 1e-5), eager_rms_norm(x, weight, 1e-5))
    out, h = fused.rms_norm(x, weight, 1e-6, residual)
    assert torch.equal(h, residual + x)
    assert h.is_contiguous() and out.is_contiguous()
    assert torch.equal(out, eager_rms_norm(residual + x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rms_norm_random_rows_differ_from_eager_only_by_the_sum_order(gen, dtype):
    """With arbitrary values the float32 sum of squares may differ in its last bit from torch's. In
    a 16-bit dtype that flips the rounding of an element now and then, and the product with the
    weight can carry a flip to 2 ulp; in float32 every element may move by a few ulp. The residual
    stream never differs."""
    T, N = 33, 1000
    x = strided_rows(torch.randn(T, N, generator=gen).to(DEVICE, dtype), pad=8)
    residual = (4 * torch.randn(T, N, generator=gen)).to(DEVICE, dtype)
    weight = (1 + 0.1 * torch.randn(N, generator=gen)).to(DEVICE, dtype)
    out, h = fused.rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(h, residual + x)
    max_ulp, max_fraction = (4, 1.0) if dtype == torch.float32 else (2, 0.01)
    assert_rarely_off(out, eager_rms_norm(residual + x, weight, 1e-5), max_ulp, max_fraction)
    assert_rarely_off(fused.rms_norm(x, weight, 1e-5), eager_rms_norm(x, weight, 1e-5), max_ulp, max_fraction)


# -- SiLU-and-mul -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T,I", [(1, 44), (5, 100), (33, 72)])
def test_silu_and_mul_rounds_as_eager(gen, dtype, T, I):
    gate_up = strided_rows((3 * torch.randn(T, 2 * I, generator=gen)).to(DEVICE, dtype), pad=40)
    got = fused.silu_and_mul(gate_up, I)
    eager = F.silu(gate_up[:, :I]) * gate_up[:, I:]
    if gate_up.is_cuda:  # the kernel's exp is CUDA's expf, as torch's
        assert torch.equal(got, eager)
        return
    # The rounding steps bit for bit, given the exp the interpreter uses (numpy's, whose float32
    # results differ from torch's CPU exp in the last bit now and then)...
    gate, up = gate_up.float().split(I, dim=-1)
    act = (gate / (1 + torch.from_numpy(np.exp(-gate.numpy())))).to(dtype)
    assert torch.equal(got, act * up.to(dtype))
    # ...and so against F.silu: float32 within a few ulp; in 16-bit types an exp one bit off now
    # and then flips the rounding of the activation, which the product with up carries to 2 ulp
    assert_rarely_off(got, eager, *((4, 1.0) if dtype == torch.float32 else (2, 0.01)))


# -- rotary -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T,H,HKV,D", [(1, 4, 2, 16), (5, 3, 1, 64), (33, 4, 4, 16), (5, 2, 1, 18)])
def test_rotary_is_bit_identical_to_eager(gen, dtype, T, H, HKV, D):
    qkv = torch.randn(T, (H + 2 * HKV) * D + 8, generator=gen).to(DEVICE, dtype)  # rows wider than q + k + v
    q = qkv[:, : H * D].view(T, H, D)
    k = qkv[:, H * D : (H + HKV) * D].view(T, HKV, D)
    before = qkv.clone()
    cos, sin = (t.to(DEVICE) for t in rope_tables(gen, T, D, dtype))
    q_rot, k_rot = fused.rotary(q, k, cos, sin)
    assert q_rot.is_contiguous() and k_rot.is_contiguous()
    assert torch.equal(q_rot, eager_rotary(q, cos, sin))
    assert torch.equal(k_rot, eager_rotary(k, cos, sin))
    assert torch.equal(qkv, before)


# -- validation and dispatch --------------------------------------------------------------------


def test_bad_shapes_are_refused_naming_the_value():
    x = torch.randn(3, 8)  # refused before any launch, so CPU tensors do on any machine
    with pytest.raises(ValueError, match=r"weight must be a contiguous \[8\]"):
        fused.rms_norm(x, torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match=r"residual \(3, 7\)"):
        fused.rms_norm(x, torch.ones(8), 1e-5, torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"gate_up has shape \(3, 8\); expected \[T, 2 \* 5\]"):
        fused.silu_and_mul(x, 5)
    with pytest.raises(ValueError, match="contiguous last dim"):
        fused.silu_and_mul(x.t(), 4)
    q, k = torch.randn(2, 4, 8), torch.randn(2, 2, 8)
    with pytest.raises(ValueError, match=r"cos must be \[2, 8\]"):
        fused.rotary(q, k, torch.randn(2, 6), torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"k \(2, 2, 6\)"):
        fused.rotary(q, torch.randn(2, 2, 6), torch.randn(2, 8), torch.randn(2, 8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dispatch rules")
def test_cpu_takes_the_kernels_only_when_asked_and_interpreted(monkeypatch):
    t = torch.zeros(2)
    assert fused.use_fused(t)  # LORASERVE_FUSED_OPS=1 (the fixture) and conftest's TRITON_INTERPRET=1
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not fused.use_fused(t)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for mode in ("0", "auto"):  # auto: CUDA only, so the rest of the CPU suite stays eager
        monkeypatch.setenv("LORASERVE_FUSED_OPS", mode)
        assert not fused.use_fused(t)
    monkeypatch.delenv("LORASERVE_FUSED_OPS")
    assert not fused.use_fused(t)
    monkeypatch.setenv("LORASERVE_FUSED_OPS", "sometimes")
    with pytest.raises(ValueError, match="LORASERVE_FUSED_OPS='sometimes'"):
        fused.use_fused(t)


# -- the whole model ----------------------------------------------------------------------------


class DenseCausalAttention:
    """Causal attention over one sequence, as the engine's attention would give it."""

    def attention(self, layer_idx, q, k, v):
        groups = q.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.transpose(0, 1).repeat_interleave(groups, 0),
            v.transpose(0, 1).repeat_interleave(groups, 0),
            is_causal=True,
        )
        return out.transpose(0, 1)


def tiny_model(dtype: torch.dtype, gen: torch.Generator) -> LlamaForCausalLM:
    from transformers import LlamaConfig

    # odd sizes: hidden 72, head_dim 18 (a half of 9), intermediate 100
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=72,
        intermediate_size=100,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )
    model = LlamaForCausalLM(config, dtype=dtype, device=DEVICE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen).to(DEVICE)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)
    return model


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_model_forward_is_the_same_with_fused_ops(gen, monkeypatch, dtype):
    model = tiny_model(dtype, gen)
    ids = torch.randint(0, 97, (9,), generator=gen).to(DEVICE)
    positions = torch.arange(9, device=DEVICE) + 3
    calls: dict[str, int] = {}
    for name in ("rms_norm", "silu_and_mul", "rotary"):

        def counted(*args, _fn=getattr(fused, name), _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(fused, name, counted)
    with torch.no_grad():
        got = model(ids, positions, DenseCausalAttention())
        assert calls == {"rms_norm": 5, "rotary": 2, "silu_and_mul": 2}  # 2 norms a layer and the final one
        monkeypatch.setenv("LORASERVE_FUSED_OPS", "0")
        want = model(ids, positions, DenseCausalAttention())
    assert sum(calls.values()) == 9  # the eager forward called no kernel
    assert got.dtype == dtype
    if dtype == torch.float32:  # no intermediate rounding to check; the sum order moves every value
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        # A rounding step done differently would change most elements. What may differ is an
        # element flipped by the sum order or the exp (see above), carried on by later layers.
        assert (got == want).float().mean().item() >= 0.9
        torch.testing.assert_close(got, want, rtol=0.01, atol=0.01)


# -- on a GPU, at Llama-3.1-8B sizes ------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("T", [1, 64, 2048])
def test_gpu_kernels_match_eager_at_llama_8b_sizes(T):
    gen = torch.Generator().manual_seed(T)
    dt, hidden, H, HKV, D, inter = torch.bfloat16, 4096, 32, 8, 128, 14336

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(dt).cuda()

    assert fused.use_fused(torch.empty(1, device="cuda"))
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dt).cuda()
    x = strided_rows(rand(T, hidden), pad=64)
    residual = rand(T, hidden, scale=4.0)
    out, h = fused.rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(h, residual + x)
    # torch's CUDA reduction adds in another order: in rows whose float32 sum comes out differently a
    # few outputs may move by an ulp or two; with sums that are exact in any order the bits match
    assert_rarely_off(out, eager_rms_norm(residual + x, weight, 1e-5), 2, 1e-3)
    exact = exact_sum_values(gen, (T, hidden), dt).cuda()
    assert torch.equal(fused.rms_norm(exact, weight, 1e-5), eager_rms_norm(exact, weight, 1e-5))

    gate_up = strided_rows(rand(T, 2 * inter, scale=3.0), pad=16)
    assert torch.equal(fused.silu_and_mul(gate_up, inter), F.silu(gate_up[:, :inter]) * gate_up[:, inter:])

    qkv = rand(T, (H + 2 * HKV) * D)
    q, k = qkv[:, : H * D].view(T, H, D), qkv[:, H * D : (H + HKV) * D].view(T, HKV, D)
    cos, sin = (t.cuda() for t in rope_tables(gen, T, D, dt))
    q_rot, k_rot = fused.rotary(q, k, cos, sin)
    assert torch.equal(q_rot, eager_rotary(q, cos, sin)) and torch.equal(k_rot, eager_rotary(k, cos, sin))


@pytest.mark.gpu
@needs_cuda
def test_gpu_kernels_replay_in_a_cuda_graph():
    gen = torch.Generator().manual_seed(0)
    T, hidden, inter, H, HKV, D = 8, 4096, 14336, 32, 8, 128
    dt = torch.bfloat16
    x, res = (torch.randn(T, hidden, generator=gen).to(dt).cuda() for _ in range(2))
    weight = torch.randn(hidden, generator=gen).to(dt).cuda()
    gate_up = torch.randn(T, 2 * inter, generator=gen).to(dt).cuda()
    qkv = torch.randn(T, (H + 2 * HKV) * D, generator=gen).to(dt).cuda()
    cos, sin = (t.cuda() for t in rope_tables(gen, T, D, dt))

    def step():
        q, k = qkv[:, : H * D].view(T, H, D), qkv[:, H * D : (H + HKV) * D].view(T, HKV, D)
        return (
            *fused.rms_norm(x, weight, 1e-5, res),
            fused.silu_and_mul(gate_up, inter),
            *fused.rotary(q, k, cos, sin),
        )

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for t in (x, res, gate_up, qkv, cos, sin):
        t.copy_(torch.randn(t.shape, generator=gen).to(dt))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outs, step()):
        assert torch.equal(got, want)
