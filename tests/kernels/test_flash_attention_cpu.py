"""pdbox's C attention kernels (kernels/cpu/flash_attention.c: prefill and decode) against the torch
references, their argument checks, their build, and the CPU backend's use of them."""

from __future__ import annotations

import pytest
import torch

from appliance.engine.attention_cpu import CpuAttentionBackend
from kernels.cpu import build
from kernels.cpu.flash_decode import DecodeTable, decode_table, flash_decode
from kernels.cpu.flash_extend import flash_extend, native
from kernels.decode_attention import decode_attention_ref
from tests.kernels.conftest import broken_extend_args, build_paged_kv, extend_case, extend_reference

BUILT = native()
needs_kernel = pytest.mark.skipif(BUILT.lib is None, reason=f"native attention unavailable: {BUILT.reason}")
BF16 = {"atol": 3e-2, "rtol": 3e-2}


def _case(prefix: int, n_new: int, hq: int, hkv: int, d: int, page_size: int, seed: int = 0):
    return extend_case(prefix, n_new, hq, hkv, d, page_size, torch.bfloat16, seed)


@needs_kernel
@pytest.mark.parametrize("prefix,n_new,hq,hkv,d,page_size", [
    (0, 1, 9, 3, 64, 16),
    (0, 31, 9, 3, 64, 16),
    (0, 33, 4, 4, 64, 4),
    (5, 64, 8, 1, 64, 16),
    (70, 100, 9, 3, 64, 8),  # a key block cut by the diagonal and by the end of the context
    (130, 1, 6, 2, 128, 16),  # one new token after a long prefix (a chunk's last token)
    (3, 77, 2, 1, 32, 1),
    (0, 200, 9, 3, 64, 64),
])
@pytest.mark.parametrize("threads", [1, 2])
def test_equals_reference(prefix, n_new, hq, hkv, d, page_size, threads) -> None:
    kv, q = _case(prefix, n_new, hq, hkv, d, page_size)
    scale = d ** -0.5
    out = flash_extend(q, kv.k_cache, kv.v_cache, kv.page_table[0].long(), prefix, scale, threads)
    assert not out.isnan().any()  # every cache row outside the request is NaN: none was read
    torch.testing.assert_close(out.float(), extend_reference(kv, q, prefix, scale), **BF16)


@needs_kernel
def test_thread_count_does_not_change_a_bit() -> None:
    """Each (tile, head) is computed whole by one thread, so the schedule cannot reorder a sum."""
    kv, q = _case(40, 150, 9, 3, 64, 16, seed=3)
    pages = kv.page_table[0].long()
    one = flash_extend(q, kv.k_cache, kv.v_cache, pages, 40, 0.125, 1)
    for threads in (2, 3, 8):
        assert torch.equal(one, flash_extend(q, kv.k_cache, kv.v_cache, pages, 40, 0.125, threads))


@needs_kernel
def test_writes_into_out_rows_only() -> None:
    kv, q = _case(0, 20, 9, 3, 64, 16)
    big = torch.full((30, 9, 64), 7.0, dtype=torch.bfloat16)
    flash_extend(q, kv.k_cache, kv.v_cache, kv.page_table[0].long(), 0, 0.125, 2, out=big[5:25])
    assert (big[:5] == 7).all() and (big[25:] == 7).all() and not (big[5:25] == 7).all()


