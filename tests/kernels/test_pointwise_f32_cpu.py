"""pdbox's fp32 pointwise kernels (kernels/cpu/pointwise_f32.c, AVX2) against the torch references and
the CPU backend's torch path, and the backend's use of them in an fp32 model."""

from __future__ import annotations

import pytest
import torch

from appliance.engine.attention_cpu import CpuAttentionBackend
from kernels.activation import silu_and_mul_ref
from kernels.cpu.pointwise import add_rmsnorm, native, rotary, silu_and_mul, store_kv
from kernels.kv_store import store_kv_ref
from kernels.norm import fused_add_rmsnorm_ref, rmsnorm_ref
from kernels.rotary import rotary_cos_sin_cache

BUILT = native(torch.float32)
pytestmark = pytest.mark.skipif(BUILT.lib is None, reason=f"fp32 pointwise kernels unavailable: {BUILT.reason}")
F32 = {"atol": 1e-5, "rtol": 1e-5}


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("threads", [1, 2])
def test_add_rmsnorm_equals_reference(rows: int, threads: int) -> None:
    x = torch.randn(rows, 576 + 64, generator=_g(1))[:, :576]  # strided rows, like a view
    residual = torch.randn(rows, 576, generator=_g(2)) * 3
    weight = torch.rand(576, generator=_g(3)) + 0.5
    out, new_residual = add_rmsnorm(x, residual, weight, 1e-5, threads)
    ref_out, ref_residual = fused_add_rmsnorm_ref(x, residual.clone(), weight, 1e-5)
    assert out.dtype == torch.float32 and torch.equal(new_residual, x + residual)  # the add is exact, as torch's
    torch.testing.assert_close(out, ref_out, **F32)
    alone, same = add_rmsnorm(None, residual, weight, 1e-5, threads, torch.float32)
    assert alone.dtype == torch.float32 and torch.equal(same, residual)
    torch.testing.assert_close(alone, rmsnorm_ref(residual, weight, 1e-5), **F32)


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_silu_and_mul_equals_reference(rows: int) -> None:
    x = torch.randn(rows, 2 * 1536, generator=_g(4)) * 4
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # far tails and zeros
    out = silu_and_mul(x, 2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, silu_and_mul_ref(x), **F32)


@pytest.mark.parametrize("rows", [1, 7, 33])
def test_rotary_is_bit_equal_to_the_torch_path(rows: int) -> None:
    cache = rotary_cos_sin_cache(64, 4096, 10000.0)
    qkv = torch.randn(rows, 15, 64, generator=_g(5))
    q, k = qkv[:, :9], qkv[:, 9:12]
    positions = torch.randint(0, 4096, (rows,), generator=_g(6))
    torch_q, torch_k = CpuAttentionBackend(native_kernels=False).rotary(q, k, positions, cache)
    out = rotary(qkv[:, :12], positions, cache, 2)
    assert torch.equal(out[:, :9], torch_q) and torch.equal(out[:, 9:], torch_k)


def test_store_kv_writes_the_slots_the_reference_writes() -> None:
    g = _g(11)
    caches = [torch.randn(6, 4, 3, 64, generator=g) for _ in range(2)]
    qkv = torch.randn(5, 15, 64, generator=g)
    k, v = qkv[:, 9:12], qkv[:, 12:15]
    slots = torch.tensor([23, 0, 7, 8, 12])
    ref = [c.clone() for c in caches]
    store_kv_ref(*ref, k, v, slots)
    store_kv(*caches, k, v, slots)
    assert torch.equal(caches[0], ref[0]) and torch.equal(caches[1], ref[1])
    with pytest.raises(ValueError, match="outside the caches' 24 slots"):
        store_kv(*caches, k, v, torch.tensor([1, 2, 24, 3, 4]))
    assert torch.equal(caches[0], ref[0])  # nothing written
    with pytest.raises(ValueError, match="k must be torch.float32"):
        store_kv(*caches, k.to(torch.bfloat16), v, slots)


def test_the_backend_uses_them_for_fp32_rows() -> None:
    fast, slow = CpuAttentionBackend(), CpuAttentionBackend(native_kernels=False)
    assert fast.native_pointwise_f32 and not slow.native_pointwise_f32
    x, residual = torch.randn(4, 576, generator=_g(7)), torch.randn(4, 576, generator=_g(8))
    weight = torch.rand(576, generator=_g(9)) + 0.5
    h, r = fast.fused_add_rmsnorm(x, residual, weight, 1e-5)
    h_torch, r_torch = slow.fused_add_rmsnorm(x, residual, weight, 1e-5)
    assert torch.equal(r, r_torch)
    torch.testing.assert_close(h, h_torch, **F32)
    torch.testing.assert_close(fast.rmsnorm(residual, weight, 1e-5), slow.rmsnorm(residual, weight, 1e-5), **F32)
    gu = torch.randn(3, 3072, generator=_g(10))
    torch.testing.assert_close(fast.silu_and_mul(gu), slow.silu_and_mul(gu), **F32)


def test_the_engine_answers_as_the_torch_path_does(tiny_model) -> None:
    """A whole fp32 engine with these kernels: the same greedy tokens as without them."""
    from tests.engine.greedy import tiny_greedy

    assert tiny_greedy(str(tiny_model), "cpu", 4, 6) == tiny_greedy(str(tiny_model), "torch", 4, 6)
