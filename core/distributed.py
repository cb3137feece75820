"""One process's place in a tensor-parallel group, and the collectives a sharded model needs.

:class:`TensorParallel` holds this rank, the group's size and its torch.distributed process group,
and offers the two collectives of Megatron-style sharding: a sum all-reduce (after row-parallel
projections and the vocab-parallel embedding) and an all-gather (of the vocab-parallel logits).
:meth:`TensorParallel.shard_range` splits a dimension into equal contiguous slices, one per rank,
and refuses a size the group does not divide, naming it. A group of one rank needs no process group
and its collectives do nothing, so single-process code paths stay exactly as they were. Starting
the processes and calling ``torch.distributed.init_process_group`` (NCCL on GPUs, gloo on CPU)
belongs to whoever starts the workers; everything here goes through torch.distributed.
"""

from __future__ import annotations

from typing import Any

import torch

from loraserve.errors import ConfigError


class TensorParallel:
    """This process's rank in a tensor-parallel group of ``size`` ranks.

    :param rank: this process's rank inside ``group``, ``0 <= rank < size``.
    :param size: number of ranks the model is split over (``--tp-size``).
    :param group: the torch.distributed process group of those ranks (None: the default group,
        which must then hold exactly ``size`` ranks; always None for ``size == 1``).

    With ``size > 1`` but no initialised process group the object still shards shapes and
    tensors (tests use that to build one rank's layers in a single process); only the
    collectives need the group.
    """

    def __init__(self, rank: int = 0, size: int = 1, group: Any = None):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"--tp-size {size!r} must be a positive integer")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < size:
            raise ValueError(f"tensor-parallel rank {rank!r} must lie in [0, {size}) for --tp-size {size}")
        self.rank, self.size = rank, size
        self.group = group if size > 1 else None

    @classmethod
    def from_group(cls, group: Any = None) -> TensorParallel:
        """This process's place in ``group`` (None: the default group) of an initialised torch.distributed."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "torch.distributed is not initialised; call init_process_group in every "
                "worker before building its TensorParallel"
            )
        size = dist.get_world_size(group)
        return cls(dist.get_rank(group), size, group) if size > 1 else cls()

    def __repr__(self) -> str:
        return f"TensorParallel(rank={self.rank}, size={self.size})"

    # -- shapes -------------------------------------------------------------------------------

    def shard_range(self, total: int, name: str) -> tuple[int, int]:
        """``(start, stop)`` of this rank's contiguous slice of a dimension of ``total`` elements.

        Raises :class:`ConfigError` naming ``name``, ``total`` and the tensor-parallel size when the
        size does not divide it (every rank must hold the same shapes)."""
        if total % self.size:
            raise ConfigError(
                f"{name} {total} is not divisible by --tp-size {self.size}; use a --tp-size that divides it"
            )
        local = total // self.size
        return self.rank * local, (self.rank + 1) * local

    def shard_size(self, total: int, name: str) -> int:
        """Elements of a dimension of ``total`` that each rank holds (see :meth:`shard_range`)."""
        start, stop = self.shard_range(total, name)
        return stop - start

    # -- collectives --------------------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place, and return it (a no-op for one rank).

        A non-contiguous ``x`` (a view into a wider GEMM output) is reduced through a contiguous
        copy that is written back, since collectives take one dense buffer."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        dense = x.contiguous()
        dist.all_reduce(dense, group=self.group)
        if dense is not x:
            x.copy_(dense)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``x`` concatenated in rank order along ``dim`` (``x`` itself for one rank)."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        dense = x.contiguous()
        parts = [torch.empty_like(dense) for _ in range(self.size)]
        dist.all_gather(parts, dense, group=self.group)
        return torch.cat(parts, dim=dim)


def check_divisible(config: Any, size: int) -> None:
    """Raise :class:`ConfigError` naming the first size in a Llama-family ``config`` that ``size``
    ranks cannot split evenly (heads, KV heads, intermediate size, vocabulary) — before any worker
    process is started."""
    tp = TensorParallel(0, size)
    heads = getattr(config, "num_attention_heads", None)
    sizes = (
        ("num_attention_heads", heads),
        ("num_key_value_heads", getattr(config, "num_key_value_heads", None) or heads),
        ("intermediate_size", getattr(config, "intermediate_size", None)),
        ("vocab_size", getattr(config, "vocab_size", None)),
    )
    for name, value in sizes:
        if isinstance(value, int):
            tp.shard_size(value, name)
