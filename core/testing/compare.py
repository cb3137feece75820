"""How the conformance kit compares a backend's output with the oracle, and what it says when they differ.

A tensor a backend may not modify is snapshotted and compared bit for bit (NaN included); rows of
rank-0 slots are compared bit for bit with the base output; everything else within the dtype's
tolerance, the message naming the worst element's token, slot, rank, column and slice. An exception
raised by the code under test becomes an AssertionError that names the case, so a test of the kit
fails the same way whatever went wrong.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import torch

from loraserve.contract import shrunk_columns
from loraserve.testing.report import ConformanceReport

#: per dtype, how far a backend may be from backend_torch (both sum in float32 and round once)
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-4),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def expand_reference(
    shrunk: torch.Tensor,
    B: torch.Tensor,
    base: torch.Tensor,
    output_offsets: Sequence[int],
    token_slots: list[int],
    ranks: list[int],
    scalings: list[float],
    R: int,
) -> torch.Tensor:
    """The contract's expand of a given ``shrunk``: ``base + scaling * shrunk[t, slot's slice i, :r] @
    B[slot, slice i, :r]^T`` in float32, rounded to the dtype once (as backend_torch rounds)."""
    out = base.clone()
    S = len(output_offsets) - 1
    slot_of = torch.tensor(token_slots, dtype=torch.long)
    for s in sorted(set(token_slots)):
        r = ranks[s]
        if r == 0:
            continue
        rows = (slot_of == s).nonzero().flatten().to(base.device)
        for i in range(S):
            lo, hi = output_offsets[i], output_offsets[i + 1]
            first = shrunk_columns(s, S, R).start + i * R
            h = shrunk[rows, first : first + r].float()
            delta = (h @ B[s, lo:hi, :r].float().T) * scalings[s]
            out[rows, lo:hi] = (base[rows, lo:hi].float() + delta).to(base.dtype)
    return out


def call(where: str, what: str, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``; an exception from the code under test becomes an AssertionError naming the case."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # the plugin's own error, whatever it is, is the finding
        raise AssertionError(f"{where}: {what} raised {type(exc).__name__}: {exc}") from exc


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as integers of its element size, so NaN compares equal to the same NaN."""
    return t if not t.is_floating_point() else t.view(_SAME_SIZE_INT[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` have the same shape, dtype and bits (NaN included)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


class Snapshot:
    """Copies of the inputs a backend may not modify, compared bit for bit afterwards."""

    def __init__(self, **tensors: torch.Tensor):
        self.tensors = {name: (t, t.clone()) for name, t in tensors.items()}

    def changed(self) -> list[str]:
        return [name for name, (t, copy) in self.tensors.items() if not same_bits(t, copy)]


def check_result(
    at: str,
    check: str,
    out: torch.Tensor,
    expected: torch.Tensor,
    base: torch.Tensor,
    kept: Snapshot,
    token_slots: list[int],
    ranks: list[int],
    offsets: Sequence[int],
    dtype: torch.dtype,
    nan_padding: bool,
    report: ConformanceReport,
) -> None:
    """Inputs untouched, rank-0 rows bit-identical, ``out`` close to ``expected``; each counted in
    ``report`` (the last as ``check``), or an AssertionError that starts with ``at``."""
    changed = kept.changed()
    if changed:
        raise AssertionError(
            f"{at}: modified its input{'s' if len(changed) > 1 else ''} {', '.join(changed)} (inputs are read only)"
        )
    report.passed("inputs_unchanged")
    base_rows = [t for t, s in enumerate(token_slots) if ranks[s] == 0]
    moved = [t for t in base_rows if not same_bits(out[t], base[t])]
    if moved:
        t = moved[0]
        col = int((_bits(out[t]) != _bits(base[t])).nonzero()[0])
        raise AssertionError(
            f"{at}: rows of rank-0 slots must be left bit-identical, but token row(s) {moved} changed; "
            f"first at token {t} (slot {token_slots[t]}, rank 0) column {col}: "
            f"{base[t, col].item()!r} -> {out[t, col].item()!r}"
        )
    if base_rows:
        report.passed("rank0_rows")
    check_close(at, out, expected, base, token_slots, ranks, offsets, dtype, nan_padding)
    report.passed(check)


def check_close(
    at: str,
    out: torch.Tensor,
    expected: torch.Tensor,
    base: torch.Tensor,
    token_slots: list[int],
    ranks: list[int],
    offsets: Sequence[int],
    dtype: torch.dtype,
    nan_padding: bool,
) -> None:
    """``out`` within the dtype's tolerance of ``expected``, or an AssertionError naming the worst element."""
    tol = TOLERANCES[dtype]
    got, want = out.double(), expected.double()
    excess = (got - want).abs() - (tol["atol"] + tol["rtol"] * want.abs())
    excess = torch.where(got.isnan() & ~want.isnan(), torch.inf, excess)
    bad = excess > 0
    if not bad.any():
        return
    n_cols = out.shape[1]
    worst = int(excess.flatten().argmax())
    t, col = divmod(worst, n_cols)
    s = token_slots[t]
    piece = bisect.bisect_right(list(offsets), col) - 1
    lora_rows = [r for r, slot in enumerate(token_slots) if ranks[slot] > 0]
    hints = []
    if got.isnan().any():
        hints.append(
            "NaN in the output"
            + (" (A and B past each slot's rank hold NaN: was that padding read?)" if nan_padding else "")
        )
    if lora_rows and all(same_bits(out[r], base[r]) for r in lora_rows):
        hints.append("no LoRA row changed at all: is the delta added into base_out in place?")
    raise AssertionError(
        f"{at}: output differs from the oracle in {int(bad.sum())} of {bad.numel()} elements "
        f"(rtol {tol['rtol']}, atol {tol['atol']}); worst at token {t} (slot {s}, rank {ranks[s]}) column {col} "
        f"(slice {piece}): got {out[t, col].item()!r}, expected {expected[t, col].item()!r}, "
        f"base {base[t, col].item()!r}" + (f"; {'; '.join(hints)}" if hints else "")
    )
