"""Copy KV pages into destination pools addressed by raw base pointers."""

from __future__ import annotations

import torch


def copy_pages_ref(
    src: torch.Tensor,
    dst_pools: list[torch.Tensor],
    dst_index: torch.Tensor,
    src_pages: torch.Tensor,
    dst_pages: torch.Tensor,
) -> None:
    """Copy ``src[src_pages[i]]`` to ``dst_pools[dst_index[i]][dst_pages[i]]``.

    ``src`` and every destination are ``(num_pages, page_elems...)`` with equal page shape and dtype.
    The Triton version takes the destinations as an int64 table of base addresses instead of tensors,
    so the same kernel writes through NVSHMEM peer pointers, CUDA IPC pointers or CPU shared memory.
    """
    for i, (s, d) in enumerate(zip(src_pages.tolist(), dst_pages.tolist())):
        dst_pools[int(dst_index[i])][d].copy_(src[s])
