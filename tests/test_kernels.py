"""The Triton LoRA backends (triton = SGMV, csgmv = chunked SGMV) against backend_torch, the oracle.

Without a GPU the kernels run in Triton's CPU interpreter (float32 and float16 only: the
interpreter's bfloat16 products are wrong), on small odd shapes; with a GPU the same tests run
compiled, and the ``gpu`` tests add Llama-3-8B shapes in bfloat16, float16 and float32, and a CUDA
graph capture of ``prepare`` + ``run_lora`` (which fails if either reads data back to the host).
The engine test checks that whole generations with ``--lora-backend triton`` / ``csgmv`` give the
same greedy tokens as ``--lora-backend torch``.
"""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # Triton reads this when a kernel is decorated, so it must be set before the kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from loraserve.contract import LoRABatchInfo  # noqa: E402
from loraserve.errors import ConfigError  # noqa: E402
from loraserve.plugins.backend_csgmv.backend import ChunkedSgmvLoRABackend, group_by_slot  # noqa: E402
from loraserve.plugins.backend_torch.backend import TorchLoRABackend  # noqa: E402
from loraserve.plugins.backend_triton.backend import SgmvLoRABackend  # noqa: E402
from loraserve.plugins.backend_triton.launch import tile_count  # noqa: E402
from loraserve.plugins.backend_triton.tiles import build_tiles  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-4),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def make_backend(name: str, **kwargs):
    if name == "triton":
        return SgmvLoRABackend(DEVICE, **kwargs)
    return ChunkedSgmvLoRABackend(DEVICE, **kwargs)


def random_case(gen, seg_lens, seg_slot, ranks, offsets, in_dim, R, dtype, device=DEVICE, poison=True):
    """Fresh seeded inputs; A's and B's padding past each slot's rank is NaN unless ``poison`` is off."""
    n_slots, T, n_slices = len(ranks), sum(seg_lens), len(offsets) - 1
    x = torch.randn(T, in_dim, generator=gen)
    A = torch.randn(n_slots, n_slices * R, in_dim, generator=gen) / in_dim**0.5
    B = torch.randn(n_slots, offsets[-1], R, generator=gen)
    base = torch.randn(T, offsets[-1], generator=gen)
    if poison:
        for s, r in enumerate(ranks):
            for i in range(n_slices):
                A[s, i * R + r : (i + 1) * R] = float("nan")
            B[s, :, r:] = float("nan")
    scalings = (torch.rand(n_slots, generator=gen) * 2 + 0.1).tolist()
    info = LoRABatchInfo.build(seg_lens, seg_slot, ranks, scalings, R, device=device)
    return [t.to(device=device, dtype=dtype) for t in (x, A, B, base)] + [info]


def oracle(x, A, B, base, info, offsets):
    out = base.clone()
    backend = TorchLoRABackend(base.device)
    backend.prepare(info)
    backend.run_lora(x, A, B, out, offsets)
    return out


def check(out, ref, base, info, ranks, dtype):
    assert not out.isnan().any(), "padding past a slot's rank leaked into the output"
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    base_rows = [t for t, s in enumerate(info.token_slot.tolist()) if ranks[s] == 0]
    assert torch.equal(out[base_rows], base[base_rows])  # rank-0 rows bit-identical


CASES = {
    "odd sizes: hidden 72, rank 3, 5 tokens": dict(
        seg_lens=[5], seg_slot=[1], ranks=[0, 3], offsets=(0, 72), in_dim=72, R=4
    ),
    "one token": dict(seg_lens=[1], seg_slot=[0], ranks=[5, 0], offsets=(0, 33), in_dim=40, R=8),
    "qkv: 3 unequal slices, mixed ranks incl. 0, slot spans chunks": dict(
        seg_lens=[3, 1, 20, 2, 4],
        seg_slot=[2, 0, 3, 2, 1],
        ranks=[0, 1, 7, 16],
        offsets=(0, 48, 64, 80),
        in_dim=72,
        R=16,
    ),
    "gate_up: 2 slices, many segments": dict(
        seg_lens=[1] * 9 + [6],
        seg_slot=[i % 4 for i in range(10)],
        ranks=[2, 4, 3, 0],
        offsets=(0, 40, 80),
        in_dim=20,
        R=4,
    ),
    "2 unequal slices, all rank 0 but one token, capacity 24": dict(
        seg_lens=[2, 1, 3], seg_slot=[0, 1, 0], ranks=[0, 19], offsets=(0, 24, 56), in_dim=36, R=24
    ),
    "even sizes (unmasked k and rank blocks), 3 slices": dict(
        seg_lens=[3, 17, 1], seg_slot=[1, 2, 0], ranks=[0, 5, 16], offsets=(0, 32, 48, 64), in_dim=64, R=16
    ),
    "4 slices (two expand launches)": dict(
        seg_lens=[2, 3], seg_slot=[1, 2], ranks=[0, 5, 2], offsets=(0, 8, 24, 40, 48), in_dim=24, R=8
    ),
    "long segments (csgmv tiles per segment), a slot in two segments": dict(
        seg_lens=[131, 140, 3], seg_slot=[1, 0, 1], ranks=[2, 3], offsets=(0, 24), in_dim=16, R=4
    ),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ["triton", "csgmv"])
