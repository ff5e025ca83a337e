"""Decode attention by runs (a request's leading consecutive pages read in place, the rest gathered)
equals the reference over the whole context."""

from __future__ import annotations

import pytest
import torch

from appliance.engine import decode_runs
from appliance.engine.attention import TorchAttentionBackend
from appliance.engine.attention_cpu import CpuAttentionBackend
from appliance.engine.decode_runs import RunSplit, decode_by_runs, leading_run, split_runs, supports

TOL = {"atol": 2e-5, "rtol": 2e-5}
PAGE, DIM = 4, 16


def caches(num_pages: int, kv_heads: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (num_pages, PAGE, kv_heads, DIM)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# (pages, tokens) per request: one run whole; a run then pages elsewhere; no run at all; an empty
# slot; a run shorter than min_run_tokens; a run ending mid-page with the context.
REQUESTS = [
    ([3, 4, 5, 6, 7], 19),
    ([10, 11, 12, 40, 2, 41], 23),
    ([30, 20, 31, 21], 14),
    ([0], 0),
    ([50, 51, 9, 60], 13),
    ([44, 45, 46, 47, 48, 49], 21),
]


def table_and_lens() -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p, _ in REQUESTS)
    table = torch.tensor([p + [0] * (width - len(p)) for p, _ in REQUESTS], dtype=torch.int32)
    return table, torch.tensor([n for _, n in REQUESTS])


def test_leading_run() -> None:
    assert leading_run([3, 4, 5, 9, 10]) == 3
    assert leading_run([7]) == 1
    assert leading_run([]) == 0
    assert leading_run([5, 4, 3]) == 1


def test_split_reads_runs_in_place_and_gathers_the_rest() -> None:
    table, lens = table_and_lens()
    split = split_runs(table, lens, PAGE, min_run_tokens=12)
    assert not split.all_in_place
    # request 0: whole in place; 1: 12 tokens in place + 11 gathered; 2: all gathered; 3: empty;
    # 4: its 8-token run is under 12, so all gathered; 5: 21 tokens in place (the run covers them)
    assert split.heads == [(0, 12, 19), (1, 40, 12), (5, 176, 21)]
    assert split.tail_rows.tolist() == [1, 2, 4]
    assert split.both_rows.tolist() == [1]
    assert (split.both_head.tolist(), split.both_tail.tolist()) == ([1], [0])


def test_every_request_in_place() -> None:
    k_cache, v_cache = caches(16, 2)
    table, lens = torch.tensor([[0, 1, 2], [5, 6, 7]]), torch.tensor([12, 9])
    split = split_runs(table, lens, PAGE, min_run_tokens=4)
    assert split.tail_plan == [] and split.tail_rows.numel() == 0 and split.all_in_place
    q = torch.randn(2, 4, DIM)
    torch.testing.assert_close(decode_by_runs(q, k_cache, v_cache, split, 0.3),
                               TorchAttentionBackend().decode(q, k_cache, v_cache, table, lens, 0.3), **TOL)
    one = split_runs(table[1:], lens[1:], PAGE, min_run_tokens=4)  # batch 1: the kernel's output as is
    torch.testing.assert_close(decode_by_runs(q[1:], k_cache, v_cache, one, 0.3),
                               TorchAttentionBackend().decode(q[1:], k_cache, v_cache, table[1:], lens[1:], 0.3), **TOL)


@pytest.mark.parametrize("kv_heads,q_heads", [(3, 9), (1, 4), (2, 2)])
@pytest.mark.parametrize("min_run", [1, 12, 1000])
def test_decode_by_runs_equals_reference(kv_heads: int, q_heads: int, min_run: int) -> None:
    k_cache, v_cache = caches(64, kv_heads)
    table, lens = table_and_lens()
    q = torch.randn(len(REQUESTS), q_heads, DIM, generator=torch.Generator().manual_seed(2))
    out = decode_by_runs(q, k_cache, v_cache, split_runs(table, lens, PAGE, min_run), 0.3)
    ref = TorchAttentionBackend().decode(q, k_cache, v_cache, table, lens, 0.3)
    torch.testing.assert_close(out, ref, **TOL)
    assert torch.count_nonzero(out[3]) == 0


