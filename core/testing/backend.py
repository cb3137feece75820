"""``check_backend``: a LoRA kernel backend against the ``LoRABackend`` contract, backend_torch the oracle.

Every case (see :mod:`loraserve.testing.cases`) is one step: one ``prepare``, then ``run_lora`` for
each of its projections, compared with :class:`~loraserve.plugins.backend_torch.backend.TorchLoRABackend`
on the same inputs. Backends with ``supports_shrink_in_gemm`` also get ``shrunk`` (laid out as the
contract says, as a column view of a wider GEMM output) and are compared with the contract's expand
of that very ``shrunk``; an epilogue handed out by ``expand_epilogue`` is applied with
:meth:`LoRAEpilogue.apply_` and compared the same way; backends with ``supports_embedding`` run
``run_lora_embedding``. The CUDA graph check lives in :mod:`loraserve.testing.graph`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from loraserve.contract import LoRABackend, LoRAEpilogue
from loraserve.plugins.backend_torch.backend import TorchLoRABackend
from loraserve.testing import cases as C
from loraserve.testing.compare import TOLERANCES, Snapshot, call, check_result, expand_reference
from loraserve.testing.graph import check_graph_capture
from loraserve.testing.report import ConformanceReport

BACKEND_CHECKS = {
    "run_lora": "run_lora's output matches backend_torch within the dtype's tolerance",
    "rank0_rows": "rows of rank-0 slots are left bit-identical",
    "inputs_unchanged": "x, A, B (and shrunk, input_ids) are never modified",
    "padding_ignored": "what A and B hold past a slot's rank never reaches the output",
    "one_token": "a step of num_tokens == 1 (prepare and every path) works",
    "null_slot": "padding rows on the null slot past the pool's last (rank 0, no A/B rows) are left alone",
    "steps_in_sequence": "one backend runs every case in turn: each prepare replaces the last step's state",
    "shrunk": "run_lora(..., shrunk=x @ A_all^T) runs only the expand and matches the contract's sum",
    "epilogue": "an epilogue from expand_epilogue, applied eagerly (LoRAEpilogue.apply_), matches",
    "embedding": "run_lora_embedding matches backend_torch",
    "graph_capture": "prepare + run_lora captured in a CUDA graph, buffers refilled, replays match eager",
}


def check_backend(
    make_backend: Callable[[torch.device], LoRABackend],
    *,
    device: torch.device | str = "cpu",
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float16),
    seed: int = 0,
    cases: Sequence[C.BackendCase] | None = None,
    nan_padding: bool = True,
    graph: bool = True,
) -> ConformanceReport:
    """Check a LoRA backend against the ``LoRABackend`` contract; raise AssertionError on a violation.

    :param make_backend: ``make_backend(device)`` returns a fresh backend. One backend runs every
        case and dtype in turn (so state left by one step must not leak into the next); the CUDA
        graph check makes its own.
    :param device: where the tensors live. On CPU the Triton backends need ``TRITON_INTERPRET=1``
        (float32 and float16 only: the interpreter's bfloat16 is wrong).
    :param dtypes: the activation and weight dtypes to run, each of float32, float16, bfloat16.
    :param seed: seeds every random input and the random cases; a failure names the case and dtype.
    :param cases: the steps to run (default: :func:`~loraserve.testing.cases.default_cases` of ``seed``).
    :param nan_padding: fill A and B past each slot's rank with NaN (the default: the contract leaves
        those entries unspecified and says they must never be read into a result, and a backend that
        masks the rank by multiplying with 0 turns NaN into NaN); False fills them with large finite
        garbage instead, which shows a backend that reads them but not one that multiplies them by 0.
    :param graph: on a CUDA device, for a ``graph_capturable`` backend, run the graph-capture check.
    :return: a :class:`ConformanceReport` of the checks that ran and those skipped, with why.
    """
    device = torch.device(device)
    for dtype in dtypes:
        if dtype not in TOLERANCES:
            raise ValueError(f"dtype {dtype} is not one of {', '.join(map(str, TOLERANCES))}")
    cases = list(cases) if cases is not None else C.default_cases(seed)
    backend = call(f"make_backend({device})", "make_backend", make_backend, device)
    name = getattr(backend, "name", type(backend).__name__)
    report = ConformanceReport(f"backend {name!r} on {device}", dict(BACKEND_CHECKS))
    steps = 0
    for dtype in dtypes:
        for case in cases:
            steps += _check_step(backend, name, case, dtype, device, seed, nan_padding, report)
    if steps > 1:
        report.passed("steps_in_sequence", steps - 1)
    if not backend.supports_shrink_in_gemm:
        report.skip("shrunk", "supports_shrink_in_gemm is False")
        report.skip("epilogue", "supports_shrink_in_gemm is False (an epilogue needs the GEMM's shrink)")
    else:
        report.skip("epilogue", "expand_epilogue returned None for every projection")
    if not backend.supports_embedding:
        report.skip("embedding", "supports_embedding is False")
    report.skip("padding_ignored", "every slot of every case is at full capacity")
    if not graph:
        report.skip("graph_capture", "graph=False")
    elif device.type != "cuda":
        report.skip("graph_capture", f"needs a CUDA device, not {device.type!r}")
    elif not backend.graph_capturable:
        report.skip("graph_capture", "graph_capturable is False")
    else:
        for dtype in dtypes:
            check_graph_capture(make_backend, device, dtype, seed, report)
    return report.finish()


def _check_step(
    backend: LoRABackend,
    name: str,
    case: C.BackendCase,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    nan_padding: bool,
    report: ConformanceReport,
) -> bool:
    """One step of ``case`` in ``dtype``; False if the case does not apply to this backend."""
    if case.null_slot and not backend.graph_capturable:
        report.skip("null_slot", "only captured decode steps use the null slot, and graph_capturable is False")
        return False
    gen = C.generator(seed, case.name, dtype)
    scalings = C.draw_scalings(case, gen)
    where = f"backend {name!r}, {case.describe(scalings)}, dtype {dtype}"
    info = C.batch_info(case, scalings, device)
    oracle = TorchLoRABackend(device)
    oracle.prepare(info)
    call(where, "prepare", backend.prepare, info)
    slots, ranks, R = case.token_slots(), list(case.ranks), case.max_rank
    has_padding = any(r < R for r in ranks)
    for proj in case.projections:
        at = f"{where}, projection {proj}"
        x, A, B, base = C.draw_projection(case, proj, gen, dtype, device, nan_padding)
        expected = base.clone()
        oracle.run_lora(x, A, B, expected, proj.output_offsets)
        out = base.clone()
        kept = Snapshot(x=x, A=A, B=B)
        call(at, "run_lora", backend.run_lora, x, A, B, out, proj.output_offsets)
        check_result(
            f"{at}, path run_lora",
            "run_lora",
            out,
            expected,
            base,
            kept,
            slots,
            ranks,
            proj.output_offsets,
            dtype,
            nan_padding,
            report,
        )
        if has_padding:
            report.passed("padding_ignored")
        if backend.supports_shrink_in_gemm:
            _check_shrunk(backend, at, x, A, B, base, slots, ranks, scalings, R, proj, dtype, nan_padding, report)
    if backend.supports_embedding:
        _check_embedding(backend, oracle, where, case, gen, dtype, device, slots, ranks, nan_padding, report)
    if case.num_tokens == 1:
        report.passed("one_token")
    if case.null_slot:
        report.passed("null_slot")
    return True


def _check_embedding(
    backend: LoRABackend,
    oracle: TorchLoRABackend,
    where: str,
    case: C.BackendCase,
    gen: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
    slots: list[int],
    ranks: list[int],
    nan_padding: bool,
    report: ConformanceReport,
) -> None:
    """``run_lora_embedding`` of the step against the oracle's."""
    ids, A, B, base = C.draw_embedding(case, gen, dtype, device, nan_padding)
    expected = base.clone()
    oracle.run_lora_embedding(ids, A, B, expected)
    out = base.clone()
    kept = Snapshot(input_ids=ids, A=A, B=B)
    call(where, "run_lora_embedding", backend.run_lora_embedding, ids, A, B, out)
    check_result(
        f"{where}, path run_lora_embedding (vocab {A.shape[2]}, hidden {B.shape[1]})",
        "embedding",
        out,
        expected,
        base,
        kept,
        slots,
        ranks,
        (0, B.shape[1]),
        dtype,
        nan_padding,
        report,
    )