def test_kernels_match_torch_backend(name, case, dtype):
    cfg = CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name} {case} {dtype}".encode()))
    x, A, B, base, info = random_case(
        gen, cfg["seg_lens"], cfg["seg_slot"], cfg["ranks"], cfg["offsets"], cfg["in_dim"], cfg["R"], dtype
    )
    ref = oracle(x, A, B, base, info, cfg["offsets"])
    out = base.clone()
    backend = make_backend(name)
    backend.prepare(info)
    backend.run_lora(x, A, B, out, cfg["offsets"])
    check(out, ref, base, info, cfg["ranks"], dtype)
    # inputs are read only; a second layer on the same step gives the same numbers again
    out2 = base.clone()
    backend.run_lora(x, A, B, out2, cfg["offsets"])
    assert torch.equal(out, out2)


def shrink_in_gemm_run(backend, x, A, B, offsets, gen):
    """The base GEMM over ``[W; A of every slot]`` then ``run_lora(shrunk=...)``, as the model does it.
    Returns (output, the GEMM's base columns before the expand)."""
    K, N = x.shape[1], offsets[-1]
    W = (torch.randn(N, K, generator=gen) / K**0.5).to(x)
    y = F.linear(x, torch.cat([W, A.reshape(-1, K)]))
    out, shrunk = y[:, :N], y[:, N:]
    base = out.clone()
    backend.run_lora(x, A, B, out, offsets, shrunk=shrunk)
    return out, base


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ["triton", "csgmv"])
def test_shrink_in_gemm_expand_matches_torch_backend(name, case, dtype):
    """The shrink done by the base GEMM (its extra columns, NaN where A's padding is NaN, h rounded
    to the input dtype) and only the expand in the kernel: the oracle's numbers, rank-0 rows untouched."""
    cfg = CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(f"fused {name} {case} {dtype}".encode()))
    x, A, B, _, info = random_case(
        gen, cfg["seg_lens"], cfg["seg_slot"], cfg["ranks"], cfg["offsets"], cfg["in_dim"], cfg["R"], dtype
    )
    backend = make_backend(name)
    backend.prepare(info)
    out, base = shrink_in_gemm_run(backend, x, A, B, cfg["offsets"], gen)
    ref = oracle(x, A, B, base, info, cfg["offsets"])
    if dtype == torch.float32:
        check(out, ref, base, info, cfg["ranks"], dtype)
    else:  # h comes out of the GEMM rounded to 16 bits: error relative to the delta, about 2^-11
        check(out, out, base, info, cfg["ranks"], dtype)
        delta = ref.double() - base.double()
        rel = ((out.double() - ref.double()).norm() / delta.norm()).item()
        assert rel < 2e-3, f"relative error {rel:.2e}"


def test_shrink_in_gemm_cost_model_and_argument_checks(gen):
    backend = make_backend("csgmv")
    # Llama-3-8B qkv, rank 16: decode takes the GEMM; prefill only while the extra rows stay within
    # 1/32 of the output (4 slots: 192 rows of 6144; 8 slots: 384 rows keep the shrink kernel)
    assert backend.wants_shrink_in_gemm(64, 4096, 6144, 3, 16, 64)
    assert backend.wants_shrink_in_gemm(2048, 4096, 6144, 3, 16, 4)
    assert not backend.wants_shrink_in_gemm(2048, 4096, 6144, 3, 16, 8)
    assert not backend.wants_shrink_in_gemm(4096, 4096, 6144, 3, 64, 64)
    # one decode token with 64 idle slots of rank 128: reading every slot's A costs more than a launch
    assert not backend.wants_shrink_in_gemm(1, 4096, 6144, 3, 128, 64)
    assert make_backend("csgmv", tuning={"shrink_in_gemm": False}).wants_shrink_in_gemm(1, 64, 64, 1, 8, 4) is False
    cfg = CASES["one token"]
    x, A, B, base, info = random_case(
        gen, cfg["seg_lens"], cfg["seg_slot"], cfg["ranks"], cfg["offsets"], cfg["in_dim"], cfg["R"], torch.float32
    )
    backend.prepare(info)
    with pytest.raises(ValueError, match="shrunk has shape"):
        backend.run_lora(x, A, B, base, cfg["offsets"], shrunk=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="does not take a precomputed shrink"):
        torch_backend = TorchLoRABackend(DEVICE)
        torch_backend.prepare(info)
        torch_backend.checked_batch(x, A, B, base, cfg["offsets"], torch.zeros(1, A.shape[0] * A.shape[1]))


