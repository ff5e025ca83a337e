"""random:NAME specs: shapes of the named models, seeded weights on the device, the engine runs them."""

from __future__ import annotations

import pytest
import torch

from appliance.model.random_model import SPECS, parse_spec, random_checkpoint


def test_named_shapes_match_the_real_models() -> None:
    one, eight = SPECS["llama-1b"], SPECS["llama-8b"]
    assert (one.layers, one.hidden, one.heads, one.kv_heads, one.head_dim, one.intermediate, one.vocab) == (
        16, 2048, 32, 8, 64, 8192, 128256)
    assert one.tie_embeddings and not eight.tie_embeddings
    assert (eight.layers, eight.hidden, eight.head_dim, eight.intermediate) == (32, 4096, 128, 14336)
    assert 1.2e9 < one.num_params < 1.3e9  # Llama-3.2-1B: 1.24 B
    assert 7.9e9 < eight.num_params < 8.1e9  # Llama-3-8B: 8.03 B


def test_unknown_spec_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="random:llama-1b"):
        parse_spec("random:llama-70b")


def test_weights_are_seeded_in_the_target_dtype() -> None:
    a = random_checkpoint("random:tiny", "cpu", torch.bfloat16)
    b = random_checkpoint("random:tiny", "cpu", torch.bfloat16)
    assert a.weights.keys() == b.weights.keys()
    w = a.weights["model.layers.1.mlp.down_proj.weight"]
    assert w.dtype == torch.bfloat16 and w.shape == (64, 128)
    assert torch.equal(w, b.weights["model.layers.1.mlp.down_proj.weight"])
    assert 0.03 < float(w.float().std()) < 0.07


def test_engine_runs_a_random_spec() -> None:
    from appliance.config import EngineConfig
    from appliance.engine.engine import Engine
    from appliance.engine.request import SamplingParams

    engine = Engine("random:tiny", EngineConfig(dtype="float32", page_size=4, num_pages=64))
    prompt = engine.tokenizer.encode("hello random weights")
    assert prompt and max(prompt) < 259
    req = engine.add_request(prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    engine.run_until_done([req])
    assert len(req.output_ids) == 6 and all(0 <= t < 512 for t in req.output_ids)
    assert engine.model_name == "random:tiny"
    engine.shutdown()
