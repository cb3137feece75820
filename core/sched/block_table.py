"""The device-resident block table: every request's KV-cache block ids, as rows of one device tensor.

A request gets a row when it first gets blocks and gives it back when its blocks are freed (finish,
abort, preemption). Rows change only where a request gains a block, so the table is never rebuilt:
the scheduler records each step's new blocks as pending ``(row, column, block)`` writes, and the
attention backend that reads the table flushes them before the forward pass, in one small
host-to-device copy and one scatter. Attention backends then take the columns a step needs with a
device gather of the step's rows, so their per-step host work grows with the batch, not with the
context.
"""

from __future__ import annotations

import array
from collections.abc import Iterable, Sequence

import torch

from loraserve.staging import HostStaging


class BlockTable:
    """Rows of block ids on the device, ``int32 [rows, width]``; row ``r`` column ``c`` is the
    ``c``-th block of the request holding row ``r``. Entries past a row's :meth:`length` are stale
    (left by an earlier holder) and must not be read.

    Lifecycle: :meth:`acquire` a row, :meth:`append` the blocks a request gains (recorded on the host
    as pending writes), :meth:`flush` before a forward pass reads the table, :meth:`release` the row
    when the request's blocks are freed (its pending writes are dropped). Rows and width grow on
    demand (doubling, up to ``max_rows`` and ``max_width``); the tensor is then reallocated at the
    next flush, so read :attr:`table` only after :meth:`flush`.

    Ordering: every device write (the flush's copy and scatter, a reallocation) is enqueued on the
    current stream, so a step already launched reads the entries it was launched with even if the
    host frees and hands the same blocks or row to a later step meanwhile. The flush's host staging
    is a pair of page-locked buffers used alternately (:class:`~loraserve.staging.HostStaging`): at
    most one flush per step, and the engine prepares step N+1 only after step N-1 completed.

    :param device: where the table lives.
    :param max_rows: most rows ever held at once (the KV cache's block count bounds it: a holder has
        at least one block).
    :param max_width: most blocks one row may hold (likewise, the KV cache's block count).
    :param rows, width: initial size.
    """

    def __init__(self, device: torch.device | str, max_rows: int, max_width: int, rows: int = 64, width: int = 64):
        if max_rows < 1 or max_width < 1:
            raise ValueError(f"max_rows ({max_rows}) and max_width ({max_width}) must be at least 1")
        self.device = torch.device(device)
        self.max_rows, self.max_width = max_rows, max_width
        rows, width = min(max(1, rows), max_rows), min(max(1, width), max_width)
        with torch.inference_mode(False):  # updated in place outside inference mode too
            self.table = torch.zeros((rows, width), dtype=torch.int32, device=self.device)
        self._num_rows, self._width = rows, width  # the size the next flush gives the table
        self._free: list[int] = list(range(rows - 1, -1, -1))  # pop() hands out low rows first
        self._held: list[bool] = [False] * rows
        #: entries recorded per row (flushed or pending)
        self.lengths: list[int] = [0] * rows
        #: row -> (first column, blocks) appended since the last flush; one run per row, since rows
        #: only grow at their end
        self._pending: dict[int, tuple[int, list[int]]] = {}
        self._staging = HostStaging(self.device)
        #: entries written to the device so far (tests count them)
        self.entries_written = 0
        #: when not None, every acquire, append and release as ``("a", row)``, ``("+", row, blocks)``
        #: and ``("r", row)``, in order (tensor parallelism: the driver hands them to the other ranks,
        #: whose tables :meth:`replay` them; see :meth:`take_journal`)
        self.journal: list[tuple] | None = None

    @property
    def num_held(self) -> int:
        return self._num_rows - len(self._free)

    def acquire(self) -> int:
        """A free row, of length 0."""
        if not self._free:
            grown = min(2 * self._num_rows, self.max_rows)
            if grown == self._num_rows:
                raise RuntimeError(f"all {self.max_rows} block-table rows are held")
            self._free = list(range(grown - 1, self._num_rows - 1, -1))
            self._held += [False] * (grown - self._num_rows)
            self.lengths += [0] * (grown - self._num_rows)
            self._num_rows = grown
        row = self._free.pop()
        self._held[row] = True
        if self.journal is not None:
            self.journal.append(("a", row))
        return row

    def hold(self, row: int) -> None:
        """Take the specific free ``row`` (growing the table to reach it): a replica following another
        table's :meth:`acquire` calls."""
        while row >= self._num_rows:
            grown = min(2 * self._num_rows, self.max_rows)
            if grown == self._num_rows:
                raise ValueError(f"block-table row {row} is past max_rows ({self.max_rows})")
            self._free[:0] = range(grown - 1, self._num_rows - 1, -1)
            self._held += [False] * (grown - self._num_rows)
            self.lengths += [0] * (grown - self._num_rows)
            self._num_rows = grown
        if self._held[row]:
            raise ValueError(f"block-table row {row} is already held")
        self._free.remove(row)
        self._held[row] = True

    def append(self, row: int, blocks: Sequence[int]) -> None:
        """Record ``blocks`` as the next entries of ``row`` (written to the device at the next flush)."""
        if not 0 <= row < self._num_rows or not self._held[row]:
            raise ValueError(f"block-table row {row} is not held")
        if not blocks:
            return
        col = self.lengths[row]
        end = col + len(blocks)
        if end > self._width:
            if end > self.max_width:
                raise ValueError(f"row {row} would hold {end} blocks, more than max_width ({self.max_width})")
            self._width = min(self.max_width, 1 << (end - 1).bit_length())
        run = self._pending.get(row)
        if run is None:
            self._pending[row] = (col, list(blocks))
        else:
            run[1].extend(blocks)
        self.lengths[row] = end
        if self.journal is not None:
            self.journal.append(("+", row, list(blocks)))

    def release(self, row: int) -> None:
        """Give ``row`` back; its pending writes are dropped (its device entries become stale)."""
        if not 0 <= row < self._num_rows or not self._held[row]:
            raise ValueError(f"block-table row {row} is not held")
        self._held[row] = False
        self.lengths[row] = 0
        self._pending.pop(row, None)
        self._free.append(row)
        if self.journal is not None:
            self.journal.append(("r", row))

    def take_journal(self) -> list[tuple]:
        """The operations recorded since the last call (recording starts when :attr:`journal` is set
        to a list), and a fresh journal."""
        ops, self.journal = self.journal or [], []
        return ops

    def replay(self, ops: Iterable[tuple], host_rows: dict[int, list[int]]) -> None:
        """Apply another table's journal here, so this table's rows hold what that table's rows hold
        (new entries written at the next flush, as for any append); ``host_rows`` (row -> block list)
        is kept equal to the rows, for the attention's host reads."""
        for op in ops:
            kind, row = op[0], op[1]
            if kind == "a":
                self.hold(row)
                host_rows[row] = []
            elif kind == "+":
                self.append(row, op[2])
                host_rows[row].extend(op[2])
            elif kind == "r":
                self.release(row)
                host_rows.pop(row, None)
            else:
                raise ValueError(f"unknown block-table operation {op!r}")

    def length(self, row: int) -> int:
        return self.lengths[row]

    def flush(self) -> None:
        """Write the pending entries to the device: one host-to-device copy and one scatter on the
        current stream (nothing when none are pending); reallocates the table first if it grew."""
        if self.table.shape != (self._num_rows, self._width):
            self._grow()
        if not self._pending:
            return
        rows, cols, blocks = array.array("i"), array.array("i"), array.array("i")
        for row, (col, new) in self._pending.items():
            rows.extend([row] * len(new))
            cols.extend(range(col, col + len(new)))
            blocks.extend(new)
        self._pending = {}
        k = len(blocks)
        packed = self._staging.upload(rows + cols + blocks)
        self.table[packed[:k], packed[k : 2 * k]] = packed[2 * k :]
        self.entries_written += k

    def _grow(self) -> None:
        old = self.table
        with torch.inference_mode(False):
            self.table = torch.zeros((self._num_rows, self._width), dtype=torch.int32, device=self.device)
            r, w = min(old.shape[0], self._num_rows), min(old.shape[1], self._width)
            self.table[:r, :w].copy_(old[:r, :w])

    def check_integrity(self, holders: Iterable[tuple[int, Sequence[int]]]) -> None:
        """Raise unless the ``(row, blocks)`` of every request holding a row, taken together, own the
        held rows exactly once, and each row's entries (on the device, with the pending writes
        applied) equal that request's host block list. Reads the table back: for tests."""
        seen: set[int] = set()
        free = set(self._free)
        if len(free) != len(self._free):
            raise RuntimeError("a block-table row appears twice in the free list")
        table = self.table.cpu()
        if table.shape != (self._num_rows, self._width):
            grown = torch.zeros((self._num_rows, self._width), dtype=torch.int32)
            grown[: table.shape[0], : table.shape[1]] = table[: self._num_rows, : self._width]
            table = grown
        for row, (col, new) in self._pending.items():
            table[row, col : col + len(new)] = torch.tensor(new, dtype=torch.int32)
        for row, blocks in holders:
            if row in seen:
                raise RuntimeError(f"block-table row {row} is held by two requests")
            seen.add(row)
            if not 0 <= row < self._num_rows or not self._held[row] or row in free:
                raise RuntimeError(f"block-table row {row} is used by a request but not held")
            if self.lengths[row] != len(blocks):
                raise RuntimeError(f"row {row} records {self.lengths[row]} blocks, its request holds {len(blocks)}")
            if table[row, : len(blocks)].tolist() != list(blocks):
                raise RuntimeError(f"row {row} holds {table[row, : len(blocks)].tolist()}, its request {list(blocks)}")
        held = {r for r in range(self._num_rows) if self._held[r]}
        if held != seen:
            raise RuntimeError(f"block-table rows held by no request: {sorted(held - seen)[:10]}")
        if held & free or len(held) + len(free) != self._num_rows:
            raise RuntimeError("block-table rows are both free and held, or neither")
