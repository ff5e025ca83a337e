"""GGUF's 4-bit weight blocks (Q4_0, Q4_1) kept as codes, for a kernel that reads them packed.

A Q4_1 block holds 32 weights of one row as ``w = d * q + m`` (``q`` in 0..15, ``d`` and ``m`` fp16);
Q4_0 as ``w = d * (q - 8)``. Both are ``w = (q - 8) * scale + zero`` per block, the form torch's CPU
int4 kernel (``_weight_int4pack_mm_for_cpu``) takes, with ``scale = d`` and ``zero = m + 8 d`` (Q4_1)
or ``0`` (Q4_0). The loader keeps these beside the dequantized floats; the CPU backend runs few-row
steps through them, a quarter of the bf16 bytes (``appliance.engine.attention_cpu``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

GROUP = 32  # weights per block
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}
Q4_TYPES = tuple(_BLOCK_BYTES)


@dataclass(frozen=True)
class Q4Blocks:
    """A ``(out, in)`` weight as 4-bit codes ``(out, in)`` uint8 and per-block ``scale``/``zero``
    ``(out, in / 32)`` fp32: ``w = (codes - 8) * scale + zero``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight these blocks stand for."""
        n, k = self.shape
        q = self.codes.float().view(n, k // GROUP, GROUP) - 8
        return (q * self.scale[..., None] + self.zero[..., None]).view(n, k)

    def rows(self, start: int, end: int) -> Q4Blocks:
        return Q4Blocks(self.codes[start:end], self.scale[start:end], self.zero[start:end])

    def cols(self, start: int, end: int) -> Q4Blocks | None:
        """Columns ``[start, end)``, or ``None`` when they cut a block."""
        if start % GROUP or end % GROUP:
            return None
        return Q4Blocks(self.codes[:, start:end], self.scale[:, start // GROUP : end // GROUP],
                        self.zero[:, start // GROUP : end // GROUP])

    def map_rows(self, fn) -> Q4Blocks:
        """The same row permutation (``fn`` of a row-major tensor) on codes and block parameters."""
        return Q4Blocks(fn(self.codes), fn(self.scale), fn(self.zero))

    @staticmethod
    def cat(parts: list[Q4Blocks]) -> Q4Blocks:
        """Row-wise concatenation (the fused QKV and gate/up weights)."""
        return Q4Blocks(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                        torch.cat([p.zero for p in parts]))


def from_gguf(raw: np.ndarray, qtype: str, shape: tuple[int, int]) -> Q4Blocks:
    """A Q4_0 / Q4_1 tensor's raw bytes (any shape; ``shape`` is the row-major ``(out, in)``) as blocks."""
    n, k = shape
    if qtype not in _BLOCK_BYTES or k % GROUP:
        raise ValueError(f"not a 4-bit GGUF tensor of whole blocks: type {qtype}, shape {shape}")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // GROUP, _BLOCK_BYTES[qtype])
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if qtype == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zero = m + 8 * d
        qs = blocks[..., 4:]
    else:
        zero = np.zeros_like(d)
        qs = blocks[..., 2:]
    # NOTE: byte j of a block holds weight j in its low nibble and weight j + 16 in its high one
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, k)
    return Q4Blocks(torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(zero))
