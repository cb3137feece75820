"""Kernel plans: the tiled LoRA backends' per-device choices, measured on the device and kept as data.

A plan file (JSON, format :data:`FORMAT`) lists measured cases: a backend, a projection shape (input width,
output width, slices), a step's token count, the pool's slot count and rank, and what was fastest
there: the shrink inside the base GEMM or a separate shrink kernel, and the launch parameters of
that shrink and of the expand. ``benchmarks/tune_lora_kernels.py`` writes one by timing the candidates on the device (or
converts a ``bench_lora_kernels.py`` result). The backends ask :meth:`KernelPlans.lookup` before their
built-in cost model (:mod:`~loraserve.plugins.backend_triton.cost_model`), which stays the answer for
an untuned device, a model whose shapes were not measured, or a pool far from every measured one.

Which plan applies: ``LORASERVE_KERNEL_PLANS`` names a plan file (``off`` uses none); else the file
shipped for the device's name in ``plan_data/``, if there is one.

How a step finds its case: among the cases of the same projection shape whose pool is near the
engine's (``|log2 slots ratio| + |log2 rank ratio| <= MAX_POOL_DISTANCE``), the nearest in
``|log2 tokens ratio|`` plus that pool distance. Each case then covers one interval of token counts,
in the order of the cases' token counts, so the warm-up's bisection over token counts finds every
case a running server can hit (the case is part of the variant key). A step of fewer tokens than the
pool has slots finds no case: the measured cases have every slot in use (slots <= tokens), while such
a step certainly leaves slots idle, whose A the shrink inside the GEMM would still read; the cost model
decides there (those steps come first in token order, so the intervals stay in order).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraserve.errors import ConfigError

FORMAT = "loraserve-kernel-plans/1"
ENV = "LORASERVE_KERNEL_PLANS"
MAX_POOL_DISTANCE = 2.0  # e.g. 4x the slots at the same rank, or 2x both
MAX_FILE_BYTES = 16 << 20
PARAM_KEYS = {  # per kernel, the launch parameters a case may set
    "shrink": ("block_m", "block_r", "block_k", "split", "num_warps", "num_stages"),
    "expand": ("block_n", "block_r", "group_n", "num_warps", "num_stages"),
}
BLOCKS = ("block_m", "block_r", "block_k", "block_n")
_SHAPE_KEYS = ("in_dim", "out_dim", "n_slices", "tokens", "slots", "rank")
PLAN_DIR = Path(__file__).with_name("plan_data")


@dataclass(frozen=True)
class PlanEntry:
    """One measured case of one backend and its choices (None: not measured, the cost model decides)."""

    backend: str
    in_dim: int
    out_dim: int
    n_slices: int
    tokens: int
    slots: int
    rank: int
    shrink_in_gemm: bool | None = None
    shrink: tuple[tuple[str, int], ...] = ()  # the separate shrink's tile height and shrink_config's parameters
    expand: tuple[tuple[str, int], ...] = ()  # expand_config's parameters

    @property
    def case(self) -> tuple[int, int, int]:
        """What distinguishes the case within its shape: part of the backends' variant key."""
        return self.tokens, self.slots, self.rank

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": self.backend, **{k: getattr(self, k) for k in _SHAPE_KEYS}}
        if self.shrink_in_gemm is not None:
            out["shrink_in_gemm"] = self.shrink_in_gemm
        for kind in PARAM_KEYS:
            if getattr(self, kind):
                out[kind] = dict(getattr(self, kind))
        return out


def _log_distance(a: int, b: int) -> float:
    return abs(math.log2(a) - math.log2(b))


