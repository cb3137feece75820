"""The per-step metadata of the Triton attention: what each kernel reads, built with O(batch) host work.

Decode rows are ``[ctx_len, q_row, write_slot, block table...]``, prefill rows ``[ctx_len, q_start,
q_len, block table...]`` (see :mod:`~loraserve.plugins.attention_triton.kernels`). The host packs
only the first three columns of every row, the cache slot of every new token and the query blocks
of the prefill kernel, and copies them to the device in one copy from page-locked staging; the
block-table columns come from the KV cache's device :class:`~loraserve.sched.block_table.BlockTable`
by a gather of the step's rows (flushed first, so it holds every block the scheduler handed out).
Sequences given without a table row (a warm-up step's scratch sequences, or callers of the old
three-field form) take the host path: their block tables are packed on the host, as before.
"""

from __future__ import annotations

import array
import operator
from collections.abc import Callable

import torch

from loraserve.plugins.attention_triton.kernels import META, Step, pack_rows
from loraserve.sched.block_table import BlockTable
from loraserve.sched.kv_cache import KVCache
from loraserve.staging import HostStaging


def append_slots(buf: array.array, blocks: list[int], start: int, end: int, bs: int) -> None:
    """Append the cache slots of token positions ``start:end`` of a sequence owning ``blocks``
    (one ``range`` per block, so the Python work grows with the blocks spanned, not the tokens)."""
    p = start
    while p < end:
        b = p // bs
        stop = min(end, (b + 1) * bs)
        shift = (blocks[b] - b) * bs  # slot of position q in block b: blocks[b] * bs + q - b * bs
        buf.extend(range(shift + p, shift + stop))
        p = stop


def columns(seqs: list[tuple]) -> tuple[tuple, ...] | None:
    """``(blocks, starts, num_new_tokens, rows)`` as four columns when every sequence names its
    device block-table row (the fast path), else None."""
    try:
        cols = tuple(zip(*seqs)) if seqs else ((), (), (), ())
        blocks, starts, ns, rows = cols
    except ValueError:  # a sequence in the three-field form
        return None
    return cols if not rows or min(rows) >= 0 else None


