"""pdbox's AVX2 GEMV on 4- and 8-bit blocks (``kernels.cpu.quant_gemv``) against the dequantized weight,
and against its own int16 rounding of the rows computed here in torch."""

from __future__ import annotations

import pytest
import torch

from appliance.engine.attention_cpu import pack_blocks
from appliance.model.q4_blocks import GROUP, Q4Blocks
from appliance.model.q8_blocks import Q8Blocks
from kernels.cpu.pointwise import native as pointwise_native
from kernels.cpu.pointwise import silu_and_mul
from kernels.cpu.quant_gemv import MAX_ROWS, Q4Weight, Q8Weight, native, quant_linear

pytestmark = pytest.mark.skipif(native().lib is None, reason=f"no native quantized GEMV here: {native().reason}")


def blocks(n: int, k: int, seed: int) -> Q4Blocks:
    g = torch.Generator().manual_seed(seed)
    return Q4Blocks(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8),
                    torch.rand(n, k // GROUP, generator=g) * 0.05, torch.randn(n, k // GROUP, generator=g) * 0.05)


def int16_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's rounding of ``x``: per block of 32, codes ``round(x * (32767 / max|x|))`` and scale
    ``max|x| / 32767`` (fp32, as the kernel computes them)."""
    xb = x.view(x.shape[0], -1, GROUP)
    amax = xb.abs().amax(-1, keepdim=True)
    q = torch.where(amax > 0, torch.round(xb * (32767 / amax)), torch.zeros_like(xb))
    return q, amax / 32767


def test_the_layout_holds_the_same_weights() -> None:
    b = blocks(5, 96, 1)
    w = pack_blocks(b)
    assert w.shape == (5, 96) and w.codes.dtype == torch.uint8 and w.params.shape == (5, 2, 3)
    assert w.nbytes == 5 * 48 + 5 * 2 * 3 * 4  # half a byte a weight, two fp32 a block
    lo, hi = (w.codes & 0x0F).view(5, 3, 16), (w.codes >> 4).view(5, 3, 16)
    q = torch.cat([lo, hi], -1).float()  # byte j: weight j low, weight j + 16 high
    got = q * w.params[:, 0, :, None] + w.params[:, 1, :, None]
    torch.testing.assert_close(got.view(5, 96), b.dequantize(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 16])  # past 8: groups of 8 over cached columns
# k = 32 and 96: a last block without a pair (the kernel loads blocks two at a time); the last on 2 threads
@pytest.mark.parametrize(("n", "k", "threads"), [(5, 32, 1), (7, 96, 1), (300, 576, 2), (400, 1536, 2)])
def test_matches_the_dequantized_weight_on_int16_rows(rows: int, n: int, k: int, threads: int) -> None:
    b = blocks(n, k, rows + n)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    got = quant_linear(x, pack_blocks(b), threads)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    # exactly the kernel's arithmetic, up to fp32 summation order: int16 rows times the 4-bit weight
    q, dx = int16_rows(x)
    w = pack_blocks(b)
    codes = torch.cat([(w.codes & 0x0F).view(n, -1, 16), (w.codes >> 4).view(n, -1, 16)], -1).double()
    isum = torch.einsum("rbj,nbj->rnb", q.double(), codes)
    xs = x.view(rows, -1, GROUP).sum(-1).double()
    want = (isum * dx[:, None, :, 0].double() * w.params[None, :, 0].double()).sum(-1) + xs @ w.params[:, 1].double().T
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    # and close to the float weight: the rounding of x (half a step of 1/32767 of a block's largest value,
    # per element) costs about 1e-5 of the output's largest value on these random rows
    exact = x @ b.dequantize().T
    assert (got - exact).abs().max() < 1e-4 * exact.abs().max()


@pytest.mark.parametrize("rows", [1, 3, 8, 13])
@pytest.mark.parametrize(("n", "k", "threads"), [(7, 96, 1), (1024, 576, 2)])  # the last on 2 threads
def test_8_bit_blocks_match_their_weight_on_int16_rows(rows: int, n: int, k: int, threads: int) -> None:
    g = torch.Generator().manual_seed(n + rows)
    codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    b = Q8Blocks(codes, torch.rand(n, k // GROUP, generator=g))
    w = pack_blocks(b)
    assert isinstance(w, Q8Weight) and w.shape == (n, k)
    x = torch.randn(rows, k, generator=g)
    got = quant_linear(x, w, threads)
    q, dx = int16_rows(x)
    isum = torch.einsum("rbj,nbj->rnb", q.double(), b.codes.double().view(n, -1, GROUP))
    want = (isum * dx[:, None, :, 0].double() * b.scale[None].double()).sum(-1)
    # fp32 sums of products up to ~100 in another order: within 1e-5 of the output's scale
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * float(want.abs().max()))
    exact = x @ b.dequantize().T
    assert (got - exact).abs().max() < 1e-4 * exact.abs().max()


def test_a_row_of_zeros_gives_zeros() -> None:
    b = blocks(16, 64, 3)
    x = torch.zeros(2, 64)
    x[1] = torch.randn(64)
    got = quant_linear(x, pack_blocks(b))
    assert torch.equal(got[0], torch.zeros(16))
    assert got[1].abs().sum() > 0


def test_bad_inputs_are_named() -> None:
    w = pack_blocks(blocks(8, 64, 2))
    with pytest.raises(ValueError, match="fp32"):
        quant_linear(torch.randn(1, 64, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="rows of 64, got \\(1, 32\\)"):
        quant_linear(torch.randn(1, 32), w)
    with pytest.raises(ValueError, match="rows of 128, got \\(1, 64\\)"):  # silu_mul reads [gate, up]
        quant_linear(torch.randn(1, 64), w, silu_mul=True)
    with pytest.raises(ValueError, match=f"1 to {MAX_ROWS} rows"):
        quant_linear(torch.randn(MAX_ROWS + 1, 64), w)
    with pytest.raises(ValueError, match="contiguous rows"):
        quant_linear(torch.randn(64, 2).T, w)
    with pytest.raises(ValueError, match="multiple of 32"):
        Q4Weight.pack(torch.zeros(2, 48, dtype=torch.uint8), torch.zeros(2, 1), torch.zeros(2, 1))


@pytest.mark.skipif(pointwise_native(torch.float32).lib is None, reason="no fp32 pointwise kernels here")
@pytest.mark.parametrize(("rows", "threads"), [(1, 1), (3, 2), (8, 2)])
def test_silu_mul_input_gives_the_two_calls_bits(rows: int, threads: int) -> None:
    """SwiGLU's down projection in one call: the same bits as the C SiLU-and-mul, then the GEMV."""
    g = torch.Generator().manual_seed(rows)
    gate_up = torch.randn(rows, 2 * 576, generator=g) * 3
    for w in (pack_blocks(blocks(300, 576, 4)),
              pack_blocks(Q8Blocks(torch.randint(-128, 128, (64, 576), generator=g, dtype=torch.int8),
                                   torch.rand(64, 18, generator=g)))):
        two_calls = quant_linear(silu_and_mul(gate_up, threads), w, threads)
        assert torch.equal(quant_linear(gate_up, w, threads, silu_mul=True), two_calls)
        # strided rows (a view into a wider buffer) read the same
        wide = torch.zeros(rows, 2 * 576 + 64)
        wide[:, : 2 * 576] = gate_up
        assert torch.equal(quant_linear(wide[:, : 2 * 576], w, threads, silu_mul=True), two_calls)


def test_a_tp_shards_column_slice_packs_and_multiplies() -> None:
    """TP slices a row-parallel weight's columns (o_proj, down): the packed slice is that slice's weight."""
    g = torch.Generator().manual_seed(9)
    q4 = blocks(16, 128, 9).cols(32, 96)
    q8 = Q8Blocks(torch.randint(-128, 128, (16, 128), generator=g, dtype=torch.int8), torch.rand(16, 4, generator=g))
    x = torch.randn(2, 64, generator=g)
    for b in (q4, q8.cols(32, 96)):
        exact = x @ b.dequantize().T
        assert (quant_linear(x, pack_blocks(b)) - exact).abs().max() < 1e-4 * exact.abs().max()
