"""The ``triton`` attention backend forwards to the kernels and matches the ``torch`` backend."""

from __future__ import annotations

import pytest
import torch

from appliance.engine.attention import TorchAttentionBackend
from appliance.engine.attention_triton import TritonAttentionBackend
from tests.engine.greedy import tiny_greedy

METHODS = ("store_kv", "decode", "extend", "rmsnorm", "fused_add_rmsnorm", "rotary", "silu_and_mul", "linear",
           "silu_mul_linear", "norm_linear", "rotary_store_kv")


def test_same_methods_as_the_torch_backend():
    triton_be, torch_be = TritonAttentionBackend(), TorchAttentionBackend()
    assert triton_be.name == "triton"
    from appliance.engine.attention_cpu import CpuAttentionBackend

    for name in METHODS:
        assert callable(getattr(triton_be, name)) and callable(getattr(torch_be, name))
        assert callable(getattr(CpuAttentionBackend, name)), name


def test_one_layer_store_extend_decode(device, tol):
    """Prefill two requests (one with a cached prefix), then decode one token each, both backends."""
    be, ref = TritonAttentionBackend(), TorchAttentionBackend()
    g = torch.Generator().manual_seed(0)
    pages, page_size, kv_heads, q_heads, dim = 8, 4, 2, 6, 16
    caches = [torch.zeros(pages, page_size, kv_heads, dim, device=device) for _ in range(4)]
    table = torch.tensor([[3, 0, 5], [1, 6, 7]], dtype=torch.int32, device=device)
    prefix, extend = torch.tensor([4, 0], device=device), torch.tensor([3, 6], device=device)
    # the prefix of request 0 is already cached (page 3)
    pre = torch.randn(4, kv_heads, dim, generator=g).to(device)
    slots0 = torch.tensor([12, 13, 14, 15], device=device)
    for kc, vc in (caches[:2], caches[2:]):
        ref.store_kv(kc, vc, pre, -pre, slots0)

    new_slots = torch.tensor([0, 1, 2, 4, 5, 6, 7, 24, 25], device=device)
    kv_new = torch.randn(9, 2 * kv_heads, dim, generator=g).to(device)
    q = torch.randn(9, q_heads, dim, generator=g).to(device)
    be.store_kv(caches[0], caches[1], kv_new[:, :kv_heads], kv_new[:, kv_heads:], new_slots)
    ref.store_kv(caches[2], caches[3], kv_new[:, :kv_heads], kv_new[:, kv_heads:], new_slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    for _ in range(2):  # the second call reuses the cached extend metadata
        out = be.extend(q, caches[0], caches[1], table, prefix, extend, 0.25)
    want = ref.extend(q.cpu(), caches[2].cpu(), caches[3].cpu(), table.cpu(), prefix.cpu(), extend.cpu(), 0.25)
    torch.testing.assert_close(out.cpu(), want, **tol(torch.float32))

    seq_lens = torch.tensor([8, 7], dtype=torch.int32, device=device)
    qd = torch.randn(2, q_heads, dim, generator=g).to(device)
    out = be.decode(qd, caches[0], caches[1], table, seq_lens, 0.25)
    want = ref.decode(qd.cpu(), caches[2].cpu(), caches[3].cpu(), table.cpu(), seq_lens.cpu(), 0.25)
    torch.testing.assert_close(out.cpu(), want, **tol(torch.float32))


def test_extend_metadata_checks_token_count(device):
    be = TritonAttentionBackend()
    cache = torch.zeros(2, 4, 1, 16, device=device)
    table = torch.zeros(1, 2, dtype=torch.int32, device=device)
    lens = torch.tensor([3], device=device)
    with pytest.raises(ValueError, match="sum to 3"):
        be.extend(torch.zeros(2, 1, 16, device=device), cache, cache, table, torch.zeros_like(lens), lens, 1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run; see test_engine_backend_gpu.py")
def test_tiny_engine_greedy_triton_equals_torch(tiny_model):
    """The whole engine (chunked prefill, a prefix hit, batched decode) under the interpreter."""
    assert tiny_greedy(str(tiny_model), "triton", 3, 5) == tiny_greedy(str(tiny_model), "torch", 3, 5)
