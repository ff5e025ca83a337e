"""The wrappers refuse bad inputs with a ValueError that names the problem, before any launch."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels._triton import LazyKernel, interpreter_enabled


def _attn(device, dtype=torch.float32):
    q = torch.zeros(2, 4, 16, dtype=dtype, device=device)
    cache = torch.zeros(3, 4, 2, 16, dtype=dtype, device=device)
    table = torch.zeros(2, 3, dtype=torch.int32, device=device)
    lens = torch.ones(2, dtype=torch.int32, device=device)
    return q, cache, table, lens


def test_kernels_import_and_fixed_configs_under_the_interpreter():
    from kernels.decode_attention import _decode_partial

    assert isinstance(_decode_partial, LazyKernel)
    if interpreter_enabled():
        assert not _decode_partial.autotuned, "the interpreter has no driver to autotune with"


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        kernels.rmsnorm(torch.zeros(2, 8), torch.ones(8), 1e-6)


def test_mixed_devices(device):
    with pytest.raises(ValueError, match="weight is on meta"):
        kernels.rmsnorm(torch.zeros(2, 8, device=device), torch.ones(8, device="meta"), 1e-6)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda q, c, t, s: (q.int(), c, t, s), "q must be one of"),
        (lambda q, c, t, s: (q, c.half(), t, s), "v_cache dtype"),
        (lambda q, c, t, s: (q[:, :3], c, t, s), "multiple of kv_heads"),
        (lambda q, c, t, s: (q[..., :8], c, t, s), "head_dim"),
        (lambda q, c, t, s: (q, c, t.float(), s), "page_table must be int32 or int64"),
        (lambda q, c, t, s: (q, c, t[:1], s), "seq_lens has 2 entries but page_table has 1"),
        (lambda q, c, t, s: (q, c, t, s[:1]), "seq_lens has 1 entries"),
        (lambda q, c, t, s: (torch.zeros(2, 4, 32, device=q.device)[..., ::2], c, t, s), "unit-stride last dim"),
        (lambda q, c, t, s: (q, c[0], t, s), "k_cache must be"),
    ],
)
def test_decode_attention(device, mutate, match):
    q, cache, table, lens = _attn(device)
    q, cache_k, table, lens = mutate(q, cache, table, lens)
    with pytest.raises(ValueError, match=match):
        kernels.decode_attention(q, cache_k, cache, table, lens, 1.0)


def test_decode_attention_num_splits(device):
    q, cache, table, lens = _attn(device)
    with pytest.raises(ValueError, match="num_splits"):
        kernels.decode_attention(q, cache, cache, table, lens, 1.0, num_splits=0)


def test_extend_attention(device):
    q, cache, table, lens = _attn(device)
    with pytest.raises(ValueError, match="sum to 2 but q has 3"):
        kernels.extend_attention(q[:1].repeat(3, 1, 1), cache, cache, table, lens, lens, 1.0)
    with pytest.raises(ValueError, match="prefix_lens"):
        kernels.extend_attention(q, cache, cache, table, lens[:1], lens, 1.0)


def test_store_kv(device):
    cache = torch.zeros(3, 4, 2, 16, device=device)
    k = torch.zeros(2, 2, 16, device=device)
    slots = torch.zeros(2, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="k must be"):
        kernels.store_kv(cache, cache.clone(), k[:, :1], k, slots)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.store_kv(cache.transpose(0, 1), cache.clone().transpose(0, 1), k, k, slots)
    with pytest.raises(ValueError, match="slot_mapping must be int32 or int64"):
        kernels.store_kv(cache, cache.clone(), k, k, slots.float())
    with pytest.raises(ValueError, match="slot_mapping has 1 entries"):
        kernels.store_kv(cache, cache.clone(), k, k, slots[:1])


def test_copy_pages(device):
    src = torch.zeros(3, 4, 8, device=device)
    idx = torch.zeros(2, dtype=torch.int64, device=device)
    bases = torch.tensor([src.data_ptr()], device=device)
    with pytest.raises(ValueError, match="dst_base_ptrs must be a contiguous 1-D int64"):
        kernels.copy_pages(src, bases.int(), idx, idx, idx)
    with pytest.raises(ValueError, match="dst_pages must be contiguous with 2 entries"):
        kernels.copy_pages(src, bases, idx, idx, idx[:1])
    with pytest.raises(ValueError, match="src pages must be contiguous"):
        kernels.copy_pages(src.transpose(1, 2), bases, idx, idx, idx)
    with pytest.raises(ValueError, match="src must be"):
        kernels.copy_pages(src[:, 0, 0], bases, idx, idx, idx)
    if device.type == "cpu":
        with pytest.raises(ValueError, match="null or not 16-byte aligned"):  # 16-byte pages: 16-byte stores
            kernels.copy_pages(src, torch.tensor([src.data_ptr() + 8]), idx, idx, idx)
        odd = torch.zeros(3, 3, device=device)  # 12-byte pages: 4-byte words, stored one by one
        with pytest.raises(ValueError, match="null or not 4-byte aligned"):
            kernels.copy_pages(odd, torch.tensor([odd.data_ptr() + 2]), idx, idx, idx)


def test_norms_rotary_activation(device):
    x = torch.zeros(2, 8, device=device)
    with pytest.raises(ValueError, match="weight must be"):
        kernels.rmsnorm(x, torch.ones(4, device=device), 1e-6)
    with pytest.raises(ValueError, match="x must be one of"):
        kernels.rmsnorm(x.int(), torch.ones(8, device=device), 1e-6)
    with pytest.raises(ValueError, match="residual shape"):
        kernels.fused_add_rmsnorm(x, x[:1], torch.ones(8, device=device), 1e-6)
    q = torch.zeros(3, 4, 8, device=device)
    cache = torch.zeros(16, 8, device=device)
    pos = torch.zeros(3, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="even head_dim"):
        kernels.rotary(q[..., :7], q[..., :7], pos, cache)
    with pytest.raises(ValueError, match="positions must be contiguous with 3"):
        kernels.rotary(q, q, pos[:2], cache)
    with pytest.raises(ValueError, match="cos_sin_cache must be"):
        kernels.rotary(q, q, pos, cache[:, :4])
    with pytest.raises(ValueError, match="even last dim"):
        kernels.silu_and_mul(torch.zeros(2, 7, device=device))
    with pytest.raises(ValueError, match="x must be one of"):
        kernels.silu_and_mul(torch.zeros(2, 8, dtype=torch.int32, device=device))
