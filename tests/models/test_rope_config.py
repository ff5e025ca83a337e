"""Rope settings read from config.json (both layouts) and the frequencies of each rope type, against
transformers' own ``ROPE_INIT_FUNCTIONS`` at real checkpoints' sizes."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from appliance.config import RopeScaling
from appliance.model.errors import ModelLoadError
from appliance.model.hf_loader import config_from_hf
from kernels.rope_scaling import cos_sin_scale, rotary_angles, scaled_inv_freq
from kernels.rotary import rotary_cos_sin_cache

BASE = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300, "max_position_embeddings": 4096}


def cfg(**extra):
    return config_from_hf({**BASE, **extra})


def test_theta_from_rope_parameters_top_level_or_family_default() -> None:
    assert cfg(rope_parameters={"rope_type": "default", "rope_theta": 1e6}).rope_theta == 1e6
    assert cfg(rope_theta=5e5).rope_theta == 5e5
    assert cfg(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0}).rope_theta == 5e5
    assert cfg().rope_theta == 10000.0  # stated nowhere: transformers' LlamaConfig default
    qwen3 = {**BASE, "architectures": ["Qwen3ForCausalLM"]}
    assert config_from_hf(qwen3).head_dim == 128  # Qwen3Config's default head_dim, not hidden / heads


def test_scaling_fields_both_layouts() -> None:
    old = cfg(rope_scaling={"type": "linear", "factor": 2.0})
    assert old.rope_scaling == RopeScaling("linear", factor=2.0)
    new = cfg(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    assert new.rope_scaling == RopeScaling("llama3", factor=8.0, original_max_position=8192)
    assert new.max_position == 4096
    dyn = cfg(rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    assert dyn.max_position == 8192 and dyn.rope_scaling.original_max_position == 4096
    yarn = cfg(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
               max_position_embeddings=32768)
    assert yarn.max_position == 131072


@pytest.mark.parametrize("raw,needle", [
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "unsupported rope type 'longrope'"),
    ({"rope_scaling": {"type": "su", "factor": 2.0}}, "unsupported rope type 'su'"),
    ({"rope_scaling": {"type": "linear"}}, "needs 'factor'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "needs 'low_freq_factor'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"mlp_bias": True}, "mlp_bias"),
])
def test_unsupported_rope_settings_name_themselves(raw, needle) -> None:
    with pytest.raises(ModelLoadError, match=needle) as err:
        cfg(**raw)
    if "rope type" in needle:
        assert "default, linear, dynamic, yarn, llama3" in str(err.value)


def test_rope_scaling_validates_itself() -> None:
    with pytest.raises(ValueError, match="unsupported rope type 'ntk'"):
        RopeScaling("ntk")
    with pytest.raises(ValueError, match="pre-trained context"):
        RopeScaling("yarn", factor=2.0)


def hf_inv_freq(rope: dict, head_dim: int = 128, max_position: int = 131072, seq_len: int | None = None):
    c = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                    max_position_embeddings=max_position, rope_parameters=dict(rope))
    fn = ROPE_INIT_FUNCTIONS.get(c.rope_parameters["rope_type"])
    if fn is None:  # default
        return 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)), 1.0
    return fn(c, None, seq_len)


REAL = {  # Llama 3.1, Qwen2.5 with yarn, DeepSeek-style yarn mscale, linear, plain
    "llama3": ({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, 131072),
    "yarn": ({"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768},
             32768),
    "yarn-mscale": ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.707,
                     "beta_fast": 32, "beta_slow": 1, "original_max_position_embeddings": 4096}, 163840),
    "linear": ({"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0}, 16384),
    "default": ({"rope_type": "default", "rope_theta": 1e6}, 32768),
}


@pytest.mark.parametrize("name", list(REAL))
def test_inv_freq_and_attention_factor_match_transformers(name) -> None:
    rope, max_position = REAL[name]
    c = cfg(rope_parameters=dict(rope), max_position_embeddings=max_position, hidden_size=512)
    ref, attention = hf_inv_freq(rope, max_position=max_position)
    ours = scaled_inv_freq(128, c.rope_theta, c.rope_scaling)
    torch.testing.assert_close(ours.float(), ref.float(), rtol=2e-6, atol=0)
    assert math.isclose(cos_sin_scale(c.rope_scaling), attention, rel_tol=1e-6)
    if name != "default":
        assert not torch.allclose(ours.float(), hf_inv_freq(REAL["default"][0])[0].float())


def test_dynamic_ntk_frequency_per_position() -> None:
    rope = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}
    scaling = cfg(rope_parameters=dict(rope), max_position_embeddings=64).rope_scaling
    angles = rotary_angles(32, 160, 1e4, scaling)
    for pos in (10, 63, 64, 100, 159):  # the frequencies transformers uses for a sequence ending at pos
        ref, _ = hf_inv_freq(rope, head_dim=32, max_position=64, seq_len=pos + 1)
        torch.testing.assert_close((angles[pos] / max(pos, 1)).float(), ref.float(), rtol=2e-6, atol=0)


def test_yarn_scales_the_cos_sin_cache() -> None:
    s = RopeScaling("yarn", factor=4.0, original_max_position=16)
    scaled, plain = rotary_cos_sin_cache(16, 32, 1e4, s), rotary_angles(16, 32, 1e4, s)
    torch.testing.assert_close(scaled[:, :8], (plain.cos() * (0.1 * math.log(4) + 1)).float())


def test_rope_freqs_divisors_are_llama3_scaling() -> None:
    """GGUF's rope_freqs (the converter's per-frequency divisors) rotate as the llama3 type does."""
    import pytest
    import torch

    from appliance.config import RopeScaling
    from kernels.rotary import rotary_cos_sin_cache
    from tests.models.gguf_tiny import llama3_rope_factors

    rope = {"rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    llama3 = RopeScaling("llama3", factor=8.0, original_max_position=64)
    divisors = RopeScaling(freq_factors=tuple(llama3_rope_factors(rope, 16).tolist()))
    want = rotary_cos_sin_cache(16, 512, 10000.0, llama3)
    assert torch.allclose(rotary_cos_sin_cache(16, 512, 10000.0, divisors), want, atol=1e-5)
    assert not torch.allclose(rotary_cos_sin_cache(16, 512, 10000.0, RopeScaling()), want, atol=1e-3)
    with pytest.raises(ValueError, match="4 per-frequency rope factors for head_dim 16"):
        rotary_cos_sin_cache(16, 8, 10000.0, RopeScaling(freq_factors=(1.0,) * 4))
