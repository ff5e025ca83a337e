"""Rotary position embedding, rotate-half (NeoX / Hugging Face Llama) layout, alone or fused with the
paged KV store."""

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
    gdc_launch_dependents,
    gdc_wait,
    next_pow2,
    tl,
)
from kernels.kv_store import check_store_inputs, store_kv_ref
from kernels.rope_scaling import RopeParams, cos_sin_scale, rotary_angles


def rotary_cos_sin_cache(head_dim: int, max_position: int, theta: float,
                         scaling: RopeParams | None = None) -> torch.Tensor:
    """``(max_position, head_dim)`` fp32: cos in the first half of the last dim, sin in the second.

    ``scaling`` (default: none) picks the rope type (``kernels.rope_scaling``); yarn's attention factor
    is folded into cos and sin here, so the kernels stay the same for every type.
    """
    freqs = rotary_angles(head_dim, max_position, theta, scaling)
    cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    scale = cos_sin_scale(scaling)
    return (cache * scale if scale != 1.0 else cache).float()


def rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` ``(T, q_heads, D)`` and ``k`` ``(T, kv_heads, D)`` at ``positions`` ``(T,)``.

    Dim ``i < D/2`` pairs with ``i + D/2``. Returns new tensors in the inputs' dtypes.
    """
    cos, sin = cos_sin_cache.index_select(0, positions).unsqueeze(1).chunk(2, dim=-1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


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
    """:func:`rotary_ref` of ``q`` and ``k``, then :func:`kernels.store_kv_ref` of the rotated ``k`` and
    of ``v`` at ``slot_mapping``. Returns the rotated ``q`` (a new tensor)."""
    q, k = rotary_ref(q, k, positions, cos_sin_cache)
    store_kv_ref(k_cache, v_cache, k, v, slot_mapping)
    return q


# ---------------------------------------------------------------------------------------------------
# Triton: one program per token rotates all its q and k heads. With ``TO_CACHE`` the rotated k goes
# straight into its paged-cache slot and v is copied into its slot too: the decode step's rotary and
# KV store in one kernel (each a launch and a ramp that outweigh their work at small batches). Rotated
# k is rounded to k's dtype, then to the cache's, exactly as the two unfused calls round it. Without
# ``TO_CACHE``, ``k_out`` is a contiguous ``(tokens, kv_heads, head_dim)`` tensor: the same layout
# as a cache of one-token pages with token ``t`` in slot ``t``.


def _rotary_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    cache_ptr,
    slot_ptr,
    q_out_ptr,
    k_out_ptr,
    v_out_ptr,
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    stride_cache,
    Q_HEADS: tl.constexpr,
    K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    TO_CACHE: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    """Token ``t``: ``[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]`` for every head of q and k."""
    if USE_GDC:  # PDL (kernels/_triton.py): the kernel before has finished writing; the next may launch
        gdc_wait()
        gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    c_mask = offs < HALF
    cos = tl.load(cache_ptr + pos * stride_cache + offs, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + offs, mask=c_mask, other=0.0).to(tl.float32)[None, :]

    hq = tl.arange(0, BLOCK_QH)[:, None]
    mask = (hq < Q_HEADS) & c_mask[None, :]
    src = q_ptr + t * stride_q_t + hq * stride_q_h + offs[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = q_out_ptr + t * (Q_HEADS * 2 * HALF) + hq * (2 * HALF) + offs[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(q_out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(q_out_ptr.dtype.element_ty), mask=mask)

    slot = tl.load(slot_ptr + t).to(tl.int64) if TO_CACHE else t
    hk = tl.arange(0, BLOCK_KH)[:, None]
    mask = (hk < K_HEADS) & c_mask[None, :]
    row = slot * (K_HEADS * 2 * HALF) + hk * (2 * HALF) + offs[None, :]
    src = k_ptr + t * stride_k_t + hk * stride_k_h + offs[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    k_dtype = k_ptr.dtype.element_ty
    out_dtype = k_out_ptr.dtype.element_ty
    tl.store(k_out_ptr + row, (x1 * cos - x2 * sin).to(k_dtype).to(out_dtype), mask=mask)
    tl.store(k_out_ptr + row + HALF, (x2 * cos + x1 * sin).to(k_dtype).to(out_dtype), mask=mask)
    if TO_CACHE:
        src = v_ptr + t * stride_v_t + hk * stride_v_h + offs[None, :]
        tl.store(v_out_ptr + row, tl.load(src, mask=mask).to(out_dtype), mask=mask)
        tl.store(v_out_ptr + row + HALF, tl.load(src + HALF, mask=mask).to(out_dtype), mask=mask)


_rotary = LazyKernel(
    _rotary_kernel,
    configs=[config(num_warps=w, num_stages=1) for w in (4, 2, 8)],
    key=["Q_HEADS", "K_HEADS", "HALF", "TO_CACHE"],
    pdl=True,
)


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
            slots: torch.Tensor, q_out: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor, to_cache: bool) -> None:
    half = q.shape[2] // 2
    _rotary[(q.shape[0],)](
        q, k, v, positions, cos_sin_cache, slots, q_out, k_out, v_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        Q_HEADS=q.shape[1], K_HEADS=k.shape[1], HALF=half, TO_CACHE=to_cache,
        BLOCK_QH=next_pow2(q.shape[1]), BLOCK_KH=next_pow2(k.shape[1]), BLOCK_HALF=next_pow2(half),
    )


def rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`rotary_ref`; ``q``/``k`` may be strided views (e.g. of a fused qkv) with a
    unit-stride last dim. Returns new contiguous tensors; positions are not range-checked."""
    op = "rotary"
    check_device(op, q=q, k=k, positions=positions, cos_sin_cache=cos_sin_cache)
    check_rotary_inputs(op, q, k, positions, cos_sin_cache)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q.shape[0] == 0:
        return q_out, k_out
    _launch(q, k, k, positions, cos_sin_cache, positions, q_out, k_out, k_out, to_cache=False)  # v: unused
    return q_out, k_out


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
    """Triton :func:`rotary_store_kv_ref` in one kernel, bit-equal to Triton :func:`rotary` then
    `kernels.store_kv`. ``q``/``k``/``v`` may be strided views of a fused qkv with a unit-stride last
    dim; slots and positions are not range-checked on the device."""
    op = "rotary_store_kv"
    check_device(op, q=q, k=k, v=v, positions=positions, cos_sin_cache=cos_sin_cache, k_cache=k_cache,
                 v_cache=v_cache, slot_mapping=slot_mapping)
    check_rotary_inputs(op, q, k, positions, cos_sin_cache)
    check_store_inputs(op, k_cache, v_cache, k, v, slot_mapping)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0:
        return q_out
    _launch(q, k, v, positions, cos_sin_cache, slot_mapping, q_out, k_cache, v_cache, to_cache=True)
    return q_out


def check_rotary_inputs(op: str, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                        cos_sin_cache: torch.Tensor) -> None:
    """Shapes, dtypes and strides of a rotary call (devices are the caller's check)."""
    check(q.dim() == 3 and k.dim() == 3, f"{op}: q and k must be (tokens, heads, head_dim), "
          f"got {tuple(q.shape)} and {tuple(k.shape)}")
    check(q.shape[0] == k.shape[0], f"{op}: q has {q.shape[0]} tokens but k has {k.shape[0]}")
    head_dim = q.shape[2]
    check(k.shape[2] == head_dim and head_dim % 2 == 0,
          f"{op}: q and k need the same even head_dim, got {q.shape[2]} and {k.shape[2]}")
    for name, t in (("q", q), ("k", k), ("cos_sin_cache", cos_sin_cache)):
        check_float_dtype(op, name, t)
        check_last_dim_contiguous(op, name, t)
    check(cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == head_dim,
          f"{op}: cos_sin_cache must be (max_position, {head_dim}), got {tuple(cos_sin_cache.shape)}")
    check_index_tensor(op, "positions", positions, 1)
    check(positions.is_contiguous() and positions.shape[0] == q.shape[0],
          f"{op}: positions must be contiguous with {q.shape[0]} entries, got {tuple(positions.shape)}")
