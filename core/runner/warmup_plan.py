"""Which steps the warm-up runs: one per compiled-kernel variant the scheduler's steps can need.

Triton compiles a kernel for each combination of its constexprs (and of the arguments it
specialises on; the kernels mark the per-step sizes ``do_not_specialize``). What still varies from
step to step is decided by a few host integers:

- the attention's decode kernel is compiled per number of splits, ``splits_for(n)`` of the step's
  ``n`` one-token sequences (1 to ``max_running``; 1-token rows also occur in mixed steps and in
  steps the CUDA graphs do not take), and the prefill kernel once;
- with LoRA, the backend's key of ``(tokens, segments)`` (``variant_keys``: tile height,
  permutation, per projection shrink inside the base GEMM, epilogue or split-k), plus the fused
  kernels' LoRA variants that follow from the same decisions;
- steps without LoRA (the base model alone, or LoRA off) take the fused kernels without it.

:func:`plan_warmup` covers every ``(tokens, segments)`` the scheduler can produce within
:class:`StepLimits` and keeps the shape with the fewest tokens of each key, so a step of any shape
at run time finds its kernels compiled. It bisects instead of trying every pair, which is exact for
keys that change monotonically along the bisected axis (equal keys at both ends of an interval
mean one key throughout): at each token count up to ``DENSE_TOKENS`` it bisects the segment count
(more segments, more tiles, less split-k); above, where no decision depends on the token count
alone, it bisects the token count at each segment count (tiles-per-segment classes and tile
counts only grow with it). Pure host code: the plan is tested on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

#: token counts up to this are enumerated one by one (the LoRA backends' thresholds on the step's
#: token count alone, e.g. shrink inside the GEMM and the epilogue, lie below it; a test keeps it so)
DENSE_TOKENS = 512

#: ``lora_key(num_tokens, num_segments)``: equal keys compile the same LoRA kernel variants
LoRAKey = Callable[[int, int], Hashable]


@dataclass(frozen=True)
class StepLimits:
    """The largest steps the scheduler may produce.

    :ivar max_running: most sequences in a step (``--max-running-requests``).
    :ivar step_tokens: most tokens in a step (``--max-prefill-tokens``, at most the KV cache).
    :ivar max_chunk: longest chunk of one sequence (``--chunked-prefill-size``, at most the context).
    """

    max_running: int
    step_tokens: int
    max_chunk: int

    def __post_init__(self) -> None:
        for name in ("max_running", "step_tokens", "max_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} is {getattr(self, name)}; it must be at least 1")

    def within(self, kv_tokens: int) -> StepLimits:
        """These limits with a KV cache of ``kv_tokens`` tokens: a step's new tokens fit in it."""
        return StepLimits(self.max_running, min(self.step_tokens, kv_tokens), min(self.max_chunk, kv_tokens))

    def segments_for(self, num_tokens: int) -> range:
        """The segment counts a step of ``num_tokens`` tokens can have (empty when none)."""
        lo = -(-num_tokens // self.max_chunk)
        return range(lo, min(num_tokens, self.max_running) + 1)


@dataclass(frozen=True)
class StepShape:
    """A synthetic step: one chunk per sequence, each starting at position 0.

    :ivar seg_lens: tokens of each sequence (1: a decode-like row).
    :ivar lora: whether the step's rows use an adapter.
    """

    seg_lens: tuple[int, ...]
    lora: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(self.seg_lens)

    @property
    def num_segments(self) -> int:
        return len(self.seg_lens)

    @property
    def num_decode(self) -> int:
        return sum(1 for n in self.seg_lens if n == 1)


def even_split(num_tokens: int, num_segments: int) -> tuple[int, ...]:
    """``num_tokens`` in ``num_segments`` chunks as equal as possible (longest first)."""
    if not 1 <= num_segments <= num_tokens:
        raise ValueError(f"{num_tokens} tokens cannot fill {num_segments} segments")
    q, r = divmod(num_tokens, num_segments)
    return (q + 1,) * r + (q,) * (num_segments - r)


def attention_shapes(limits: StepLimits, splits_for: Callable[[int], int] | None) -> list[StepShape]:
    """Steps without LoRA that take every attention variant: for each decode split count of
    ``splits_for`` (None: attention without variants per batch), the fewest decode rows that give
    it, next to a prefill chunk where the batch leaves room; and one prefill step."""
    shapes = []
    prefill = min(limits.max_chunk, limits.step_tokens, 2 * 16 + 1)  # spans several KV blocks
    if prefill >= 2:
        shapes.append(StepShape((prefill,)))
    seen: set[int] = set()
    for n in range(1, min(limits.max_running, limits.step_tokens) + 1):
        splits = splits_for(n) if splits_for is not None else 1
        if splits in seen:
            continue
        seen.add(splits)
        room = limits.step_tokens - n
        tail = (min(prefill, room),) if n < limits.max_running and min(prefill, room) >= 2 else ()
        shapes.append(StepShape((1,) * n + tail))
    return shapes


def lora_shapes(limits: StepLimits, key: LoRAKey) -> list[StepShape]:
    """One step with LoRA per distinct ``key`` over every ``(tokens, segments)`` the limits allow,
    the one with the fewest tokens (then segments)."""
    chosen: dict[Hashable, tuple[int, int]] = {}

    def take(t: int, s: int) -> None:
        k = key(t, s)
        if k not in chosen or (t, s) < chosen[k]:
            chosen[k] = (t, s)

    for t in range(1, min(limits.step_tokens, DENSE_TOKENS) + 1):  # every count, bisecting the segments
        segs = limits.segments_for(t)
        for s in _key_changes(lambda s, t=t: key(t, s), segs.start, segs.stop - 1) if segs else ():
            take(t, s)
    for s in range(1, limits.max_running + 1):  # above: every segment count, bisecting the tokens
        lo, hi = max(DENSE_TOKENS + 1, s), min(limits.step_tokens, s * limits.max_chunk)
        for t in _key_changes(lambda t, s=s: key(t, s), lo, hi) if lo <= hi else ():
            take(t, s)
    return [StepShape(even_split(t, s), lora=True) for t, s in sorted(chosen.values())]


def _key_changes(key: Callable[[int], Hashable], lo: int, hi: int) -> list[int]:
    """Points of ``[lo, hi]`` that together take every value of ``key`` there, each the first of
    its value, assuming that equal keys at both ends of an interval mean the same key throughout."""
    points = [lo]
    stack = [(lo, key(lo), hi, key(hi))]
    while stack:
        a, ka, b, kb = stack.pop()
        if ka == kb or b - a <= 1:
            if ka != kb:
                points.append(b)
            continue
        mid = (a + b) // 2
        km = key(mid)
        stack.append((mid, km, b, kb))
        stack.append((a, ka, mid, km))
    return sorted(set(points))


def plan_warmup(
    limits: StepLimits, splits_for: Callable[[int], int] | None = None, lora_key: LoRAKey | None = None
) -> list[StepShape]:
    """Every step the warm-up runs: :func:`attention_shapes` (which also run the kernels without
    LoRA), then, with LoRA on, :func:`lora_shapes`."""
    shapes = attention_shapes(limits, splits_for)
    if lora_key is not None:
        shapes += lora_shapes(limits, lora_key)
    return shapes


def coarse_lora_key(num_tokens: int, num_segments: int) -> Hashable:
    """A LoRA key for backends that state none (their variants are unknown): powers of two of the
    tokens up to 1024 and of the tokens per segment up to 16, a few dozen steps at most."""
    return min(num_tokens.bit_length(), 11), min((num_tokens // num_segments).bit_length(), 5)
