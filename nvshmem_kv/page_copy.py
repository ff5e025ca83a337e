"""Optional copy path: a layer's K and V pages in ONE launch of `kernels.copy_pages` (Triton),
written through the raw base address of the destination pool.

The same kernel serves an IPC-opened GPU pool (cuda_ipc) and a CPU shared-memory pool (shm, under
``TRITON_INTERPRET=1``). It pays off when pages are scattered: the torch path issues one copy per
contiguous run, this path one launch per layer. Full-head slices only (pages move whole).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nvshmem_kv.descriptor import PoolDescriptor
from nvshmem_kv.errors import TransportError


@dataclass
class KernelPlan:
    """Index tensors for one room's page lists, on the source device, for every layer at once: a
    layer's write is then one launch on row views, with no index arithmetic on the copy stream
    (which had cost two small kernels and their launch gaps per layer, beside a copy of ~10 us)."""

    src_pages: tuple[int, ...]
    dst_pages: tuple[int, ...]
    src_rows: torch.Tensor      # (layers, 2n): layer l's K then V page indices in the flattened source pool
    dst_rows: torch.Tensor      # the same for the destination pool
    pool_index: torch.Tensor    # zeros: every copy goes to table entry 0
    table: torch.Tensor         # int64 [destination pool base address]


def _rows(desc: PoolDescriptor, pages: tuple[int, ...]) -> torch.Tensor:
    """``(layers, 2 * len(pages))`` page indices into ``desc``'s pool flattened to
    ``(2 * layers * pages, ...)``: K pages first, then V."""
    per_kv = desc.num_layers * desc.num_pages
    one = torch.tensor(pages, dtype=torch.int64)
    base = torch.cat([one, one + per_kv])
    return base[None, :] + (torch.arange(desc.num_layers, dtype=torch.int64) * desc.num_pages)[:, None]


def make_plan(local: PoolDescriptor, remote: PoolDescriptor, dst_ptr: int, src_pages: tuple[int, ...],
              dst_pages: tuple[int, ...], device: torch.device) -> KernelPlan:
    """Build the plan on the host and move it in ONE copy from pinned memory (on a GPU), which never
    waits for the streams: a copy from pageable memory may, and this runs inside the forward pass."""
    if local.num_layers != remote.num_layers:
        raise TransportError(f"the pools have {local.num_layers} and {remote.num_layers} layers")
    src, dst = _rows(local, src_pages), _rows(remote, dst_pages)
    n = src.shape[1]
    flat = torch.cat([src.flatten(), dst.flatten(), torch.zeros(n, dtype=torch.int64),
                      torch.tensor([dst_ptr], dtype=torch.int64)])
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    cells = src.numel()
    return KernelPlan(src_pages, dst_pages, flat[:cells].view(src.shape), flat[cells:2 * cells].view(dst.shape),
                      flat[2 * cells:2 * cells + n], flat[2 * cells + n:])


def _pages(src_kv: torch.Tensor, local: PoolDescriptor) -> torch.Tensor:
    """The pool as the kernel indexes it: ``(2 * layers * pages, page_size, kv_heads_local, head_dim)``."""
    return src_kv.view(2 * local.num_layers * local.num_pages, local.page_size, local.kv_heads_local, local.head_dim)


def warm_kernel_copy(src_kv: torch.Tensor, local: PoolDescriptor, pages: int = 1024) -> int:
    """Compile the page copy for this pool's page size (and on a GPU autotune it) before serving, so
    the first handoff pays no compile: ``pages`` of the pool, then one fewer (Triton specializes the
    copy count on divisibility by 16), into a scratch pool of the same page shape, with index tensors
    of the dtypes a real plan uses (the autotuner's key includes them). The pool is only read.
    Returns the pages copied in the first launch."""
    from kernels import copy_pages

    view = _pages(src_kv, local)
    n = max(2, min(pages, view.shape[0]))
    scratch = torch.empty((n, *view.shape[1:]), dtype=view.dtype, device=view.device)
    table = torch.tensor([scratch.data_ptr()], dtype=torch.int64, device=view.device)
    for count in (n, n - 1):
        idx = torch.arange(count, dtype=torch.int64, device=view.device)
        copy_pages(view, table, torch.zeros_like(idx), idx, idx)
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
    if local.kv_heads_local != remote.kv_heads_local:
        raise TransportError("the page-copy kernel moves whole pages: head slices must be full")
    copy_pages(_pages(src_kv, local), plan.table, plan.pool_index, plan.src_rows[layer], plan.dst_rows[layer])
    return plan.src_rows.shape[1] * local.page_bytes
