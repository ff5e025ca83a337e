"""Prompt logprobs: each prompt token's log-probability given the tokens before it, with the top
alternatives (``SamplingParams.prompt_logprobs``). It is how a served model is scored on a text
(``echo`` with ``logprobs`` on /v1/completions; lm-eval's loglikelihood tasks).

Position ``p``'s logits score prompt token ``p + 1``. A prefill chunk over positions ``[start, start + n)``
asks the model for the logits of those of its positions not scored yet (:func:`spans`, found once a step
by the engine and handed to `runner.build`, which puts their rows after the sampling rows), and
:func:`score` appends their entries to ``req.prompt_logprobs`` in order. The
scheduler reuses a cached prefix only as far as the prompt is already scored, so no position is
skipped; a preempted request keeps what it scored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from appliance.engine.host_copy import to_device
from appliance.engine.request import Request

# positions a step scores per request: the step's logits are rows x vocabulary floats (512 x 128K x 4 B =
# 256 MB on an 8B model's GPU; a whole 2048-token chunk would be 1 GB, and log-softmax doubles it)
MAX_SCORED_ROWS = 512


def chunk_budget(req: Request, budget: int) -> int:
    """A prefill chunk's budget for ``req``: at most MAX_SCORED_ROWS while it still scores its prompt."""
    if scorable_prefix(req) is None:
        return budget
    return min(budget, MAX_SCORED_ROWS)


def positions(req: Request, start: int, n: int) -> range:
    """The positions of a chunk ``[start, start + n)`` whose logits score a prompt token not scored yet."""
    if req.params.prompt_logprobs is None:
        return range(0)
    return range(max(start, len(req.prompt_logprobs)), min(start + n, req.prompt_len - 1))


def scorable_prefix(req: Request) -> int | None:
    """How many leading tokens may come from the prefix cache (None: any): with prompt logprobs, only
    those already scored, since a cached position is never run."""
    if req.params.prompt_logprobs is None or len(req.prompt_logprobs) >= req.prompt_len - 1:
        return None
    return len(req.prompt_logprobs)


def spans(requests: Sequence[Request], starts: Sequence[int], lens: Sequence[int]) -> list[tuple[Request, range]]:
    """The step's requests with positions to score, in the order their logit rows follow the sampling rows."""
    out = []
    for req, start, n in zip(requests, starts, lens, strict=True):
        rng = positions(req, start, n)
        if rng:
            out.append((req, rng))
    return out


def score(logits: torch.Tensor, parts: list[tuple[Request, range]]) -> None:
    """Append each part's entries (``{"token_id", "logprob", "top"}``, as a sampled token's) to its
    request's ``prompt_logprobs``; ``logits`` has one row per position, in the parts' order."""
    targets = [req.prompt_ids[p + 1] for req, rng in parts for p in rng]
    if logits.shape[0] != len(targets):
        raise ValueError(f"{logits.shape[0]} prompt logit rows for {len(targets)} positions")
    lp = torch.log_softmax(logits.float(), dim=-1)
    idx = to_device(targets, lp.device, torch.int64)  # pinned: no wait for the step's kernels
    chosen = lp.gather(1, idx[:, None])[:, 0]
    k = max(req.params.prompt_logprobs or 0 for req, _ in parts)
    parts_out = [chosen.double()]
    if k:
        top = lp.topk(k, dim=-1)
        parts_out += [top.values.flatten().double(), top.indices.flatten().double()]
    flat = torch.cat(parts_out).tolist()  # one copy to the host
    rows = len(targets)
    values, ids = flat[rows:rows + rows * k], flat[rows + rows * k:]
    row = 0
    for req, rng in parts:
        want = req.params.prompt_logprobs or 0
        for p in rng:
            req.prompt_logprobs.append({
                "token_id": req.prompt_ids[p + 1], "logprob": flat[row],
                "top": [(int(ids[row * k + c]), values[row * k + c]) for c in range(want)],
            })
            row += 1
