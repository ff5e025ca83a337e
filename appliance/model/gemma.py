"""Gemma 2 and Gemma 3 (text) settings of a Hugging Face ``config.json``, as transformers' ``Gemma2Config`` and
``Gemma3TextConfig`` read them.

Both: embeddings scaled by sqrt(hidden), RMSNorm weights stored as ``w - 1``, sandwich norms, GeGLU, the
attention scale ``query_pre_attn_scalar ** -0.5``. Gemma 2 soft-caps attention scores
(``attn_logit_softcapping``, 50 by default) and the final logits (30 by default), slides every other layer
(the first of each pair) and rotates every layer alike. Gemma 3 has no attention cap and q/k norms; its
layers alternate: ``sliding_attention`` layers rotate with the local theta (plain rope, 10000 by default),
``full_attention`` layers with the global one (1e6) and its scaling (linear 8 on the larger models).
transformers 5 nests the two under ``rope_parameters``; older files keep ``rope_theta``,
``rope_local_base_freq`` and ``rope_scaling`` at the top level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance.model.errors import ModelLoadError
from appliance.model.hf_rope import HFRope, rope_from_hf

LOCAL_THETA = 10_000.0


@dataclass(frozen=True)
class GemmaSettings:
    rope: HFRope  # the full-attention layers'
    layer_types: tuple[str, ...]
    fields: dict[str, Any]  # the rest of ModelConfig's Gemma fields


def gemma_settings(raw: dict, num_layers: int, hidden: int, global_theta: float, source: str,
                   arch: str = "gemma3") -> GemmaSettings:
    gemma2 = arch == "gemma2"
    refused = ("use_bidirectional_attention",) + (() if gemma2 else ("attn_logit_softcapping",))
    for key in refused:
        if raw.get(key):
            raise ModelLoadError(f"{source}: {key}={raw[key]!r} is not supported")
    act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ModelLoadError(f"{source}: activation {act!r} is not supported (Gemma: gelu_pytorch_tanh)")
    pattern = 2 if gemma2 else int(raw.get("sliding_window_pattern", 6))
    types = tuple(raw.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                              for i in range(num_layers)])
    if len(types) != num_layers or set(types) - {"sliding_attention", "full_attention"}:
        raise ModelLoadError(f"{source}: layer_types must name {num_layers} sliding_attention/full_attention layers")
    if gemma2:
        return GemmaSettings(rope_from_hf(raw, global_theta, source), types, _fields(raw, hidden, gemma2=True))
    params = raw.get("rope_parameters") or {}
    nested = bool(params) and all(isinstance(v, dict) for v in params.values())
    full = dict(params.get("full_attention") or {}) if nested else dict(params)
    full.update(raw.get("rope_scaling") or {})
    local = dict(params.get("sliding_attention") or {}) if nested else {}
    base = {k: v for k, v in raw.items() if k not in ("rope_parameters", "rope_scaling")}
    rope = rope_from_hf({**base, "rope_parameters": full}, global_theta, source)
    local_rope = rope_from_hf({"max_position_embeddings": rope.max_position,
                               "rope_theta": raw.get("rope_local_base_freq"), "rope_parameters": local},
                              LOCAL_THETA, source)
    if local_rope.scaling.rope_type != "default":
        raise ModelLoadError(f"{source}: scaled rope on sliding layers ({local_rope.scaling.rope_type}) "
                             "is not supported")
    fields = {**_fields(raw, hidden, gemma2=False), "local_rope_theta": local_rope.theta,
              "local_rope_layers": tuple(i for i, t in enumerate(types) if t == "sliding_attention")}
    return GemmaSettings(rope, types, fields)


def _fields(raw: dict, hidden: int, gemma2: bool) -> dict[str, Any]:
    """The fields both versions share; a cap absent from the file is the version's default, null is off."""
    final = raw.get("final_logit_softcapping", 30.0 if gemma2 else None)
    attn = raw.get("attn_logit_softcapping", 50.0) if gemma2 else None
    return {
        "embed_scale": hidden**0.5, "norm_offset": 1.0, "sandwich_norms": True, "mlp_activation": "gelu_tanh",
        "attn_scale": float(raw.get("query_pre_attn_scalar", 256)) ** -0.5,
        "final_logit_softcap": float(final) if final else None,
        "attn_logit_softcap": float(attn) if attn else None,
    }
