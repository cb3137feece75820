"""The LoRA expand fused into RMSNorm and SiLU-and-mul (``loraserve.contract.LoRAEpilogue``): its eager reference
against a plain per-token loop, then the kernels against that reference followed by the op."""

from __future__ import annotations

import pytest
import torch

from loraserve.contract import LoRAEpilogue
from loraserve.models import epilogue, fused

# The interpreter's bfloat16 is wrong (it truncates casts), so bfloat16 runs only on a GPU
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
DTYPE_IDS = ["fp32", "fp16"] + (["bf16"] if torch.cuda.is_available() else [])
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

R = 16
RANKS = (3, 5, 16, 0)  # slot 3 is loaded but empty: its tokens must come out untouched
SCALINGS = (0.5, 1.75, 0.3, 2.0)
# slots of the tokens, cut to T: the first token alone has rank 16; five share slot 0 with a token
# of no adapter (-1) and one of the rank-0 slot; nine add rank 5 and more sharing
SLOTS = (2, 0, -1, 0, 3, 1, 2, 2, 1)


@pytest.fixture(autouse=True)
def fused_on(monkeypatch):
    """The fused path on, on CPU too (under the interpreter), unless a test turns it off."""
    monkeypatch.setenv("LORASERVE_FUSED_OPS", "1")


# -- helpers ------------------------------------------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit patterns, so that comparisons tell -0.0 from 0.0 and NaN equals itself."""
    ints = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    return t.contiguous().view(ints[t.dtype])


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    differ = bits(got) != bits(want)
    assert not differ.any(), f"{differ.sum().item()} of {differ.numel()} elements differ"


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    int_type, nbits = (torch.int32, 32) if a.dtype == torch.float32 else (torch.int16, 16)

    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.contiguous().view(int_type).to(torch.int64)
        return torch.where(i < 0, -(i & ((1 << (nbits - 1)) - 1)), i)

    return (ordered(a) - ordered(b)).abs()


def assert_rarely_off(got: torch.Tensor, want: torch.Tensor, max_ulp: int, max_fraction: float) -> None:
    ulps = ulp_distance(got, want)
    assert ulps.max().item() <= max_ulp, f"{ulps.max().item()} ulp apart"
    assert (ulps > 0).float().mean().item() <= max_fraction, f"{(ulps > 0).sum().item()} of {ulps.numel()} differ"


