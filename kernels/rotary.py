"""Rotary position embedding, rotate-half (NeoX / Hugging Face Llama) layout."""

from __future__ import annotations

import torch


def rotary_cos_sin_cache(head_dim: int, max_position: int, theta: float) -> torch.Tensor:
    """``(max_position, head_dim)`` fp32: cos in the first half of the last dim, sin in the second."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float64), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).float()


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
