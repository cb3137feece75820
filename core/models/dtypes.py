"""Turning the dtype and device names of settings and plugins into ``torch.dtype`` / ``torch.device``.

Settings carry names (``"bfloat16"``, ``"cuda"``); model code and tests pass torch objects. Both
are accepted everywhere a model is built or loaded, and a bad name says which names work. Also
here: whether Triton kernels run on a device (CUDA, or the CPU under Triton's interpreter), and the
layout check the fused kernels share.
"""

from __future__ import annotations

import os

import torch

from loraserve.errors import ConfigError

DTYPE_NAMES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
}


def to_torch_device(device: torch.device | str | None) -> torch.device:
    """``"auto"``/None -> cuda when a GPU is present, else cpu; other names as torch parses them."""
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a device torch knows; use cpu, cuda or cuda:N") from None


def to_torch_dtype(dtype: torch.dtype | str | None, device: torch.device | str | None = None) -> torch.dtype:
    """``"auto"``/None -> float32 on CPU and bfloat16 on CUDA (as ``--dtype auto``); names or torch dtypes."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES.values():
            raise ConfigError(f"dtype {dtype} is not supported for model weights; use float32, bfloat16 or float16")
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if to_torch_device(device).type == "cuda" else torch.float32
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPE_NAMES)} or auto")
    return DTYPE_NAMES[name]


def triton_interpreter_on() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton to run kernels in its CPU interpreter (tests do)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def runs_triton(device: torch.device) -> bool:
    """Whether Triton kernels can run on ``device``: CUDA, or the CPU under the interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreter_on())


def check_rows(name: str, t: torch.Tensor, dims: int) -> None:
    """Refuse ``t`` unless it is ``dims``-d with a contiguous last dim and a float dtype the fused
    kernels take (a ValueError naming ``name``)."""
    if t.dim() != dims or t.stride(-1) != 1:
        raise ValueError(
            f"{name} must be a {dims}-d tensor with a contiguous last dim, "
            f"got shape {tuple(t.shape)} strides {t.stride()}"
        )
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name} has dtype {t.dtype}; the fused kernels take float32, bfloat16 or float16")
