"""Attention-logit soft-capping (Gemma 2) in every attention path: the references against a naive loop,
the Triton kernels (interpreter on CPU) and the cpu backend against the references."""

from __future__ import annotations

import pytest
import torch

from appliance.engine.attention import TorchAttentionBackend
from appliance.engine.attention_cpu import CpuAttentionBackend
from kernels.decode_attention import decode_attention, decode_attention_ref
from kernels.extend_attention import extend_attention, extend_attention_ref

CAP = 5.0
SCALE = 1.0  # scores ~ N(0, head_dim): far past the cap, so capping changes the answer


def naive(q, kv, prefix, extend, scale, cap):
    """Per request, per head: softmax(cap * tanh(q k^T * scale / cap) + causal mask) v, in fp64."""
    k_all, v_all, table = kv.for_ref()
    outs, start = [], 0
    group = q.shape[1] // k_all.shape[2]
    for b, (p, n) in enumerate(zip(prefix, extend)):
        total, page = p + n, k_all.shape[1]
        pages = table[b, : -(-total // page)].long()
        k = k_all[pages].flatten(0, 1)[:total].double().repeat_interleave(group, 1)
        v = v_all[pages].flatten(0, 1)[:total].double().repeat_interleave(group, 1)
        qb = q[start : start + n].double()
        s = torch.einsum("thd,shd->hts", qb, k) * scale
        s = cap * torch.tanh(s / cap) if cap else s
        s = s.masked_fill(torch.arange(total)[None, :] > (torch.arange(n)[:, None] + p), float("-inf"))
        outs.append(torch.einsum("hts,shd->thd", s.softmax(-1), v))
        start += n
    return torch.cat(outs).float()


def case(paged_kv, prefix, extend, q_heads=6, kv_heads=2, head_dim=32, page_size=4, seed=0):
    kv = paged_kv([p + e for p, e in zip(prefix, extend)], kv_heads, head_dim, page_size, torch.float32,
                  torch.device("cpu"), seed=seed)
    q = torch.randn(sum(extend), q_heads, head_dim, generator=torch.Generator().manual_seed(seed + 1))
    return kv, q


@pytest.mark.parametrize("q_heads,kv_heads", [(6, 2), (8, 8)])  # block-diagonal and per-head decode paths
def test_references_cap_the_scores(paged_kv, q_heads, kv_heads) -> None:
    prefix, extend = [0, 8, 13], [7, 5, 9]
    kv, q = case(paged_kv, prefix, extend, q_heads, kv_heads)
    pl, el = torch.tensor(prefix), torch.tensor(extend)
    out = extend_attention_ref(q, *kv.for_ref(), pl, el, SCALE, softcap=CAP)
    torch.testing.assert_close(out, naive(q, kv, prefix, extend, SCALE, CAP), atol=2e-5, rtol=2e-5)
    assert (out - naive(q, kv, prefix, extend, SCALE, 0.0)).abs().max() > 0.1, "the cap should matter here"
    dkv, dq = case(paged_kv, [11, 4, 30], [1, 1, 1], q_heads, kv_heads, seed=2)
    lens = torch.tensor([12, 5, 31], dtype=torch.int32)
    dout = decode_attention_ref(dq, *dkv.for_ref()[:2], dkv.for_ref()[2], lens, SCALE, softcap=CAP)
    torch.testing.assert_close(dout, naive(dq, dkv, [11, 4, 30], [1, 1, 1], SCALE, CAP), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_decode_caps_like_the_reference(paged_kv, device, tol, num_splits) -> None:
    kv = paged_kv([12, 1, 0, 45], 2, 32, 4, torch.float32, device, seed=4)
    q = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(5)).to(device)
    out = decode_attention(q, kv.k_cache, kv.v_cache, kv.page_table, kv.lens, SCALE, num_splits=num_splits,
                           softcap=CAP)
    ref = decode_attention_ref(q.cpu(), *kv.for_ref(), kv.lens.cpu(), SCALE, softcap=CAP)
    torch.testing.assert_close(out.cpu(), ref, **tol(torch.float32))


def test_triton_extend_caps_like_the_reference(paged_kv, device, tol) -> None:
    prefix, extend = [0, 8, 5, 13], [7, 5, 0, 40]
    kv = paged_kv([p + e for p, e in zip(prefix, extend)], 2, 32, 4, torch.float32, device, seed=6)
    q = torch.randn(sum(extend), 6, 32, generator=torch.Generator().manual_seed(7)).to(device)
    pl = torch.tensor(prefix, dtype=torch.int32, device=device)
    el = torch.tensor(extend, dtype=torch.int32, device=device)
    out = extend_attention(q, kv.k_cache, kv.v_cache, kv.page_table, pl, el, SCALE, softcap=CAP)
    ref = extend_attention_ref(q.cpu(), *kv.for_ref(), pl.cpu(), el.cpu(), SCALE, softcap=CAP)
    torch.testing.assert_close(out.cpu(), ref, **tol(torch.float32))


def test_cpu_backend_caps_like_the_torch_backend(paged_kv) -> None:
    prefix, extend = [0, 8], [7, 5]
    kv, q = case(paged_kv, prefix, extend, seed=8)
    k, v, table = kv.for_ref()
    pl, el = torch.tensor(prefix), torch.tensor(extend)
    cpu, ref = CpuAttentionBackend(), TorchAttentionBackend()
    torch.testing.assert_close(cpu.extend(q, k, v, table, pl, el, SCALE, softcap=CAP),
                               ref.extend(q, k, v, table, pl, el, SCALE, softcap=CAP))
    lens = torch.tensor([7, 13], dtype=torch.int32)
    dq = q[:2].contiguous()
    torch.testing.assert_close(cpu.decode(dq, k, v, table, lens, SCALE, softcap=CAP),
                               ref.decode(dq, k, v, table, lens, SCALE, softcap=CAP))
    assert not torch.allclose(cpu.decode(dq, k, v, table, lens, SCALE), cpu.decode(dq, k, v, table, lens, SCALE,
                                                                                   softcap=CAP))


@pytest.mark.parametrize("bad", [-1.0])
def test_negative_cap_is_refused(paged_kv, device, bad) -> None:
    kv = paged_kv([3], 2, 32, 4, torch.float32, device)
    q = torch.randn(1, 2, 32, device=device)
    with pytest.raises(ValueError, match="softcap must be >= 0"):
        decode_attention(q, kv.k_cache, kv.v_cache, kv.page_table, kv.lens, SCALE, softcap=bad)
