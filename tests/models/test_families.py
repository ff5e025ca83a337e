"""Qwen2 (qkv bias), Qwen3 (per-head q/k RMSNorm, head_dim != hidden / heads), Qwen3-MoE (top-k experts),
Gemma 2 (attention-logit and final-logit soft-caps, sandwich (1 + w) norms, GeGLU, embedding scale,
query_pre_attn_scalar), Gemma 3 (the same without the attention cap, q/k norms, local/global rope), Mistral
(sliding window in the config) and Llama with attention biases, against transformers through pdbox's
paged engine."""

from __future__ import annotations

import pytest
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from appliance.model.loader import load_checkpoint
from tests.models.compare import REL_TOL, compare, hf_logits, prompts
from tests.models.hf_tiny import save_tiny

VOCAB = 259
COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)


def qwen2():
    return Qwen2ForCausalLM, Qwen2Config(hidden_size=64, intermediate_size=96, num_attention_heads=8,
                                         num_key_value_heads=2, tie_word_embeddings=True,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **COMMON)


def qwen3():
    return Qwen3ForCausalLM, Qwen3Config(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **COMMON)


def mistral():
    return MistralForCausalLM, MistralConfig(hidden_size=64, intermediate_size=96, num_attention_heads=8,
                                             num_key_value_heads=2, sliding_window=96, max_position_embeddings=256,
                                             **COMMON)


def llama_biased():
    return LlamaForCausalLM, LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                         num_key_value_heads=1, attention_bias=True, **COMMON)


def qwen3_moe():  # layer 0 sparse (8 experts, top 2, renormalized), layer 1 dense; head_dim != 64 / 4
    return Qwen3MoeForCausalLM, Qwen3MoeConfig(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                               num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                               num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                               mlp_only_layers=[1], **COMMON)


def gemma3():  # layers: sliding (local theta), full (global theta, linear x8); final logit soft-cap on
    return Gemma3ForCausalLM, Gemma3TextConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        query_pre_attn_scalar=24, sliding_window=64, layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=3.0, max_position_embeddings=256,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0}},
        **{**COMMON, "pad_token_id": 0})


def gemma2():  # layers: sliding, full; attention scores capped at 5 (they reach ~20 here), logits at 3
    return Gemma2ForCausalLM, Gemma2Config(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        query_pre_attn_scalar=24, sliding_window=64, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
        max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **{**COMMON, "pad_token_id": 0})


FAMILIES = {"qwen2": qwen2, "qwen3": qwen3, "mistral": mistral, "llama-attention-bias": llama_biased,
            "qwen3-moe": qwen3_moe, "gemma2": gemma2, "gemma3": gemma3}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_transformers(tmp_path, family) -> None:
    model_cls, config = FAMILIES[family]()
    folder, model = save_tiny(tmp_path / family, model_cls, config)
    worst = compare(folder, model, VOCAB)
    print(f"{family}: max relative logit difference {worst:.2e}")


def test_family_quirks_in_the_loaded_config(tmp_path) -> None:
    folder, _ = save_tiny(tmp_path / "q3", *qwen3())
    c = load_checkpoint(str(folder)).config
    assert (c.arch, c.head_dim, c.qk_norm, c.qkv_bias, c.rope_theta) == ("qwen3", 32, True, False, 1e6)
    folder, _ = save_tiny(tmp_path / "m", *mistral())
    assert load_checkpoint(str(folder)).config.max_position == 96  # context bounded by the window
    folder, _ = save_tiny(tmp_path / "q2", *qwen2())
    c = load_checkpoint(str(folder)).config
    assert c.qkv_bias and not c.o_bias and c.tie_embeddings
    folder, _ = save_tiny(tmp_path / "moe", *qwen3_moe())
    c = load_checkpoint(str(folder)).config
    moe = (c.arch, c.num_experts, c.experts_per_token, c.moe_layers, c.norm_topk_prob)
    assert moe == ("qwen3_moe", 8, 2, (0,), True)
    folder, _ = save_tiny(tmp_path / "g3", *gemma3())
    c = load_checkpoint(str(folder)).config
    gemma = (c.local_rope_layers, c.local_rope_theta, c.rope_theta, c.rope_scaling.rope_type, c.max_position,
             c.final_logit_softcap, c.tie_embeddings, c.attn_scale)
    assert gemma == ((0,), 100.0, 10000.0, "linear", 64, 3.0, True, 24**-0.5)
    folder, model = save_tiny(tmp_path / "g2", *gemma2())
    c = load_checkpoint(str(folder)).config
    gemma = (c.arch, c.attn_logit_softcap, c.final_logit_softcap, c.max_position, c.local_rope_layers, c.qk_norm,
             c.tie_embeddings, c.attn_scale, c.embed_scale, c.norm_offset)
    assert gemma == ("gemma2", 5.0, 3.0, 64, (), False, True, 24**-0.5, 8.0, 1.0)
    # the attention cap matters on this model: transformers without it answers differently
    uncapped = Gemma2ForCausalLM(Gemma2Config(**{**model.config.to_dict(), "attn_logit_softcapping": None})).eval()
    uncapped.load_state_dict(model.state_dict())
    ids = prompts(VOCAB)[0]
    capped, plain = hf_logits(model, ids, ids[:2]), hf_logits(uncapped, ids, ids[:2])
    assert (capped - plain).abs().max() / capped.abs().max() > 100 * REL_TOL


@pytest.mark.slow  # spawns a second rank (a fresh Python with torch): ~15-20 s each here
@pytest.mark.parametrize("family", list(FAMILIES))
def test_tensor_parallel_matches_transformers(tmp_path, family) -> None:
    """TP=2: each rank its KV heads (Llama with biases has one KV head: both ranks hold it), its query heads
    (q/k-normed on Qwen3), its slice of the MLP (of every expert on Qwen3-MoE), biases on rank 0 only."""
    model_cls, config = FAMILIES[family]()
    folder, model = save_tiny(tmp_path / family, model_cls, config)
    worst = compare(folder, model, VOCAB, tp_size=2)
    print(f"{family} tp=2: max relative logit difference {worst:.2e}")
