"""Decode attention by runs (a request's leading consecutive pages read in place, the rest gathered)
equals the reference over the whole context."""

from __future__ import annotations

import pytest
import torch

from appliance.engine.attention import TorchAttentionBackend
from appliance.engine.attention_cpu import CpuAttentionBackend
from appliance.engine.decode_runs import decode_by_runs, leading_run, split_runs

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
    assert split.tail_plan == [] and split.tail_rows.numel() == 0
    q = torch.randn(2, 4, DIM)
    torch.testing.assert_close(decode_by_runs(q, k_cache, v_cache, split, 0.3),
                               TorchAttentionBackend().decode(q, k_cache, v_cache, table, lens, 0.3), **TOL)


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


def test_backend_reads_long_runs_in_place() -> None:
    """Through the backend (its default minimum run): contexts of 70-130 tokens, pages 16."""
    g = torch.Generator().manual_seed(5)
    shape = (40, 16, 3, DIM)
    k_cache, v_cache = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    table = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 30, 31, 0, 0],
                          [20, 21, 22, 23, 24, 25, 14, 0, 0]], dtype=torch.int32)
    lens = torch.tensor([130, 100, 97])
    q = torch.randn(3, 9, DIM, generator=g)
    be = CpuAttentionBackend()
    for _ in range(2):  # the second call reuses the forward pass's split
        out = be.decode(q, k_cache, v_cache, table, lens, 0.25)
    assert be._split is not None and [h[0] for h in be._split.heads] == [0, 1, 2]
    torch.testing.assert_close(out, TorchAttentionBackend().decode(q, k_cache, v_cache, table, lens, 0.25), **TOL)


def test_mixed_extend_batches_its_decoding_requests() -> None:
    """An extend step with two prefill chunks, three decoding requests (one new token each, one of
    them over pages in one run) and an idle row equals the reference."""
    g = torch.Generator().manual_seed(7)
    shape = (64, 16, 3, DIM)
    k_cache, v_cache = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    prefix = torch.tensor([0, 80, 40, 0, 100, 17])
    new = torch.tensor([20, 1, 1, 0, 1, 9])
    table = torch.tensor([[1, 2, 0, 0, 0, 0, 0], [10, 11, 12, 13, 14, 15, 0], [30, 5, 31, 0, 0, 0, 0],
                          [0, 0, 0, 0, 0, 0, 0], [40, 41, 42, 43, 44, 45, 46], [50, 51, 0, 0, 0, 0, 0]],
                         dtype=torch.int32)
    q = torch.randn(int(new.sum()), 9, DIM, generator=g)
    be = CpuAttentionBackend()
    for _ in range(2):
        out = be.extend(q, k_cache, v_cache, table, prefix, new, 0.25)
    assert be._decode_rows is not None and be._decode_rows[0] == [1, 2, 4]
    ref = TorchAttentionBackend().extend(q, k_cache, v_cache, table, prefix, new, 0.25)
    torch.testing.assert_close(out, ref, **TOL)
