"""Page copy through a table of raw destination base addresses vs copy_pages_ref."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from kernels.page_copy import copy_pages, copy_pages_ref, page_word_dtype


@pytest.mark.parametrize(
    "dtype,page_shape",
    [
        (torch.float32, (4, 2, 8)),
        (torch.float16, (4, 3, 5)),  # 120-byte pages: int64 words
        (torch.bfloat16, (2, 1, 3)),  # 12-byte pages: int32 words
        (torch.float16, (1, 1, 3)),  # 6-byte pages: int16 words
        (torch.bfloat16, (16, 3, 64)),  # SmolLM2's 6 KB page: 768 words, two chunks of the interpreter's 512
    ],
)
def test_matches_reference(device, dtype, page_shape):
    g = torch.Generator().manual_seed(0)
    src = torch.randn(6, *page_shape, generator=g).to(dtype).to(device)
    pools = [torch.zeros(5, *page_shape, dtype=dtype, device=device) for _ in range(3)]
    expect = [p.cpu().clone() for p in pools]
    dst_index = torch.tensor([0, 2, 2, 1, 0], device=device)
    src_pages = torch.tensor([5, 0, 3, 3, 1], dtype=torch.int32, device=device)
    dst_pages = torch.tensor([4, 0, 1, 1, 0], device=device)
    bases = torch.tensor([p.data_ptr() for p in pools], dtype=torch.int64, device=device)
    copy_pages(src, bases, dst_index, src_pages, dst_pages)
    copy_pages_ref(src.cpu(), expect, dst_index.cpu(), src_pages.cpu(), dst_pages.cpu())
    for got, want in zip(pools, expect):
        assert torch.equal(got.cpu(), want)  # bit-exact, whatever the dtype


def test_word_choice():
    assert page_word_dtype(torch.zeros(3, 4, 2, 8)) == torch.int64
    assert page_word_dtype(torch.zeros(3, 2, 1, 3, dtype=torch.bfloat16)) == torch.int32
    assert page_word_dtype(torch.zeros(3, 1, 1, 3, dtype=torch.float16)) == torch.int16


def test_strided_source_pages(device):
    # src pages taken every other page of a bigger pool: a page stride that is not the page size
    pool = torch.randn(8, 4, 2, 8, device=device)
    src = pool[::2]
    dst = torch.zeros(4, 4, 2, 8, device=device)
    idx = torch.arange(4, device=device)
    copy_pages(src, torch.tensor([dst.data_ptr()], device=device), torch.zeros_like(idx), idx, idx.flip(0))
    assert torch.equal(dst.cpu(), src.cpu().flip(0))


def test_nothing_to_copy(device):
    src = torch.randn(2, 4, device=device)
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    before = src.clone()
    copy_pages(src, torch.tensor([src.data_ptr()], device=device), empty, empty, empty)
    assert torch.equal(src, before)  # an empty copy list launches nothing and touches nothing


def _decode_side(pool: torch.Tensor, ready, done, result) -> None:  # pragma: no cover - child process
    ready.set()
    done.wait(30)
    result.put(pool.numpy().copy())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shared-memory transport path")
def test_cpu_shared_memory_pool_of_another_process():
    """A 'decode' process owns a shared-memory pool; this process writes pages into it by address."""
    ctx = mp.get_context("fork")
    pool = torch.zeros(4, 2, 2, 8).share_memory_()
    ready, done, result = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_decode_side, args=(pool, ready, done, result))
    proc.start()
    try:
        assert ready.wait(30)
        src = torch.randn(3, 2, 2, 8)
        copy_pages(
            src,
            torch.tensor([pool.data_ptr()]),
            torch.zeros(2, dtype=torch.int64),
            torch.tensor([2, 0]),
            torch.tensor([1, 3]),
        )
        done.set()
        seen = torch.from_numpy(result.get(timeout=30))
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    assert torch.equal(seen[1], src[2]) and torch.equal(seen[3], src[0])
    assert torch.all(seen[0] == 0) and torch.all(seen[2] == 0)


def test_untuned_copy_reports_no_config(device):
    from kernels._triton import autotune_enabled, interpreter_enabled
    from kernels.page_copy import copy_pages_configs

    src = torch.randn(3, 4, device=device)
    dst = torch.zeros_like(src)
    idx = torch.arange(3, device=device)
    copy_pages(src, torch.tensor([dst.data_ptr()], device=device), torch.zeros_like(idx), idx, idx)
    assert torch.equal(dst, src)
    tuned = copy_pages_configs()
    if interpreter_enabled() or not autotune_enabled():
        assert tuned == {}  # fixed configs: nothing to report
    else:
        assert any("PAGES" in c for c in tuned.values())  # the page size's choice, named with its meta


def test_destination_below_the_source(device):
    # the kernel addresses destinations from the source pointer: a negative distance must work too
    buf = torch.zeros(8, 4, 2, 8, device=device)
    dst, src = buf[:4], buf[4:]
    src.copy_(torch.randn(4, 4, 2, 8).to(device))
    idx = torch.arange(4, device=device)
    copy_pages(src, torch.tensor([dst.data_ptr()], device=device), torch.zeros_like(idx), idx, idx.flip(0))
    assert torch.equal(dst.cpu(), src.cpu().flip(0))


@pytest.mark.parametrize("dtype,page_shape", [(torch.float32, (4, 2, 8)), (torch.bfloat16, (16, 3, 64))])
def test_runs_of_pages_match_reference(device, dtype, page_shape):
    # runs of 1-3 pages, consecutive at both ends; max_run above the longest (the launch is sized by it);
    # SmolLM2's 6 KB pages: a 3-page run is 2304 words, five chunks of the interpreter's 512
    g = torch.Generator().manual_seed(1)
    src = torch.randn(9, *page_shape, generator=g).to(dtype).to(device)
    pools = [torch.zeros(8, *page_shape, dtype=dtype, device=device) for _ in range(2)]
    expect = [p.cpu().clone() for p in pools]
    dst_index = torch.tensor([1, 0, 1, 0], device=device)
    src_pages = torch.tensor([6, 0, 2, 5], device=device)
    dst_pages = torch.tensor([0, 5, 4, 1], device=device)
    runs = torch.tensor([3, 2, 1, 3], dtype=torch.int32, device=device)
    bases = torch.tensor([p.data_ptr() for p in pools], dtype=torch.int64, device=device)
    copy_pages(src, bases, dst_index, src_pages, dst_pages, runs, max_run=4)
    copy_pages_ref(src.cpu(), expect, dst_index.cpu(), src_pages.cpu(), dst_pages.cpu(), runs.cpu())
    for got, want in zip(pools, expect):
        assert torch.equal(got.cpu(), want)
    assert torch.equal(expect[1][0:3], src.cpu()[6:9]) and not expect[1][3].any()  # the reference itself


def test_runs_are_checked():
    src, dst = torch.randn(6, 4, 2), torch.zeros(6, 4, 2)
    bases, idx = torch.tensor([dst.data_ptr()]), torch.tensor([0, 3])
    with pytest.raises(ValueError, match=r"run_pages must lie in \[1, max_run=2\], got \[1, 3\]"):
        copy_pages(src, bases, torch.zeros_like(idx), idx, idx, torch.tensor([1, 3]), max_run=2)
    with pytest.raises(ValueError, match="run_pages must lie"):
        copy_pages(src, bases, torch.zeros_like(idx), idx, idx, torch.tensor([0, 1]), max_run=2)
    with pytest.raises(ValueError, match="run_pages must be contiguous with 2 entries"):
        copy_pages(src, bases, torch.zeros_like(idx), idx, idx, torch.tensor([1]), max_run=2)
    with pytest.raises(ValueError, match="max_run must be an int >= 1"):
        copy_pages(src, bases, torch.zeros_like(idx), idx, idx, torch.tensor([1, 1]), max_run=0)
    with pytest.raises(ValueError, match="packed source pages"):
        copy_pages(torch.randn(12, 4, 2)[::2], bases, torch.zeros_like(idx), idx, idx, torch.tensor([1, 1]), max_run=2)
    assert not dst.any()  # nothing was written by a refused call


@pytest.mark.parametrize(
    "dtype,rows_heads_dim,slice_heads",
    [
        # (rows, source heads, head dim), (heads copied, source start, destination heads, destination start)
        (torch.float32, (4, 2, 8), (1, 1, 4, 2)),
        (torch.bfloat16, (16, 2, 64), (2, 0, 4, 2)),  # a TP-2 prefill rank's half of SmolLM2-like pages
        (torch.float16, (2, 3, 3), (2, 1, 5, 0)),  # 6-byte heads: int16 words, no 16-byte alignment
    ],
)
@pytest.mark.parametrize("runs", [False, True])
def test_row_slices_match_reference(device, dtype, rows_heads_dim, slice_heads, runs):
    from kernels.page_copy import RowSlice

    rows, heads, dim = rows_heads_dim
    count, src_start, dst_heads, dst_start = slice_heads
    sl = RowSlice(rows, count * dim, heads * dim, src_start * dim, dst_heads * dim, dst_start * dim)
    g = torch.Generator().manual_seed(2)
    src = torch.randn(9, rows, heads, dim, generator=g).to(dtype).to(device)
    pools = [torch.zeros(8, rows, dst_heads, dim, dtype=dtype, device=device) for _ in range(2)]
    expect = [p.cpu().clone() for p in pools]
    dst_index = torch.tensor([1, 0, 1, 0], device=device)
    src_pages = torch.tensor([6, 0, 2, 5], device=device)
    dst_pages = torch.tensor([0, 5, 4, 1], device=device)
    run = torch.tensor([3, 2, 1, 3], device=device) if runs else None
    bases = torch.tensor([p.data_ptr() for p in pools], dtype=torch.int64, device=device)
    copy_pages(src, bases, dst_index, src_pages, dst_pages, run, max_run=3 if runs else 1, rows=sl)
    copy_pages_ref(src.cpu(), expect, dst_index.cpu(), src_pages.cpu(), dst_pages.cpu(),
                   run.cpu() if runs else None, rows=sl)
    for got, want in zip(pools, expect):
        assert torch.equal(got.cpu(), want)
    # the reference itself: the slice's heads of source page 6 sit at destination page 0 of pool 1, the
    # other heads there are untouched
    assert torch.equal(expect[1][0, :, dst_start:dst_start + count], src.cpu()[6, :, src_start:src_start + count])
    others = [h for h in range(dst_heads) if not dst_start <= h < dst_start + count]
    assert not expect[1][0, :, others].any()


def test_row_slices_are_checked():
    from kernels.page_copy import RowSlice

    src, dst = torch.randn(4, 2, 3, 4), torch.zeros(4, 2, 5, 4)
    bases, idx = torch.tensor([dst.data_ptr()]), torch.tensor([0, 3])
    bad = {
        "run past a row": RowSlice(2, 8, 12, 8, 20, 0),
        "are not a source page of 24": RowSlice(3, 4, 12, 0, 20, 0),
        "width must be >= 1": RowSlice(2, 0, 12, 0, 20, 0),
    }
    for match, sl in bad.items():
        with pytest.raises(ValueError, match=match):
            copy_pages(src, bases, torch.zeros_like(idx), idx, idx, rows=sl)
    assert not dst.any()
    assert page_word_dtype(src, RowSlice(2, 4, 12, 4, 20, 8)) == torch.int64  # 16-byte lengths: 8-byte words
    assert page_word_dtype(src, RowSlice(2, 1, 12, 3, 20, 8)) == torch.int32  # one float a row
