"""The one-launch prepare kernels, checked on each device before a backend relies on them.

Each step's ``prepare`` of the tiled backends is one Triton program where it used to be a few dozen
tensor operations: csgmv's grouping and tile table (``backend_csgmv/prepare_kernel.py``) and SGMV's
per-segment tile table (``tile_kernel.py``). Those programs are compared with the tensor operations
on random steps under the interpreter and on the GPUs we test on; a device, driver or Triton version
we have not seen could still fail to compile one, or compile it wrongly, and that would fail or
corrupt every LoRA step. So a backend runs :func:`one_launch_ok` when it is built (on its device,
before warm-up and graph capture): each kernel is compared once per process and device with the
tensor operations on a few random steps (exactly: they are integer tables). If the kernel fails to
compile or disagrees, a warning names it and the error, and the backend keeps the tensor operations
(their cost: about 60-90 us more per step on an H100); nothing else changes. (A kernel that faults
the device, an illegal address say, cannot be recovered from inside the process; the GPU tests of
``tests/test_kernels.py`` are what catch that.)

``LORASERVE_ONE_LAUNCH_PREPARE=0`` skips the kernels (and their checks) altogether.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Sequence

import torch

from loraserve.contract import LoRABatchInfo

logger = logging.getLogger("loraserve.lora")

ENV = "LORASERVE_ONE_LAUNCH_PREPARE"
_VERDICTS: dict[tuple[str, str], bool] = {}


def one_launch_ok(name: str, device: torch.device, check: Callable[[torch.device], str | None]) -> bool:
    """Whether the one-launch kernel ``name`` may be used on ``device``: ``check(device)`` returns None
    when the kernel's results equal the tensor operations', else what differed; an exception (a
    compile error, say) counts as a failure. Run once per process and device; a failure is logged."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    key = (name, str(device))
    if key not in _VERDICTS:
        try:
            problem = check(device)
        except Exception as exc:  # noqa: BLE001 - any failure means: do not use the kernel
            problem = f"{type(exc).__name__}: {str(exc)[:500]}"
        if problem:
            logger.warning(
                "the one-launch %s kernel failed its check on %s (%s); this process uses the tensor "
                "operations instead (correct, about 60-90 us more per LoRA step). Please report it with "
                "your GPU, driver and Triton versions; %s=0 skips the check.",
                name,
                device,
                problem,
                ENV,
            )
        _VERDICTS[key] = not problem
    return _VERDICTS[key]


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
