"""Extend (prefill) attention: new tokens over a paged cached prefix plus themselves, causal."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import (
    LazyKernel,
    check,
    check_device,
    check_index_tensor,
    config,
    interpreter_enabled,
    next_pow2,
    tl,
)
from kernels.decode_attention import check_attention_inputs, dot_precision, gather_pages, softcap_scores


def extend_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Causal attention for a varlen batch of new tokens.

    ``q`` is ``(total_new_tokens, q_heads, head_dim)``, requests packed back to back in batch order;
    request ``b`` has ``extend_lens[b]`` new tokens at positions ``prefix_lens[b] + i``, whose K/V are
    ALREADY stored in the cache. New token ``i`` attends to cache rows ``[0, prefix_lens[b] + i]``.
    Requests with ``extend_lens[b] == 0`` are skipped. Returns ``q``'s shape and dtype. ``softcap`` > 0
    caps the scaled scores (``softcap_scores``, Gemma 2) on an explicit path: SDPA cannot.
    """
    out = torch.empty_like(q)
    q_heads = q.shape[1]
    kv_heads = k_cache.shape[2]
    start = 0
    for b, (prefix, n_new) in enumerate(zip(prefix_lens.tolist(), extend_lens.tolist())):
        if n_new == 0:
            continue
        total = prefix + n_new
        k = gather_pages(k_cache, page_table[b], total).to(q.dtype).transpose(0, 1)
        v = gather_pages(v_cache, page_table[b], total).to(q.dtype).transpose(0, 1)
        qb = q[start : start + n_new].transpose(0, 1)
        if softcap:
            o = capped_attention(qb, k, v, prefix, scale, softcap)
        elif prefix == 0:
            o = F.scaled_dot_product_attention(
                qb, k, v, is_causal=True, scale=scale, enable_gqa=q_heads != kv_heads
            )
        else:
            rows = torch.arange(n_new, device=q.device).unsqueeze(1) + prefix
            mask = torch.arange(total, device=q.device).unsqueeze(0) <= rows
            o = F.scaled_dot_product_attention(
                qb, k, v, attn_mask=mask, scale=scale, enable_gqa=q_heads != kv_heads
            )
        out[start : start + n_new] = o.transpose(0, 1)
        start += n_new
    return out


def capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, scale: float,
                     softcap: float) -> torch.Tensor:
    """One request's causal attention with soft-capped scores: ``q`` ``(q_heads, n_new, D)`` at positions
    ``prefix + i`` over ``k``/``v`` ``(kv_heads, prefix + n_new, D)``; fp32 scores and softmax."""
    group = q.shape[0] // k.shape[0]
    if group > 1:
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    scores = softcap_scores(torch.matmul(q, k.transpose(1, 2)).float() * scale, softcap)
    n_new, total = q.shape[1], k.shape[1]
    future = torch.arange(total, device=q.device)[None, :] > (torch.arange(n_new, device=q.device)[:, None] + prefix)
    scores.masked_fill_(future, float("-inf"))
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)


# ---------------------------------------------------------------------------------------------------
# Triton: one program per (request, KV head, block of BLOCK_M new tokens), whose query rows are the
# block's tokens times the KV head's GROUP query heads (GQA packed: row r is token r // GPAD, head
# r % GPAD of the group, GPAD = GROUP rounded up to a power of two, the padding rows masked). Each K/V
# tile is then read once for the whole group, not once per query head. The new tokens' K/V are in the
# cache already, so a single loop over cache rows [0, prefix + last query of the block] covers the
# cached prefix and the causal part alike; the causal mask only bites in the block's last rows.
# ``BLOCK_R`` (a config) is the rows a program aims at: BLOCK_M = BLOCK_R // GPAD tokens (at least 1).

_LOG2E = 1.4426950408889634


