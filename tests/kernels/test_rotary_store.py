"""The fused rotary + paged-cache store: bit-equal to the two Triton kernels it replaces, close to the
references, untouched slots left alone, and bad inputs refused by name."""

from __future__ import annotations

import pytest
import torch

from kernels.kv_store import store_kv
from kernels.rotary import rotary, rotary_cos_sin_cache, rotary_store_kv, rotary_store_kv_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits where written, NaN (never written) in the same places."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _case(device: torch.device, dtype: torch.dtype, q_heads: int, kv_heads: int, head_dim: int,
          cache_dtype: torch.dtype | None = None):
    g = torch.Generator().manual_seed(q_heads * 100 + head_dim)
    qkv = torch.randn(6, q_heads + 2 * kv_heads, head_dim, generator=g).to(dtype).to(device)
    q, k, v = qkv[:, :q_heads], qkv[:, q_heads:q_heads + kv_heads], qkv[:, q_heads + kv_heads:]  # strided views
    pos = torch.tensor([0, 1, 127, 5, 5, 64], device=device)
    slots = torch.tensor([9, 0, 31, 17, 4, 22], device=device)  # pages of 4: scattered over 8 pages
    cache = torch.full((8, 4, kv_heads, head_dim), float("nan"), dtype=cache_dtype or dtype, device=device)
    return q, k, v, pos, slots, cache, rotary_cos_sin_cache(head_dim, 128, 1e4).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(4, 2, 32), (9, 3, 64), (3, 1, 24)])
def test_fused_equals_rotary_then_store_bit_for_bit(device, tol, dtype, q_heads, kv_heads, head_dim):
    q, k, v, pos, slots, cache, cos_sin = _case(device, dtype, q_heads, kv_heads, head_dim)
    kc, vc = cache.clone(), cache.clone()
    got_q = rotary_store_kv(q, k, v, pos, cos_sin, kc, vc, slots)
    want_q, want_k = rotary(q, k, pos, cos_sin)
    kc2, vc2 = cache.clone(), cache.clone()
    store_kv(kc2, vc2, want_k, v, slots)
    assert got_q.dtype == dtype and got_q.is_contiguous()
    assert torch.equal(got_q, want_q)
    assert _same(kc, kc2) and _same(vc, vc2)
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert kc.view(32, -1)[untouched.to(device)].isnan().all() and vc.view(32, -1)[untouched.to(device)].isnan().all()

    ref_k, ref_v = cache.cpu().clone(), cache.cpu().clone()
    ref_q = rotary_store_kv_ref(q.cpu(), k.cpu(), v.cpu(), pos.cpu(), cos_sin.cpu(), ref_k, ref_v, slots.cpu())
    torch.testing.assert_close(got_q.cpu(), ref_q, **tol(dtype))
    torch.testing.assert_close(kc.cpu(), ref_k, equal_nan=True, **tol(dtype))
    assert _same(vc.cpu(), ref_v)


def test_cache_of_another_dtype_rounds_k_as_the_two_calls_do(device):
    q, k, v, pos, slots, cache, cos_sin = _case(device, torch.float32, 4, 2, 32, cache_dtype=torch.float16)
    kc, vc = cache.clone(), cache.clone()
    got_q = rotary_store_kv(q, k, v, pos, cos_sin, kc, vc, slots)
    want_q, want_k = rotary(q, k, pos, cos_sin)
    kc2, vc2 = cache.clone(), cache.clone()
    store_kv(kc2, vc2, want_k, v, slots)
    assert torch.equal(got_q, want_q)
    assert _same(kc, kc2) and _same(vc, vc2)


def test_no_tokens_writes_nothing(device):
    q, k, v, pos, slots, cache, cos_sin = _case(device, torch.float32, 4, 2, 32)
    kc = cache.clone()
    out = rotary_store_kv(q[:0], k[:0], v[:0], pos[:0], cos_sin, kc, cache.clone(), slots[:0])
    assert out.shape == (0, 4, 32) and kc.isnan().all()


def test_bad_inputs_are_named(device):
    q, k, v, pos, slots, cache, cos_sin = _case(device, torch.float32, 4, 2, 32)
    with pytest.raises(ValueError, match="slot_mapping has 5 entries"):
        rotary_store_kv(q, k, v, pos, cos_sin, cache, cache.clone(), slots[:5])
    with pytest.raises(ValueError, match="positions must be contiguous with 6 entries"):
        rotary_store_kv(q, k, v, pos[:4], cos_sin, cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="v must be"):
        rotary_store_kv(q, k, v[:, :1], pos, cos_sin, cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="v_cache shape"):
        rotary_store_kv(q, k, v, pos, cos_sin, cache, cache[:4], slots)
