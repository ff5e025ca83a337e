"""The TTFT goal a prompt is scheduled against: plain arithmetic, shared by the engine's scheduler
and the router's adaptive placement (which must not import torch: the router needs no GPU)."""

from __future__ import annotations

SLACK_K = 4.0  # slack order: a prompt's TTFT goal is SLACK_K x its isolated prefill time + 0.5 s


def ttft_slack(arrival: float, prompt_len: int, remaining: int, rate: float, now: float, k: float = SLACK_K) -> float:
    """Seconds to spare before a prompt misses its TTFT goal if its prefill started now.

    Goal (DistServe-style): ``k x isolated prefill time + 0.5 s``. Short prompts have little
    work and come early; waiting shrinks every prompt's slack, so long prompts age in.
    """
    rate = max(rate, 1.0)
    return arrival + k * prompt_len / rate + 0.5 - now - remaining / rate
