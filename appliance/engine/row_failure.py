"""Rows of a step's logits that cannot be sampled: each fails its own request, not the step.

The samplers (`appliance.engine.sampler`, `appliance.engine.device_sampler`) give such a row a negative
id instead of a token and ``Engine.step`` fails that request alone: ``BAD_LOGITS`` when its logits are not
finite (NaN or +inf: the forward pass overflowed, e.g. in float16), ``NO_TOKEN`` when penalties, bias, the
min_tokens ban and the constraint's mask leave no token allowed. Both are read from the row's maximum,
which greedy sampling computes anyway, so finding them costs no pass over the vocabulary and no sync.
"""

from __future__ import annotations

import math

import torch

BAD_LOGITS = -1  # the row's logits hold NaN or +inf
NO_TOKEN = -2  # every token of the row is at -inf after penalties, bias, bans and the mask


def row_failure(token: int) -> str:
    """Why a row sampled to ``token`` (< 0) failed, in words for the client."""
    if token == BAD_LOGITS:
        return ("the model's logits for this request are not finite (NaN or inf): its forward pass overflowed "
                "(a float16 engine can; float32 or bfloat16 would not)")
    return "no token is allowed: the structured-output constraint, logit_bias and min_tokens exclude every token"


def failure_status(token: int) -> int:
    """The HTTP status of a row failure: the model's fault (500), or the request's own parameters (400)."""
    return 500 if token == BAD_LOGITS else 400


def failure_code(top: float) -> int:
    """0, or the failure code of a row whose maximum is ``top`` (NaN/+inf: BAD_LOGITS; -inf: NO_TOKEN)."""
    if math.isfinite(top):
        return 0
    return NO_TOKEN if top == -math.inf else BAD_LOGITS


def failed_rows(top: torch.Tensor) -> torch.Tensor:
    """:func:`failure_code` of each row's maximum, on the device (host rows: a few tensor ops cost more
    than a Python loop over the values)."""
    bad = torch.isnan(top) | (top == float("inf"))
    none = top == float("-inf")
    return torch.where(bad, BAD_LOGITS, torch.where(none, NO_TOKEN, 0))
