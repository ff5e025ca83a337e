"""pdbox's C pointwise kernels (kernels/cpu/pointwise.c) against the torch references and the CPU
backend's torch path, their argument checks, and the backend's use of them."""

from __future__ import annotations

import pytest
import torch

from appliance.engine.attention_cpu import CpuAttentionBackend
from kernels.activation import silu_and_mul_ref
from kernels.cpu.pointwise import add_rmsnorm, native, rotary, silu_and_mul, store_kv
from kernels.kv_store import store_kv_ref
from kernels.norm import fused_add_rmsnorm_ref, rmsnorm_ref
from kernels.rotary import rotary_cos_sin_cache

BUILT = native()
pytestmark = pytest.mark.skipif(BUILT.lib is None, reason=f"native pointwise kernels unavailable: {BUILT.reason}")
BF16 = {"atol": 2e-2, "rtol": 2e-2}


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("threads", [1, 2])
def test_add_rmsnorm_equals_reference(rows: int, threads: int) -> None:
    x = torch.randn(rows, 576 + 64, generator=_g(1)).to(torch.bfloat16)[:, :576]  # strided rows, like a view
    residual = torch.randn(rows, 576, generator=_g(2)) * 3
    weight = torch.rand(576, generator=_g(3)) + 0.5
    out, new_residual = add_rmsnorm(x, residual, weight, 1e-5, threads)
    ref_out, ref_residual = fused_add_rmsnorm_ref(x.float(), residual.clone(), weight, 1e-5)
    assert out.dtype == torch.bfloat16 and new_residual.dtype == torch.float32
    assert torch.equal(new_residual, x.float() + residual)  # the add is exact fp32, as torch's
    torch.testing.assert_close(out.float(), ref_out, **BF16)
    torch.testing.assert_close(new_residual, ref_residual)
    alone, same = add_rmsnorm(None, residual, weight, 1e-5, threads)
    assert torch.equal(same, residual)
    torch.testing.assert_close(alone.float(), rmsnorm_ref(residual, weight, 1e-5), **BF16)


@pytest.mark.parametrize("rows", [1, 5, 64])
@pytest.mark.parametrize("threads", [1, 2])
def test_silu_and_mul_equals_reference(rows: int, threads: int) -> None:
    x = (torch.randn(rows, 2 * 1536, generator=_g(4)) * 4).to(torch.bfloat16)
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # far tails and zeros
    out = silu_and_mul(x, threads)
    torch.testing.assert_close(out.float(), silu_and_mul_ref(x.float()), **BF16)


@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("threads", [1, 2])
def test_rotary_is_bit_equal_to_the_torch_path(rows: int, threads: int) -> None:
    """The same products and sums as the backend's torch rotary (separate multiply and add), so the same bits."""
    cache = rotary_cos_sin_cache(64, 4096, 10000.0)
    qkv = torch.randn(rows, 15, 64, generator=_g(5)).to(torch.bfloat16)
    q, k = qkv[:, :9], qkv[:, 9:12]
    positions = torch.randint(0, 4096, (rows,), generator=_g(6))
    torch_q, torch_k = CpuAttentionBackend(native_kernels=False).rotary(q, k, positions, cache)
    out = rotary(qkv[:, :12], positions, cache, threads)
    assert torch.equal(out[:, :9], torch_q) and torch.equal(out[:, 9:], torch_k)


def test_backend_uses_them_in_bf16() -> None:
    fast, slow = CpuAttentionBackend(), CpuAttentionBackend(native_kernels=False)
    assert fast.native_pointwise and not slow.native_pointwise
    x = torch.randn(4, 576, generator=_g(7)).to(torch.bfloat16)
    residual, weight = torch.randn(4, 576, generator=_g(8)), torch.rand(576, generator=_g(9)) + 0.5
    h, r = fast.fused_add_rmsnorm(x, residual, weight, 1e-5)
    h_torch, r_torch = slow.fused_add_rmsnorm(x, residual, weight, 1e-5)
    assert h.dtype == torch.bfloat16 and h_torch.dtype == torch.float32  # bf16 goes straight to the next linear
    assert torch.equal(r, r_torch)
    torch.testing.assert_close(h.float(), h_torch, **BF16)
    h32, _ = fast.fused_add_rmsnorm(x.float(), residual, weight, 1e-5)  # fp32 model: fp32 rows (pointwise_f32)
    assert h32.dtype == torch.float32
    torch.testing.assert_close(h32, slow.fused_add_rmsnorm(x.float(), residual, weight, 1e-5)[0])
    gu = torch.randn(3, 3072, generator=_g(10)).to(torch.bfloat16)
    torch.testing.assert_close(fast.silu_and_mul(gu).float(), slow.silu_and_mul(gu).float(), **BF16)


@pytest.mark.parametrize("call,match", [
    ("norm fp16 x", "bfloat16"),
    ("norm rows differ", "x has 2 rows, residual 3"),
    ("norm odd width", "multiple of 16"),
    ("silu odd width", "multiple of 16"),
    ("rotary position past the cache", r"positions must lie in \[0, 16\)"),
    ("rotary int32 positions", "int64"),
    ("rotary fp16 x", "bf16 or fp32 CPU tensor"),
])
def test_bad_arguments_are_named(call: str, match: str) -> None:
    bf = torch.bfloat16
    with pytest.raises(ValueError, match=match):
        if call == "norm fp16 x":
            add_rmsnorm(torch.zeros(3, 32, dtype=torch.float16), torch.zeros(3, 32), torch.ones(32), 1e-5)
        elif call == "norm rows differ":
            add_rmsnorm(torch.zeros(2, 32, dtype=bf), torch.zeros(3, 32), torch.ones(32), 1e-5)
        elif call == "norm odd width":
            add_rmsnorm(torch.zeros(3, 40, dtype=bf), torch.zeros(3, 40), torch.ones(40), 1e-5)
        elif call == "silu odd width":
            silu_and_mul(torch.zeros(3, 40, dtype=bf))
        elif call == "rotary position past the cache":
            rotary(torch.zeros(2, 3, 64, dtype=bf), torch.tensor([0, 16]), rotary_cos_sin_cache(64, 16, 1e4))
        elif call == "rotary int32 positions":
            rotary(torch.zeros(2, 3, 64, dtype=bf), torch.tensor([0, 1], dtype=torch.int32),
                   rotary_cos_sin_cache(64, 16, 1e4))
        elif call == "rotary fp16 x":
            rotary(torch.zeros(2, 3, 64, dtype=torch.float16), torch.tensor([0, 1]), rotary_cos_sin_cache(64, 16, 1e4))


def test_store_kv_writes_the_slots_the_reference_writes() -> None:
    g = _g(11)
    caches = [torch.randn(6, 4, 3, 64, generator=g).to(torch.bfloat16) for _ in range(2)]
    qkv = torch.randn(5, 15, 64, generator=g).to(torch.bfloat16)
    k, v = qkv[:, 9:12], qkv[:, 12:15]  # strided rows, as the engine passes them
    slots = torch.tensor([23, 0, 7, 8, 12])
    ref = [c.clone() for c in caches]
    store_kv_ref(*ref, k, v, slots)
    store_kv(*caches, k, v, slots)
    assert torch.equal(caches[0], ref[0]) and torch.equal(caches[1], ref[1])
    with pytest.raises(ValueError, match="outside the caches' 24 slots"):
        store_kv(*caches, k, v, torch.tensor([1, 2, 24, 3, 4]))
    assert torch.equal(caches[0], ref[0])  # nothing written
