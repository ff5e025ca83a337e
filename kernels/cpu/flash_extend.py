"""Causal prefill attention of one request over its paged KV cache in pdbox's own C kernels: bf16 in
``pdbox_flash_extend`` (``flash_attention.c``, AVX-512 BF16), fp32 in ``pdbox_extend_f32`` (``extend_f32.c``,
AVX2). Both are flash-style and read K and V from the pages in place.

The same function as ``kernels.extend_attention_ref`` for one request; the reference stays the oracle.
"""

from __future__ import annotations

import ctypes

import torch

from kernels.cpu.build import AVX2_CFLAGS, AVX2_FLAGS, Native, load

MAX_HEAD_DIM = 256  # the kernel's MAX_D
_I64, _I32, _P = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


def native() -> Native:
    """The kernels' library, or why this machine has none (built on the first call in a process)."""
    built = load("flash_attention")
    if built.lib is not None and not getattr(built.lib.pdbox_flash_extend, "argtypes", None):
        fn = built.lib.pdbox_flash_extend
        fn.argtypes = [_P, _I64, _I64, _P, _P, _I64, _I32, _P, _I32, _I32, _I32, _I32, _I32, ctypes.c_float,
                       _P, _I64, _I64, _I32]
        fn.restype = _I32
        fn = built.lib.pdbox_flash_decode
        fn.argtypes = [_P, _I64, _I64, _P, _P, _I64, _I32, _P, _I64, _P, _I32, _I32, _I32, _I32, ctypes.c_float,
                       _P, _I64, _I64, _I32]
        fn.restype = _I32
    return built


def native_f32() -> Native:
    """The fp32 kernel's library, or why this machine has none (built on the first call in a process)."""
    built = load("extend_f32", needs=AVX2_FLAGS, cflags=AVX2_CFLAGS)
    if built.lib is not None and not getattr(built.lib.pdbox_extend_f32, "argtypes", None):
        built.lib.pdbox_extend_f32.argtypes = [_P, _I64, _I64, _P, _P, _I64, _I32, _P, _I32, _I32, _I32, _I32, _I32,
                                               ctypes.c_float, _P, _I64, _I64, _I32]
        built.lib.pdbox_extend_f32.restype = _I32
    return built


def check_tensors(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                  head_dim_multiple: int, dtype: torch.dtype = torch.bfloat16) -> None:
    """What the attention kernels need of their tensors: q ``(rows, heads, head_dim)`` and ``out`` alike,
    contiguous ``(pages, page_size, kv_heads, head_dim)`` caches, all ``dtype`` on the CPU, whole head groups.
    ``ValueError`` names what is off (the kernels read raw memory: nothing is assumed)."""
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape or out.shape != q.shape:
        raise ValueError(f"q must be (rows, heads, head_dim), out alike, the caches equal (pages, page_size, "
                         f"kv_heads, head_dim): got q {tuple(q.shape)}, out {tuple(out.shape)}, "
                         f"k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if t.dtype != dtype or t.device.type != "cpu":
            raise ValueError(f"{name} must be a {dtype} CPU tensor, got {t.dtype} on {t.device}")
    d, kd, hq, hkv = q.shape[2], k_cache.shape[3], q.shape[1], k_cache.shape[2]
    if kd != d or d % head_dim_multiple or d > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must match (q {d}, cache {kd}) and be a multiple of {head_dim_multiple} "
                         f"up to {MAX_HEAD_DIM}")
    if hq % hkv:
        raise ValueError(f"{hq} query heads do not group over {hkv} KV heads")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or q.stride(2) != 1 or out.stride(2) != 1:
        raise ValueError("the KV caches must be contiguous, q and out of unit head_dim stride")


def check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pages: torch.Tensor, prefix: int,
          out: torch.Tensor) -> None:
    """:func:`check_tensors` (bf16 with head_dim a multiple of 32, or fp32 with a multiple of 8, as ``q``
    is), then the request's page ids and lengths."""
    f32 = q.dtype == torch.float32
    check_tensors(q, k_cache, v_cache, out, 8 if f32 else 32, torch.float32 if f32 else torch.bfloat16)
    n_new, page_size = q.shape[0], k_cache.shape[1]
    if page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    if n_new < 1 or prefix < 0:
        raise ValueError(f"need at least one new token and a prefix >= 0, got {n_new} and {prefix}")
    needed = -(-(prefix + n_new) // page_size)
    if pages.dim() != 1 or pages.dtype != torch.int64 or not pages.is_contiguous() or pages.numel() < needed:
        raise ValueError(f"pages must be a contiguous int64 vector of at least {needed} page ids, "
                         f"got {pages.dtype} {tuple(pages.shape)}")
    used = pages[:needed]
    if int(used.min()) < 0 or int(used.max()) >= k_cache.shape[0]:
        raise ValueError(f"page ids must lie in [0, {k_cache.shape[0]}): got {used.tolist()}")


def flash_extend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pages: torch.Tensor, prefix: int,
                 scale: float, threads: int = 1, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of ``q`` (``n_new`` tokens at positions ``prefix ..``) over cache rows ``[0, prefix + i]``
    of the request whose page ids are ``pages``, bf16 or fp32; written into ``out`` (made if ``None``) and
    returned. GQA: query head ``h`` reads KV head ``h // (heads / kv_heads)``. ``threads`` threads split the work."""
    if q.dtype == torch.float32:
        fn = native_f32().required("the native CPU fp32 prefill attention kernel").pdbox_extend_f32
    else:
        fn = native().required("the native CPU attention kernel").pdbox_flash_extend
    out = torch.empty(q.shape, dtype=q.dtype) if out is None else out
    check(q, k_cache, v_cache, pages, prefix, out)
    n_new, hq, d = q.shape
    rc = fn(
        q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0),
        k_cache.shape[1], pages.data_ptr(), prefix, n_new, hq, k_cache.shape[2], d, scale, out.data_ptr(),
        out.stride(0), out.stride(1), max(1, threads))
    if rc != 0:
        raise RuntimeError(f"flash_extend refused its arguments (code {rc}) after they passed the checks")
    return out
