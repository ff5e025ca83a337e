"""GGUF's 4-bit weight blocks (Q4_0, Q4_1) kept as codes, for a kernel that reads them packed.

A Q4_1 block holds 32 weights of one row as ``w = d * q + m`` (``q`` in 0..15, ``d`` and ``m`` fp16);
Q4_0 as ``w = d * (q - 8)``. Both are ``w = (q - 8) * scale + zero`` per block, the form torch's CPU
int4 kernel (``_weight_int4pack_mm_for_cpu``) takes, with ``scale = d`` and ``zero = m + 8 d`` (Q4_1)
or ``0`` (Q4_0). The loader keeps these beside the dequantized floats; the CPU backend runs few-row
steps through them, a quarter of the bf16 bytes (``appliance.engine.attention_cpu``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

GROUP = 32  # weights per block
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}
Q4_TYPES = tuple(_BLOCK_BYTES)


class Blocks:
    """What a quantized weight's blocks share (a frozen dataclass whose first field is ``codes``, one per
    weight ``(out, in)``, and whose other fields are per block ``(out, in / 32)``): slicing and stacking
    rows and columns as the loader slices the floats."""

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[attr-defined, return-value]

    def _parts(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]  # type: ignore[arg-type]

    def rows(self, start: int, end: int):
        return type(self)(*[t[start:end] for t in self._parts()])

    def cols(self, start: int, end: int):
        """Columns ``[start, end)``, or ``None`` when they cut a block."""
        if start % GROUP or end % GROUP:
            return None
        codes, *params = self._parts()
        return type(self)(codes[:, start:end], *[t[:, start // GROUP : end // GROUP] for t in params])

    def map_rows(self, fn):
        """The same row permutation (``fn`` of a row-major tensor) on codes and block parameters."""
        return type(self)(*[fn(t) for t in self._parts()])

    @classmethod
    def cat(cls, parts: list):
        """Row-wise concatenation (the fused QKV and gate/up weights)."""
        return cls(*[torch.cat(ts) for ts in zip(*[p._parts() for p in parts], strict=True)])


@dataclass(frozen=True)
class Q4Blocks(Blocks):
    """A ``(out, in)`` weight as 4-bit codes ``(out, in)`` uint8 and per-block ``scale``/``zero``
    ``(out, in / 32)`` fp32: ``w = (codes - 8) * scale + zero``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight these blocks stand for."""
        n, k = self.shape
        q = self.codes.float().view(n, k // GROUP, GROUP) - 8
        return (q * self.scale[..., None] + self.zero[..., None]).view(n, k)


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
