"""RMSNorm, fused residual-add + RMSNorm, rotary and SiLU-and-mul vs their references."""

from __future__ import annotations

import pytest
import torch

from kernels.activation import silu_and_mul, silu_and_mul_ref
from kernels.norm import fused_add_rmsnorm, fused_add_rmsnorm_ref, rmsnorm, rmsnorm_ref
from kernels.rotary import rotary, rotary_cos_sin_cache, rotary_ref

DTYPES = [torch.float32, torch.float16]


def _randn(*shape, dtype, device, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96])
def test_rmsnorm(device, tol, dtype, hidden):
    x = _randn(3, 5, hidden, dtype=dtype, device=device)
    w = _randn(hidden, dtype=dtype, device=device, seed=1)
    out = rmsnorm(x, w, 1e-6)
    torch.testing.assert_close(out.cpu(), rmsnorm_ref(x.cpu(), w.cpu(), 1e-6), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rmsnorm(device, tol, dtype):
    x = _randn(7, 48, dtype=dtype, device=device)
    residual = _randn(7, 48, dtype=dtype, device=device, seed=1)
    w = _randn(48, dtype=dtype, device=device, seed=2)
    x_before, r_before = x.clone(), residual.clone()
    out, res = fused_add_rmsnorm(x, residual, w, 1e-5)
    ref_out, ref_res = fused_add_rmsnorm_ref(x.cpu(), residual.cpu(), w.cpu(), 1e-5)
    torch.testing.assert_close(res.cpu(), ref_res, atol=0, rtol=0)
    torch.testing.assert_close(out.cpu(), ref_out, **tol(dtype))
    assert torch.equal(x, x_before) and torch.equal(residual, r_before), "inputs are not modified"


def test_norm_strided_rows(device, tol):
    big = _randn(4, 2, 32, dtype=torch.float32, device=device)
    x = big[:, 0]  # row stride 64
    w = _randn(32, dtype=torch.float32, device=device, seed=1)
    torch.testing.assert_close(rmsnorm(x, w, 1e-6).cpu(), rmsnorm_ref(x.cpu(), w.cpu(), 1e-6), **tol(torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(4, 2, 32), (9, 3, 64), (3, 1, 24)])
def test_rotary(device, tol, dtype, q_heads, kv_heads, head_dim):
    cache = rotary_cos_sin_cache(head_dim, 128, 1e4).to(device)
    qkv = _randn(6, q_heads + 2 * kv_heads, head_dim, dtype=dtype, device=device)
    q, k = qkv[:, :q_heads], qkv[:, q_heads : q_heads + kv_heads]  # strided views
    pos = torch.tensor([0, 1, 127, 5, 5, 64], device=device)
    got = rotary(q, k, pos, cache)
    want = rotary_ref(q.cpu(), k.cpu(), pos.cpu(), cache.cpu())
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.cpu(), w, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 2 * 48), (2, 3, 2 * 1500)])  # 1500 > one interpreter block
def test_silu_and_mul(device, tol, dtype, shape):
    x = _randn(*shape, dtype=dtype, device=device)
    out = silu_and_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    torch.testing.assert_close(out.cpu(), silu_and_mul_ref(x.cpu()), **tol(dtype))


def test_empty_rows(device):
    w = torch.ones(16, device=device)
    assert rmsnorm(torch.zeros(0, 16, device=device), w, 1e-6).shape == (0, 16)
    assert silu_and_mul(torch.zeros(0, 32, device=device)).shape == (0, 16)


def test_fused_add_rmsnorm_promotes_like_the_reference(device, tol):
    # the engine adds a bf16/fp16 attention output into an fp32 residual stream
    x = _randn(5, 32, dtype=torch.float16, device=device)
    residual = _randn(5, 32, dtype=torch.float32, device=device, seed=1)
    w = _randn(32, dtype=torch.float32, device=device, seed=2)
    out, res = fused_add_rmsnorm(x, residual, w, 1e-6)
    ref_out, ref_res = fused_add_rmsnorm_ref(x.cpu(), residual.cpu(), w.cpu(), 1e-6)
    assert out.dtype == res.dtype == torch.float32
    torch.testing.assert_close(res.cpu(), ref_res, **tol(torch.float32))
    torch.testing.assert_close(out.cpu(), ref_out, **tol(torch.float32))


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_fused_add_rmsnorm_out_dtype_is_the_promoted_result_rounded_once(device, out_dtype):
    # the engine's bf16 linear layers take the normed rows in their dtype: no cast kernel between
    x = _randn(5, 64, dtype=out_dtype, device=device)
    residual = _randn(5, 64, dtype=torch.float32, device=device, seed=1)
    w = _randn(64, dtype=torch.float32, device=device, seed=2)
    out, res = fused_add_rmsnorm(x, residual, w, 1e-6, out_dtype)
    full, full_res = fused_add_rmsnorm(x, residual, w, 1e-6)
    assert out.dtype == out_dtype and res.dtype == torch.float32 and torch.equal(res, full_res)
    if out.is_cuda:  # rounded to nearest, as the cast it replaces
        assert torch.equal(out, full.to(out_dtype))
    else:  # NOTE: the Triton interpreter truncates fp32 to bf16: one unit in the last place at most
        torch.testing.assert_close(out, full.to(out_dtype), atol=0, rtol=2 ** -7 if out_dtype == torch.bfloat16 else 0)
    ref_out, ref_res = fused_add_rmsnorm_ref(x.cpu(), residual.cpu(), w.cpu(), 1e-6, out_dtype)
    assert ref_out.dtype == out_dtype
    assert torch.equal(ref_out, fused_add_rmsnorm_ref(x.cpu(), residual.cpu(), w.cpu(), 1e-6)[0].to(out_dtype))
    with pytest.raises(ValueError, match="out_dtype"):
        fused_add_rmsnorm(x, residual, w, 1e-6, torch.int32)
