"""The one-launch prepare kernels' checks (run through :func:`loraserve.kernel_checks.one_launch_ok`).

Each step's ``prepare`` of the tiled backends is one Triton program where it used to be a few dozen
tensor operations: csgmv's grouping and tile table (``backend_csgmv/prepare_kernel.py``) and SGMV's
per-segment tile table (``tile_kernel.py``). Those programs are compared with the tensor operations
on random steps under the interpreter and on the GPUs we test on; a device, driver or Triton version
we have not seen could still fail to compile one, or compile it wrongly, and that would fail or
corrupt every LoRA step. So a backend checks each when it is built (on its device, before warm-up
and graph capture), against the tensor operations on the random steps below (exactly: they are
integer tables). A kernel that fails to compile or disagrees is logged and the backend keeps the
tensor operations (their cost: about 60-90 us more per step on an H100); nothing else changes.
``LORASERVE_ONE_LAUNCH_KERNELS=0`` skips the kernels (and their checks) altogether.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from loraserve.contract import LoRABatchInfo

#: ``(segments, slots)`` of the checked steps: past one 64-wide chunk of segments, and pools of 1 to
#: 255 slots (every width of csgmv's slot one-hot the kernel compiles: 2 to 256)
SHAPES = ((1, 1), (5, 3), (70, 9), (20, 20), (12, 40), (12, 100), (8, 200))


def random_steps(device: torch.device, seed: int) -> list[LoRABatchInfo]:
    """Small random steps on ``device`` (:data:`SHAPES`): one-token (decode) and longer segments,
    rank-0 slots (the base model) and slots no segment uses."""
    rng = random.Random(seed)
    steps = []
    for n_segs, n_slots in SHAPES:
        seg_lens = [rng.choice([1, 1, 1, 2, 17, 40]) for _ in range(n_segs)]
        ranks = [rng.choice([0, 8, 16]) for _ in range(n_slots)]
        seg_slot = [rng.randrange(n_slots) for _ in range(n_segs)]
        steps.append(LoRABatchInfo.build(seg_lens, seg_slot, ranks, [1.0] * n_slots, 16, device=device))
    return steps


def first_difference(name: str, got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> str | None:
    """None if every tensor of ``got`` equals ``want``'s (compared as int64), else which one differed."""
    for i, (a, b) in enumerate(zip(got, want)):
        if a.shape != b.shape or not torch.equal(a.long(), b.long()):
            return f"{name}: output {i} differs from the tensor operations'"
    return None