def _check_shrunk(
    backend: LoRABackend,
    at: str,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    base: torch.Tensor,
    slots: list[int],
    ranks: list[int],
    scalings: list[float],
    R: int,
    proj: C.Projection,
    dtype: torch.dtype,
    nan_padding: bool,
    report: ConformanceReport,
) -> None:
    """``shrunk`` as the base GEMM over ``[W; A of every slot]`` leaves it: the output's columns and then
    ``x @ A_all^T`` (slot ``s``'s columns at ``s * n_slices * R``), rounded to the dtype, one row stride."""
    T, N = base.shape
    width = A.shape[0] * A.shape[1]
    y = torch.empty(T, N + width, dtype=dtype, device=base.device)
    y[:, :N] = base
    y[:, N:] = (x.float() @ A.reshape(width, -1).float().T).to(dtype)
    out, shrunk = y[:, :N], y[:, N:]
    expected = expand_reference(shrunk, B, base, proj.output_offsets, slots, ranks, scalings, R)
    kept = Snapshot(x=x, A=A, B=B, shrunk=shrunk)
    call(at, "run_lora(shrunk=...)", backend.run_lora, x, A, B, out, proj.output_offsets, shrunk=shrunk)
    check_result(
        f"{at}, path run_lora(shrunk=x @ A_all^T)",
        "shrunk",
        out,
        expected,
        base,
        kept,
        slots,
        ranks,
        proj.output_offsets,
        dtype,
        nan_padding,
        report,
    )
    _check_epilogue(backend, at, B, base, shrunk, expected, kept, slots, ranks, proj, dtype, nan_padding, report)


def _check_epilogue(
    backend: LoRABackend,
    at: str,
    B: torch.Tensor,
    base: torch.Tensor,
    shrunk: torch.Tensor,
    expected: torch.Tensor,
    kept: Snapshot,
    slots: list[int],
    ranks: list[int],
    proj: C.Projection,
    dtype: torch.dtype,
    nan_padding: bool,
    report: ConformanceReport,
) -> None:
    """The epilogue ``expand_epilogue`` hands out for ``shrunk`` (if any), applied eagerly."""
    epilogue = call(at, "expand_epilogue", backend.expand_epilogue, B, proj.output_offsets, shrunk)
    if epilogue is None:
        return
    if not isinstance(epilogue, LoRAEpilogue):
        raise AssertionError(f"{at}: expand_epilogue returned {type(epilogue).__name__}, not a LoRAEpilogue or None")
    applied = base.clone()
    call(at, "LoRAEpilogue.apply_", epilogue.apply_, applied)
    check_result(
        f"{at}, path expand_epilogue + LoRAEpilogue.apply_",
        "epilogue",
        applied,
        expected,
        base,
        kept,
        slots,
        ranks,
        proj.output_offsets,
        dtype,
        nan_padding,
        report,
    )