@pytest.mark.parametrize("min_run", [1, 12])
def test_bf16_decode_by_runs_is_close_to_fp32(min_run: int) -> None:
    """bf16 query and caches (the engine's default on CPUs with bf16 instructions): torch's fused
    kernel accumulates in fp32, so the answer is the fp32 one to bf16's precision."""
    k_cache, v_cache = caches(64, 3)
    table, lens = table_and_lens()
    q = torch.randn(len(REQUESTS), 9, DIM, generator=torch.Generator().manual_seed(3))
    split = split_runs(table, lens, PAGE, min_run)
    out = decode_by_runs(q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), split, 0.3)
    assert out.dtype == torch.bfloat16
    ref = TorchAttentionBackend().decode(q, k_cache, v_cache, table, lens, 0.3)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    assert supports(q.bfloat16(), k_cache.bfloat16()) and not supports(q, k_cache.bfloat16())


def test_backend_reads_long_runs_in_place(monkeypatch) -> None:
    """Through the backend (its default minimum run): contexts of 100-130 tokens, pages 16; with
    ``IN_PLACE_MAX_BATCH`` raised to 2, a third request takes the batch past it, to the gathered way."""
    g = torch.Generator().manual_seed(5)
    shape = (40, 16, 3, DIM)
    k_cache, v_cache = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    table = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 30, 31, 0, 0],
                          [20, 21, 22, 23, 24, 25, 14, 0, 0]], dtype=torch.int32)
    lens = torch.tensor([130, 100, 97])
    q = torch.randn(3, 9, DIM, generator=g)
    monkeypatch.setattr(decode_runs, "IN_PLACE_MAX_BATCH", 2)
    be = CpuAttentionBackend(native_kernels=False)  # the torch ways (decode_runs), not the C kernels
    for rows in (2, 3):
        for _ in range(2):  # the second call reuses the forward pass's split
            out = be.decode(q[:rows], k_cache, v_cache, table[:rows], lens[:rows], 0.25)
        assert isinstance(be._way, RunSplit) == (rows == 2)
        if rows == 2:
            assert [h[0] for h in be._way.heads] == [0, 1] and be._way.both_rows.tolist() == [1]
        want = TorchAttentionBackend().decode(q[:rows], k_cache, v_cache, table[:rows], lens[:rows], 0.25)
        torch.testing.assert_close(out, want, **TOL)


@pytest.mark.parametrize("decoding", [3, 2])
def test_mixed_extend_batches_its_decoding_requests(decoding: int, monkeypatch) -> None:
    """An extend step with two prefill chunks, three decoding requests (one new token each, one of
    them over pages in one run) and an idle row equals the reference; with two decoding requests
    (the third idle) and ``IN_PLACE_MAX_BATCH`` raised to 2, they read in place."""
    g = torch.Generator().manual_seed(7)
    shape = (64, 16, 3, DIM)
    k_cache, v_cache = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    prefix = torch.tensor([0, 80, 40, 0, 100, 17])
    new = torch.tensor([20, 1, 1, 0, 1 if decoding == 3 else 0, 9])
    table = torch.tensor([[1, 2, 0, 0, 0, 0, 0], [10, 11, 12, 13, 14, 15, 0], [30, 5, 31, 0, 0, 0, 0],
                          [0, 0, 0, 0, 0, 0, 0], [40, 41, 42, 43, 44, 45, 46], [50, 51, 0, 0, 0, 0, 0]],
                         dtype=torch.int32)
    q = torch.randn(int(new.sum()), 9, DIM, generator=g)
    monkeypatch.setattr(decode_runs, "IN_PLACE_MAX_BATCH", 2)
    be = CpuAttentionBackend(native_kernels=False)  # the torch ways (decode_runs), not the C kernels
    for _ in range(2):
        out = be.extend(q, k_cache, v_cache, table, prefix, new, 0.25)
    assert be._decode_rows is not None and be._decode_rows.rows == [1, 2, 4][:decoding]
    assert isinstance(be._decode_rows.way, RunSplit) == (decoding <= 2)
    ref = TorchAttentionBackend().extend(q, k_cache, v_cache, table, prefix, new, 0.25)
    torch.testing.assert_close(out, ref, **TOL)
