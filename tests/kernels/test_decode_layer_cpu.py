"""The one-call fp32 decode layer (``kernels.cpu.decode_layer``) against the same kernels called one by
one from Python, as the ``cpu`` backend calls them: the same bits; and its bad inputs, named."""

from __future__ import annotations

import pytest
import torch

from kernels.cpu.decode_layer import DecodeLayer, DecodeStep, decode_layer, native
from kernels.cpu.flash_decode import decode_table, flash_decode
from kernels.cpu.pointwise import add_rmsnorm, rotary, store_kv
from kernels.cpu.quant_gemv import MAX_ROWS, Q4Weight, Q8Weight, quant_linear
from kernels.rotary import rotary_cos_sin_cache

pytestmark = pytest.mark.skipif(native().lib is None, reason=f"no fused fp32 decode layer here: {native().reason}")

HIDDEN, HQ, HKV, D, INTER, PAGES, PAGE = 128, 4, 2, 32, 96, 24, 4
EPS, SCALE = 1e-5, D**-0.5


def q4(n: int, k: int, g: torch.Generator) -> Q4Weight:
    return Q4Weight.pack(torch.randint(0, 16, (n, k), generator=g), torch.rand(n, k // 32, generator=g) * 0.05,
                         torch.randn(n, k // 32, generator=g) * 0.01)


def q8(n: int, k: int, g: torch.Generator) -> Q8Weight:
    return Q8Weight.pack(torch.randint(-128, 128, (n, k), generator=g), torch.rand(n, k // 32, generator=g) * 0.01)


class Layer:
    """A random layer (4-bit weights, an 8-bit down projection as SmolLM2's GGUF mixes them), its caches."""

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.input_norm, self.post_norm = torch.rand(HIDDEN, generator=g) + 0.5, torch.rand(HIDDEN, generator=g) + 0.5
        self.qkv, self.o = q4((HQ + 2 * HKV) * D, HIDDEN, g), q4(HIDDEN, HQ * D, g)
        self.gate_up, self.down = q4(2 * INTER, HIDDEN, g), q8(HIDDEN, INTER, g)
        self.cos_sin = rotary_cos_sin_cache(D, 256, 10000.0)
        self.k_cache = torch.randn(PAGES, PAGE, HKV, D, generator=g)
        self.v_cache = torch.randn(PAGES, PAGE, HKV, D, generator=g)

    def build(self) -> DecodeLayer:
        return DecodeLayer.build(self.input_norm, self.post_norm, self.qkv, self.o, self.gate_up, self.down,
                                 self.cos_sin, self.k_cache, self.v_cache, HQ, EPS, SCALE)

    def by_ops(self, x: torch.Tensor | None, residual: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
               table: torch.Tensor, lens: torch.Tensor, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The backend's calls for this layer, one by one."""
        rows = residual.shape[0]
        h, residual = add_rmsnorm(x, residual, self.input_norm, EPS, threads, torch.float32)
        qkv = quant_linear(h, self.qkv, threads)
        qk = rotary(qkv[:, : (HQ + HKV) * D].view(rows, HQ + HKV, D), positions, self.cos_sin, threads)
        v = qkv[:, (HQ + HKV) * D :].reshape(rows, HKV, D)
        store_kv(self.k_cache, self.v_cache, qk[:, HQ:], v, slots)
        o = flash_decode(qk[:, :HQ], self.k_cache, self.v_cache, decode_table(table, lens, PAGES, PAGE), SCALE, threads)
        attn = quant_linear(o.reshape(rows, -1), self.o, threads)
        h, residual = add_rmsnorm(attn, residual, self.post_norm, EPS, threads, torch.float32)
        return quant_linear(quant_linear(h, self.gate_up, threads), self.down, threads, silu_mul=True), residual


def step_rows(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions, slots, a page table and lengths for ``rows`` requests whose new token is the last row."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 5 * PAGE, (rows,), generator=g)
    table = torch.stack([torch.randperm(PAGES, generator=g)[:5] for _ in range(rows)])  # 5 pages a request
    positions = lens - 1
    slots = table[torch.arange(rows), positions // PAGE] * PAGE + positions % PAGE
    return positions, slots, table.to(torch.int32), lens.to(torch.int32)


@pytest.mark.parametrize(("rows", "threads"), [(1, 1), (3, 2), (8, 2), (MAX_ROWS, 2)])
@pytest.mark.parametrize("first", [True, False])
def test_one_call_gives_the_bits_of_the_calls_one_by_one(rows: int, threads: int, first: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    residual = torch.randn(rows, HIDDEN, generator=g)
    x = None if first else torch.randn(rows, HIDDEN, generator=g)
    positions, slots, table, lens = step_rows(rows, rows + 1)
    one, ops = Layer(7), Layer(7)
    layer = one.build()
    step = DecodeStep.build(layer, positions, slots, decode_table(table, lens, PAGES, PAGE))
    want, want_residual = ops.by_ops(x, residual.clone(), positions, slots, table, lens, threads)
    res_in = residual.clone()
    got, got_residual = decode_layer(layer, step, x, res_in, threads)
    assert torch.equal(got, want) and torch.equal(got_residual, want_residual)
    assert torch.equal(one.k_cache, ops.k_cache) and torch.equal(one.v_cache, ops.v_cache)  # the new rows stored
    # the first layer's residual (the embedding) is left as it was; a later one's is updated in place
    assert (got_residual is res_in) == (not first)
    assert first or torch.equal(res_in, want_residual)
    assert not first or torch.equal(res_in, residual)


def test_bad_layers_and_steps_are_named() -> None:
    lay = Layer(3)
    with pytest.raises(ValueError, match=r"o must be a quantized weight of shape \(128, 128\)"):
        DecodeLayer.build(lay.input_norm, lay.post_norm, lay.qkv, lay.gate_up, lay.gate_up, lay.down, lay.cos_sin,
                          lay.k_cache, lay.v_cache, HQ, EPS, SCALE)
    with pytest.raises(ValueError, match="k_cache must be a contiguous fp32"):
        DecodeLayer.build(lay.input_norm, lay.post_norm, lay.qkv, lay.o, lay.gate_up, lay.down, lay.cos_sin,
                          lay.k_cache.half(), lay.v_cache, HQ, EPS, SCALE)
    with pytest.raises(ValueError, match="power-of-two pages"):
        DecodeLayer.build(lay.input_norm, lay.post_norm, lay.qkv, lay.o, lay.gate_up, lay.down, lay.cos_sin,
                          torch.zeros(8, 3, HKV, D), torch.zeros(8, 3, HKV, D), HQ, EPS, SCALE)
    with pytest.raises(ValueError, match="post_norm must be a contiguous fp32 CPU tensor of shape"):
        DecodeLayer.build(lay.input_norm, lay.post_norm[:64], lay.qkv, lay.o, lay.gate_up, lay.down, lay.cos_sin,
                          lay.k_cache, lay.v_cache, HQ, EPS, SCALE)
    layer = lay.build()
    positions, slots, table, lens = step_rows(MAX_ROWS + 1, 1)
    with pytest.raises(ValueError, match=f"1 to {MAX_ROWS} rows, got {MAX_ROWS + 1}"):
        DecodeStep.build(layer, positions, slots, decode_table(table, lens, PAGES, PAGE))
    positions, slots, table, lens = step_rows(2, 1)
    plan = decode_table(table, lens, PAGES, PAGE)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 256\)"):
        DecodeStep.build(layer, positions + 1000, slots, plan)
    with pytest.raises(ValueError, match="slot_mapping must be a contiguous int64"):
        DecodeStep.build(layer, positions, slots.int(), plan)
    with pytest.raises(ValueError, match="checked for 24 pages of 8; the caches hold 24 of 4"):
        DecodeStep.build(layer, positions, slots, decode_table(table, lens, PAGES, 8))
    step = DecodeStep.build(layer, positions, slots, plan)
    with pytest.raises(ValueError, match=r"residual must be a contiguous fp32 CPU tensor of shape \(2, 128\)"):
        decode_layer(layer, step, None, torch.zeros(3, HIDDEN))
    other = Layer(4)
    other.k_cache, other.v_cache = torch.zeros(32, PAGE, HKV, D), torch.zeros(32, PAGE, HKV, D)
    with pytest.raises(ValueError, match="this layer has 32 of 4"):
        decode_layer(other.build(), step, None, torch.zeros(2, HIDDEN))


def test_a_slot_outside_the_cache_is_named_and_writes_nothing() -> None:
    lay = Layer(5)
    layer = lay.build()
    positions, slots, table, lens = step_rows(2, 2)
    before = lay.k_cache.clone()
    step = DecodeStep.build(layer, positions, slots + PAGES * PAGE, decode_table(table, lens, PAGES, PAGE))
    with pytest.raises(ValueError, match="a slot lies outside the KV cache"):
        decode_layer(layer, step, None, torch.zeros(2, HIDDEN))
    assert torch.equal(lay.k_cache, before)
    layer.struct.d = 48  # the C side checks the weights' shapes against the sizes its scratch is cut from
    with pytest.raises(RuntimeError, match="failed in its arguments"):
        decode_layer(layer, step, None, torch.zeros(2, HIDDEN))
