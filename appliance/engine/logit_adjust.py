"""Penalties and logit bias: a request's logits adjusted before the filters and the draw.

In order, as vLLM applies them: ``logit_bias`` adds to the named tokens' logits; ``repetition_penalty``
(CTRL's) divides the positive logits of every token in the prompt or the answer so far by the penalty
and multiplies the negative ones; ``presence_penalty`` and ``frequency_penalty`` (OpenAI's) subtract
``presence + frequency * count`` from every token the answer holds ``count`` times; while an answer is
shorter than its ``min_tokens``, its ``early_stops`` (EOS, the stop tokens) are banned. Rows that ask for
none are untouched, and a batch with none returns its logits as they are (no copy). Works on CPU and
CUDA tensors alike: each adjustment is one indexed op over the (row, token) pairs it touches, which one
``torch.unique`` over ``row * vocab + token`` keys finds for the whole batch (with the counts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from appliance.engine.host_copy import to_device
from appliance.engine.request import Request, SamplingParams


def adjust(logits: torch.Tensor, reqs: Sequence[Request]) -> torch.Tensor:
    """``logits`` ``(len(reqs), vocab)`` with each row's bias and penalties applied (a new fp32 tensor),
    or ``logits`` itself when no row has any."""
    rows = [i for i, r in enumerate(reqs) if r.params.adjusts_logits]
    if not rows:
        return logits
    if logits.shape[0] != len(reqs):
        raise ValueError(f"{logits.shape[0]} rows of logits for {len(reqs)} requests")
    out = logits.float().clone()
    vocab = out.shape[-1]
    bias = [(i, t, b) for i in rows for t, b in reqs[i].params.logit_bias]
    if bias:
        bad = next((t for _, t, _ in bias if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} of logit_bias is outside the {vocab}-token vocabulary")
        r, t, v = zip(*bias, strict=True)
        out.index_put_(_on(out, r, t), to_device(v, out.device, torch.float32), accumulate=True)
    rep = [i for i in rows if reqs[i].params.repetition_penalty != 1.0]
    if rep:
        keys = _keys([(i, _prompt_tokens(reqs[i])) for i in rep] + [(i, _answer(reqs[i])) for i in rep], vocab)
        r, t = _pairs(keys.unique(), vocab)
        factor = to_device(_per_row(reqs, lambda p: p.repetition_penalty, 1.0)[r], out.device)
        idx = (to_device(r, out.device), to_device(t, out.device))
        x = out[idx]
        out[idx] = torch.where(x > 0, x / factor, x * factor)
    pen = [i for i in rows if reqs[i].params.presence_penalty or reqs[i].params.frequency_penalty]
    if pen:
        keys, counts = _keys([(i, _answer(reqs[i])) for i in pen], vocab).unique(return_counts=True)
        r, t = _pairs(keys, vocab)
        presence = _per_row(reqs, lambda p: p.presence_penalty, 0.0)[r]
        frequency = _per_row(reqs, lambda p: p.frequency_penalty, 0.0)[r]
        out.index_put_((to_device(r, out.device), to_device(t, out.device)),
                       to_device(-(presence + frequency * counts), out.device), accumulate=True)
    early = [(i, t) for i in rows if len(reqs[i].output_ids) < reqs[i].params.min_tokens
             for t in reqs[i].early_stops if t < vocab]
    if early:
        r, t = zip(*early, strict=True)
        out.index_put_(_on(out, r, t), torch.full((), float("-inf"), device=out.device))
    return out


def _answer(req: Request) -> torch.Tensor:
    return torch.tensor(req.output_ids, dtype=torch.int64)


def _prompt_tokens(req: Request) -> torch.Tensor:
    """The prompt's distinct tokens, found once per request."""
    if req.prompt_tokens is None:
        req.prompt_tokens = torch.tensor(req.prompt_ids, dtype=torch.int64).unique()
    return req.prompt_tokens


def _keys(parts: list[tuple[int, torch.Tensor]], vocab: int) -> torch.Tensor:
    """``row * vocab + token`` for every (row, tokens) part, one flat int64 tensor on the host."""
    for _, toks in parts:
        if toks.numel() and int(toks.max()) >= vocab:
            raise ValueError(f"token id {int(toks.max())} of a prompt or answer is outside the {vocab}-token "
                             "vocabulary")
    return torch.cat([row * vocab + toks for row, toks in parts])


def _pairs(keys: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    return keys // vocab, keys % vocab


def _per_row(reqs: Sequence[Request], value: Callable[[SamplingParams], float], default: float) -> torch.Tensor:
    """One value per row of the batch (``default`` for rows that adjust nothing), indexable by row."""
    return torch.tensor([value(r.params) if r.params.adjusts_logits else default for r in reqs], dtype=torch.float32)


def _on(out: torch.Tensor, rows, toks) -> tuple[torch.Tensor, torch.Tensor]:
    return to_device(rows, out.device, torch.int64), to_device(toks, out.device, torch.int64)
