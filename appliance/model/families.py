"""The Hugging Face model families pdbox runs, with the defaults transformers' config classes give them.

A ``config.json`` that omits a field means the family's default in transformers (Qwen3's ``head_dim`` is
128 whatever ``hidden_size / heads`` is), so each family names its own rather than one shared guess.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """One architecture: pdbox's name for it and its quirks."""

    arch: str
    default_theta: float = 10000.0
    default_head_dim: int | None = None  # None: hidden_size // num_attention_heads
    default_rms_eps: float = 1e-6
    default_max_position: int = 2048
    qkv_bias: bool = False  # q/k/v biases whatever the config says (Qwen2)
    qk_norm: bool = False  # RMSNorm over each q and k head before rotary (Qwen3)
    sliding_window_default: int | None = None  # transformers' default when config.json omits the key
    sliding_window_switch: bool = False  # the window applies only with use_sliding_window (Qwen)
    gemma: bool = False  # Gemma 2's / 3's quirks (appliance.model.gemma)
    moe: bool = False  # sparse layers: num_experts, num_experts_per_tok, decoder_sparse_step, mlp_only_layers


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("llama"),
    "MistralForCausalLM": Family("mistral", default_max_position=4096 * 32, sliding_window_default=4096),
    "Qwen2ForCausalLM": Family("qwen2", default_max_position=32768, qkv_bias=True, sliding_window_switch=True),
    "Qwen3ForCausalLM": Family("qwen3", default_head_dim=128, default_max_position=32768, qk_norm=True,
                               sliding_window_switch=True),
    "Qwen3MoeForCausalLM": Family("qwen3_moe", default_max_position=32768, qk_norm=True, sliding_window_switch=True,
                                  moe=True),
    "Gemma2ForCausalLM": Family("gemma2", default_head_dim=256, default_max_position=8192, sliding_window_default=4096,
                                gemma=True),
    "Gemma3ForCausalLM": Family("gemma3", default_theta=1_000_000.0, default_head_dim=256,
                                default_max_position=131_072, qk_norm=True, sliding_window_default=4096, gemma=True),
}
# config.json files written from a config alone carry model_type but no architectures
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
               "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


def family_of(raw: dict) -> tuple[str, Family] | None:
    """The family a ``config.json`` dict names (``architectures``, else ``model_type``), or None."""
    for name in raw.get("architectures") or []:
        if name in FAMILIES:
            return name, FAMILIES[name]
    if not raw.get("architectures") and raw.get("model_type") in MODEL_TYPES:
        name = MODEL_TYPES[raw["model_type"]]
        return name, FAMILIES[name]
    return None
