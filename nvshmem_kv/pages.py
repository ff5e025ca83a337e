"""Page-list helpers shared by the backends: validation, run coalescing, byte views."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from nvshmem_kv.descriptor import PoolDescriptor
from nvshmem_kv.errors import TransportError


class PageRun(NamedTuple):
    """``length`` consecutive pages: src ``[src, src+length)`` -> dst ``[dst, dst+length)``."""

    src: int
    dst: int
    length: int


def as_page_tuple(pages: Sequence[int] | torch.Tensor) -> tuple[int, ...]:
    """Page ids as a tuple of Python ints (fast path for lists/tuples of ints)."""
    if isinstance(pages, torch.Tensor):
        return tuple(int(p) for p in pages.tolist())
    out = tuple(pages)
    if not all(type(p) is int for p in out):
        out = tuple(int(p) for p in out)
    return out


def coalesce_runs(src_pages: Sequence[int], dst_pages: Sequence[int]) -> list[PageRun]:
    """Merge page pairs into runs that are contiguous on BOTH sides, keeping the given order."""
    if len(src_pages) != len(dst_pages):
        raise TransportError(f"src_pages has {len(src_pages)} pages but dst_pages has {len(dst_pages)}")
    runs: list[PageRun] = []
    if not src_pages:
        return runs
    s0 = prev_s = src_pages[0]
    d0 = prev_d = dst_pages[0]
    for s, d in zip(src_pages[1:], dst_pages[1:]):
        if s == prev_s + 1 and d == prev_d + 1:
            prev_s, prev_d = s, d
            continue
        runs.append(PageRun(s0, d0, prev_s - s0 + 1))
        s0 = prev_s = s
        d0 = prev_d = d
    runs.append(PageRun(s0, d0, prev_s - s0 + 1))
    return runs


def check_pages(pages: Sequence[int], num_pages: int, what: str) -> None:
    if pages and (min(pages) < 0 or max(pages) >= num_pages):
        raise TransportError(f"{what} must be in [0, {num_pages}); got min {min(pages)}, max {max(pages)}")


def check_layer(layer: int, desc: PoolDescriptor) -> None:
    if not 0 <= layer < desc.num_layers:
        raise TransportError(f"layer {layer} is outside [0, {desc.num_layers})")


def check_pool(kv: torch.Tensor, desc: PoolDescriptor, what: str = "pool") -> None:
    """A pool tensor must match its descriptor exactly and be contiguous."""
    if kv.shape != desc.shape:
        raise TransportError(f"{what} has shape {tuple(kv.shape)}, descriptor says {desc.shape}")
    if kv.dtype != desc.torch_dtype():
        raise TransportError(f"{what} has dtype {kv.dtype}, descriptor says {desc.dtype}")
    if not kv.is_contiguous():
        raise TransportError(f"{what} must be contiguous")


def byte_view(t: torch.Tensor) -> memoryview:
    """Writable byte view of a contiguous CPU tensor (any dtype, bf16 included); no copy."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise TransportError("byte_view needs a contiguous CPU tensor")
    return t.reshape(-1).view(torch.uint8).numpy().data.cast("B")
