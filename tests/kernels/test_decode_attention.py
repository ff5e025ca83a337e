"""Paged split-K decode attention vs decode_attention_ref."""

from __future__ import annotations

import importlib

import pytest
import torch

from kernels.decode_attention import decode_attention, decode_attention_ref, default_num_splits

# (q_heads, kv_heads): GQA ratios 1, 3 and 8.
GQA = [(2, 2), (6, 2), (8, 1)]


def _run(paged_kv, device, lens, q_heads, kv_heads, head_dim, page_size, dtype, num_splits, seed=0):
    kv = paged_kv(lens, kv_heads, head_dim, page_size, dtype, device, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(lens), q_heads, head_dim, generator=g).to(dtype).to(device)
    scale = head_dim**-0.5
    out = decode_attention(q, kv.k_cache, kv.v_cache, kv.page_table, kv.lens, scale, num_splits=num_splits)
    ref = decode_attention_ref(q.cpu(), *kv.for_ref(), kv.lens.cpu(), scale)
    return out, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("q_heads,kv_heads", GQA)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_matches_reference(paged_kv, device, tol, dtype, q_heads, kv_heads, num_splits):
    # a context ending exactly on a page boundary, a single token, an empty slot, a multi-block one
    lens = [12, 1, 0, 45]
    out, ref = _run(paged_kv, device, lens, q_heads, kv_heads, 32, 4, dtype, num_splits)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.cpu(), ref, **tol(dtype))
    assert torch.all(out[2] == 0), "an empty slot (seq_len 0) yields zeros"


@pytest.mark.parametrize(
    "lens,page_size,head_dim,num_splits",
    [
        ([64, 33], 16, 64, 4),  # boundary + split-K with a BLOCK_N-aligned split length
        ([1, 2, 3], 16, 32, 8),  # more splits than tokens: most splits are empty
        ([19, 0], 5, 24, 2),  # page size and head_dim that are not powers of two
        ([0, 0], 4, 32, 3),  # a batch of empty slots only
        ([70], 1, 16, 2),  # one-token pages
        ([200, 150], 16, 32, 3),  # several BLOCK_N iterations inside each split
    ],
)
def test_edge_shapes(paged_kv, device, tol, lens, page_size, head_dim, num_splits):
    out, ref = _run(paged_kv, device, lens, 4, 2, head_dim, page_size, torch.float32, num_splits, seed=3)
    torch.testing.assert_close(out.cpu(), ref, **tol(torch.float32))


def test_strided_q_and_int64_tables(paged_kv, device, tol):
    kv = paged_kv([9, 23], 2, 32, 8, torch.float32, device, seed=5)
    qkv = torch.randn(2, 4 + 2 + 2, 32, device=device)
    q = qkv[:, :4]  # a view of a fused qkv projection
    table, lens = kv.page_table.long(), kv.lens.long()
    out = decode_attention(q, kv.k_cache, kv.v_cache, table, lens, 0.2, num_splits=2)
    ref = decode_attention_ref(q.cpu(), *kv.for_ref(), lens.cpu(), 0.2)
    torch.testing.assert_close(out.cpu(), ref, **tol(torch.float32))


def test_empty_batch(device):
    q = torch.randn(0, 4, 16, device=device)
    cache = torch.zeros(2, 4, 2, 16, device=device)
    table = torch.zeros(0, 1, dtype=torch.int32, device=device)
    out = decode_attention(q, cache, cache, table, torch.zeros(0, dtype=torch.int32, device=device), 0.25)
    assert out.shape == (0, 4, 16)


def test_default_num_splits():
    cpu = torch.device("cpu")
    assert default_num_splits(64, 8, 4096, cpu) == 1


def test_split_counts_are_powers_of_two_up_to_the_cap():
    from kernels.decode_attention import MAX_SPLITS, num_splits_for

    seen = {num_splits_for(b, 8, w * 16, 132) for b in range(1, 300) for w in range(1, 2100, 13)}
    assert seen == {1, 2, 4, 8, 16, 32, 64} and max(seen) == MAX_SPLITS
    assert num_splits_for(4, 8, 8192, 132) == 16  # ceil(4 * 132 / 32) = 17, rounded down
    assert num_splits_for(1, 8, 300, 132) == 2  # never more than the context's 256-token chunks


