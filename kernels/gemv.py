"""Linear layers of a few rows (decode): ``x @ weight.T``, streaming the weight once; with the MLP's
activation folded into the input's load (``silu_mul``), or the RMSNorm before the layer (`rmsnorm_gemv`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import (
    LazyKernel,
    check,
    check_device,
    check_float_dtype,
    config,
    gdc_launch_dependents,
    gdc_wait,
    interpreter_enabled,
    next_pow2,
    tl,
)

MAX_ROWS = 64  # one tl.dot tile of 16, 32 or 64 rows: a decode step of up to 64 requests
NARROW_ROWS = 16  # up to here the rows are one 16-row tile, past it 32 or 64 (`_gemv_wide`'s configs)


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
             silu_mul: bool = False) -> torch.Tensor:
    """``x (M, K) @ weight (N, K).T (+ bias)`` in the weight's dtype (``x`` cast to it first).
    ``silu_mul``: ``x`` is ``(M, 2K)``, a gate and an up half, and the input is ``silu(gate) * up`` in
    ``x``'s dtype (the MLP's down projection after `kernels.activation.silu_and_mul`)."""
    if silu_mul:
        gate, up = x.chunk(2, dim=-1)
        x = (F.silu(gate.float()) * up.float()).to(x.dtype)
    return F.linear(x.to(weight.dtype), weight, bias)


def rmsnorm_gemv_ref(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                     bias: torch.Tensor | None = None,
                     residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear(rmsnorm(h), weight, bias)`` with ``h = x + residual`` (``x`` alone when ``residual`` is
    None), computed as :func:`rmsnorm_gemv` computes it, and ``h`` (the new residual stream, in the
    promoted dtype; ``x`` itself when there is no residual). RMSNorm's row scale is a factor of the
    whole dot product, so it is applied to the sum: the linear layer's input is ``h * norm_weight``
    rounded to the weight's dtype, and each output is scaled by ``1 / rms(h)`` in fp32 before its one
    rounding. Within the weight dtype's rounding of ``linear(rmsnorm(h).to(weight.dtype), weight)``."""
    h = x if residual is None else x + residual
    hf = h.float()
    inv_rms = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    scaled = (hf * norm_weight.float()).to(weight.dtype).float()
    y = (scaled @ weight.float().t()) * inv_rms
    if bias is not None:
        y = y + bias.float()
    return y.to(weight.dtype), h


# ---------------------------------------------------------------------------------------------------
# Triton: program ``i`` computes output columns ``[i * BLOCK_N, (i + 1) * BLOCK_N)`` of every row,
# walking K in ``BLOCK_K`` steps: each weight tile is read once, for all rows at once (the rows are
# padded to one tl.dot tile of 16, 32 or 64 rows), fp32 accumulation. At one to sixteen rows a linear
# layer reads its weight and little else: the kernel is a stream of the weight, pipelined ``num_stages``
# deep. At 17 to 64 rows every program also re-reads the rows' tile from L2, and a stage holds it beside
# the weight's, so those launches take configs of their own (`_gemv_wide`: narrower K steps; the 16-row
# configs' stages would overrun shared memory); whether that beats cuBLAS's GEMM at a shape is measured
# (appliance/engine/linear_choice.py).
# ``SILU_MUL`` folds `kernels.activation.silu_and_mul` into the input's load (the same fp32 math and
# the same rounding to the input's dtype): the MLP's down projection reads the gate/up rows directly,
# one kernel boundary and one round trip of the activation fewer per layer. ``NORM`` folds RMSNorm (and
# with ``ADD`` the residual add before it) into the load the same way: the rows' sum of squares
# accumulates beside the dot product over the same K tiles and scales the result at the end, so the
# norm's rows are never written and the layer after an attention or MLP block is one kernel, not two.
# Program 0 stores the summed residual stream (every program computes it; one writes it).