def test_epilogue_rule_env_override_and_what_the_backend_hands_out(gen, monkeypatch):
    """When the expand is left to the consumer (measured on an H100: rank <= 16, <= 128 tokens,
    gate_up at rank 16 <= 64), what forces it, and which projections can take it at all."""
    monkeypatch.delenv("LORASERVE_LORA_EPILOGUE", raising=False)
    backend = make_backend("csgmv")
    assert backend.use_epilogue(128, 8, 2) and backend.use_epilogue(128, 16, 1)
    assert not backend.use_epilogue(129, 8, 1) and not backend.use_epilogue(1, 32, 1)
    assert backend.use_epilogue(64, 16, 2) and not backend.use_epilogue(65, 16, 2)
    monkeypatch.setenv("LORASERVE_LORA_EPILOGUE", "1")
    assert backend.use_epilogue(4096, 128, 2)
    monkeypatch.setenv("LORASERVE_LORA_EPILOGUE", "0")
    assert not backend.use_epilogue(1, 8, 1)
    assert make_backend("csgmv", tuning={"epilogue": True}).use_epilogue(1, 8, 1)  # tuning beats the variable
    monkeypatch.setenv("LORASERVE_LORA_EPILOGUE", "sometimes")
    with pytest.raises(ValueError, match="LORASERVE_LORA_EPILOGUE='sometimes'; use 1, 0 or auto"):
        backend.use_epilogue(1, 8, 1)
    monkeypatch.setenv("LORASERVE_LORA_EPILOGUE", "1")
    monkeypatch.setenv("LORASERVE_FUSED_OPS", "1")  # the consumers' kernels run (interpreter)
    cfg = CASES["one token"]
    x, A, B, base, info = random_case(
        gen, cfg["seg_lens"], cfg["seg_slot"], cfg["ranks"], cfg["offsets"], cfg["in_dim"], cfg["R"], torch.float32
    )
    backend.prepare(info)
    n_slots, R = A.shape[0], cfg["R"]
    one = backend.expand_epilogue(B[:, :8].contiguous(), (0, 8), torch.zeros(1, n_slots * R, device=DEVICE))
    assert one is not None and one.n_slices == 1 and one.R == R and one.token_slot is info.token_slot
    # three slices (qkv) or unequal slices: no consumer can take them
    assert (
        backend.expand_epilogue(B[:, :12].contiguous(), (0, 4, 8, 12), torch.zeros(1, n_slots * 3 * R, device=DEVICE))
        is None
    )
    assert (
        backend.expand_epilogue(B[:, :12].contiguous(), (0, 4, 12), torch.zeros(1, n_slots * 2 * R, device=DEVICE))
        is None
    )
    monkeypatch.setenv("LORASERVE_FUSED_OPS", "0")  # eager consumers: the expand kernel is cheaper
    assert backend.expand_epilogue(B[:, :8].contiguous(), (0, 8), torch.zeros(1, n_slots * R, device=DEVICE)) is None
    assert TorchLoRABackend(DEVICE).expand_epilogue(B, (0, 8), torch.zeros(1, 1, device=DEVICE)) is None


@pytest.mark.parametrize(
    "case",
    [
        "qkv: 3 unequal slices, mixed ranks incl. 0, slot spans chunks",
        "even sizes (unmasked k and rank blocks), 3 slices",
    ],
)
@pytest.mark.parametrize("name", ["triton", "csgmv"])
def test_split_k_strided_input_and_small_tiles(name, case, gen):
    """Split-k partial sums, tiles of one segment split over several programs, full column blocks,
    programs covering several column blocks (full and partial groups), and an ``x`` that is a
    strided view all give the oracle's numbers."""
    cfg = CASES[case]
    x, A, B, base, info = random_case(
        gen, cfg["seg_lens"], cfg["seg_slot"], cfg["ranks"], cfg["offsets"], cfg["in_dim"], cfg["R"], torch.float32
    )
    wide = torch.randn(x.shape[0], x.shape[1] * 2, generator=gen).to(DEVICE)
    wide[:, 1::2] = x
    x = wide[:, 1::2]
    ref = oracle(x, A, B, base, info, cfg["offsets"])
    out = base.clone()
    backend = make_backend(
        name, tuning={"block_m": 16, "shrink": {"split": 3, "block_k": 16}, "expand": {"block_n": 16, "group_n": 3}}
    )
    backend.prepare(info)
    backend.run_lora(x, A, B, out, cfg["offsets"])
    check(out, ref, base, info, cfg["ranks"], torch.float32)


