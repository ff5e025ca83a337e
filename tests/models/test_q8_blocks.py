"""GGUF's Q8_0 blocks kept as codes (``appliance.model.q8_blocks``): the same weight as gguf's own
dequantization, sliced and stacked like the floats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appliance.model.q8_blocks import Q8Blocks, from_gguf


def test_from_gguf_reads_what_gguf_dequantizes() -> None:
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    raw = quants.quantize(w, GGMLQuantizationType.Q8_0)
    got = from_gguf(raw, "Q8_0", (4, 64))
    assert got.codes.dtype == torch.int8 and got.scale.shape == (4, 2)
    want = quants.dequantize(raw, GGMLQuantizationType.Q8_0)
    assert torch.equal(got.dequantize(), torch.from_numpy(np.ascontiguousarray(want)))


def test_bad_shapes_and_types_are_named() -> None:
    with pytest.raises(ValueError, match="Q4_0"):
        from_gguf(np.zeros(18, np.uint8), "Q4_0", (1, 32))
    with pytest.raises(ValueError, match=r"\(1, 48\)"):
        from_gguf(np.zeros(34, np.uint8), "Q8_0", (1, 48))


def test_rows_cols_and_cat_slice_the_weight_they_stand_for() -> None:
    g = torch.Generator().manual_seed(2)
    b = Q8Blocks(torch.randint(-128, 128, (8, 96), generator=g, dtype=torch.int8), torch.rand(8, 3, generator=g))
    w = b.dequantize()
    assert torch.equal(b.rows(2, 5).dequantize(), w[2:5])
    assert torch.equal(b.cols(32, 96).dequantize(), w[:, 32:96])
    assert b.cols(16, 96) is None  # cuts a block
    assert torch.equal(Q8Blocks.cat([b.rows(0, 3), b.rows(5, 8)]).dequantize(), torch.cat([w[:3], w[5:]]))
    assert torch.equal(b.map_rows(lambda t: t.flip(0)).dequantize(), w.flip(0))


def test_embedded_model_keeps_its_q8_0_embedding_and_its_head_reads_it(smollm_path) -> None:
    from appliance.config import EngineConfig
    from appliance.engine.runner import ModelRunner
    from appliance.model.loader import load_checkpoint
    from kernels.cpu.quant_gemv import Q8Weight
    from kernels.cpu.quant_gemv import native as native_quant

    ckpt = load_checkpoint(str(smollm_path))
    emb = ckpt.quant["model.embed_tokens.weight"]
    assert isinstance(emb, Q8Blocks) and torch.equal(emb.dequantize(), ckpt.weights["model.embed_tokens.weight"])
    if native_quant().lib is None:
        pytest.skip(f"no native quantized GEMV here: {native_quant().reason}")
    for flag in (True, False):  # the tied head reads the embedding's 8-bit blocks, unless told not to
        head = ModelRunner(str(smollm_path), EngineConfig(q4_kernels=flag, kv_cache_mb=8)).model.lm_head
        assert isinstance(head.quant, Q8Weight) if flag else head.quant is None
