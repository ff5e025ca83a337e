"""Rotary frequency scaling: the rope types of Hugging Face checkpoints, as rotation angles per position.

Each type follows transformers' ``modeling_rope_utils`` (same formulas, computed in fp64):

- ``default``: ``inv_freq[i] = theta ** (-2i / D)``;
- ``linear``: positions interpolated, ``inv_freq / factor``;
- ``llama3`` (Llama 3.1+): long wavelengths divided by ``factor``, short ones kept, a smooth ramp between;
- ``yarn``: NTK-by-parts interpolation, and cos/sin scaled by an attention factor (``0.1 ln(factor) + 1``);
- ``dynamic`` (NTK): positions inside the pre-trained context use the default frequencies; position ``p``
  beyond it uses the base of a sequence ending at ``p``. That is what transformers computes token by token
  with its KV cache (keys keep the rotation they were cached with); a prompt that is longer than the
  pre-trained context and prefilled in one pass is rotated by transformers with the prompt's own length.

``freq_factors`` (llama.cpp's ``rope_freqs`` tensor, how a GGUF file stores Llama 3.1's scaling) divide each
inverse frequency after the type's formula, as llama.cpp's rope does.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch


class RopeParams(Protocol):
    """The fields of a rope type the formulas read (``appliance.config.RopeScaling`` has them, validated).

    ``original_max_position`` is the context the model was pre-trained on.
    """

    rope_type: str
    factor: float
    original_max_position: int
    low_freq_factor: float
    high_freq_factor: float
    beta_fast: float
    beta_slow: float
    attention_factor: float | None
    mscale: float
    mscale_all_dim: float
    truncate: bool
    freq_factors: tuple[float, ...]


def cos_sin_scale(s: RopeParams | None) -> float:
    """The factor cos and sin are multiplied by (yarn's attention factor; 1 for the other types)."""
    if s is None or s.rope_type != "yarn":
        return 1.0
    if s.attention_factor is not None:
        return float(s.attention_factor)
    if s.mscale and s.mscale_all_dim:
        return _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim)
    return _yarn_mscale(s.factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """``(head_dim // 2,)`` fp64 inverse frequencies of plain rotary."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def scaled_inv_freq(head_dim: int, theta: float, scaling: RopeParams) -> torch.Tensor:
    """``(head_dim // 2,)`` fp64 inverse frequencies of a position-independent rope type."""
    inv = _type_inv_freq(head_dim, theta, scaling)
    factors = getattr(scaling, "freq_factors", ())
    if not factors:
        return inv
    if len(factors) != head_dim // 2:
        raise ValueError(f"{len(factors)} per-frequency rope factors for head_dim {head_dim} "
                         f"(needs head_dim / 2 = {head_dim // 2})")
    return inv / torch.tensor(factors, dtype=torch.float64)


def _type_inv_freq(head_dim: int, theta: float, scaling: RopeParams) -> torch.Tensor:
    inv = default_inv_freq(head_dim, theta)
    s = scaling
    if s.rope_type == "default":
        return inv
    if s.rope_type == "linear":
        return inv / s.factor
    if s.rope_type == "llama3":
        low_wavelen = s.original_max_position / s.low_freq_factor
        high_wavelen = s.original_max_position / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    if s.rope_type == "yarn":
        return _yarn_inv_freq(head_dim, theta, s)
    raise ValueError(f"rope type {s.rope_type!r} has position-dependent frequencies: use rotary_angles")


def _yarn_inv_freq(head_dim: int, theta: float, s: RopeParams) -> torch.Tensor:
    """NTK-by-parts: high frequencies extrapolated, low ones interpolated by ``factor``, a linear ramp between."""
    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(s.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = default_inv_freq(head_dim, theta)
    interpolation = extrapolation / s.factor
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep


def rotary_angles(head_dim: int, max_position: int, theta: float, scaling: RopeParams | None = None) -> torch.Tensor:
    """``(max_position, head_dim // 2)`` fp64 rotation angles: position times inverse frequency."""
    positions = torch.arange(max_position, dtype=torch.float64)
    if scaling is None or scaling.rope_type != "dynamic":
        inv = default_inv_freq(head_dim, theta) if scaling is None else scaled_inv_freq(head_dim, theta, scaling)
        return torch.outer(positions, inv)
    # dynamic NTK: the base grows with the length of the sequence ending at each position
    orig, factor = scaling.original_max_position, scaling.factor
    seq_len = positions + 1
    base = theta * ((factor * seq_len / orig) - (factor - 1)) ** (head_dim / (head_dim - 2))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv = torch.where(seq_len[:, None] > orig, 1.0 / base[:, None] ** exponents[None, :],
                      default_inv_freq(head_dim, theta)[None, :])
    return positions[:, None] * inv
