"""GPU tier: the compiled kernels on real shapes in bf16 and fp16 against the references."""

from __future__ import annotations

import pytest
import torch

import kernels

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: {"atol": 4e-2, "rtol": 4e-2}, torch.float16: {"atol": 1e-2, "rtol": 1e-2}}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _paged(lens, kv_heads, head_dim, page_size, dtype, spare=8):
    need = [-(-n // page_size) for n in lens]
    num_pages = sum(need) + spare
    k = torch.randn(num_pages, page_size, kv_heads, head_dim, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    perm = torch.randperm(num_pages, device="cuda")
    table = torch.zeros(len(lens), max(need + [1]), dtype=torch.int32, device="cuda")
    used = 0
    for b, p in enumerate(need):
        table[b, :p] = perm[used : used + p].int()
        used += p
    return k, v, table


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(32, 8, 128), (9, 3, 64), (16, 16, 128)])
@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_decode_attention(dtype, q_heads, kv_heads, head_dim, num_splits):
    lens = [0, 1, 16, 17, 255, 1024, 4096, 3000]
    k, v, table = _paged(lens, kv_heads, head_dim, 16, dtype)
    q = torch.randn(len(lens), q_heads, head_dim, device="cuda", dtype=dtype)
    seq = torch.tensor(lens, dtype=torch.int32, device="cuda")
    out = kernels.decode_attention(q, k, v, table, seq, head_dim**-0.5, num_splits=num_splits)
    ref = kernels.decode_attention_ref(q, k, v, table, seq, head_dim**-0.5)
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(32, 8, 128), (9, 3, 64)])
def test_extend_attention(dtype, q_heads, kv_heads, head_dim):
    prefix, extend = [0, 128, 1000, 37, 0], [512, 300, 17, 0, 1]
    k, v, table = _paged([p + e for p, e in zip(prefix, extend)], kv_heads, head_dim, 16, dtype)
    q = torch.randn(sum(extend), q_heads, head_dim, device="cuda", dtype=dtype)
    pl = torch.tensor(prefix, device="cuda")
    el = torch.tensor(extend, device="cuda")
    out = kernels.extend_attention(q, k, v, table, pl, el, head_dim**-0.5)
    ref = kernels.extend_attention_ref(q, k, v, table, pl, el, head_dim**-0.5)
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_and_copy_pages_are_exact(dtype):
    k_cache = torch.zeros(64, 16, 8, 128, device="cuda", dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    k = torch.randn(300, 8, 128, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    slots = torch.randperm(64 * 16, device="cuda")[:300]
    kernels.store_kv(k_cache, v_cache, k, v, slots)
    rk, rv = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    kernels.store_kv_ref(rk, rv, k, v, slots)
    assert torch.equal(k_cache, rk) and torch.equal(v_cache, rv)

    pools = [torch.zeros_like(k_cache) for _ in range(2)]
    expect = [p.clone() for p in pools]
    n = 40
    dst_index = torch.randint(0, 2, (n,), device="cuda")
    src_pages = torch.randint(0, 64, (n,), device="cuda")
    dst_pages = torch.randperm(64, device="cuda")[:n]
    bases = torch.tensor([p.data_ptr() for p in pools], dtype=torch.int64, device="cuda")
    kernels.copy_pages(k_cache, bases, dst_index, src_pages, dst_pages)
    kernels.copy_pages_ref(k_cache, expect, dst_index, src_pages, dst_pages)
    assert all(torch.equal(a, b) for a, b in zip(pools, expect))

    # runs of 1-3 pages consecutive at both ends (the transport's plan for a fresh pool), max_run above them
    starts = torch.arange(0, 60, 4, device="cuda")
    runs = torch.randint(1, 4, starts.shape, device="cuda")
    kernels.copy_pages(k_cache, bases, dst_index[:15], starts, starts.flip(0), runs, 4)
    kernels.copy_pages_ref(k_cache, expect, dst_index[:15], starts, starts.flip(0), runs)
    assert all(torch.equal(a, b) for a, b in zip(pools, expect))


@pytest.mark.parametrize("dtype,rows_heads_dim,slice_heads,runs", [
    # (rows, source heads, head dim), (heads copied, source start, destination heads, destination start)
    (torch.bfloat16, (16, 4, 128), (4, 0, 8, 4), False),  # Llama-3-8B's KV: a TP-2 prefill rank's half, into TP 1
    (torch.bfloat16, (16, 8, 128), (4, 4, 4, 0), True),   # TP 1 into a TP-2 decode rank: each row's second half
    (torch.float32, (16, 1, 64), (1, 0, 3, 2), True),     # SmolLM2's fp32 KV, TP 3 into TP 1
    (torch.float16, (2, 3, 3), (2, 1, 5, 0), True),       # 6-byte heads: 2-byte words, no 16-byte alignment
])
def test_row_slices_of_pages_are_exact(dtype, rows_heads_dim, slice_heads, runs):
    """The page copy's row-slice form (a TP rank's heads of each token row), compiled, against the reference."""
    from tests.kernels.test_page_copy import test_row_slices_match_reference as check

    check(torch.device("cuda"), dtype, rows_heads_dim, slice_heads, runs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pointwise(dtype):
    tol = TOL[dtype]
    x = torch.randn(333, 4096, device="cuda", dtype=dtype)
    r = torch.randn_like(x)
    w = torch.randn(4096, device="cuda", dtype=dtype)
    torch.testing.assert_close(kernels.rmsnorm(x, w, 1e-6), kernels.rmsnorm_ref(x, w, 1e-6), **tol)
    for got, want in zip(kernels.fused_add_rmsnorm(x, r, w, 1e-6), kernels.fused_add_rmsnorm_ref(x, r, w, 1e-6)):
        torch.testing.assert_close(got, want, **tol)
    # the engine's mix: a low-precision branch into an fp32 residual stream with fp32 norm weights
    r32, w32 = r.float(), w.float()
    for got, want in zip(kernels.fused_add_rmsnorm(x, r32, w32, 1e-6),
                         kernels.fused_add_rmsnorm_ref(x, r32, w32, 1e-6)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    cache = kernels.rotary_cos_sin_cache(128, 8192, 5e5).cuda()
    qkv = torch.randn(512, 32 + 16, 128, device="cuda", dtype=dtype)
    pos = torch.randint(0, 8192, (512,), device="cuda")
    got = kernels.rotary(qkv[:, :32], qkv[:, 32:40], pos, cache)
    want = kernels.rotary_ref(qkv[:, :32], qkv[:, 32:40], pos, cache)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)
    # the decode step's fusions: the same bits as the kernels they stand for
    if dtype != torch.float32:  # bit for bit under one config (autotuned, each output dtype picks its own)
        from kernels._triton import autotune_enabled

        normed, _ = kernels.fused_add_rmsnorm(x, r32, w32, 1e-6)
        fused = kernels.fused_add_rmsnorm(x, r32, w32, 1e-6, dtype)[0]
        if autotune_enabled():
            torch.testing.assert_close(fused, normed.to(dtype), **tol)
        else:
            assert torch.equal(fused, normed.to(dtype))
    k_cache, v_cache = (torch.zeros(64, 16, 8, 128, device="cuda", dtype=dtype) for _ in range(2))
    k2, v2 = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(64 * 16, device="cuda")[:512]
    q_rot = kernels.rotary_store_kv(qkv[:, :32], qkv[:, 32:40], qkv[:, 40:], pos, cache, k_cache, v_cache, slots)
    kernels.store_kv(k2, v2, got[1], qkv[:, 40:], slots)
    assert torch.equal(q_rot, got[0]) and torch.equal(k_cache, k2) and torch.equal(v_cache, v2)

    # the few-row linear layer at Llama-3-8B's o_proj and down shapes, one, sixteen, 32 and 64 rows (both row tiles)
    for n, k in ((4096, 4096), (4096, 14336)):
        w = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
        for m in (1, 16, 32, 64):
            xs = torch.randn(m, k, device="cuda", dtype=dtype)
            torch.testing.assert_close(kernels.gemv(xs, w), kernels.gemv_ref(xs, w), **tol)
            if k == 14336:  # the down projection reading the gate/up rows
                gu = torch.randn(m, 2 * k, device="cuda", dtype=dtype)
                torch.testing.assert_close(kernels.gemv(gu, w, silu_mul=True), kernels.gemv_ref(gu, w, silu_mul=True),
                                           **tol)

    h = torch.randn(257, 2 * 11008, device="cuda", dtype=dtype)
    torch.testing.assert_close(kernels.silu_and_mul(h), kernels.silu_and_mul_ref(h), **tol)


def test_a_chain_of_pdl_kernels_replays_from_a_graph_as_it_runs_eagerly():
    """Decode's kernels launch with programmatic dependent launch on Hopper (kernels/_triton.py): each
    one reads what the one before wrote, eagerly and replayed from a CUDA graph (PDL edges captured)."""
    from kernels._triton import PDL_ENV, pdl_enabled, pdl_status

    if (pdl_status() or "").startswith(PDL_ENV):  # turned off (the device check does when its smoke step failed)
        pytest.skip(f"PDL is off: {pdl_status()}")
    assert pdl_enabled() == (torch.cuda.get_device_capability() >= (9, 0))
    x = torch.randn(4, 2048, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(4, 2048, device="cuda", dtype=torch.float32)
    norm_w = torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    up = torch.randn(2 * 4096, 2048, device="cuda", dtype=torch.bfloat16) / 45
    down = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16) / 64

    def chain() -> torch.Tensor:
        h, r = kernels.fused_add_rmsnorm(x, res, norm_w, 1e-6, torch.bfloat16)
        return kernels.gemv(kernels.silu_and_mul(kernels.gemv(h, up)), down)

    eager = chain()
    chain()  # warm (compiles, autotuning) before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
    h, _ = kernels.fused_add_rmsnorm_ref(x, res, norm_w, 1e-6, torch.bfloat16)
    ref = kernels.gemv_ref(kernels.silu_and_mul_ref(kernels.gemv_ref(h, up)), down)
    torch.testing.assert_close(eager.float(), ref.float(), atol=0.1, rtol=0.05)


def test_the_gemv_with_the_norm_folded_in_at_llama_8b_shapes_and_from_a_graph():
    """`kernels.rmsnorm_gemv` at Llama-3-8B's QKV and gate/up shapes, one, sixteen and 64 rows: the summed
    residual bit-equal to the norm kernel's, the layer within bf16 of the norm kernel then the GEMV; and a
    layer's MLP as a step runs it (folded gate/up, then down reading the gate/up rows) replayed from a
    CUDA graph (PDL edges on Hopper) equal to its eager run."""
    tol = TOL[torch.bfloat16]
    g = torch.rand(4096, device="cuda") + 0.5
    for n in (6144, 2 * 14336):
        w = torch.randn(n, 4096, device="cuda", dtype=torch.bfloat16) / 64
        for m in (1, 16, 64):
            x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16) * 4
            res = torch.randn(m, 4096, device="cuda") * 20
            y, h = kernels.rmsnorm_gemv(x, g, 1e-5, w, residual=res)
            normed, summed = kernels.fused_add_rmsnorm(x, res, g, 1e-5, torch.bfloat16)
            assert torch.equal(h, summed)
            torch.testing.assert_close(y, kernels.gemv(normed, w), **tol)
            torch.testing.assert_close(y, kernels.rmsnorm_gemv_ref(x, g, 1e-5, w, residual=res)[0], **tol)
    up = torch.randn(2 * 14336, 4096, device="cuda", dtype=torch.bfloat16) / 64
    down = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16) / 120
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(4, 4096, device="cuda")

    def mlp() -> tuple[torch.Tensor, torch.Tensor]:
        gate_up, summed = kernels.rmsnorm_gemv(x, g, 1e-5, up, residual=res)
        return kernels.gemv(gate_up, down, silu_mul=True), summed

    eager = mlp()
    mlp()  # compiles and autotuning before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mlp()
    for _ in range(3):
        out[0].zero_()
        out[1].zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])
