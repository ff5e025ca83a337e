"""GGUF metadata -> ModelConfig where llama.cpp hard-codes what the file leaves out (no weights needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.model.errors import ModelLoadError
from appliance.model.gguf_config import config_from_gguf

PATH = Path("m.gguf")


def config(arch: str, layers: int, **kv):
    base = {"attention.head_count": 8, "attention.head_count_kv": 4, "embedding_length": 1536, "block_count": layers,
            "attention.key_length": 128, "feed_forward_length": 4096, "context_length": 8192,
            "attention.sliding_window": 4096, **kv}
    tensors = {"blk.0.attn_q_norm.weight": 0} if arch == "gemma3" else {}
    return config_from_gguf(arch, lambda name, default=None: base.get(name, default), tensors, 1000, None,
                            {"bos": 2, "eos": (1,)}, PATH)


def test_gemma_attention_scale_follows_llama_cpp() -> None:
    assert config("gemma2", 26).attn_scale == 128**-0.5  # head_dim ** -0.5
    assert config("gemma2", 46).attn_scale == (1536 // 8) ** -0.5  # the 27B: (hidden / heads) ** -0.5
    assert config("gemma3", 62).attn_scale == (1536 // 8) ** -0.5
    assert config("gemma3", 26, **{"attention.scale": 0.1}).attn_scale == pytest.approx(0.1)


def test_gemma_sliding_layers_follow_llama_cpp() -> None:
    c = config("gemma3", 12)
    assert c.local_rope_layers == (0, 1, 2, 3, 4, 6, 7, 8, 9, 10) and c.local_rope_theta == 10000.0
    assert c.max_position == 4096  # context capped at the window
    c = config("gemma3", 4, **{"attention.sliding_window_pattern": 2, "rope.freq_base_swa": 500.0})
    assert c.local_rope_layers == (0, 2) and c.local_rope_theta == 500.0
    c = config("gemma2", 4, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    assert (c.local_rope_layers, c.attn_logit_softcap, c.final_logit_softcap, c.norm_offset) == ((), 50.0, 30.0, 0.0)
    assert config("gemma2", 4, **{"attention.sliding_window_pattern": 0}).max_position == 8192  # nothing slides


@pytest.mark.parametrize("arch,kv,needle", [
    ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping on gemma3 is not supported"),
    ("gemma2", {"rope.dimension_count": 64}, "partial rotary"),
    ("gemma3", {"attention.sliding_window_pattern": [True, False]}, "names 2 layers, the model has 4"),
])
def test_unsupported_metadata_is_named(arch, kv, needle) -> None:
    with pytest.raises(ModelLoadError, match=needle):
        config(arch, 4, **kv)
