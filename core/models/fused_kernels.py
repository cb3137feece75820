"""The Triton kernels behind :mod:`loraserve.models.fused`: RMSNorm (optionally after the residual
add and a LoRA expand), SiLU-and-mul (optionally after gate's and up's LoRA expand) and rotary
embedding of q and k, with the device helpers they share (rounding to the model dtype as eager
PyTorch stores it, and the LoRA expand epilogue).

This module owns how the kernels are made: compiled with ``triton.jit``, or, under Triton's
interpreter, as the interpreter runs them (:data:`INTERPRETED`, decided once at import as
``triton.jit`` decides it). It imports without Triton too (``triton`` is then ``None`` and the
kernels are plain functions nobody launches): the Python wrappers, their checks and the rounding
notes live in :mod:`loraserve.models.fused`, which launches these only where
:func:`~loraserve.models.fused.use_fused` says so.
"""

from __future__ import annotations

from loraserve.models.dtypes import triton_interpreter_on

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # a platform without Triton wheels still imports the model and runs it eagerly
    triton = None


def _interpreting() -> bool:
    """Whether ``triton.jit`` hands out interpreted kernels, as it decides when a kernel is decorated."""
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; older releases read the variable directly
    return knobs.runtime.interpret if knobs is not None else triton_interpreter_on()


# Decided once, at import, as triton.jit decides it for the kernels below
INTERPRETED = triton is not None and _interpreting()


def _jit(**options):
    """``triton.jit(**options)``, or the plain function without Triton."""

    def decorate(fn):
        return triton.jit(fn, **options) if triton is not None else fn

    return decorate


# The row count varies with every step: it only bounds the row masks, so it is not specialised on
# (Triton would compile new variants for 1 row and for multiples of 16). Strides and sizes of the
# hidden dimension stay specialised.
_ROWS_VARY = ["T"]


def _device_fn(fn):
    """A helper the kernels call: a jit function when compiled, a plain one under the interpreter,
    which runs kernels as Python and would re-patch ``triton.language`` (~3 ms) on every call of a
    jit function."""
    return fn if triton is None or INTERPRETED else triton.jit(fn)


@_device_fn
def _round(x, DT: tl.constexpr):
    """``x`` (float32) rounded to ``DT`` and widened back, as eager PyTorch stores every result."""
    if DT == tl.bfloat16:
        # Round to nearest even by hand, as c10's float -> bfloat16 conversion does: Triton's
        # interpreter truncates on this cast. The result is exact in bfloat16, so the final store's
        # cast is exact on any backend.
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    elif DT == tl.float16:
        y = x.to(tl.float16).to(tl.float32)
    else:
        y = x
    return y


