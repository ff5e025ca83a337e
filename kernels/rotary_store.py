"""Rotary embedding and the paged-cache store in one kernel: rotated K goes straight into its cache slot.

A decode step runs a dozen small kernels per layer, each paying a launch and a ramp that dwarf its
work at small batches (replayed graphs included); this one replaces two of them (`rotary`, then
`store_kv`), and the rotated K is never written anywhere but the cache.
"""

from __future__ import annotations

import torch

from kernels._triton import LazyKernel, check, check_device, config, next_pow2, tl
from kernels.kv_store import check_store_inputs, store_kv_ref
from kernels.rotary import check_rotary_inputs, rotary_ref


def rotary_store_kv_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """:func:`kernels.rotary_ref` of ``q`` and ``k``, then :func:`kernels.store_kv_ref` of the rotated
    ``k`` and of ``v`` at ``slot_mapping``. Returns the rotated ``q`` (a new tensor)."""
    q, k = rotary_ref(q, k, positions, cos_sin_cache)
    store_kv_ref(k_cache, v_cache, k, v, slot_mapping)
    return q


# ---------------------------------------------------------------------------------------------------
# Triton: one program per token rotates its q heads into ``q_out`` and its k heads into the K cache
# slot, and copies its v heads into the V cache slot. Rotated K is rounded to k's dtype, then to the
# cache's, exactly as the two unfused calls round it.


def _rotary_store_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    cos_sin_ptr,
    slot_ptr,
    q_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    stride_cos_sin,
    Q_HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    c_mask = offs < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cos_sin + offs, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cos_sin + HALF + offs, mask=c_mask, other=0.0).to(tl.float32)[None, :]

    hq = tl.arange(0, BLOCK_QH)[:, None]
    mask = (hq < Q_HEADS) & c_mask[None, :]
    src = q_ptr + t * stride_q_t + hq * stride_q_h + offs[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = q_out_ptr + t * (Q_HEADS * 2 * HALF) + hq * (2 * HALF) + offs[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(q_out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(q_out_ptr.dtype.element_ty), mask=mask)

    hk = tl.arange(0, BLOCK_KH)[:, None]
    mask = (hk < KV_HEADS) & c_mask[None, :]
    row = slot * (KV_HEADS * 2 * HALF) + hk * (2 * HALF) + offs[None, :]
    src = k_ptr + t * stride_k_t + hk * stride_k_h + offs[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    k_dtype = k_ptr.dtype.element_ty
    cache_dtype = k_cache_ptr.dtype.element_ty
    tl.store(k_cache_ptr + row, (x1 * cos - x2 * sin).to(k_dtype).to(cache_dtype), mask=mask)
    tl.store(k_cache_ptr + row + HALF, (x2 * cos + x1 * sin).to(k_dtype).to(cache_dtype), mask=mask)
    src = v_ptr + t * stride_v_t + hk * stride_v_h + offs[None, :]
    tl.store(v_cache_ptr + row, tl.load(src, mask=mask).to(cache_dtype), mask=mask)
    tl.store(v_cache_ptr + row + HALF, tl.load(src + HALF, mask=mask).to(cache_dtype), mask=mask)


_rotary_store = LazyKernel(
    _rotary_store_kernel,
    configs=[config(num_warps=w, num_stages=1) for w in (4, 2, 8)],
    key=["Q_HEADS", "KV_HEADS", "HALF"],
)


def rotary_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Triton :func:`rotary_store_kv_ref`, bit-equal to Triton `rotary` then `store_kv`. ``q``/``k``/``v``
    may be strided views of a fused qkv with a unit-stride last dim; slots and positions are not
    range-checked on the device."""
    op = "rotary_store_kv"
    check_device(op, q=q, k=k, v=v, positions=positions, cos_sin_cache=cos_sin_cache, k_cache=k_cache,
                 v_cache=v_cache, slot_mapping=slot_mapping)
    check_rotary_inputs(op, q, k, positions, cos_sin_cache)
    check_store_inputs(op, k_cache, v_cache, k, v, slot_mapping)
    check(v.shape[0] == q.shape[0], f"{op}: q has {q.shape[0]} tokens but v has {v.shape[0]}")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0:
        return q_out
    half = q.shape[2] // 2
    _rotary_store[(q.shape[0],)](
        q, k, v, positions, cos_sin_cache, slot_mapping, q_out, k_cache, v_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        Q_HEADS=q.shape[1], KV_HEADS=k.shape[1], HALF=half,
        BLOCK_QH=next_pow2(q.shape[1]), BLOCK_KH=next_pow2(k.shape[1]), BLOCK_HALF=next_pow2(half),
    )
    return q_out