def _extend_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    page_table_ptr,
    prefix_lens_ptr,
    extend_lens_ptr,
    start_loc_ptr,
    o_ptr,
    sm_scale_log2,
    softcap,
    stride_q_t,
    stride_q_h,
    stride_k_page,
    stride_k_slot,
    stride_k_head,
    stride_v_page,
    stride_v_slot,
    stride_v_head,
    stride_pt_b,
    stride_o_t,
    stride_o_h,
    GROUP: tl.constexpr,
    GPAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program ``(b, kv_head, m_block)``: new tokens ``[m_block*BLOCK_M, +BLOCK_M)`` of request ``b``,
    for every query head of ``kv_head``'s group.

    With ``SOFTCAP`` the scores are capped (``softcap * tanh(s / softcap)``) and ``sm_scale_log2`` is the
    plain scale: the log2(e) factor comes after the cap.
    """
    BLOCK_M: tl.constexpr = (BLOCK_R + GPAD - 1) // GPAD  # tokens a program (both are powers of two)
    ROWS: tl.constexpr = BLOCK_M * GPAD
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    m_block = tl.program_id(2)
    n_new = tl.load(extend_lens_ptr + b).to(tl.int32)
    if m_block * BLOCK_M >= n_new:
        return
    prefix = tl.load(prefix_lens_ptr + b).to(tl.int32)
    start = tl.load(start_loc_ptr + b).to(tl.int64)

    offs_r = tl.arange(0, ROWS)
    offs_m = m_block * BLOCK_M + offs_r // GPAD  # each row's token (of the request's new ones) ...
    in_group = offs_r % GPAD  # ... and its query head within the group
    head = kv_head * GROUP + in_group
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = (offs_m < n_new) & (in_group < GROUP)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + (start + offs_m)[:, None] * stride_q_t + head[:, None] * stride_q_h + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if UPCAST:  # the interpreter's bf16 math and bf16 tl.dot are wrong: compute in fp32
        q = q.to(tl.float32)
    pos = prefix + offs_m  # absolute position of each query row
    end = prefix + tl.minimum((m_block + 1) * BLOCK_M, n_new)  # keys past the block's last query are masked

    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    pt_row = page_table_ptr + b * stride_pt_b
    for n0 in range(0, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        page = tl.load(pt_row + offs_n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot = (offs_n % PAGE_SIZE).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(
            k_cache_ptr + page[:, None] * stride_k_page + slot[:, None] * stride_k_slot
            + kv_head * stride_k_head + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        ).to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale_log2
        if SOFTCAP:  # tanh through exp (no tl.tanh everywhere): sign(x) (1 - e^-2|x|) / (1 + e^-2|x|)
            x = qk / softcap
            t = tl.exp(-2.0 * tl.abs(x))
            th = (1.0 - t) / (1.0 + t)
            qk = tl.where(x < 0.0, -th, th) * (softcap * 1.4426950408889634)
        qk = tl.where((offs_n[None, :] <= pos[:, None]) & n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_cache_ptr + page[:, None] * stride_v_page + slot[:, None] * stride_v_slot
            + kv_head * stride_v_head + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        ).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(
        o_ptr + (start + offs_m)[:, None] * stride_o_t + head[:, None] * stride_o_h + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


_extend = LazyKernel(
    _extend_kernel,
    configs=[  # the first is the fixed GPU config when autotuning is off
        config(BLOCK_R=r, BLOCK_N=n, num_warps=w, num_stages=s)
        for r, n, w, s in ((128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 3), (64, 32, 4, 3))
    ],
    key=["GROUP", "HEAD_DIM", "PAGE_SIZE", "BLOCK_D"],
    interpret={"BLOCK_R": 32, "BLOCK_N": 32},
)


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    scale: float,
    extend_start_loc: torch.Tensor | None = None,
    max_extend_len: int | None = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Triton :func:`extend_attention_ref` (varlen, causal, paged prefix; chunked prefill and
    prefix-cache hits alike).

    Optional precomputed metadata, which the scheduler usually has on the host already:
    ``extend_start_loc`` ``(batch,)`` = exclusive cumsum of ``extend_lens`` (the row of each
    request's first token in ``q``; computed on the device when omitted) and ``max_extend_len``
    (when omitted, ``extend_lens`` is read back to the host once, which also checks that it sums to
    ``q.shape[0]``). ``softcap`` > 0 caps the scores as the reference does.
    """
    op = "extend_attention"
    device = check_device(op, q=q, k_cache=k_cache, v_cache=v_cache, page_table=page_table,
                          prefix_lens=prefix_lens, extend_lens=extend_lens)
    check_attention_inputs(op, q, k_cache, v_cache, page_table, extend_lens, "extend_lens")
    check(page_table.shape[1] <= 1 or page_table.stride(1) == 1, f"{op}: page_table rows must be unit-stride")
    check_index_tensor(op, "prefix_lens", prefix_lens, 1)
    check(prefix_lens.is_contiguous() and prefix_lens.shape == extend_lens.shape,
          f"{op}: prefix_lens must be contiguous with extend_lens' shape {tuple(extend_lens.shape)}, "
          f"got {tuple(prefix_lens.shape)}")
    check(softcap >= 0.0, f"{op}: softcap must be >= 0 (0: off), got {softcap}")
    batch = extend_lens.shape[0]
    if max_extend_len is None:
        lens = extend_lens.cpu()
        max_extend_len = int(lens.max()) if batch else 0
        total = int(lens.sum())
        check(total == q.shape[0], f"{op}: extend_lens sum to {total} but q has {q.shape[0]} tokens")
    check(max_extend_len >= 0, f"{op}: max_extend_len must be >= 0, got {max_extend_len}")
    if extend_start_loc is None:
        extend_start_loc = torch.cumsum(extend_lens, 0) - extend_lens
    else:
        check_device(op, q=q, extend_start_loc=extend_start_loc)
        check_index_tensor(op, "extend_start_loc", extend_start_loc, 1)
        check(extend_start_loc.is_contiguous() and extend_start_loc.shape == extend_lens.shape,
              f"{op}: extend_start_loc must be contiguous with extend_lens' shape")
    out = torch.empty(q.shape, dtype=q.dtype, device=device)
    if batch == 0 or max_extend_len == 0 or q.shape[0] == 0:
        return out
    q_heads, head_dim = q.shape[1:]
    _, page_size, kv_heads, _ = k_cache.shape
    interp = interpreter_enabled()
    # NOTE: tl.dot needs every dim >= 16 on a GPU (the interpreter does not care): pad and mask.
    block_d = next_pow2(head_dim) if interp else max(16, next_pow2(head_dim))

    group = q_heads // kv_heads
    gpad = next_pow2(group)

    def grid(meta: dict) -> tuple[int, int, int]:
        return (batch, kv_heads, triton_cdiv(max_extend_len, triton_cdiv(meta["BLOCK_R"], gpad)))

    _extend[grid](
        q, k_cache, v_cache, page_table, prefix_lens, extend_lens, extend_start_loc, out,
        scale if softcap else scale * _LOG2E, float(softcap),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        page_table.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GPAD=gpad, PAGE_SIZE=page_size, HEAD_DIM=head_dim,
        UPCAST=interp, DOT_PRECISION=dot_precision(q.dtype), SOFTCAP=bool(softcap), BLOCK_D=block_d,
    )
    return out


def triton_cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)
