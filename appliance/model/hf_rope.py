"""Rope settings of a Hugging Face ``config.json``: theta, rope type and scaling, the context they give.

transformers 5 writes them under ``rope_parameters`` (``rope_theta``, ``rope_type`` and the type's fields);
older checkpoints keep ``rope_theta`` at the top level and the scaling under ``rope_scaling`` (``type`` or
``rope_type``). The reading order is transformers' own (``RotaryEmbeddingConfigMixin``): ``rope_scaling``
over ``rope_parameters``; theta from that dict, else the top level, else the family's default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance.config import ROPE_TYPES, RopeScaling
from appliance.model.errors import ModelLoadError


@dataclass(frozen=True)
class HFRope:
    """What the model config takes: theta, the scaling, and the context the engine serves with them."""

    theta: float
    scaling: RopeScaling
    max_position: int


def rope_from_hf(raw: dict[str, Any], default_theta: float, source: str = "config.json") -> HFRope:
    """Read theta and the rope type from ``raw``; an unknown type or a missing field names itself."""
    params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ModelLoadError(f"{source}: rope_parameters must be an object, got {params!r}")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ModelLoadError(f"{source}: per-layer-type rope parameters ({', '.join(params)}) are not supported")
    max_pos = int(raw.get("max_position_embeddings") or 2048)
    theta = params.get("rope_theta", raw.get("rope_theta"))
    theta = default_theta if theta is None else float(theta)
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise ModelLoadError(f"{source}: partial_rotary_factor={partial} is not supported (rotary over the whole head)")
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ModelLoadError(f"{source}: unsupported rope type {rope_type!r}; pdbox supports {', '.join(ROPE_TYPES)}")

    def need(key: str) -> float:
        if params.get(key) is None:
            raise ModelLoadError(f"{source}: rope type {rope_type!r} needs {key!r} in its rope parameters")
        return float(params[key])

    # transformers: a top-level original_max_position_embeddings wins (Phi-3 style), then the rope dict's,
    # then max_position_embeddings.
    original = int(raw.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                   or max_pos)
    try:
        if rope_type == "default":
            return HFRope(theta, RopeScaling(), max_pos)
        if rope_type == "linear":
            return HFRope(theta, RopeScaling("linear", factor=need("factor")), max_pos)
        if rope_type == "dynamic":
            factor = need("factor")
            scaling = RopeScaling("dynamic", factor=factor, original_max_position=max_pos)
            return HFRope(theta, scaling, int(max_pos * max(factor, 1.0)))
        if rope_type == "llama3":
            scaling = RopeScaling("llama3", factor=need("factor"), original_max_position=original,
                                  low_freq_factor=need("low_freq_factor"), high_freq_factor=need("high_freq_factor"))
            return HFRope(theta, scaling, max_pos)
        # yarn
        factor = params.get("factor")
        factor = max_pos / original if factor is None else float(factor)
        scaling = RopeScaling(
            "yarn", factor=factor, original_max_position=original,
            beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
            attention_factor=None if params.get("attention_factor") is None else float(params["attention_factor"]),
            mscale=float(params.get("mscale") or 0.0), mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
            truncate=bool(params.get("truncate", True)),
        )
        return HFRope(theta, scaling, max(max_pos, int(original * factor)))
    except ModelLoadError:
        raise
    except ValueError as exc:
        raise ModelLoadError(f"{source}: {exc}") from exc
