"""The nvshmem backend's put addresses, checked on CPU by replaying each put as a memmove between
two CPU pools (the GPU run itself is in test_gpu.py)."""

from __future__ import annotations

import ctypes

import pytest
import torch

import nvshmem_kv as nk
from nvshmem_kv.backends.nvshmem import put_list
from nvshmem_kv.pages import coalesce_runs
from tests.transport.helpers import make_desc
from tests.transport.transport_workers import bits, global_kv, local_kv


@pytest.mark.parametrize("heads,src_tp,src_rank,dst_tp,dst_rank", [
    (3, 1, 0, 1, 0), (3, 2, 1, 1, 0), (4, 1, 0, 2, 1), (4, 2, 0, 4, 1), (1, 2, 0, 2, 1)])
def test_put_list_lands_every_head_slice(heads: int, src_tp: int, src_rank: int, dst_tp: int, dst_rank: int) -> None:
    src_desc = make_desc(7, heads=heads, layers=3, tp_rank=src_rank, tp_size=src_tp)
    dst_desc = make_desc(11, heads=heads, layers=3, tp_rank=dst_rank, tp_size=dst_tp)
    slices = nk.plan_head_slices(src_desc, dst_desc)
    assert slices
    src = local_kv(src_desc, 5)
    dst = torch.zeros(dst_desc.shape, dtype=src.dtype)
    src_pages, dst_pages = [0, 1, 2, 6, 4], [3, 4, 5, 10, 0]
    runs = coalesce_runs(src_pages, dst_pages)
    layer = 1
    puts = put_list(src_desc, dst_desc, layer, runs, slices, src.data_ptr(), dst.data_ptr())
    for d, s, n in puts:
        assert dst.data_ptr() <= d and d + n <= dst.data_ptr() + dst.numel() * dst.element_size()
        ctypes.memmove(d, s, n)
    full = global_kv(make_desc(7, heads=heads, layers=3), 5)
    s0, _ = src_desc.head_range
    d0, _ = dst_desc.head_range
    hs = slices[0]
    want = torch.zeros_like(dst)
    want[:, layer, dst_pages, :, hs.dst_start:hs.dst_start + hs.count] = \
        full[:, layer, src_pages, :, d0 + hs.dst_start:d0 + hs.dst_start + hs.count]
    assert torch.equal(bits(dst), bits(want))
    full_heads = hs.count == src_desc.kv_heads_local == dst_desc.kv_heads_local
    assert len(puts) == (2 * len(runs) if full_heads else 2 * len(src_pages) * src_desc.page_size)
    assert s0 + hs.src_start == d0 + hs.dst_start
