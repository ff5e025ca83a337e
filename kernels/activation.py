"""SiLU-and-mul (SwiGLU gate)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x`` of last dim ``2d``."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
