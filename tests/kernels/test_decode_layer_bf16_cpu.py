"""The one-call bf16 decode layer (``kernels.cpu.decode_layer`` on ``decode_layer_bf16.c``, AVX-512 BF16)
against the same kernels and conversions the ``cpu`` backend makes one by one in a bf16 model: the same bits."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kernels.cpu.decode_layer import DecodeLayer, DecodeStep, decode_layer, native
from kernels.cpu.flash_decode import decode_table, flash_decode
from kernels.cpu.pointwise import add_rmsnorm, rotary, silu_and_mul, store_kv
from kernels.cpu.quant_gemv import quant_linear
from kernels.rotary import rotary_cos_sin_cache
from tests.kernels.test_decode_layer_cpu import q4, q8

pytestmark = pytest.mark.skipif(native(torch.bfloat16).lib is None,
                                reason=f"no fused bf16 decode layer here: {native(torch.bfloat16).reason}")

PAGES, PAGE, EPS = 24, 4, 1e-5
BF16 = torch.bfloat16


@dataclass(frozen=True)
class Shape:
    hidden: int
    hq: int
    hkv: int
    d: int  # bf16 attention takes head_dim 64, 128, ...
    inter: int


WIDE_O = Shape(128, 4, 2, 64, 96)  # the attention's output (256) wider than the hidden size
WIDE_MLP = Shape(64, 1, 1, 64, 256)  # the MLP's input (256) wider than QKV's output (192) and the hidden size
HIDDEN, HQ, HKV, D = WIDE_O.hidden, WIDE_O.hq, WIDE_O.hkv, WIDE_O.d


class Layer:
    """A random bf16 layer (4-bit weights, an 8-bit down projection), its bf16 caches."""

    def __init__(self, seed: int, shape: Shape = WIDE_O) -> None:
        g = torch.Generator().manual_seed(seed)
        self.s = s = shape
        self.input_norm = torch.rand(s.hidden, generator=g) + 0.5
        self.post_norm = torch.rand(s.hidden, generator=g) + 0.5
        self.qkv, self.o = q4((s.hq + 2 * s.hkv) * s.d, s.hidden, g), q4(s.hidden, s.hq * s.d, g)
        self.gate_up, self.down = q4(2 * s.inter, s.hidden, g), q8(s.hidden, s.inter, g)
        self.cos_sin = rotary_cos_sin_cache(s.d, 256, 10000.0)
        self.k_cache = torch.randn(PAGES, PAGE, s.hkv, s.d, generator=g).to(BF16)
        self.v_cache = torch.randn(PAGES, PAGE, s.hkv, s.d, generator=g).to(BF16)

    @property
    def scale(self) -> float:
        return self.s.d**-0.5

    def build(self) -> DecodeLayer:
        return DecodeLayer.build(self.input_norm, self.post_norm, self.qkv, self.o, self.gate_up, self.down,
                                 self.cos_sin, self.k_cache, self.v_cache, self.s.hq, EPS, self.scale)

    def by_ops(self, x: torch.Tensor | None, residual: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
               table: torch.Tensor, lens: torch.Tensor, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The backend's calls for this layer in a bf16 model, one by one: a linear layer widens its bf16
        rows for the GEMV and rounds its fp32 rows back in torch; the first layer norms the fp32 embeddings."""
        rows, hq, hkv, d = residual.shape[0], self.s.hq, self.s.hkv, self.s.d

        def linear(h: torch.Tensor, w) -> torch.Tensor:
            return quant_linear(h.float().contiguous(), w, threads).to(BF16)

        if x is None:
            h32, residual = add_rmsnorm(None, residual, self.input_norm, EPS, threads, torch.float32)
            h = h32.to(BF16)
        else:
            h, residual = add_rmsnorm(x, residual, self.input_norm, EPS, threads, BF16)
        qkv = linear(h, self.qkv)
        qk = rotary(qkv[:, : (hq + hkv) * d].view(rows, hq + hkv, d), positions, self.cos_sin, threads)
        v = qkv[:, (hq + hkv) * d :].reshape(rows, hkv, d)
        store_kv(self.k_cache, self.v_cache, qk[:, hq:], v, slots)
        o = flash_decode(qk[:, :hq], self.k_cache, self.v_cache, decode_table(table, lens, PAGES, PAGE), self.scale,
                         threads)
        attn = linear(o.reshape(rows, -1), self.o)
        h, residual = add_rmsnorm(attn, residual, self.post_norm, EPS, threads, BF16)
        return linear(silu_and_mul(linear(h, self.gate_up), threads), self.down), residual


