"""Penalties and logit bias: a request's logits adjusted before the filters and the draw.

In order, as vLLM applies them: ``logit_bias`` adds to the named tokens' logits; ``repetition_penalty``
(CTRL's) divides the positive logits of every token in the prompt or the answer so far by the penalty
and multiplies the negative ones; ``presence_penalty`` and ``frequency_penalty`` (OpenAI's) subtract
``presence + frequency * count`` from every token the answer holds ``count`` times. Rows that ask for
none are untouched, and a batch with none returns its logits as they are (no copy). Works on CPU and
CUDA tensors alike: the per-row lists are built on the host and applied with one indexed op each.
Answer-token counts live on the request and grow a step at a time, so a step costs O(new tokens),
not O(answer length).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from appliance.engine.request import Request


def answer_counts(req: Request) -> dict[int, int]:
    """How often each token occurs in ``req``'s answer so far (brought up to date in place)."""
    counts = req.token_counts
    for t in req.output_ids[req.counted:]:
        counts[t] = counts.get(t, 0) + 1
    req.counted = len(req.output_ids)
    return counts


def seen_tokens(req: Request) -> set[int]:
    """The distinct tokens of ``req``'s prompt and answer so far."""
    if req.prompt_tokens is None:
        req.prompt_tokens = frozenset(req.prompt_ids)
    return set(req.prompt_tokens).union(answer_counts(req))


def adjust(logits: torch.Tensor, reqs: Sequence[Request]) -> torch.Tensor:
    """``logits`` ``(len(reqs), vocab)`` with each row's bias and penalties applied (a new fp32 tensor),
    or ``logits`` itself when no row has any."""
    rows = [i for i, r in enumerate(reqs) if r.params.adjusts_logits]
    if not rows:
        return logits
    if logits.shape[0] != len(reqs):
        raise ValueError(f"{logits.shape[0]} rows of logits for {len(reqs)} requests")
    bias: tuple[list[int], list[int], list[float]] = ([], [], [])
    rep: tuple[list[int], list[int], list[float]] = ([], [], [])
    pen: tuple[list[int], list[int], list[float]] = ([], [], [])
    for i in rows:
        r = reqs[i]
        p = r.params
        for t, b in p.logit_bias:
            _put(bias, i, t, b)
        if p.repetition_penalty != 1.0:
            for t in seen_tokens(r):
                _put(rep, i, t, p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            for t, c in answer_counts(r).items():
                _put(pen, i, t, -(p.presence_penalty + p.frequency_penalty * c))
    out = logits.float().clone()
    vocab = out.shape[-1]
    for name, (_, toks, _) in (("logit_bias", bias), ("a prompt or answer", rep)):
        bad = next((t for t in toks if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} of {name} is outside the {vocab}-token vocabulary")
    if bias[0]:
        r, t, v = _tensors(bias, out.device)
        out.index_put_((r, t), v, accumulate=True)
    if rep[0]:
        r, t, f = _tensors(rep, out.device)
        x = out[r, t]
        out[r, t] = torch.where(x > 0, x / f, x * f)
    if pen[0]:
        r, t, v = _tensors(pen, out.device)
        out.index_put_((r, t), v, accumulate=True)
    return out


def _put(lists: tuple[list[int], list[int], list[float]], row: int, token: int, value: float) -> None:
    lists[0].append(row)
    lists[1].append(token)
    lists[2].append(value)


def _tensors(lists: tuple[list[int], list[int], list[float]], device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, toks, vals = lists
    idx = torch.tensor([rows, toks], dtype=torch.int64).to(device, non_blocking=True)
    return idx[0], idx[1], torch.tensor(vals, dtype=torch.float32).to(device, non_blocking=True)
