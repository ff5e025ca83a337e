"""The page pool: ONE KV tensor per engine rank and a free list of its pages."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class PagePool:
    """Pages of ``page_size`` token slots in one tensor ``(2, layers, pages, page_size, kv_heads, D)``.

    The pool only tracks which pages are free; ownership (requests, the prefix cache) is tracked by
    the scheduler and the radix cache. NOTE: freeing a page twice is a bug and raises.
    """

    def __init__(self, kv: torch.Tensor) -> None:
        if kv.dim() != 6 or kv.shape[0] != 2:
            raise ValueError(f"KV tensor must be (2, layers, pages, page_size, heads, dim), got {tuple(kv.shape)}")
        self.kv = kv
        self.num_pages = int(kv.shape[2])
        self.page_size = int(kv.shape[3])
        self._free: list[int] = list(range(self.num_pages - 1, -1, -1))
        self._is_free = [True] * self.num_pages

    @classmethod
    def allocate(cls, num_layers: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> PagePool:
        kv = torch.zeros(2, num_layers, num_pages, page_size, kv_heads, head_dim, dtype=dtype, device=device)
        return cls(kv)

    @staticmethod
    def pages_for_budget(budget_mb: int, num_layers: int, page_size: int, kv_heads: int, head_dim: int,
                         dtype: torch.dtype) -> int:
        page_bytes = 2 * num_layers * page_size * kv_heads * head_dim * torch.finfo(dtype).bits // 8
        return max(1, budget_mb * 1024 * 1024 // page_bytes)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        """``n`` free pages, or ``None`` (nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._is_free[p] = False
        return pages

    def free(self, pages: Iterable[int]) -> None:
        # NOTE: pushed last page first, so the next alloc pops them in their old order: a request's
        # consecutive pages come back consecutive, and the CPU backend reads such runs in place.
        for p in reversed(list(pages)):
            if self._is_free[p]:
                raise RuntimeError(f"page {p} freed twice")
            self._is_free[p] = True
            self._free.append(p)
