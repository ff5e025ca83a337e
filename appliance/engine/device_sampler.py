"""Sampling where the logits are (the GPU): one step's ids and logprobs cross to the host in ONE copy.

Same semantics as the host :class:`~appliance.engine.sampler.Sampler` (penalties and logit bias, greedy,
temperature, top-k, top-p, min-p, logprobs of the raw logits), vectorized over the batch: the filters
are masks over one sort, and a token is drawn by inverse CDF, the first whose cumulative probability
reaches ``u`` times the row's total, which picks token ``i`` with probability ``probs[i]``. Each row
needs ONE uniform ``u``, made on the host and shipped with the row's temperature and filters: a seeded
request's is a hash of (seed, position) (`appliance.engine.counter_rng`), so its tokens do not depend on
its batch neighbours, nor on which engine samples which position; they are NOT the host sampler's tokens
for the same seed (another draw). Works on any device (the CPU tests run it on CPU tensors); the engine
uses it on CUDA only, so CPU answers are the host sampler's.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from appliance.engine.counter_rng import uniform
from appliance.engine.host_copy import to_device
from appliance.engine.logit_adjust import adjust
from appliance.engine.request import Request
from appliance.engine.row_failure import failed_rows
from appliance.engine.token_mask import TokenMask

SEED_MIX = 1_000_003  # (seed, position) -> one key


def seed_key(seed: int, position: int) -> int:
    return (seed * SEED_MIX + position) % (1 << 62)


def filtered_probs(logits: torch.Tensor, params: torch.Tensor, top_k: bool, top_p: bool, min_p: bool) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p and min-p; ``params`` ``(B, 4+)``: temperature,
    top_k (<= 0: off), top_p, min_p per row (more columns are ignored). The flags say whether any row
    uses that filter (host knowledge: no sync to find out)."""
    temp, k, p, mp = (params[:, i] for i in range(4))
    scaled = logits.float() / temp.clamp_min(1e-5)[:, None]
    vocab = scaled.shape[-1]
    sorted_vals = order = None
    if top_k or top_p:
        sorted_vals, order = scaled.sort(dim=-1, descending=True)
    if top_k:
        kk = torch.where(k > 0, k.clamp(max=vocab), torch.full_like(k, vocab)).long()
        kth = sorted_vals.gather(1, (kk - 1)[:, None])
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        sorted_vals = sorted_vals.masked_fill(sorted_vals < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p:
        sorted_p = torch.softmax(sorted_vals, dim=-1)
        cum = sorted_p.cumsum(-1)
        # the smallest prefix reaching top_p; rows at 1.0 keep all (a cumsum may round past 1)
        drop = (cum - sorted_p > p[:, None]) & (p < 1.0)[:, None]
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_p)
    if min_p:
        probs = probs.masked_fill(probs < mp[:, None] * probs.amax(-1, keepdim=True), 0.0)
    return probs


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose cumulative probability reaches ``u`` (in (0, 1]) times the row's
    total. The target is above zero and at most the total, so it is always found, and a run of
    zero-probability tokens shares its cumulative value with the token before it, which is found first.
    A parallel scan's rounding can still break that tie by one ulp: such a row takes its argmax."""
    cum = probs.cumsum(dim=-1)
    target = (u * cum[:, -1]).clamp_min(torch.finfo(cum.dtype).tiny)[:, None]
    ids = torch.searchsorted(cum, target).clamp_max(probs.shape[-1] - 1)
    return torch.where(probs.gather(1, ids) > 0, ids, probs.argmax(dim=-1, keepdim=True)).squeeze(1)


class DeviceSampler:
    """Samples one token per row of device ``logits``; unseeded rows draw their uniform from one host RNG."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def _uniform(self, req: Request) -> float:
        """The row's ``u`` in (0, 1]: from its (seed, position) key when seeded, else from the shared RNG."""
        if req.params.seed is not None:
            return uniform(seed_key(req.params.seed, len(req.output_ids)))
        return 1.0 - self._rng.random()

    def sample(self, logits: torch.Tensor, reqs: Sequence[Request],
               mask: TokenMask | None = None) -> tuple[list[int], list[dict[str, Any] | None]]:
        """``mask``: the constrained rows' allowed tokens (moved to the device, unpacked there);
        logprobs stay those of the raw logits, before penalties, bias and mask."""
        dev = logits.device
        n = len(reqs)
        if logits.shape[0] != n:
            raise ValueError(f"{logits.shape[0]} rows of logits for {n} requests")
        ps = [r.params for r in reqs]
        raw = logits
        logits = adjust(logits, reqs)
        if mask is not None:
            logits = mask.apply(logits)
        top, ids = logits.max(dim=-1)
        fails = failed_rows(top)  # < 0: the row cannot be sampled (appliance.engine.row_failure); no sync here
        random_rows = [i for i, p in enumerate(ps) if not p.greedy]
        if random_rows:
            rows = to_device(random_rows, dev, torch.int64) if len(random_rows) < n else None
            sub = logits if rows is None else logits.index_select(0, rows)
            params = to_device([[ps[i].temperature, ps[i].top_k, ps[i].top_p, ps[i].min_p, self._uniform(reqs[i])]
                                for i in random_rows], dev, torch.float32)
            probs = filtered_probs(sub, params, any(ps[i].top_k > 0 for i in random_rows),
                                   any(ps[i].top_p < 1.0 for i in random_rows),
                                   any(ps[i].min_p > 0.0 for i in random_rows))
            drawn = inverse_cdf(probs, params[:, 4])
            if rows is None:
                ids = drawn
            else:
                ids = ids.index_copy(0, rows, drawn)
        ids = torch.where(fails < 0, fails, ids)
        want = [i for i, p in enumerate(ps) if p.logprobs is not None]
        if not want:  # ids only: one copy, no cast and concatenation kernels
            return ids.tolist(), [None] * n
        parts = [ids.double()]
        top_k = max((ps[i].logprobs or 0 for i in want), default=0)
        if want:
            w = to_device(want, dev, torch.int64) if len(want) < n else None
            lp = torch.log_softmax((raw if w is None else raw.index_select(0, w)).float(), dim=-1)
            chosen = lp.gather(1, (ids if w is None else ids.index_select(0, w)).clamp_min(0)[:, None])[:, 0]
            parts.append(chosen.double())
            if top_k:
                top = lp.topk(top_k, dim=-1)
                parts += [top.values.flatten().double(), top.indices.flatten().double()]
        flat = torch.cat(parts).cpu().tolist()  # the step's one device-to-host copy
        tokens = [int(t) for t in flat[:n]]
        logprobs: list[dict[str, Any] | None] = [None] * n
        m = len(want)
        vals, idx = flat[n + m:n + m + m * top_k], flat[n + m + m * top_k:]
        for j, i in enumerate(want):
            if tokens[i] < 0:  # a failed row has no logprobs (they may be NaN)
                continue
            k = ps[i].logprobs or 0
            logprobs[i] = {
                "token_id": tokens[i],
                "logprob": flat[n + j],
                "top": [(int(idx[j * top_k + c]), vals[j * top_k + c]) for c in range(k)],
            }
        return tokens, logprobs
