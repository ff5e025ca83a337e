"""Decode attention (one new token per request over its whole paged context) in pdbox's own C kernels:
bf16 in ``pdbox_flash_decode`` (``flash_attention.c``, AVX-512 BF16), fp32 in ``pdbox_decode_f32``
(``decode_f32.c``, AVX2). A KV head's query heads share each key read, K and V are read from the pages in
place, nothing is gathered.

The same function as ``kernels.decode_attention_ref``; the reference stays the oracle. The page table is
checked once per forward pass (:func:`decode_table`), the per-layer call only checks shapes and dtypes.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from kernels.cpu.build import AVX2_CFLAGS, AVX2_FLAGS, Native, load
from kernels.cpu.flash_extend import check_tensors, native

MAX_GROUP = 16  # query heads per KV head the kernels take (flash_attention.c's DR, decode_f32.c's MAX_G)
_I64, _I32, _P = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


def native_f32() -> Native:
    """The fp32 kernel's library, or why this machine has none (built on the first call in a process)."""
    built = load("decode_f32", needs=AVX2_FLAGS, cflags=AVX2_CFLAGS)
    if built.lib is not None and not getattr(built.lib.pdbox_decode_f32, "argtypes", None):
        built.lib.pdbox_decode_f32.argtypes = [_P, _I64, _I64, _P, _P, _I64, _I32, _P, _I64, _P, _I32, _I32, _I32,
                                               _I32, ctypes.c_float, _P, _I64, _I64, _I32]
        built.lib.pdbox_decode_f32.restype = _I32
    return built


@dataclass(frozen=True)
class DecodeTable:
    """A batch's page table and lengths as the kernel reads them (int64, contiguous), checked against a
    cache of ``num_pages`` pages of ``page_size`` rows."""

    table: torch.Tensor
    lens: torch.Tensor
    num_pages: int
    page_size: int


def decode_table(page_table: torch.Tensor, seq_lens: torch.Tensor, num_pages: int, page_size: int) -> DecodeTable:
    """Check every page id a request's ``seq_lens`` rows need lies in ``[0, num_pages)``; ``ValueError`` names
    what does not."""
    if page_table.dim() != 2 or seq_lens.dim() != 1 or seq_lens.numel() > page_table.shape[0]:
        raise ValueError(f"page_table must be (batch, pages) and seq_lens (batch,): got {tuple(page_table.shape)} "
                         f"and {tuple(seq_lens.shape)}")
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    lens = seq_lens.to(torch.int64).contiguous()
    table = page_table[: lens.numel()].to(torch.int64).contiguous()
    if lens.numel() == 0:
        raise ValueError("an empty batch")
    if int(lens.min()) < 1:
        raise ValueError(f"every request needs at least one cached row, got lengths {lens.tolist()}")
    need = (lens + page_size - 1) // page_size
    if int(need.max()) > table.shape[1]:
        raise ValueError(f"a request of {int(lens.max())} rows needs {int(need.max())} pages; the table has "
                         f"{table.shape[1]}")
    used = table[torch.arange(table.shape[1]) < need[:, None]]
    if int(used.min()) < 0 or int(used.max()) >= num_pages:
        raise ValueError(f"page ids must lie in [0, {num_pages}): got {sorted(set(used.tolist()))[:8]} ...")
    return DecodeTable(table, lens, num_pages, page_size)


def flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: DecodeTable, scale: float,
                 threads: int = 1, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of ``q`` ``(batch, heads, head_dim)`` over each request's ``plan.lens`` cache rows, bf16 or fp32;
    into ``out`` (made if ``None``) and returned. ``threads`` threads split the (request, KV head) units."""
    f32 = q.dtype == torch.float32
    if f32:
        fn = native_f32().required("the native CPU fp32 decode attention kernel").pdbox_decode_f32
    else:
        fn = native().required("the native CPU attention kernel").pdbox_flash_decode
    out = torch.empty(q.shape, dtype=q.dtype) if out is None else out
    check_tensors(q, k_cache, v_cache, out, 8 if f32 else 64, torch.float32 if f32 else torch.bfloat16)
    batch, hq, d = q.shape
    pages, page_size, hkv, _ = k_cache.shape
    if hq // hkv > MAX_GROUP:
        raise ValueError(f"{hq} query heads over {hkv} KV heads: the kernel takes groups of at most {MAX_GROUP}")
    if (pages, page_size) != (plan.num_pages, plan.page_size) or plan.lens.numel() != batch:
        raise ValueError(f"the table was checked for {plan.lens.numel()} requests over {plan.num_pages} pages of "
                         f"{plan.page_size}; this call has {batch} over {pages} of {page_size}")
    rc = fn(
        q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), page_size,
        plan.table.data_ptr(), plan.table.stride(0), plan.lens.data_ptr(), batch, hq, hkv, d, scale, out.data_ptr(),
        out.stride(0), out.stride(1), max(1, threads))
    if rc != 0:
        raise RuntimeError(f"flash_decode refused its arguments (code {rc}) after they passed the checks")
    return out
