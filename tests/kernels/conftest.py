"""Kernel tests: Triton kernels against their torch references.

Without CUDA the kernels run under the Triton interpreter on CPU tensors (``TRITON_INTERPRET=1`` is
set here, before any kernel launches; the kernels build their ``triton.jit`` objects lazily, so
import order does not matter). With CUDA the same tests run compiled on the GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the non-GPU tier runs: the GPU when there is one, else CPU under the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@dataclass
class PagedKV:
    """A paged K/V cache with per-request page tables; rows outside every request are NaN."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    page_table: torch.Tensor
    lens: torch.Tensor

    def for_ref(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CPU ``(k_cache, v_cache, page_table)`` for the reference: NaN rows zeroed and -1 padding
        pointed at page 0 (the batched reference reads whole padded pages and weights the rows past
        a context by zero, which only works when they are finite)."""
        return (
            self.k_cache.cpu().nan_to_num(0.0),
            self.v_cache.cpu().nan_to_num(0.0),
            self.page_table.cpu().clamp(min=0),
        )


def build_paged_kv(
    lens: Sequence[int],
    kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    spare_pages: int = 3,
) -> PagedKV:
    """Random caches; request ``b`` owns ``ceil(lens[b] / page_size)`` scattered pages (its page table
    row is padded with -1). Every cache row that no request covers is NaN, so a kernel that reads past
    a context or a page-table row poisons its output."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // page_size) for n in lens]
    num_pages = sum(need) + spare_pages
    k = torch.full((num_pages, page_size, kv_heads, head_dim), float("nan"))
    v = torch.full_like(k, float("nan"))
    perm = torch.randperm(num_pages, generator=g)
    table = torch.full((len(lens), max(need + [1])), -1, dtype=torch.int32)
    used = 0
    for b, (n, p) in enumerate(zip(lens, need)):
        pages = perm[used : used + p]
        used += p
        table[b, :p] = pages.to(torch.int32)
        rows = torch.randn(n, kv_heads, head_dim, generator=g), torch.randn(n, kv_heads, head_dim, generator=g)
        for cache, r in zip((k, v), rows):
            flat = cache[pages].flatten(0, 1)
            flat[:n] = r
            cache[pages] = flat.view(p, page_size, kv_heads, head_dim)
    return PagedKV(
        k.to(dtype).to(device),
        v.to(dtype).to(device),
        table.to(device),
        torch.tensor(list(lens), dtype=torch.int32, device=device),
    )


def extend_case(prefix: int, n_new: int, hq: int, hkv: int, d: int, page_size: int, dtype: torch.dtype,
                seed: int = 0) -> tuple[PagedKV, torch.Tensor]:
    """One request's paged cache of ``prefix + n_new`` rows on the CPU and its ``n_new`` new queries, as the
    engine has them: a view of a fused QKV row (heads not contiguous with the next token's)."""
    kv = build_paged_kv([prefix + n_new], hkv, d, page_size, dtype, torch.device("cpu"), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return kv, torch.randn(n_new, hq + 2 * hkv, d, generator=g).to(dtype)[:, :hq]


def extend_reference(kv: PagedKV, q: torch.Tensor, prefix: int, scale: float) -> torch.Tensor:
    """The request's causal attention by the torch reference, in fp32."""
    from kernels.extend_attention import extend_attention_ref

    k, v, table = kv.for_ref()
    return extend_attention_ref(q.float(), k.float(), v.float(), table, torch.tensor([prefix]),
                                torch.tensor([q.shape[0]]), scale)


def broken_extend_args(kv: PagedKV, q: torch.Tensor, change: str) -> tuple[torch.Tensor, ...]:
    """``(q, k_cache, v_cache, pages)`` for an extend kernel with one thing wrong, by name: ``head dim N``,
    ``fp32 q``, ``bf16 cache``, ``page out of range``, ``short page table``, ``int32 pages``, ``page size 12``,
    ``5 over 2 heads`` or ``no new tokens``."""
    k, v, pages = kv.k_cache, kv.v_cache, kv.page_table[0].long()
    if change.startswith("head dim "):
        d = int(change.removeprefix("head dim "))
        q, k, v = q[..., :d], k[..., :d].contiguous(), v[..., :d].contiguous()
    elif change == "fp32 q":
        q = q.float()
    elif change == "bf16 cache":
        k = k.to(torch.bfloat16)
    elif change == "page out of range":
        pages = pages.clone()
        pages[1] = k.shape[0]
    elif change == "short page table":
        pages = pages[:2]
    elif change == "int32 pages":
        pages = pages.int()
    elif change == "page size 12":
        k, v = k[:, :12].contiguous(), v[:, :12].contiguous()
    elif change == "5 over 2 heads":
        q, k, v = q[:, :5], k[:, :, :2].contiguous(), v[:, :, :2].contiguous()
    elif change == "no new tokens":
        q = q[:0]
    else:
        raise ValueError(f"no such change: {change}")
    return q, k, v, pages


@pytest.fixture
def paged_kv() -> Callable[..., PagedKV]:
    return build_paged_kv


TOLERANCE = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
}


@pytest.fixture
def tol() -> Callable[[torch.dtype], dict[str, float]]:
    """``torch.testing.assert_close`` tolerances against the reference, by compute dtype."""
    return TOLERANCE.__getitem__
