"""Write new K/V rows into paged caches by slot mapping."""

from __future__ import annotations

import torch


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
