"""The Triton paged attention (PagedTritonAttention) against PagedSDPAAttention, the oracle.

Without a GPU the kernels run in Triton's CPU interpreter (float32 and float16 only: the
interpreter's bfloat16 products are wrong) on small odd shapes: mixed decode / prefill / extend
steps with GQA, block sizes that do not divide the contexts, a sliding window, several decode
splits, the cache contents the step writes, and the static-buffer (CUDA graph) path refilled with
new sequences. The float16 oracle runs in float32 on the same float16 values, so the tolerance
measures the kernels' error alone. The ``gpu`` tests add realistic bfloat16 shapes and a real CUDA
graph capture and replay.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when a kernel is decorated, so it must be set before the kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from loraserve.plugins.attention_triton.attention import PagedTritonAttention  # noqa: E402
from loraserve.runner.attention import PagedSDPAAttention  # noqa: E402
from loraserve.sched.kv_cache import KVCache  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}
LAYERS, LAYER = 2, 1  # attend in the second layer, so a kernel that ignores layer_idx fails


def make_caches(gen, num_blocks, block_size, hkv, d, dtype, oracle_dtype=None):
    """Two caches with the same random contents (the oracle's in ``oracle_dtype``): cached
    prefixes then hold the same keys and values for both, and untouched slots compare equal."""
    tri = KVCache(LAYERS, hkv, d, num_blocks, block_size, dtype, DEVICE)
    ora = KVCache(LAYERS, hkv, d, num_blocks, block_size, oracle_dtype or dtype, DEVICE)
    for i in range(LAYERS):
        for t, o in ((tri.k[i], ora.k[i]), (tri.v[i], ora.v[i])):
            t.copy_(torch.randn(t.shape, generator=gen).to(dtype))
            o.copy_(t)
    return tri, ora


def make_seqs(gen, num_blocks, block_size, shapes):
    """``(blocks, start, n)`` per ``(start, n)`` in ``shapes``, on disjoint shuffled blocks, each
    table one block longer than it needs (the kernels must stop at the context)."""
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    seqs = []
    for start, n in shapes:
        need = -(-(start + n) // block_size) + 1
        seqs.append((perm[:need], start, n))
        perm = perm[need:]
    return seqs


def qkv(gen, T, h, hkv, d, dtype):
    return [torch.randn(T, heads, d, generator=gen).to(dtype).to(DEVICE) for heads in (h, hkv, hkv)]


def run_both(
    gen, shapes, *, block_size=16, h=4, hkv=2, d=16, dtype=torch.float32, window=None, num_blocks=None, **kwargs
):
    """One step of ``shapes`` through both implementations; returns (out, oracle out, caches)."""
    num_blocks = num_blocks or sum(-(-(s + n) // block_size) + 1 for s, n in shapes) + 3
    tri_kv, ora_kv = make_caches(gen, num_blocks, block_size, hkv, d, dtype, torch.float32)
    seqs = make_seqs(gen, num_blocks, block_size, shapes)
    q, k, v = qkv(gen, sum(n for _, n in shapes), h, hkv, d, dtype)
    tri = PagedTritonAttention(tri_kv, sliding_window=window, **kwargs)
    ora = PagedSDPAAttention(ora_kv, sliding_window=window)
    tri.begin_step(seqs)
    ora.begin_step(seqs)
    out = tri.attention(LAYER, q, k, v)
    ref = ora.attention(LAYER, q.float(), k.float(), v.float())
    return out, ref, tri_kv, ora_kv


def check(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


# -- mixed steps ----------------------------------------------------------------------------------

MIXED = [(7, 1), (0, 1), (40, 1), (0, 23), (19, 1), (37, 29)]  # decodes, a prefill, an extend over 37 cached


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size,d", [(16, 32), (8, 16), (4, 16)])
def test_mixed_step_matches_sdpa(gen, dtype, block_size, d):
    out, ref, tri_kv, ora_kv = run_both(gen, MIXED, block_size=block_size, d=d, dtype=dtype)
    check(out, ref, dtype)
    for name in ("k", "v"):  # the oracle's float32 copy holds exactly the 16-bit values written
        assert torch.equal(getattr(tri_kv, name)[LAYER].float(), getattr(ora_kv, name)[LAYER])
        assert torch.equal(getattr(tri_kv, name)[0].float(), getattr(ora_kv, name)[0])


def test_one_token_one_sequence(gen):
    out, ref, _, _ = run_both(gen, [(0, 1)], h=3, hkv=1, d=16)
    check(out, ref, torch.float32)


def test_long_extend_several_query_and_key_blocks(gen):
    # 70 new tokens: two query blocks; 130 keys: three key tiles; MHA (one query head per kv head)
    out, ref, _, _ = run_both(gen, [(60, 70), (3, 1)], h=2, hkv=2, d=16, block_size=16)
    check(out, ref, torch.float32)


def test_strided_views_of_a_fused_projection(gen):
    # q, k, v as LlamaAttention hands them over: views of one [T, (H + 2 Hkv) * D] projection
    T, h, hkv, d, bs = 6, 4, 2, 16, 8
    tri_kv, ora_kv = make_caches(gen, 10, bs, hkv, d, torch.float32)
    seqs = make_seqs(gen, 10, bs, [(12, 1), (3, 5)])
    fused = torch.randn(T, (h + 2 * hkv) * d, generator=gen).to(DEVICE)
    q, k, v = (x.reshape(T, -1, d) for x in fused.split([h * d, hkv * d, hkv * d], dim=-1))
    assert not q.is_contiguous()
    tri, ora = PagedTritonAttention(tri_kv, num_splits=2), PagedSDPAAttention(ora_kv)
    tri.begin_step(seqs)
    ora.begin_step(seqs)
    check(
        tri.attention(LAYER, q, k, v),
        ora.attention(LAYER, q.contiguous(), k.contiguous(), v.contiguous()),
        torch.float32,
    )
    assert torch.equal(tri_kv.k[LAYER], ora_kv.k[LAYER]) and torch.equal(tri_kv.v[LAYER], ora_kv.v[LAYER])


@pytest.mark.parametrize("num_splits", [2, 8])
def test_decode_splits_match_sdpa(gen, num_splits):
    # contexts from 1 to 150 tokens: some splits hold several tiles, some none at all
    shapes = [(0, 1), (9, 1), (149, 1), (63, 1), (64, 1)]
    out, ref, _, _ = run_both(gen, shapes, h=8, hkv=2, d=16, num_splits=num_splits, block_size=8)
    check(out, ref, torch.float32)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_sliding_window_shorter_than_context(gen, num_splits):
    shapes = [(50, 1), (5, 1), (30, 40), (0, 20)]
    out, ref, _, _ = run_both(gen, shapes, window=13, block_size=8, num_splits=num_splits)
    check(out, ref, torch.float32)


@pytest.mark.parametrize("d", [24, 80])
def test_head_dim_not_a_power_of_two(gen, d):
    out, ref, _, _ = run_both(gen, [(21, 1), (11, 9)], h=2, hkv=1, d=d, dtype=torch.float16, num_splits=2)
    check(out, ref, torch.float16)


def test_cache_writes_equal_sdpa_writes(gen):
    # float32 keys and values into a float16 cache: both implementations cast on the write
    num_blocks, bs, hkv, d = 12, 4, 2, 16
    tri_kv, ora_kv = make_caches(gen, num_blocks, bs, hkv, d, torch.float16)
    seqs = make_seqs(gen, num_blocks, bs, [(5, 1), (2, 7), (0, 3)])
    q, k, v = qkv(gen, 11, 4, hkv, d, torch.float32)
    tri, ora = PagedTritonAttention(tri_kv), PagedSDPAAttention(ora_kv)
    tri.begin_step(seqs)
    ora.begin_step(seqs)
    tri.attention(LAYER, q.half(), k, v)
    ora.attention(LAYER, q.half(), k, v)
    for i in range(LAYERS):
        assert torch.equal(tri_kv.k[i], ora_kv.k[i]) and torch.equal(tri_kv.v[i], ora_kv.v[i])


def test_rejects_bad_configuration(gen):
    kv = KVCache(1, 2, 512, 4, 4, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="head_dim 512"):
        PagedTritonAttention(kv)
    kv = KVCache(1, 2, 16, 4, 4, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="max_blocks_per_seq"):
        PagedTritonAttention(kv, max_seqs=4)
    with pytest.raises(ValueError, match="num_splits"):
        PagedTritonAttention(kv, num_splits=3)
    attn = PagedTritonAttention(kv, max_seqs=2, max_blocks_per_seq=2)
    with pytest.raises(ValueError, match="sequence 0 feeds 2 tokens"):
        attn.begin_graph_step([([0, 1], 3, 2)], 2)
    with pytest.raises(ValueError, match="needs 3 blocks"):
        attn.begin_graph_step([([0, 1, 2], 8, 1)], 1)
    with pytest.raises(ValueError, match="batch_size 3"):
        attn.begin_graph_step([], 3)


# -- the static-buffer (CUDA graph) path ----------------------------------------------------------


def graph_steps(gen, steps, b, *, h=4, hkv=2, d=16, block_size=4, dtype=torch.float32, window=None, num_splits=None):
    """Run decode steps (lists of start positions) through one set of static buffers, padded to ``b``
    rows, checking each against the oracle; returns the buffer addresses seen at each step."""
    num_blocks = 40
    tri_kv, ora_kv = make_caches(gen, num_blocks, block_size, hkv, d, dtype, torch.float32)
    tri = PagedTritonAttention(
        tri_kv, sliding_window=window, max_seqs=b + 2, max_blocks_per_seq=8, num_splits=num_splits
    )
    ora = PagedSDPAAttention(ora_kv, sliding_window=window)
    addresses = []
    for starts in steps:
        seqs = make_seqs(gen, num_blocks, block_size, [(s, 1) for s in starts])
        q, k, v = qkv(gen, b, h, hkv, d, dtype)  # the padding rows get random values too
        tri.begin_graph_step(seqs, b)
        addresses.append((tri._step.dec_meta.data_ptr(), tri._step.slots.data_ptr()))
        out = tri.attention(LAYER, q, k, v)
        n = len(seqs)
        if n:  # the oracle cannot run an empty step; an all-padding one must still write nothing
            ora.begin_step(seqs)
            ref = ora.attention(LAYER, q[:n].float(), k[:n].float(), v[:n].float())
            check(out[:n], ref, dtype)
        assert torch.equal(out[n:], torch.zeros_like(out[n:]))  # padding rows: no context, zeros
        for name in ("k", "v"):  # padding rows wrote nothing
            assert torch.equal(getattr(tri_kv, name)[LAYER].float(), getattr(ora_kv, name)[LAYER])
    return addresses


@pytest.mark.parametrize("num_splits", [1, 4])
def test_static_buffers_refilled_with_new_sequences(gen, num_splits):
    addresses = graph_steps(gen, [[3, 17, 0], [25, 6, 11, 1], []], b=4, num_splits=num_splits)
    assert len(set(addresses)) == 1  # every step read the same buffers: what a graph replay needs


def test_static_buffers_with_sliding_window_float16(gen):
    graph_steps(gen, [[20, 2], [9, 30]], b=3, window=7, dtype=torch.float16, num_splits=2)


def test_eager_step_between_graph_steps_leaves_buffers(gen):
    kv = KVCache(1, 1, 16, 8, 4, torch.float32, DEVICE)
    with torch.inference_mode():  # built where the engine runs, refilled anywhere
        attn = PagedTritonAttention(kv, max_seqs=2, max_blocks_per_seq=3)
    attn.begin_graph_step([([5, 2], 6, 1)], 2)
    before = attn._graph_meta.clone()
    attn.begin_step([([1, 3, 4], 2, 7)])
    assert torch.equal(attn._graph_meta, before)
    assert before[0, :5].tolist() == [7, 0, 2 * 4 + 2, 5, 2] and before[1, :3].tolist() == [0, 1, -1]


# -- GPU: realistic sizes and a real CUDA graph ---------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_realistic_bf16_mixed_step():
    gen = torch.Generator().manual_seed(7)
    ctx = torch.randint(1, 4001, (64,), generator=gen).tolist()
    ctx[0], ctx[1] = 1, 4000
    shapes = [(c - 1, 1) for c in ctx] + [(1500, 1000), (37, 1000)]
    out, ref, tri_kv, ora_kv = run_both(gen, shapes, h=32, hkv=8, d=128, dtype=torch.bfloat16, block_size=16)
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 1e-2, f"relative error {err:.2e}"
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    assert torch.equal(tri_kv.k[LAYER].float(), ora_kv.k[LAYER])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_cuda_graph_replays_with_new_metadata():
    gen = torch.Generator().manual_seed(8)
    b, h, hkv, d, bs, num_blocks = 16, 32, 8, 128, 16, 2048
    tri_kv, ora_kv = make_caches(gen, num_blocks, bs, hkv, d, torch.bfloat16, torch.float32)
    tri = PagedTritonAttention(tri_kv, max_seqs=b, max_blocks_per_seq=128)
    ora = PagedSDPAAttention(ora_kv)
    q, k, v = qkv(gen, b, h, hkv, d, torch.bfloat16)
    tri.begin_graph_step([], b)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        tri.attention(LAYER, q, k, v)  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tri.attention(LAYER, q, k, v)
    for n, top in ((b - 3, 2000), (b, 300)):
        starts = torch.randint(0, top, (n,), generator=gen).tolist()
        seqs = make_seqs(gen, num_blocks, bs, [(s, 1) for s in starts])
        for t, new in zip((q, k, v), qkv(gen, b, h, hkv, d, torch.bfloat16)):
            t.copy_(new)
        tri.begin_graph_step(seqs, b)
        graph.replay()
        ora.begin_step(seqs)
        ref = ora.attention(LAYER, q[:n].float(), k[:n].float(), v[:n].float())
        torch.testing.assert_close(out[:n].float(), ref, rtol=2e-2, atol=2e-2)
        assert torch.equal(tri_kv.k[LAYER].float(), ora_kv.k[LAYER])


def test_engine_with_triton_attention_matches_torch_native(tiny_model_dir):
    """The whole engine on the Triton attention (interpreter on CPU) gives the SDPA path's greedy
    tokens and log-probabilities, over prefill chunks, a cached prefix and decode steps."""
    from loraserve.engine.engine import Engine
    from loraserve.settings import make_settings

    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (1, 9, 23)]
    params = {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True, "return_logprob": True}
    results = {}
    for backend in ("torch_native", "triton"):
        engine = Engine(
            make_settings(
                model_path=tiny_model_dir,
                device="cpu",
                dtype="float32",
                max_total_tokens=256,
                attention_backend=backend,
                chunked_prefill_size=8,
            )
        )
        try:
            assert (
                type(engine.runner.attention).__name__
                == {"triton": "PagedTritonAttention", "torch_native": "PagedSDPAAttention"}[backend]
            )
            results[backend] = engine.generate(input_ids=prompts, sampling_params=params)
        finally:
            engine.shutdown()
    for a, b in zip(results["triton"], results["torch_native"]):
        assert a["output_ids"] == b["output_ids"]
        la = [lp for lp, _ in a["meta_info"]["output_token_logprobs"]]
        lb = [lp for lp, _ in b["meta_info"]["output_token_logprobs"]]
        assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-4
