"""SiLU-and-mul (SwiGLU gate)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import (
    LazyKernel,
    check,
    check_device,
    check_float_dtype,
    check_last_dim_contiguous,
    config,
    gdc_launch_dependents,
    gdc_wait,
    tl,
)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x`` of last dim ``2d``."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------------------
# Triton: program ``(row, block)`` handles ``BLOCK`` output columns of one row, fp32 math.


def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    stride_x,
    stride_o,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    """``out[r, j] = silu(x[r, j]) * x[r, D + j]``."""
    if USE_GDC:  # PDL (kernels/_triton.py): the kernel before has finished writing; the next may launch
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + D + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


_silu_and_mul = LazyKernel(
    _silu_and_mul_kernel,
    configs=[config(BLOCK=b, num_warps=w, num_stages=1) for b, w in ((1024, 4), (512, 4), (2048, 8))],
    key=["D"],
    interpret={"BLOCK": 1024},
    pdl=True,
)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton :func:`silu_and_mul_ref`: ``x`` ``(..., 2d)`` -> ``(..., d)``; unit-stride last dim."""
    op = "silu_and_mul"
    check_device(op, x=x)
    check_float_dtype(op, "x", x)
    check(x.dim() >= 1 and x.shape[-1] % 2 == 0, f"{op}: x needs an even last dim, got {tuple(x.shape)}")
    check_last_dim_contiguous(op, "x", x)
    d = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    x2 = x.reshape(-1, x.shape[-1])
    o2 = out.view(-1, d)
    if x2.shape[0] == 0 or d == 0:
        return out

    def grid(meta: dict) -> tuple[int, int]:
        return (x2.shape[0], -(-d // meta["BLOCK"]))

    _silu_and_mul[grid](x2, o2, x2.stride(0), o2.stride(0), D=d)
    return out
