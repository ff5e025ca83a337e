"""Small helpers shared by the transport tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import nvshmem_kv as nk

Spawn = Callable[[dict[str, Any]], tuple[Any, Any]]

def make_desc(num_pages: int = 16, *, dtype: str = "bfloat16", layers: int = 3, page_size: int = 4,
              heads: int = 3, head_dim: int = 8, tp_rank: int = 0, tp_size: int = 1) -> nk.PoolDescriptor:
    h0, h1 = nk.head_range(tp_rank, tp_size, heads)
    return nk.PoolDescriptor(dtype, layers, num_pages, page_size, heads, h1 - h0, head_dim, tp_rank, tp_size)


def desc_dict(d: nk.PoolDescriptor) -> dict[str, Any]:
    return {f: getattr(d, f) for f in d.__dataclass_fields__}


def reply(conn: Any, timeout_s: float = 30.0) -> tuple[str, Any]:
    """Next message from a worker, failing the test on timeout or on a worker error."""
    if not conn.poll(timeout_s):
        pytest.fail(f"worker sent nothing within {timeout_s}s")
    kind, value = conn.recv()
    if kind == "error":
        pytest.fail(f"worker failed: {value}")
    return kind, value
