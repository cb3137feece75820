"""The device block table: rows held once, only new entries written, rows reused after a free, and
the Triton attention reading it (through the scheduler's rows) against the SDPA oracle over many
steps of mixed prefill / decode batches with preemption and block reuse."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from loraserve.plugins.attention_triton.attention import PagedTritonAttention  # noqa: E402
from loraserve.runner.attention import PagedSDPAAttention  # noqa: E402
from loraserve.sched.block_table import BlockTable  # noqa: E402
from loraserve.sched.kv_cache import KVCache  # noqa: E402
from loraserve.sched.request import Request  # noqa: E402
from loraserve.sched.scheduler import Scheduler  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class _Params:
    max_new_tokens = 4


def make_request(rid: str, n_prompt: int) -> Request:
    return Request(request_id=rid, prompt_ids=list(range(1, n_prompt + 1)), params=_Params())


# -- the table on its own ---------------------------------------------------------------------------


def test_rows_and_width_grow_and_entries_match():
    table = BlockTable(DEVICE, max_rows=9, max_width=20, rows=2, width=2)
    rows = [table.acquire() for _ in range(5)]  # past the initial 2 rows
    assert rows == [0, 1, 2, 3, 4]
    held = {r: [] for r in rows}
    for step, r in enumerate(rows):
        new = list(range(10 * r, 10 * r + step + 2))  # up to 6 blocks: past the initial width
        table.append(r, new)
        held[r] += new
    table.check_integrity(held.items())  # pending writes count as written
    table.flush()
    assert tuple(table.table.shape) == (8, 8)
    table.check_integrity(held.items())
    for r, blocks in held.items():
        assert table.table[r, : len(blocks)].tolist() == blocks
    with pytest.raises(ValueError, match="max_width"):
        table.append(rows[0], list(range(20)))


def test_integrity_check_catches_a_wrong_entry_a_shared_row_and_a_lost_row():
    table = BlockTable(DEVICE, max_rows=4, max_width=4)
    a, b = table.acquire(), table.acquire()
    table.append(a, [3, 1])
    table.append(b, [2])
    table.flush()
    with pytest.raises(RuntimeError, match="holds"):
        table.check_integrity([(a, [3, 0]), (b, [2])])
    with pytest.raises(RuntimeError, match="two requests"):
        table.check_integrity([(a, [3, 1]), (a, [3, 1])])
    with pytest.raises(RuntimeError, match="held by no request"):
        table.check_integrity([(a, [3, 1])])
    with pytest.raises(ValueError, match="not held"):
        table.release(3)
    table.check_integrity([(a, [3, 1]), (b, [2])])


def test_released_row_drops_its_pending_writes_and_is_reused():
    table = BlockTable(DEVICE, max_rows=4, max_width=4)
    a = table.acquire()
    table.append(a, [1, 2, 3])
    table.release(a)
    table.flush()
    assert table.entries_written == 0  # nothing of a released row reaches the device
    b = table.acquire()
    assert b == a and table.length(b) == 0
    table.append(b, [0])
    table.flush()
    assert table.entries_written == 1
    table.check_integrity([(b, [0])])


# -- through the scheduler --------------------------------------------------------------------------


def step(sched: Scheduler, rng) -> list:
    """Schedule a step and account for it as the engine would (tokens computed, one sampled)."""
    plan = sched.schedule()
    for c in plan:
        c.request.num_computed = c.start + c.num_tokens
        if c.samples:
            c.request.output_ids.append(int(rng.integers(1, 100)))
    return plan


def test_only_new_blocks_are_written_and_rows_are_reused_after_a_finish():
    import numpy as np

    rng = np.random.default_rng(0)
    kv = KVCache(1, 1, 2, 40, 4, torch.float32, DEVICE)
    sched = Scheduler(kv, max_running=3, step_tokens=16, chunk_size=7)
    reqs = [make_request(f"r{i}", n) for i, n in enumerate((9, 2, 13, 5, 1))]
    for r in reqs:
        sched.add(r)
    table = kv.block_table
    rows_seen: dict[int, set[str]] = {}
    for _ in range(25):
        before = {r: len(r.blocks) for r in reqs}
        written = table.entries_written
        plan = step(sched, rng)
        table.flush()
        gained = sum(len(r.blocks) - before[r] for r in reqs if r.table_row >= 0)
        assert table.entries_written - written == gained  # the new blocks' entries, nothing else
        for c in plan:
            assert c.table_row == c.request.table_row >= 0
            rows_seen.setdefault(c.table_row, set()).add(c.request.request_id)
        sched.check_integrity()
        for r in [r for r in sched.running if len(r.output_ids) >= 3]:
            sched.remove(r)  # finished: its row goes back
            assert r.table_row == -1 and not r.blocks
        sched.check_integrity()
    assert all(len(r.output_ids) >= 3 for r in reqs)
    assert max(len(ids) for ids in rows_seen.values()) > 1  # a row held by one request, then another
    assert table.num_held == 0


def test_preemption_gives_the_row_back():
    kv = KVCache(1, 1, 2, 4, 2, torch.float32, DEVICE)
    sched = Scheduler(kv, max_running=4, step_tokens=64, chunk_size=64)
    a, b = make_request("a", 4), make_request("b", 4)  # two blocks each: the cache is full
    sched.add(a)
    sched.add(b)
    for c in sched.schedule():
        c.request.num_computed = c.start + c.num_tokens
        c.request.output_ids.append(5)
    sched.check_integrity()
    assert b.table_row >= 0 and kv.block_table.num_held == 2
    for c in sched.schedule():  # a's decode needs a third block: b is preempted
        c.request.num_computed = c.start + c.num_tokens
    assert b.num_preemptions == 1 and b.table_row == -1 and not b.blocks
    assert kv.block_table.num_held == 1 and kv.block_table.length(a.table_row) == 3
    sched.check_integrity()
    kv.block_table.flush()
    sched.check_integrity()


# -- the Triton attention over the scheduler's rows, against the oracle ----------------------------


def run_against_oracle(gen, *, steps, arrivals_until, num_blocks, block_size, **sched_kwargs):
    """Drive a scheduler over random requests (new ones arrive as others finish, until step
    ``arrivals_until``); every step goes through the Triton attention with device block-table rows
    (decode-only steps through the CUDA-graph path, padded by one row) and through the SDPA oracle
    with the host block lists; outputs and caches must agree."""
    import numpy as np

    rng = np.random.default_rng(1)
    h, hkv, d, layers = 2, 1, 16, 2
    tri_kv = KVCache(layers, hkv, d, num_blocks, block_size, torch.float32, DEVICE)
    ora_kv = KVCache(layers, hkv, d, num_blocks, block_size, torch.float32, DEVICE)
    for i in range(layers):
        for t, o in ((tri_kv.k[i], ora_kv.k[i]), (tri_kv.v[i], ora_kv.v[i])):
            t.copy_(torch.randn(t.shape, generator=gen))
            o.copy_(t)
    max_seqs = 8
    tri = PagedTritonAttention(tri_kv, max_seqs=max_seqs, max_blocks_per_seq=num_blocks, num_splits=2)
    ora = PagedSDPAAttention(ora_kv)
    sched = Scheduler(tri_kv, max_running=max_seqs, **sched_kwargs)
    # a tensor-parallel worker's table, following the journal of this one
    tri_kv.block_table.journal = []
    replica, host_rows = BlockTable(DEVICE, max_rows=num_blocks, max_width=num_blocks, rows=1, width=1), {}
    made = 0
    graphs = preempted = 0

    def arrive():
        nonlocal made
        sched.add(make_request(f"r{made}", int(rng.integers(1, 23))))
        made += 1

    for _ in range(5):
        arrive()
    for s in range(steps):
        plan = sched.schedule()
        sched.check_integrity()
        replica.replay(tri_kv.block_table.take_journal(), host_rows)
        holders = [(r.table_row, r.blocks) for r in (*sched.running, *sched.waiting) if r.table_row >= 0]
        replica.check_integrity(holders)  # the replica's rows hold exactly the requests' blocks
        assert sorted(host_rows) == sorted(r for r, _ in holders)
        assert all(host_rows[r] == blocks for r, blocks in holders)
        if not plan:
            break
        if s == arrivals_until:
            assert preempted > 0  # preemption happened while the cache was crowded
        seqs = [(c.request.blocks, c.start, c.num_tokens, c.table_row) for c in plan]
        T = sum(c.num_tokens for c in plan)
        decode_only = all(c.num_tokens == 1 for c in plan)
        if decode_only:
            b = min(max_seqs, len(plan) + 1)
            tri.begin_graph_step(seqs, b)
            graphs += 1
        else:
            b = T
            tri.begin_step(seqs)
        ora.begin_step([sq[:3] for sq in seqs])
        layer = s % layers
        q, k, v = (torch.randn(b, n, d, generator=gen).to(DEVICE) for n in (h, hkv, hkv))
        out = tri.attention(layer, q, k, v)
        ref = ora.attention(layer, q[:T], k[:T], v[:T])
        torch.testing.assert_close(out[:T], ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(tri_kv.k[layer], ora_kv.k[layer]) and torch.equal(tri_kv.v[layer], ora_kv.v[layer])
        for c in plan:
            c.request.num_computed = c.start + c.num_tokens
            if c.samples:
                c.request.output_ids.append(int(rng.integers(1, 100)))
        for r in list(sched.running):
            preempted = max(preempted, r.num_preemptions)
            if len(r.output_ids) >= int(rng.integers(3, 12)):
                sched.remove(r)
                if s < arrivals_until:
                    arrive()
        sched.check_integrity()
    return graphs, preempted, made


def test_attention_over_device_rows_matches_sdpa_with_preemption_and_reuse(gen):
    # a cache of 24 blocks of 3 tokens for up to 8 requests of up to ~34 tokens: preemptions,
    # blocks and rows handed from one request to the next
    graphs, preempted, made = run_against_oracle(
        gen, steps=26, arrivals_until=12, num_blocks=24, block_size=3, step_tokens=19, chunk_size=5
    )
    assert preempted > 0 and made > 8 and graphs > 2


def test_sequences_without_rows_take_the_host_path(gen):
    kv = KVCache(1, 1, 16, 12, 4, torch.float32, DEVICE)
    ora_kv = KVCache(1, 1, 16, 12, 4, torch.float32, DEVICE)
    for t, o in ((kv.k[0], ora_kv.k[0]), (kv.v[0], ora_kv.v[0])):
        t.copy_(torch.randn(t.shape, generator=gen))
        o.copy_(t)
    tri, ora = PagedTritonAttention(kv), PagedSDPAAttention(ora_kv)
    seqs = [([7, 2, 9], 9, 1, -1), ([4, 0], 1, 5)]  # a row of -1, and the three-field form
    tri.begin_step(seqs)
    ora.begin_step(seqs)
    q, k, v = (torch.randn(6, n, 16, generator=gen).to(DEVICE) for n in (2, 1, 1))
    torch.testing.assert_close(tri.attention(0, q, k, v), ora.attention(0, q, k, v), rtol=1e-5, atol=1e-5)
    assert kv.block_table.entries_written == 0  # the table was never read


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cuda_graph_replays_with_device_rows():
    """A real capture, replayed with rows of the device table (released and reused in between)."""
    gen = torch.Generator().manual_seed(8)
    b, h, hkv, d, bs, num_blocks, layer = 16, 32, 8, 128, 16, 2048, 1
    tri_kv = KVCache(2, hkv, d, num_blocks, bs, torch.bfloat16, DEVICE)
    ora_kv = KVCache(2, hkv, d, num_blocks, bs, torch.float32, DEVICE)
    for i in range(2):
        for t, o in ((tri_kv.k[i], ora_kv.k[i]), (tri_kv.v[i], ora_kv.v[i])):
            t.copy_(torch.randn(t.shape, generator=gen).to(torch.bfloat16))
            o.copy_(t)
    tri = PagedTritonAttention(tri_kv, max_seqs=b, max_blocks_per_seq=128)
    ora = PagedSDPAAttention(ora_kv)
    q, k, v = (torch.randn(b, n, d, generator=gen).to(torch.bfloat16).to(DEVICE) for n in (h, hkv, hkv))
    tri.begin_graph_step([], b)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        tri.attention(layer, q, k, v)  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tri.attention(layer, q, k, v)
    table, held = tri_kv.block_table, []
    for n, top in ((b - 3, 2000), (b, 300), (b - 1, 1900)):
        for row in held:
            table.release(row)
        held.clear()
        perm = torch.randperm(num_blocks, generator=gen).tolist()
        seqs = []
        for s in torch.randint(0, top, (n,), generator=gen).tolist():
            need = s // bs + 2  # one block more than the context needs
            blocks, perm = perm[:need], perm[need:]
            row = table.acquire()
            table.append(row, blocks[:1])
            table.append(row, blocks[1:])  # two runs of one row in one flush
            seqs.append((blocks, s, 1, row))
            held.append(row)
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, generator=gen).to(torch.bfloat16))
        tri.begin_graph_step(seqs, b)
        graph.replay()
        ora.begin_step([sq[:3] for sq in seqs])
        ref = ora.attention(layer, q[:n].float(), k[:n].float(), v[:n].float())
        torch.testing.assert_close(out[:n].float(), ref, rtol=2e-2, atol=2e-2)
        assert torch.equal(tri_kv.k[layer].float(), ora_kv.k[layer])
        table.check_integrity((row, blocks) for (blocks, _, _, row) in seqs)
