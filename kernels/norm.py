"""RMSNorm and fused residual-add + RMSNorm."""

from __future__ import annotations

import torch

from kernels._triton import (
    LazyKernel,
    check,
    check_device,
    check_float_dtype,
    check_last_dim_contiguous,
    config,
    gdc_launch_dependents,
    gdc_wait,
    next_pow2,
    tl,
)


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dim, computed in fp32, returned in ``x.dtype``."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def fused_add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual = x + residual``; returns ``(rmsnorm(residual), residual)``. ``out_dtype``: the normed
    rows' dtype (default the sum's), rounded once from fp32: a bf16 linear layer's input comes out so."""
    residual = x + residual
    if out_dtype is None or out_dtype == residual.dtype:
        return rmsnorm_ref(residual, weight, eps), residual
    return rmsnorm_ref(residual.float(), weight, eps).to(out_dtype), residual


# ---------------------------------------------------------------------------------------------------
# Triton: one program per row, the whole row in one block, fp32 math.


def _rmsnorm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    eps,
    HIDDEN: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    """Row ``r``: optionally ``x += residual`` (rounded to the output dtype, stored), then RMSNorm."""
    if USE_GDC:  # PDL (kernels/_triton.py): the kernel before has finished writing; the next may launch
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        summed = (x + r).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + offs, summed, mask=mask)
        x = summed.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, 0) / HIDDEN + eps)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (x * inv_rms * w).to(out_ptr.dtype.element_ty), mask=mask)


_rmsnorm = LazyKernel(
    _rmsnorm_kernel,
    configs=[config(num_warps=w, num_stages=1) for w in (4, 2, 8, 16)],
    key=["HIDDEN", "ADD_RESIDUAL"],
    pdl=True,
)


def _check_norm_inputs(op: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    check_float_dtype(op, "x", x)
    check_float_dtype(op, "weight", weight)
    check(x.dim() >= 1 and x.shape[-1] > 0, f"{op}: x needs a non-empty last dim, got {tuple(x.shape)}")
    check(weight.dim() == 1 and weight.shape[0] == x.shape[-1],
          f"{op}: weight must be ({x.shape[-1]},), got {tuple(weight.shape)}")
    check(weight.is_contiguous(), f"{op}: weight must be contiguous")
    check_last_dim_contiguous(op, "x", x)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``(rows, hidden)`` (a view when the leading dims allow it, else a copy)."""
    return x.reshape(-1, x.shape[-1])


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton :func:`rmsnorm_ref`; ``x`` may be strided with a unit-stride last dim."""
    op = "rmsnorm"
    check_device(op, x=x, weight=weight)
    _check_norm_inputs(op, x, weight)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x2, o2 = _rows(x), out.view(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return out
    hidden = x.shape[-1]
    _rmsnorm[(x2.shape[0],)](
        x2, x2, weight, o2, o2, x2.stride(0), 0, o2.stride(0), 0, float(eps),
        HIDDEN=hidden, ADD_RESIDUAL=False, BLOCK=next_pow2(hidden),
    )
    return out


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`fused_add_rmsnorm_ref`: one pass returns ``(rmsnorm(x + residual), x + residual)``.

    ``x`` and ``residual`` share a shape; as in the reference, both results take the promoted dtype
    of the two (e.g. a bf16 ``x`` into an fp32 residual stream stays fp32); ``out_dtype`` sets the normed
    rows' own (bf16 for a bf16 linear layer: the cast it would make is then not a kernel of its own).
    Inputs are not modified.
    """
    op = "fused_add_rmsnorm"
    check_device(op, x=x, residual=residual, weight=weight)
    _check_norm_inputs(op, x, weight)
    check_float_dtype(op, "residual", residual)
    check(residual.shape == x.shape, f"{op}: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    check_last_dim_contiguous(op, "residual", residual)
    dtype = torch.promote_types(x.dtype, residual.dtype)
    if out_dtype is not None:
        check(out_dtype in (torch.float16, torch.bfloat16, torch.float32),
              f"{op}: out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    out = torch.empty(x.shape, dtype=out_dtype or dtype, device=x.device)
    res_out = torch.empty(x.shape, dtype=dtype, device=x.device)
    hidden = x.shape[-1]
    x2, r2 = _rows(x), _rows(residual)
    o2, ro2 = out.view(-1, hidden), res_out.view(-1, hidden)
    if x2.shape[0] == 0:
        return out, res_out
    _rmsnorm[(x2.shape[0],)](
        x2, r2, weight, o2, ro2, x2.stride(0), r2.stride(0), o2.stride(0), ro2.stride(0), float(eps),
        HIDDEN=hidden, ADD_RESIDUAL=True, BLOCK=next_pow2(hidden),
    )
    return out, res_out
