"""Optional copy path: a layer's K and V pages in ONE launch of `kernels.copy_pages` (Triton),
written through the raw base address of the destination pool. Pages consecutive at both ends move as
runs (of at most ``RUN_BYTES``): one span each, not one small page per program.

The same kernel serves an IPC-opened GPU pool (cuda_ipc), a peer's symmetric heap that NVSHMEM maps here
(nvshmem) and a CPU shared-memory pool (shm, under ``TRITON_INTERPRET=1``). It pays off when pages are
scattered: the torch path issues one copy per contiguous run, this path one launch per layer. Where the
two sides split the KV heads over TP ranks differently, a rank's heads move as a slice of each token row
(`kernels.RowSlice`), in the same one launch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from nvshmem_kv.descriptor import HeadSlice, PoolDescriptor
from nvshmem_kv.errors import TransportError
from nvshmem_kv.pages import PageRun, coalesce_runs

RUN_BYTES = 64 << 10  # a copy's longest run: long enough for full-width chunks, short enough to spread over the SMs


@dataclass
class KernelPlan:
    """Index tensors for one room's page lists, on the source device, for every layer at once: a
    layer's write is then one launch on row views, with no index arithmetic on the copy stream
    (which had cost two small kernels and their launch gaps per layer, beside a copy of ~10 us).
    Each of the ``n`` copies is a run of pages consecutive at both ends (``run_pages``; None where
    every run is one page, which the kernel's per-page variant copies)."""

    src_pages: tuple[int, ...]
    dst_pages: tuple[int, ...]
    src_rows: torch.Tensor      # (layers, 2n): layer l's K then V run starts in the flattened source pool
    dst_rows: torch.Tensor      # the same for the destination pool
    pool_index: torch.Tensor    # zeros: every copy goes to table entry 0
    table: torch.Tensor         # int64 [destination pool base address]
    run_pages: torch.Tensor | None  # (2n,) pages per copy
    max_run: int
    rows: Any = None            # a kernels.RowSlice where the copy moves part of each token row, else None


def _rows(desc: PoolDescriptor, pages: tuple[int, ...]) -> torch.Tensor:
    """``(layers, 2 * len(pages))`` page indices into ``desc``'s pool flattened to
    ``(2 * layers * pages, ...)``: K pages first, then V."""
    per_kv = desc.num_layers * desc.num_pages
    one = torch.tensor(pages, dtype=torch.int64)
    base = torch.cat([one, one + per_kv])
    return base[None, :] + (torch.arange(desc.num_layers, dtype=torch.int64) * desc.num_pages)[:, None]


def cut_runs(runs: list[PageRun], longest: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(src starts, dst starts, lengths)`` of ``runs`` (pages consecutive at both ends), in order,
    each cut to at most ``longest`` pages."""
    out: tuple[list[int], list[int], list[int]] = ([], [], [])
    for run in runs:
        for off in range(0, run.length, longest):
            out[0].append(run.src + off)
            out[1].append(run.dst + off)
            out[2].append(min(longest, run.length - off))
    return tuple(out[0]), tuple(out[1]), tuple(out[2])


def row_slice(local: PoolDescriptor, remote: PoolDescriptor, heads: HeadSlice) -> Any:
    """The `kernels.RowSlice` that moves ``heads`` of each token row, or None where pages move whole."""
    if heads.count == local.kv_heads_local == remote.kv_heads_local:
        return None
    from kernels.page_copy import RowSlice

    if local.head_dim != remote.head_dim or local.page_size != remote.page_size:
        raise TransportError("a head slice needs the same page size and head dim on both sides")
    d = local.head_dim
    return RowSlice(local.page_size, heads.count * d, local.kv_heads_local * d, heads.src_start * d,
                    remote.kv_heads_local * d, heads.dst_start * d)


def make_plan(local: PoolDescriptor, remote: PoolDescriptor, dst_ptr: int, src_pages: tuple[int, ...],
              dst_pages: tuple[int, ...], device: torch.device, runs: list[PageRun] | None = None,
              heads: HeadSlice | None = None) -> KernelPlan:
    """Build the plan on the host and move it in ONE copy from pinned memory (on a GPU), which never
    waits for the streams: a copy from pageable memory may, and this runs inside the forward pass.
    ``runs``: the page lists already coalesced (the transport has them), else coalesced here.
    ``heads``: the heads this rank writes into the remote pool (None: all of them, pages move whole)."""
    if local.num_layers != remote.num_layers:
        raise TransportError(f"the pools have {local.num_layers} and {remote.num_layers} layers")
    rows = None if heads is None else row_slice(local, remote, heads)
    # NOTE: checked here, where it is an int: on a GPU the kernel cannot check its table without a sync, and
    # it stores 16 bytes at a time where the source allows; a misaligned store kills the CUDA context
    if dst_ptr == 0 or dst_ptr % 16:
        raise TransportError(f"the remote pool's base {hex(dst_ptr)} is null or not 16-byte aligned")
    runs = coalesce_runs(src_pages, dst_pages) if runs is None else runs
    src_starts, dst_starts, lengths = cut_runs(runs, max(1, RUN_BYTES // local.page_bytes))
    if len(src_pages) < 2 * len(lengths):  # mostly lone pages: the launch, sized by the longest run, would idle
        src_starts, dst_starts, lengths = tuple(src_pages), tuple(dst_pages), (1,) * len(src_pages)
    src, dst = _rows(local, src_starts), _rows(remote, dst_starts)
    n = src.shape[1]
    max_run = max(lengths, default=1)
    run_lens = [torch.tensor(lengths + lengths, dtype=torch.int64)] if max_run > 1 else []
    # NOTE: the table last: every other part then starts 16-byte aligned (n is even), as the warm-up's
    # tensors do, so serving reuses the warm-up's compiles (Triton specializes on pointer alignment).
    flat = torch.cat([src.flatten(), dst.flatten(), torch.zeros(n, dtype=torch.int64), *run_lens,
                      torch.tensor([dst_ptr], dtype=torch.int64)])
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    cells = src.numel()
    at = 2 * cells + n
    end = at + (n if run_lens else 0)
    return KernelPlan(src_pages, dst_pages, flat[:cells].view(src.shape), flat[cells:2 * cells].view(dst.shape),
                      flat[2 * cells:at], flat[end:], flat[at:end] if run_lens else None, max_run, rows)


def _pages(src_kv: torch.Tensor, local: PoolDescriptor) -> torch.Tensor:
    """The pool as the kernel indexes it: ``(2 * layers * pages, page_size, kv_heads_local, head_dim)``."""
    return src_kv.view(2 * local.num_layers * local.num_pages, local.page_size, local.kv_heads_local, local.head_dim)


def warm_kernel_copy(src_kv: torch.Tensor, local: PoolDescriptor, pages: int = 1024, rows: Any = None) -> int:
    """Compile the page copy for this pool's page size (and on a GPU autotune it) before serving, so
    the first handoff pays no compile: ``pages`` of the pool, then one fewer (Triton specializes the
    copy count on divisibility by 16), into a scratch pool of the same page shape, with index tensors
    of the dtypes a real plan uses (the autotuner's key includes them); then the same as runs of
    pages (a plan's runs are at most ``RUN_BYTES``). The pool is only read. ``rows``: the
    `kernels.RowSlice` a peer's plans carry (each slice compiles its own kernel).
    Returns the pages copied in the first launch."""
    from kernels import copy_pages

    view = _pages(src_kv, local)
    n = max(2, min(pages, view.shape[0]))
    page = view.shape[1:] if rows is None else (rows.rows * rows.dst_stride,)
    scratch = torch.empty((n, *page), dtype=view.dtype, device=view.device)
    table = torch.tensor([scratch.data_ptr()], dtype=torch.int64, device=view.device)
    for count in (n, n - 1):
        idx = torch.arange(count, dtype=torch.int64, device=view.device)
        copy_pages(view, table, torch.zeros_like(idx), idx, idx, rows=rows)
    longest = min(RUN_BYTES // local.page_bytes, n // 17)  # the runs' variant: tuned on the first, larger launch
    if longest > 1:
        for count in (n // longest, 16, 17):
            starts = torch.arange(count, dtype=torch.int64, device=view.device) * longest
            copy_pages(view, table, torch.zeros_like(starts), starts, starts, torch.full_like(starts, longest), longest,
                       rows=rows)
    if view.is_cuda:
        torch.cuda.synchronize(view.device)
    return n


def kernel_copy(src_kv: torch.Tensor, local: PoolDescriptor, remote: PoolDescriptor, plan: KernelPlan,
                layer: int) -> int:
    """Copy K and V of ``layer`` for the plan's pages; returns the bytes moved."""
    try:
        from kernels import copy_pages
    except ImportError as exc:  # pragma: no cover - kernels ships with pdbox
        raise TransportError(f"copy='kernel' needs the kernels package: {exc}") from exc
    if plan.rows is None and local.kv_heads_local != remote.kv_heads_local:
        raise TransportError("the plan moves whole pages, but the pools hold different heads")
    copy_pages(_pages(src_kv, local), plan.table, plan.pool_index, plan.src_rows[layer], plan.dst_rows[layer],
               plan.run_pages, plan.max_run, rows=plan.rows)
    moved = local.page_bytes if plan.rows is None else plan.rows.rows * plan.rows.width * local.itemsize
    return 2 * len(plan.src_pages) * moved
