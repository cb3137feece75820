"""The steps :func:`~loraserve.testing.check_backend` runs: ``BackendCase`` and its seeded random inputs.

A case is one forward step (segments, the slot of each, the pool's ranks) and the projections
run on it after a single ``prepare``, as the layers of a model do. Its tensors are drawn fresh from
a generator seeded by the kit's seed, the case's name and the dtype, so a failure reproduces from
its message alone. A and B hold NaN past each slot's rank (or, without ``nan_padding``, large finite
garbage): the contract leaves those entries unspecified, so none of it may reach the output.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

import torch

from loraserve.contract import LoRABatchInfo

PADDING_SCALE = 64.0  # garbage past a slot's rank: large enough to show if read, small enough for fp16


@dataclass(frozen=True)
class Projection:
    """One LoRA layer of a step: ``x`` has ``in_dim`` columns, the output is cut at ``output_offsets``
    (1 slice: a plain projection; 2: gate_up; 3: qkv, possibly of unequal widths)."""

    name: str
    in_dim: int
    output_offsets: tuple[int, ...]

    @property
    def n_slices(self) -> int:
        return len(self.output_offsets) - 1

    def __str__(self) -> str:
        return f"{self.name} (in_dim {self.in_dim}, output_offsets {self.output_offsets})"


def plain(in_dim: int, out_dim: int) -> Projection:
    return Projection("plain", in_dim, (0, out_dim))


def gate_up(in_dim: int, width: int) -> Projection:
    return Projection("gate_up", in_dim, (0, width, 2 * width))


def qkv(in_dim: int, q: int, kv: int) -> Projection:
    return Projection("qkv", in_dim, (0, q, q + kv, q + 2 * kv))


@dataclass(frozen=True)
class BackendCase:
    """One step: ``seg_lens[i]`` tokens of segment ``i`` use slot ``seg_slot[i]``; slot ``s`` has rank
    ``ranks[s]`` (0: the base model) of the pool's capacity ``max_rank`` and scaling ``scalings[s]``
    (drawn from the seed, away from 1, when None); ``projections`` run in order after one prepare.
    With ``null_slot`` the last slot is the *null* slot past the pool's last (rank 0, no rows in A or
    B), which only the padding rows of a captured decode step use (graph-capturable backends only)."""

    name: str
    seg_lens: tuple[int, ...]
    seg_slot: tuple[int, ...]
    ranks: tuple[int, ...]
    max_rank: int
    projections: tuple[Projection, ...]
    scalings: tuple[float, ...] | None = None
    null_slot: bool = False

    def __post_init__(self) -> None:
        if self.null_slot and self.ranks[-1] != 0:
            raise ValueError(f"case {self.name!r}: the null slot (the last) must have rank 0, not {self.ranks[-1]}")

    @property
    def pool_slots(self) -> int:
        """Slots with rows in A and B (all but the null slot)."""
        return len(self.ranks) - self.null_slot

    @property
    def num_tokens(self) -> int:
        return sum(self.seg_lens)

    def token_slots(self) -> list[int]:
        return [s for s, n in zip(self.seg_slot, self.seg_lens) for _ in range(n)]

    def describe(self, scalings: list[float] | None = None) -> str:
        scalings = scalings if scalings is not None else self.scalings
        text = (
            f"case {self.name!r}: {self.num_tokens} tokens in segments {list(self.seg_lens)} on slots "
            f"{list(self.seg_slot)}; slot ranks {list(self.ranks)} (capacity {self.max_rank})"
        )
        if self.null_slot:
            text += f", slot {len(self.ranks) - 1} the null slot past the pool's {self.pool_slots}"
        if scalings is not None:
            text += f", scalings [{', '.join(f'{s:.3g}' for s in scalings)}]"
        return text


def default_cases(seed: int = 0, n_random: int = 2) -> list[BackendCase]:
    """The kit's cases: odd sizes picked by hand (1 token, 5 tokens, rank 3, rank-0 slots, every row
    on the base model, 1/2/3 slices with unequal qkv widths, a slot in several segments, three
    layers on one prepare, a decode step padded onto the null slot), then ``n_random`` seeded
    random steps."""
    cases = [
        BackendCase("one token, rank 5 of capacity 8", (1,), (0,), (5, 0), 8, (plain(40, 33),)),
        BackendCase("one token on a rank-0 slot", (1,), (1,), (2, 0), 4, (plain(24, 20),)),
        BackendCase("5 tokens, rank 3, base rows", (2, 3), (0, 1), (0, 3), 4, (plain(72, 72),)),
        BackendCase(
            "gate_up, mixed slots in many segments",
            (1, 1, 3, 1, 2, 4),
            (2, 0, 1, 2, 3, 1),
            (3, 0, 4, 2),
            4,
            (gate_up(20, 18),),
        ),
        BackendCase(
            "qkv of unequal slices, a slot in two segments",
            (3, 1, 6, 2),
            (1, 2, 0, 1),
            (7, 0, 1, 8),
            8,
            (qkv(24, 16, 8),),
        ),
        BackendCase("every row on a rank-0 slot", (2, 1), (0, 1), (0, 0), 4, (gate_up(16, 12),)),
        BackendCase(
            "three layers on one prepare", (2, 4), (1, 0), (3, 6), 8, (plain(28, 28), qkv(28, 12, 4), gate_up(28, 20))
        ),
        BackendCase(
            "decode step padded with null-slot rows",
            (1,) * 5,
            (1, 3, 0, 3, 3),
            (2, 4, 0, 0),
            4,
            (gate_up(20, 12),),
            null_slot=True,
        ),
    ]
    return cases + random_cases(n_random, seed)


def random_cases(n: int, seed: int = 0) -> list[BackendCase]:
    """``n`` seeded random steps: 1 to 12 tokens in 1 to 4 segments over 2 to 4 slots (one of rank 0
    at least half the time), capacity 4 or 8, one projection of 1, 2 or 3 slices with odd widths."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        n_slots, R = rng.randint(2, 4), rng.choice((4, 8))
        ranks = [rng.randint(1, R) for _ in range(n_slots)]
        if rng.random() < 0.5:
            ranks[rng.randrange(n_slots)] = 0
        n_segs = rng.randint(1, 4)
        seg_lens = [rng.randint(1, 4) for _ in range(n_segs)]
        seg_slot = [rng.randrange(n_slots) for _ in range(n_segs)]
        in_dim = rng.randint(3, 40)
        kind = rng.choice(("plain", "gate_up", "qkv"))
        proj = (
            plain(in_dim, rng.randint(3, 40))
            if kind == "plain"
            else gate_up(in_dim, rng.randint(3, 20))
            if kind == "gate_up"
            else qkv(in_dim, rng.randint(4, 24), rng.randint(2, 12))
        )
        cases.append(BackendCase(f"random {seed}/{i}", tuple(seg_lens), tuple(seg_slot), tuple(ranks), R, (proj,)))
    return cases


def generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU generator seeded by ``seed`` and a description, so each case draws its own stream."""
    return torch.Generator().manual_seed(zlib.crc32(" ".join(map(str, (seed, *parts))).encode()))


def random_scalings(n: int, gen: torch.Generator) -> list[float]:
    """``n`` scalings in [0.25, 0.75] or [1.5, 3], never near 1, so a backend that ignores them shows."""
    u = torch.rand(n, generator=gen).tolist()
    return [0.25 + v / 2 if i % 2 else 1.5 + 1.5 * v for i, v in enumerate(u)]


def draw_scalings(case: BackendCase, gen: torch.Generator) -> list[float]:
    """The case's scalings, or :func:`random_scalings` when it has none."""
    if case.scalings is None:
        return random_scalings(len(case.ranks), gen)
    if len(case.scalings) != len(case.ranks):
        raise ValueError(f"case {case.name!r} has {len(case.scalings)} scalings for {len(case.ranks)} slots")
    return list(case.scalings)


def batch_info(case: BackendCase, scalings: list[float], device: torch.device) -> LoRABatchInfo:
    return LoRABatchInfo.build(
        list(case.seg_lens), list(case.seg_slot), list(case.ranks), scalings, case.max_rank, device=device
    )


def fill_padding(t: torch.Tensor, gen: torch.Generator, nan: bool) -> None:
    """Overwrite ``t`` (a padding region) with NaN or large finite garbage."""
    if t.numel():
        t.copy_(torch.full_like(t, float("nan")) if nan else torch.randn(t.shape, generator=gen) * PADDING_SCALE)


def draw_projection(
    case: BackendCase,
    proj: Projection,
    gen: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
    nan_padding: bool,
) -> tuple[torch.Tensor, ...]:
    """``x [T, in]``, ``A [slots, S*R, in]``, ``B [slots, out, R]``, ``base [T, out]`` for one projection,
    with garbage past each slot's rank in A's rows and B's columns."""
    T, K, N, S, R = case.num_tokens, proj.in_dim, proj.output_offsets[-1], proj.n_slices, case.max_rank
    n_slots = case.pool_slots
    x = torch.randn(T, K, generator=gen)
    A = torch.randn(n_slots, S * R, K, generator=gen) / K**0.5
    B = torch.randn(n_slots, N, R, generator=gen) / 2
    base = torch.randn(T, N, generator=gen)
    for s, r in enumerate(case.ranks[:n_slots]):
        for i in range(S):
            fill_padding(A[s, i * R + r : (i + 1) * R], gen, nan_padding)
        fill_padding(B[s, :, r:], gen, nan_padding)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, A, B, base))


def draw_embedding(
    case: BackendCase,
    gen: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
    nan_padding: bool,
    vocab: int = 37,
    hidden: int = 19,
) -> tuple[torch.Tensor, ...]:
    """``input_ids [T]``, ``A [slots, R, vocab]``, ``B [slots, hidden, R]`` (PEFT's layout), ``base [T, hidden]``."""
    T, R, n_slots = case.num_tokens, case.max_rank, case.pool_slots
    ids = torch.randint(0, vocab, (T,), generator=gen)
    A = torch.randn(n_slots, R, vocab, generator=gen)
    B = torch.randn(n_slots, hidden, R, generator=gen) / 2
    base = torch.randn(T, hidden, generator=gen)
    for s, r in enumerate(case.ranks[:n_slots]):
        fill_padding(A[s, r:], gen, nan_padding)
        fill_padding(B[s, :, r:], gen, nan_padding)
    return (ids.to(device),) + tuple(t.to(device=device, dtype=dtype) for t in (A, B, base))
