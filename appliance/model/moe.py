"""Mixture-of-experts feed-forward (Qwen3-MoE): a softmax router picks ``top_k`` experts per token.

Batched by expert, not by token: the (token, choice) pairs are sorted by expert once, each expert that
got any runs one GEMM pair over all its tokens, and the weighted outputs are summed back per token.
Under tensor parallelism every rank holds a slice of every expert's intermediate dim (like the dense
FFN), so the usual all-reduce after ``down`` completes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from appliance.engine.attention import AttentionBackend


@dataclass
class MoEWeights:
    """One layer's router and experts; expert weights in the form the backend's ``linear`` takes."""

    router: torch.Tensor  # (num_experts, hidden), fp32
    gate_up: list[Any]  # per expert: (2 * intermediate_slice, hidden), gate rows then up rows
    down: list[Any]  # per expert: (hidden, intermediate_slice)
    top_k: int
    norm_topk_prob: bool


def route(x: torch.Tensor, w: MoEWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights, experts)``, each ``(T, top_k)``: softmax over all experts (fp32), the top k, renormalized
    to sum 1 when the checkpoint says so (``norm_topk_prob``)."""
    probs = F.linear(x.float(), w.router).softmax(-1)
    weights, experts = probs.topk(w.top_k, dim=-1)
    if w.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, experts


def moe_forward(be: AttentionBackend, x: torch.Tensor, w: MoEWeights) -> torch.Tensor:
    """``(T, hidden)`` -> ``(T, hidden)`` fp32: each token's top-k experts, weighted and summed."""
    weights, experts = route(x, w)
    flat = experts.flatten()
    order = flat.argsort(stable=True)  # (token, choice) pairs grouped by expert
    counts = torch.bincount(flat, minlength=len(w.gate_up)).tolist()
    tokens = order // w.top_k
    xs = x.index_select(0, tokens)
    out = torch.empty(xs.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n:
            seg = xs[start : start + n]
            out[start : start + n] = be.linear(be.silu_and_mul(be.linear(seg, w.gate_up[e])), w.down[e]).float()
            start += n
    out.mul_(weights.flatten().index_select(0, order).unsqueeze(1))
    return torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, tokens, out)
