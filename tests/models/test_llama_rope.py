"""Llama checkpoints with each rope type, against transformers: logits of prefill, 8 decode steps and a
prefix-cache hit through pdbox's paged engine. Each case also shows its rope type changes the logits,
so a pdbox that ignored it would fail."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from tests.models.compare import REL_TOL, compare, hf_logits, prompts
from tests.models.hf_tiny import save_tiny

VOCAB = 259
ROPES = {
    # theta only under rope_parameters (transformers 5's layout): a 10000 fallback would fail
    "default": ({"rope_type": "default", "rope_theta": 300.0}, 64),
    "linear": ({"rope_type": "linear", "rope_theta": 300.0, "factor": 4.0}, 64),
    "llama3": ({"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, 256),
    # 13-token prompts + 9 tokens cross max_position_embeddings (16): decode runs on the scaled base
    "dynamic": ({"rope_type": "dynamic", "rope_theta": 300.0, "factor": 2.0}, 16),
    "yarn": ({"rope_type": "yarn", "rope_theta": 300.0, "factor": 4.0, "original_max_position_embeddings": 8}, 32),
}


def llama_config(rope: dict, max_position: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position,
                       rms_norm_eps=1e-5, rope_parameters=dict(rope), bos_token_id=1, eos_token_id=2)


@pytest.mark.parametrize("rope_type", list(ROPES))
def test_llama_rope_type_matches_transformers(tmp_path, rope_type) -> None:
    rope, max_position = ROPES[rope_type]
    folder, model = save_tiny(tmp_path / rope_type, LlamaForCausalLM, llama_config(rope, max_position))
    worst = compare(folder, model, VOCAB)
    print(f"llama rope {rope_type}: max relative logit difference {worst:.2e}")
    # the rope type matters here: transformers with plain rope at theta 10000 answers differently
    plain = LlamaForCausalLM(llama_config({"rope_type": "default"}, max_position)).eval()
    plain.load_state_dict(model.state_dict())
    ids = prompts(VOCAB)[0]
    scaled, unscaled = hf_logits(model, ids, ids[:9]), hf_logits(plain, ids, ids[:9])
    assert (scaled - unscaled).abs().max() / scaled.abs().max() > 100 * REL_TOL
