"""The few-row linear layer (decode) against F.linear: dtypes, bias, row counts (16-row and wider tiles),
ragged K and N, strided rows, and the inputs it refuses; with the MLP's activation, or the RMSNorm before
it, folded in."""

from __future__ import annotations

import pytest
import torch

from kernels._triton import autotune_enabled
from kernels.gemv import MAX_ROWS, gemv, gemv_ref, rmsnorm_gemv, rmsnorm_gemv_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _randn(*shape, dtype, device, seed=0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) / shape[-1] ** 0.5).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 40, 70), (5, 64, 96), (16, 33, 130), (20, 24, 50), (MAX_ROWS, 33, 130)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_f_linear(device, tol, dtype, m, n, k, with_bias):
    x = _randn(m, k, dtype=dtype, device=device)
    w = _randn(n, k, dtype=dtype, device=device, seed=1)
    b = _randn(n, dtype=dtype, device=device, seed=2) if with_bias else None
    y = gemv(x, w, b)
    assert y.shape == (m, n) and y.dtype == dtype and y.is_contiguous()
    torch.testing.assert_close(y.cpu(), gemv_ref(x.cpu(), w.cpu(), None if b is None else b.cpu()), **tol(dtype))


def test_fp32_rows_into_a_bf16_weight_are_cast_first(device, tol):
    x = _randn(3, 64, dtype=torch.float32, device=device)
    w = _randn(48, 64, dtype=torch.bfloat16, device=device, seed=1)
    y = gemv(x, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.cpu(), gemv_ref(x.cpu(), w.cpu()), **tol(torch.bfloat16))


def test_strided_rows_and_edges(device, tol):
    wide = _randn(4, 96, dtype=torch.float32, device=device)
    x = wide[:, :64]  # row stride 96
    w = _randn(20, 64, dtype=torch.float32, device=device, seed=1)
    torch.testing.assert_close(gemv(x, w).cpu(), gemv_ref(x.cpu(), w.cpu()), **tol(torch.float32))
    assert gemv(x[:0], w).shape == (0, 20)
    b = torch.arange(20, dtype=torch.float32, device=device)
    assert torch.equal(gemv(x[:, :0], w[:, :0], b).cpu(), b.cpu().expand(4, 20))  # K = 0: the bias alone


def test_bad_inputs_are_named(device):
    w = torch.zeros(8, 16, device=device)
    with pytest.raises(ValueError, match=f"at most {MAX_ROWS} rows"):
        gemv(torch.zeros(MAX_ROWS + 1, 16, device=device), w)
    with pytest.raises(ValueError, match="K=12 but weight has K=16"):
        gemv(torch.zeros(2, 12, device=device), w)
    with pytest.raises(ValueError, match="unit-stride"):
        gemv(torch.zeros(16, 2, device=device).t(), w)
    with pytest.raises(ValueError, match="bias must be contiguous"):
        gemv(torch.zeros(2, 16, device=device), w, torch.zeros(9, device=device))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 40, 70), (16, 33, 130), (MAX_ROWS, 33, 130)])
def test_silu_mul_folds_the_activation_into_the_load(device, tol, dtype, m, n, k):
    """``silu_mul``: the down projection straight from the gate/up rows, bit-equal to the two kernels."""
    from kernels.activation import silu_and_mul

    x = _randn(m, 2 * k, dtype=dtype, device=device) * 4
    w = _randn(n, k, dtype=dtype, device=device, seed=1)
    y = gemv(x, w, silu_mul=True)
    assert y.shape == (m, n) and y.dtype == dtype
    pair = gemv(silu_and_mul(x), w)
    if y.is_cuda and autotune_enabled():  # each tuned apart (SILU_MUL is in the key): another tile, another sum order
        torch.testing.assert_close(y, pair, **tol(dtype))
    else:
        assert torch.equal(y, pair), "not the unfused pair's bits"
    torch.testing.assert_close(y.cpu(), gemv_ref(x.cpu(), w.cpu(), silu_mul=True), **tol(dtype))
    wide = _randn(m, 2 * k + 6, dtype=dtype, device=device, seed=3)[:, : 2 * k]  # strided rows
    torch.testing.assert_close(gemv(wide, w, silu_mul=True).cpu(), gemv_ref(wide.cpu(), w.cpu(), silu_mul=True),
                               **tol(dtype))


def test_silu_mul_needs_both_halves(device):
    w = torch.zeros(8, 16, device=device)
    with pytest.raises(ValueError, match=r"gate and an up half of K=16 each \(2K=32 columns\), got 16"):
        gemv(torch.zeros(2, 16, device=device), w, silu_mul=True)


NORM_DTYPES = [torch.float32, torch.bfloat16]  # float16 weights keep the norm apart (refused below)