def decode_heads(cols: tuple[tuple, ...], lengths: list[int], bs: int, max_width: int | None = None):
    """The ``[ctx_len, q_row, write_slot]`` columns of decode sequences (one token each, the ``i``-th
    at query row ``i``) as one int32 array of three per sequence, their write slots, and the widest
    block table they need. Columnar (comprehensions, no per-sequence Python body): this is every
    decode step. Raises ValueError naming the first sequence that does not fit."""
    blocks, starts, ns, rows = cols
    if ns and (min(ns) != 1 or max(ns) != 1):
        i = next(i for i, n in enumerate(ns) if n != 1)
        raise ValueError(f"sequence {i} feeds {ns[i]} tokens; a graph step is decode only (1 token each)")
    need = [s // bs + 1 for s in starts]
    width = max(need, default=0)
    if max_width is not None and width > max_width:
        i = need.index(width)
        raise ValueError(f"sequence {i} needs {width} blocks, more than max_blocks_per_seq ({max_width})")
    have = list(map(lengths.__getitem__, rows)) if rows is not None else list(map(len, blocks))
    if any(map(operator.lt, have, need)):
        i = next(i for i, (h, k) in enumerate(zip(have, need)) if h < k)
        raise ValueError(f"sequence {i} has {have[i]} blocks but {starts[i] + 1} tokens need {need[i]}")
    slots = [b[s // bs] * bs + s % bs for b, s in zip(blocks, starts)]
    n = len(starts)
    head = array.array("i", bytes(12 * n))
    head[0::3] = array.array("i", [s + 1 for s in starts])
    head[1::3] = array.array("i", range(n))
    head[2::3] = array.array("i", slots)
    return head, slots, width


class StepMetadata:
    """Builds the :class:`~loraserve.plugins.attention_triton.kernels.Step` of eager and CUDA-graph
    steps (see :class:`~loraserve.plugins.attention_triton.attention.PagedTritonAttention` for the
    lifecycle). One :class:`~loraserve.staging.HostStaging` carries the one copy of each step: call
    :meth:`eager` or :meth:`graph` at most once per step (the overlap contract of that class).

    :param block_m: query rows per prefill program.
    :param splits_for: ``splits_for(num_decode)``, the decode splits of a batch.
    :param max_seqs, max_blocks_per_seq: the persistent graph buffer's shape (None: no graphs).
    """

    def __init__(
        self,
        kv: KVCache,
        block_m: int,
        splits_for: Callable[[int], int],
        max_seqs: int | None = None,
        max_blocks_per_seq: int | None = None,
    ):
        self.kv, self.block_m, self.splits_for = kv, block_m, splits_for
        self.device = kv.k[0].device
        self._staging = HostStaging(self.device)
        self.graph_meta: torch.Tensor | None = None
        if max_seqs is not None:
            with torch.inference_mode(False):  # an inference tensor could not be refilled outside inference mode
                self.graph_meta = torch.zeros(
                    (max_seqs, META + max_blocks_per_seq), dtype=torch.int32, device=self.device
                )
                # a graph step's one upload: the three head columns of every row, then the table rows
                self._graph_upload = torch.zeros(max_seqs * (META + 1), dtype=torch.int32, device=self.device)

    # -- eager steps ---------------------------------------------------------------------------------

    def eager(self, seqs: list[tuple]) -> Step:
        """The metadata of an eager step of ``(blocks, start, num_new_tokens[, table_row])`` sequences."""
        cols = columns(seqs)
        if cols is None:
            return self._eager_host(seqs)
        table = self.kv.block_table
        table.flush()
        lengths, bs, block_m = table.lengths, self.kv.block_size, self.block_m
        if seqs and min(cols[2]) == max(cols[2]) == 1:
            return self._eager_decode(cols, table)
        slots, dec_head, dec_rows = array.array("i"), array.array("i"), array.array("i")
        pf_head, pf_rows, qblocks = array.array("i"), array.array("i"), array.array("i")
        w_dec = w_pf = q_row = 0
        for i, (blocks, start, n, row) in enumerate(seqs):
            if n < 1:
                continue
            ctx = start + n
            need = -(-ctx // bs)
            if lengths[row] < need:
                raise ValueError(
                    f"sequence {i} has {lengths[row]} blocks in its table row but {ctx} tokens need {need}"
                )
            if n == 1:
                slot = blocks[start // bs] * bs + start % bs
                slots.append(slot)
                dec_head.extend((ctx, q_row, slot))
                dec_rows.append(row)
                w_dec = max(w_dec, need)
            else:
                append_slots(slots, blocks, start, ctx, bs)
                for m0 in range(0, n, block_m):
                    qblocks.extend((len(pf_rows), m0))
                pf_head.extend((ctx, q_row, n))
                pf_rows.append(row)
                w_pf = max(w_pf, need)
            q_row += n
        if not slots:
            return Step(0, None, 1, None, 1, None, None)
        nd, npf = len(dec_rows), len(pf_rows)
        meta = self._staging.upload(slots + dec_head + pf_head + qblocks + dec_rows + pf_rows)
        parts = meta.split([q_row, META * nd, META * npf, len(qblocks), nd, npf])
        tab = table.table
        dec = torch.cat((parts[1].view(nd, META), tab[:, :w_dec].index_select(0, parts[4])), dim=1) if nd else None
        pf = torch.cat((parts[2].view(npf, META), tab[:, :w_pf].index_select(0, parts[5])), dim=1) if npf else None
        return Step(q_row, parts[0], 1, dec, self.splits_for(nd), pf, parts[3].view(-1, 2) if npf else None)

    def _eager_decode(self, cols: tuple[tuple, ...], table: BlockTable) -> Step:
        """A decode-only step over device rows: columnar host work, one copy, one gather."""
        head, slots, width = decode_heads(cols, table.lengths, self.kv.block_size)
        n = len(slots)
        meta = self._staging.upload(array.array("i", slots) + head + array.array("i", cols[3]))
        parts = meta.split([n, META * n, n])
        dec = torch.cat((parts[1].view(n, META), table.table[:, :width].index_select(0, parts[2])), dim=1)
        return Step(n, parts[0], 1, dec, self.splits_for(n), None, None)

    def _eager_host(self, seqs: list[tuple]) -> Step:
        """The host path: block tables packed on the host from each sequence's block list."""
        bs = self.kv.block_size
        slots = array.array("i")
        dec: list[tuple[int, int, int, list[int]]] = []
        pf: list[tuple[int, int, int, list[int]]] = []
        qblocks: list[int] = []
        row = 0
        for i, (blocks, start, n, *_) in enumerate(seqs):
            if n < 1:
                continue
            table = host_table(i, blocks, start + n, bs)
            append_slots(slots, blocks, start, start + n, bs)
            if n == 1:
                dec.append((start + 1, row, slots[-1], table))
            else:
                for m0 in range(0, n, self.block_m):
                    qblocks += (len(pf), m0)
                pf.append((start + n, row, n, table))
            row += n
        w_dec = META + max((len(r[3]) for r in dec), default=0)
        w_pf = META + max((len(r[3]) for r in pf), default=0)
        buf = slots
        pack_rows(buf, dec, w_dec - META)
        pack_rows(buf, pf, w_pf - META)
        buf.extend(qblocks)
        if not buf:
            return Step(0, None, 1, None, 1, None, None)
        meta = self._staging.upload(buf)
        parts = meta.split([row, len(dec) * w_dec, len(pf) * w_pf, len(qblocks)])
        return Step(
            row,
            parts[0],
            1,
            parts[1].view(len(dec), w_dec) if dec else None,
            self.splits_for(len(dec)),
            parts[2].view(len(pf), w_pf) if pf else None,
            parts[3].view(-1, 2) if pf else None,
        )

    # -- CUDA-graph steps ----------------------------------------------------------------------------

    def graph(self, seqs: list[tuple], batch_size: int) -> Step:
        """Refill the persistent buffer for a decode step of ``seqs`` padded to ``batch_size`` rows
        (the gather and copies run on the current stream, outside any graph, before the replay)."""
        if self.graph_meta is None:
            raise ValueError("begin_graph_step needs the attention built with max_seqs and max_blocks_per_seq")
        max_seqs, width = self.graph_meta.shape
        if not len(seqs) <= batch_size <= max_seqs or batch_size < 1:
            raise ValueError(
                f"batch_size {batch_size} must be at least 1, at least the {len(seqs)} sequences "
                f"given, and at most max_seqs ({max_seqs})"
            )
        cols = columns(seqs)
        table = self.kv.block_table
        if cols is not None:
            table.flush()
        else:
            blocks, starts, ns, *_ = zip(*seqs)
            cols = (blocks, starts, ns, None)
        head, _, used = decode_heads(cols, table.lengths, self.kv.block_size, width - META)
        n = len(seqs)
        for i in range(n, batch_size):  # padding rows: no context, no write
            head.extend((0, i, -1))
        static = self.graph_meta[:batch_size]
        if cols[3] is not None:
            dev = self._staging.upload(head + array.array("i", cols[3]), out=self._graph_upload)
            static[:, :META].copy_(dev[: META * batch_size].view(batch_size, META))
            if n:
                picked = dev[META * batch_size : META * batch_size + n]
                static[:n, META : META + used].copy_(table.table[:, :used].index_select(0, picked))
        else:
            # only the columns this batch uses are copied (a kernel reads no entry past its context)
            buf = array.array("i")
            tables = [b[: s // self.kv.block_size + 1] for b, s in zip(cols[0], cols[1])]
            heads = [tuple(head[3 * i : 3 * i + 3]) for i in range(batch_size)]
            pack_rows(buf, [(*h, t) for h, t in zip(heads, tables + [[]] * (batch_size - n))], used)
            static[:, : META + used].copy_(self._staging.upload(buf).view(batch_size, META + used))
        return Step(batch_size, static[:, 2], width, static, self.splits_for(batch_size), None, None)


def host_table(i: int, blocks: list[int], ctx: int, bs: int) -> list[int]:
    """The first blocks of sequence ``i`` that hold its ``ctx`` tokens."""
    need = -(-ctx // bs)
    if len(blocks) < need:
        raise ValueError(f"sequence {i} has {len(blocks)} blocks but {ctx} tokens need {need}")
    return blocks[:need]
