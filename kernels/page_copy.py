"""Copy KV pages into destination pools addressed by raw base pointers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels._triton import LazyKernel, check, check_device, check_index_tensor, config, tl


@dataclass(frozen=True)
class RowSlice:
    """Part of every page to copy, in elements: a page is ``rows`` rows; columns ``src_start`` to
    ``src_start + width`` of each source row (``src_stride`` long) go to columns ``dst_start`` on of the
    destination row (``dst_stride`` long). A KV page's heads, where the two sides split them over TP ranks
    differently: a prefill rank's heads land in a slice of each token row of the decode page."""

    rows: int
    width: int
    src_stride: int
    src_start: int
    dst_stride: int
    dst_start: int

    def problem(self, page_elems: int) -> str:
        """Why this slice does not fit a source page of ``page_elems`` elements ("" when it does)."""
        if min(self.rows, self.width) < 1 or min(self.src_start, self.dst_start) < 0:
            return f"rows and width must be >= 1 and starts >= 0, got {self}"
        if self.src_start + self.width > self.src_stride or self.dst_start + self.width > self.dst_stride:
            return f"the columns run past a row: {self}"
        if self.rows * self.src_stride != page_elems:
            return f"{self.rows} rows of {self.src_stride} are not a source page of {page_elems} elements"
        return ""

    def lengths(self) -> tuple[int, ...]:
        """Every length and offset the kernel adds to an address, in elements."""
        return self.width, self.src_stride, self.src_start, self.dst_stride, self.dst_start


def copy_pages_ref(
    src: torch.Tensor,
    dst_pools: list[torch.Tensor],
    dst_index: torch.Tensor,
    src_pages: torch.Tensor,
    dst_pages: torch.Tensor,
    run_pages: torch.Tensor | None = None,
    rows: RowSlice | None = None,
) -> None:
    """Copy ``src[src_pages[i]]`` to ``dst_pools[dst_index[i]][dst_pages[i]]``; with ``run_pages``, copy
    ``i`` moves ``run_pages[i]`` consecutive pages from there; with ``rows``, only that slice of each page
    row, into destination pages of ``rows.rows * rows.dst_stride`` elements.

    ``src`` and every destination are ``(num_pages, page_elems...)`` with equal page shape and dtype
    (without ``rows``; with it, contiguous pools of their own page size).
    The Triton version takes the destinations as an int64 table of base addresses instead of tensors,
    so the same kernel writes through NVSHMEM peer pointers, CUDA IPC pointers or CPU shared memory.
    """
    runs = run_pages.tolist() if run_pages is not None else [1] * src_pages.shape[0]
    for i, (s, d, n) in enumerate(zip(src_pages.tolist(), dst_pages.tolist(), runs)):
        pool = dst_pools[int(dst_index[i])]
        if rows is None:
            pool[d:d + n].copy_(src[s:s + n])
            continue
        src_rows = src[s:s + n].reshape(n * rows.rows, rows.src_stride)
        dst_rows = pool.view(pool.shape[0], -1)[d:d + n].view(n * rows.rows, rows.dst_stride)
        cols = rows.src_start, rows.dst_start
        dst_rows[:, cols[1]:cols[1] + rows.width] = src_rows[:, cols[0]:cols[0] + rows.width]


# ---------------------------------------------------------------------------------------------------
# Triton: program ``(i, chunk)`` copies ``BLOCK`` words of each of the ``PAGES`` copies ``i * PAGES ...``:
# page ``src_pages[j]`` to ``dst_base_ptrs[dst_index[j]] + dst_pages[j] * page_bytes`` (with ``RUNS``,
# the ``run_pages[j]`` pages from there: one contiguous span at both ends, since source pages are packed
# then). Pages move as opaque words (the widest of 8/4/2/1 bytes that the page size and source
# alignment allow), so every dtype copies bit-exactly. A KV page is small (6 KB for SmolLM2's), so a
# program that copies one page spends much of its life on the three dependent index loads and leaves
# lanes idle; ``PAGES`` > 1 keeps several pages' loads in flight per program (the autotuner chooses;
# the first config, used untuned, copies one page), and a run of pages consecutive at both ends (a
# fresh pool hands out such runs) moves as one span, in full ``BLOCK``-word chunks.
# With ``SEG`` > 0 a copy moves one slice of each page row (`RowSlice`, in words): word ``o`` of the copy
# is column ``o % SEG`` of row ``o // SEG``, read at ``SRC_COL`` of a ``SRC_ROW``-word source row and stored
# at ``DST_COL`` of a ``DST_ROW``-word destination row; runs continue row by row across packed pages.
# NOTE: the destination is addressed from ``src_ptr`` (a distance in words, declared a multiple of
# ``ALIGN`` words): a pointer made from an integer carries no alignment, and its stores compiled to
# 8-byte ones (sm_90 PTX: st.global.b64); from a 16-byte aligned pointer they are 16-byte
# (st.global.v2.b64), like the loads. ``ALIGN`` > 1 needs 16-byte aligned pages at both ends.

