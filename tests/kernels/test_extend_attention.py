"""Varlen causal extend attention over a paged prefix vs extend_attention_ref."""

from __future__ import annotations

import pytest
import torch

from kernels.extend_attention import extend_attention, extend_attention_ref

GQA = [(2, 2), (6, 2), (8, 1)]


def _run(paged_kv, device, prefix, extend, q_heads, kv_heads, head_dim, page_size, dtype, seed=0, **meta):
    totals = [p + e for p, e in zip(prefix, extend)]
    kv = paged_kv(totals, kv_heads, head_dim, page_size, dtype, device, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(sum(extend), q_heads, head_dim, generator=g).to(dtype).to(device)
    pl = torch.tensor(prefix, dtype=torch.int32, device=device)
    el = torch.tensor(extend, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    out = extend_attention(q, kv.k_cache, kv.v_cache, kv.page_table, pl, el, scale, **meta)
    ref = extend_attention_ref(q.cpu(), *kv.for_ref(), pl.cpu(), el.cpu(), scale)
    return out, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("q_heads,kv_heads", GQA)
def test_mixed_batch(paged_kv, device, tol, dtype, q_heads, kv_heads):
    # fresh prefill; prefix-cache hit on a page boundary; a skipped request; a chunk continuing
    # mid-page; a single new token (decode-shaped)
    prefix = [0, 8, 5, 13, 6]
    extend = [7, 5, 0, 9, 1]
    out, ref = _run(paged_kv, device, prefix, extend, q_heads, kv_heads, 32, 4, dtype)
    torch.testing.assert_close(out.cpu(), ref, **tol(dtype))


@pytest.mark.parametrize("q_heads,kv_heads", [(12, 4), (16, 1), (64, 1)])
def test_query_heads_of_a_group_share_their_program(paged_kv, device, tol, q_heads, kv_heads):
    # GQA packed: a program's rows are tokens x the group's heads. Group 3 pads to 4 rows a token; 16
    # leaves the interpreter's 32-row tile 2 tokens; 64 is more heads than rows (one token a program)
    out, ref = _run(paged_kv, device, [0, 9], [11, 6], q_heads, kv_heads, 16, 4, torch.float32, seed=3)
    torch.testing.assert_close(out.cpu(), ref, **tol(torch.float32))


@pytest.mark.parametrize(
    "prefix,extend,page_size,head_dim",
    [
        ([0], [45], 16, 32),  # more new tokens than one query block: several m-blocks, causal tiles
        ([40, 0], [37, 33], 8, 64),  # long prefix + a multi-block chunk
        ([3, 0], [1, 1], 5, 24),  # non-power-of-two page size and head_dim; one-token contexts
        ([0, 16], [16, 16], 16, 32),  # everything exactly on page boundaries
    ],
)
def test_shapes(paged_kv, device, tol, prefix, extend, page_size, head_dim):
    out, ref = _run(paged_kv, device, prefix, extend, 4, 2, head_dim, page_size, torch.float32, seed=7)
    torch.testing.assert_close(out.cpu(), ref, **tol(torch.float32))


def test_precomputed_metadata(paged_kv, device, tol):
    prefix, extend = [4, 0, 9], [3, 0, 6]
    meta = {
        "extend_start_loc": torch.tensor([0, 3, 3], dtype=torch.int64, device=device),
        "max_extend_len": 6,
    }
    out, ref = _run(paged_kv, device, prefix, extend, 4, 2, 32, 4, torch.float32, seed=9, **meta)
    torch.testing.assert_close(out.cpu(), ref, **tol(torch.float32))


def test_strided_q(paged_kv, device, tol):
    kv = paged_kv([10], 2, 32, 4, torch.float32, device, seed=11)
    qkv = torch.randn(6, 4 + 2 + 2, 32, device=device)
    q = qkv[:, :4]
    pl = torch.tensor([4], device=device)
    el = torch.tensor([6], device=device)
    out = extend_attention(q, kv.k_cache, kv.v_cache, kv.page_table, pl, el, 0.2)
    ref = extend_attention_ref(q.cpu(), *kv.for_ref(), pl.cpu(), el.cpu(), 0.2)
    torch.testing.assert_close(out.cpu(), ref, **tol(torch.float32))


def test_no_new_tokens(device):
    q = torch.randn(0, 4, 16, device=device)
    cache = torch.zeros(2, 4, 2, 16, device=device)
    table = torch.zeros(2, 1, dtype=torch.int32, device=device)
    lens = torch.zeros(2, dtype=torch.int32, device=device)
    assert extend_attention(q, cache, cache, table, lens, lens, 0.25).shape == (0, 4, 16)