@_device_fn
def _lora_expand(
    v,
    rows,
    cols,
    col_ok,
    T,
    h_ptr,
    stride_h,
    b_ptr,
    slot_ptr,
    ranks_ptr,
    scal_ptr,
    s: tl.constexpr,
    S: tl.constexpr,
    N_OUT: tl.constexpr,
    R: tl.constexpr,
    BLOCK_R: tl.constexpr,
    EVEN_R: tl.constexpr,
    DT: tl.constexpr,
):
    """``v`` (float32 ``[ROWS, BLOCK_N]``: columns ``cols`` of slice ``s`` of a projection's output,
    rows ``rows`` ``[ROWS, 1]``) with each row's LoRA expand added and rounded to ``DT`` as the
    in-place expand kernel rounds it; rows of no adapter or rank 0 come back as they were."""
    slot = tl.load(slot_ptr + rows, mask=rows < T, other=-1)
    rank = tl.load(ranks_ptr + slot, mask=slot >= 0, other=0)
    active = rank > 0
    scaling = tl.load(scal_ptr + slot, mask=active, other=0.0)
    slot3 = slot.to(tl.int64)[:, :, None]
    h_row = h_ptr + rows.to(tl.int64)[:, :, None] * stride_h + slot3 * (S * R) + s * R
    b_rows = b_ptr + slot3 * (N_OUT * R) + (s * (N_OUT // S) + cols).to(tl.int64)[:, :, None] * R
    h_ok = active[:, :, None]
    b_ok = h_ok & col_ok[:, :, None]
    rank3 = rank[:, :, None]
    acc = tl.zeros_like(v)
    # Inactive rows load nothing; when no row is active the loop runs no iteration at all
    for r0 in range(0, tl.max(rank), BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)[None, None, :]
        if EVEN_R:  # every block that starts below the rank lies inside B's rows: no data-dependent mask
            hv = tl.load(h_row + r, mask=h_ok, other=0.0)
            b = tl.load(b_rows + r, mask=b_ok, other=0.0)
        else:
            hv = tl.load(h_row + r, mask=h_ok & (r < R), other=0.0)
            b = tl.load(b_rows + r, mask=b_ok & (r < R), other=0.0)
        # Past the rank h and B may hold anything, NaN included: select, never multiply by a mask
        keep = r < rank3
        hv = tl.where(keep, hv.to(tl.float32), 0.0)
        b = tl.where(keep, b.to(tl.float32), 0.0)
        acc += tl.sum(hv * b, axis=2)
    # A select, not ``v + 0``: that would turn a -0.0 of a row without an adapter into +0.0
    return tl.where(active, _round(v + acc * scaling, DT), v)


@_jit(do_not_specialize=_ROWS_VARY)
def rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    T,
    stride_x,
    stride_r,
    eps,
    h_ptr,
    b_ptr,
    slot_ptr,
    ranks_ptr,
    scal_ptr,
    stride_h,
    N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    CUDA_MATH: tl.constexpr,
    HAS_LORA: tl.constexpr,
    R: tl.constexpr,
    BLOCK_R: tl.constexpr,
    EVEN_R: tl.constexpr,
):
    DT: tl.constexpr = out_ptr.dtype.element_ty
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    mask = (rows < T) & (cols < N)
    rows = rows.to(tl.int64)
    h = tl.load(x_ptr + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_LORA:
        h = _lora_expand(
            h,
            rows,
            cols,
            cols < N,
            T,
            h_ptr,
            stride_h,
            b_ptr,
            slot_ptr,
            ranks_ptr,
            scal_ptr,
            0,
            1,
            N,
            R,
            BLOCK_R,
            EVEN_R,
            DT,
        )
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        h = _round(r + h, DT)
        tl.store(res_out_ptr + rows * N + cols, h.to(DT), mask=mask)
    ss = tl.sum(h * h, axis=1)
    if CUDA_MATH:
        # torch's CUDA mean multiplies the sum by float32(1/N) and its rsqrt is CUDA's rsqrtf
        mean = ss * tl.math.div_rn(tl.full((), 1.0, tl.float32), N * 1.0)
        scale = libdevice.rsqrt(mean + eps)
    else:
        # torch's CPU mean divides the sum by N; its rsqrt is 1 / sqrt, as the interpreter's is
        mean = tl.math.div_rn(ss, N * 1.0)
        scale = tl.rsqrt(mean + eps)
    y = _round(h * scale[:, None], DT)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = _round(w * y, DT)
    tl.store(out_ptr + rows * N + cols, y.to(DT), mask=mask)


@_jit(do_not_specialize=_ROWS_VARY)
def silu_and_mul_kernel(
    gu_ptr,
    out_ptr,
    T,
    stride_gu,
    h_ptr,
    b_ptr,
    slot_ptr,
    ranks_ptr,
    scal_ptr,
    stride_h,
    I: tl.constexpr,  # the intermediate size, named as the maths names it
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    CUDA_MATH: tl.constexpr,
    HAS_LORA: tl.constexpr,
    R: tl.constexpr,
    BLOCK_R: tl.constexpr,
    EVEN_R: tl.constexpr,
):
    DT: tl.constexpr = out_ptr.dtype.element_ty
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = (rows < T) & (cols < I)
    rows = rows.to(tl.int64)
    gate = tl.load(gu_ptr + rows * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + rows * stride_gu + I + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_LORA:  # slice 0 of h and B is gate's, slice 1 up's
        gate = _lora_expand(
            gate,
            rows,
            cols,
            cols < I,
            T,
            h_ptr,
            stride_h,
            b_ptr,
            slot_ptr,
            ranks_ptr,
            scal_ptr,
            0,
            2,
            2 * I,
            R,
            BLOCK_R,
            EVEN_R,
            DT,
        )
        up = _lora_expand(
            up,
            rows,
            cols,
            cols < I,
            T,
            h_ptr,
            stride_h,
            b_ptr,
            slot_ptr,
            ranks_ptr,
            scal_ptr,
            1,
            2,
            2 * I,
            R,
            BLOCK_R,
            EVEN_R,
            DT,
        )
    # torch's SiLU is x / (1 + exp(-x)) in float32 with an IEEE division; on CUDA its exp is
    # expf, which libdevice's exp is (tl.exp would be the faster, less accurate ex2.approx)
    if CUDA_MATH:
        e = libdevice.exp(-gate)
    else:
        e = tl.exp(-gate)
    act = _round(tl.math.div_rn(gate, 1.0 + e), DT)
    tl.store(out_ptr + rows * I + cols, _round(act * up, DT).to(DT), mask=mask)


@_jit(do_not_specialize=["n_rows"])
def rotary_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    cos_ptr,
    sin_ptr,
    n_rows,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_c,
    HQ: tl.constexpr,
    HK: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    ROWS: tl.constexpr,
):
    DT: tl.constexpr = q_out_ptr.dtype.element_ty
    # A row is one head of one token, q's heads then k's, so one launch (under the interpreter one
    # program) serves both.
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    d = tl.arange(0, HALF_PAD)[None, :]
    mask = (r < n_rows) & (d < HALF)
    t = (r // (HQ + HK)).to(tl.int64)
    h = r % (HQ + HK)
    is_q = h < HQ
    src = tl.where(is_q, q_ptr + t * stride_qt + h * stride_qh, k_ptr + t * stride_kt + (h - HQ) * stride_kh) + d
    dst = tl.where(is_q, q_out_ptr + (t * HQ + h) * (2 * HALF), k_out_ptr + (t * HK + h - HQ) * (2 * HALF)) + d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    c = cos_ptr + t * stride_c + d
    s = sin_ptr + t * stride_c + d
    c1 = tl.load(c, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(c + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(s, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s + HALF, mask=mask, other=0.0).to(tl.float32)
    # eager: x * cos + cat(-x2, x1) * sin, each product and the sum stored in the model dtype
    o1 = _round(_round(x1 * c1, DT) + _round(-x2 * s1, DT), DT)
    o2 = _round(_round(x2 * c2, DT) + _round(x1 * s2, DT), DT)
    tl.store(dst, o1.to(DT), mask=mask)
    tl.store(dst + HALF, o2.to(DT), mask=mask)