@pytest.mark.parametrize(
    "seg_lens, seg_slot, expected",
    [
        ([1] * 7, [2, 0, 2, 1, 3, 2, 1], [3, 6, 0, 2, 5, 4, 1]),
        ([2, 1, 3, 1, 2], [2, 1, 2, 0, 3], [2, 0, 1, 3, 4, 5, 7, 8, 6]),
    ],
)
def test_group_by_slot_is_a_stable_grouping(seg_lens, seg_slot, expected):
    """Positions hold slot 1's tokens, then slot 2's, then slot 3's, each in token order; rank-0 last."""
    info = LoRABatchInfo.build(seg_lens, seg_slot, [0, 4, 2, 8], [1.0] * 4, 8, device=DEVICE)
    perm, counts, starts = group_by_slot(info)
    assert perm.tolist() == expected
    token_slot = info.token_slot.tolist()
    assert counts.tolist() == [0] + [token_slot.count(s) for s in (1, 2, 3)]
    assert starts.tolist()[1:] == [0, counts[1].item(), counts[1].item() + counts[2].item()]


@pytest.mark.parametrize("block", [16, 32])
def test_one_launch_grouping_equals_the_tensor_operations(block):
    """csgmv's fused prepare (prepare_kernel.py) against group_by_slot + build_tiles: random steps of
    1 to 1,024 tokens over 1 to 129 slots, rank-0 slots and a slot count past a power of two."""
    from loraserve.plugins.backend_csgmv.prepare_kernel import can_fuse, group_and_tile

    rng = random.Random(block)
    for _ in range(12):
        n_slots = rng.choice([1, 2, 5, 17, 64, 129])
        n_segs = rng.randint(1, 48)
        seg_lens = [rng.choice([1, 1, 1, 3, 20, 70]) for _ in range(n_segs)]
        ranks = [rng.choice([0, 4, 8]) for _ in range(n_slots)]
        seg_slot = [rng.randrange(n_slots) for _ in range(n_segs)]
        info = LoRABatchInfo.build(seg_lens, seg_slot, ranks, [1.0] * n_slots, 8, device=DEVICE)
        max_tiles = tile_count(info.num_tokens, block, min(n_slots, n_segs))
        assert can_fuse(info.num_tokens, n_slots)
        perm, counts, starts = group_by_slot(info)
        tiles = build_tiles(starts, counts, torch.arange(n_slots, device=DEVICE), block, max_tiles)
        got = group_and_tile(info, block, max_tiles)
        assert torch.equal(got[0], perm), (seg_lens, seg_slot, ranks)
        assert torch.equal(got[1], counts.int()) and torch.equal(got[2], starts.int())
        assert torch.equal(got[3], tiles), (seg_lens, seg_slot, ranks)
    assert not can_fuse(1025, 8) and not can_fuse(8, 256)


@pytest.mark.parametrize("block", [16, 32])
def test_one_launch_segment_tiles_equal_the_tensor_operations(block):
    """SGMV's fused tile table (tile_kernel.py) against build_tiles over the segments: random steps of
    1 to 300 segments (chunk edges included), one-token and longer segments, rank-0 slots; and the
    plan's lazy groups when it is retiled to the other height."""
    from loraserve.plugins.backend_triton.tile_kernel import can_fuse_segments, segment_tiles_fused
    from loraserve.plugins.backend_triton.tiles import segment_groups, segment_tile_count, segment_tiles

    rng = random.Random(100 + block)
    other = 48 - block
    for n_segs in [1, 2, 63, 64, 65, 129, 300] + [rng.randint(1, 300) for _ in range(5)]:
        n_slots = rng.choice([1, 3, 8, 33])
        seg_lens = [rng.choice([1, 1, 1, 2, block, block + 1, 40, 100]) for _ in range(n_segs)]
        ranks = [rng.choice([0, 4, 8]) for _ in range(n_slots)]
        seg_slot = [rng.randrange(n_slots) for _ in range(n_segs)]
        info = LoRABatchInfo.build(seg_lens, seg_slot, ranks, [1.0] * n_slots, 8, device=DEVICE)
        indptr, slots = info.seg_indptr.long(), info.seg_slot.long()
        lens = (indptr[1:] - indptr[:-1]) * (info.ranks.long()[slots] > 0)
        max_tiles = segment_tile_count(info.num_tokens, n_segs, block)
        assert can_fuse_segments(n_segs)
        tiles = build_tiles(indptr[:-1], lens, slots, block, max_tiles)
        assert torch.equal(segment_tiles_fused(info, block, max_tiles), tiles), (seg_lens, seg_slot, ranks)
        plan = segment_tiles(info, block)
        assert torch.equal(plan.tiles, tiles) and callable(plan.groups)
        retiled = plan.retiled(other, info.num_tokens)
        expected = build_tiles(*segment_groups(info), other, segment_tile_count(info.num_tokens, n_segs, other))
        assert torch.equal(retiled.tiles, expected) and not callable(retiled.groups)
    assert not can_fuse_segments(0) and can_fuse_segments(4096) and not can_fuse_segments(4097)


