"""Descriptors, compatibility checks, head slicing for mixed TP (including GQA replication)."""

from __future__ import annotations

import msgspec
import pytest

import nvshmem_kv as nk
from tests.transport.helpers import make_desc


def test_head_range_splits_and_replicates() -> None:
    assert [nk.head_range(r, 2, 4) for r in range(2)] == [(0, 2), (2, 4)]
    assert [nk.head_range(r, 2, 3) for r in range(2)] == [(0, 1), (1, 3)]
    assert [nk.head_range(r, 4, 2) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [nk.owns_heads(r, 4, 2) for r in range(4)] == [True, False, True, False]


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("src_tp", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dst_tp", [1, 2, 3, 4, 8])
def test_every_destination_head_written_exactly_once(heads: int, src_tp: int, dst_tp: int) -> None:
    for d in range(dst_tp):
        dst = make_desc(heads=heads, tp_rank=d, tp_size=dst_tp)
        d0, d1 = dst.head_range
        written: list[int] = []
        for s in range(src_tp):
            src = make_desc(heads=heads, tp_rank=s, tp_size=src_tp)
            for hs in nk.plan_head_slices(src, dst):
                s0, _ = src.head_range
                src_heads = list(range(s0 + hs.src_start, s0 + hs.src_start + hs.count))
                dst_heads = list(range(d0 + hs.dst_start, d0 + hs.dst_start + hs.count))
                assert src_heads == dst_heads, "a slice must map each global head onto itself"
                written += dst_heads
        assert sorted(written) == list(range(d0, d1))
        assert nk.writers_for(dst, src_tp) == [
            s for s in range(src_tp) if nk.plan_head_slices(make_desc(heads=heads, tp_rank=s, tp_size=src_tp), dst)]


def test_replicated_heads_lowest_source_rank_writes() -> None:
    dst = make_desc(heads=1)
    srcs = [make_desc(heads=1, tp_rank=r, tp_size=2) for r in range(2)]
    assert nk.plan_head_slices(srcs[0], dst) == [nk.HeadSlice(0, 0, 1)]
    assert nk.plan_head_slices(srcs[1], dst) == []
    assert nk.writers_for(dst, 2) == [0]
    # one prefill rank feeds both replicated decode ranks
    for r in range(2):
        assert nk.plan_head_slices(make_desc(heads=1), make_desc(heads=1, tp_rank=r, tp_size=2)) == [
            nk.HeadSlice(0, 0, 1)]


@pytest.mark.parametrize("field,value", [("dtype", "float32"), ("page_size", 8), ("num_layers", 4),
                                         ("head_dim", 16), ("total_kv_heads", 6)])
def test_mismatch_names_the_field(field: str, value: object) -> None:
    a = make_desc()
    kwargs = {f: getattr(a, f) for f in a.__dataclass_fields__}
    kwargs[field] = value
    if field == "total_kv_heads":
        kwargs["kv_heads_local"] = value
    with pytest.raises(nk.TransportError, match=field):
        a.check_compatible(nk.PoolDescriptor(**kwargs))


def test_pages_and_tp_may_differ() -> None:
    make_desc(num_pages=16).check_compatible(make_desc(num_pages=99, tp_rank=1, tp_size=3))


def test_descriptor_validation_and_serialization() -> None:
    with pytest.raises(ValueError, match="kv_heads_local"):
        nk.PoolDescriptor("bfloat16", 2, 4, 16, 3, 2, 64)
    with pytest.raises(ValueError, match="dtype"):
        nk.PoolDescriptor("complex64", 2, 4, 16, 3, 3, 64)
    d = make_desc(tp_rank=1, tp_size=2)
    assert msgspec.json.decode(msgspec.json.encode(d), type=nk.PoolDescriptor) == d
    h = nk.PoolHandle(backend="shm", descriptor=d, host="127.0.0.1", port=1234, token="t", shm_name="x")
    assert nk.PoolHandle.from_json(h.to_json()) == h
    bad = h.to_json().replace(b'"kv_heads_local":2', b'"kv_heads_local":3')
    with pytest.raises(nk.TransportError, match="kv_heads_local"):
        nk.PoolHandle.from_json(bad)


def test_from_tensor_and_sizes() -> None:
    import torch

    kv = torch.zeros(2, 30, 8, 16, 3, 64, dtype=torch.bfloat16)
    d = nk.PoolDescriptor.from_tensor(kv, total_kv_heads=3)
    assert d.shape == tuple(kv.shape) and d.dtype == "bfloat16"
    assert d.page_bytes == 16 * 3 * 64 * 2 and d.pool_bytes == kv.numel() * 2