def step_rows(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 5 * PAGE, (rows,), generator=g)
    table = torch.stack([torch.randperm(PAGES, generator=g)[:5] for _ in range(rows)])
    positions = lens - 1
    slots = table[torch.arange(rows), positions // PAGE] * PAGE + positions % PAGE
    return positions, slots, table.to(torch.int32), lens.to(torch.int32)


@pytest.mark.parametrize(("rows", "threads", "shape"), [(1, 1, WIDE_O), (2, 2, WIDE_O), (4, 2, WIDE_O),
                                                         (6, 2, WIDE_O), (16, 2, WIDE_O), (3, 2, WIDE_MLP)])
@pytest.mark.parametrize("first", [True, False])
def test_one_bf16_call_gives_the_bits_of_the_calls_one_by_one(rows: int, threads: int, shape: Shape,
                                                              first: bool) -> None:
    """Up to the GEMV's 16 rows (the engine takes up to 6), at two shapes that size the scratch differently."""
    g = torch.Generator().manual_seed(rows)
    residual = torch.randn(rows, shape.hidden, generator=g) * 3
    x = None if first else torch.randn(rows, shape.hidden, generator=g).to(BF16)
    positions, slots, table, lens = step_rows(rows, rows + 1)
    one, ops = Layer(7, shape), Layer(7, shape)
    layer = one.build()
    assert layer.dtype == BF16
    step = DecodeStep.build(layer, positions, slots, decode_table(table, lens, PAGES, PAGE))
    want, want_residual = ops.by_ops(x, residual.clone(), positions, slots, table, lens, threads)
    res_in = residual.clone()
    got, got_residual = decode_layer(layer, step, x, res_in, threads)
    assert got.dtype == BF16 and got_residual.dtype == torch.float32
    assert torch.equal(got, want) and torch.equal(got_residual, want_residual)
    assert torch.equal(one.k_cache, ops.k_cache) and torch.equal(one.v_cache, ops.v_cache)
    assert (got_residual is res_in) == (not first)


def test_bf16_layers_name_what_they_cannot_take() -> None:
    lay = Layer(3)
    with pytest.raises(ValueError, match="head_dim a multiple of 64"):
        DecodeLayer.build(lay.input_norm, lay.post_norm, lay.qkv, lay.o, lay.gate_up, lay.down,
                          rotary_cos_sin_cache(32, 256, 10000.0), torch.zeros(8, 4, HKV, 32, dtype=BF16),
                          torch.zeros(8, 4, HKV, 32, dtype=BF16), HQ, EPS, lay.scale)
    with pytest.raises(ValueError, match="v_cache must be a contiguous bf16 CPU tensor"):
        DecodeLayer.build(lay.input_norm, lay.post_norm, lay.qkv, lay.o, lay.gate_up, lay.down, lay.cos_sin,
                          lay.k_cache, lay.v_cache.float(), HQ, EPS, lay.scale)
    with pytest.raises(ValueError, match="k_cache must be a contiguous fp32 or bf16 CPU tensor, got torch.float16"):
        DecodeLayer.build(lay.input_norm, lay.post_norm, lay.qkv, lay.o, lay.gate_up, lay.down, lay.cos_sin,
                          lay.k_cache.half(), lay.v_cache.half(), HQ, EPS, lay.scale)
    layer = lay.build()
    positions, slots, table, lens = step_rows(2, 1)
    step = DecodeStep.build(layer, positions, slots, decode_table(table, lens, PAGES, PAGE))
    with pytest.raises(ValueError, match=r"x must be a contiguous bf16 CPU tensor of shape \(2, 128\)"):
        decode_layer(layer, step, torch.zeros(2, HIDDEN), torch.zeros(2, HIDDEN))  # an fp32 x into a bf16 layer
    with pytest.raises(ValueError, match=r"residual must be a contiguous fp32 CPU tensor"):
        decode_layer(layer, step, torch.zeros(2, HIDDEN, dtype=BF16), torch.zeros(2, HIDDEN, dtype=BF16))
    # the C side checks the weights' shapes against the sizes its scratch is cut from, whatever called it
    layer.struct.d = 48
    with pytest.raises(RuntimeError, match="failed in its arguments"):
        decode_layer(layer, step, torch.zeros(2, HIDDEN, dtype=BF16), torch.zeros(2, HIDDEN))
