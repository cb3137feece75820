"""Host staging for the small per-step host-to-device copies: two page-locked buffers used in turn.

A copy from page-locked memory issued with ``non_blocking=True`` returns before the device has read
the memory, so the buffer must not be rewritten until that copy ran. With the overlapped engine loop
the host prepares step N+1 while step N runs, so one buffer is not enough; two are, by the engine's
ordering contract: it waits for step N-1's completion event before it prepares step N+1, so the
buffer that step N-1 used is free again when step N+1 writes it (step N's copy reads the other one).
"""

from __future__ import annotations

import array

import torch


class HostStaging:
    """Two page-locked int32 host buffers, used alternately, for one host-to-device copy per step.

    Contract: call :meth:`upload` at most once per step per instance (each call takes the other
    buffer, so the buffer a step wrote is written again two calls later); the engine's overlap order
    (step N+1 is prepared only after step N-1 completed) then guarantees that the buffer is free. As
    a safety net each buffer remembers an event recorded after its last copy and :meth:`upload`
    waits for it before rewriting the buffer; under that contract the event has always completed, so
    the wait costs nothing. A buffer too small for a step is replaced by a larger one (the old one
    goes back to PyTorch's caching host allocator, which reuses it only once its copy completed).

    On a CPU device there is nothing to overlap: :meth:`upload` returns an ordinary copy.

    :param device: where the copies go.
    :param capacity: initial size of each buffer, in int32 elements.
    """

    def __init__(self, device: torch.device | str, capacity: int = 1024):
        self.device = torch.device(device)
        self._pinned = self.device.type == "cuda"
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._events: list = [None, None]
        self._capacity = max(1, capacity)
        self._turn = 0

    def upload(self, values: array.array, out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy int32 ``values`` to the device in one copy, into ``out[:len(values)]`` (an int32
        device tensor, contiguous) when given, else into a new tensor; returns the device tensor
        (``out`` itself when given). The copy is ordered on the current stream."""
        n = len(values)
        if values.typecode != "i":
            raise ValueError(f"values must be an array.array of typecode 'i' (int32), not {values.typecode!r}")
        if out is not None and (out.dtype != torch.int32 or out.numel() < n or not out.is_contiguous()):
            raise ValueError(
                f"out must be a contiguous int32 tensor of at least {n} elements, not {out.dtype} {tuple(out.shape)}"
            )
        if n == 0:
            return out if out is not None else torch.empty(0, dtype=torch.int32, device=self.device)
        src = torch.frombuffer(values, dtype=torch.int32)
        if not self._pinned:
            if out is None:
                return src.to(self.device, copy=True)
            out[:n].copy_(src)
            return out
        turn, self._turn = self._turn, 1 - self._turn
        host = self._buffer(turn, n)
        host[:n].copy_(src)
        if out is None:
            out = host[:n].to(self.device, non_blocking=True)
        else:
            out[:n].copy_(host[:n], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._events[turn] = event
        return out

    def _buffer(self, turn: int, n: int) -> torch.Tensor:
        """Buffer ``turn`` with room for ``n`` values, once its previous copy has run."""
        if self._events[turn] is not None:
            self._events[turn].synchronize()  # done already under the overlap contract
            self._events[turn] = None
        buf = self._buffers[turn]
        if buf is None or buf.numel() < n:
            size = max(self._capacity, 1 << (n - 1).bit_length())
            with torch.inference_mode(False):  # rewritten in and outside inference mode alike
                buf = self._buffers[turn] = torch.empty(size, dtype=torch.int32, pin_memory=True)
        return buf


def pack_aligned(parts: list[list[int] | array.array]) -> tuple[array.array, list[int]]:
    """``parts`` (int lists, or ``array.array`` of any 4-byte type, copied bit for bit) in one int32
    array, each starting at a multiple of 4 elements (16 bytes, as a tensor of its own would: views
    of one uploaded tensor then stay valid for kernels specialised on aligned pointers); returns the
    array and the start of each part."""
    packed = array.array("i")
    starts = []
    for part in parts:
        packed.extend([0] * (-len(packed) % 4))
        starts.append(len(packed))
        if isinstance(part, array.array):
            if part.itemsize != 4:
                raise ValueError(f"array parts must have 4-byte items, not {part.itemsize} ({part.typecode!r})")
            packed.frombytes(part.tobytes())
        else:
            packed.extend(part)
    return packed, starts