@pytest.mark.parametrize("fault", ["compile error", "wrong table"])
@pytest.mark.parametrize("name", ["triton", "csgmv"])
def test_a_one_launch_kernel_failing_its_check_is_not_used(name, fault, monkeypatch, caplog):
    """backend_triton/selfcheck.py: a one-launch prepare kernel that raises (a compile error) or gives a
    wrong table on this device is found when the backend is built, logged, and not used: the
    backend's results still equal backend_torch's. Without the check the broken kernel would run
    (checked: the wrong table then reads out of bounds and crashes the process). A sound kernel passes."""
    import loraserve.plugins.backend_csgmv.backend as csgmv_backend
    import loraserve.plugins.backend_triton.tile_kernel as tile_kernel
    import loraserve.plugins.backend_triton.tiles as tiles
    from loraserve import kernel_checks as selfcheck

    monkeypatch.setattr(selfcheck, "_VERDICTS", {})
    sound = make_backend(name)
    assert sound.one_launch_tiles and getattr(sound, "one_launch_groups", True)

    def broken(real):
        def run(*args, **kwargs):
            if fault == "compile error":
                raise RuntimeError("triton.compiler.errors.CompilationError: (simulated)")
            out = real(*args, **kwargs)
            tiles = out[-1] if isinstance(out, tuple) else out
            tiles[2] += 1  # every tile one token longer
            return out

        return run

    monkeypatch.setattr(tile_kernel, "segment_tiles_fused", broken(tile_kernel.segment_tiles_fused))
    monkeypatch.setattr(tiles, "segment_tiles_fused", tile_kernel.segment_tiles_fused)
    monkeypatch.setattr(csgmv_backend, "group_and_tile", broken(csgmv_backend.group_and_tile))
    monkeypatch.setattr(selfcheck, "_VERDICTS", {})
    with caplog.at_level("WARNING", logger="loraserve.lora"):
        backend = make_backend(name)
    assert not backend.one_launch_tiles and not getattr(backend, "one_launch_groups", False)
    assert "SGMV tile table kernel failed its check" in caplog.text
    assert fault != "compile error" or "CompilationError" in caplog.text
    assert name == "triton" or "csgmv grouping kernel failed its check" in caplog.text
    cfg = CASES["qkv: 3 unequal slices, mixed ranks incl. 0, slot spans chunks"]
    gen = torch.Generator().manual_seed(5)
    x, A, B, base, info = random_case(
        gen, cfg["seg_lens"], cfg["seg_slot"], cfg["ranks"], cfg["offsets"], cfg["in_dim"], cfg["R"], torch.float32
    )
    out = base.clone()
    backend.prepare(info)
    backend.run_lora(x, A, B, out, cfg["offsets"])
    check(out, oracle(x, A, B, base, info, cfg["offsets"]), base, info, cfg["ranks"], torch.float32)
    monkeypatch.setenv(selfcheck.ENV, "0")
    assert not make_backend(name).one_launch_tiles  # the switch turns the kernels off without a check


def test_factories_read_options_and_refuse_cpu_without_interpreter(monkeypatch):
    from loraserve.plugins.backend_csgmv import CsgmvOptions
    from loraserve.plugins.backend_csgmv import _make as make_csgmv
    from loraserve.plugins.backend_triton import _make as make_triton
    from loraserve.settings import make_settings

    backend = make_csgmv(make_settings(device="cpu"), DEVICE, options=CsgmvOptions(max_lora_chunk_size=32))
    assert backend.name == "csgmv" and backend.max_chunk == 32 and not backend.supports_embedding
    assert make_triton(make_settings(device="cpu"), DEVICE).name == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="needs a CUDA device.*--lora-backend torch"):
        make_triton(None, "cpu")


def test_shape_and_dtype_errors(gen):
    cfg = CASES["one token"]
    x, A, B, base, info = random_case(
        gen, cfg["seg_lens"], cfg["seg_slot"], cfg["ranks"], cfg["offsets"], cfg["in_dim"], cfg["R"], torch.float32
    )
    backend = make_backend("csgmv")
    with pytest.raises(RuntimeError, match="prepare"):
        backend.run_lora(x, A, B, base, cfg["offsets"])
    backend.prepare(info)
    with pytest.raises(ValueError, match="B has shape"):
        backend.run_lora(x, A, B[:, :10], base, cfg["offsets"])
    with pytest.raises(ValueError, match="one dtype"):
        backend.run_lora(x, A.half(), B, base, cfg["offsets"])