def same_norm_as(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """The normed output of the LoRA kernel against the plain kernel run on the eagerly updated
    rows: the same arithmetic, bit for bit in the interpreter. Compiled, the row comes out of the
    LoRA loop in another register layout, so the sum of squares may be reduced in another order
    and the float32 rms differ in its last bit: then an ulp or two, on a few elements in 16 bits."""
    if not got.is_cuda:
        assert_same_bits(got, want)
    else:
        assert_rarely_off(got, want, *((4, 1.0) if dtype == torch.float32 else (1, 0.05)))


def values(gen: torch.Generator, shape: tuple[int, ...], eighths: int, exact: bool) -> torch.Tensor:
    """Multiples of ``1 / eighths`` below 1 in magnitude (``exact``), or normal values. With h in
    eighths and B in sixteenths every product is a multiple of 1/128 below 1, so a sum of up to 16 of
    them is exact in float32 and the delta does not depend on the order anyone adds in."""
    if exact:
        return torch.randint(-(eighths - 1), eighths, shape, generator=gen) / eighths
    return 0.5 * torch.randn(shape, generator=gen)


def epilogue_case(
    gen: torch.Generator,
    T: int,
    out_total: int,
    n_slices: int,
    dtype: torch.dtype,
    *,
    h_source: str = "gemm",
    exact: bool = True,
    ranks=RANKS,
    R: int = R,
    slots=SLOTS,
):
    """``(wide, out, lora)``: a projection output ``out`` [T, out_total] and an epilogue for it.

    ``h_source="gemm"``: the base GEMM over [W; A] left ``out`` and h side by side in ``wide``
    [T, out_total + h columns + 3], so both are column views with a row stride past their width;
    ``"fp32"``: h is a float32 view of its own wider tensor. Past each slot's rank h and B hold NaN
    (and the rank-0 slot is NaN throughout), which must not reach any result. Rows of tokens that
    get no delta start with -0.0, which an unselected ``x + 0`` would turn into +0.0.
    """
    num_slots = len(ranks)
    C = num_slots * n_slices * R
    j = torch.arange(R)
    past_rank = j[None, :] >= torch.tensor(ranks)[:, None]  # [num_slots, R]
    h = values(gen, (T, num_slots, n_slices, R), 8, exact)
    h = h.masked_fill(past_rank[None, :, None, :], float("nan")).reshape(T, C)
    B = values(gen, (num_slots, out_total, R), 16, exact)
    B = B.masked_fill(past_rank[:, None, :], float("nan")).to(DEVICE, dtype)
    base = torch.randn(T, out_total, generator=gen)
    slot_list = list(slots[:T])
    quiet = [t for t, k in enumerate(slot_list) if k < 0 or ranks[k] == 0]
    base[quiet, :3] = -0.0
    if h_source == "gemm":
        wide = torch.cat([base, h, torch.full((T, 3), float("nan"))], dim=1).to(DEVICE, dtype)
        h_view = wide[:, out_total : out_total + C]
    else:
        wide = base.to(DEVICE, dtype)
        h_view = torch.cat([torch.full((T, 2), float("nan")), h], dim=1).to(DEVICE, torch.float32)[:, 2:]
    lora = LoRAEpilogue(
        h=h_view,
        B=B,
        token_slot=torch.tensor(slot_list, dtype=torch.int32, device=DEVICE),
        ranks=torch.tensor(ranks, dtype=torch.int32, device=DEVICE),
        scalings=torch.tensor(
            [SCALINGS[k % len(SCALINGS)] for k in range(num_slots)], dtype=torch.float32, device=DEVICE
        ),
        n_slices=n_slices,
        R=R,
    )
    return wide, wide[:, :out_total], lora


def loop_delta(lora: LoRAEpilogue) -> torch.Tensor:
    """The oracle: per token, ``scaling * h[slice][:rank] @ B[slot, slice columns, :rank].T``."""
    num_slots, out_total, R_ = lora.B.shape
    S = lora.n_slices
    width = out_total // S
    delta = torch.zeros(lora.h.shape[0], out_total, dtype=torch.float32)
    for t, k in enumerate(lora.token_slot.tolist()):
        rank = lora.ranks[k].item() if k >= 0 else 0
        for s in range(S):
            if rank:
                h = lora.h[t, (k * S + s) * R_ : (k * S + s) * R_ + rank].float().cpu()
                B = lora.B[k, s * width : (s + 1) * width, :rank].float().cpu()
                delta[t, s * width : (s + 1) * width] = lora.scalings[k].item() * (h @ B.T)
    return delta


def active_rows(lora: LoRAEpilogue) -> list[bool]:
    ranks = lora.ranks.tolist()
    return [k >= 0 and ranks[k] > 0 for k in lora.token_slot.tolist()]


# -- the eager reference ------------------------------------------------------------------------


@pytest.mark.parametrize("n_slices", [1, 2])
@pytest.mark.parametrize("h_source", ["gemm", "fp32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_delta_is_the_per_token_sum(gen, n_slices, h_source, dtype):
    _, out, lora = epilogue_case(gen, 9, 72 if n_slices == 1 else 80, n_slices, dtype, h_source=h_source, exact=False)
    delta = lora.delta()
    assert delta.dtype == torch.float32 and torch.isfinite(delta).all()  # no NaN from past the rank
    torch.testing.assert_close(delta.cpu(), loop_delta(lora), rtol=1e-5, atol=1e-6)
    assert (delta[[not a for a in active_rows(lora)]] == 0).all()
    assert (delta[active_rows(lora)] != 0).any(dim=1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_apply_rounds_once_and_leaves_other_rows_alone(gen, dtype):
    wide, out, lora = epilogue_case(gen, 9, 72, 1, dtype)
    before = out.clone()
    got = epilogue.apply_epilogue(out, lora)
    assert_same_bits(out, before)  # a copy: the GEMM output is not written
    assert got.is_contiguous()
    want = (before.float() + loop_delta(lora).to(DEVICE)).to(dtype)  # exact values: any sum order
    active = active_rows(lora)
    assert_same_bits(got[active], want[active])
    assert_same_bits(got[[not a for a in active]], before[[not a for a in active]])  # -0.0 stays -0.0
    in_place = out.clone()
    lora.apply_(in_place)
    assert_same_bits(in_place, got)


# -- RMSNorm ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", [1, 5, 9])
@pytest.mark.parametrize("with_residual", [False, True], ids=["no_residual", "residual"])
@pytest.mark.parametrize("h_source", ["gemm", "fp32"])
def test_rms_norm_with_lora_is_apply_then_norm(gen, dtype, T, with_residual, h_source):
    N = 72
    wide, x, lora = epilogue_case(gen, T, N, 1, dtype, h_source=h_source)
    weight = (1 + 0.1 * torch.randn(N, generator=gen)).to(DEVICE, dtype)
    residual = (2 * torch.randn(T, N, generator=gen)).to(DEVICE, dtype) if with_residual else None
    wide_before = wide.clone()
    got = fused.rms_norm(x, weight, 1e-5, residual, lora=lora)
    assert_same_bits(wide, wide_before)  # neither x nor h is written
    x_lora = epilogue.apply_epilogue(x, lora)
    # The same kernel without LoRA on the eagerly updated x: the same sum order, so every bit
    want = fused.rms_norm(x_lora, weight, 1e-5, residual)
    plain = fused.rms_norm(x, weight, 1e-5, residual)
    eager = epilogue.rms_norm_eager(x_lora, weight, 1e-5, residual)
    if with_residual:
        (got, got_h), (want, want_h), (plain, plain_h), (eager, eager_h) = got, want, plain, eager
        assert_same_bits(got_h, want_h)
        assert_same_bits(got_h, eager_h)
    assert torch.isfinite(got).all()
    same_norm_as(got, want, dtype)
    quiet = [not a for a in active_rows(lora)]
    assert_same_bits(got[quiet], plain[quiet])
    if with_residual:
        assert_same_bits(got_h[quiet], plain_h[quiet])
    # Against eager PyTorch only the order of the sum of squares differs (see test_fused_ops)
    assert_rarely_off(got, eager, *((4, 1.0) if dtype == torch.float32 else (2, 0.05)))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rms_norm_lora_update_with_random_values_differs_only_by_the_delta_sum_order(gen, dtype):
    """With arbitrary h and B the kernel's float32 sum over the rank (blocks of ranks, each a tree)
    and torch's GEMM may differ in the last bit, which the rounding to a 16-bit dtype now and then
    carries into an ulp of x + delta. A zero residual shows x + delta itself as the residual output."""
    T, N = 9, 72
    _, x, lora = epilogue_case(gen, T, N, 1, dtype, exact=False)
    weight = torch.ones(N, dtype=dtype, device=DEVICE)
    zero = torch.zeros(T, N, dtype=dtype, device=DEVICE)
    _, got = fused.rms_norm(x, weight, 1e-5, zero, lora=lora)
    want = zero + epilogue.apply_epilogue(x, lora)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:
        assert_rarely_off(got, want, 1, 0.05)
    assert (got != zero + x)[active_rows(lora)].float().mean() > 0.9  # the delta did change them


# -- SiLU-and-mul -------------------------------------------------------------------------------


def _silu_case(gen, dtype, T, I, h_source, **kw):
    wide, gate_up, lora = epilogue_case(gen, T, 2 * I, 2, dtype, h_source=h_source, **kw)
    gate_up[:, :I] *= 3  # gate over a wider range, as test_fused_ops does
    return wide, gate_up, lora


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", [1, 5, 9])
@pytest.mark.parametrize("h_source", ["gemm", "fp32"])
def test_silu_and_mul_with_lora_is_apply_then_silu(gen, dtype, T, h_source):
    I = 40
    wide, gate_up, lora = _silu_case(gen, dtype, T, I, h_source)
    wide_before = wide.clone()
    got = fused.silu_and_mul(gate_up, I, lora)
    assert_same_bits(wide, wide_before)
    gu_lora = epilogue.apply_epilogue(gate_up, lora)
    assert torch.isfinite(got).all()
    assert_same_bits(got, fused.silu_and_mul(gu_lora, I))  # the same kernel, so every bit
    quiet = [not a for a in active_rows(lora)]
    assert_same_bits(got[quiet], fused.silu_and_mul(gate_up, I)[quiet])
    # Against F.silu only the exp differs (the interpreter's is numpy's; see test_fused_ops)
    eager = epilogue.silu_and_mul_eager(gu_lora, I)
    if got.is_cuda:
        assert_same_bits(got, eager)
    else:
        assert_rarely_off(got, eager, *((4, 1.0) if dtype == torch.float32 else (2, 0.05)))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_silu_and_mul_with_random_lora_values_is_close(gen, dtype):
    """Arbitrary h and B: the delta's sum order may flip a rounding to the dtype now and then."""
    I = 40
    _, gate_up, lora = _silu_case(gen, dtype, 9, I, "gemm", exact=False)
    got = fused.silu_and_mul(gate_up, I, lora)
    want = fused.silu_and_mul(epilogue.apply_epilogue(gate_up, lora), I)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:
        assert_rarely_off(got, want, 2, 0.05)


# -- the rank loop's blocks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "R_,ranks,block_r",
    [
        (16, (3, 5, 16, 0), 4),  # several steps, R a multiple of the block: loads masked by the row only
        (12, (3, 12, 9, 0), 8),  # R not a multiple: the last block is masked at R
        (16, (3, 5, 16, 0), 32),  # one step, wider than R
    ],
)
def test_block_r_choices_give_the_same_bits(gen, R_, ranks, block_r):
    dtype, T = torch.float16, 9
    _, x, lora = epilogue_case(gen, T, 72, 1, dtype, ranks=ranks, R=R_)
    weight = (1 + 0.1 * torch.randn(72, generator=gen)).to(DEVICE, dtype)
    got = fused.rms_norm(x, weight, 1e-5, lora=lora, block_r=block_r)
    assert_same_bits(got, fused.rms_norm(epilogue.apply_epilogue(x, lora), weight, 1e-5))
    _, gate_up, lora = _silu_case(gen, dtype, T, 40, "fp32", ranks=ranks, R=R_)
    got = fused.silu_and_mul(gate_up, 40, lora, block_r=block_r, block_n=16)  # 3 column blocks, a tail
    assert_same_bits(got, fused.silu_and_mul(epilogue.apply_epilogue(gate_up, lora), 40))


def test_a_batch_without_adapters_is_the_plain_op(gen):
    dtype = torch.float16
    _, x, lora = epilogue_case(gen, 5, 72, 1, dtype, slots=(-1, 3, -1, 3, 3))
    weight = torch.randn(72, generator=gen).to(DEVICE, dtype)
    assert_same_bits(fused.rms_norm(x, weight, 1e-5, lora=lora), fused.rms_norm(x, weight, 1e-5))
    _, gate_up, lora = _silu_case(gen, dtype, 5, 40, "gemm", slots=(3, -1, -1, 3, -1))
    assert_same_bits(fused.silu_and_mul(gate_up, 40, lora), fused.silu_and_mul(gate_up, 40))


# -- the eager path -----------------------------------------------------------------------------


def test_without_the_kernels_lora_runs_eagerly(gen, monkeypatch):
    monkeypatch.setenv("LORASERVE_FUSED_OPS", "0")
    dtype = torch.float32
    wide, x, lora = epilogue_case(gen, 9, 72, 1, dtype)
    assert not fused.use_fused(x)
    weight = torch.randn(72, generator=gen).to(DEVICE, dtype)
    residual = torch.randn(9, 72, generator=gen).to(DEVICE, dtype)
    before = wide.clone()
    out, h = fused.rms_norm(x, weight, 1e-5, residual, lora=lora)
    assert_same_bits(wide, before)
    x_lora = epilogue.apply_epilogue(x, lora)
    assert_same_bits(h, residual + x_lora)
    assert_same_bits(out, epilogue.rms_norm_eager(residual + x_lora, weight, 1e-5))
    _, gate_up, lora = _silu_case(gen, dtype, 9, 40, "gemm")
    gu_lora = epilogue.apply_epilogue(gate_up, lora)
    gate, up = gu_lora.split(40, dim=-1)
    assert_same_bits(fused.silu_and_mul(gate_up, 40, lora), torch.nn.functional.silu(gate) * up)


# -- validation ---------------------------------------------------------------------------------


def test_bad_epilogues_are_refused_naming_the_value(gen):
    _, x, lora = epilogue_case(gen, 5, 72, 1, torch.float32)
    fields = dict(
        h=lora.h, B=lora.B, token_slot=lora.token_slot, ranks=lora.ranks, scalings=lora.scalings, n_slices=1, R=R
    )

    def refused(match: str, **changes):
        with pytest.raises(ValueError, match=match):
            LoRAEpilogue(**{**fields, **changes})

    refused("n_slices is 3", n_slices=3)
    refused(r"R is 0", R=0, B=lora.B[:, :, :0])
    refused(r"B must be a contiguous \[num_slots, out_total, 16\]", B=lora.B[:, :, :8].contiguous())
    refused(r"B must be a contiguous", B=lora.B.transpose(0, 1).contiguous().transpose(0, 1))
    refused(r"B must be a contiguous", B=lora.B.to(torch.int32))
    refused(
        r"out_total 71 does not split into 2",
        n_slices=2,
        B=lora.B[:, :71].contiguous(),
        h=torch.zeros(5, 4 * 2 * R, device=DEVICE),
    )
    refused(r"h has 60 columns; 4 slots of 1 slices of rank 16 need 64", h=lora.h[:, :60])
    refused("h must be a 2-d tensor with a contiguous last dim", h=torch.zeros(64, 5, device=DEVICE).t())
    refused(r"token_slot must be a contiguous 1-d torch.int32 tensor of 5 entries", token_slot=lora.token_slot.long())
    refused(r"token_slot must be a contiguous 1-d torch.int32 tensor of 5 entries", token_slot=lora.token_slot[:4])
    refused(r"ranks must be a contiguous 1-d torch.int32 tensor of at least 4 entries", ranks=lora.ranks[:3])
    refused(r"scalings must be .* torch.float32 tensor of at least 4", scalings=lora.scalings.double())
    # a captured decode step's null slot past B's: longer ranks and scalings are accepted
    null = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    longer = LoRAEpilogue(
        **{**fields, "ranks": torch.cat([lora.ranks, null]), "scalings": torch.cat([lora.scalings, null.float()])}
    )
    assert torch.equal(longer.delta(), lora.delta())

    weight = torch.ones(72, device=DEVICE)
    with pytest.raises(ValueError, match=r"the LoRA epilogue has n_slices=1; gate_up needs 2"):
        fused.silu_and_mul(torch.zeros(5, 72, device=DEVICE), 36, lora)
    with pytest.raises(ValueError, match=r"x is \(5, 72\) torch.float16 .*needs \[5, 72\] torch.float32"):
        fused.rms_norm(x.half(), weight.half(), 1e-5, lora=lora)
    with pytest.raises(ValueError, match=r"x is \(4, 72\) .*needs \[5, 72\]"):
        fused.rms_norm(x[:4], weight, 1e-5, lora=lora)
    with pytest.raises(ValueError, match=r"x is \(5, 64\) .*needs \[5, 72\]"):
        fused.rms_norm(x[:, :64], weight[:64], 1e-5, lora=lora)
    with pytest.raises(ValueError, match=r"out is \(5, 71\)"):
        lora.apply_(torch.zeros(5, 71, device=DEVICE))
    with pytest.raises(ValueError, match="block_r is 3; it must be a power of two"):
        fused.rms_norm(x, weight, 1e-5, lora=lora, block_r=3)
    _, gate_up, lora2 = _silu_case(gen, torch.float32, 5, 40, "gemm")
    with pytest.raises(ValueError, match=r"the LoRA epilogue has n_slices=2; x needs 1"):
        fused.rms_norm(gate_up, torch.ones(80, device=DEVICE), 1e-5, lora=lora2)
    with pytest.raises(ValueError, match="block_n is 24; it must be a power of two"):
        fused.silu_and_mul(gate_up, 40, lora2, block_n=24)


# -- on a GPU, at Llama-3.1-8B sizes ------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("T", [1, 64, 256])
def test_gpu_epilogues_at_llama_8b_sizes(T):
    gen = torch.Generator().manual_seed(T)
    dt, hidden, inter, R_ = torch.bfloat16, 4096, 14336, 64
    ranks = (8, 16, 64, 0, 32, 64, 8, 16)
    slots = tuple(torch.randint(-1, len(ranks), (T,), generator=gen).tolist())
    _, x, lora = epilogue_case(gen, T, hidden, 1, dt, ranks=ranks, R=R_, slots=slots)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(DEVICE, dt)
    residual = (4 * torch.randn(T, hidden, generator=gen)).to(DEVICE, dt)
    got, got_h = fused.rms_norm(x, weight, 1e-5, residual, lora=lora)
    want, want_h = fused.rms_norm(epilogue.apply_epilogue(x, lora), weight, 1e-5, residual)
    same_norm_as(got, want, dt)
    assert_same_bits(got_h, want_h)
    _, gate_up, lora = _silu_case(gen, dt, T, inter, "gemm", ranks=ranks, R=R_, slots=slots)
    assert_same_bits(
        fused.silu_and_mul(gate_up, inter, lora), fused.silu_and_mul(epilogue.apply_epilogue(gate_up, lora), inter)
    )


@pytest.mark.gpu
@needs_cuda
def test_gpu_epilogues_replay_in_a_cuda_graph():
    gen = torch.Generator().manual_seed(0)
    dt, T, hidden, inter, R_ = torch.bfloat16, 8, 4096, 14336, 32
    ranks = (8, 32, 0, 16)
    _, x, lora = epilogue_case(gen, T, hidden, 1, dt, ranks=ranks, R=R_, slots=(0, 1, -1, 2, 3, 1, 0, 3))
    _, gate_up, lora2 = _silu_case(gen, dt, T, inter, "gemm", ranks=ranks, R=R_, slots=(3, 1, 0, 2, -1, 1, 1, 0))
    weight = torch.randn(hidden, generator=gen).to(DEVICE, dt)

    def step():
        return fused.rms_norm(x, weight, 1e-5, lora=lora), fused.silu_and_mul(gate_up, inter, lora2)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    # new slots (data, not shapes) take effect on replay
    lora.token_slot.copy_(torch.tensor([1, 0, 3, -1, 2, 2, 1, 0], dtype=torch.int32))
    lora2.token_slot.copy_(torch.tensor([0, 0, 1, 3, 2, -1, 1, 1], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outs, step()):
        assert_same_bits(got, want)