def test_every_split_count_launches_the_same_two_compiles(paged_kv, device, monkeypatch):
    """Eager decode picks its count from the step's batch and table width: a count that picked a new
    compile would compile (and autotune) while serving. Each count launches the unsplit kernel or the
    split kernel and the merge with the same constexprs and the same specialization of every runtime
    argument Triton specializes (an int: 1, a multiple of 16 or neither; a tensor: its dtype and 16-byte
    alignment); the count itself is the grid, and the arguments that follow it are left unspecialized."""
    import inspect

    from kernels._triton import LazyKernel

    da = importlib.import_module("kernels.decode_attention")  # the package's name is the function
    kv = paged_kv([40, 7], 2, 16, 4, torch.float32, device)
    q = torch.randn(2, 4, 16).to(device)
    seen: dict[str, set] = {}
    original = LazyKernel.__getitem__

    def kind(v):
        if isinstance(v, torch.Tensor):
            return (str(v.dtype), v.data_ptr() % 16 == 0)
        if isinstance(v, bool) or not isinstance(v, int):
            return type(v).__name__
        return "1" if v == 1 else "16k" if v % 16 == 0 else "int"

    def spy(self, grid):
        run = original(self, grid)

        def launch(*args, **kwargs):
            names = [n for n in inspect.signature(self.fn).parameters if n not in kwargs][:len(args)]
            runtime = tuple((n, kind(v)) for n, v in zip(names, args) if n not in self.do_not_specialize)
            seen.setdefault(self.__name__, set()).add((tuple(sorted(kwargs.items())), runtime))
            return run(*args, **kwargs)

        return launch

    monkeypatch.setattr(LazyKernel, "__getitem__", spy)
    ref = decode_attention_ref(q.cpu(), *kv.for_ref(), kv.lens.cpu(), 0.25)
    for n in (1, 2, 3, 8, 13, 16, 32, da.MAX_SPLITS):
        out = decode_attention(q, kv.k_cache, kv.v_cache, kv.page_table, kv.lens, 0.25, num_splits=n)
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    partial = sorted(dict(k)["SPLIT"] for k, _ in seen["_decode_partial_kernel"])
    assert partial == [False, True]  # one compile unsplit, one split: for 2..64 splits alike
    assert len(seen["_decode_reduce_kernel"]) == 1
    assert "num_splits" in da._decode_reduce.do_not_specialize
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(q, kv.k_cache, kv.v_cache, kv.page_table, kv.lens, 0.25, num_splits=da.MAX_SPLITS + 1)


@pytest.mark.parametrize("q_heads,kv_heads", [(9, 3), (4, 4), (16, 8), (8, 1)])  # block-diagonal and per-head paths
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_naive_softmax_attention(q_heads, kv_heads, dtype):
    g = torch.Generator().manual_seed(11)
    page_size, dim, lens = 4, 16, [13, 1, 0, 40, 7]
    pages = torch.randperm(64, generator=g)[: sum((n + page_size - 1) // page_size for n in lens)].tolist()
    k_cache = torch.randn(64, page_size, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(64, page_size, kv_heads, dim, generator=g).to(dtype)
    table = torch.zeros(len(lens), 10, dtype=torch.int32)
    for b, n in enumerate(lens):
        for j in range((n + page_size - 1) // page_size):
            table[b, j] = pages.pop()
    q = torch.randn(len(lens), q_heads, dim, generator=g).to(dtype)
    out = decode_attention_ref(q, k_cache, v_cache, table, torch.tensor(lens), 0.25)
    group = q_heads // kv_heads
    for b, n in enumerate(lens):
        if n == 0:
            assert torch.all(out[b] == 0)
            continue
        rows = table[b, : (n + page_size - 1) // page_size].long()
        k = k_cache[rows].reshape(-1, kv_heads, dim)[:n].double()
        v = v_cache[rows].reshape(-1, kv_heads, dim)[:n].double()
        for h in range(q_heads):
            p = torch.softmax(k[:, h // group] @ q[b, h].double() * 0.25, 0)
            want = p @ v[:, h // group]
            torch.testing.assert_close(out[b, h].double(), want, atol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                                       rtol=2e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_a_column_major_page_table_reads_like_a_row_major_one(paged_kv, device, num_splits):
    """CUDA-graph decode keeps its table column-major (a step copies only the columns in use)."""
    kv = paged_kv([13, 1, 0, 40], 2, 16, 4, torch.float32, device, seed=5)
    q = torch.randn(4, 4, 16).to(device)
    cols = kv.page_table.t().contiguous().t()
    assert cols.stride() == (1, kv.page_table.shape[0])
    out = decode_attention(q, kv.k_cache, kv.v_cache, cols, kv.lens, 0.25, num_splits=num_splits)
    ref = decode_attention_ref(q.cpu(), *kv.for_ref(), kv.lens.cpu(), 0.25)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