# -- the whole engine ---------------------------------------------------------------------------

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_adapters(tmp_path_factory):
    from lora_utils import make_peft_adapter, tiny_llama_config, tiny_model

    base = tiny_model(tiny_llama_config(), seed=0)
    root = tmp_path_factory.mktemp("kernels-engine")
    base.save_pretrained(root / "base")
    paths = {
        "all3": make_peft_adapter(base, root / "all3", r=3, lora_alpha=6, target_modules=ALL, seed=1, init_scale=0.3),
        "qv8": make_peft_adapter(
            base,
            root / "qv8",
            r=8,
            lora_alpha=8,
            seed=2,
            init_scale=0.3,
            target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        ),
    }
    return str(root / "base"), {k: str(v) for k, v in paths.items()}


def test_engine_greedy_tokens_match_torch_backend(tiny_adapters):
    from loraserve.engine.engine import Engine
    from loraserve.settings import make_settings

    base, paths = tiny_adapters
    gen = torch.Generator().manual_seed(7)
    prompts = torch.randint(0, 256, (4, 5), generator=gen).tolist()
    adapters = ["all3", "qv8", None, "all3"]
    params = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True, "return_logprob": True}
    results = {}
    # "+gemm": the shrink inside the base GEMM (the extra rows appended to each weight), "+kernel": a
    # separate shrink launch over the same memory
    for name in ("torch", "triton+gemm", "csgmv+gemm", "csgmv+kernel"):
        backend, _, how = name.partition("+")
        engine = Engine(
            make_settings(
                model_path=base,
                device=DEVICE,
                dtype="float32",
                max_total_tokens=256,
                lora_backend=backend,
                lora_paths=[f"{n}={p}" for n, p in paths.items()],
            )
        )
        try:
            assert engine.lora.backend.name == backend
            if how:
                engine.lora.backend.tuning["shrink_in_gemm"] = how == "gemm"
            results[name] = engine.generate(input_ids=prompts, sampling_params=params, lora_path=adapters)
            if how:  # the path asked for really ran: the layers' GEMMs did (not) include the A rows
                assert set(engine.lora.hooks.shrink_in_gemm_now.values()) == {how == "gemm"}
        finally:
            engine.shutdown()
    expected = [r["output_ids"] for r in results["torch"]]
    assert len({tuple(t) for t in expected[:2]}) == 2  # the adapters really differ
    for name in ("triton+gemm", "csgmv+gemm", "csgmv+kernel"):
        assert [r["output_ids"] for r in results[name]] == expected, name
        for ours, ref in zip(results[name], results["torch"]):
            a = [lp for lp, _ in ours["meta_info"]["output_token_logprobs"]]
            b = [lp for lp, _ in ref["meta_info"]["output_token_logprobs"]]
            assert max(abs(p - q) for p, q in zip(a, b)) < 1e-3


