"""The two memory tiers of adapter weights: the host cache and the GPU slot pool.

``HostAdapterCache`` keeps loaded adapters' CPU tensors, at most ``capacity`` of them; the eviction
policy picks a victim among the keys the caller does not protect. ``GpuAdapterPool`` holds the
fixed-size per-layer buffers the LoRA layers read (``A [slots, slices * max_rank, in]`` and
``B [slots, out, max_rank]``) and which key occupies each slot; the base model occupies a slot of
rank 0 when it is in a batch, as in SGLang. Buffers are allocated once and only their contents
change, so a captured CUDA graph stays valid. Keys are ``(name, version)``. A slot may be
*loading*: assigned to a key while its weights are still being copied on a side stream (overlap
loading); such a slot is never chosen as an eviction victim. Both pools have a
``check_integrity()`` the tests call. Under tensor parallelism each rank's pool is sized by its
layers' local shapes and :meth:`GpuAdapterPool.write` cuts every full adapter tensor to the rank's
part, as S-LoRA shards adapters: B by its output rows for column-parallel projections (A whole),
A by its input columns for row-parallel ones (B whole). Built with ``dora=True``, each layer
projection also has a float32 ``dora_scale [slots, out]`` buffer: DoRA's per-output-feature scale
of the adapter in each slot (see :mod:`~loraserve.lora.dora`), read only for slots that
``dora_host`` marks.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

from loraserve.contract import EvictionPolicy, pool_shapes
from loraserve.errors import UserError

BASE_KEY = ("", 0)  # the base model's key in the GPU pool: rank 0, no weights


class HostAdapterCache:
    """key -> adapter (CPU tensors), bounded by ``capacity`` adapters and ``capacity_bytes`` bytes of
    weights (None: unbounded)."""

    def __init__(self, capacity: int | None, policy: EvictionPolicy, capacity_bytes: int | None = None):
        self.capacity, self.capacity_bytes = capacity, capacity_bytes
        self.policy = policy
        self._adapters: dict[Hashable, Any] = {}
        self._bytes: dict[Hashable, int] = {}
        self._total = 0  # sum of _bytes, kept as adapters come and go (asked at every insert)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._adapters

    @property
    def bounded(self) -> bool:
        """Whether adapters can be evicted (and then read again from their sources)."""
        return self.capacity is not None or self.capacity_bytes is not None

    def __len__(self) -> int:
        return len(self._adapters)

    @property
    def nbytes(self) -> int:
        return self._total

    def get(self, key: Hashable) -> Any | None:
        adapter = self._adapters.get(key)
        if adapter is not None:
            self.policy.touch(key)
        return adapter

    def _full(self, incoming_bytes: int) -> bool:
        if self.capacity is not None and len(self._adapters) >= self.capacity:
            return True
        return self.capacity_bytes is not None and self.nbytes + incoming_bytes > self.capacity_bytes

    def make_room(self, protected: set, incoming_bytes: int = 0) -> list[Hashable]:
        """Evict until one more adapter of ``incoming_bytes`` fits; returns the evicted keys. Raises
        when every resident adapter is protected (or the adapter alone is over the byte bound)."""
        if self.capacity_bytes is not None and incoming_bytes > self.capacity_bytes:
            raise UserError(
                f"the adapter's {incoming_bytes / 2**20:.1f} MiB of weights exceed the host adapter cache's "
                f"{self.capacity_bytes / 2**20:.1f} MiB (--max-loaded-lora-gib); raise it"
            )
        evicted = []
        while self._full(incoming_bytes):
            victim = self.policy.victim([k for k in self._adapters if k not in protected])
            if victim is None:
                raise UserError(
                    f"the host adapter cache is full ({len(self._adapters)} adapters, {self.nbytes / 2**20:.1f} MiB; "
                    "--max-loaded-loras, --max-loaded-lora-gib) and every adapter in it is pinned or in use; "
                    "unload one or raise the bound"
                )
            self.remove(victim)
            evicted.append(victim)
        return evicted

    def put(self, key: Hashable, adapter: Any) -> None:
        nbytes = int(getattr(adapter, "nbytes", 0))
        if key not in self._adapters and self._full(nbytes):
            raise RuntimeError("make_room() before put()")
        self._adapters[key] = adapter
        self._total += nbytes - self._bytes.get(key, 0)
        self._bytes[key] = nbytes
        self.policy.insert(key)

    def remove(self, key: Hashable) -> None:
        if self._adapters.pop(key, None) is not None:
            self._total -= self._bytes.pop(key, 0)
            self.policy.remove(key)

    def keys(self) -> list[Hashable]:
        return list(self._adapters)

    def check_integrity(self) -> None:
        if self._total != sum(self._bytes.values()) or set(self._bytes) != set(self._adapters):
            raise RuntimeError(f"host cache counts {self._total} bytes, its adapters hold {sum(self._bytes.values())}")
        if self.capacity is not None and len(self._adapters) > self.capacity:
            raise RuntimeError(f"host cache holds {len(self._adapters)} adapters, capacity {self.capacity}")
        if self.capacity_bytes is not None and self.nbytes > self.capacity_bytes:
            raise RuntimeError(f"host cache holds {self.nbytes} bytes, capacity {self.capacity_bytes}")


class GpuAdapterPool:
    """Fixed per-layer LoRA buffers with ``num_slots`` slots, and the key held by each slot.

    :param modules: fused module name -> ``(in_dim, output_offsets)`` for the targeted modules.
    :param extra: optional ``{"embed_tokens": (vocab, hidden), "lm_head": (hidden, vocab)}`` —
        modules without layers, stored as ``A [slots, R, in]``, ``B [slots, out, R]``.
    :param a_storage: optional ``(layer, name, rows) -> zeroed [rows, in]`` tensor that holds a
        layer's A buffer instead of a fresh allocation (the layer's weight with rows appended, so the
        base GEMM can do the shrink; see ``LoRALinear.append_rows``).
    :param shard: tensor-parallel modules, fused name -> ``(parallel, rank, size)`` (a layer's
        ``shard_spec``); ``modules`` then gives that rank's local sizes, and :meth:`write` takes
        full adapter tensors and copies the rank's part: ``"column"``, B's rows of the rank's part
        of every output slice (each of q, k and v cut by heads), A whole; ``"row"``, A's columns of
        the rank's input features, B whole. Modules not named are replicated.
    :param dora: allocate the ``dora_scale`` buffers (only engines that may serve DoRA adapters).
    """

    def __init__(
        self,
        num_slots: int,
        max_rank: int,
        num_layers: int,
        modules: dict[str, tuple[int, tuple[int, ...]]],
        extra: dict[str, tuple[int, int]],
        dtype: torch.dtype,
        device: torch.device,
        policy: EvictionPolicy,
        a_storage: Callable[[int, str, int], torch.Tensor] | None = None,
        shard: dict[str, tuple[str, int, int]] | None = None,
        dora: bool = False,
    ):
        self.num_slots, self.max_rank, self.policy = num_slots, max_rank, policy
        self.offsets = {name: offs for name, (_, offs) in modules.items()}
        self.in_dims = {name: in_dim for name, (in_dim, _) in modules.items()}
        self.shard = {name: spec for name, spec in (shard or {}).items() if spec is not None}
        for name, (style, rank, size) in self.shard.items():
            if name not in modules or style not in ("column", "row") or not 0 <= rank < size:
                raise ValueError(
                    f"shard spec {name!r}: {(style, rank, size)} must name a pooled module, a "
                    "'column' or 'row' style and a rank in [0, size)"
                )
        R = max_rank
        self.A: dict[tuple[int, str], torch.Tensor] = {}
        self.B: dict[tuple[int, str], torch.Tensor] = {}
        self.dora_scale: dict[tuple[int, str], torch.Tensor] = {}
        for layer in range(num_layers):
            for name, (in_dim, offs) in modules.items():
                a_shape, b_shape = pool_shapes(num_slots, len(offs) - 1, R, in_dim, offs[-1])
                if a_storage is not None:  # zeroed rows owned by someone else (the layer's extended weight)
                    self.A[(layer, name)] = a_storage(layer, name, a_shape[0] * a_shape[1]).view(a_shape)
                else:
                    self.A[(layer, name)] = torch.zeros(a_shape, dtype=dtype, device=device)
                self.B[(layer, name)] = torch.zeros(b_shape, dtype=dtype, device=device)
                if dora:
                    self.dora_scale[(layer, name)] = torch.ones(num_slots, offs[-1], dtype=torch.float32, device=device)
        for name, (in_dim, out_dim) in extra.items():
            a_shape, b_shape = pool_shapes(num_slots, 1, R, in_dim, out_dim)
            self.A[(-1, name)] = torch.zeros(a_shape, dtype=dtype, device=device)
            self.B[(-1, name)] = torch.zeros(b_shape, dtype=dtype, device=device)
        self.slot_key: list[Hashable | None] = [None] * num_slots
        self.ranks_host = [0] * num_slots
        self.scalings_host = [0.0] * num_slots
        #: whether each slot holds a DoRA adapter (its rows are scaled by ``dora_scale``)
        self.dora_host = [False] * num_slots
        #: the same on the device, int32 ``[num_slots + 1]`` (the last entry, 0, for the null slot of
        #: graph padding rows), written on the stream of the slot's copies; None without DoRA buffers
        self.dora_flags = torch.zeros(num_slots + 1, dtype=torch.int32, device=device) if dora else None
        self.pinned: set[Hashable] = set()
        #: slot -> handle of the copy still filling it (overlap loading); see LoRAManager
        self.loading: dict[int, Any] = {}

    @property
    def nbytes(self) -> int:
        tensors = (*self.A.values(), *self.B.values(), *self.dora_scale.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def slot_of(self, key: Hashable) -> int | None:
        try:
            return self.slot_key.index(key)
        except ValueError:
            return None

    def resident(self) -> list[Hashable]:
        return [k for k in self.slot_key if k is not None]

    def find_slot(self, protected: set) -> tuple[int | None, Hashable | None]:
        """A free slot, or the slot of the policy's victim among unprotected, unpinned keys whose
        slot is not being filled.

        Returns ``(slot, victim_key)``; ``(None, None)`` when nothing can be freed."""
        if None in self.slot_key:
            return self.slot_key.index(None), None
        victim = self.policy.victim(
            [
                k
                for s, k in enumerate(self.slot_key)
                if k not in protected and k not in self.pinned and s not in self.loading
            ]
        )
        if victim is None:
            return None, None
        return self.slot_key.index(victim), victim

    def evict(self, slot: int) -> Hashable | None:
        key = self.slot_key[slot]
        if key is not None:
            self.policy.remove(key)
            self.pinned.discard(key)
        self.loading.pop(slot, None)  # a later copy into this slot is ordered after it on the same stream
        self.slot_key[slot] = None
        self.ranks_host[slot], self.scalings_host[slot] = 0, 0.0
        if self.dora_host[slot] and self.dora_flags is not None:
            self.dora_flags[slot : slot + 1].fill_(0)
        self.dora_host[slot] = False
        return key

    def load(self, slot: int, key: Hashable, adapter: Any | None) -> None:
        """Put ``adapter`` (None for the base model) into ``slot``, replacing what was there; the
        copies are ordered on the current stream."""
        self.assign(slot, key, adapter)
        if adapter is not None:
            self.write(slot, adapter)

    def assign(self, slot: int, key: Hashable, adapter: Any | None) -> None:
        """Record that ``slot`` holds ``key`` (rank and scaling from ``adapter``) without copying
        weights; :meth:`write` fills it."""
        if adapter is not None and adapter.rank > self.max_rank:
            raise UserError(f"adapter rank {adapter.rank} exceeds --max-lora-rank {self.max_rank}")
        if self.slot_key[slot] is not None:
            self.evict(slot)
        self.slot_key[slot] = key
        self.ranks_host[slot] = adapter.rank if adapter is not None else 0
        self.scalings_host[slot] = float(adapter.scaling) if adapter is not None else 0.0
        dora = getattr(adapter, "dora_scales", None) or getattr(adapter, "dora_partial", None)
        self.dora_host[slot] = adapter is not None and bool(dora)
        self.policy.insert(key)

    def write(self, slot: int, adapter: Any, non_blocking: bool = False) -> int:
        """Copy ``adapter``'s weights into ``slot`` on the current stream; returns the bytes copied.

        Rows and columns past a module's rank are zeroed (the kernels never read them, but a slot
        then holds exactly its adapter). A module at the full slot rank is one copy for A and one
        for B (one per output slice for a column-parallel B); ``non_blocking`` makes copies from
        page-locked host memory asynchronous. The adapter's tensors are always the full model's;
        a tensor-parallel module gets this rank's part (see ``shard``). A row-parallel A's columns
        are a strided view of the host tensor, which torch stages through a contiguous
        (pageable) copy, so that copy is not asynchronous."""
        R, copied = self.max_rank, 0
        dora_scales = getattr(adapter, "dora_scales", None) or {}
        if dora_scales and not self.dora_scale:
            raise UserError("this GPU pool has no DoRA scale buffers (DoRA needs a backend with supports_dora)")
        if getattr(adapter, "dora_partial", None):
            raise RuntimeError("a DoRA adapter's row-parallel scales were not completed (dora.finish_scales)")
        copied += self.write_dora(slot, dora_scales, non_blocking)
        for (layer, name), A_buf in self.A.items():
            B_buf = self.B[(layer, name)]
            w = self._weights_for(adapter, layer, name)
            if w is None:
                A_buf[slot].zero_()
                B_buf[slot].zero_()
                continue
            A, B = w
            n_slices = 1 if layer < 0 else len(self.offsets[name]) - 1
            r = A.shape[0] // n_slices
            A, B_rows = self._local_parts(name, A, B) if layer >= 0 else (A, [(0, B.shape[0], B)])
            copied += A.numel() * A.element_size() + sum(src.numel() * src.element_size() for _, _, src in B_rows)
            if r == R:
                A_buf[slot].copy_(A, non_blocking=non_blocking)
                for lo, hi, src in B_rows:
                    B_buf[slot, lo:hi].copy_(src, non_blocking=non_blocking)
                continue
            A_buf[slot].zero_()
            B_buf[slot].zero_()
            for i in range(n_slices):
                A_buf[slot, i * R : i * R + r].copy_(A[i * r : (i + 1) * r], non_blocking=non_blocking)
            for lo, hi, src in B_rows:
                B_buf[slot, lo:hi, :r].copy_(src, non_blocking=non_blocking)
        return copied

    def write_dora(self, slot: int, dora_scales: dict, non_blocking: bool = False) -> int:
        """Set ``slot``'s DoRA scales (1 where ``dora_scales`` has none) and its device flag; returns
        the bytes copied. A plain adapter only clears the flag: a slot's scales are read only while
        its flag is set (one launch instead of one fill per projection)."""
        copied = 0
        if not dora_scales:
            if self.dora_flags is not None:
                self.dora_flags[slot : slot + 1].fill_(0)
            return 0
        for key, buf in self.dora_scale.items():
            scale = dora_scales.get(key)
            if scale is None:
                buf[slot].fill_(1.0)
            else:
                buf[slot].copy_(scale, non_blocking=non_blocking)
                copied += scale.numel() * scale.element_size()
        if self.dora_flags is not None:
            self.dora_flags[slot : slot + 1].fill_(1 if dora_scales else 0)
        return copied

    def _local_parts(
        self, name: str, A: torch.Tensor, B: torch.Tensor
    ) -> tuple[torch.Tensor, list[tuple[int, int, torch.Tensor]]]:
        """This rank's part of a module's full ``A [n * r, in]`` and ``B [out, r]``: A (a view) and
        B as ``(local_lo, local_hi, rows)`` pieces, views of B's rows that fill the local rows
        ``local_lo:local_hi`` of the slot's B."""
        offs = self.offsets[name]
        style, rank, size = self.shard.get(name, (None, 0, 1))
        if style == "row":  # A's columns of this rank's input features; B whole
            local_in = self.in_dims[name]
            return A[:, rank * local_in : (rank + 1) * local_in], [(0, offs[-1], B)]
        if style == "column":  # B's rows of this rank's part of every slice: slice i starts at size * offs[i]
            pieces = []
            for lo, hi in zip(offs, offs[1:]):
                start = size * lo + rank * (hi - lo)
                pieces.append((lo, hi, B[start : start + hi - lo]))
            return A, pieces
        return A, [(0, offs[-1], B)]

    @staticmethod
    def _weights_for(adapter: Any, layer: int, name: str):
        if layer < 0:
            return getattr(adapter, name, None)
        return adapter.weights.get((layer, name))

    def check_integrity(self) -> None:
        keys = self.resident()
        if len(keys) != len(set(keys)):
            raise RuntimeError(f"a key occupies two GPU slots: {keys}")
        missing = self.pinned - set(keys)
        if missing:
            raise RuntimeError(f"pinned adapters not resident: {missing}")
        for slot in self.loading:
            if self.slot_key[slot] is None:
                raise RuntimeError(f"slot {slot} is being filled but holds no key")
        if self.dora_flags is not None:
            flags = self.dora_flags.tolist()
            wrong = [s for s in range(self.num_slots) if s not in self.loading and bool(flags[s]) != self.dora_host[s]]
            if wrong or flags[-1] != 0:
                raise RuntimeError(f"device DoRA flags {flags} disagree with the slots' {self.dora_host}: {wrong}")
        for slot, key in enumerate(self.slot_key):
            if key is None and self.ranks_host[slot] != 0:
                raise RuntimeError(f"empty slot {slot} has rank {self.ranks_host[slot]}")
            if key is None and self.dora_host[slot]:
                raise RuntimeError(f"empty slot {slot} is marked DoRA")
            if self.ranks_host[slot] > self.max_rank:
                raise RuntimeError(f"slot {slot} rank {self.ranks_host[slot]} above max {self.max_rank}")
