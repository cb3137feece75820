"""LoRABatchInfo from one packed host-to-device copy equals the fields built one copy each; the
graph buffers' refill equals the lists it is given; HostStaging copies what it is given."""

from __future__ import annotations

import array

import pytest
import torch

from loraserve.contract import LoRABatchInfo
from loraserve.lora.graph_buffers import GraphBatchInfoBuffers
from loraserve.staging import HostStaging

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def separate_copies(seg_lens, seg_slot, ranks, scalings):
    """The fields as the batch info used to build them: one tensor, one copy each."""
    indptr = [0]
    for n in seg_lens:
        indptr.append(indptr[-1] + n)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    return {
        "seg_indptr": torch.tensor(indptr, **i32),
        "seg_slot": torch.tensor(seg_slot, **i32),
        "token_slot": torch.tensor([s for s, n in zip(seg_slot, seg_lens) for _ in range(n)], **i32),
        "ranks": torch.tensor(ranks, **i32),
        "scalings": torch.tensor(scalings, dtype=torch.float32, device=DEVICE),
    }


@pytest.mark.parametrize("num_segments,num_slots", [(1, 1), (5, 3), (7, 9), (0, 2)])
@pytest.mark.parametrize("staged", [False, True])
def test_packed_batch_info_equals_separate_copies(gen, num_segments, num_slots, staged):
    seg_lens = torch.randint(0, 6, (num_segments,), generator=gen).tolist()
    seg_slot = torch.randint(0, num_slots, (num_segments,), generator=gen).tolist()
    ranks = torch.randint(0, 9, (num_slots,), generator=gen).tolist()
    scalings = (torch.randn(num_slots, generator=gen) * 3).tolist()  # float64 values, rounded to float32
    staging = HostStaging(DEVICE) if staged else None
    for _ in range(3):  # the staging's two buffers in turn, and the first again
        info = LoRABatchInfo.build(seg_lens, seg_slot, ranks, scalings, 8, device=DEVICE, staging=staging)
        want = separate_copies(seg_lens, seg_slot, ranks, scalings)
        for name, expected in want.items():
            got = getattr(info, name)
            assert got.dtype == expected.dtype and got.device == expected.device, name
            assert torch.equal(got, expected), name
            assert got.data_ptr() % 16 == 0, f"{name} is not 16-byte aligned"
        assert info.num_tokens == sum(seg_lens) and info.num_segments == num_segments
        assert info.seg_indptr_host == want["seg_indptr"].tolist() and info.seg_slot_host == seg_slot
        assert info.ranks_host == ranks and info.scalings_host == scalings


def test_graph_buffers_refill_equals_the_lists(gen):
    bufs = GraphBatchInfoBuffers(num_slots=3, max_rank=8, max_tokens=6, device=torch.device(DEVICE))
    info = bufs.capture_info(5)
    for seg_slot in ([2, 0, 1], [1, 1, 0, 2, 2], []):
        ranks = torch.randint(0, 9, (3,), generator=gen).tolist()
        scalings = torch.randn(3, generator=gen).tolist()
        bufs.fill(seg_slot, ranks, scalings, 5)
        assert info.seg_slot.tolist() == seg_slot + [3] * (5 - len(seg_slot))  # padding: the null slot
        assert info.ranks.tolist() == ranks + [0]
        assert torch.equal(info.scalings, torch.tensor(scalings + [0.0], dtype=torch.float32, device=DEVICE))
    with pytest.raises(ValueError, match="padded to 7"):
        bufs.fill([0], [1, 1, 1], [1.0] * 3, 7)


def test_host_staging_copies_into_a_new_tensor_or_into_out():
    staging = HostStaging(DEVICE, capacity=2)
    out = torch.full((10,), -5, dtype=torch.int32, device=DEVICE)
    for n in (1, 7, 3, 9):  # grows past its capacity
        values = array.array("i", range(100 * n, 100 * n + n))
        assert staging.upload(values).tolist() == list(values)
        assert staging.upload(values, out=out) is out and out[:n].tolist() == list(values)
    with pytest.raises(ValueError, match="typecode"):
        staging.upload(array.array("l", [1]))
    with pytest.raises(ValueError, match="at least 12"):
        staging.upload(array.array("i", range(12)), out=out)
