"""Loaders and the CLI: the embedded model answers, bad model files fail with a clear message."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from appliance.model.errors import ModelLoadError
from appliance.model.gguf_loader import unpermute_rotary
from appliance.model.loader import load_checkpoint

PDBOX = [sys.executable, "-m", "appliance.cli"]


def test_smollm2_checkpoint_shape(smollm_path) -> None:
    ckpt = load_checkpoint(str(smollm_path))
    c = ckpt.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert c.tie_embeddings and c.vocab_size == 49152 and c.eos_token_ids == (2,)
    assert ckpt.weights["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).view(4 * 8, 3)
    heads = 4
    permuted = w.reshape(heads, 2, 8 // 2, 3).transpose(1, 2).reshape(w.shape)  # llama.cpp's convert
    assert torch.equal(unpermute_rotary(permuted, heads), w)


def test_gguf_dequant_types_round_trip(tmp_path) -> None:
    """Q8_0 / Q4_0 / Q4_1 / F16 / BF16 tensors written with gguf's quantizer load close to the source."""
    import gguf
    from gguf import quants

    from appliance.model.gguf_loader import SUPPORTED_TENSOR_TYPES, _dequantize

    rng = np.random.default_rng(0)
    src = rng.standard_normal((4, 64)).astype(np.float32)
    path = tmp_path / "q.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    kinds = ["Q8_0", "Q4_0", "Q4_1", "F16", "BF16"]
    for kind in kinds:
        qt = gguf.GGMLQuantizationType[kind]
        data = quants.quantize(src, qt)
        w.add_tensor(kind, data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(str(path))
    tol = {"Q8_0": 0.02, "Q4_0": 0.3, "Q4_1": 0.3, "F16": 1e-3, "BF16": 1e-2}
    for t in reader.tensors:
        assert t.tensor_type.name in SUPPORTED_TENSOR_TYPES
        out = _dequantize(t).numpy()
        assert out.shape == src.shape
        assert np.abs(out - src).max() < tol[t.name], t.name


def test_missing_and_corrupt_model_files(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_checkpoint(str(tmp_path / "nope.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_checkpoint(str(junk))
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_checkpoint(str(folder))


def test_unsupported_architecture(tiny_model, tmp_path) -> None:
    import shutil

    bad = tmp_path / "gpt2"
    shutil.copytree(tiny_model, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        load_checkpoint(str(bad))


def test_unsupported_gguf_tensor_type(tmp_path) -> None:
    import gguf

    from appliance.model.gguf_loader import _dequantize

    path = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    qt = gguf.GGMLQuantizationType.IQ2_XXS
    _, size = gguf.GGML_QUANT_SIZES[qt]
    w.add_tensor("x", np.zeros((1, size), dtype=np.uint8), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tensor = gguf.GGUFReader(str(path)).tensors[0]
    with pytest.raises(ModelLoadError, match="unsupported type IQ2_XXS"):
        _dequantize(tensor)


@pytest.mark.slow
def test_cli_generate_answers_paris() -> None:
    out = subprocess.run(PDBOX + ["generate", "What is the capital of France?", "--max-tokens", "20"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


@pytest.mark.parametrize("args,needle", [
    (["--max-tokens", "0"], "max_tokens"), (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"), (["--model", "/no/such/model.gguf"], "not found"),
])
def test_cli_bad_input_is_one_line(args, needle) -> None:
    out = subprocess.run(PDBOX + ["generate", "hi", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert needle in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_cli_prompt_longer_than_context(tiny_model) -> None:
    out = subprocess.run(PDBOX + ["generate", "x" * 2000, "--model", str(tiny_model), "--raw"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "context" in out.stderr and "Traceback" not in out.stderr
