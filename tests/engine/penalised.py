"""A check shared by the CPU and GPU penalty tests: greedy tokens under presence and frequency penalties."""

from __future__ import annotations

from collections import Counter
from typing import Any


def checked_penalised_steps(tokens: list[int], logprobs: list[dict[str, Any]], presence: float,
                            frequency: float) -> int:
    """Assert each greedy token is the argmax of the raw top logprobs minus the answer-so-far penalties,
    wherever the top list settles it; returns how many steps it settled (the rest are near-ties or
    could hide a better token past the list)."""
    counts: Counter[int] = Counter()
    checked = 0
    for token, lp in zip(tokens, logprobs, strict=True):
        score = {t: v - (presence + frequency * counts[t] if counts[t] else 0.0) for t, v in lp["top"]}
        ranked = sorted(score.values(), reverse=True)
        # a token past the list scores at most the list's last raw logprob (penalties only lower scores)
        if ranked[0] > lp["top"][-1][1] + 1e-4 and ranked[0] - ranked[1] > 1e-4:
            assert token == max(score, key=score.get), (token, score)
            checked += 1
        counts[token] += 1
    return checked
