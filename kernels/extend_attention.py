"""Extend (prefill) attention: new tokens over a paged cached prefix plus themselves, causal."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.decode_attention import gather_pages


def extend_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention for a varlen batch of new tokens.

    ``q`` is ``(total_new_tokens, q_heads, head_dim)``, requests packed back to back in batch order;
    request ``b`` has ``extend_lens[b]`` new tokens at positions ``prefix_lens[b] + i``, whose K/V are
    ALREADY stored in the cache. New token ``i`` attends to cache rows ``[0, prefix_lens[b] + i]``.
    Requests with ``extend_lens[b] == 0`` are skipped. Returns ``q``'s shape and dtype.
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
        if prefix == 0:
            o = F.scaled_dot_product_attention(
                qb, k, v, is_causal=True, scale=scale, enable_gqa=q_heads != kv_heads
            )
        else:
            rows = torch.arange(n_new).unsqueeze(1) + prefix
            mask = torch.arange(total).unsqueeze(0) <= rows
            o = F.scaled_dot_product_attention(
                qb, k, v, attn_mask=mask, scale=scale, enable_gqa=q_heads != kv_heads
            )
        out[start : start + n_new] = o.transpose(0, 1)
        start += n_new
    return out
