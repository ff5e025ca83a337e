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
from dataclasses import dataclass

import torch

from appliance.model.q4_blocks import GROUP, Q4Blocks
from appliance.model.q8_blocks import Q8Blocks
from kernels.cpu.build import AVX2_CFLAGS, AVX2_FLAGS, Native, load

MAX_ROWS = 8  # the C kernel's own bound (MAX_ROWS in quant_gemv.c)
_I64, _I32, _P = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


def native() -> Native:
    """The kernel's library, or why this machine has none (built on the first call in a process)."""
    built = load("quant_gemv", needs=AVX2_FLAGS, cflags=AVX2_CFLAGS)
    if built.lib is not None and not getattr(built.lib.pdbox_quant_linear, "argtypes", None):
        built.lib.pdbox_quant_linear.argtypes = [_I32, _P, _I64, _I32, _I32, _P, _P, _I32, _P, _I64, _I32]
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

    @staticmethod
    def pack(blocks: Q4Blocks) -> Q4Weight:
        """``blocks`` (``w = (q - 8) * scale + zero``) in the kernel's layout."""
        n, k = blocks.shape
        if k % GROUP:
            raise ValueError(f"k must be a multiple of {GROUP}, got {k}")
        q = blocks.codes.to(torch.uint8).view(n, k // GROUP, 2, GROUP // 2)
        codes = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
        scale = blocks.scale.float()
        params = torch.stack([scale, blocks.zero.float() - 8 * scale], 1).contiguous()
        return Q4Weight(codes, params)


@dataclass(frozen=True)
class Q8Weight:
    """A ``(n, k)`` weight in the kernel's layout: ``codes`` ``(n, k)`` int8, ``scales`` ``(n, k / 32)``
    fp32 (``w = q * scale``)."""

    codes: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1]

    @staticmethod
    def pack(blocks: Q8Blocks) -> Q8Weight:
        n, k = blocks.shape
        if k % GROUP:
            raise ValueError(f"k must be a multiple of {GROUP}, got {k}")
        return Q8Weight(blocks.codes.to(torch.int8).contiguous(), blocks.scale.float().contiguous())


def pack(blocks: Q4Blocks | Q8Blocks) -> Q4Weight | Q8Weight:
    """``blocks`` in the kernel's layout for their width."""
    return Q4Weight.pack(blocks) if isinstance(blocks, Q4Blocks) else Q8Weight.pack(blocks)


def quant_linear(x: torch.Tensor, weight: Q4Weight | Q8Weight, threads: int = 1) -> torch.Tensor:
    """``x @ w.T`` for ``x`` ``(rows, k)`` fp32 with contiguous rows, ``rows`` in 1..``MAX_ROWS``: a new
    ``(rows, n)`` fp32 tensor."""
    n, k = weight.shape
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.stride(1) != 1 or x.shape[1] != k:
        raise ValueError(f"x must be a 2-D fp32 CPU tensor ({k} wide, contiguous rows), got {x.dtype} "
                         f"{tuple(x.shape)} strides {x.stride()} on {x.device}")
    rows = x.shape[0]
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"x must have 1 to {MAX_ROWS} rows, got {rows}")
    out = torch.empty(rows, n, dtype=torch.float32)
    lib = native().required("the native CPU quantized GEMV")
    bits, params = (4, weight.params) if isinstance(weight, Q4Weight) else (8, weight.scales)
    rc = lib.pdbox_quant_linear(bits, x.data_ptr(), x.stride(0), rows, k, weight.codes.data_ptr(), params.data_ptr(),
                                n, out.data_ptr(), out.stride(0), max(1, threads))
    if rc == -2:
        raise MemoryError("pdbox_quant_linear could not allocate its scratch rows")
    if rc != 0:
        raise RuntimeError(f"pdbox_quant_linear refused its arguments (code {rc})")
    return out
