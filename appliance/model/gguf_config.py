"""A GGUF file's metadata as a :class:`ModelConfig`: the keys llama.cpp's converter writes, per architecture.

Where llama.cpp hard-codes a setting instead of storing it, pdbox reads it the same way:

- Gemma 2 and 3: sliding layers follow ``attention.sliding_window_pattern`` if the file has one, else
  llama.cpp's fixed pattern (every 2nd layer full on Gemma 2, every 6th on Gemma 3); Gemma 3's sliding
  layers rotate with ``rope.freq_base_swa`` (10000 when absent); the attention scale is ``attention.scale``
  if present, else llama.cpp's rule (``head_dim ** -0.5``; ``(hidden / heads) ** -0.5`` on the 27B models,
  46 layers for Gemma 2 and 62 for Gemma 3). Norm weights are stored as ``1 + w`` already (offset 0).
- Qwen3-MoE: a layer is sparse when it has a router (``ffn_gate_inp``); the top-k weights are renormalized
  unless ``expert_weights_norm`` says otherwise (llama.cpp always renormalizes Qwen3-MoE).
- Llama 3.1: the ``rope_freqs`` tensor (the llama3 scaling, precomputed per frequency) divides each
  inverse frequency.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.config import ModelConfig, RopeScaling
from appliance.model.errors import ModelLoadError

# GGUF architecture name -> pdbox's
GGUF_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe",
              "gemma2": "gemma2", "gemma3": "gemma3"}
_GEMMA = {"gemma2": (2, 46), "gemma3": (6, 62)}  # llama.cpp's sliding pattern and the 27B's layer count

Key = Callable[..., Any]


def end_ids(get: Key) -> tuple[int, ...]:
    """The ids that end a generation: ``tokenizer.ggml.eos_token_id``, then the end-of-turn and end-of-message
    ids llama.cpp also stops at (Llama 3's ``<|eot_id|>`` / ``<|eom_id|>``, Gemma's ``<end_of_turn>``)."""
    ids: list[int] = []
    for name in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = get(f"tokenizer.ggml.{name}")
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return tuple(ids)


def rope_scaling_of(key: Key, freq_factors: tuple[float, ...] | None, context: int,
                    path: Path) -> tuple[RopeScaling, int]:
    """The rope type of ``{arch}.rope.scaling.*`` (none, linear, yarn), with ``rope_freqs`` factors if the
    file has them, and the context it gives."""
    kind = key("rope.scaling.type") or "none"
    factor = float(key("rope.scaling.factor", 1.0) or 1.0)
    factors = tuple(float(f) for f in freq_factors) if freq_factors is not None else ()
    try:
        if kind == "none":
            return RopeScaling(freq_factors=factors), context
        if kind == "linear":
            return RopeScaling("linear", factor=factor, freq_factors=factors), context
        if kind == "yarn" and not factors:
            original = int(key("rope.scaling.original_context_length", context))
            scaling = RopeScaling("yarn", factor=factor, original_max_position=original,
                                  beta_fast=float(key("rope.scaling.yarn_beta_fast", 32.0)),
                                  beta_slow=float(key("rope.scaling.yarn_beta_slow", 1.0)))
            return scaling, max(context, int(original * factor))
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    if kind == "yarn":
        raise ModelLoadError(f"{path}: rope_freqs factors with yarn scaling are not supported")
    raise ModelLoadError(f"{path}: unsupported rope scaling type {kind!r}; pdbox reads none, linear and yarn from GGUF")


def _gemma_fields(arch: str, key: Key, layers: int, hidden: int, heads: int, head_dim: int,
                  path: Path) -> tuple[dict, tuple[bool, ...]]:
    """ModelConfig's Gemma fields and which layers slide."""
    pattern, layers_27b = _GEMMA[arch]
    given = key("attention.sliding_window_pattern")
    if isinstance(given, list | tuple):
        sliding = tuple(bool(s) for s in given)
    else:
        n = int(given) if given is not None else pattern
        sliding = tuple(n > 0 and i % n < n - 1 for i in range(layers))
    if len(sliding) != layers:
        raise ModelLoadError(f"{path}: sliding_window_pattern names {len(sliding)} layers, the model has {layers}")
    scale = key("attention.scale")
    if scale is None:
        scale = (hidden // heads) ** -0.5 if layers == layers_27b else head_dim**-0.5
    final_cap, attn_cap = key("final_logit_softcapping"), key("attn_logit_softcapping")
    if arch == "gemma3" and attn_cap:
        raise ModelLoadError(f"{path}: attn_logit_softcapping on gemma3 is not supported")
    fields = {
        "embed_scale": hidden**0.5, "norm_offset": 0.0, "sandwich_norms": True, "mlp_activation": "gelu_tanh",
        "attn_scale": float(scale),
        "final_logit_softcap": float(final_cap) if final_cap else None,
        "attn_logit_softcap": float(attn_cap) if attn_cap else None,
    }
    if arch == "gemma3":  # Gemma 2 rotates every layer alike
        fields["local_rope_theta"] = float(key("rope.freq_base_swa", 10000.0))
        fields["local_rope_layers"] = tuple(i for i, s in enumerate(sliding) if s)
    return fields, sliding


def _moe_fields(key: Key, tensors: dict, layers: int) -> dict:
    return {"num_experts": int(key("expert_count")), "experts_per_token": int(key("expert_used_count")),
            "moe_intermediate_size": int(key("expert_feed_forward_length")),
            "norm_topk_prob": bool(key("expert_weights_norm", True)),
            "moe_layers": tuple(i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" in tensors)}


def config_from_gguf(gguf_arch: str, key: Key, tensors: dict, vocab_len: int,
                     freq_factors: tuple[float, ...] | None, special: dict, path: Path) -> ModelConfig:
    """``key(name, default)`` reads ``{arch}.{name}``; ``tensors`` maps GGUF tensor names to anything;
    ``special`` holds the ``bos`` id (or None) and the ``eos`` ids (:func:`end_ids`)."""
    arch = GGUF_ARCHS[gguf_arch]
    try:
        n_heads = int(key("attention.head_count"))
        n_kv = int(key("attention.head_count_kv", n_heads))
        hidden = int(key("embedding_length"))
        layers = int(key("block_count"))
        head_dim = int(key("attention.key_length", key("rope.dimension_count", hidden // n_heads)))
        rope_dim = int(key("rope.dimension_count", head_dim))
        if rope_dim != head_dim:
            raise ModelLoadError(f"{path}: partial rotary (rope.dimension_count {rope_dim} < head_dim {head_dim}) "
                                 "is not supported")
        scaling, max_position = rope_scaling_of(key, freq_factors, int(key("context_length", 2048)), path)
        extra: dict = {}
        if arch == "qwen3_moe":
            extra = _moe_fields(key, tensors, layers)
        if gguf_arch in _GEMMA:
            extra, sliding = _gemma_fields(gguf_arch, key, layers, hidden, n_heads, head_dim, path)
            window = key("attention.sliding_window")
            if window and any(sliding):  # NOTE: attention is full; the window bounds the context instead
                max_position = min(max_position, int(window))
        ff = key("feed_forward_length", extra.get("moe_intermediate_size"))
        bos = special.get("bos")
        return ModelConfig(
            arch=arch,
            num_layers=layers,
            hidden_size=hidden,
            intermediate_size=int(ff),
            num_heads=n_heads,
            num_kv_heads=n_kv,
            head_dim=head_dim,
            vocab_size=int(key("vocab_size", vocab_len)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rms_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            max_position=max_position,
            tie_embeddings="output.weight" not in tensors,
            qkv_bias="blk.0.attn_q.bias" in tensors,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=tuple(special.get("eos", ())),
            rope_scaling=scaling,
            qk_norm="blk.0.attn_q_norm.weight" in tensors,
            **extra,
        )
    except ModelLoadError:
        raise
    except (TypeError, ValueError) as exc:  # a key missing (None) or out of range
        raise ModelLoadError(f"{path}: bad {gguf_arch} metadata ({exc})") from exc