@needs_kernel
@pytest.mark.parametrize("change,match", [
    ("fp32 q", "bfloat16"),
    ("head dim 48", "multiple of 32"),
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


def test_unbuildable_machine_gives_a_reason(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PDBOX_CACHE_DIR", str(tmp_path))
    lacking = build.load.__wrapped__("flash_attention", needs=("avx512_bf16", "no_such_flag"))
    assert lacking.lib is None and "this CPU lacks " in lacking.reason and lacking.reason.endswith("no_such_flag")
    monkeypatch.setenv("CC", "pdbox-no-such-cc")
    no_cc = build.load.__wrapped__("flash_attention")
    assert no_cc.lib is None and ("no C compiler" in no_cc.reason or "lacks" in no_cc.reason)
    assert list(tmp_path.iterdir()) == []


@needs_kernel
def test_builds_into_the_cache_dir_once(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PDBOX_CACHE_DIR", str(tmp_path))
    first = build.load.__wrapped__("flash_attention")
    assert first.lib is not None and first.path is not None and first.path.parent == tmp_path
    stamp = first.path.stat().st_mtime_ns
    again = build.load.__wrapped__("flash_attention")
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no temporary file left behind


@needs_kernel
def test_cpu_backend_extend_runs_it_in_bf16_and_matches_sdpa() -> None:
    """A batch of three (fresh, cached prefix, nothing new): the native path beside torch's SDPA."""
    fast, sdpa = CpuAttentionBackend(), CpuAttentionBackend(native_kernels=False)
    assert fast.native_attention and not sdpa.native_attention and sdpa.native_reason == "off"
    kv = build_paged_kv([7, 13, 2], 3, 64, 4, torch.bfloat16, torch.device("cpu"), seed=4)
    k, v, table = kv.for_ref()
    prefix, extend = torch.tensor([0, 5, 2]), torch.tensor([7, 8, 0])
    q = torch.randn(15, 9, 64, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    out = fast.extend(q, k, v, table, prefix, extend, 0.125)
    torch.testing.assert_close(out.float(), sdpa.extend(q, k, v, table, prefix, extend, 0.125).float(), **BF16)


# -- decode ---------------------------------------------------------------------------------------------


def _decode_case(lens: list[int], hq: int, hkv: int, d: int, page_size: int, seed: int = 0):
    kv = build_paged_kv(lens, hkv, d, page_size, torch.bfloat16, torch.device("cpu"), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(lens), hq + 2 * hkv, d, generator=g).to(torch.bfloat16)[:, :hq]  # a QKV row's view
    return kv, q


@needs_kernel
@pytest.mark.parametrize("lens,hq,hkv,d,page_size", [
    ([1], 9, 3, 64, 16),
    ([5, 70, 130], 9, 3, 64, 16),  # blocks of 64 keys cut short, a page cut short
    ([33, 200], 8, 2, 128, 8),
    ([64, 64, 65], 16, 1, 64, 4),  # a group of 16 query heads: the kernel's widest
    ([300, 17, 1, 129], 32, 8, 64, 1),
    ([90], 6, 6, 256, 32),  # no grouping, the widest head
])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_equals_reference(lens, hq, hkv, d, page_size, threads) -> None:
    kv, q = _decode_case(lens, hq, hkv, d, page_size)
    plan = decode_table(kv.page_table, kv.lens, kv.k_cache.shape[0], page_size)
    out = flash_decode(q, kv.k_cache, kv.v_cache, plan, d ** -0.5, threads)
    assert not out.isnan().any()  # rows outside every request are NaN: none was read
    k, v, table = kv.for_ref()
    ref = decode_attention_ref(q.float(), k.float(), v.float(), table, kv.lens, d ** -0.5)
    torch.testing.assert_close(out.float(), ref, **BF16)


@needs_kernel
def test_decode_thread_count_does_not_change_a_bit() -> None:
    kv, q = _decode_case([40, 300, 7, 129, 64], 9, 3, 64, 16, seed=2)
    plan = decode_table(kv.page_table, kv.lens, kv.k_cache.shape[0], 16)
    one = flash_decode(q, kv.k_cache, kv.v_cache, plan, 0.125, 1)
    for threads in (2, 3, 16):
        assert torch.equal(one, flash_decode(q, kv.k_cache, kv.v_cache, plan, 0.125, threads))


@pytest.mark.parametrize("change,match", [
    ("a page out of range", r"page ids must lie in \[0, "),
    ("a zero length", "at least one cached row"),
    ("a table too narrow", "needs 3 pages; the table has 2"),
    ("page size 12", "power of two"),
])
def test_decode_table_names_a_bad_table(change: str, match: str) -> None:
    table = torch.tensor([[4, 1, 2], [0, 3, -1]], dtype=torch.int32)
    lens, num_pages, page_size = torch.tensor([40, 20]), 5, 16
    if change == "a page out of range":
        table[1, 1] = 5
    elif change == "a zero length":
        lens = torch.tensor([40, 0])
    elif change == "a table too narrow":
        table = table[:, :2]
    elif change == "page size 12":
        page_size = 12
    with pytest.raises(ValueError, match=match):
        decode_table(table, lens, num_pages, page_size)


@needs_kernel
@pytest.mark.parametrize("change,match", [
    ("fp32 q", "bfloat16"),
    ("head dim 32", "multiple of 64"),
    ("17 heads a group", "at most 16"),
    ("another cache", "checked for 2 requests over"),
])
def test_decode_names_bad_arguments(change: str, match: str) -> None:
    kv, q = _decode_case([40, 20], 9, 3, 64, 16)
    k, v = kv.k_cache, kv.v_cache
    plan = decode_table(kv.page_table, kv.lens, k.shape[0], 16)
    if change == "fp32 q":
        q = q.float()
    elif change == "head dim 32":
        q, k, v = q[..., :32], k[..., :32].contiguous(), v[..., :32].contiguous()
    elif change == "17 heads a group":
        q, k, v = torch.zeros(2, 17, 64, dtype=torch.bfloat16), k[:, :, :1].contiguous(), v[:, :, :1].contiguous()
    elif change == "another cache":
        k, v = torch.cat([k, k]), torch.cat([v, v])
    with pytest.raises(ValueError, match=match):
        flash_decode(q, k, v, plan, 0.125, 1)


@needs_kernel
def test_cpu_backend_decode_runs_it_in_bf16_and_matches_the_torch_path() -> None:
    fast, torch_path = CpuAttentionBackend(), CpuAttentionBackend(native_kernels=False)
    kv, q = _decode_case([5, 70, 130, 1], 9, 3, 64, 16, seed=6)
    k, v, table = kv.for_ref()
    out = fast.decode(q, k, v, table, kv.lens, 0.125)
    assert isinstance(fast._way, DecodeTable)
    torch.testing.assert_close(out.float(), torch_path.decode(q, k, v, table, kv.lens, 0.125).float(), **BF16)