def _gemv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    r_ptr,
    g_ptr,
    h_ptr,
    M,
    N,
    K,
    stride_x,
    stride_w,
    stride_y,
    stride_r,
    stride_h,
    eps,
    HAS_BIAS: tl.constexpr,
    SILU_MUL: tl.constexpr,
    NORM: tl.constexpr,
    ADD: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    if USE_GDC:  # PDL (kernels/_triton.py): the kernel before has finished writing; the next may launch
        gdc_wait()
        gdc_launch_dependents()
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)  # NORM: each row's sum of squares, over the K tiles
    h_rows = tl.where(tl.program_id(0) == 0, M, 0)  # NORM with ADD: program 0 alone stores the summed residual
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_w  # int64: a weight may pass 2**31 elements
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        x_mask = m_mask[:, None] & k_mask[None, :]
        if SILU_MUL:  # x rows are [gate | up], K each: silu(gate) * up in fp32, rounded as silu_and_mul rounds
            gate = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=x_mask, other=0.0)
            up = tl.load(x_ptr + offs_m[:, None] * stride_x + K + offs_k[None, :], mask=x_mask, other=0.0)
            g = gate.to(tl.float32)
            x = (g / (1.0 + tl.exp(-g)) * up.to(tl.float32)).to(x_ptr.dtype.element_ty).to(w.dtype)
        elif NORM:  # h = x (+ residual, rounded as fused_add_rmsnorm rounds it); the input is h * norm weight
            h = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=x_mask, other=0.0)
            if ADD:
                r = tl.load(r_ptr + offs_m[:, None] * stride_r + offs_k[None, :], mask=x_mask, other=0.0)
                h = (h.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)
                tl.store(h_ptr + offs_m[:, None] * stride_h + offs_k[None, :], h,
                         mask=(offs_m < h_rows)[:, None] & k_mask[None, :])
            h = h.to(tl.float32)
            sum_sq += tl.sum(h * h, 1)
            nw = tl.load(g_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            x = (h * nw[None, :]).to(w.dtype)
        else:
            x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=x_mask,
                        other=0.0).to(w.dtype)  # x cast to the weight's dtype, as F.linear's input is
        if UPCAST:  # the interpreter's low-precision tl.dot is wrong: multiply in fp32
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
    if NORM:  # the norm's 1 / rms(h) of each row, a factor of its whole dot product
        acc = acc * tl.rsqrt(sum_sq / K + eps)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_y + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def _launcher(tiles: tuple[tuple[int, int, int, int], ...], *key: str) -> LazyKernel:
    """``_gemv_kernel`` with these ``(BLOCK_N, BLOCK_K, num_warps, num_stages)`` configs, the first its untuned
    one, tuned per weight shape and form (and ``key``)."""
    return LazyKernel(
        _gemv_kernel,
        configs=[config(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s) for n, k, w, s in tiles],
        key=["N", "K", "HAS_BIAS", "SILU_MUL", "NORM", "ADD", *key],
        interpret={"BLOCK_N": 16, "BLOCK_K": 32},
        pdl=True,
    )


_gemv = _launcher(((16, 512, 4, 3), (32, 256, 4, 3), (64, 128, 4, 4), (16, 256, 4, 4), (32, 512, 8, 3),
                   (64, 256, 8, 3)))
# The folded forms (SILU_MUL, NORM) hold more of each K tile in registers (the gate and the up half; the rows,
# their sum with the residual and the norm weight), so 512-wide K tiles spill (ptxas: 300 to 4,700 bytes a
# thread at four rows, `python -m tests.kernels.sm90`): their own configs, none spilling, the first 256 wide.
_gemv_fused = _launcher(((16, 256, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4), (64, 256, 8, 3), (32, 128, 4, 4)))
# 32 or 64 rows: a program per 16 to 128 columns, so that a 4096-column layer still spreads over about
# a hundred SMs, and a deeper pipeline of narrower K steps (each stage holds the rows' tile as well as the
# weight's). The first config (untuned) fits shared memory in every form up to 64 fp32 rows.
_gemv_wide = _launcher(((32, 64, 4, 4), (64, 64, 4, 4), (32, 128, 8, 4), (64, 128, 8, 3), (128, 64, 8, 3),
                        (16, 128, 4, 4)), "BLOCK_M")


def row_tile(m: int) -> int:
    """The rows' tl.dot tile for ``m`` rows: 16 up to sixteen, else the next power of two (at most 64)."""
    return NARROW_ROWS if m <= NARROW_ROWS else next_pow2(m)


