"""One-launch Triton kernels, checked on each device before the engine relies on them.

A few places replace a handful of small torch operations with one Triton program: the tiled LoRA
backends' per-step prepare (``plugins/backend_triton/selfcheck.py`` says which and how they are
checked) and the GPU store's slot fill (:mod:`loraserve.lora.fill_kernel`). Each is compared with
the torch operations it replaces, once per process and device, when its owner is built (before
warm-up and graph capture): :func:`one_launch_ok`. A kernel that fails to compile on a device, driver
or Triton version we have not tested, or that gives another result, is logged (naming it and the
error) and not used; its owner keeps the torch operations, so it costs some host time, never wrong
results or a server that cannot start. (A kernel that faults the device, an illegal address say,
cannot be recovered from inside the process; the GPU tests are what catch that.)

``LORASERVE_ONE_LAUNCH_KERNELS=0`` turns every such kernel off (and skips the checks).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

logger = logging.getLogger("loraserve.lora")

ENV = "LORASERVE_ONE_LAUNCH_KERNELS"
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
                "operations instead (correct, somewhat slower). Please report it with "
                "your GPU, driver and Triton versions; %s=0 skips the check.",
                name,
                device,
                problem,
                ENV,
            )
        _VERDICTS[key] = not problem
    return _VERDICTS[key]
