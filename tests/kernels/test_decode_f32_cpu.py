"""pdbox's fp32 decode attention (kernels/cpu/decode_f32.c, AVX2) against the torch reference, its
argument checks, and its use by the CPU backend in an fp32 model."""

from __future__ import annotations

import pytest
import torch

from appliance.engine.attention_cpu import CpuAttentionBackend
from kernels.cpu.flash_decode import DecodeTable, decode_table, flash_decode, native_f32
from kernels.decode_attention import decode_attention_ref

BUILT = native_f32()
pytestmark = pytest.mark.skipif(BUILT.lib is None, reason=f"fp32 decode kernel unavailable: {BUILT.reason}")


def case(hq: int, hkv: int, d: int, page_size: int, lens: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    pages = sum((n + page_size - 1) // page_size for n in lens) + 3
    k, v = (torch.randn(pages, page_size, hkv, d, generator=g) for _ in range(2))
    width = max((n + page_size - 1) // page_size for n in lens) + 1
    table = torch.stack([torch.randperm(pages, generator=g)[:width] for _ in lens])  # scattered pages
    q = torch.randn(len(lens), hq, d, generator=g)
    return q, k, v, table, torch.tensor(lens)


# d = 72: eight V vectors held in registers, then one more
@pytest.mark.parametrize(("hq", "hkv", "d"), [(9, 3, 64), (4, 4, 128), (16, 1, 32), (8, 2, 8), (6, 2, 72)])
@pytest.mark.parametrize("threads", [1, 2])
def test_equals_the_reference(hq: int, hkv: int, d: int, threads: int) -> None:
    lens = [1, 7, 64, 65, 300]  # one row, a partial block, one whole block, one over, many blocks
    q, k, v, table, seq_lens = case(hq, hkv, d, 16, lens, hq + d)
    got = flash_decode(q, k, v, decode_table(table, seq_lens, k.shape[0], 16), d**-0.5, threads)
    want = decode_attention_ref(q, k, v, table, seq_lens, d**-0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize(("hq", "hkv", "d"), [(9, 3, 64), (4, 4, 128), (6, 2, 72)])
def test_long_contexts_in_parts_equal_the_reference(hq: int, hkv: int, d: int) -> None:
    """Contexts over 512 rows run as parts of 512 merged after: one row over, one part and a tail, many."""
    lens = [513, 1100, 2048, 40]
    q, k, v, table, seq_lens = case(hq, hkv, d, 16, lens, 5)
    want = decode_attention_ref(q, k, v, table, seq_lens, d**-0.5)
    for threads in (1, 2, 3):
        got = flash_decode(q, k, v, decode_table(table, seq_lens, k.shape[0], 16), d**-0.5, threads)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


def test_a_request_gets_the_same_bits_alone_or_in_a_batch() -> None:
    q, k, v, table, lens = case(9, 3, 64, 4, [5, 290, 33, 1300], 1)
    together = flash_decode(q, k, v, decode_table(table, lens, k.shape[0], 4), 0.125, 2)
    for b in range(4):
        for threads in (1, 2):
            plan = decode_table(table[b : b + 1], lens[b : b + 1], k.shape[0], 4)
            assert torch.equal(flash_decode(q[b : b + 1], k, v, plan, 0.125, threads)[0], together[b])


def test_bad_arguments_are_named() -> None:
    q, k, v, table, lens = case(9, 3, 64, 16, [10], 2)
    plan = decode_table(table, lens, k.shape[0], 16)
    with pytest.raises(ValueError, match="torch.float32 CPU tensor"):
        flash_decode(q, k.to(torch.bfloat16), v, plan, 0.125)
    with pytest.raises(ValueError, match="multiple of 8"):
        flash_decode(q[..., :60], k[..., :60], v[..., :60], plan, 0.125)
    with pytest.raises(ValueError, match="groups of at most 16"):
        flash_decode(torch.randn(1, 51, 64), k, v, plan, 0.125)
    with pytest.raises(ValueError, match="page ids"):
        decode_table(table + 1000, lens, k.shape[0], 16)
    with pytest.raises(ValueError, match="checked for"):
        flash_decode(q, k, v, DecodeTable(plan.table, plan.lens, k.shape[0] + 1, 16), 0.125)


def test_the_backend_decodes_fp32_with_it() -> None:
    q, k, v, table, lens = case(9, 3, 64, 16, [3, 120], 3)
    fast, slow = CpuAttentionBackend(), CpuAttentionBackend(native_kernels=False)
    assert fast.native_decode_f32 and not slow.native_decode_f32
    got = fast.decode(q, k, v, table, lens, 0.125)
    assert isinstance(fast._way, DecodeTable)
    torch.testing.assert_close(got, slow.decode(q, k, v, table, lens, 0.125), atol=2e-6, rtol=2e-5)


def test_a_mixed_steps_decoding_requests_go_through_it() -> None:
    """An extend step with prefill chunks and three decoding requests: the decoding ones attend together in
    the kernel, and the step equals the reference."""
    from appliance.engine.attention import TorchAttentionBackend

    g = torch.Generator().manual_seed(7)
    k_cache, v_cache = (torch.randn(64, 16, 3, 64, generator=g) for _ in range(2))
    prefix, new = torch.tensor([0, 80, 40, 100, 17]), torch.tensor([20, 1, 1, 1, 9])
    table = torch.tensor([[1, 2, 0, 0, 0, 0, 0], [10, 11, 12, 13, 14, 15, 0], [30, 5, 31, 0, 0, 0, 0],
                          [40, 41, 42, 43, 44, 45, 46], [50, 51, 0, 0, 0, 0, 0]], dtype=torch.int32)
    q = torch.randn(int(new.sum()), 9, 64, generator=g)
    be = CpuAttentionBackend()
    out = be.extend(q, k_cache, v_cache, table, prefix, new, 0.25)
    assert be._decode_rows is not None and be._decode_rows.rows == [1, 2, 3]
    assert isinstance(be._decode_rows.way, DecodeTable)
    want = TorchAttentionBackend().extend(q, k_cache, v_cache, table, prefix, new, 0.25)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=2e-5)
