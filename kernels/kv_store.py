"""Write new K/V rows into paged caches by slot mapping."""

from __future__ import annotations

import torch

from kernels._triton import (
    LazyKernel,
    check,
    check_device,
    check_float_dtype,
    check_index_tensor,
    check_last_dim_contiguous,
    config,
    next_pow2,
    tl,
)


def store_kv_ref(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write ``k``/``v`` rows into their slots.

    Shapes: ``k_cache``/``v_cache`` ``(num_pages, page_size, kv_heads, head_dim)`` (contiguous);
    ``k``/``v`` ``(num_tokens, kv_heads, head_dim)``; ``slot_mapping`` ``(num_tokens,)`` int64 with
    ``slot = page * page_size + offset``.
    """
    heads, dim = k_cache.shape[-2:]
    k_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


# ---------------------------------------------------------------------------------------------------
# Triton


def _store_kv_kernel(
    k_cache_ptr,
    v_cache_ptr,
    k_ptr,
    v_ptr,
    slot_ptr,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per token: copy its ``(kv_heads, head_dim)`` K and V rows into cache slot ``slot``."""
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < KV_HEADS) & (d < HEAD_DIM)
    dst = slot * (KV_HEADS * HEAD_DIM) + h * HEAD_DIM + d
    k = tl.load(k_ptr + tok * stride_k_tok + h * stride_k_head + d, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + tok * stride_v_tok + h * stride_v_head + d, mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


_store_kv = LazyKernel(
    _store_kv_kernel,
    configs=[config(num_warps=w, num_stages=1) for w in (4, 1, 2, 8)],
    key=["KV_HEADS", "HEAD_DIM"],
)


def store_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton :func:`store_kv_ref`: scatter ``k``/``v`` rows into the caches at ``slot_mapping``.

    Caches must be contiguous; ``k``/``v`` may be strided views (e.g. slices of a fused qkv) with a
    unit-stride last dim. Slots are not range-checked on the device (that would need a sync).
    """
    op = "store_kv"
    check_device(op, k_cache=k_cache, v_cache=v_cache, k=k, v=v, slot_mapping=slot_mapping)
    check_store_inputs(op, k_cache, v_cache, k, v, slot_mapping)
    if k.shape[0] == 0:
        return
    heads, dim = k_cache.shape[2:]
    _store_kv[(k.shape[0],)](
        k_cache, v_cache, k, v, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        KV_HEADS=heads, HEAD_DIM=dim, BLOCK_H=next_pow2(heads), BLOCK_D=next_pow2(dim),
    )


def check_store_inputs(op: str, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """Shapes, dtypes and strides of a store into the paged caches (devices are the caller's check)."""
    check(k_cache.dim() == 4, f"{op}: k_cache must be (num_pages, page_size, kv_heads, head_dim), "
          f"got {tuple(k_cache.shape)}")
    check(v_cache.shape == k_cache.shape, f"{op}: v_cache shape {tuple(v_cache.shape)} != k_cache "
          f"shape {tuple(k_cache.shape)}")
    check(k_cache.is_contiguous() and v_cache.is_contiguous(), f"{op}: k_cache and v_cache must be contiguous")
    check(v_cache.dtype == k_cache.dtype, f"{op}: v_cache dtype {v_cache.dtype} != k_cache dtype {k_cache.dtype}")
    check_float_dtype(op, "k_cache", k_cache)
    heads, dim = k_cache.shape[2:]
    for name, t in (("k", k), ("v", v)):
        check(t.dim() == 3 and tuple(t.shape[1:]) == (heads, dim),
              f"{op}: {name} must be (num_tokens, {heads}, {dim}), got {tuple(t.shape)}")
        check_float_dtype(op, name, t)
        check_last_dim_contiguous(op, name, t)
    check(k.shape[0] == v.shape[0], f"{op}: k has {k.shape[0]} tokens but v has {v.shape[0]}")
    check_index_tensor(op, "slot_mapping", slot_mapping, 1)
    check(slot_mapping.shape[0] == k.shape[0],
          f"{op}: slot_mapping has {slot_mapping.shape[0]} entries for {k.shape[0]} tokens")
    check(slot_mapping.is_contiguous(), f"{op}: slot_mapping must be contiguous")