def test_engine_expand_left_to_the_norm_and_silu_matches_torch_backend(tiny_adapters, monkeypatch):
    """The expand of o_proj, gate_up_proj and down_proj done by the kernels that consume their
    outputs (RMSNorm, SiLU-and-mul: ``LoRAEpilogue``), fused ops on under the interpreter: the same
    greedy tokens as backend_torch, and as the in-place expand, with the epilogue really taken."""
    from loraserve.engine.engine import Engine
    from loraserve.settings import make_settings

    monkeypatch.setenv("LORASERVE_FUSED_OPS", "1")
    base, paths = tiny_adapters
    gen = torch.Generator().manual_seed(8)
    prompts = torch.randint(0, 256, (4, 5), generator=gen).tolist()
    adapters = ["qv8", "all3", None, "qv8"]
    params = {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True, "return_logprob": True}
    results, taken = {}, {}
    for name in ("torch", "csgmv+epilogue", "csgmv+in-place"):
        backend, _, how = name.partition("+")
        engine = Engine(
            make_settings(
                model_path=base,
                device=DEVICE,
                dtype="float32",
                max_total_tokens=256,
                lora_backend=backend,
                lora_paths=[f"{n}={p}" for n, p in paths.items()],
            )
        )
        try:
            lora_backend = engine.lora.backend
            sizes, layers = (engine.model.hidden_size, engine.model.intermediate_size), engine.model.num_layers
            if how:
                lora_backend.tuning.update(shrink_in_gemm=True, epilogue=how == "epilogue")
                inner = lora_backend.expand_epilogue
                counts = taken[name] = {"epilogues": 0, "offsets": set()}

                def counting(B, offsets, shrunk, inner=inner, counts=counts):
                    ep = inner(B, offsets, shrunk)
                    if ep is not None:
                        counts["epilogues"] += 1
                        counts["offsets"].add(tuple(offsets))
                    return ep

                monkeypatch.setattr(lora_backend, "expand_epilogue", counting)
            results[name] = engine.generate(input_ids=prompts, sampling_params=params, lora_path=adapters)
        finally:
            engine.shutdown()
    # every step, every layer: o_proj and down_proj (one slice of hidden), gate_up_proj (two slices)
    assert taken["csgmv+epilogue"]["epilogues"] > 0 and taken["csgmv+in-place"]["epilogues"] == 0
    hidden, inter = sizes
    assert taken["csgmv+epilogue"]["offsets"] == {(0, hidden), (0, inter, 2 * inter)}
    assert taken["csgmv+epilogue"]["epilogues"] % (3 * layers) == 0
    expected = [r["output_ids"] for r in results["torch"]]
    assert len({tuple(t) for t in expected[:2]}) == 2  # the adapters really differ
    for name in ("csgmv+epilogue", "csgmv+in-place"):
        assert [r["output_ids"] for r in results[name]] == expected, name
        for ours, ref in zip(results[name], results["torch"]):
            a = [lp for lp, _ in ours["meta_info"]["output_token_logprobs"]]
            b = [lp for lp, _ in ref["meta_info"]["output_token_logprobs"]]
            assert max(abs(p - q) for p, q in zip(a, b)) < 1e-3


# -- GPU: Llama-3-8B shapes -----------------------------------------------------------------------

LLAMA3_8B = {  # projection: (in_dim, output_offsets)
    "qkv_proj": (4096, (0, 4096, 5120, 6144)),
    "o_proj": (4096, (0, 4096)),
    "gate_up_proj": (4096, (0, 14336, 28672)),
    "down_proj": (14336, (0, 4096)),
}
GPU_BATCHES = {  # seg_lens, seg_slot, ranks per slot (slot 0: the base model), rank capacity R
    "decode 64 tokens, 9 slots": ([1] * 64, [i % 9 for i in range(64)], [0, 8, 16, 64, 128, 3, 16, 128, 33], 128),
    "prefill 3 x 300 + decode": ([300, 300, 300, 1, 1], [1, 2, 0, 3, 1], [0, 16, 64, 128], 128),
    "decode 32 tokens, capacity 8": ([1] * 30 + [2], [i % 5 for i in range(31)], [0, 8, 3, 8, 5], 8),
}


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("batch", GPU_BATCHES)
@pytest.mark.parametrize("proj", LLAMA3_8B)
@pytest.mark.parametrize("shrink", ["kernel", "gemm"])
@pytest.mark.parametrize("name", ["triton", "csgmv"])
def test_llama3_8b_shapes_on_gpu(name, shrink, proj, batch, dtype):
    if dtype != torch.bfloat16 and batch != "decode 64 tokens, 9 slots":
        pytest.skip("float16/float32 at real sizes: decode batch only")
    in_dim, offsets = LLAMA3_8B[proj]
    seg_lens, seg_slot, ranks, R = GPU_BATCHES[batch]
    gen = torch.Generator().manual_seed(11)
    x, A, B, base, info = random_case(gen, seg_lens, seg_slot, ranks, offsets, in_dim, R, dtype)
    B /= 4  # keep the delta about as large as the base output
    backend = make_backend(name)
    backend.prepare(info)
    if shrink == "gemm":  # the shrink from the base GEMM's extra columns (h rounded to the dtype)
        out, base = shrink_in_gemm_run(backend, x, A, B, offsets, gen)
        ref = oracle(x, A, B, base, info, offsets)
    else:
        ref = oracle(x, A, B, base, info, offsets)
        out = base.clone()
        backend.run_lora(x, A, B, out, offsets)
    assert not out.isnan().any()
    delta_ref = ref.double() - base.double()
    rel = ((out.double() - ref.double()).norm() / delta_ref.norm()).item()
    limit = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    assert rel < limit, f"relative error {rel:.2e} over {limit:.0e}"
    base_rows = [t for t, s in enumerate(info.token_slot.tolist()) if ranks[s] == 0]
    assert torch.equal(out[base_rows], base[base_rows])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["triton", "csgmv"])
def test_prepare_and_run_lora_are_cuda_graph_capturable(name):
    """Capturing prepare + run_lora fails on any host round trip; replays follow new inputs."""
    in_dim, offsets = LLAMA3_8B["qkv_proj"]
    seg_lens, seg_slot, ranks, _ = GPU_BATCHES["decode 64 tokens, 9 slots"]
    gen = torch.Generator().manual_seed(5)
    x, A, B, base, info = random_case(gen, seg_lens, seg_slot, ranks, offsets, in_dim, 128, torch.bfloat16)
    check_captured_replays(make_backend(name), x, A, B, base, info, offsets, gen)


