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
    # room "k": scattered pages (the per-page kernel); room "r": a run of four pages consecutive at both
    # ends and a lone page (the runs' kernel); each into its own destination pages
    for room, src_pages, dst_pages in (("k", [5, 0, 1, 3], [2, 8, 4, 0]), ("r", [1, 2, 3, 4, 0], [5, 6, 7, 8, 2])):
        pool.zero_()
        rx.expect(room, 1, 30.0)
        for layer in range(src_desc.num_layers):
            tx.write(peer, room, layer, src, src_pages, dst_pages)
        tx.signal(peer, room, b"")
        assert rx.wait(room, 30.0).done
        assert torch.equal(bits(pool[:, :, dst_pages]), bits(src[:, :, src_pages]))
        untouched = [p for p in range(dst_desc.num_pages) if p not in dst_pages]
        assert not bits(pool[:, :, untouched]).any()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_shm_kernel_copy_moves_each_tp_ranks_heads_into_one_decode_pool(receivers: list[nk.KVTransport],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill at TP 2 (3 KV heads: 1 on rank 0, 2 on rank 1), decode at TP 1: each rank's heads land as a
    slice of every token row, in one kernel launch a layer, compiled by `warm` (a TP rank's heads of a
    pool with every head, as a decode engine's is): connect and the writes compile nothing."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    import nvshmem_kv.transport as transport
    from tests.transport.transport_workers import local_kv

    warmed: list[object] = []
    real_warm = transport.warm_kernel_copy

    def warm(*args, **kwargs):  # records which copies compiled
        warmed.append(kwargs.get("rows"))
        return real_warm(*args, **kwargs)

    monkeypatch.setattr(transport, "warm_kernel_copy", warm)
    dst_desc = make_desc(9, layers=2, page_size=2, heads=3, head_dim=8)
    rx = nk.create("shm")
    receivers.append(rx)
    pool = rx.allocate_pool(dst_desc)
    handle = rx.register_pool(pool, dst_desc)
    src_pages, dst_pages = [1, 2, 3, 0, 5], [6, 7, 8, 2, 0]  # a run of three and two lone pages
    rx.expect("s", 2, 30.0)
    for rank in (0, 1):
        desc = make_desc(6, layers=2, page_size=2, heads=3, head_dim=8, tp_rank=rank, tp_size=2)
        tx = nk.create("shm", copy="kernel")
        receivers.append(tx)
        kv = local_kv(desc, 11)
        assert tx.warm(kv, desc) > 0
        assert len(warmed) == 2 * (rank + 1)  # whole pages and this rank's slice
        peer = tx.connect(handle, desc)
        for layer in range(desc.num_layers):
            tx.write(peer, "s", layer, kv, src_pages, dst_pages)
        tx.signal(peer, "s", b"")
        st = tx.stats()
        assert st.kernel_writes == st.writes == 2
        assert st.bytes_sent == 2 * 2 * len(src_pages) * desc.page_bytes  # K and V, two layers: its heads only
    assert rx.wait("s", 30.0).done
    src = global_kv(make_desc(6, layers=2, page_size=2, heads=3, head_dim=8), 11)
    assert torch.equal(bits(pool[:, :, dst_pages]), bits(src[:, :, src_pages]))
    assert not bits(pool[:, :, [p for p in range(9) if p not in dst_pages]]).any()
    # whole pages, then the rank's slice, at each `warm` (head 0 of 3, then heads 1-2 of 3); nothing since
    assert [w if w is None else (w.width, w.src_start, w.dst_start) for w in warmed] == [
        None, (8, 0, 0), None, (16, 0, 8)]


def test_copy_paths_are_checked() -> None:
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
    big = make_desc(40, layers=1, page_size=2, heads=2, head_dim=4)  # 80 pages: the runs' variant warms too
    kv = global_kv(big, 5)
    before = bits(kv).clone()
    assert warm_kernel_copy(kv, big) == 80
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
    for base in (0, 4104):  # the kernel's 16-byte stores would fault on the GPU: refused on the host
        with pytest.raises(nk.TransportError, match="not 16-byte aligned"):
            make_plan(src, dst, base, (5,), (8,), torch.device("cpu"))


def test_plan_copies_runs_of_pages_consecutive_at_both_ends() -> None:
    from nvshmem_kv.page_copy import RUN_BYTES, cut_runs, make_plan
    from nvshmem_kv.pages import coalesce_runs

    assert cut_runs(coalesce_runs((4, 5, 6, 7, 9, 1, 2), (0, 1, 2, 3, 4, 8, 7)), 3) == (
        (4, 7, 9, 1, 2), (0, 3, 4, 8, 7), (3, 1, 1, 1, 1))
    assert cut_runs(coalesce_runs((), ()), 4) == ((), (), ())
    src, dst = make_desc(8, layers=2), make_desc(9, layers=2)
    longest = RUN_BYTES // src.page_bytes
    plan = make_plan(src, dst, 4096, (2, 3, 4, 0), (5, 6, 7, 1), torch.device("cpu"))
    for layer in range(2):  # runs start at pages 2 and 0 (source), 5 and 1 (destination); K runs, then V
        assert plan.src_rows[layer].tolist() == [layer * 8 + 2, layer * 8, 16 + layer * 8 + 2, 16 + layer * 8]
        assert plan.dst_rows[layer].tolist() == [layer * 9 + 5, layer * 9 + 1, 18 + layer * 9 + 5, 18 + layer * 9 + 1]
    assert plan.run_pages.tolist() == [3, 1, 3, 1] and plan.max_run == 3
    assert plan.pool_index.tolist() == [0] * 4 and plan.table.tolist() == [4096]
    for part in (plan.src_rows, plan.dst_rows, plan.pool_index, plan.run_pages):  # aligned as the warm-up's
        assert part.data_ptr() % 16 == 0
    many = make_plan(src, dst, 4096, tuple(range(8)), tuple(range(8)), torch.device("cpu"))
    assert many.run_pages.tolist() == [min(8, longest)] * 2 and many.max_run == min(8, longest)
    scattered = make_plan(src, dst, 4096, (3, 1), (1, 3), torch.device("cpu"))
    assert scattered.run_pages is None and scattered.max_run == 1  # the per-page kernel
    # one pair among lone pages: runs would average under 2 pages, so page by page
    mostly_lone = make_plan(src, dst, 4096, (0, 1, 3, 5, 7), (0, 1, 4, 2, 6), torch.device("cpu"))
    assert mostly_lone.run_pages is None and mostly_lone.src_rows[0].tolist()[:5] == [0, 1, 3, 5, 7]
