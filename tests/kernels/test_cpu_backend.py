"""The ``cpu`` backend computes the same functions as the references (the ``torch`` backend)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from appliance.engine.attention import TorchAttentionBackend
from appliance.engine.attention_cpu import (
    EXACT_ROWS,
    INT4_MAX_ROWS,
    QUANT_MAX_ROWS,
    CpuAttentionBackend,
    PackedWeight,
    int4_available,
    onednn_available,
    onednn_bf16_available,
    onednn_rows,
)
from appliance.engine.backends import create_backend
from appliance.engine.dtype import default_dtype
from kernels.cpu.quant_gemv import native as native_quant
from kernels.cpu.quant_gemv import quant_linear
from tests.engine.greedy import tiny_greedy

TOL = {"atol": 2e-5, "rtol": 2e-5}


def paged(num_pages: int, page_size: int, kv_heads: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (num_pages, page_size, kv_heads, dim)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_auto_picks_cpu_backend_on_cpu() -> None:
    assert create_backend("auto", torch.device("cpu")).name == "cpu"
    assert create_backend("torch", torch.device("cpu")).name == "torch"


@pytest.mark.parametrize("kv_heads,q_heads", [(3, 9), (1, 4), (2, 2), (8, 16)])
def test_decode_equals_reference_over_mixed_lengths(kv_heads: int, q_heads: int) -> None:
    """Contexts of 1..40 tokens fall into several length groups; an empty slot yields zeros."""
    be, ref = CpuAttentionBackend(), TorchAttentionBackend()
    page_size, dim = 4, 16
    k_cache, v_cache = paged(64, page_size, kv_heads, dim, seed=1)
    lens = [1, 5, 40, 17, 0, 9]
    table = torch.tensor([[(b * 11 + j) % 64 for j in range(10)] for b in range(len(lens))], dtype=torch.int32)
    seq_lens = torch.tensor(lens)
    q = torch.randn(len(lens), q_heads, dim, generator=torch.Generator().manual_seed(2))
    for _ in range(2):  # the second call reuses the per-forward plan and masks
        out = be.decode(q, k_cache, v_cache, table, seq_lens, 0.3)
    torch.testing.assert_close(out, ref.decode(q, k_cache, v_cache, table, seq_lens, 0.3), **TOL)
    assert torch.count_nonzero(out[4]) == 0


def test_decode_single_group_returns_every_row() -> None:
    be, ref = CpuAttentionBackend(), TorchAttentionBackend()
    k_cache, v_cache = paged(16, 4, 3, 8, seed=3)
    table = torch.tensor([[5, 2, 9], [1, 0, 7]], dtype=torch.int32)
    seq_lens = torch.tensor([10, 11])
    q = torch.randn(2, 9, 8)
    torch.testing.assert_close(be.decode(q, k_cache, v_cache, table, seq_lens, 0.5),
                               ref.decode(q, k_cache, v_cache, table, seq_lens, 0.5), **TOL)


def test_extend_with_cached_prefix_equals_reference() -> None:
    """Three requests: one fresh, one with a 5-token cached prefix, one with nothing new."""
    be, ref = CpuAttentionBackend(), TorchAttentionBackend()
    k_cache, v_cache = paged(32, 4, 3, 16, seed=4)
    table = torch.tensor([[0, 1, 2, 3], [9, 4, 11, 12], [20, 0, 0, 0]], dtype=torch.int32)
    prefix, extend = torch.tensor([0, 5, 2]), torch.tensor([7, 8, 0])
    q = torch.randn(15, 9, 16, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(be.extend(q, k_cache, v_cache, table, prefix, extend, 0.25),
                               ref.extend(q, k_cache, v_cache, table, prefix, extend, 0.25), **TOL)


def test_norms_rotary_activation_equal_reference() -> None:
    be, ref = CpuAttentionBackend(), TorchAttentionBackend()
    g = torch.Generator().manual_seed(6)
    x, res, w = torch.randn(5, 64, generator=g), torch.randn(5, 64, generator=g), torch.rand(64, generator=g)
    torch.testing.assert_close(be.rmsnorm(x, w, 1e-5), ref.rmsnorm(x, w, 1e-5), **TOL)
    for got, want in zip(be.fused_add_rmsnorm(x, res, w, 1e-5), ref.fused_add_rmsnorm(x, res, w, 1e-5)):
        torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(be.silu_and_mul(torch.cat([x, res], -1)), ref.silu_and_mul(torch.cat([x, res], -1)))

    from kernels.rotary import rotary_cos_sin_cache

    cache = rotary_cos_sin_cache(16, 64, 10000.0)
    qkv = torch.randn(5, (4 + 2 + 2) * 16, generator=g)
    q, k, _ = qkv.split([64, 32, 32], dim=-1)
    q, k = q.view(5, 4, 16), k.view(5, 2, 16)
    pos = torch.tensor([0, 3, 9, 10, 63])
    want = ref.rotary(q, k, pos, cache)
    for got in (be.rotary(q, k, pos, cache), be.rotary(q.clone(), k.clone(), pos, cache)):  # adjacent, then apart
        torch.testing.assert_close(got[0], want[0], **TOL)
        torch.testing.assert_close(got[1], want[1], **TOL)


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_joins_q_and_k_at_one_row_and_rotates_each_half_bit_for_bit(rows: int, dtype: torch.dtype) -> None:
    from appliance.engine.attention_cpu import _joined
    from kernels.rotary import rotary_cos_sin_cache

    be = CpuAttentionBackend()
    cache = rotary_cos_sin_cache(16, 64, 10000.0)
    qkv = torch.randn(rows, (4 + 2 + 2) * 16, generator=torch.Generator().manual_seed(7)).to(dtype)
    q, k, _ = qkv.split([64, 32, 32], dim=-1)
    q, k = q.view(rows, 4, 16), k.view(rows, 2, 16)
    assert _joined(q, k) is not None  # a decode step's single row takes the one-call path too
    assert _joined(q.clone(), k.clone()) is None
    pos = torch.arange(rows) * 5 + 3
    cos, sin = cache.index_select(0, pos).unsqueeze(1).float().chunk(2, dim=-1)
    for x, got in zip((q, k), be.rotary(q, k, pos, cache)):  # each half rotated on its own, fp32 math
        x1, x2 = x.float().chunk(2, dim=-1)
        want = torch.cat([(x1 * cos).addcmul_(x2, sin, value=-1.0), (x2 * cos).addcmul_(x1, sin)], -1).to(dtype)
        assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_rows_go_in_padded_and_come_out_unpadded(dtype: torch.dtype) -> None:
    from appliance.engine.attention_cpu import PAD_MAX_ROWS, PADDED_ROWS

    be = CpuAttentionBackend()
    g = torch.Generator().manual_seed(8)
    w = torch.randn(96, 64, generator=g).to(dtype)
    packed = be.pack_linear(w)
    x = torch.randn(PADDED_ROWS + 1, 64, generator=g).to(dtype)
    full = be.linear(x, packed)
    for rows in range(PAD_MAX_ROWS + 1, 0, -1):  # fewer rows after more: stale pad rows must not leak in
        got = be.linear(x[:rows], packed)
        assert got.shape == (rows, 96) and got.dtype == dtype
        torch.testing.assert_close(got, full[:rows], rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2)
    assert be.linear(x[1:2], packed).shape == (1, 96)


@pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN")
def test_padded_rows_work_inside_and_outside_inference_mode() -> None:
    be = CpuAttentionBackend()
    packed = be.pack_linear(torch.randn(32, 16))
    with torch.inference_mode():  # the forward pass makes the pad buffer ...
        hidden = be.linear(torch.randn(1, 16), packed)
    out = be.linear(torch.randn(1, 16), packed)  # ... and the head's linear runs outside inference mode
    assert out.shape == hidden.shape == (1, 32)
    with torch.inference_mode():
        assert be.linear(torch.randn(2, 16), packed).shape == (2, 32)


@pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN")
@pytest.mark.parametrize("rows", [1, 3, 16, 300])
def test_packed_linear_equals_f_linear(rows: int) -> None:
    be = CpuAttentionBackend()
    g = torch.Generator().manual_seed(7)
    w, b = torch.randn(96, 40, generator=g), torch.randn(96, generator=g)
    packed = be.pack_linear(w)
    assert isinstance(packed, PackedWeight) and packed.shape == (96, 40)
    x = torch.randn(rows, 40, generator=g)
    torch.testing.assert_close(be.linear(x, packed), x @ w.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(be.linear(x, packed, b), x @ w.T + b, atol=1e-4, rtol=1e-4)


def test_unpacked_weights_when_packing_is_off() -> None:
    be = CpuAttentionBackend(pack_weights=False)
    w = torch.randn(8, 4)
    assert be.pack_linear(w) is w
    x = torch.randn(2, 4)
    torch.testing.assert_close(be.linear(x, w), x @ w.T)


def test_default_dtype_follows_the_hardware() -> None:
    assert default_dtype("cuda") == "bfloat16"
    assert default_dtype("cuda:3", frozenset()) == "bfloat16"
    assert default_dtype("cpu", frozenset({"avx2", "fma"})) == "float32"
    assert default_dtype("cpu", frozenset({"avx2", "avx512f", "avx512_bf16"})) == "bfloat16"
    assert default_dtype("cpu", frozenset({"amx_bf16"})) == "bfloat16"


def test_engine_config_resolves_auto_dtype() -> None:
    from appliance.config import EngineConfig

    assert EngineConfig().dtype == default_dtype("cpu")
    assert EngineConfig(dtype="float32").dtype == "float32"
    with pytest.raises(ValueError, match="auto, float32"):
        EngineConfig(dtype="int3")


def test_tiny_engine_greedy_cpu_equals_torch(tiny_model) -> None:
    """The whole engine (chunked prefill, a prefix hit, batched decode) on both CPU backends."""
    assert tiny_greedy(str(tiny_model), "cpu", 4, 6) == tiny_greedy(str(tiny_model), "torch", 4, 6)


def _q4_weight(n: int, k: int, seed: int):
    from appliance.model.q4_blocks import Q4Blocks

    g = torch.Generator().manual_seed(seed)
    blocks = Q4Blocks(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8),
                      torch.rand(n, k // 32, generator=g) * 0.05, torch.randn(n, k // 32, generator=g) * 0.05)
    return blocks, blocks.dequantize()


NO_INT4 = "this torch has no oneDNN packing or no CPU int4 kernel"
DTYPES_HERE = [torch.float32] + ([torch.bfloat16] if onednn_bf16_available() else [])
KERNELS_HERE = ["torch-int4"] + (["pdbox-quant"] if native_quant().lib is not None else [])


@pytest.mark.skipif(not onednn_available() or not int4_available(), reason=NO_INT4)
@pytest.mark.parametrize("kernel", KERNELS_HERE)
@pytest.mark.parametrize("dtype", DTYPES_HERE, ids=str)
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 8, 64])
def test_q4_weights_run_few_rows_through_4_bits_and_match_the_floats(rows: int, dtype: torch.dtype,
                                                                     kernel: str) -> None:
    be = CpuAttentionBackend(native_kernels=kernel == "pdbox-quant")
    blocks, w = _q4_weight(192, 128, 3)
    packed = be.pack_linear(w.to(dtype), blocks)
    assert isinstance(packed, PackedWeight)
    native = kernel == "pdbox-quant"
    assert (packed.quant is not None, packed.int4 is not None) == (native, not native)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(4)).to(dtype)
    bias = torch.randn(192).to(dtype)
    want = x.float() @ w.T
    for b in (None, bias):
        got = be.linear(x, packed, b)
        assert got.shape == (rows, 192) and got.dtype == dtype
        torch.testing.assert_close(got.float(), want + (0 if b is None else b.float()), rtol=2e-2, atol=6e-2)
    if packed.quant is not None and rows <= QUANT_MAX_ROWS[dtype]:  # pdbox's kernel on int16-rounded rows
        assert torch.equal(be.linear(x, packed), quant_linear(x.float(), packed.quant).to(dtype))
    elif packed.int4 is not None and rows <= INT4_MAX_ROWS:  # torch's int4 kernel on bf16 rows
        int4 = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed.int4[0], 32, packed.int4[1])
        assert torch.equal(be.linear(x, packed), int4.to(dtype))
    elif dtype == torch.float32 and rows > 4:  # prefill rows: oneDNN on the float weights, exact in fp32
        dense = torch.ops.mkldnn._linear_pointwise(x, packed.packed, None, "none", [], "")
        assert torch.equal(be.linear(x, packed), dense)


@pytest.mark.skipif(not onednn_available() or native_quant().lib is None, reason="no oneDNN or no pdbox-quant here")
@pytest.mark.parametrize("rows", [1, 9, QUANT_MAX_ROWS[torch.float32] + 1])
def test_the_down_projection_reads_silu_of_gate_and_up_in_the_gemv(rows: int) -> None:
    """fp32, few rows: one call (the GEMV makes silu(gate) * up itself), bit-equal to the two; more rows
    than the GEMV takes: the two calls."""
    be = CpuAttentionBackend()
    blocks, w = _q4_weight(192, 128, 3)
    packed = be.pack_linear(w, blocks)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
    calls = []
    be.silu_and_mul = lambda t: calls.append(t) or CpuAttentionBackend.silu_and_mul(be, t)  # type: ignore[method-assign]
    got = be.silu_mul_linear(x, packed)
    assert len(calls) == (0 if rows <= QUANT_MAX_ROWS[torch.float32] and be.native_pointwise_f32 else 1)
    assert torch.equal(got, be.linear(CpuAttentionBackend.silu_and_mul(be, x), packed))


@pytest.mark.skipif(not onednn_available() or not int4_available(), reason=NO_INT4)
@pytest.mark.parametrize("native", [True, False])
def test_q4_blocks_of_another_shape_are_not_packed(native: bool) -> None:
    be = CpuAttentionBackend(native_kernels=native)
    blocks, w = _q4_weight(64, 64, 5)
    got = be.pack_linear(w, blocks)
    assert got.int4 is not None or got.quant is not None
    assert be.pack_linear(w[:32], blocks).int4 is None and be.pack_linear(w[:32], blocks).quant is None
    assert be.pack_linear(w).int4 is None and be.pack_linear(w).quant is None


def test_engine_packs_the_embedded_models_q4_weights_unless_told_not_to(smollm_path) -> None:
    from appliance.config import EngineConfig
    from appliance.engine.runner import ModelRunner

    if not onednn_available() or not int4_available():
        pytest.skip(NO_INT4)
    for flag in (True, False):
        runner = ModelRunner(str(smollm_path), EngineConfig(q4_kernels=flag, kv_cache_mb=8))  # fp32 or bf16
        layer = runner.model.layers[0]
        assert all((w.int4 is not None or w.quant is not None) == flag
                   for w in (layer.qkv, layer.o_proj, layer.gate_up, layer.down))
        head = runner.model.lm_head
        assert head.int4 is None  # the tied Q8_0 embedding has no 4-bit blocks; pdbox's kernel reads its 8-bit ones
        assert (head.quant is not None) == (flag and native_quant().lib is not None)


def test_onednn_rows_are_few_shapes_and_little_padding() -> None:
    seen = [onednn_rows(rows) for rows in range(1, 1025)]
    assert seen[:EXACT_ROWS] == list(range(1, EXACT_ROWS + 1))
    for rows, padded in enumerate(seen, start=1):
        assert rows <= padded and padded - rows < max(8, rows / 32)
        assert onednn_rows(padded) == padded  # a bucket is its own bucket
    assert len(set(seen)) <= EXACT_ROWS + 140


@pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN")
def test_many_row_counts_come_out_right_and_hold_no_memory() -> None:
    """A prefill engine's linear layers see nearly every row count; oneDNN keeps a primitive (and its scratch
    memory) per shape it sees, 0.65-3 MiB for this weight: the counts must share the ladder's few shapes."""
    be = CpuAttentionBackend()
    g = torch.Generator().manual_seed(3)
    w, bias = torch.randn(1536, 576, generator=g), torch.randn(1536, generator=g)
    packed = be.pack_linear(w)
    x = torch.randn(400, 576, generator=g)
    for rows in (65, 100, 257, 400):
        got = be.linear(x[:rows], packed, bias)
        assert got.shape == (rows, 1536) and got.is_contiguous()
        torch.testing.assert_close(got, F.linear(x[:rows], w, bias), rtol=1e-4, atol=1e-3)

    def rss_mib() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    for rows in range(72, 401, 8):  # the ladder's shapes over these counts, built once
        be.linear(x[:rows], packed)
    before = rss_mib()
    for rows in range(65, 401):  # every count: no new shape (~400 MiB more with a shape a count)
        be.linear(x[:rows], packed)
    assert rss_mib() - before < 40