_WORD_DTYPES = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


def _copy_pages_kernel(
    src_ptr,
    dst_base_ptr,
    dst_index_ptr,
    src_pages_ptr,
    dst_pages_ptr,
    run_pages_ptr,
    stride_src_page,
    num_copies,
    PAGE_WORDS: tl.constexpr,
    BLOCK: tl.constexpr,
    PAGES: tl.constexpr,
    ALIGN: tl.constexpr,
    RUNS: tl.constexpr,
    SEG: tl.constexpr,
    SRC_ROW: tl.constexpr,
    SRC_COL: tl.constexpr,
    DST_ROW: tl.constexpr,
    DST_COL: tl.constexpr,
):
    """Copy one ``BLOCK``-word chunk of each of ``PAGES`` copies (a page, or with ``RUNS`` a run of
    pages; with ``SEG`` a slice of every row of them) through raw destination addresses."""
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    if SEG > 0:
        src_offs = offs // SEG * SRC_ROW + SRC_COL + offs % SEG
        dst_offs = offs // SEG * DST_ROW + DST_COL + offs % SEG
        copy_words = PAGE_WORDS // SRC_ROW * SEG
        dst_page_words = PAGE_WORDS // SRC_ROW * DST_ROW
    else:
        src_offs = offs
        dst_offs = offs
        copy_words = PAGE_WORDS
        dst_page_words = PAGE_WORDS
    word_bytes: tl.constexpr = src_ptr.dtype.element_ty.primitive_bitwidth // 8
    src_addr = src_ptr.to(tl.int64, bitcast=True)
    for p in tl.static_range(PAGES):
        j = tl.program_id(0).to(tl.int64) * PAGES + p
        live = j + tl.zeros([BLOCK], dtype=tl.int64) < num_copies  # a vector: the interpreter's & needs one
        j = tl.minimum(j, num_copies - 1)  # past the end: read the last copy's entries, store nothing
        src_page = tl.load(src_pages_ptr + j).to(tl.int64)
        dst_page = tl.load(dst_pages_ptr + j).to(tl.int64)
        pool = tl.load(dst_index_ptr + j).to(tl.int64)
        rel = tl.multiple_of((tl.load(dst_base_ptr + pool) - src_addr) // word_bytes + dst_page * dst_page_words,
                             ALIGN)
        if RUNS:
            mask = (offs < tl.load(run_pages_ptr + j) * copy_words) & live
        else:
            mask = (offs < copy_words) & live
        vals = tl.load(src_ptr + src_page * stride_src_page + src_offs, mask=mask)
        tl.store(src_ptr + rel + dst_offs, vals, mask=mask)


_copy_pages = LazyKernel(
    _copy_pages_kernel,
    configs=[
        config(BLOCK=b, num_warps=w, num_stages=1, PAGES=p)
        for b, w, p in ((2048, 8, 1), (1024, 4, 1), (4096, 8, 1), (512, 4, 1), (1024, 4, 4), (1024, 8, 8),
                        (512, 4, 8), (8192, 8, 1), (4096, 8, 2))
    ],
    key=["PAGE_WORDS", "RUNS", "SEG", "DST_ROW"],
    interpret={"BLOCK": 512, "PAGES": 3},  # several pages a program and a tail: the CPU tests cover both
)


def copy_pages_configs() -> dict[str, str]:
    """The page copy's tuned config per page size in words (``{}`` when untuned): what the benches report."""
    return _copy_pages.tuned_configs()


def _byte_lengths(src: torch.Tensor, rows: RowSlice | None) -> list[int]:
    """Every length in bytes that a copy word must divide: the page, its stride, the slice's parts."""
    esz = src.element_size()
    return [src[0].numel() * esz, src.stride(0) * esz, *(n * esz for n in (rows.lengths() if rows else ()))]


def page_word_dtype(src: torch.Tensor, rows: RowSlice | None = None) -> torch.dtype:
    """The widest integer word that divides a page, the page stride, the source address and (with
    ``rows``) the slice's widths and offsets."""
    lengths = _byte_lengths(src, rows)
    for size, dtype in _WORD_DTYPES:
        if all(n % size == 0 for n in lengths) and src.data_ptr() % size == 0:
            return dtype
    return torch.uint8


