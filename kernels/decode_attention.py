"""Paged decode attention: one new query token per request over its paged KV."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_pages(cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """Rows ``[0, length)`` of one request's paged cache as ``(length, kv_heads, head_dim)``."""
    page_size = cache.shape[1]
    n_pages = (length + page_size - 1) // page_size
    rows = cache.index_select(0, pages[:n_pages]).flatten(0, 1)
    return rows[:length]


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one query token per request over its whole context.

    Shapes: ``q`` ``(batch, q_heads, head_dim)``; caches ``(num_pages, page_size, kv_heads, head_dim)``;
    ``page_table`` ``(batch, max_pages)`` int32/int64; ``seq_lens`` ``(batch,)`` context lengths
    INCLUDING the current token (whose K/V are already stored). A slot with ``seq_len == 0`` is empty
    and yields zeros. Returns ``(batch, q_heads, head_dim)`` in ``q.dtype``.
    """
    out = torch.zeros_like(q)
    q_heads = q.shape[1]
    kv_heads = k_cache.shape[2]
    for b, length in enumerate(seq_lens.tolist()):
        if length == 0:
            continue
        k = gather_pages(k_cache, page_table[b], length).to(q.dtype).transpose(0, 1)
        v = gather_pages(v_cache, page_table[b], length).to(q.dtype).transpose(0, 1)
        o = F.scaled_dot_product_attention(
            q[b].unsqueeze(1), k, v, scale=scale, enable_gqa=q_heads != kv_heads
        )
        out[b] = o.squeeze(1)
    return out
