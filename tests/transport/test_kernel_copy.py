"""The shared page-copy kernel path (kernels.copy_pages through a raw pool address), exercised on
CPU shared memory under the Triton interpreter; cuda_ipc uses the same code on a GPU."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import nvshmem_kv as nk
from tests.transport.helpers import make_desc
from tests.transport.transport_workers import bits, global_kv

pytestmark = pytest.mark.timeout(120)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_shm_kernel_copy_is_bit_exact(receivers: list[nk.KVTransport]) -> None:
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    src_desc, dst_desc = make_desc(6, layers=2, page_size=2, heads=2, head_dim=4), make_desc(9, layers=2, page_size=2,
                                                                                            heads=2, head_dim=4)
    rx, tx = nk.create("shm"), nk.create("shm", copy="kernel")
    receivers += [rx, tx]
    pool = rx.allocate_pool(dst_desc)
    peer = tx.connect(rx.register_pool(pool, dst_desc), src_desc)
    src = global_kv(src_desc, 7)
    rx.expect("k", 1, 30.0)
    src_pages, dst_pages = [5, 0, 1, 3], [2, 8, 4, 0]
    for layer in range(src_desc.num_layers):
        tx.write(peer, "k", layer, src, src_pages, dst_pages)
    tx.signal(peer, "k", b"")
    assert rx.wait("k", 30.0).done
    assert torch.equal(bits(pool[:, :, dst_pages]), bits(src[:, :, src_pages]))
    untouched = [p for p in range(dst_desc.num_pages) if p not in dst_pages]
    assert not bits(pool[:, :, untouched]).any()


def test_kernel_copy_refuses_partial_head_slices(receivers: list[nk.KVTransport]) -> None:
    dst = make_desc(4, heads=2)
    rx, tx = nk.create("shm"), nk.create("shm", copy="kernel")
    receivers += [rx, tx]
    pool = rx.allocate_pool(dst)
    peer = tx.connect(rx.register_pool(pool, dst), make_desc(4, heads=2, tp_rank=1, tp_size=2))
    with pytest.raises(nk.TransportError, match="whole pages"):
        tx.write(peer, "p", 0, torch.zeros(peer.local.shape, dtype=torch.bfloat16), [0], [0])
    with pytest.raises(ValueError, match="copy"):
        nk.create("shm", copy="memcpy")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_warm_kernel_copy_compiles_on_a_scratch_copy_and_only_reads_the_pool() -> None:
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    from nvshmem_kv.page_copy import warm_kernel_copy

    desc = make_desc(5, layers=2, page_size=2, heads=2, head_dim=4)
    kv = global_kv(desc, 3)
    before = bits(kv).clone()
    assert warm_kernel_copy(kv, desc) == 2 * 2 * 5  # a small pool: every page (K and V, each layer)
    assert warm_kernel_copy(kv, desc, pages=4) == 4
    assert torch.equal(bits(kv), before)


def test_plan_rows_address_each_layers_k_and_v_pages_in_both_pools() -> None:
    from nvshmem_kv.page_copy import make_plan

    src, dst = make_desc(6, layers=3), make_desc(9, layers=3)
    plan = make_plan(src, dst, 4096, (5, 0), (8, 2), torch.device("cpu"))
    for layer in range(3):  # the pools flattened to (2 * layers * pages): K of layer l at l * pages, V after all K
        assert plan.src_rows[layer].tolist() == [layer * 6 + 5, layer * 6, 18 + layer * 6 + 5, 18 + layer * 6]
        assert plan.dst_rows[layer].tolist() == [layer * 9 + 8, layer * 9 + 2, 27 + layer * 9 + 8, 27 + layer * 9 + 2]
        assert plan.src_rows[layer].is_contiguous() and plan.dst_rows[layer].is_contiguous()
    assert plan.pool_index.tolist() == [0, 0, 0, 0] and plan.table.tolist() == [4096]
    with pytest.raises(nk.TransportError, match="layers"):
        make_plan(src, make_desc(9, layers=2), 4096, (5,), (8,), torch.device("cpu"))