def copy_pages(
    src: torch.Tensor,
    dst_base_ptrs: torch.Tensor,
    dst_index: torch.Tensor,
    src_pages: torch.Tensor,
    dst_pages: torch.Tensor,
    run_pages: torch.Tensor | None = None,
    max_run: int = 1,
    rows: RowSlice | None = None,
) -> None:
    """Triton :func:`copy_pages_ref` with the destination pools given as raw base addresses.

    ``dst_base_ptrs`` is an int64 tensor (on ``src``'s device) of destination pool base addresses:
    NVSHMEM peer pointers, CUDA-IPC-opened pointers or CPU shared memory (under the interpreter).
    Each destination pool holds pages of ``src``'s page size packed back to back; copy ``i`` writes
    ``src[src_pages[i]]`` to page ``dst_pages[i]`` of pool ``dst_index[i]``. Page bodies of ``src``
    must be contiguous. Destination addresses must be 16-byte aligned (the copy word's alignment
    suffices where ``src`` pages are not 16-byte aligned themselves) and in range: raw pointers are not
    checked on a GPU. Runs on the current stream; completion is the caller's business (an event or
    flag after the launch).

    ``run_pages`` (one count >= 1 per copy, with ``max_run`` >= every count: the launch is sized by it,
    and on a GPU a longer run would be cut short unnoticed) makes copy ``i`` a run of consecutive pages
    at both ends; ``src``'s pages must then be packed (page stride = page size).

    ``rows`` (a `RowSlice`) copies one slice of each page row; destination pages then hold
    ``rows.rows * rows.dst_stride`` elements. Each distinct slice compiles its own kernel.
    """
    op = "copy_pages"
    device = check_device(op, src=src, dst_base_ptrs=dst_base_ptrs, dst_index=dst_index,
                          src_pages=src_pages, dst_pages=dst_pages)
    check(src.dim() >= 2, f"{op}: src must be (num_pages, page_elems...), got {tuple(src.shape)}")
    check(src[0].is_contiguous() if src.shape[0] else True, f"{op}: src pages must be contiguous")
    check(dst_base_ptrs.dim() == 1 and dst_base_ptrs.dtype == torch.int64 and dst_base_ptrs.is_contiguous(),
          f"{op}: dst_base_ptrs must be a contiguous 1-D int64 tensor of addresses, got "
          f"{dst_base_ptrs.dtype} {tuple(dst_base_ptrs.shape)}")
    n = src_pages.shape[0] if src_pages.dim() == 1 else -1
    for name, t in (("dst_index", dst_index), ("src_pages", src_pages), ("dst_pages", dst_pages)):
        check_index_tensor(op, name, t, 1)
        check(t.is_contiguous() and t.shape[0] == n,
              f"{op}: {name} must be contiguous with {n} entries (one per copy), got {tuple(t.shape)}")
    if run_pages is not None:
        check_index_tensor(op, "run_pages", run_pages, 1)
        check(run_pages.is_contiguous() and run_pages.shape[0] == n,
              f"{op}: run_pages must be contiguous with {n} entries (one per copy), got {tuple(run_pages.shape)}")
        check(isinstance(max_run, int) and max_run >= 1, f"{op}: max_run must be an int >= 1, got {max_run!r}")
        check(src.shape[0] == 0 or src.stride(0) == src[0].numel(),
              f"{op}: runs of pages need packed source pages (page stride {src.stride(0)}, page {src[0].numel()})")
        check(max_run * src[0].numel() < 2**31, f"{op}: a run of {max_run} pages is over 2**31 elements")
        if device.type == "cpu" and n:
            lo, hi = int(run_pages.min()), int(run_pages.max())
            check(lo >= 1 and hi <= max_run, f"{op}: run_pages must lie in [1, max_run={max_run}], got [{lo}, {hi}]")
    if rows is not None:
        why = rows.problem(src[0].numel()) if src.shape[0] else ""
        check(not why, f"{op}: {why}")
    if n == 0 or src.shape[0] == 0:
        return
    word = page_word_dtype(src, rows)
    wsize = torch.empty((), dtype=word).element_size()
    words = src.flatten(1).view(word)
    aligned = all(b % 16 == 0 for b in _byte_lengths(src, rows)) and src.data_ptr() % 16 == 0
    if device.type == "cpu":  # only a host table can be checked without a device sync
        need = 16 if aligned else wsize
        bad = [hex(a) for a in dst_base_ptrs.tolist() if a == 0 or a % need]
        check(not bad, f"{op}: destination bases {bad} are null or not {need}-byte aligned")

    esz = src.element_size()
    seg, src_row, src_col, dst_row, dst_col = (x * esz // wsize for x in rows.lengths()) if rows else (0, 1, 0, 1, 0)
    span = (rows.rows * seg if rows else words.shape[1]) * (max_run if run_pages is not None else 1)

    def grid(meta: dict) -> tuple[int, int]:
        return (-(-n // meta["PAGES"]), -(-span // meta["BLOCK"]))

    _copy_pages[grid](
        words, dst_base_ptrs, dst_index, src_pages, dst_pages, src_pages if run_pages is None else run_pages,
        words.stride(0), n, PAGE_WORDS=words.shape[1], ALIGN=16 // wsize if aligned else 1,
        RUNS=run_pages is not None, SEG=seg, SRC_ROW=src_row, SRC_COL=src_col, DST_ROW=dst_row, DST_COL=dst_col,
    )
