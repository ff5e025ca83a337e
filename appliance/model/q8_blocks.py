"""GGUF's 8-bit weight blocks (Q8_0) kept as codes, for a kernel that reads them packed.

A Q8_0 block holds 32 weights of one row as ``w = d * q`` (``q`` int8, ``d`` fp16): 34 bytes, about a
quarter of fp32's. The loader keeps these beside the dequantized floats, as it keeps 4-bit blocks
(``q4_blocks``, the same `Blocks` interface); the CPU backend runs few-row steps through them
(``appliance.engine.attention_cpu``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from appliance.model.q4_blocks import GROUP, Blocks

Q8_TYPES = ("Q8_0",)
_BLOCK_BYTES = 34


@dataclass(frozen=True)
class Q8Blocks(Blocks):
    """A ``(out, in)`` weight as int8 codes ``(out, in)`` and per-block ``scale`` ``(out, in / 32)`` fp32:
    ``w = codes * scale``."""

    codes: torch.Tensor
    scale: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight these blocks stand for."""
        n, k = self.shape
        return (self.codes.float().view(n, k // GROUP, GROUP) * self.scale[..., None]).view(n, k)


def from_gguf(raw: np.ndarray, qtype: str, shape: tuple[int, int]) -> Q8Blocks:
    """A Q8_0 tensor's raw bytes (any shape; ``shape`` is the row-major ``(out, in)``) as blocks."""
    n, k = shape
    if qtype not in Q8_TYPES or k % GROUP:
        raise ValueError(f"not an 8-bit GGUF tensor of whole blocks: type {qtype}, shape {shape}")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // GROUP, _BLOCK_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    codes = blocks[..., 2:].copy().view(np.int8).reshape(n, k)
    return Q8Blocks(torch.from_numpy(codes), torch.from_numpy(d))