def check_captured_replays(backend, x, A, B, base, info, offsets, gen) -> None:
    """Capture ``prepare`` + ``run_lora`` in a CUDA graph (which fails on any host round trip), then
    replay it twice on new ``x``: within 1e-2 of backend_torch, rows of rank-0 slots untouched."""
    out = base.clone()
    backend.prepare(info)  # compile outside the capture
    backend.run_lora(x, A, B, out, offsets)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out.copy_(base)
        backend.prepare(info)
        backend.run_lora(x, A, B, out, offsets)
    torch.cuda.current_stream().wait_stream(stream)
    ranks = info.ranks.tolist()
    base_rows = [t for t, s in enumerate(info.token_slot.tolist()) if ranks[s] == 0]
    for _ in range(2):
        x.copy_(torch.randn(x.shape, generator=gen).to(x))
        graph.replay()
        torch.cuda.synchronize()
        ref = oracle(x, A, B, base, info, offsets)
        rel = ((out.double() - ref.double()).norm() / (ref.double() - base.double()).norm()).item()
        assert rel < 1e-2, rel
        assert torch.equal(out[base_rows], base[base_rows])


def emulate_decode_graphs(engine, max_bs: int):
    """Install on ``engine`` what CUDA graphs do, on CPU: each padded batch size's computation is set
    up once (as a capture: hooks and static batch-info buffers as captured) and every replay reruns
    it over the refilled static buffers. Returns the DecodeGraphs (``replays`` counts the replays)."""
    from loraserve.runner.cuda_graph import DecodeGraphs

    runner, lora = engine.runner, engine.lora
    lora.init_graph_buffers(max_bs)
    graphs = DecodeGraphs(engine.model, runner.attention, lora, engine.device, max_bs=max_bs)

    hooks = lora.hooks

    class Replay:  # what a captured graph does: the same computation over the static buffers
        def __init__(self, b, info):
            self.b, self.info = b, info
            self.captured = (hooks.active, hooks.dora, dict(hooks.shrink_in_gemm_now))

        def replay(self):
            hooks.active, hooks.dora, hooks.shrink_in_gemm_now = self.captured  # the hooks' state, as captured
            graphs.logits[self.b].copy_(graphs._forward(self.b, self.info))

    with torch.inference_mode():
        for b in graphs.sizes:
            runner.attention.begin_graph_step([], b)
            info = lora.begin_graph_capture(b)
            graphs.logits[b] = graphs._forward(b, info)
            graphs.graphs[b] = Replay(b, info)
    runner.graphs = graphs
    return graphs


def test_decode_graph_buffers_replay_the_captured_computation_on_cpu(tiny_adapters):
    """The static-buffer path of CUDA graphs, emulated on CPU (interpreter): each padded batch size's
    computation is set up once, as for a capture, and every later decode step only refills the
    static buffers (ids, positions, attention metadata, LoRA slots/ranks/scalings) before rerunning
    it, as a replay does. Padding rows and the null LoRA slot must leave the real rows' greedy tokens
    and log-probabilities equal to eager decoding."""
    from loraserve.engine.engine import Engine
    from loraserve.settings import make_settings

    base, paths = tiny_adapters
    gen = torch.Generator().manual_seed(9)
    prompts = torch.randint(0, 256, (3, 5), generator=gen).tolist()
    adapters = ["all3", None, "qv8"]  # 3 requests: padded to a size of 4, one padding row
    params = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True, "return_logprob": True}
    results = {}
    for emulate in (False, True):
        engine = Engine(
            make_settings(
                model_path=base,
                device=DEVICE,
                dtype="float32",
                max_total_tokens=256,
                lora_backend="csgmv",
                attention_backend="triton",
                lora_paths=[f"{n}={p}" for n, p in paths.items()],
            )
        )
        try:
            if emulate:
                graphs = emulate_decode_graphs(engine, max_bs=4)
            results[emulate] = engine.generate(input_ids=prompts, sampling_params=params, lora_path=adapters)
            if emulate:
                assert graphs.replays == params["max_new_tokens"] - 1  # every decode step, none of the prefill
        finally:
            engine.shutdown()
    for a, b in zip(results[True], results[False]):
        assert a["output_ids"] == b["output_ids"]
        la = [lp for lp, _ in a["meta_info"]["output_token_logprobs"]]
        lb = [lp for lp, _ in b["meta_info"]["output_token_logprobs"]]
        assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-4