@pytest.mark.parametrize("dtype", NORM_DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 40, 70), (5, 64, 96), (16, 33, 130), (33, 24, 50), (MAX_ROWS, 33, 130)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_rmsnorm_gemv_is_the_residual_add_the_norm_and_the_linear_layer(device, tol, dtype, m, n, k, with_bias):
    """The layer after an attention or MLP block in one kernel: ``h = x + residual`` bit-equal to the norm
    kernel's, ``y`` its reference's and, within the weight dtype's rounding, the norm kernel then the GEMV."""
    from kernels.norm import fused_add_rmsnorm

    x = _randn(m, k, dtype=dtype, device=device) * 8  # a linear layer's output, in the weight dtype
    residual = _randn(m, k, dtype=torch.float32, device=device, seed=3) * 30  # the fp32 stream, rms far from 1
    g = (torch.rand(k, generator=torch.Generator().manual_seed(4)) + 0.5).to(device)
    w = _randn(n, k, dtype=dtype, device=device, seed=1)
    b = _randn(n, dtype=dtype, device=device, seed=2) if with_bias else None
    y, h = rmsnorm_gemv(x, g, 1e-6, w, b, residual=residual)
    assert y.shape == (m, n) and y.dtype == dtype and h.dtype == torch.float32 and h.shape == (m, k)
    cpu = [None if t is None else t.cpu() for t in (x, g, w, b, residual)]
    want_y, want_h = rmsnorm_gemv_ref(cpu[0], cpu[1], 1e-6, cpu[2], cpu[3], residual=cpu[4])
    assert torch.equal(h.cpu(), want_h)
    torch.testing.assert_close(y.cpu(), want_y, **tol(dtype))
    normed, summed = fused_add_rmsnorm(x, residual, g, 1e-6, dtype)
    assert torch.equal(h, summed)
    torch.testing.assert_close(y, gemv(normed, w, b), **tol(dtype))


@pytest.mark.parametrize("dtype", NORM_DTYPES)
def test_rmsnorm_gemv_without_a_residual_norms_x_and_returns_it(device, tol, dtype):
    """The first layer: the embeddings (fp32) are normed as they are and stay the residual stream."""
    from kernels.norm import rmsnorm

    x = _randn(3, 64, dtype=torch.float32, device=device) * 5
    g = torch.linspace(0.5, 1.5, 64, device=device)
    w = _randn(24, 64, dtype=dtype, device=device, seed=1)
    y, h = rmsnorm_gemv(x, g, 1e-5, w)
    assert h is x
    torch.testing.assert_close(y.cpu(), rmsnorm_gemv_ref(x.cpu(), g.cpu(), 1e-5, w.cpu())[0], **tol(dtype))
    torch.testing.assert_close(y, gemv(rmsnorm(x, g, 1e-5).to(dtype), w), **tol(dtype))


def test_rmsnorm_gemv_strided_rows_and_edges(device, tol):
    wide = _randn(4, 100, dtype=torch.bfloat16, device=device)
    x, residual = wide[:, :64], _randn(4, 80, dtype=torch.float32, device=device, seed=5)[:, :64]  # row strides
    g, w = torch.ones(64, device=device), _randn(20, 64, dtype=torch.bfloat16, device=device, seed=1)
    y, h = rmsnorm_gemv(x, g, 1e-6, w, residual=residual)
    want_y, want_h = rmsnorm_gemv_ref(x.cpu(), g.cpu(), 1e-6, w.cpu(), residual=residual.cpu())
    torch.testing.assert_close(y.cpu(), want_y, **tol(torch.bfloat16))
    assert torch.equal(h.cpu(), want_h)
    y, h = rmsnorm_gemv(x, g, 1e-6, w[:0], residual=residual)  # no output column: the stream is still summed
    assert y.shape == (4, 0) and torch.equal(h.cpu(), want_h)
    y, h = rmsnorm_gemv(x[:0], g, 1e-6, w, residual=residual[:0])
    assert y.shape == (0, 20) and h.shape == (0, 64)


def test_rmsnorm_gemv_bad_inputs_are_named(device):
    x, g, w = torch.zeros(2, 16, device=device), torch.ones(16, device=device), torch.zeros(8, 16, device=device)
    with pytest.raises(ValueError, match="float16 weights keep RMSNorm a kernel of its own"):
        rmsnorm_gemv(x, g, 1e-6, w.half())
    with pytest.raises(ValueError, match=r"norm_weight must be contiguous \(16,\), got \(12,\)"):
        rmsnorm_gemv(x, g[:12], 1e-6, w)
    with pytest.raises(ValueError, match=r"residual must be \(2, 16\)"):
        rmsnorm_gemv(x, g, 1e-6, w, residual=torch.zeros(3, 16, device=device))
    with pytest.raises(ValueError, match=f"at most {MAX_ROWS} rows"):
        rmsnorm_gemv(torch.zeros(MAX_ROWS + 1, 16, device=device), g, 1e-6, w)
    with pytest.raises(ValueError, match="K=12 but weight has K=16"):
        rmsnorm_gemv(torch.zeros(2, 12, device=device), g[:12], 1e-6, w)
    with pytest.raises(ValueError, match="residual must be one of"):
        rmsnorm_gemv(x, g, 1e-6, w, residual=torch.zeros(2, 16, dtype=torch.int32, device=device))
