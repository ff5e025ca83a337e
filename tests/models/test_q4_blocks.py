"""GGUF's 4-bit blocks kept as codes: byte layout, slicing, and the embedded model's tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appliance.model.q4_blocks import GROUP, Q4Blocks, from_gguf


def _q4_1_bytes(codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_1 blocks written by hand: fp16 d, fp16 m, 16 bytes of nibbles (weight j low, j + 16 high)."""
    n, k = codes.shape
    c = codes.reshape(n, k // GROUP, GROUP).astype(np.uint8)
    qs = c[..., :16] | (c[..., 16:] << 4)
    head = np.stack([d.astype(np.float16), m.astype(np.float16)], -1).view(np.uint8).reshape(n, k // GROUP, 4)
    return np.concatenate([head, qs], -1)


def test_q4_1_bytes_become_codes_scales_and_zeros() -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (6, 64))
    d, m = rng.random((6, 2)) * 0.1, rng.standard_normal((6, 2)) * 0.1
    blocks = from_gguf(_q4_1_bytes(codes, d, m), "Q4_1", (6, 64))
    assert blocks.shape == (6, 64) and torch.equal(blocks.codes, torch.from_numpy(codes.astype(np.uint8)))
    d16, m16 = d.astype(np.float16).astype(np.float32), m.astype(np.float16).astype(np.float32)
    want = d16.repeat(GROUP, 1) * codes + m16.repeat(GROUP, 1)  # w = d * q + m
    torch.testing.assert_close(blocks.dequantize(), torch.from_numpy(want.astype(np.float32)), rtol=0, atol=1e-6)


def test_q4_0_has_no_zero_point() -> None:
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, (2, 32)).astype(np.uint8)
    d = np.array([[0.5], [0.25]], dtype=np.float16)
    raw = np.concatenate([d.view(np.uint8).reshape(2, 1, 2), (codes[:, :16] | (codes[:, 16:] << 4))[:, None]], -1)
    blocks = from_gguf(raw, "Q4_0", (2, 32))
    want = (codes.astype(np.float32) - 8) * d.astype(np.float32)
    assert torch.equal(blocks.dequantize(), torch.from_numpy(want))


def test_bad_shapes_and_types_are_named() -> None:
    with pytest.raises(ValueError, match="Q8_0"):
        from_gguf(np.zeros(34, np.uint8), "Q8_0", (1, 32))
    with pytest.raises(ValueError, match=r"\(1, 48\)"):
        from_gguf(np.zeros(40, np.uint8), "Q4_1", (1, 48))


def test_rows_cols_and_cat_slice_the_weight_they_stand_for() -> None:
    g = torch.Generator().manual_seed(2)
    b = Q4Blocks(torch.randint(0, 16, (8, 96), generator=g, dtype=torch.uint8), torch.rand(8, 3, generator=g),
                 torch.randn(8, 3, generator=g))
    w = b.dequantize()
    assert torch.equal(b.rows(2, 5).dequantize(), w[2:5])
    assert torch.equal(b.cols(32, 96).dequantize(), w[:, 32:96])
    assert b.cols(16, 96) is None  # cuts a block
    assert torch.equal(Q4Blocks.cat([b.rows(0, 3), b.rows(5, 8)]).dequantize(), torch.cat([w[:3], w[5:]]))


def test_embedded_model_keeps_its_q4_1_blocks_equal_to_its_floats(smollm_path) -> None:
    from appliance.model.loader import load_checkpoint

    ckpt = load_checkpoint(str(smollm_path))
    q4 = {name: b for name, b in ckpt.quant.items() if isinstance(b, Q4Blocks)}
    assert len(q4) == 7 * ckpt.config.num_layers  # q, k, v, o, gate, up, down
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
                 "model.layers.29.mlp.down_proj.weight"):  # q and k rows un-permuted like the floats
        assert torch.equal(q4[name].dequantize(), ckpt.weights[name])
