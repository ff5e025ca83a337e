"""Decode's linear layers on a GGUF's 4- and 8-bit weights, in pdbox's own C kernel (``quant_gemv.c``:
AVX2 + FMA).

A few rows of activations (``MAX_ROWS``) times a weight kept as its quantized blocks: the rows are
quantized to int16 per block of 32 (a step of 2^-15 of the block's largest value; llama.cpp's 8 bits
flipped SmolLM2's greedy answers, this does not), each block's dot product summed in integers and scaled
once, so one pass reads half a byte (4-bit) or a byte (8-bit) per weight plus the blocks' parameters.
The same function as ``x @ blocks.dequantize().T`` up to that rounding of ``x``; the tests compare the
two.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

from kernels.cpu.build import AVX2_CFLAGS, AVX2_FLAGS, Native, load

MAX_ROWS = 16  # the C kernel's own bound (MAX_ROWS in quant_gemv.c; 8 at a time share a pass through cache)
GROUP = 32  # weights per block along k (GGUF's, and the kernel's BLOCK)
_I64, _I32, _P = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


def native() -> Native:
    """The kernel's library, or why this machine has none (built on the first call in a process)."""
    built = load("quant_gemv", needs=AVX2_FLAGS, cflags=AVX2_CFLAGS)
    if built.lib is not None and not getattr(built.lib.pdbox_quant_linear, "argtypes", None):
        built.lib.pdbox_quant_linear.argtypes = [_I32, _P, _I64, _I32, _I32, _P, _P, _I32, _P, _I64, _I32, _I32]
        built.lib.pdbox_quant_linear.restype = _I32
    return built


@dataclass(frozen=True)
class Q4Weight:
    """A ``(n, k)`` weight in the kernel's layout: ``codes`` ``(n, k / 2)`` uint8 (byte ``j`` of a block:
    weight ``j`` in the low nibble, ``j + 16`` in the high one), ``params`` ``(n, 2, k / 32)`` fp32, the
    blocks' scales then their offsets (``w = q * scale + offset``)."""

    codes: torch.Tensor
    params: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * 2

    @property
    def nbytes(self) -> int:
        """What one pass over the weight reads."""
        return self.codes.nbytes + self.params.nbytes

    @staticmethod
    def pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> Q4Weight:
        """A weight ``w = (codes - 8) * scale + zero`` (codes ``(n, k)`` in 0..15, one per weight; ``scale``
        and ``zero`` ``(n, k / 32)``, one per block) in the kernel's layout."""
        n, k = codes.shape
        if k % GROUP:
            raise ValueError(f"k must be a multiple of {GROUP}, got {k}")
        q = codes.to(torch.uint8).reshape(n, k // GROUP, 2, GROUP // 2)
        packed = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
        params = torch.stack([scale.float(), zero.float() - 8 * scale.float()], 1).contiguous()
        return Q4Weight(packed, params)


@dataclass(frozen=True)
class Q8Weight:
    """A ``(n, k)`` weight in the kernel's layout: ``codes`` ``(n, k)`` int8, ``scales`` ``(n, k / 32)``
    fp32 (``w = q * scale``)."""

    codes: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1]

    @property
    def nbytes(self) -> int:
        """What one pass over the weight reads."""
        return self.codes.nbytes + self.scales.nbytes

    @staticmethod
    def pack(codes: torch.Tensor, scale: torch.Tensor) -> Q8Weight:
        """A weight ``w = codes * scale`` (codes ``(n, k)`` int8; ``scale`` ``(n, k / 32)``) in the kernel's layout."""
        n, k = codes.shape
        if k % GROUP:
            raise ValueError(f"k must be a multiple of {GROUP}, got {k}")
        return Q8Weight(codes.to(torch.int8).contiguous(), scale.float().contiguous())


def quant_linear(x: torch.Tensor, weight: Q4Weight | Q8Weight, threads: int = 1, silu_mul: bool = False,
                 checked: bool = True) -> torch.Tensor:
    """``x @ w.T`` for ``x`` ``(rows, k)`` fp32 with contiguous rows, ``rows`` in 1..``MAX_ROWS``: a new
    ``(rows, n)`` fp32 tensor. ``silu_mul``: ``x`` is ``(rows, 2k)``, ``[gate, up]``, and the product is of
    ``silu(gate) * up`` (SwiGLU's down projection; the same bits as ``pointwise.silu_and_mul`` then this).
    ``checked=False`` skips the dtype, device and stride checks (a caller that made them); the sizes are
    always checked."""
    n, k = weight.shape
    width = 2 * k if silu_mul else k
    if checked and (x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.stride(1) != 1):
        raise ValueError(f"x must be a 2-D fp32 CPU tensor with contiguous rows, got {x.dtype} {tuple(x.shape)} "
                         f"strides {x.stride()} on {x.device}")
    rows, cols = x.shape
    if cols != width or not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"x must be 1 to {MAX_ROWS} rows of {width}, got {tuple(x.shape)}")
    out = torch.empty(rows, n, dtype=torch.float32)
    rc = _kernel()(4 if isinstance(weight, Q4Weight) else 8, x.data_ptr(), x.stride(0), rows, k,
                   weight.codes.data_ptr(), weight.params.data_ptr() if isinstance(weight, Q4Weight)
                   else weight.scales.data_ptr(), n, out.data_ptr(), n, max(1, threads), silu_mul)
    if rc == -2:
        raise MemoryError("pdbox_quant_linear could not allocate its scratch rows")
    if rc != 0:
        raise RuntimeError(f"pdbox_quant_linear refused its arguments (code {rc})")
    return out


@cache
def _kernel() -> Callable[..., int]:
    return native().required("the native CPU quantized GEMV").pdbox_quant_linear
