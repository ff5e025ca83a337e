"""pdbox's fp32 prefill attention (kernels/cpu/extend_f32.c, AVX2) against the torch reference, its argument
checks, and its use by the CPU backend in an fp32 model."""

from __future__ import annotations

import pytest
import torch

import appliance.engine.attention_cpu as backend_module
from appliance.engine.attention_cpu import CpuAttentionBackend
from kernels.cpu.flash_extend import flash_extend, native_f32
from tests.kernels.conftest import broken_extend_args, build_paged_kv, extend_case, extend_reference

BUILT = native_f32()
pytestmark = pytest.mark.skipif(BUILT.lib is None, reason=f"fp32 prefill kernel unavailable: {BUILT.reason}")
F32 = {"atol": 2e-6, "rtol": 2e-5}


def _case(prefix: int, n_new: int, hq: int, hkv: int, d: int, page_size: int, seed: int = 0):
    return extend_case(prefix, n_new, hq, hkv, d, page_size, torch.float32, seed)


@pytest.mark.parametrize("prefix,n_new,hq,hkv,d,page_size", [
    (0, 1, 9, 3, 64, 16),
    (0, 15, 9, 3, 64, 16),  # one partial tile
    (0, 49, 4, 4, 64, 4),  # two whole tiles and one row
    (5, 64, 8, 1, 64, 16),
    (70, 100, 9, 3, 64, 8),  # a key block cut by the diagonal and by the end of the context
    (130, 1, 6, 2, 128, 16),  # one new token after a long prefix (a chunk's last token)
    (3, 77, 2, 1, 32, 1),
    (0, 200, 9, 3, 64, 64),
    (5, 17, 4, 4, 72, 4),  # a head size without its own unrolled copy
    (60, 9, 3, 1, 8, 2),  # the smallest head size; a last key group short of four keys
])
@pytest.mark.parametrize("threads", [1, 2])
def test_equals_reference(prefix, n_new, hq, hkv, d, page_size, threads) -> None:
    kv, q = _case(prefix, n_new, hq, hkv, d, page_size)
    scale = d ** -0.5
    out = flash_extend(q, kv.k_cache, kv.v_cache, kv.page_table[0].long(), prefix, scale, threads)
    assert out.dtype == torch.float32
    assert not out.isnan().any()  # every cache row outside the request is NaN: none was read
    torch.testing.assert_close(out, extend_reference(kv, q, prefix, scale), **F32)


def test_thread_count_does_not_change_a_bit() -> None:
    """Each (tile, head) is computed whole by one thread, so the schedule cannot reorder a sum."""
    kv, q = _case(40, 150, 9, 3, 64, 16, seed=3)
    pages = kv.page_table[0].long()
    one = flash_extend(q, kv.k_cache, kv.v_cache, pages, 40, 0.125, 1)
    for threads in (2, 3, 8):
        assert torch.equal(one, flash_extend(q, kv.k_cache, kv.v_cache, pages, 40, 0.125, threads))


def test_chunks_equal_the_whole_prompt() -> None:
    """A prompt prefilled in chunks over its own cached prefix gets the rows of one whole call."""
    kv, q = _case(0, 100, 9, 3, 64, 16, seed=5)
    pages = kv.page_table[0].long()
    whole = flash_extend(q, kv.k_cache, kv.v_cache, pages, 0, 0.125, 2)
    cuts = ((0, 40), (40, 97), (97, 100))
    parts = [flash_extend(q[a:b], kv.k_cache, kv.v_cache, pages, a, 0.125, 2) for a, b in cuts]
    torch.testing.assert_close(torch.cat(parts), whole, **F32)


def test_writes_into_out_rows_only() -> None:
    kv, q = _case(0, 20, 9, 3, 64, 16)
    big = torch.full((30, 9, 64), 7.0)
    flash_extend(q, kv.k_cache, kv.v_cache, kv.page_table[0].long(), 0, 0.125, 2, out=big[5:25])
    assert (big[:5] == 7).all() and (big[25:] == 7).all() and not (big[5:25] == 7).any()


@pytest.mark.parametrize("change,match", [
    ("bf16 cache", "torch.float32 CPU tensor"),
    ("head dim 60", "multiple of 8"),
    ("page out of range", r"page ids must lie in \[0, "),
    ("short page table", "at least 3 page ids"),
    ("int32 pages", "int64"),
    ("page size 12", "power of two"),
    ("5 over 2 heads", "do not group"),
    ("no new tokens", "at least one new token"),
])
def test_bad_arguments_are_named(change: str, match: str) -> None:
    kv, q = _case(10, 30, 9, 3, 64, 16)
    with pytest.raises(ValueError, match=match):
        flash_extend(*broken_extend_args(kv, q, change), 10, 0.125, 1)


def test_cpu_backend_extend_runs_it_in_fp32_and_matches_sdpa(monkeypatch) -> None:
    """A batch of three (fresh, cached prefix, nothing new): the kernel's path beside torch's SDPA."""
    fast, sdpa = CpuAttentionBackend(), CpuAttentionBackend(native_kernels=False)
    assert fast.native_extend_f32 and not sdpa.native_extend_f32
    kv = build_paged_kv([7, 13, 2], 3, 64, 4, torch.float32, torch.device("cpu"), seed=4)
    k, v, table = kv.for_ref()
    prefix, extend = torch.tensor([0, 5, 2]), torch.tensor([7, 8, 0])
    q = torch.randn(15, 9, 64, generator=torch.Generator().manual_seed(5))
    calls = []
    real = backend_module.flash_extend
    monkeypatch.setattr(backend_module, "flash_extend", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    out = fast.extend(q, k, v, table, prefix, extend, 0.125)
    assert calls == [(7, 9, 64), (8, 9, 64)]  # one call per request with new tokens
    torch.testing.assert_close(out, sdpa.extend(q, k, v, table, prefix, extend, 0.125), **F32)
