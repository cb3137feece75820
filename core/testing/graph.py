"""The CUDA graph check of :func:`~loraserve.testing.check_backend` (``graph_capturable`` backends only).

It does what the engine's decode graphs do: a decode step's batch info is a set of static device
buffers (each token its own segment; slot of each token, rank and scaling of each slot, the last
slot the null slot of rank 0 past the pool's last that the padding rows use), whose host copies
are stale after the first refill (a capturable backend reads only device tensors and the
batch's host integers). ``prepare`` and ``run_lora`` for two projections (and, with
``supports_shrink_in_gemm``, the base GEMM over ``[W; A of every slot]`` then ``run_lora(shrunk=...)``)
are captured once; then the buffers are refilled with new slots, ranks, scalings and ``x`` and the
graph replayed, several times. Each replay must match backend_torch and an eager run of a fresh
backend on the same step. Capture itself fails if ``prepare`` or ``run_lora`` reads data back to the
host (``.item()``, ``.tolist()``, a synchronisation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from loraserve.contract import LoRABackend, LoRABatchInfo
from loraserve.plugins.backend_torch.backend import TorchLoRABackend
from loraserve.testing import cases as C
from loraserve.testing.compare import Snapshot, call, check_close, check_result, expand_reference
from loraserve.testing.report import ConformanceReport

TOKENS, PADDING_ROWS, SLOTS, RANK_CAPACITY, REPLAYS = 7, 2, 4, 8, 3
PROJECTIONS = (C.plain(40, 24), C.gate_up(40, 16))


class _Layer:
    """The static tensors of one projection in the captured step."""

    def __init__(self, proj: C.Projection, gen: torch.Generator, dtype: torch.dtype, device: torch.device, fused: bool):
        T, K, N, S, R = TOKENS, proj.in_dim, proj.output_offsets[-1], proj.n_slices, RANK_CAPACITY
        self.proj = proj

        def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
            return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)

        self.x, self.base = randn(T, K), randn(T, N)
        # A and B are random past every rank too: the refills change the ranks under the same weights
        self.A, self.B = randn(SLOTS, S * R, K, scale=K**-0.5), randn(SLOTS, N, R, scale=0.5)
        self.out = torch.empty_like(self.base)
        self.fused = fused
        if fused:
            self.W_ext = torch.cat([randn(N, K, scale=K**-0.5), self.A.reshape(-1, K)])
            self.y = torch.empty(T, self.W_ext.shape[0], dtype=dtype, device=device)
            self.y_base = torch.empty(T, N, dtype=dtype, device=device)

    def run(self, backend: LoRABackend) -> None:
        offsets, N = self.proj.output_offsets, self.base.shape[1]
        self.out.copy_(self.base)
        backend.run_lora(self.x, self.A, self.B, self.out, offsets)
        if self.fused:
            torch.mm(self.x, self.W_ext.T, out=self.y)
            self.y_base.copy_(self.y[:, :N])
            backend.run_lora(self.x, self.A, self.B, self.y[:, :N], offsets, shrunk=self.y[:, N:])


def _capture(step: Callable[[], None], device: torch.device, where: str) -> torch.cuda.CUDAGraph:
    """Run ``step`` once on a side stream (compiling the kernels), then capture it in a CUDA graph."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        call(where, "prepare + run_lora before the capture", step)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except Exception as exc:
        raise AssertionError(
            f"{where}: capturing prepare + run_lora failed (a read back to the host, such as "
            f".item(), .tolist() or a synchronisation, breaks a capture): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return graph


class _GraphStep:
    """The static batch info and layers of the captured decode step, and their refills."""

    def __init__(self, gen: torch.Generator, dtype: torch.dtype, device: torch.device, fused: bool):
        T, n, R = TOKENS, SLOTS, RANK_CAPACITY
        self.gen, self.dtype = gen, dtype
        i32 = dict(dtype=torch.int32, device=device)
        self.slot_buf, self.rank_buf = torch.zeros(T, **i32), torch.zeros(n + 1, **i32)
        self.scale_buf = torch.zeros(n + 1, dtype=torch.float32, device=device)
        self.info = LoRABatchInfo(
            num_tokens=T,
            num_segments=T,
            seg_indptr=torch.arange(T + 1, **i32),
            seg_slot=self.slot_buf,
            token_slot=self.slot_buf,
            ranks=self.rank_buf,
            scalings=self.scale_buf,
            max_rank=R,
            seg_indptr_host=list(range(T + 1)),
            seg_slot_host=[n] * T,
            ranks_host=[0] * (n + 1),
            scalings_host=[0.0] * (n + 1),
        )
        self.layers = [_Layer(p, gen, dtype, device, fused) for p in PROJECTIONS]

    def refill(self, step: int) -> tuple[list[int], list[int], list[float]]:
        """New slots, ranks, scalings and ``x`` in the same buffers; returns the slots, ranks, scalings."""
        T, n, R, gen = TOKENS, SLOTS, RANK_CAPACITY, self.gen
        real = T - PADDING_ROWS
        slots = torch.randint(0, n, (real,), generator=gen).tolist() + [n] * PADDING_ROWS
        ranks = torch.randint(1, R + 1, (n,), generator=gen).tolist() + [0]
        ranks[step % n] = 0  # every refill has a rank-0 slot of the pool, a different one each time
        slots[step % real] = step % n  # and a token on it
        scalings = C.random_scalings(n + 1, gen)
        self.slot_buf.copy_(torch.tensor(slots, dtype=torch.int32))
        self.rank_buf.copy_(torch.tensor(ranks, dtype=torch.int32))
        self.scale_buf.copy_(torch.tensor(scalings, dtype=torch.float32))
        for layer in self.layers:
            layer.x.copy_(torch.randn(layer.x.shape, generator=gen).to(self.dtype))
        return slots, ranks, scalings

    def run(self, backend: LoRABackend) -> None:
        backend.prepare(self.info)
        for layer in self.layers:
            layer.run(backend)


def check_graph_capture(
    make_backend: Callable[[torch.device], LoRABackend],
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    report: ConformanceReport,
) -> None:
    """Capture, refill, replay, compare (see the module docstring); AssertionError on a violation."""
    T, n, R = TOKENS, SLOTS, RANK_CAPACITY
    backend = call(f"make_backend({device})", "make_backend", make_backend, device)
    where = (
        f"backend {backend.name!r}, CUDA graph of a decode step ({T} tokens, one per segment, the last "
        f"{PADDING_ROWS} on the null slot {n}; {n} slots of capacity {R}), dtype {dtype}"
    )
    gen = C.generator(seed, "graph", dtype)
    captured = _GraphStep(gen, dtype, device, backend.supports_shrink_in_gemm)
    captured.refill(0)
    graph = _capture(lambda: captured.run(backend), device, where)
    for replay in range(1, REPLAYS + 1):
        slots, ranks, scalings = captured.refill(replay)
        kept = [Snapshot(x=layer.x, A=layer.A, B=layer.B) for layer in captured.layers]
        graph.replay()
        torch.cuda.synchronize(device)
        eager_info = LoRABatchInfo.build([1] * T, slots, ranks, scalings, R, device=device)
        oracle = TorchLoRABackend(device)
        oracle.prepare(eager_info)
        eager = make_backend(device)
        eager.prepare(eager_info)
        for layer, snapshot in zip(captured.layers, kept):
            at = (
                f"{where}, replay {replay} with token slots {slots}, slot ranks {ranks}, scalings "
                f"[{', '.join(f'{s:.3g}' for s in scalings)}], projection {layer.proj}"
            )
            _check_replayed_layer(layer, snapshot, at, oracle, eager, slots, ranks, scalings, dtype, report)


def _check_replayed_layer(
    layer: _Layer,
    snapshot: Snapshot,
    at: str,
    oracle: TorchLoRABackend,
    eager: LoRABackend,
    slots: list[int],
    ranks: list[int],
    scalings: list[float],
    dtype: torch.dtype,
    report: ConformanceReport,
) -> None:
    """One layer's replayed outputs against backend_torch, an eager run, and (fused) the contract's expand."""
    offsets, R = layer.proj.output_offsets, RANK_CAPACITY
    expected = layer.base.clone()
    oracle.run_lora(layer.x, layer.A, layer.B, expected, offsets)
    check_result(
        f"{at}, path run_lora",
        "graph_capture",
        layer.out,
        expected,
        layer.base,
        snapshot,
        slots,
        ranks,
        offsets,
        dtype,
        False,
        report,
    )
    eager_out = layer.base.clone()
    call(at, "eager run_lora", eager.run_lora, layer.x, layer.A, layer.B, eager_out, offsets)
    check_close(
        f"{at}, replay against an eager run of the same step",
        layer.out,
        eager_out,
        layer.base,
        slots,
        ranks,
        offsets,
        dtype,
        False,
    )
    if layer.fused:
        N = layer.base.shape[1]
        expected = expand_reference(layer.y[:, N:], layer.B, layer.y_base, offsets, slots, ranks, scalings, R)
        check_result(
            f"{at}, path run_lora(shrunk=x @ A_all^T)",
            "graph_capture",
            layer.y[:, :N],
            expected,
            layer.y_base,
            snapshot,
            slots,
            ranks,
            offsets,
            dtype,
            False,
            report,
        )
