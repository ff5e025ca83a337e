"""Token sampling: greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs; penalties and
logit bias first (`appliance.engine.logit_adjust`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from appliance.engine.device_sampler import DeviceSampler
from appliance.engine.logit_adjust import adjust
from appliance.engine.request import Request, SamplingParams
from appliance.engine.row_failure import failure_code
from appliance.engine.token_mask import TokenMask


class Sampler:
    """Samples one token per row of ``logits``; greedy rows skip all randomness.

    CUDA logits are sampled where they are (:class:`~appliance.engine.device_sampler.DeviceSampler`:
    only ids and requested logprobs reach the host); CPU logits here, on the host. A row that cannot be
    sampled gets a negative id instead of a token (`appliance.engine.row_failure`).
    """

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.device_sampler = DeviceSampler(seed)

    def sample(self, logits: torch.Tensor, reqs: Sequence[Request],
               mask: TokenMask | None = None) -> tuple[list[int], list[dict[str, Any] | None]]:
        """``mask``: the allowed tokens of the constrained rows (structured outputs); logprobs stay
        those of the raw logits, before penalties, bias and mask."""
        if logits.is_cuda:
            return self.device_sampler.sample(logits, reqs, mask)
        logits = logits.float().cpu()
        raw = logits
        logits = adjust(logits, reqs)
        if mask is not None:
            logits = mask.apply(logits)
        top, ids = logits.max(dim=-1)  # greedy's tokens (the first maximum, as argmax) and each row's health
        tokens: list[int] = [failure_code(t) or i for t, i in zip(top.tolist(), ids.tolist())]
        for i, r in enumerate(reqs):
            if not r.params.greedy and tokens[i] >= 0:
                tokens[i] = self._sample_one(logits[i], r)
        logprobs: list[dict[str, Any] | None] = [None] * len(reqs)
        want = [i for i, r in enumerate(reqs) if r.params.logprobs is not None and tokens[i] >= 0]
        if want:
            lp = torch.log_softmax(raw[want], dim=-1)
            for j, i in enumerate(want):
                k = reqs[i].params.logprobs or 0
                top = lp[j].topk(k) if k else None
                logprobs[i] = {
                    "token_id": tokens[i],
                    "logprob": float(lp[j, tokens[i]]),
                    "top": [] if top is None else
                    [(int(t), float(v)) for v, t in zip(top.values.tolist(), top.indices.tolist())],
                }
        return tokens, logprobs

    def _sample_one(self, row: torch.Tensor, req: Request) -> int:
        p = req.params
        probs = filtered_row(row, p)
        gen = self.generator
        if p.seed is not None:
            # NOTE: one generator per (seed, position): a seeded request samples the same tokens
            # whichever engine computes which position (prefill samples the first, decode the rest).
            gen = torch.Generator().manual_seed((p.seed * 1_000_003 + len(req.output_ids)) % (1 << 62))
        return int(torch.multinomial(probs, 1, generator=gen))


def filtered_row(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row's probabilities after temperature, top-k, top-p and min-p (``p``: SamplingParams)."""
    row = row / max(p.temperature, 1e-5)
    if p.top_k > 0:
        kth = row.topk(min(p.top_k, row.shape[-1])).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cum = sorted_p.cumsum(-1)
        drop = cum - sorted_p > p.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs
