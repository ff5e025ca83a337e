"""GGUF files of Llama 3.1 (llama3 rope as ``rope_freqs``), Qwen3-MoE, Gemma 2 and Gemma 3, converted from tiny
transformers checkpoints (``tests.models.gguf_tiny``), against transformers through pdbox's paged engine."""

from __future__ import annotations

import pytest
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from appliance.model.errors import ModelLoadError
from appliance.model.loader import load_checkpoint, load_config, load_tokenizer
from tests.models.compare import compare
from tests.models.gguf_tiny import convert
from tests.models.hf_tiny import save_tiny

VOCAB = 259
COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)


def llama31():  # GQA 2:1, llama3 rope (its long wavelengths scaled by 8, a ramp between)
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return "llama", LlamaForCausalLM, LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                                  num_key_value_heads=2, max_position_embeddings=256,
                                                  rope_parameters=rope, **COMMON), {"eot": 0}


def qwen3_moe():  # every layer sparse (gguf's qwen3moe has no dense FFN): 8 experts, top 2, renormalized
    return "qwen3moe", Qwen3MoeForCausalLM, Qwen3MoeConfig(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        **COMMON), {}


def gemma3():  # sliding then full layer (the pattern written as bools), linear x8 on the full one, soft-cap
    config = Gemma3TextConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        query_pre_attn_scalar=32, sliding_window=64, layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=3.0, max_position_embeddings=256,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}},
        **{**COMMON, "pad_token_id": 0})
    return "gemma3", Gemma3ForCausalLM, config, {"gemma_pattern": [True, False], "softcap_final": 3.0,
                                                 "rope_linear": 8.0}


def gemma2():  # llama.cpp's fixed pattern (sliding, full) and attention scale (head_dim ** -0.5); both caps
    config = Gemma2Config(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        query_pre_attn_scalar=32, sliding_window=64, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
        max_position_embeddings=256, **{**COMMON, "pad_token_id": 0})
    return "gemma2", Gemma2ForCausalLM, config, {"softcap_final": 3.0, "softcap_attn": 5.0}


FAMILIES = {"llama3.1": llama31, "qwen3-moe": qwen3_moe, "gemma2": gemma2, "gemma3": gemma3}


def gguf_of(tmp_path, family):
    arch, model_cls, config, extra = FAMILIES[family]()
    folder, model = save_tiny(tmp_path / family, model_cls, config)
    return convert(folder, tmp_path / f"{family}.gguf", arch, config, extra), model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_family_matches_transformers(tmp_path, family) -> None:
    path, model = gguf_of(tmp_path, family)
    worst = compare(path, model, VOCAB)
    print(f"gguf {family}: max relative logit difference {worst:.2e}")


def test_gguf_settings_in_the_loaded_config(tmp_path) -> None:
    path = gguf_of(tmp_path, "llama3.1")[0]
    c = load_checkpoint(str(path)).config
    assert c.eos_token_ids == (2, 0) == load_tokenizer(str(path))[0].eos_token_ids  # eos, then end-of-turn
    assert c.rope_scaling.rope_type == "default" and len(c.rope_scaling.freq_factors) == 8
    assert c.rope_scaling.freq_factors[0] == 1.0 and c.rope_scaling.freq_factors[-1] == 8.0
    c = load_checkpoint(str(gguf_of(tmp_path, "qwen3-moe")[0])).config
    assert (c.arch, c.num_experts, c.experts_per_token, c.moe_layers, c.norm_topk_prob) == (
        "qwen3_moe", 8, 2, (0, 1), True)
    c = load_checkpoint(str(gguf_of(tmp_path, "gemma3")[0])).config
    gemma = (c.arch, c.local_rope_layers, c.local_rope_theta, c.rope_theta, c.rope_scaling.rope_type,
             c.max_position, c.final_logit_softcap, c.norm_offset, c.attn_scale, c.qk_norm)
    assert gemma == ("gemma3", (0,), 10000.0, 1e6, "linear", 64, 3.0, 0.0, 32**-0.5, True)
    c = load_checkpoint(str(gguf_of(tmp_path, "gemma2")[0])).config
    gemma = (c.arch, c.local_rope_layers, c.max_position, c.final_logit_softcap, c.attn_logit_softcap,
             c.norm_offset, c.attn_scale, c.qk_norm, c.sandwich_norms)
    assert gemma == ("gemma2", (), 64, 3.0, 5.0, 0.0, 32**-0.5, False, True)


def test_the_config_alone_is_the_loaded_one(tmp_path) -> None:
    """`load_config` (a decode worker's KV head count, before its engine loads) reads no weight and gives
    the config the full load gives: every GGUF family here (rope_freqs, experts, Gemma's patterns), their
    transformers folders, the embedded model and a ``random:`` spec."""
    from appliance.model.random_model import random_checkpoint

    for family in FAMILIES:
        path = gguf_of(tmp_path, family)[0]
        for model in (path, tmp_path / family):  # the GGUF, and the folder it was converted from
            assert load_config(str(model)) == load_checkpoint(str(model)).config, model
    assert load_config(None) == load_checkpoint(None).config
    assert load_config("random:tiny") == random_checkpoint("random:tiny").config
    with pytest.raises(ModelLoadError, match="not found"):
        load_config(str(tmp_path / "nope.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="expected a .gguf file"):
        load_config(str(tmp_path / "weights.bin"))


@pytest.mark.slow  # spawns a second rank (a fresh Python with torch)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_tensor_parallel_matches_transformers(tmp_path, family) -> None:
    path, model = gguf_of(tmp_path, family)
    worst = compare(path, model, VOCAB, tp_size=2)
    print(f"gguf {family} tp=2: max relative logit difference {worst:.2e}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pdbox_generate_runs_every_gguf_family(tmp_path, family) -> None:
    """``pdbox generate --model FILE.gguf`` answers as the offline engine does (the GGUF's own tokenizer)."""
    from click.testing import CliRunner

    from appliance.cli import main
    from appliance.config import EngineConfig
    from appliance.engine.request import SamplingParams
    from appliance.llm import LLM

    path, _ = gguf_of(tmp_path, family)
    prompt = "The river stone"
    result = CliRunner().invoke(main, ["generate", prompt, "--model", str(path), "--max-tokens", "6", "--raw",
                                       "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    llm = LLM(str(path), EngineConfig(dtype="float32"))
    try:
        want = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0))[0].text
    finally:
        llm.close()
    assert want and want in result.output, (want, result.output)
