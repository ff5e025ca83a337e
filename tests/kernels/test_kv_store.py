"""KV store by slot mapping vs store_kv_ref."""

from __future__ import annotations

import pytest
import torch

from kernels.kv_store import store_kv, store_kv_ref


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(device, cache_dtype):
    pages, page_size, heads, dim = 6, 4, 3, 24
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(pages, page_size, heads, dim, generator=g).to(cache_dtype).to(device)
    v_cache = torch.randn(pages, page_size, heads, dim, generator=g).to(cache_dtype).to(device)
    qkv = torch.randn(7, 5 + 2 * heads, dim, generator=g).to(cache_dtype).to(device)
    k, v = qkv[:, 5 : 5 + heads], qkv[:, 5 + heads :]  # strided views, as from a fused projection
    slots = torch.randperm(pages * page_size, generator=g)[:7].to(device)
    ref_k, ref_v = k_cache.cpu().clone(), v_cache.cpu().clone()
    store_kv(k_cache, v_cache, k, v, slots)
    store_kv_ref(ref_k, ref_v, k.cpu(), v.cpu(), slots.cpu())
    assert torch.equal(k_cache.cpu(), ref_k) and torch.equal(v_cache.cpu(), ref_v)


def test_casts_to_cache_dtype(device, tol):
    k_cache = torch.zeros(2, 4, 2, 16, dtype=torch.float16, device=device)
    v_cache = torch.zeros_like(k_cache)
    k, v = torch.randn(3, 2, 16, device=device), torch.randn(3, 2, 16, device=device)
    slots = torch.tensor([7, 0, 3], dtype=torch.int32, device=device)
    ref_k, ref_v = k_cache.cpu().clone(), v_cache.cpu().clone()
    store_kv(k_cache, v_cache, k, v, slots)
    store_kv_ref(ref_k, ref_v, k.cpu(), v.cpu(), slots.long().cpu())
    torch.testing.assert_close(k_cache.cpu(), ref_k, **tol(torch.float16))
    torch.testing.assert_close(v_cache.cpu(), ref_v, **tol(torch.float16))


def test_no_tokens(device):
    cache = torch.zeros(2, 4, 2, 16, device=device)
    empty = torch.zeros(0, 2, 16, device=device)
    store_kv(cache, cache.clone(), empty, empty, torch.zeros(0, dtype=torch.int64, device=device))
    assert torch.all(cache == 0)