class KernelPlans:
    """The measured cases of one device (see the module docstring for how a step finds its case)."""

    def __init__(self, entries: list[PlanEntry], device: str = "", source: str = ""):
        self.entries, self.device, self.source = list(entries), device, source
        self._by_shape: dict[tuple[int, int, int], list[PlanEntry]] = {}
        for e in sorted(self.entries, key=lambda e: e.case):
            self._by_shape.setdefault((e.in_dim, e.out_dim, e.n_slices), []).append(e)
        self._found: dict[tuple, PlanEntry | None] = {}

    def for_backend(self, name: str) -> KernelPlans:
        """The cases measured with backend ``name`` (the backends tile differently)."""
        return KernelPlans([e for e in self.entries if e.backend == name], self.device, self.source)

    def lookup(
        self, num_tokens: int, in_dim: int, out_dim: int, n_slices: int, rank: int, slots: int
    ) -> PlanEntry | None:
        """The case a step of ``num_tokens`` on this projection and pool falls in, or None."""
        key = (num_tokens, in_dim, out_dim, n_slices, rank, slots)
        if key not in self._found:
            best, best_d = None, math.inf
            if 0 < slots <= num_tokens and rank > 0:  # fewer tokens than slots: idle slots, never measured
                for e in self._by_shape.get((in_dim, out_dim, n_slices), ()):
                    pool = _log_distance(e.slots, slots) + _log_distance(e.rank, rank)
                    if pool > MAX_POOL_DISTANCE:
                        continue
                    d = _log_distance(e.tokens, num_tokens) + pool
                    if d < best_d - 1e-9:  # ties keep the case of fewer tokens (sorted first)
                        best, best_d = e, d
            self._found[key] = best
        return self._found[key]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "device": self.device,
            "source": self.source,
            "entries": [e.to_dict() for e in self.entries],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "the plan") -> KernelPlans:
        """Validate and build; a ConfigError names the file, the entry and the field at fault."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"{where} is not a kernel plan: expected a JSON object with format {FORMAT!r}")
        raw = data.get("entries")
        if not isinstance(raw, list):
            raise ConfigError(f"{where}: 'entries' must be a list")
        entries = [_entry(item, f"{where}, entry {i}") for i, item in enumerate(raw)]
        return cls(entries, device=str(data.get("device", "")), source=str(data.get("source", "")))

    @classmethod
    def load(cls, path: str | os.PathLike) -> KernelPlans:
        p = Path(path)
        try:
            if p.stat().st_size > MAX_FILE_BYTES:
                raise ConfigError(f"kernel plan {p} is larger than {MAX_FILE_BYTES >> 20} MiB")
            data = json.loads(p.read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"cannot read kernel plan {p} ({ENV}): {e.strerror or e}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"kernel plan {p} is not valid JSON: {e}") from None
        return cls.from_dict(data, where=f"kernel plan {p}")

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 1 << 31:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


def _entry(item: Any, where: str) -> PlanEntry:
    if not isinstance(item, dict):
        raise ConfigError(f"{where} must be an object")
    unknown = set(item) - set(_SHAPE_KEYS) - {"backend", "shrink_in_gemm", *PARAM_KEYS}
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    backend = item.get("backend")
    if not isinstance(backend, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", backend):
        raise ConfigError(f"{where}: backend must be a backend's name (e.g. csgmv), got {backend!r}")
    shape = {k: _positive_int(item.get(k), f"{where}: {k}") for k in _SHAPE_KEYS}
    in_gemm = item.get("shrink_in_gemm")
    if in_gemm is not None and not isinstance(in_gemm, bool):
        raise ConfigError(f"{where}: shrink_in_gemm must be true, false or absent, got {in_gemm!r}")
    params = {kind: _params(item.get(kind) or {}, kind, where) for kind in PARAM_KEYS}
    return PlanEntry(backend, **shape, shrink_in_gemm=in_gemm, **params)


def _params(given: Any, kind: str, where: str) -> tuple[tuple[str, int], ...]:
    if not isinstance(given, dict) or set(given) - set(PARAM_KEYS[kind]):
        raise ConfigError(f"{where}: {kind} must be an object with keys from {', '.join(PARAM_KEYS[kind])}")
    params = {k: _positive_int(v, f"{where}: {kind}.{k}") for k, v in given.items()}
    for k in BLOCKS:
        if k in params and (not 16 <= params[k] <= 256 or params[k] & (params[k] - 1)):
            raise ConfigError(f"{where}: {kind}.{k} must be a power of two from 16 to 256, got {params[k]}")
    warps, stages = params.get("num_warps", 4), params.get("num_stages", 1)
    if warps > 32 or warps & (warps - 1):
        raise ConfigError(f"{where}: {kind}.num_warps must be 1, 2, 4, 8, 16 or 32, got {warps}")
    if stages > 8:
        raise ConfigError(f"{where}: {kind}.num_stages must be from 1 to 8, got {stages}")
    return tuple(sorted(params.items()))


def plan_file_name(device_name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``NVIDIA_H100_80GB_HBM3.json``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json"


def plans_for(device: Any) -> KernelPlans | None:
    """The plan of ``device`` (a torch.device): ``LORASERVE_KERNEL_PLANS``'s file, ``off`` for none,
    else the shipped file for a CUDA device's name, else None (the cost model decides alone)."""
    chosen = os.environ.get(ENV, "").strip()
    if chosen.lower() in ("off", "0", "none"):
        return None
    if chosen:
        return KernelPlans.load(chosen)
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    shipped = PLAN_DIR / plan_file_name(torch.cuda.get_device_name(device))
    return KernelPlans.load(shipped) if shipped.is_file() else None