def compile_class(m: int) -> tuple[int, bool, bool]:
    """What of an ``m``-row call picks the GEMV's compiled kernel: its row tile and Triton's
    specializations of the row count (equal to 1, a multiple of 16). Two row counts of one class run one
    compile, with the configs tuned for either."""
    return row_tile(m), m == 1, m % 16 == 0


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         silu_mul: bool = False) -> torch.Tensor:
    """Triton :func:`gemv_ref` for ``x`` of at most :data:`MAX_ROWS` rows. ``x`` rows and ``weight``
    rows must be unit-stride; the result is a new contiguous ``(M, N)`` tensor in the weight's dtype.
    Not bit-equal to cuBLAS (another summation order), as no two GEMM kernels are. With ``silu_mul``,
    bit-equal to ``gemv(silu_and_mul(x), weight)``."""
    op = "gemv_silu_mul" if silu_mul else "gemv"
    device = check_device(op, x=x, weight=weight, **({"bias": bias} if bias is not None else {}))
    _check_dims(op, x, weight)
    m, k = x.shape
    n = weight.shape[0]
    if silu_mul:
        check(k == 2 * weight.shape[1], f"{op}: x must hold a gate and an up half of K={weight.shape[1]} each "
              f"(2K={2 * weight.shape[1]} columns), got {k}")
        k //= 2
    _check_layer(op, x, weight, bias, k)
    y = torch.empty(m, n, dtype=weight.dtype, device=device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_() if bias is None else y.copy_(bias.expand(m, n))
    _launch(x, weight, bias, y, k, silu_mul=silu_mul)
    return y


def _check_dims(op: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    check(x.dim() == 2 and weight.dim() == 2, f"{op}: x must be (M, K) and weight (N, K), got {tuple(x.shape)} and "
          f"{tuple(weight.shape)}")


def _check_layer(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int) -> None:
    """What every form of the kernel needs of ``x``'s rows (``k`` wide as the layer reads them), the weight
    and the bias."""
    n = weight.shape[0]
    check(weight.shape[1] == k, f"{op}: x has K={k} but weight has K={weight.shape[1]}")
    check(x.shape[0] <= MAX_ROWS, f"{op}: at most {MAX_ROWS} rows, got {x.shape[0]}")
    check_float_dtype(op, "x", x)
    check_float_dtype(op, "weight", weight)
    check(x.stride(1) == 1 and weight.stride(1) == 1, f"{op}: x and weight rows must be unit-stride")
    if bias is not None:
        check(bias.shape == (n,) and bias.is_contiguous(), f"{op}: bias must be contiguous ({n},), got "
              f"{tuple(bias.shape)}")


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, k: int,
            silu_mul: bool = False, residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
            h: torch.Tensor | None = None, eps: float = 0.0) -> None:
    """One launch of ``_gemv_kernel``, a program per ``BLOCK_N`` output columns; ``norm_weight`` set: the
    RMSNorm form (with ``residual`` and its sum ``h``: after the add)."""
    m, n = y.shape
    add = residual is not None
    r, h = (residual, h) if add else (x, y)  # unread without the add: the strides passed are 0
    g = norm_weight if norm_weight is not None else weight

    def grid(meta: dict) -> tuple[int]:
        return (-(-n // meta["BLOCK_N"]),)

    block_m = row_tile(m)
    kernel = _gemv_wide if block_m > NARROW_ROWS else _gemv_fused if silu_mul or norm_weight is not None else _gemv
    kernel[grid](
        x, weight, bias if bias is not None else weight, y, r, g, h, m, n, k, x.stride(0), weight.stride(0),
        y.stride(0), r.stride(0) if add else 0, h.stride(0) if add else 0, float(eps), HAS_BIAS=bias is not None,
        SILU_MUL=silu_mul, NORM=norm_weight is not None, ADD=add, UPCAST=interpreter_enabled(), BLOCK_M=block_m,
        DOT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
    )


def rmsnorm_gemv(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                 bias: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`rmsnorm_gemv_ref`: RMSNorm (after the residual add, when ``residual`` is given) and
    the linear layer after it in one kernel, for ``x`` of at most :data:`MAX_ROWS` rows. Returns ``(y,
    h)``: ``y`` a new ``(M, N)`` tensor in the weight's dtype, ``h = x + residual`` a new tensor in their
    promoted dtype (``x`` itself without a residual). Float16 weights are refused: the rows go into the
    dot product before the norm's scale, and a residual stream's magnitudes can pass float16's range."""
    op = "rmsnorm_gemv"
    extra = ({"bias": bias} if bias is not None else {}) | ({"residual": residual} if residual is not None else {})
    device = check_device(op, x=x, norm_weight=norm_weight, weight=weight, **extra)
    _check_dims(op, x, weight)
    (m, k), n = x.shape, weight.shape[0]
    _check_layer(op, x, weight, bias, k)
    check(k > 0, f"{op}: K must be > 0 (a norm over no columns)")
    check_float_dtype(op, "norm_weight", norm_weight)
    check(weight.dtype != torch.float16, f"{op}: float16 weights keep RMSNorm a kernel of its own (the rows enter "
          "the dot product before the norm's scale and could pass float16's range)")
    check(norm_weight.shape == (k,) and norm_weight.is_contiguous(),
          f"{op}: norm_weight must be contiguous ({k},), got {tuple(norm_weight.shape)}")
    if residual is not None:
        check_float_dtype(op, "residual", residual)
        check(residual.shape == x.shape and residual.stride(1) == 1,
              f"{op}: residual must be {tuple(x.shape)} with unit-stride rows, got {tuple(residual.shape)}")
    y = torch.empty(m, n, dtype=weight.dtype, device=device)
    h = x if residual is None else torch.empty(m, k, dtype=torch.promote_types(x.dtype, residual.dtype),
                                               device=device)
    if m == 0:
        return y, h
    if n == 0:  # no program runs: the residual stream's sum still goes on
        return y, h if residual is None else torch.add(x, residual, out=h)
    _launch(x, weight, bias, y, k, residual=residual, norm_weight=norm_weight, h=h, eps=eps)
    return y, h
